//! txmq-tests: the harness for end-to-end tests that start real nameserver
//! and broker instances (in-process on port 0, or as real processes where a
//! `kill -9` or `SIGSTOP` is needed) and drive them with the client crate or
//! the `txmq` binary, as a user would.
//!
//! Start with [`Cluster`] (in-process) and [`BrokerProcess`] (a real
//! `txmq-broker` process); [`txmq_cli`] runs the command-line tool.
//! [`chaos`] is the chaos harness (a cluster of processes under a fault
//! schedule, with checkers over the recorded history), [`proxy`] its TCP
//! proxy that cuts, delays and drops traffic. [`lazyfs`] is a FUSE
//! filesystem with a volatile write cache, to cut the power under a broker.

pub mod browser;
pub mod chaos;
pub mod disk;
pub mod lazyfs;
pub mod metrics;
pub mod pki;
pub mod proxy;
pub mod rng;
pub mod rocketmq;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use txmq_broker::{Broker, BrokerConfig, FlushMode};
use txmq_nameserver::{Nameserver, NameserverConfig};

/// Builds the workspace's binaries once per test process (a no-op when they
/// are up to date) and returns the path of `name`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = Command::new(cargo);
        // The variables cargo sets for this test process would reach the
        // build scripts of the child build (ring's reruns on them) and
        // rebuild half the workspace twice per test run.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
            {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .args(["build", "--quiet", "--bins", "--manifest-path"])
            .arg(&manifest)
            .status()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build --bins failed: {status}"));
        }
        // target/debug/deps/<test binary> -> target/debug
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("cannot find the target directory")?;
        Ok(dir.to_path_buf())
    });
    match dir {
        Ok(d) => d.join(name),
        Err(e) => panic!("{e}"),
    }
}

/// A port that was free a moment ago on 127.0.0.1, for a process the test
/// starts to listen on.
///
/// It is taken below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), and no port is handed out twice by
/// one process (a test binary). A port of that range, free a moment ago,
/// could be taken before the process binds it: as the local port of any
/// test's outgoing connection, or by a listener on port 0 (CI saw a broker
/// fail with "Address already in use"). Another process handing out ports
/// this way starts at a random place. Where the range leaves no room below
/// it, this falls back to a port the kernel picks.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
        .min(65_536);
    if ephemeral_low > LOWEST + 1_000 {
        let span = ephemeral_low - LOWEST;
        // Processes started at once begin at places far apart. One start
        // per process: with a start drawn per call, two calls could land
        // on one port, and the second's check passes while the first's
        // process has not bound it yet (CI saw a controller member's
        // nameserver fail so).
        static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let start = *START.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let seed = (u64::from(std::process::id()) << 32 | u64::from(nanos))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((seed >> 32) % u64::from(span)) as u32
        });
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (LOWEST + (start + n) % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Broker settings for tests: short heartbeats, small segments, in `dir`.
pub fn test_broker_config(dir: &Path, nameserver: &str, name: &str) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir);
    c.listen = "127.0.0.1:0".into();
    c.nameservers = vec![nameserver.to_string()];
    c.broker_name = name.into();
    c.heartbeat_interval = Duration::from_millis(200);
    c.segment_size = 8 << 20;
    c.max_message_size = 1 << 20;
    c
}

/// An in-process nameserver and brokers on ephemeral ports.
pub struct Cluster {
    /// The nameserver's address.
    pub nameserver: String,
    ns_shutdown: CancellationToken,
    /// The running brokers.
    pub brokers: Vec<Broker>,
    /// Data directories (removed on drop).
    pub dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    /// A nameserver and one broker named `broker-a` with `flush`.
    pub async fn start(flush: FlushMode) -> Cluster {
        Cluster::start_with(|cfg| cfg.flush = flush).await
    }

