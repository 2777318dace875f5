//! `keelmq`: the KeelMQ command-line tool (topics, groups, status, promotion
//! and switchover).

use anyhow::Result;
use clap::{Parser, Subcommand};
use keelmq_broker::cli::admin::{self, AdminTarget, GroupCommand, TopicCommand};
use keelmq_broker::cli::bench;

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
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelmq: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
