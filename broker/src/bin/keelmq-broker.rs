//! `keelmq-broker`: the broker process (the broker image's entrypoint).

use std::process::ExitCode;

use clap::Parser;
use keelmq_broker::config::BrokerArgs;
use keelmq_broker::telemetry::LogFilter;

// mimalloc rather than the system allocator: glibc's malloc and free were
// about 11 % of the broker's CPU per message (`perf`, unbatched sends), and
// mimalloc cut the broker's CPU per message by 6-24 % in alternating runs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = BrokerArgs::parse();
    // An unknown KEELMQ_ variable (a misspelt setting) and a log filter
    // with a mistake stop the broker here, like any other bad setting.
    let config = match args.resolve_at_start(std::env::vars_os().map(|(name, _)| name)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keelmq-broker: {e}");
            return ExitCode::from(2);
        }
    };
    let log_filter = match LogFilter::from_env() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("keelmq-broker: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        match toml::to_string_pretty(&config) {
            Ok(t) => {
                print!("{t}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("keelmq-broker: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    keelmq_broker::telemetry::install(config.log_format, log_filter);
    for warning in config.startup_warnings() {
        tracing::warn!("{warning}");
    }
    match keelmq_broker::server::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "broker stopped");
            eprintln!("keelmq-broker: {e}");
            ExitCode::FAILURE
        }
    }
}
