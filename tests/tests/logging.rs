//! `--log-format`, `--log-level` and the nameserver's `--config` file, on
//! the real binaries; and `txmq completions`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use txmq_tests::output::{ok, stderr};
use txmq_tests::{binary, free_port, BrokerProcess, NameserverProcess};

/// Every line of `log` as JSON; panics on a line that is not.
fn json_log(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Waits until `log()` has a line containing `text`.
fn wait_for(log: impl Fn() -> String, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = log();
        if now.contains(text) {
            return now;
        }
        assert!(Instant::now() < deadline, "no '{text}' in:\n{now}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn json_logs_levels_and_the_nameserver_config_file() {
    let dir = tempfile::tempdir().unwrap();
    // The file's listen address loses to the flag; its other keys count.
    let config = dir.path().join("nameserver.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:1\"\nbroker_expiry = \"2s\"\nlog_format = \"json\"\n",
    )
    .unwrap();
    let ns_addr = format!("127.0.0.1:{}", free_port());
    let ns = NameserverProcess::start(
        &ns_addr,
        &["--config", config.to_str().unwrap()],
        &dir.path().join("nameserver.log"),
    );
    let log = wait_for(|| ns.log_text(), "nameserver listening");
    let lines = json_log(&log);
    let listening = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("listening")
        })
        .expect("a listening line");
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["fields"]["broker_expiry"], "2s", "{listening}");
    assert!(
        listening["fields"]["message"]
            .as_str()
            .unwrap()
            .contains(&ns_addr),
        "the flag's address beats the file's: {listening}"
    );

    // The broker in JSON; then at warn, which beats RUST_LOG=info.
    let broker = BrokerProcess::start(
        &dir.path().join("b"),
        &ns_addr,
        "broker-j",
        &["--log-format", "json"],
    );
    let log = wait_for(|| broker.log_text(), "broker listening");
    let lines = json_log(&log);
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "broker listening"
            && l["fields"]["broker"] == "broker-j"
            && l["target"] == "txmq_broker"));
    drop(broker);
    let quiet = BrokerProcess::start(
        &dir.path().join("q"),
        &ns_addr,
        "broker-q",
        &["--log-level", "warn"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let log = quiet.log_text();
    assert!(
        !log.contains("INFO"),
        "--log-level warn writes no info line:\n{log}"
    );
}

#[test]
fn bad_log_settings_and_config_keys_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "brokr_expiry = \"2s\"\n").unwrap();
    let cases: [(&str, Vec<String>, &str); 7] = [
        (
            "txmq-nameserver",
            vec!["--config".into(), bad.display().to_string()],
            "unknown key 'brokr_expiry'",
        ),
        (
            "txmq-nameserver",
            vec!["--config".into(), "/nonexistent/ns.toml".into()],
            "/nonexistent/ns.toml",
        ),
        (
            "txmq-nameserver",
            vec!["--log-level".into(), "info,[".into()],
            "--log-level",
        ),
        (
            "txmq-nameserver",
            vec!["--log-format".into(), "xml".into()],
            "xml",
        ),
        (
            "txmq-broker",
            vec!["--standalone".into(), "--log-level".into(), "info,[".into()],
            "--log-level",
        ),
        // A misspelled level reads as a target's name and would write
        // nothing at all: refused.
        (
            "txmq-broker",
            vec!["--standalone".into(), "--log-level".into(), "inf".into()],
            "'inf' is not a level",
        ),
        (
            "txmq-nameserver",
            vec!["--log-level".into(), "warning".into()],
            "'warning' is not a level",
        ),
    ];
    for (bin, args, says) in cases {
        let out = Command::new(binary(bin))
            .args(&args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{bin} {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(says),
            "{bin} {args:?} names {says}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn completions_are_printed_for_each_shell() {
    let run = |shell: &str| {
        Command::new(binary("txmq"))
            .args(["completions", shell])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let bash = ok(&run("bash"));
    assert!(
        bash.contains("_txmq()") && bash.contains("consume"),
        "{bash}"
    );
    let check = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bash.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(check.success(), "bash -n accepts the script");
    assert!(ok(&run("zsh")).contains("#compdef txmq"));
    assert!(ok(&run("fish")).contains("complete -c txmq"));
    let tcsh = run("tcsh");
    assert_eq!(tcsh.status.code(), Some(2));
    assert!(
        stderr(&tcsh).contains("bash"),
        "lists the shells: {}",
        stderr(&tcsh)
    );
}
