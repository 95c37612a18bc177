//! The README's quick start, run as a new user pastes it: the shell lines
//! are read from README.md's "Quick start" section (its fenced `sh`
//! blocks), never copied here, so the README cannot drift from what works.
//!
//! Step 1's broker line starts a standalone nameserver and broker in a
//! fresh directory, on free ports given through the environment variables
//! the broker reads (`TXMQ_LISTEN`, `TXMQ_NAMESERVER_LISTEN`) instead of
//! the default ports; the `txmq` lines then run in one `bash` script with
//! aliases on, against it (`TXMQ_NAMESERVER`), and what they print must
//! match the README's "prints something like" block.
//!
//! README's `./target/release/` is a release build. The test runs the
//! debug binaries the tests build ([`txmq_tests::binary`]) instead, through
//! a symlink `target/release` in the fresh directory that points to them,
//! so the lines run unchanged; `cargo` lines (the build, the test run) are
//! skipped for the same reason.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use txmq_tests::free_port;

/// The default addresses the README shows, and what the test replaces
/// them with in the expected output.
const README_BROKER: &str = "127.0.0.1:10911";
const README_NAMESERVER: &str = "127.0.0.1:9876";

/// Fields of the expected output whose values differ from run to run (the
/// queue a first send picks, the message id): any value matches there,
/// and the consumed message must have the sent one's.
const VARIES: &[&str] = &["q", "msg_id"];

/// The quick start as the README has it.
#[derive(Debug)]
struct QuickStart {
    /// Step 1's line that starts the broker.
    broker: String,
    /// The block of `txmq` lines, alias included.
    commands: Vec<String>,
    /// What they print, "something like".
    expected: Vec<String>,
}

/// A fenced block: its info string (`sh`, empty) and lines, and the text
/// between the previous block (or the section's start) and this one.
#[derive(Debug)]
struct Block {
    info: String,
    lines: Vec<String>,
    before: String,
}

/// The fenced blocks of the `## Quick start` section of `readme`.
fn quick_start_blocks(readme: &str) -> Vec<Block> {
    let mut lines = readme
        .lines()
        .skip_while(|l| l.trim() != "## Quick start")
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    let mut blocks = Vec::new();
    let mut before = String::new();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            before.push_str(line);
            before.push('\n');
            continue;
        };
        let body: Vec<String> = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .map(str::to_string)
            .collect();
        blocks.push(Block {
            info: info.trim().to_string(),
            lines: body,
            before: std::mem::take(&mut before),
        });
    }
    blocks
}

