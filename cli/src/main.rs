//! `txmq`: the txmq command line. Parses the arguments and hands each
//! subcommand to its module.

/// Writes a line to standard error, as `eprintln!` does, but a standard
/// error that cannot be written (closed: `2>&1 | head -1`) does not panic:
/// the command's outcome and its exit code stand (a partial send exited
/// 101 instead of 3).
macro_rules! stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod bench;
mod cluster;
mod consume;
mod controller;
mod dashboard;
mod exit;
mod group;
mod msg;
mod output;
mod refusal;
mod send;
mod signal;
mod topic;
mod tx;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::args::GlobalArgs;

/// txmq command line: send, consume, inspect, administer.
///
/// Every flag can also be set with an environment variable: TXMQ_ and the
/// flag's name in capitals (TXMQ_NAMESERVER, TXMQ_IDLE_TIMEOUT, ...).
/// Durations are written like 500ms, 6s, 2m.
#[derive(Debug, Parser)]
#[command(
    name = "txmq",
    version,
    after_help = "Exit codes: 0 done; 1 error, or nothing could be done; 2 usage error; \
3 partly done (some messages sent and some not, or some brokers did not answer); \
130 stopped by Ctrl-C; 143 stopped by SIGTERM."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and inspect topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// List the brokers known to the nameservers, with each one's role,
    /// epoch and replication lag.
    Cluster,
    /// Broker groups: a planned switch of a group's master (elect).
    #[command(subcommand)]
    Broker(controller::BrokerCommand),
    /// Show the controller: its members, Raft leader and term, and each
    /// broker group's master, epoch and in-sync replicas.
    Controller,
    /// Send messages to a topic.
    Send(send::SendArgs),
    /// Consume a topic as a member of a consumer group.
    Consume(consume::ConsumeArgs),
    /// Consumer groups: list, show members, assignment and lag, reset offsets.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Dead letters: messages a group failed too often.
    #[command(subcommand)]
    Dlq(group::DlqCommand),
    /// Transactional messages: send, answer check-backs, list, resolve.
    #[command(subcommand)]
    Tx(tx::TxCommand),
    /// Benchmarks against a running cluster: produce, consume, e2e, tx.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script: `txmq completions bash >
    /// ~/.local/share/bash-completion/completions/txmq`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Find messages: by id (show), by key (find), by queue offset (get).
    #[command(subcommand)]
    Msg(msg::MsgCommand),
    /// Serve the web dashboard: brokers, topics, groups, transactions,
    /// messages and dead letters, with actions behind confirmations.
    Dashboard(dashboard::DashboardArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, "txmq", &mut script);
        // A closed pipe (`| head`) is not an error worth a message.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return ExitCode::SUCCESS;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.global.worker_threads {
        builder.worker_threads(n.into());
    }
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => {
            stderr!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    cli.global.init_logging();
    let result = match cli.command {
        Command::Topic(cmd) => topic::run(&cli.global, cmd).await,
        Command::Cluster => cluster::run(&cli.global).await,
        Command::Broker(cmd) => controller::run_broker(&cli.global, cmd).await,
        Command::Controller => controller::run_controller(&cli.global).await,
        Command::Send(args) => send::run(&cli.global, args).await,
        Command::Consume(args) => consume::run(&cli.global, args).await,
        Command::Group(cmd) => group::run(&cli.global, cmd).await,
        Command::Dlq(cmd) => group::run_dlq(&cli.global, cmd).await,
        Command::Tx(cmd) => tx::run(&cli.global, cmd).await,
        Command::Bench(cmd) => bench::run(&cli.global, cmd).await,
        Command::Completions { .. } => Ok(()),
        Command::Msg(cmd) => msg::run(&cli.global, cmd).await,
        Command::Dashboard(args) => dashboard::run(&cli.global, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if exit::closed_output(&e) => ExitCode::from(exit::CLOSED_OUTPUT),
        Err(e) => {
            let text = output::error_text(&e);
            stderr!("error: {text}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse_with_their_defaults() {
        let cli = Cli::try_parse_from(["txmq", "send", "orders", "--body", "hi"]);
        let Ok(cli) = cli else {
            panic!("send with a body parses")
        };
        assert_eq!(cli.global.nameserver, "127.0.0.1:9876");
        let Command::Send(args) = cli.command else {
            panic!("a send command")
        };
        assert_eq!(args.count, 1);
        assert_eq!(args.body.as_deref(), Some("hi"));

        // --body and --stdin exclude each other; one is required.
        assert!(Cli::try_parse_from(["txmq", "send", "t", "--body", "x", "--stdin"]).is_err());
        assert!(Cli::try_parse_from(["txmq", "send", "t"]).is_err());

        let cli = Cli::try_parse_from([
            "txmq",
            "consume",
            "t",
            "--group",
            "g",
            "--idle-timeout",
            "500ms",
            "--from",
            "last",
            "--output",
            "json",
        ]);
        let Ok(Cli {
            command: Command::Consume(c),
            global,
        }) = cli
        else {
            panic!("consume parses")
        };
        assert_eq!(c.idle_timeout, Some(std::time::Duration::from_millis(500)));
        assert_eq!(global.output, output::OutputFormat::Json);
        assert!(
            Cli::try_parse_from(["txmq", "consume", "t"]).is_err(),
            "--group is required"
        );

        let cli = Cli::try_parse_from(["txmq", "broker", "elect", "broker-a", "--replica", "h:2"]);
        let Ok(Cli {
            command:
                Command::Broker(controller::BrokerCommand::Elect {
                    broker_name,
                    replica,
                }),
            ..
        }) = cli
        else {
            panic!("broker elect parses")
        };
        assert_eq!(
            (broker_name.as_str(), replica.as_deref()),
            ("broker-a", Some("h:2"))
        );
        assert!(Cli::try_parse_from(["txmq", "broker", "elect"]).is_err());
        assert!(matches!(
            Cli::try_parse_from(["txmq", "controller"]).map(|c| c.command),
            Ok(Command::Controller)
        ));
    }

    #[test]
    fn security_flags_are_global_and_checked_in_pairs() {
        let parse = |args: &[&str]| {
            let Ok(cli) = Cli::try_parse_from(args) else {
                panic!("{args:?} parses")
            };
            cli
        };
        let cli = parse(&[
            "txmq",
            "topic",
            "list",
            "--access-key",
            "app",
            "--secret-key",
            "s",
        ]);
        let credentials = cli.global.security.credentials();
        assert!(matches!(credentials, Ok(Some(c)) if c.access_key == "app" && c.secret_key == "s"));
        assert!(matches!(cli.global.security.tls(), Ok(None)));

        let cli = parse(&["txmq", "--access-key", "app", "cluster"]);
        let e = cli.global.client_config().err();
        assert_eq!(e.as_ref().map(exit::code_of), Some(exit::USAGE));

        let cli = parse(&[
            "txmq",
            "cluster",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ]);
        let e = cli.global.client_config().err();
        assert_eq!(e.as_ref().map(exit::code_of), Some(exit::USAGE));

        let cli = parse(&["txmq", "cluster", "--tls-ca", "/nonexistent/ca.pem"]);
        let e = cli.global.client_config().err();
        assert_eq!(e.as_ref().map(exit::code_of), Some(exit::USAGE));
        let text = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("/nonexistent/ca.pem"), "{text}");
    }
}