    /// A nameserver and one broker named `broker-a`, its settings adjusted
    /// by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut BrokerConfig)) -> Cluster {
        let mut c = Cluster::nameserver_only(Duration::from_secs(30)).await;
        c.add_broker("broker-a", tweak).await;
        c
    }

    /// A nameserver and one broker named `broker-a` serving Prometheus
    /// metrics on a port of its own; the cluster and that address.
    pub async fn start_with_metrics() -> (Cluster, String) {
        let mut c = Cluster::nameserver_only(Duration::from_secs(30)).await;
        c.add_broker("broker-a", |cfg| {
            cfg.metrics_listen = Some("127.0.0.1:0".into());
        })
        .await;
        let metrics = c.brokers[0]
            .metrics_addr()
            .expect("metrics served")
            .to_string();
        (c, metrics)
    }

    /// Just a nameserver with the given broker expiry.
    pub async fn nameserver_only(expiry: Duration) -> Cluster {
        let ns = Nameserver::bind(NameserverConfig {
            listen: "127.0.0.1:0".into(),
            broker_expiry: expiry,
            controller: None,
        })
        .await
        .expect("nameserver binds");
        let nameserver = ns.local_addr().to_string();
        let ns_shutdown = CancellationToken::new();
        tokio::spawn(ns.run(ns_shutdown.clone()));
        Cluster {
            nameserver,
            ns_shutdown,
            brokers: Vec::new(),
            dirs: Vec::new(),
        }
    }

    /// Starts a broker named `name`, letting `tweak` adjust its settings, and
    /// waits until the nameserver knows it.
    pub async fn add_broker(
        &mut self,
        name: &str,
        tweak: impl FnOnce(&mut BrokerConfig),
    ) -> SocketAddr {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = test_broker_config(dir.path(), &self.nameserver, name);
        tweak(&mut cfg);
        let broker = Broker::start(cfg).await.expect("broker starts");
        let addr = broker.local_addr();
        self.brokers.push(broker);
        self.dirs.push(dir);
        wait_for_broker(&self.nameserver, name).await;
        addr
    }

    /// A producer connected to this cluster.
    pub async fn producer(&self) -> txmq::Producer {
        txmq::Producer::builder()
            .nameserver(&self.nameserver)
            .build()
            .await
            .expect("producer builds")
    }

    /// A producer without idempotence: plain records only (no producer id
    /// record, no stamps), for tests that count or line up records.
    pub async fn plain_producer(&self) -> txmq::Producer {
        txmq::Producer::builder()
            .nameserver(&self.nameserver)
            .idempotence(false)
            .build()
            .await
            .expect("producer builds")
    }

    /// An admin client for this cluster.
    pub async fn admin(&self) -> txmq::Admin {
        txmq::Admin::connect([self.nameserver.clone()])
            .await
            .expect("admin connects")
    }

    /// Shuts every broker down gracefully, then the nameserver.
    pub async fn shutdown(self) {
        for b in self.brokers {
            b.shutdown().await;
        }
        self.ns_shutdown.cancel();
    }
}

