//! `txmq bench floor`: the machine's own floor for a request and its
//! reply over loopback, to hold txmq's figures against.
//!
//! A minimal echo: a server in a separate process (`txmq bench
//! echo-server`, started by the floor unless `--server` names one) reads
//! length-prefixed requests and answers each with a short reply; the client
//! keeps `--in-flight` requests going on each of `--connections` TCP
//! connections (TCP_NODELAY on both sides), as `bench produce` does with
//! one connection per producer. No storage, no decoding: what remains is
//! the cost of the wake-ups, system calls and copies any broker pays, so
//! `bench produce`'s rate over the floor's (`--compare-floor`) says how much
//! of the machine txmq's own work takes.
//!
//! CPU is read from `/proc` (user and system time of the whole process,
//! in the kernel's fixed 100 ticks per second) over the measured period.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::histogram::{Latencies, Summary};
use super::report::{round, Report};
use crate::args::{parse_duration, GlobalArgs};
use crate::output::Printer;

/// The reply's size by default: about what a send's acknowledgement is.
pub const DEFAULT_REPLY: usize = 16;
/// The largest request the echo server takes.
const MAX_REQUEST: usize = 64 << 20;
/// What the echo server prints first, before its address.
const LISTENING: &str = "listening on ";
/// `/proc/PID/stat` counts CPU time in these per second (USER_HZ, fixed
/// at 100 for user space on Linux).
const TICKS_PER_S: f64 = 100.0;

/// `txmq bench floor ...`
#[derive(Debug, Args)]
pub struct FloorArgs {
    /// TCP connections, each with its own load loop (as `bench produce
    /// --producers`, one connection each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub connections: u32,

    /// Requests in flight at once per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub in_flight: u32,

    /// Request size in bytes (as `--size` of `bench produce`).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,

    /// Reply size in bytes.
    #[arg(long, default_value_t = DEFAULT_REPLY)]
    pub reply: usize,

    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,

    /// Load before measuring, left out of the figures.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    pub warmup: Duration,

    /// An echo server already running (`txmq bench echo-server`), for
    /// example pinned to other cores; default: start one.
    #[arg(long, value_name = "ADDR")]
    pub server: Option<String>,
}

/// `txmq bench echo-server ...`: the floor's server, in its own process.
#[derive(Debug, Args)]
pub struct EchoServerArgs {
    /// Address to listen on; prints `listening on ADDR` once bound.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,

    /// Reply size in bytes.
    #[arg(long, default_value_t = DEFAULT_REPLY)]
    pub reply: usize,
}

/// The shape of a floor run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Connections, each with a load loop.
    pub connections: u32,
    /// Requests in flight per connection.
    pub in_flight: u32,
    /// Request bytes.
    pub size: usize,
    /// Reply bytes.
    pub reply: usize,
    /// Warm-up, then measured period.
    pub warmup: Duration,
    /// Measured period.
    pub duration: Duration,
}

/// What a floor run measured.
#[derive(Debug, Clone)]
pub struct Floor {
    /// Round trips completed in the measured period.
    pub round_trips: u64,
    /// Its length in seconds.
    pub secs: f64,
    /// Round-trip latency.
    pub latency: Latencies,
    /// The server's CPU seconds over the measured period (a server it
    /// started; `None` for `--server`).
    pub server_cpu_s: Option<f64>,
    /// This process's CPU seconds over the measured period.
    pub client_cpu_s: Option<f64>,
    /// The server was started on the CPUs of the process it was to be
    /// placed like ([`Server::Start`]).
    pub placed: bool,
}

impl Floor {
    /// Round trips per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.round_trips as f64 / self.secs
        } else {
            0.0
        }
    }

    /// CPU microseconds per round trip of `cpu_s` seconds.
    fn per_round_trip(&self, cpu_s: Option<f64>) -> Option<f64> {
        let n = self.round_trips;
        cpu_s
            .filter(|_| n > 0)
            .map(|s| round(s * 1e6 / n as f64, 3))
    }

    /// Adds `<prefix>server_cpu_us_per_round_trip` and the client's.
    fn cpu_fields(&self, report: &mut Report, prefix: &str) {
        for (side, cpu_s) in [("server", self.server_cpu_s), ("client", self.client_cpu_s)] {
            let key = format!("{prefix}{side}_cpu_us_per_round_trip");
            report.field(&key, self.per_round_trip(cpu_s));
        }
    }

    /// The latency summary.
    pub fn summary(&self) -> Summary {
        self.latency.summary()
    }
}