/// The shell commands of a block: no comment lines, no blank lines.
fn commands(block: &Block) -> Vec<String> {
    block
        .lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Finds the quick start's parts in `readme`; panics saying what is
/// missing, so a change of the README's shape is noticed here.
fn quick_start(readme: &str) -> QuickStart {
    let blocks = quick_start_blocks(readme);
    let fix =
        "README.md's \"## Quick start\" section changed shape: update it or tests/tests/readme.rs";
    assert!(!blocks.is_empty(), "{fix}: no fenced block found");
    let sh: Vec<&Block> = blocks.iter().filter(|b| b.info == "sh").collect();
    let start = sh
        .iter()
        .find(|b| commands(b).iter().any(|c| c.contains("txmq-broker")))
        .unwrap_or_else(|| panic!("{fix}: no ```sh block with a txmq-broker line"));
    let mut broker = None;
    for line in commands(start) {
        if line.starts_with("cargo ") {
            // The build and the test run: the test has its own build.
            continue;
        }
        assert!(
            line.contains("txmq-broker") && broker.is_none(),
            "{fix}: step 1 has a line this test cannot run as the user would: {line:?}"
        );
        broker = Some(line);
    }
    let cli_at = blocks
        .iter()
        .position(|b| b.info == "sh" && commands(b).iter().any(|c| c.starts_with("alias txmq=")))
        .unwrap_or_else(|| panic!("{fix}: no ```sh block with `alias txmq=...`"));
    let expected = blocks[cli_at + 1..]
        .iter()
        .find(|b| b.before.contains("prints something like"))
        .unwrap_or_else(|| {
            panic!("{fix}: no block after the txmq lines introduced by \"prints something like\"")
        });
    QuickStart {
        broker: broker.unwrap_or_else(|| panic!("{fix}: no line starts the broker")),
        commands: commands(&blocks[cli_at]),
        expected: expected
            .lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .cloned()
            .collect(),
    }
}

/// The value of `key=` in a line's words.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// True when `actual` is "something like" `expected`: the same words,
/// but for the values of [`VARIES`] fields and words with `...` in their
/// value, where only the `key=` must be the same.
fn looks_like(expected: &str, actual: &str) -> bool {
    let e: Vec<&str> = expected.split_whitespace().collect();
    let a: Vec<&str> = actual.split_whitespace().collect();
    e.len() == a.len()
        && e.iter().zip(&a).all(|(e, a)| {
            if e == a {
                return true;
            }
            match (e.split_once('='), a.split_once('=')) {
                (Some((ek, ev)), Some((ak, av))) => {
                    ek == ak && !av.is_empty() && (ev.contains("...") || VARIES.contains(&ek))
                }
                _ => false,
            }
        })
}

/// A process killed (and reaped) when dropped, also when the test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bash` in `dir`, with no `TXMQ_*` variable of the test's own
/// environment, plus `env`.
fn bash(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("TXMQ_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd
}

/// Waits for `child` until `within`, then kills it; its output.
fn finish(mut child: Child, within: Duration) -> Output {
    let deadline = Instant::now() + within;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child
        .wait_with_output()
        .expect("collect the script's output")
}

#[test]
fn the_quick_start_works_as_pasted() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", readme_path.display()));
    let qs = quick_start(&readme);

    let dir = tempfile::tempdir().expect("temp dir");
    let bin_dir = txmq_tests::binary("txmq-broker")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    std::fs::create_dir(dir.path().join("target")).expect("mkdir target");
    std::os::unix::fs::symlink(&bin_dir, dir.path().join("target/release"))
        .expect("link target/release to the test binaries");

    let broker_addr = format!("127.0.0.1:{}", free_port());
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join("broker.log");
    let log = std::fs::File::create(&log_path).expect("broker log");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // `exec`: the process started is the broker itself, so dropping
    // `Running` kills the broker, not a shell around it.
    let mut broker = Running(
        bash(
            dir.path(),
            &[
                ("TXMQ_LISTEN", &broker_addr),
                ("TXMQ_NAMESERVER_LISTEN", &ns_addr),
            ],
        )
        .arg("-c")
        .arg(format!("exec {}", qs.broker))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start bash"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for addr in [&ns_addr, &broker_addr] {
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = broker.0.try_wait().ok().flatten() {
                panic!("`{}` exited with {status}; log:\n{}", qs.broker, log_text());
            }
            assert!(
                Instant::now() < deadline,
                "`{}` does not listen on {addr}; log:\n{}",
                qs.broker,
                log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A user switches terminals after the broker says it listens; by then
    // it has registered with its nameserver. The test waits for that.
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(txmq_tests::wait_for_broker(&ns_addr, "broker-a"));

    // As typed into an interactive shell: aliases on, and stop at the
    // first command that fails.
    let script = format!(
        "shopt -s expand_aliases\nset -e\n{}\n",
        qs.commands.join("\n")
    );
    std::fs::write(dir.path().join("quick-start.sh"), &script).expect("write the script");
    let run = bash(dir.path(), &[("TXMQ_NAMESERVER", &ns_addr)])
        .arg("quick-start.sh")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bash");
    let out = finish(run, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quick start failed ({}):\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}\nbroker log:\n{}",
        out.status,
        log_text()
    );
    let printed: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    let expected: Vec<String> = qs
        .expected
        .iter()
        .map(|l| {
            l.replace(README_BROKER, &broker_addr)
                .replace(README_NAMESERVER, &ns_addr)
        })
        .collect();
    assert_eq!(
        printed.len(),
        expected.len(),
        "the quick start printed\n{stdout}\nthe README says it prints something like\n{}",
        expected.join("\n")
    );
    for (e, a) in expected.iter().zip(&printed) {
        assert!(
            looks_like(e, a),
            "the quick start printed\n{a}\nwhere the README shows\n{e}"
        );
    }
    // The consumed message is the one sent.
    let sent = printed.iter().find(|l| l.starts_with("SEND_OK"));
    let consumed = printed.iter().find(|l| l.contains("body="));
    let (Some(sent), Some(consumed)) = (sent, consumed) else {
        panic!("no SEND_OK or consumed line in\n{stdout}");
    };
    for key in VARIES {
        assert_eq!(
            field(sent, key),
            field(consumed, key),
            "{key} of the sent and consumed message"
        );
    }
    assert_eq!(field(consumed, "body"), Some("hello"));
    assert!(
        dir.path().join("txmq-data").is_dir(),
        "the data is in ./txmq-data, as the README says"
    );
    drop(broker);
}

#[test]
fn the_parts_are_found_and_a_changed_readme_is_noticed() {
    let readme = "# t\n\n## Quick start\n\n```sh\n# 1. build\ncargo build --release\n\
                  ./target/release/txmq-broker --standalone\n```\n\nthen\n\n```sh\n\
                  alias txmq=./target/release/txmq\ntxmq topic list\n```\n\n\
                  prints something like\n\n```\norders\n```\n\n## Next\n\n```sh\nnot this\n```\n";
    let qs = quick_start(readme);
    assert_eq!(qs.broker, "./target/release/txmq-broker --standalone");
    assert_eq!(
        qs.commands,
        ["alias txmq=./target/release/txmq", "txmq topic list"]
    );
    assert_eq!(qs.expected, ["orders"]);

    let no_output = readme.replace("prints something like", "then");
    let e = std::panic::catch_unwind(|| quick_start(&no_output)).expect_err("noticed");
    let text = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(text.contains("prints something like"), "{text}");
    let unknown_line = readme.replace("cargo build --release", "make install");
    assert!(std::panic::catch_unwind(|| quick_start(&unknown_line)).is_err());

    assert!(looks_like(
        "SEND_OK orders q=2 msg_id=1C7E...0000 key=k1",
        "SEND_OK orders q=0 msg_id=7F00000100002A9F key=k1"
    ));
    assert!(!looks_like(
        "SEND_OK orders q=2 key=k1",
        "SEND_OK orders q=2 key=k2"
    ));
    assert!(!looks_like("orders body=hello", "orders body=hello extra"));
}
