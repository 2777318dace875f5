//! `keelmq dev`: a local broker group on loopback for trying KeelMQ without
//! Kubernetes. It starts a master and two slaves as child processes (each
//! with its own data directory and ports), runs a [`Supervisor`] over them
//! that chooses the first master, promotes a slave when the master dies and
//! makes restarted brokers follow, and restarts any broker whose process
//! exits. Ctrl-C stops the brokers cleanly.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use keelmq_failover::{Policy, ReplicationMode};
use serde::{Deserialize, Serialize};

use crate::config::{BrokerConfig, ByteSize};
use crate::store::FlushMode;
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
    /// Slaves that must confirm a send under SYNC replication (at least 1,
    /// below --brokers).
    #[arg(long, default_value_t = 1)]
    pub min_in_sync_replicas: u32,
    /// Flush mode of every broker.
    #[arg(long, value_enum, ignore_case = true, default_value_t = FlushMode::AsyncFlush)]
    pub flush_mode: FlushMode,
    /// How long the master may be unreachable before a slave replaces it
    /// (a master whose process exited is replaced at once).
    #[arg(long, default_value_t = 2000)]
    pub detection_delay_ms: u64,
    /// Promote even when acknowledged messages may be lost.
    #[arg(long)]
    pub allow_data_loss: bool,
    /// Commit-log segment size of every broker ("64MiB", "1GiB" or bytes).
    #[arg(long, default_value = "64MiB")]
    pub segment_size: ByteSize,
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

impl DevArgs {
    /// Refuses, before any broker starts, settings that every broker would
    /// refuse at start (dev would restart them forever) or that would make
    /// every send fail.
    pub fn validate(&self) -> Result<()> {
        if self.brokers == 0 || self.brokers > 9 {
            bail!("--brokers must be between 1 and 9");
        }
        if self.replication_mode == crate::replication::ReplicationMode::Sync
            && self.min_in_sync_replicas >= self.brokers
        {
            bail!(
                "--min-in-sync-replicas {} needs more slaves than {} brokers have ({}): \
                 every SYNC send would time out. Lower it, add brokers (--brokers) or use \
                 --replication-mode async",
                self.min_in_sync_replicas,
                self.brokers,
                self.brokers - 1
            );
        }
        // What each broker checks at start, on the settings dev passes it.
        let config = BrokerConfig {
            listen_address: "127.0.0.1".into(),
            flush_mode: self.flush_mode,
            segment_size: self.segment_size,
            replication_mode: self.replication_mode,
            min_in_sync_replicas: self.min_in_sync_replicas,
            auto_create_topics: true,
            ..BrokerConfig::default()
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("the brokers would refuse these settings: {e}"))
    }
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

/// The command line of one broker of the group.
fn broker_args(args: &DevArgs, b: &DevBroker, ports: [u16; 4]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["--data-dir".into(), b.data_dir.clone().into()];
    let flags: [(&str, String); 12] = [
        ("--listen-address", "127.0.0.1".into()),
        ("--broker-name", "keelmq-dev".into()),
        ("--broker-id", b.name.clone()),
        ("--role", "standby".into()),
        ("--client-port", ports[0].to_string()),
        ("--admin-port", ports[1].to_string()),
        ("--http-port", ports[2].to_string()),
        ("--replication-port", ports[3].to_string()),
        (
            "--replication-mode",
            args.replication_mode.to_string().to_lowercase(),
        ),
        (
            "--min-in-sync-replicas",
            args.min_in_sync_replicas.to_string(),
        ),
        ("--flush-mode", args.flush_mode.to_string()),
        ("--segment-size", args.segment_size.to_string()),
    ];
    for (flag, value) in flags {
        v.push(flag.into());
        v.push(value.into());
    }
    v.extend(["--auto-create-topics".into(), "true".into()]);
    v
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
        .args(broker_args(args, b, ports))
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
    args.validate()?;
    crate::telemetry::init(crate::config::LogFormat::Text).map_err(anyhow::Error::msg)?;
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::BrokerArgs;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        dev: DevArgs,
    }