/// Runs `txmq bench floor`.
///
/// # Errors
/// When the echo server cannot be started or reached.
pub async fn run(global: &GlobalArgs, args: FloorArgs) -> Result<()> {
    if args.duration.is_zero() {
        return Err(crate::exit::usage("--duration must be above 0"));
    }
    let shape = Shape {
        connections: args.connections,
        in_flight: args.in_flight,
        size: args.size,
        reply: args.reply,
        warmup: args.warmup,
        duration: args.duration,
    };
    let server = match args.server.as_deref() {
        Some(addr) => Server::Running(addr),
        None => Server::Start { placed_like: None },
    };
    let floor = measure(shape, server).await?;
    let mut report = super::new_report(global, "floor");
    report
        .field("connections", shape.connections)
        .field("in_flight", shape.in_flight)
        .field("message_size", shape.size as u64)
        .field("reply_size", shape.reply as u64)
        .field("round_trips", floor.round_trips)
        .field("duration_s", round(floor.secs, 3))
        .field("round_trip_rate_s", round(floor.rate(), 1));
    floor.cpu_fields(&mut report, "");
    report.latency("latency_us", floor.summary());
    report.print(&Printer::stdout(global.output))?;
    Ok(())
}

/// What a run measured, to hold against the floor.
#[derive(Debug, Clone, Copy)]
pub struct Measured<'a> {
    /// Messages per second.
    pub rate: f64,
    /// Their latency.
    pub latency: &'a Summary,
    /// This process's CPU microseconds per message.
    pub client_cpu_us: Option<f64>,
    /// The broker's CPU microseconds per message (`--broker-pid`).
    pub broker_cpu_us: Option<f64>,
    /// The broker's process (`--broker-pid`): the echo server runs on the
    /// CPUs it may run on.
    pub broker_pid: Option<u32>,
}

/// Adds the floor, measured now with `shape`, to a report of what a run
/// `measured`: the floor's figures and the ratios (`floor_ratio`: rate over
/// the floor's; `p99_to_floor`; `client_cpu_to_floor` and
/// `broker_cpu_to_floor`: CPU per message over the echo client's and
/// server's per round trip).
///
/// # Errors
/// When the echo server cannot be started or reached.
pub async fn compare(report: &mut Report, shape: Shape, measured: Measured<'_>) -> Result<()> {
    let Measured { rate, latency, .. } = measured;
    let server = Server::Start {
        placed_like: measured.broker_pid,
    };
    let floor = measure(shape, server).await?;
    let summary = floor.summary();
    if measured.broker_pid.is_some() {
        report.field("floor_placed_like_broker", floor.placed);
    }
    report
        .field("floor_connections", shape.connections)
        .field("floor_round_trip_rate_s", round(floor.rate(), 1))
        .field("floor_p50_us", summary.p50)
        .field("floor_p99_us", summary.p99);
    floor.cpu_fields(report, "floor_");
    report
        .field(
            "floor_ratio",
            (floor.rate() > 0.0).then(|| round(rate / floor.rate(), 3)),
        )
        .field(
            "p99_to_floor",
            (summary.p99 > 0 && latency.count > 0)
                .then(|| round(latency.p99 as f64 / summary.p99 as f64, 3)),
        );
    let ratio = |ours: Option<f64>, floor: Option<f64>| match (ours, floor) {
        (Some(a), Some(b)) if b > 0.0 => Some(round(a / b, 3)),
        _ => None,
    };
    report
        .field(
            "client_cpu_to_floor",
            ratio(
                measured.client_cpu_us,
                floor.per_round_trip(floor.client_cpu_s),
            ),
        )
        .field(
            "broker_cpu_to_floor",
            ratio(
                measured.broker_cpu_us,
                floor.per_round_trip(floor.server_cpu_s),
            ),
        );
    Ok(())
}

/// CPU seconds of this process and of another one (by pid), between a
/// start read when the measured period begins and [`CpuMeter::stop`].
#[derive(Debug)]
pub struct CpuMeter {
    pid: Option<u32>,
    start: tokio::task::JoinHandle<(Option<u64>, Option<u64>)>,
}

