//! A child process of the chaos harness (a nameserver or a workload
//! client), or of a test that starts the real binaries, that can be
//! signalled, killed and started again; killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A restartable child process. Each start is an *incarnation*; the
/// arguments are made per incarnation (so a client's name and history file
/// can carry it).
pub struct Process {
    /// A short name for logs and the summary.
    pub name: String,
    program: PathBuf,
    args: Box<dyn Fn(u32) -> Vec<String> + Send + Sync>,
    log: PathBuf,
    child: Option<Child>,
    incarnation: u32,
}

impl Process {
    /// Starts `program` with `args(1)`, stderr appended to `log`.
    pub fn start(
        name: &str,
        program: PathBuf,
        log: PathBuf,
        args: impl Fn(u32) -> Vec<String> + Send + Sync + 'static,
    ) -> Process {
        let mut p = Process {
            name: name.to_string(),
            program,
            args: Box::new(args),
            log,
            child: None,
            incarnation: 0,
        };
        p.spawn();
        p
    }

    /// Starts the next incarnation (after a kill).
    pub fn spawn(&mut self) {
        self.incarnation += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let child = Command::new(&self.program)
            .args((self.args)(self.incarnation))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// The current incarnation (1 for the first start).
    pub fn incarnation(&self) -> u32 {
        self.incarnation
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` ("STOP", "CONT", "USR1", ...) to the running process.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `limit` for the exit (then `kill -9`);
    /// returns the exit code if it exited by itself.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        self.signal("TERM");
        let status = self.wait_exit(limit);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        status.and_then(|s| s.code())
    }

    /// Waits up to `within` for the process to exit by itself; its status,
    /// or `None` when it is still running (or was never started).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lines of its stderr that contain every one of `parts`.
    pub fn log_lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(c.id().to_string())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
