//! `keelmq dev`: a local broker group on loopback for trying KeelMQ without
//! Kubernetes. It starts a master and two slaves as child processes (each
//! with its own data directory and ports), runs a [`Supervisor`] over them
//! that chooses the first master, promotes a slave when the master dies and
//! makes restarted brokers follow, and restarts any broker whose process
//! exits. Ctrl-C stops the brokers cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use keelmq_failover::{Policy, ReplicationMode};
use serde::{Deserialize, Serialize};

use crate::supervisor::{Member, Supervisor};

/// Options of `keelmq dev`.
#[derive(Args, Debug, Clone)]
pub struct DevArgs {
    /// Directory holding each broker's data directory and log.
    #[arg(long, default_value = "keelmq-dev")]
    pub dir: PathBuf,
    /// Number of brokers (one master, the rest slaves).
    #[arg(long, default_value_t = 3)]
    pub brokers: u32,
    /// First port: broker i uses base+10i (client), +1 (admin), +2 (http), +3 (replication).
    #[arg(long, default_value_t = 8081)]
    pub base_port: u16,
    /// Replication mode.
    #[arg(long, value_enum, default_value = "sync")]
    pub replication_mode: crate::replication::ReplicationMode,
    /// Slaves that must confirm a send under SYNC replication.
    #[arg(long, default_value_t = 1)]
    pub min_in_sync_replicas: u32,
    /// Flush mode of every broker (SYNC_FLUSH or ASYNC_FLUSH).
    #[arg(long, default_value = "ASYNC_FLUSH")]
    pub flush_mode: String,
    /// How long the master may be unreachable before a slave replaces it
    /// (a master whose process exited is replaced at once).
    #[arg(long, default_value_t = 2000)]
    pub detection_delay_ms: u64,
    /// Promote even when acknowledged messages may be lost.
    #[arg(long)]
    pub allow_data_loss: bool,
    /// Commit-log segment size of every broker.
    #[arg(long, default_value = "64MiB")]
    pub segment_size: String,
    /// The broker binary (default: `keelmq-broker` next to this program).
    #[arg(long)]
    pub broker_bin: Option<PathBuf>,
    /// Do not restart brokers whose process exits.
    #[arg(long)]
    pub no_restart: bool,
}

/// One broker of the local group as written to `<dir>/group.json`, so
/// scripts (and the failover benchmark) can find and kill processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevBroker {
    pub name: String,
    pub pid: u32,
    pub client: String,
    pub admin: String,
    pub http: String,
    pub replication: String,
    pub data_dir: PathBuf,
}

struct Proc {
    info: DevBroker,
    child: Option<Child>,
    /// When the exited process may be started again.
    restart_at: Option<Instant>,
    started: Instant,
    /// Delay before the next restart: doubles while the broker keeps
    /// exiting soon after starting (a port in use, a bad data directory).
    backoff: Duration,
}

fn broker_bin(args: &DevArgs) -> Result<PathBuf> {
    if let Some(p) = &args.broker_bin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let p = exe.with_file_name("keelmq-broker");
    if !p.exists() {
        bail!(
            "{} not found; build it (cargo build --release --bins) or pass --broker-bin",
            p.display()
        );
    }
    Ok(p)
}