/// CPU seconds [`CpuMeter::stop`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSeconds {
    /// This process's.
    pub own: Option<f64>,
    /// The other process's.
    pub other: Option<f64>,
}

impl CpuMeter {
    /// Starts reading at `from` (by a task of its own, so that a load
    /// that keeps this task busy does not delay the read).
    pub fn start_at(from: Instant, pid: Option<u32>) -> CpuMeter {
        let start = tokio::spawn(async move {
            tokio::time::sleep_until(from).await;
            read_both(pid)
        });
        CpuMeter { pid, start }
    }

    /// Reads the end and returns the CPU seconds in between (none when
    /// the start was not read yet).
    ///
    /// # Errors
    /// When the reading task failed.
    pub async fn stop(self) -> Result<CpuSeconds> {
        let (own_end, other_end) = read_both(self.pid);
        if !self.start.is_finished() {
            // Stopped before the measured period began (an interrupt in
            // the warm-up): nothing was measured.
            self.start.abort();
            return Ok(CpuSeconds::default());
        }
        let (own_start, other_start) = self.start.await.context("the CPU reader failed")?;
        let cpu = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / TICKS_PER_S),
            _ => None,
        };
        Ok(CpuSeconds {
            own: cpu(own_start, own_end),
            other: cpu(other_start, other_end),
        })
    }
}

/// An error unless `pid` names a process whose CPU time this machine's
/// `/proc` shows.
///
/// # Errors
/// When it does not.
pub fn check_pid(pid: u32, flag: &str) -> Result<()> {
    if cpu_ticks(&pid.to_string()).is_none() {
        return Err(crate::exit::usage(format!(
            "{flag} {pid}: no such process on this machine (its CPU time is read from /proc/{pid}/stat)"
        )));
    }
    Ok(())
}

fn read_both(pid: Option<u32>) -> (Option<u64>, Option<u64>) {
    (
        cpu_ticks("self"),
        pid.and_then(|p| cpu_ticks(&p.to_string())),
    )
}

/// Measures the floor: starts an echo server (unless `server` names one),
/// runs the load and stops the server.
///
/// # Errors
/// When the server cannot be started or reached.
pub async fn measure(shape: Shape, server: Server<'_>) -> Result<Floor> {
    let (addr, child, placed) = match server {
        Server::Running(addr) => (addr.to_string(), None, false),
        Server::Start { placed_like } => {
            let (addr, child, placed) = start_server(shape.reply, placed_like).await?;
            (addr, Some(child), placed)
        }
    };
    let pid = child.as_ref().and_then(Child::id);
    let mut streams = Vec::with_capacity(shape.connections as usize);
    for _ in 0..shape.connections {
        let s = TcpStream::connect(&addr)
            .await
            .with_context(|| format!("cannot connect to the echo server at {addr}"))?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let start = Instant::now();
    let measure_from = start + shape.warmup;
    let until = measure_from + shape.duration;
    let cpu = CpuMeter::start_at(measure_from, pid);
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(load(s, shape, measure_from, until)))
        .collect();
    let mut latency = Latencies::new();
    let mut round_trips = 0;
    let mut last = measure_from;
    for t in tasks {
        let (n, l, done) = t.await.context("an echo load task failed")??;
        round_trips += n;
        latency.merge(&l);
        last = last.max(done);
    }
    let cpu = cpu.stop().await?;
    drop(child);
    Ok(Floor {
        round_trips,
        secs: last.saturating_duration_since(measure_from).as_secs_f64(),
        latency,
        server_cpu_s: cpu.other,
        client_cpu_s: cpu.own,
        placed,
    })
}

/// The echo server a floor is measured against.
#[derive(Debug, Clone, Copy)]
pub enum Server<'a> {
    /// One already running, at this address.
    Running(&'a str),
    /// One started for the measurement; with `placed_like`, on the CPUs
    /// that process may run on (a broker pinned with `taskset` gets an
    /// echo server pinned the same way, so that both sides of the
    /// comparison stand where the broker stands).
    Start {
        /// The process whose CPUs the server gets.
        placed_like: Option<u32>,
    },
}