    fn parse(flags: &[&str]) -> Result<DevArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("keelmq-dev").chain(flags.iter().copied()))
            .map(|c| c.dev)
    }

    fn dev(flags: &[&str]) -> DevArgs {
        parse(flags).expect("flags parse")
    }

    #[test]
    fn flush_mode_is_parsed_as_the_brokers_enum() {
        assert_eq!(dev(&[]).flush_mode, FlushMode::AsyncFlush);
        assert_eq!(
            dev(&["--flush-mode", "SYNC_FLUSH"]).flush_mode,
            FlushMode::SyncFlush
        );
        assert_eq!(
            dev(&["--flush-mode", "sync_flush"]).flush_mode,
            FlushMode::SyncFlush
        );
        let err = parse(&["--flush-mode", "sync"]).expect_err("a typo is refused");
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{err}");
    }

    #[test]
    fn segment_size_is_parsed_as_a_byte_size() {
        assert_eq!(dev(&[]).segment_size, ByteSize(64 << 20));
        assert_eq!(
            dev(&["--segment-size", "1GiB"]).segment_size,
            ByteSize(1 << 30)
        );
        let err = parse(&["--segment-size", "64 parsecs"]).expect_err("not a size");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
        // A size, but one the brokers refuse.
        let err = dev(&["--segment-size", "1000"])
            .validate()
            .expect_err("below 64 KiB");
        assert!(err.to_string().contains("segment size 1000"), "{err}");
    }

    #[test]
    fn sync_needs_fewer_in_sync_slaves_than_brokers() {
        dev(&[]).validate().expect("the defaults are valid");
        dev(&["--min-in-sync-replicas", "2"])
            .validate()
            .expect("two slaves of three brokers");
        let err = dev(&["--min-in-sync-replicas", "3"])
            .validate()
            .expect_err("three brokers have two slaves");
        assert!(
            err.to_string().contains("--min-in-sync-replicas 3"),
            "{err}"
        );
        dev(&["--brokers", "1"])
            .validate()
            .expect_err("a lone SYNC broker has no slave");
        dev(&["--brokers", "1", "--replication-mode", "async"])
            .validate()
            .expect("ASYNC needs no slave");
        dev(&["--brokers", "0"]).validate().expect_err("no brokers");
    }

    #[test]
    fn sync_needs_at_least_one_in_sync_slave() {
        let err = dev(&["--min-in-sync-replicas", "0"])
            .validate()
            .expect_err("SYNC with 0 acknowledges like ASYNC and never fails over");
        assert!(
            err.to_string()
                .contains("min_in_sync_replicas of at least 1"),
            "{err}"
        );
        dev(&["--min-in-sync-replicas", "0", "--replication-mode", "async"])
            .validate()
            .expect("ASYNC ignores the count");
    }

    #[test]
    fn the_brokers_accept_the_command_line_dev_gives_them() {
        let args = dev(&[
            "--flush-mode",
            "sync_flush",
            "--segment-size",
            "128MiB",
            "--replication-mode",
            "sync",
            "--min-in-sync-replicas",
            "2",
        ]);
        args.validate().expect("valid");
        let b = DevBroker {
            name: "b1".into(),
            pid: 0,
            client: String::new(),
            admin: String::new(),
            http: String::new(),
            replication: String::new(),
            data_dir: PathBuf::from("/tmp/keelmq-dev-test/b1"),
        };
        let argv = broker_args(&args, &b, [8091, 8092, 8093, 8094]);
        let config = BrokerArgs::try_parse_from(
            std::iter::once(OsString::from("keelmq-broker")).chain(argv),
        )
        .expect("keelmq-broker parses the flags")
        .resolve()
        .expect("and accepts the values");
        assert_eq!(config.flush_mode, FlushMode::SyncFlush);
        assert_eq!(config.segment_size, ByteSize(128 << 20));
        assert_eq!(
            config.replication_mode,
            crate::replication::ReplicationMode::Sync
        );
        assert_eq!(config.min_in_sync_replicas, 2);
        assert_eq!(config.admin_port, 8092);
        assert_eq!(config.broker_id.as_deref(), Some("b1"));
        assert!(config.startup_warnings().is_empty(), "loopback only");
    }
}