fn spawn(bin: &Path, args: &DevArgs, b: &DevBroker, ports: [u16; 4]) -> Result<Child> {
    std::fs::create_dir_all(&b.data_dir)
        .with_context(|| format!("creating {}", b.data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.dir.join(format!("{}.log", b.name)))
        .context("opening the broker log")?;
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(&b.data_dir)
        .args(["--listen-address", "127.0.0.1"])
        .args(["--broker-name", "keelmq-dev"])
        .args(["--broker-id", &b.name])
        .args(["--role", "standby"])
        .args(["--client-port", &ports[0].to_string()])
        .args(["--admin-port", &ports[1].to_string()])
        .args(["--http-port", &ports[2].to_string()])
        .args(["--replication-port", &ports[3].to_string()])
        .args([
            "--replication-mode",
            &args.replication_mode.to_string().to_lowercase(),
        ])
        .args([
            "--min-in-sync-replicas",
            &args.min_in_sync_replicas.to_string(),
        ])
        .args(["--flush-mode", &args.flush_mode])
        .args(["--segment-size", &args.segment_size])
        .args(["--auto-create-topics", "true"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log handle")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(child)
}

/// The brokers a running `keelmq dev` wrote to `<dir>/group.json`, once it has.
pub fn read_group(dir: &Path) -> Option<Vec<DevBroker>> {
    serde_json::from_slice(&std::fs::read(dir.join("group.json")).ok()?).ok()
}

fn write_group(dir: &Path, procs: &[Proc]) {
    let brokers: Vec<&DevBroker> = procs.iter().map(|p| &p.info).collect();
    if let Err(e) = crate::store::save_json(&dir.join("group.json"), &brokers) {
        tracing::warn!(error = %e, "could not write group.json");
    }
}

/// Runs the local group until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> Result<()> {
    if args.brokers == 0 || args.brokers > 9 {
        bail!("--brokers must be between 1 and 9");
    }
    crate::telemetry::init(crate::config::LogFormat::Text);
    let bin = broker_bin(&args)?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir).context("resolving --dir")?;
    let args = DevArgs { dir, ..args };
    let mut procs = Vec::new();
    let mut members = Vec::new();
    for i in 0..args.brokers {
        let base = args
            .base_port
            .checked_add(u16::try_from(i * 10 + 3).unwrap_or(u16::MAX))
            .context("--base-port too high for this many brokers")?
            - 3;
        let ports = [base, base + 1, base + 2, base + 3];
        let name = format!("b{i}");
        let info = DevBroker {
            name: name.clone(),
            pid: 0,
            client: format!("127.0.0.1:{}", ports[0]),
            admin: format!("127.0.0.1:{}", ports[1]),
            http: format!("127.0.0.1:{}", ports[2]),
            replication: format!("127.0.0.1:{}", ports[3]),
            data_dir: args.dir.join(&name),
        };
        members.push(Member {
            name,
            admin: info.admin.clone(),
            replication: info.replication.clone(),
        });
        procs.push((info, ports));
    }
    let mut running: Vec<Proc> = Vec::new();
    for (mut info, ports) in procs.clone() {
        let child = spawn(&bin, &args, &info, ports)?;
        info.pid = child.id();
        running.push(Proc {
            info,
            child: Some(child),
            restart_at: None,
            started: Instant::now(),
            backoff: Duration::from_secs(1),
        });
    }
    write_group(&args.dir, &running);

    let policy = Policy {
        mode: match args.replication_mode {
            crate::replication::ReplicationMode::Sync => ReplicationMode::Sync,
            crate::replication::ReplicationMode::Async => ReplicationMode::Async,
        },
        min_in_sync_replicas: args.min_in_sync_replicas,
        replicas: args.brokers,
        enabled: true,
        detection_delay: Duration::from_millis(args.detection_delay_ms),
        allow_data_loss: args.allow_data_loss,
    };
    let supervisor = Supervisor::new(members, policy, Some(args.dir.join("supervisor.json")))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    print_banner(&args, &running);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sup_task = {
        let sup = supervisor.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            sup.run(Duration::from_millis(200), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
        })
    };

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let signal = crate::server::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            _ = tick.tick() => {}
        }
        let mut changed = false;
        for (i, p) in running.iter_mut().enumerate() {
            if let Some(child) = &mut p.child
                && let Ok(Some(status)) = child.try_wait()
            {
                tracing::warn!(broker = %p.info.name, pid = p.info.pid, %status, "broker process exited");
                supervisor.set_gone(&p.info.name, true);
                p.child = None;
                p.backoff = if p.started.elapsed() < Duration::from_secs(10) {
                    (p.backoff * 2).min(Duration::from_secs(30))
                } else {
                    Duration::from_secs(1)
                };
                if args.no_restart {
                    p.restart_at = None;
                } else {
                    tracing::info!(broker = %p.info.name, "restarting in {:?} (see {}/{}.log)", p.backoff, args.dir.display(), p.info.name);
                    p.restart_at = Some(Instant::now() + p.backoff);
                }
            }
            if p.child.is_none() && p.restart_at.is_some_and(|t| Instant::now() >= t) {
                p.restart_at = None;
                match spawn(&bin, &args, &p.info, procs[i].1) {
                    Ok(child) => {
                        p.info.pid = child.id();
                        p.child = Some(child);
                        p.started = Instant::now();
                        supervisor.set_gone(&p.info.name, false);
                        tracing::info!(broker = %p.info.name, pid = p.info.pid, "broker restarted; it rejoins as a follower");
                        changed = true;
                    }
                    Err(e) => {
                        tracing::warn!(broker = %p.info.name, error = %e, "restart failed; retrying");
                        p.restart_at = Some(Instant::now() + Duration::from_secs(2));
                    }
                }
            }
        }
        if changed {
            write_group(&args.dir, &running);
        }
    }
    tracing::info!("stopping the local group");
    let _ = stop_tx.send(true);
    let _ = sup_task.await;
    for p in &mut running {
        if let Some(child) = &p.child {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
    for p in &mut running {
        if let Some(child) = &mut p.child {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

fn print_banner(args: &DevArgs, procs: &[Proc]) {
    let first = &procs[0].info;
    println!(
        "KeelMQ local group: {} brokers, {} replication (min in-sync slaves {}), {}",
        procs.len(),
        args.replication_mode,
        args.min_in_sync_replicas,
        args.flush_mode
    );
    for p in procs {
        println!(
            "  {}  pid {:<7} client {}  admin {}  http {}  data {}",
            p.info.name,
            p.info.pid,
            p.info.client,
            p.info.admin,
            p.info.http,
            p.info.data_dir.display()
        );
    }
    println!(
        "\nThe supervisor makes one broker master (see `keelmq --admin {} status`);\n\
         clients connect to the master's client endpoint. Topics are created on first use.\n\
         Try:\n  \
           keelmq --admin {} status\n  \
           keelmq bench send --endpoint <master client endpoint> --topic demo --duration-secs 5\n  \
           kill -9 <master pid>     # a slave is promoted; the broker is restarted and follows\n\
         Logs: {}/b*.log; group record: {}/supervisor.json; processes: {}/group.json\n",
        first.admin,
        first.admin,
        args.dir.display(),
        args.dir.display(),
        args.dir.display(),
    );
}