/// Starts `txmq bench echo-server` (this same binary) on a free loopback
/// port; killed when the handle is dropped.
async fn start_server(reply: usize, placed_like: Option<u32>) -> Result<(String, Child, bool)> {
    let exe =
        std::env::current_exe().context("cannot find the txmq binary to start the echo server")?;
    let mut command = Command::new(exe);
    command
        .args(["bench", "echo-server", "--listen", "127.0.0.1:0", "--reply"])
        .arg(reply.to_string())
        // The server stands in for a broker, whose threads are its own:
        // the runtime's default, whatever this process runs on.
        .env_remove("TXMQ_WORKER_THREADS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let (spawned, placed) = on_cpus_of(placed_like, || command.spawn())?;
    let mut child = spawned.context("cannot start the echo server")?;
    let stdout = child
        .stdout
        .take()
        .context("the echo server's output is not readable")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .context("cannot read the echo server's address")?;
    match line.trim().strip_prefix(LISTENING) {
        Some(addr) => Ok((addr.to_string(), child, placed)),
        None => bail!("the echo server did not say where it listens: {line:?}"),
    }
}

/// Runs `spawn` on this thread allowed only the CPUs process `pid` may
/// run on, so that the process it starts inherits them; then gives the
/// thread its CPUs back. Also says whether it did: without `pid`, or when
/// the CPUs cannot be read or taken (the process is gone, or this one may
/// not run there), `spawn` runs where this thread does.
///
/// # Errors
/// When the thread cannot get its own CPUs back: the measurement that
/// follows would run on the broker's.
#[cfg(target_os = "linux")]
fn on_cpus_of<T>(pid: Option<u32>, spawn: impl FnOnce() -> T) -> Result<(T, bool)> {
    use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
    use nix::unistd::Pid;

    /// Gives the thread its CPUs back, also if `spawn` panics.
    struct Restore(Option<CpuSet>);
    impl Restore {
        fn now(&mut self) -> nix::Result<()> {
            match self.0.take() {
                Some(ours) => sched_setaffinity(Pid::from_raw(0), &ours),
                None => Ok(()),
            }
        }
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = self.now();
        }
    }

    let this = Pid::from_raw(0);
    let mut restore = Restore(
        pid.and_then(|p| i32::try_from(p).ok())
            .and_then(|p| sched_getaffinity(Pid::from_raw(p)).ok())
            .and_then(|theirs| {
                let ours = sched_getaffinity(this).ok()?;
                sched_setaffinity(this, &theirs).ok().map(|()| ours)
            }),
    );
    let placed = restore.0.is_some();
    let out = spawn();
    restore
        .now()
        .context("cannot give this thread its CPUs back after starting the echo server")?;
    Ok((out, placed))
}

/// Elsewhere the echo server runs where this process does.
#[cfg(not(target_os = "linux"))]
fn on_cpus_of<T>(_pid: Option<u32>, spawn: impl FnOnce() -> T) -> Result<(T, bool)> {
    Ok((spawn(), false))
}

/// One connection's loop: `in_flight` requests written ahead, a new one
/// for each reply, until `until`. Returns the round trips completed in
/// the measured period, their latency and when the last completed.
async fn load(
    mut stream: TcpStream,
    shape: Shape,
    measure_from: Instant,
    until: Instant,
) -> Result<(u64, Latencies, Instant)> {
    let mut request = Vec::with_capacity(4 + shape.size);
    request.extend_from_slice(&(shape.size as u32).to_le_bytes());
    request.resize(4 + shape.size, b'x');
    let mut reply = vec![0u8; shape.reply];
    let mut sent: VecDeque<Instant> = VecDeque::with_capacity(shape.in_flight as usize);
    let mut latency = Latencies::new();
    let mut n = 0u64;
    let mut last = measure_from;
    for _ in 0..shape.in_flight {
        sent.push_back(Instant::now());
        stream.write_all(&request).await?;
    }
    while let Some(at) = sent.pop_front() {
        stream.read_exact(&mut reply).await?;
        let now = Instant::now();
        if at >= measure_from && now <= until {
            latency.record(now - at);
            n += 1;
            last = now;
        }
        if now < until {
            sent.push_back(Instant::now());
            stream.write_all(&request).await?;
        }
    }
    Ok((n, latency, last))
}

