//! `keelmq-operator`: runs the operator (default), or prints what the Helm
//! chart and reviewers need: the CRDs, the RBAC table, the objects a
//! BrokerGroup becomes.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use keelmq_crds::BrokerGroup;
use keelmq_operator::controller::{self, Context};
use keelmq_operator::http::{self, HttpState};
use keelmq_operator::metrics::Metrics;
use keelmq_operator::telemetry::{self, LogFormat};
use keelmq_operator::{leader, model, rbac};

#[derive(Parser, Debug)]
#[command(
    name = "keelmq-operator",
    version,
    about = "KeelMQ Kubernetes operator",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator (the default).
    Run(RunArgs),
    /// Print the CRD YAML (BrokerGroup and Topic, multi-document).
    Crds,
    /// Print, as JSON, every Kubernetes permission the operator uses.
    Rbac,
    /// Print the objects the operator would build for a BrokerGroup file, as YAML.
    Render {
        /// BrokerGroup YAML file.
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        peer: PeerArgs,
    },
}

/// Where the operator runs, for the NetworkPolicy of each group: it admits
/// these pods to the brokers' admin and replication ports.
#[derive(Args, Debug, Clone)]
struct PeerArgs {
    /// The operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    operator_namespace: String,
    /// Labels of the operator's pods, `key=value,...` (the Helm chart sets
    /// its pods' selector labels).
    #[arg(long, env = "KEELMQ_OPERATOR_POD_LABELS", default_value = model::DEFAULT_OPERATOR_POD_LABELS)]
    operator_pod_labels: String,
}

impl PeerArgs {
    fn peer(&self) -> Result<model::OperatorPeer, String> {
        Ok(model::OperatorPeer {
            namespace: self.operator_namespace.clone(),
            pod_labels: model::parse_labels(&self.operator_pod_labels)
                .map_err(|e| format!("--operator-pod-labels: {e}"))?,
        })
    }
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Namespace to watch; empty watches all namespaces.
    #[arg(long, env = "KEELMQ_WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Port for /healthz, /readyz and /metrics.
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Hold a Lease before acting (`--leader-election=false` to disable).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "keelmq-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    peer: PeerArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let env_names = || std::env::vars_os().map(|(name, _)| name);
    let result = match cli.command {
        Some(Command::Crds) => keelmq_crds::crds_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        Some(Command::Rbac) => {
            println!("{}", rbac::to_json());
            Ok(())
        }
        // The commands that read KEELMQ_ variables refuse misspelt ones.
        Some(Command::Render { file, peer }) => {
            check_environment(env_names()).and_then(|()| render(&file, &peer))
        }
        Some(Command::Run(args)) => check_environment(env_names()).and_then(|()| run(args)),
        None => check_environment(env_names()).and_then(|()| run(cli.run)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelmq-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Refuses `KEELMQ_` variables no KeelMQ program reads: a misspelt
/// `KEELMQ_WATCH_NAMESPACE` would silently widen the operator to every
/// namespace.
fn check_environment<I, K>(env_names: I) -> Result<(), String>
where
    I: IntoIterator<Item = K>,
    K: AsRef<std::ffi::OsStr>,
{
    let own = keelmq_broker::config::clap_keelmq_variables(&Cli::command());
    keelmq_broker::config::check_keelmq_variables("keelmq-operator", &own, env_names)
        .map_err(|e| e.to_string())
}

fn render(file: &PathBuf, peer: &PeerArgs) -> Result<(), String> {
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let mut bg: BrokerGroup = serde_yaml::from_str(&text)
        .map_err(|e| format!("{} is not a BrokerGroup: {e}", file.display()))?;
    model::prepare_for_render(&mut bg);
    let objects = model::desired_objects(&bg, &peer.peer()?).map_err(|e| e.to_string())?;
    for o in objects {
        let y = serde_yaml::to_string(&o).map_err(|e| e.to_string())?;
        print!("---\n{y}");
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<(), String> {
    let peer = args.peer.peer()?;
    telemetry::try_init(args.log_format)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
        let metrics = Arc::new(Metrics::default());
        let namespace = (!args.namespace.is_empty()).then(|| args.namespace.clone());
        let mut ctx = Context::new(client.clone(), metrics.clone());
        ctx.operator_peer = peer;
        let ctx = Arc::new(ctx);
        // Ready while serving: a standby at once, the leader once its
        // controllers run (see http::readiness).
        let http_state = HttpState {
            metrics: metrics.clone(),
            controllers_running: ctx.controllers_running.clone(),
        };
        let port = args.http_port;
        tokio::spawn(async move {
            if let Err(e) = http::serve(port, http_state).await {
                tracing::error!(error = %e, port, "HTTP server failed");
            }
        });
        if args.leader_election {
            let identity = std::env::var("POD_NAME")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_else(|_| format!("keelmq-operator-{}", std::process::id()));
            let cfg = leader::LeaseConfig::new(&args.lease_name, &args.lease_namespace, &identity);
            let acquired = leader::acquire(&client, &cfg).await;
            metrics.set_leader(true);
            let result = tokio::select! {
                r = controller::run(client.clone(), namespace, ctx) => {
                    // Stopped by a signal: let a successor take over at once.
                    metrics.set_leader(false);
                    leader::release(&client, &cfg).await;
                    r.map_err(|e| e.to_string())
                }
                () = leader::hold(&client, &cfg, acquired) => Err("lost the leader Lease; exiting so a new leader takes over".into()),
            };
            metrics.set_leader(false);
            result
        } else {
            metrics.set_leader(true);
            controller::run(client, namespace, ctx).await.map_err(|e| e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_variable_stops_the_operator() {
        let err = check_environment([format!("KEELMQ_{}", "WATCH_NAMESPACES")])
            .expect_err("would watch every namespace");
        assert!(
            err.contains("(did you mean KEELMQ_WATCH_NAMESPACE?)")
                && err.contains("`keelmq-operator --help`"),
            "{err}"
        );
        let err =
            check_environment([format!("KEELMQ_{}", "OPERATOR_POD_LABEL")]).expect_err("typo");
        assert!(
            err.contains("(did you mean KEELMQ_OPERATOR_POD_LABELS?)"),
            "{err}"
        );
        // What the chart and the tests set.
        check_environment([
            "KEELMQ_WATCH_NAMESPACE",
            "KEELMQ_OPERATOR_POD_LABELS",
            "POD_NAMESPACE",
            "POD_NAME",
            "RUST_LOG",
            "KEELMQ_TEST_LOG",
            "KEELMQ_E2E_KUBECONFIG",
            "KEELMQ_OPERATOR_BIN",
        ])
        .expect("known");
    }

    /// The broker and the `keelmq` tool accept the operator's variables.
    #[test]
    fn the_operators_variables_are_known_to_the_other_programs() {
        let own = keelmq_broker::config::clap_keelmq_variables(&Cli::command());
        assert_eq!(
            own,
            ["KEELMQ_OPERATOR_POD_LABELS", "KEELMQ_WATCH_NAMESPACE"]
        );
        for v in &own {
            assert!(
                keelmq_broker::config::OTHER_KEELMQ_VARIABLES.contains(&v.as_str()),
                "{v} is missing from keelmq_broker::config::OTHER_KEELMQ_VARIABLES"
            );
        }
    }
}
