//! The official RocketMQ 5 clients, as `.ci/run` installs them under
//! `tests/rocketmq` (the Python client in a virtualenv, the Node.js client
//! with npm), and the scripts there that drive them against txmq's gRPC API.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `tests/rocketmq` in the source tree.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rocketmq")
}

/// The virtualenv's Python with `rocketmq-python-client`, or `None` (after
/// saying how to install it) when it is not installed.
pub fn python() -> Option<PathBuf> {
    let python = dir().join(".venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    eprintln!(
        "SKIPPED: the RocketMQ Python client is not installed in {} \
         (python3 -m venv tests/rocketmq/.venv && tests/rocketmq/.venv/bin/pip install \
         -r tests/rocketmq/requirements.txt; .ci/run does)",
        python.display()
    );
    None
}

/// The directory with `node_modules/rocketmq-client-nodejs`, or `None`
/// (after saying how to install it).
pub fn node() -> Option<PathBuf> {
    let dir = dir().join("node");
    if dir.join("node_modules/rocketmq-client-nodejs").exists() {
        return Some(dir);
    }
    eprintln!(
        "SKIPPED: the RocketMQ Node.js client is not installed in {} \
         (cd tests/rocketmq/node && npm ci; .ci/run does)",
        dir.display()
    );
    None
}

/// Runs `program args` in `cwd`, killed after `limit`; the output.
/// The clients write their logs under `$HOME/logs/rocketmq`: HOME is a
/// temporary directory, removed after.
pub fn run(program: &Path, args: &[&str], cwd: &Path, limit: Duration) -> Output {
    let home = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// Runs a script of `tests/rocketmq/python` and parses the JSON its last
/// line prints; panics with its output when it fails.
pub fn python_json(python: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let path = dir().join("python").join(script);
    let mut all = vec![path.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    let out = run(python, &all, &dir(), Duration::from_secs(120));
    last_json(script, &out)
}

/// Runs a script of `tests/rocketmq/node` with `node` and parses the JSON
/// its last line prints.
pub fn node_json(dir: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![script];
    all.extend_from_slice(args);
    let out = run(Path::new("node"), &all, dir, Duration::from_secs(120));
    last_json(script, &out)
}

fn last_json(script: &str, out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!("{script} printed no JSON:\nstdout:\n{stdout}\nstderr:\n{stderr}")
        });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{script}: not JSON: {line}: {e}"))
}