/// Runs the echo server until killed.
///
/// # Errors
/// When it cannot listen.
pub async fn echo_server(args: EchoServerArgs) -> Result<()> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("{LISTENING}{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(echo(stream, args.reply));
    }
}

/// Answers each request of a connection with `reply` bytes.
async fn echo(mut stream: TcpStream, reply: usize) -> std::io::Result<()> {
    let answer = vec![0u8; reply];
    let mut request = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_REQUEST {
            return Ok(());
        }
        request.resize(len, 0);
        stream.read_exact(&mut request).await?;
        stream.write_all(&answer).await?;
    }
}

/// User plus system CPU ticks of `/proc/<pid>/stat` (`self` for this
/// process).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in
    // parentheses: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs process `pid` may run on.
    #[cfg(target_os = "linux")]
    fn cpus(pid: u32) -> nix::sched::CpuSet {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sched::sched_getaffinity(pid).unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_process_started_on_the_cpus_of_another_gets_them_and_the_thread_keeps_its_own() {
        use nix::sched::{sched_setaffinity, CpuSet};
        use nix::unistd::Pid;

        /// A child process, killed and reaped when dropped.
        struct Sleeper(std::process::Child);
        impl Drop for Sleeper {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let sleeper = || {
            let child = std::process::Command::new("sleep").arg("30").spawn();
            Sleeper(child.unwrap())
        };

        let mine = cpus(0);
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| mine.is_set(c).unwrap())
            .collect();
        if allowed.len() < 2 {
            stderr!("one CPU allowed: another set cannot be told from this thread's; skipped");
            return;
        }
        let model = sleeper();
        let mut only_first = CpuSet::new();
        only_first.set(allowed[0]).unwrap();
        let model_pid = Pid::from_raw(i32::try_from(model.0.id()).unwrap());
        sched_setaffinity(model_pid, &only_first).unwrap();

        let (placed, was) = on_cpus_of(Some(model.0.id()), sleeper).unwrap();
        assert!(was);
        assert_eq!(cpus(placed.0.id()), only_first);
        assert_eq!(cpus(0), mine, "the thread got its own CPUs back");

        // No such process, or none given: where this thread runs.
        let (anywhere, was) = on_cpus_of(Some(u32::MAX / 2), sleeper).unwrap();
        assert!(!was);
        assert_eq!(cpus(anywhere.0.id()), mine);
        let (unplaced, was) = on_cpus_of(None, sleeper).unwrap();
        assert!(!was);
        assert_eq!(cpus(unplaced.0.id()), mine);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        assert!(cpu_ticks("self").is_some());
        assert!(cpu_ticks("no-such-process").is_none());
    }

    #[tokio::test]
    async fn a_meter_measures_from_its_start_or_not_at_all() {
        let me = std::process::id();
        let meter = CpuMeter::start_at(Instant::now(), Some(me));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let cpu = meter.stop().await.expect("read");
        assert!(cpu.own.is_some_and(|s| s >= 0.0) && cpu.other.is_some());
        // Stopped before its period began (an interrupt in the warm-up).
        let early = CpuMeter::start_at(Instant::now() + Duration::from_secs(3600), Some(me));
        let cpu = early.stop().await.expect("read");
        assert!(cpu.own.is_none() && cpu.other.is_none());
        assert!(check_pid(me, "--broker-pid").is_ok());
        let err = check_pid(999_999_999, "--broker-pid").expect_err("no such pid");
        assert!(err.to_string().contains("no such process"), "{err}");
    }

    #[tokio::test]
    async fn the_load_counts_round_trips_against_an_echo_in_this_process() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(echo(s, 16));
            }
        });
        let shape = Shape {
            connections: 2,
            in_flight: 4,
            size: 100,
            reply: 16,
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(200),
        };
        let floor = measure(shape, Server::Running(&addr)).await.unwrap();
        assert!(floor.round_trips > 0, "{floor:?}");
        assert_eq!(floor.latency.count(), floor.round_trips);
        assert!(floor.secs > 0.0 && floor.secs <= 0.25, "{floor:?}");
        assert!(floor.server_cpu_s.is_none());
        assert!(floor.client_cpu_s.is_some());
    }
}
