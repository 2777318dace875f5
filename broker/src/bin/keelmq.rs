//! `keelmq`: the KeelMQ command-line tool (topics, groups, status, promotion
//! and switchover).

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use keelmq_broker::cli::admin::{self, AdminTarget, GroupCommand, TopicCommand};
use keelmq_broker::cli::bench;
use keelmq_broker::config;

// The load tool shares its machine with the broker it measures: the less CPU
// its allocations take, the less it takes from the broker.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "keelmq", version, about = "KeelMQ command-line tool")]
struct Cli {
    #[command(flatten)]
    target: AdminTarget,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage topics.
    #[command(subcommand)]
    Topic(TopicCommand),
    /// Load-test any RocketMQ 5 endpoint (this broker or another).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a local group (a master and two slaves on loopback, with a
    /// supervisor that promotes a slave when the master dies).
    Dev(keelmq_broker::cli::dev::DevArgs),
    /// Inspect consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Show a broker's role, epoch, offsets and replication state.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make a broker master of a new epoch.
    Promote {
        #[arg(long)]
        epoch: u64,
    },
    /// Make a broker follow a master.
    Follow {
        /// The master's replication endpoint (host:port).
        #[arg(long)]
        master: String,
        #[arg(long)]
        epoch: u64,
    },
    /// Hand the master role to one of its slaves without losing writes.
    Switchover {
        /// broker id of the slave that takes over.
        #[arg(long)]
        to: String,
        /// The new epoch (greater than the current one).
        #[arg(long)]
        epoch: u64,
        /// How long the master waits for the slave to catch up, in ms
        /// (writes are refused meanwhile). The CLI waits this plus 30 s
        /// for the answer.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // An unknown KEELMQ_ variable is most likely a misspelt one, which would
    // be ignored (here, or by the brokers `keelmq dev` starts, which inherit
    // this environment).
    if let Err(e) = check_environment(std::env::vars_os().map(|(name, _)| name)) {
        eprintln!("keelmq: {e}");
        return std::process::ExitCode::from(2);
    }
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelmq: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Refuses `KEELMQ_` variables no KeelMQ program reads. This tool reads its
/// own (`KEELMQ_ADMIN`) and hands the brokers' settings and `KEELMQ_LOG`
/// to the brokers `keelmq dev` starts, so all of those are its own.
fn check_environment<I, K>(env_names: I) -> Result<(), config::ConfigError>
where
    I: IntoIterator<Item = K>,
    K: AsRef<std::ffi::OsStr>,
{
    let mut own = config::clap_keelmq_variables(&Cli::command());
    own.extend(config::broker_variables());
    config::check_keelmq_variables("keelmq", &own, env_names)
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Topic(cmd) => admin::topic(&cli.target, cmd).await,
        Command::Bench(cmd) => bench::run(cmd).await,
        Command::Dev(args) => keelmq_broker::cli::dev::run(args).await,
        Command::Group(cmd) => admin::group(&cli.target, cmd).await,
        Command::Status { json } => admin::status(&cli.target, json).await,
        Command::Promote { epoch } => admin::promote(&cli.target, epoch).await,
        Command::Follow { master, epoch } => admin::follow(&cli.target, master, epoch).await,
        Command::Switchover {
            to,
            epoch,
            timeout_ms,
        } => admin::switchover(&cli.target, to, epoch, timeout_ms).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_variable_is_refused_and_the_tools_own_are_not() {
        // The admin endpoint with a typo would silently send the command to
        // the default 127.0.0.1:8082.
        let err = check_environment([format!("KEELMQ_{}", "ADMN")]).expect_err("typo");
        assert!(
            err.to_string().contains("(did you mean KEELMQ_ADMIN?)")
                && err.to_string().contains("`keelmq --help`"),
            "{err}"
        );
        // A broker setting with a typo, which `keelmq dev` would hand on.
        let err = check_environment([format!("KEELMQ_{}", "FLUSHMODE")]).expect_err("typo");
        assert!(
            err.to_string()
                .contains("(did you mean KEELMQ_FLUSH_MODE?)"),
            "{err}"
        );
        check_environment([
            "KEELMQ_ADMIN",
            "KEELMQ_FLUSH_MODE",
            "KEELMQ_LOG",
            "KEELMQ_TEST_LOG",
        ])
        .expect("known");
    }

    /// The other programs accept this tool's variables (a shell may export
    /// them while starting a broker or the operator).
    #[test]
    fn the_tools_variables_are_known_to_the_other_programs() {
        let own = config::clap_keelmq_variables(&Cli::command());
        assert!(own.iter().any(|v| v == "KEELMQ_ADMIN"), "{own:?}");
        for v in &own {
            assert!(
                config::OTHER_KEELMQ_VARIABLES.contains(&v.as_str()),
                "{v} is missing from config::OTHER_KEELMQ_VARIABLES"
            );
        }
    }
}
