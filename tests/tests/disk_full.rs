//! A disk that fills up, for real: a small tmpfs mounted for the test (it
//! needs the privilege to mount; without it the tests say so and skip).
//! Real `txmq-broker` and `txmq-nameserver` processes, driven by the
//! `txmq` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use txmq_tests::{free_port, txmq_cli, BrokerProcess, NameserverProcess};

/// A tmpfs of `size` mounted on a temporary directory; unmounted (lazily,
/// so that a process still holding a file cannot keep it) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs to fill ({other:?}); these tests need the \
                     privilege to mount (root, as .ci/run has)"
                );
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros into `path` until the disk is full, then gives `leave`
/// bytes back, so that about `leave` bytes are free.
fn fill(path: &Path, leave: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    f.set_len(written.saturating_sub(leave)).unwrap();
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `txmq send` until it exits with `code`, for up to 5 s (the broker
/// looks at the disk every 250 ms); returns the last run and how many
/// runs before it were acknowledged.
fn send_until(ns: &str, topic: &str, body: &str, code: i32) -> (Output, usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut acked = 0;
    loop {
        let out = txmq_cli(ns, &["send", topic, "--body", body], None);
        if out.status.code() == Some(code) || Instant::now() > deadline {
            return (out, acked);
        }
        acked += usize::from(out.status.success());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The bodies `group` reads from `topic` (committing them), in order.
fn consume(ns: &str, topic: &str, group: &str, count: usize) -> Vec<String> {
    txmq_tests::cli_consume(ns, topic, group, count, "3s", &[])
        .iter()
        .filter_map(|m| m["body"].as_str().map(str::to_string))
        .collect()
}

struct Site {
    // Dropped in this order: the processes before the mount.
    broker: BrokerProcess,
    nameserver: NameserverProcess,
    _logs: tempfile::TempDir,
}

/// A nameserver and a broker whose data dir is `data` (on the small disk),
/// reached through a link from a directory on the real disk, which takes
/// their logs: a full disk must not swallow the lines the tests read. The
/// topic `full` has one queue and holds one message, `first`.
fn start(data: PathBuf, extra: &[&str], first: &str) -> Site {
    let logs = tempfile::tempdir().unwrap();
    std::fs::create_dir(&data).unwrap();
    let link = logs.path().join("data");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let nameserver = NameserverProcess::start(&ns_addr, &[], &logs.path().join("ns.log"));
    let broker = BrokerProcess::start(&link, &ns_addr, "broker-a", extra);
    for args in [
        &["topic", "create", "full", "--queues", "1"][..],
        &["send", "full", "--body", first],
    ] {
        let out = txmq_cli(&ns_addr, args, None);
        assert!(out.status.success(), "{}", text(&out));
    }
    Site {
        broker,
        nameserver,
        _logs: logs,
    }
}

/// `--disk-free-limit`: once the disk holding the data dir has less free,
/// sends of new messages are refused with STORE_FULL saying why (`txmq
/// send` exits 1) while consumers keep reading and committing; once space
/// is freed, sends are taken again without a restart, and nothing
/// acknowledged is lost.
#[test]
fn a_nearly_full_disk_refuses_new_messages_until_space_is_freed() {
    let Some(disk) = Tmpfs::mount("64m") else {
        return;
    };
    let site = start(
        disk.path().join("data"),
        &["--disk-free-limit", "16MiB", "--segment-size", "8MiB"],
        "first",
    );
    let ns = site.nameserver.addr.clone();

    let filler = disk.path().join("filler");
    fill(&filler, 4 << 20);
    // Sends made before the broker looks at the disk again are taken.
    let (refused, taken) = send_until(&ns, "full", "taken before the check", 1);
    let err = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(
        err.contains("STORE_FULL") && err.contains("the disk is nearly full"),
        "{err}"
    );
    assert!(err.contains("--disk-free-limit (16 MiB)"), "{err}");
    // Reads and offset commits go on.
    let mut acked = vec!["first"];
    acked.extend(std::iter::repeat_n("taken before the check", taken));
    assert_eq!(consume(&ns, "full", "g", acked.len()), acked);

    std::fs::remove_file(&filler).unwrap();
    let (out, _) = send_until(&ns, "full", "second", 0);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        consume(&ns, "full", "g", 1),
        ["second"],
        "nothing refused was stored"
    );
    let log = site.broker.log_text();
    assert!(log.contains("the disk is nearly full"), "{log}");
    assert!(log.contains("disk space freed"), "{log}");
    drop(site);
}

/// With the limit off, the disk really fills: a send that finds no room
/// is refused naming the error, and the broker clears the part it wrote
/// (punching a hole where zeros no longer fit), so once space is freed it
/// takes sends again, without a restart, and a restart reads every
/// acknowledged message. A checkpoint that cannot be written meanwhile
/// says so once, not each interval.
#[test]
fn a_write_that_fails_on_a_full_disk_does_not_stop_the_store() {
    let Some(disk) = Tmpfs::mount("32m") else {
        return;
    };
    let mut site = start(
        disk.path().join("data"),
        &[
            "--disk-free-limit",
            "0",
            "--segment-size",
            "8MiB",
            "--checkpoint-interval",
            "100ms",
        ],
        "before",
    );
    let ns = site.nameserver.addr.clone();

    let filler = disk.path().join("filler");
    fill(&filler, 0);
    let big = "z".repeat(100 << 10);
    let out = txmq_cli(&ns, &["send", "full", "--body", &big], None);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("STORE_UNAVAILABLE")
            && err.contains("No space left on device (os error 28): the disk holding the data dir is full; free space on it"),
        "{err}"
    );

    // A send that fits in the segment's reserved room is taken, but the
    // checkpoint that would follow it fails each interval: it says so once,
    // and once more when one is written again.
    let out = txmq_cli(&ns, &["send", "full", "--body", "small"], None);
    assert!(out.status.success(), "{}", text(&out));
    std::thread::sleep(Duration::from_secs(1));
    let errors = |log: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains(what))
            .count()
    };
    let log = site.broker.log_text();
    assert_eq!(
        errors(&log, "tried again each --checkpoint-interval"),
        1,
        "{log}"
    );

    std::fs::remove_file(&filler).unwrap();
    let (out, _) = send_until(&ns, "full", "after", 0);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !site
            .broker
            .log_text()
            .contains("refuses writes from now on"),
        "{}",
        site.broker.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !site
        .broker
        .log_text()
        .contains("checkpoint written: its writes work again")
    {
        assert!(Instant::now() < deadline, "{}", site.broker.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    site.broker.restart();
    assert_eq!(consume(&ns, "full", "g", 3), ["before", "small", "after"]);

    drop(site);
}

/// The slave of broker-a, as `txmq --output json cluster` shows it: its
/// lag in bytes (`None` when not known) and whether it is in sync.
fn slave_row(ns: &str) -> Option<(Option<u64>, bool)> {
    let out = txmq_cli(ns, &["--output", "json", "cluster"], None);
    txmq_tests::json_lines(&out.stdout)
        .into_iter()
        .find(|b| b["role"] == "slave")
        .map(|s| {
            (
                s["replication_lag_bytes"].as_u64(),
                s["in_sync"].as_bool().unwrap_or(false),
            )
        })
}

/// Waits (up to 15 s) until `txmq cluster` shows the slave so.
fn wait_slave(ns: &str, what: &str, ok: impl Fn(Option<u64>, bool) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = slave_row(ns);
        if row.is_some_and(|(lag, in_sync)| ok(lag, in_sync)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: the slave is {row:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A slave whose disk has less free than `--disk-free-limit` pauses
/// replication, with a WARN line, instead of filling the disk, while its
/// master takes sends on (async replication) and shows the slave's lag;
/// once space is freed the slave catches up without a restart.
#[test]
fn a_slave_whose_disk_is_nearly_full_pauses_replication_until_space_is_freed() {
    let Some(disk) = Tmpfs::mount("64m") else {
        return;
    };
    let master_disk = tempfile::tempdir().unwrap();
    let site = start(
        master_disk.path().join("data"),
        &["--segment-size", "8MiB"],
        "first",
    );
    let ns = site.nameserver.addr.clone();
    // The slave's data on the small disk, its log beside the master's.
    let slave_data = disk.path().join("slave");
    std::fs::create_dir(&slave_data).unwrap();
    let link = site._logs.path().join("slave");
    std::os::unix::fs::symlink(&slave_data, &link).unwrap();
    let master_addr = site.broker.addr.clone();
    let slave = BrokerProcess::start(
        &link,
        &ns,
        "broker-a",
        &[
            "--role",
            "slave",
            "--master-addr",
            &master_addr,
            "--disk-free-limit",
            "16MiB",
            "--segment-size",
            "8MiB",
        ],
    );
    wait_slave(&ns, "caught up at first", |lag, in_sync| {
        lag == Some(0) && in_sync
    });

    let filler = disk.path().join("filler");
    fill(&filler, 4 << 20);
    // The slave looks at its disk every 250 ms.
    std::thread::sleep(Duration::from_millis(600));
    let body = "b".repeat(64 << 10);
    for _ in 0..8 {
        let out = txmq_cli(&ns, &["send", "full", "--body", &body], None);
        assert!(
            out.status.success(),
            "the master takes sends: {}",
            text(&out)
        );
    }
    wait_slave(&ns, "behind while its disk is full", |lag, _| {
        lag.is_some_and(|l| l > 0)
    });
    let log = slave.log_text();
    assert!(
        log.contains("the disk is nearly full")
            && log.contains("replication paused until there is room"),
        "{log}"
    );

    std::fs::remove_file(&filler).unwrap();
    wait_slave(&ns, "caught up after space was freed", |lag, in_sync| {
        lag == Some(0) && in_sync
    });
    let log = slave.log_text();
    assert!(
        log.contains("disk space freed: replication goes on"),
        "{log}"
    );
    drop(slave);
    drop(site);
}

/// A broker killed while its disk is full, and started again before any
/// space is freed, starts (the consume-queue entries it rebuilds from the
/// log wait in memory): it serves every acknowledged message, to a group
/// new to it too, refuses new ones naming the full disk, and takes them
/// again once space is freed, with nothing lost.
#[test]
fn a_broker_restarted_on_a_full_disk_serves_what_it_holds() {
    let Some(disk) = Tmpfs::mount("32m") else {
        return;
    };
    let mut site = start(
        disk.path().join("data"),
        &["--disk-free-limit", "0", "--segment-size", "8MiB"],
        "before",
    );
    let ns = site.nameserver.addr.clone();
    let filler = disk.path().join("filler");
    fill(&filler, 0);
    let out = txmq_cli(&ns, &["send", "full", "--body", "small"], None);
    assert!(out.status.success(), "{}", text(&out));

    site.broker.restart();
    let log = site.broker.log_text();
    assert!(
        log.contains("cannot write consume-queue entries; they wait in memory"),
        "{log}"
    );
    // Read, by a group new to the broker (whose retry topic cannot be
    // made yet), though its offsets cannot be committed: they are records
    // in the full log, and `txmq consume` says so and exits 1.
    let args = ["--output", "json", "consume", "full", "--group", "g"];
    let mut args = args.to_vec();
    args.extend(["--count", "2", "--idle-timeout", "3s"]);
    let out = txmq_cli(&ns, &args, None);
    let read: Vec<String> = txmq_tests::json_lines(&out.stdout)
        .iter()
        .filter_map(|m| m["body"].as_str().map(str::to_string))
        .collect();
    assert_eq!(read, ["before", "small"], "{}", text(&out));
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not be committed; their last messages will be delivered again")
            && err.contains("the disk holding the data dir is full"),
        "{err}"
    );

    let big = "z".repeat(100 << 10);
    let out = txmq_cli(&ns, &["send", "full", "--body", &big], None);
    let err = text(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the disk holding the data dir is full"),
        "{err}"
    );

    std::fs::remove_file(&filler).unwrap();
    let (out, _) = send_until(&ns, "full", "after", 0);
    assert!(out.status.success(), "{}", text(&out));
    site.broker.restart();
    assert_eq!(consume(&ns, "full", "g2", 3), ["before", "small", "after"]);
    drop(site);
}