/// Waits (up to 10 s) until the nameserver at `ns` lists broker `name`.
pub async fn wait_for_broker(ns: &str, name: &str) {
    let admin = txmq::Admin::connect([ns.to_string()])
        .await
        .expect("admin connects");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(brokers) = admin.cluster().await {
            if brokers.iter().any(|b| b.broker_name == name) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "broker {name} never registered with {ns}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real `txmq-broker` process; killed (SIGKILL) when dropped.
pub struct BrokerProcess {
    child: Option<Child>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// The address it listens on.
    pub addr: String,
    /// The broker name.
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
}

impl BrokerProcess {
    /// Starts `txmq-broker` with `data_dir`, registering with `nameserver`,
    /// plus `extra` flags; waits until its port accepts connections.
    pub fn start(data_dir: &Path, nameserver: &str, name: &str, extra: &[&str]) -> BrokerProcess {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.clone(),
            "--nameserver".into(),
            nameserver.into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--broker-name".into(),
            name.into(),
            "--heartbeat-interval".into(),
            "200ms".into(),
        ];
        // Small segments unless the test sizes them itself.
        for (flag, value) in [("--segment-size", "8MiB"), ("--max-message-size", "1MiB")] {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = BrokerProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            addr,
            name: name.into(),
            args,
            log: data_dir.with_extension("log"),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_listening(
            "txmq-broker",
            &self.args,
            &self.log,
            &self.addr,
        ));
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT", "TERM") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        self.signal_pid(c.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_pid(&self, pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }

    /// Stops the process cleanly ([`BrokerProcess::stop`]) and starts it
    /// again with the same flags and data directory; returns the exit code
    /// of the stop.
    pub fn stop_and_start(&mut self) -> Option<i32> {
        let code = self.stop();
        self.spawn();
        code
    }

    /// Starts the process again with the same flags and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A stopped process must be continued to die promptly.
            self.signal_pid(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
        // The log sits beside the data directory, outside a temporary
        // directory passed as the data directory itself: removed here, but
        // kept when a test fails, to be read.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A real `txmq-nameserver` process (e.g. with an embedded controller);
/// killed (SIGKILL) when dropped.
pub struct NameserverProcess {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: String,
    args: Vec<String>,
    log: PathBuf,
}

impl NameserverProcess {
    /// Starts `txmq-nameserver` on `addr` with `extra` flags, logging to
    /// `log`; waits until its port accepts connections.
    pub fn start(addr: &str, extra: &[&str], log: &Path) -> NameserverProcess {
        let mut args: Vec<String> = vec!["--listen".into(), addr.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = NameserverProcess {
            child: None,
            addr: addr.into(),
            args,
            log: log.to_path_buf(),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        self.child = Some(spawn_listening(
            "txmq-nameserver",
            &self.args,
            &self.log,
            &self.addr,
        ));
    }

    /// The nameserver's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again with the same flags.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for NameserverProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The fields named in `names` of `/proc/PID/status`, in KiB (0 when a
/// field is missing): `VmRSS:`, `VmHWM:`, `RssAnon:`, ...
pub fn proc_status_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// `txmq --output json send TOPIC --stdin` (global flags `global`, send
/// flags `extra`) fed `lines` lines `{prefix}{i}` 10 ms apart from a
/// thread, while the test does something to the brokers.
pub struct StdinSend {
    child: Child,
    writer: std::thread::JoinHandle<()>,
    lines: usize,
}

impl StdinSend {
    /// Starts the command and its feeder.
    pub fn start(
        nameserver: &str,
        global: &[&str],
        topic: &str,
        extra: &[&str],
        prefix: &'static str,
        lines: usize,
    ) -> StdinSend {
        use std::io::Write as _;
        let mut child = Command::new(binary("txmq"))
            .args(["--nameserver", nameserver, "--output", "json"])
            .args(global)
            .args(["send", topic, "--stdin"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("txmq send starts");
        let mut stdin = child.stdin.take().expect("stdin");
        let writer = std::thread::spawn(move || {
            for i in 0..lines {
                writeln!(stdin, "{prefix}{i}").expect("write a line");
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        StdinSend {
            child,
            writer,
            lines,
        }
    }

    /// Waits for the command (on a multi-threaded runtime); asserts it
    /// exited 0 with every line sent (`SEND_OK`, `FLUSH_DISK_TIMEOUT`, or
    /// `STORED_BEFORE`: stored by an attempt whose answer was lost).
    /// Returns its stderr; `context` goes into the failure messages.
    pub fn all_sent(self, context: &str) -> String {
        tokio::task::block_in_place(|| self.writer.join().expect("the writer"));
        let out =
            tokio::task::block_in_place(|| self.child.wait_with_output()).expect("txmq send ends");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{err}\n{context}");
        let sent = json_lines(&out.stdout)
            .iter()
            .filter(|l| {
                ["SEND_OK", "FLUSH_DISK_TIMEOUT", "STORED_BEFORE"]
                    .contains(&l["status"].as_str().unwrap_or(""))
            })
            .count();
        assert_eq!(sent, self.lines, "{err}");
        err
    }
}

/// How long [`txmq_cli`] lets a command run before it kills it and fails
/// the test: a hung command fails its test instead of holding the run.
pub const CLI_LIMIT: Duration = Duration::from_secs(180);

/// Runs the `txmq` binary with `args` against `nameserver`, with `stdin` as
/// input. Panics, with what the command printed, if it runs past
/// [`CLI_LIMIT`] (it is killed).
pub fn txmq_cli(nameserver: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(binary("txmq"));
    cmd.arg("--nameserver").arg(nameserver).args(args);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start txmq");
    // The child is reaped only by `wait_with_output` below, and the
    // watchdog is told right after: only a child ending within a few
    // microseconds of the limit leaves its pid to a kill that comes late.
    let pid = child.id().to_string();
    let (finished, done) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let overdue =
            done.recv_timeout(CLI_LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
        if overdue {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        overdue
    });
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let output = child.wait_with_output().expect("txmq finishes");
    let _ = finished.send(());
    if watchdog.join().unwrap_or(false) {
        panic!(
            "txmq {args:?} ran past {CLI_LIMIT:?} and was killed; stdout: {}; stderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    output
}

/// The messages `txmq --output json consume TOPIC --group GROUP --count
/// COUNT --idle-timeout IDLE`, with `extra` flags, printed, committing
/// them; asserts a zero exit.
pub fn cli_consume(
    nameserver: &str,
    topic: &str,
    group: &str,
    count: usize,
    idle: &str,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let count = count.to_string();
    let mut args = vec!["--output", "json", "consume", topic, "--group", group];
    args.extend(["--count", &count, "--idle-timeout", idle]);
    args.extend(extra);
    json_lines(output::ok(&txmq_cli(nameserver, &args, None)).as_bytes())
}

/// The JSON objects a `--output json` command printed, one per line.
pub fn json_lines(out: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Consumes `topic` as `group` until `want` messages arrived or `idle` passed
/// without one; returns them in arrival order. Commits before returning.
pub async fn consume_all(
    nameserver: &str,
    group: &str,
    topic: &str,
    want: usize,
    idle: Duration,
) -> Vec<txmq::ReceivedMessage> {
    let mut consumer = txmq::PullConsumer::builder()
        .nameserver(nameserver)
        .group(group)
        .topic(topic)
        .build()
        .await
        .expect("consumer builds");
    let mut got = Vec::new();
    let mut last = Instant::now();
    while got.len() < want && last.elapsed() < idle {
        let batch = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        if !batch.is_empty() {
            last = Instant::now();
            got.extend(batch);
        }
    }
    consumer.shutdown().await.expect("consumer commits");
    got
}

/// Starts `bin` with `args`, its stderr appended to `log`, and waits until
/// it listens on `addr` (panicking with its log if it exits or does not
/// listen within 20 s).
fn spawn_listening(bin: &str, args: &[String], log: &Path, addr: &str) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
    let mut child = Command::new(binary(bin))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait().ok().flatten() {
            panic!("{bin} exited with {status}; log:\n{}", log_text());
        }
        assert!(
            Instant::now() < deadline,
            "{bin} did not listen; log:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Reading what a `txmq` command printed.
pub mod output {
    use std::process::Output;

    /// A command's stdout as text.
    pub fn stdout(o: &Output) -> String {
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A command's stderr as text.
    pub fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Asserts a zero exit; returns stdout.
    #[track_caller]
    pub fn ok(o: &Output) -> String {
        assert!(
            o.status.success(),
            "txmq failed with {}\nstdout:\n{}\nstderr:\n{}",
            o.status,
            stdout(o),
            stderr(o)
        );
        stdout(o)
    }
}

/// Makes `n` dead letters of `group` from `topic`: a push consumer that
/// fails every message, with no redelivery allowed.
pub fn make_dead_letters(ns: &str, topic: &str, group: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let consumer = txmq::PushConsumer::builder()
            .nameserver(ns)
            .group(group)
            .subscribe(topic, "*")
            .max_reconsume_times(0)
            .rebalance_interval(Duration::from_millis(300))
            .commit_interval(Duration::from_millis(100))
            .max_wait(Duration::from_millis(300))
            .route_refresh_interval(Duration::from_millis(300))
            .start(txmq::handler_fn(|_m: &txmq::ReceivedMessage| async {
                txmq::ConsumeResult::retry_after(Duration::from_millis(10))
            }))
            .await
            .expect("consumer starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listed = txmq_cli(ns, &["--output", "json", "dlq", "list", group], None);
            if json_lines(&listed.stdout).len() >= n {
                break;
            }
            assert!(Instant::now() < deadline, "no {n} dead letters");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        consumer.shutdown().await.expect("consumer stops");
    });
}

#[cfg(test)]
mod tests {
    /// Ports handed out by one process differ, from any thread, even when
    /// none of them is bound yet.
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..500).map(|_| super::free_port()).collect::<Vec<_>>())
            })
            .collect();
        let all: Vec<u16> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread"))
            .collect();
        let distinct: std::collections::HashSet<u16> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len());
    }
}
