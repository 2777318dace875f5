//! Replication benchmarks (not tests: they print figures and assert nothing).
//!
//! * Send throughput and latency, 1 KiB messages, 64 concurrent senders
//!   (`keelmq bench send`), for a lone master, a master with two ASYNC
//!   slaves, and a master with two SYNC slaves (one must confirm).
//! * Receive throughput of a SYNC group with slave reads off and forced on.
//! * Failover time of the local group (`keelmq dev`): from SIGKILL of the
//!   master to the first send acknowledged by the new master, over 10 runs.
//!
//! Build the binaries first, in the profile the bench runs in:
//! `cargo build --release --bins && cargo bench -p keelmq-tests --bench group`.
//! `KEELMQ_BENCH_SECONDS` (default 10) sets each throughput run's length,
//! `KEELMQ_BENCH_ONLY=throughput|failover|slave_reads` runs one part,
//! `KEELMQ_BENCH_READS` (default 20000) the messages of the read part,
//! `KEELMQ_BENCH_FAILOVERS` (default 10) the number of failovers.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelmq_broker::cli::dev::read_group;
use keelmq_failover::ReplicationMode;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;
use keelmq_proto::admin::{Role, StatusRequest};
use keelmq_tests::group::LocalGroup;
use keelmq_tests::rmq::RawClient;
use keelmq_tests::{BrokerProcess, free_port_block, workspace_bin};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_send(endpoint: &str, seconds: u64) -> String {
    keelmq_bench(&[
        "send",
        "--endpoint",
        endpoint,
        "--concurrency",
        "64",
        "--size",
        "1024",
        "--duration-secs",
        &seconds.to_string(),
    ])
}

/// Runs `keelmq bench <args>` on topic `bench`; its report.
fn keelmq_bench(args: &[&str]) -> String {
    let out = Command::new(workspace_bin("keelmq"))
        .arg("bench")
        .args(args)
        .args(["--topic", "bench"])
        .output()
        .expect("run keelmq bench");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Consumer throughput of a SYNC group with slave reads off and forced on:
/// `count` 1 KiB messages are sent, then received and acked by 8 receivers.
async fn slave_reads(count: u64) {
    println!(
        "== receive throughput: {count} messages of 1 KiB, 8 receivers, batch 32, SYNC group of 3"
    );
    for mode in ["off", "always"] {
        let mut g = LocalGroup::start(
            3,
            ReplicationMode::Sync,
            Duration::from_secs(5),
            &["--slave-read", mode],
        )
        .await;
        let m = g.master().expect("master");
        let ep = g.members[m].client_endpoint();
        let n = count.to_string();
        let out = tokio::task::spawn_blocking(move || {
            let send = keelmq_bench(&[
                "send",
                "--endpoint",
                &ep,
                "--concurrency",
                "64",
                "--size",
                "1024",
                "--count",
                &n,
                "--duration-secs",
                "120",
            ]);
            let consume = keelmq_bench(&[
                "consume",
                "--endpoint",
                &ep,
                "--concurrency",
                "8",
                "--count",
                &n,
                "--duration-secs",
                "120",
            ]);
            (send, consume)
        })
        .await
        .expect("bench");
        let st = g.status(m).await.expect("master status");
        println!("-- slave_read = {mode}");
        print!("{}", out.1);
        println!(
            "  master: {} records read from slaves, {} read locally instead",
            st.records_read_from_slaves, st.slave_read_fallbacks
        );
        g.shutdown();
    }
}

async fn throughput(seconds: u64) {
    println!("== send throughput: 1 KiB messages, 64 senders, {seconds} s per run, ASYNC_FLUSH");
    {
        let dir = tempfile::tempdir().expect("tempdir");
        // The same segment size as the local group's brokers (`keelmq dev`).
        let b = BrokerProcess::start(
            dir.path(),
            &["--auto-create-topics", "true", "--segment-size", "64MiB"],
        );
        println!("-- no slaves (one master)");
        print!("{}", bench_send(&b.endpoint(), seconds));
        b.stop();
    }
    for (name, mode) in [
        ("ASYNC replication, two slaves", ReplicationMode::Async),
        (
            "SYNC replication, two slaves (1 must confirm)",
            ReplicationMode::Sync,
        ),
    ] {
        let mut g = LocalGroup::start(3, mode, Duration::from_secs(5), &[]).await;
        let m = g.master().expect("master");
        println!("-- {name}");
        let ep = g.members[m].client_endpoint();
        let out = tokio::task::spawn_blocking(move || bench_send(&ep, seconds))
            .await
            .expect("bench");
        print!("{out}");
        g.shutdown();
    }
}

async fn role_of(admin: &str) -> Option<(Role, u64)> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{admin}"))
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let st = BrokerAdminClient::new(ch)
        .status(StatusRequest {})
        .await
        .ok()?
        .into_inner();
    Some((Role::try_from(st.role).ok()?, st.epoch))
}

/// Waits until one member is master and the others answer; its index.
async fn settled(dir: &std::path::Path) -> usize {
    let start = Instant::now();
    loop {
        let Some(group) = read_group(dir) else {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "keelmq dev did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut master = None;
        let mut answering = 0;
        for (i, b) in group.iter().enumerate() {
            if let Some((role, _)) = role_of(&b.admin).await {
                answering += 1;
                if role == Role::Master {
                    master = Some(i);
                }
            }
        }
        if let (Some(m), 3) = (master, answering) {
            // Every slave must be connected to it before the next kill.
            let mut c = RawClient::new(&group[m].client);
            if c.send("bench", 0, vec![b'x'; 1024], Default::default())
                .await
                .is_ok()
            {
                return m;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "group never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn failover(runs: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = free_port_block(24);
    let mut dev = Command::new(workspace_bin("keelmq"))
        .args(["dev", "--base-port", &base.to_string()])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keelmq dev");
    println!(
        "== failover time of `keelmq dev` (3 brokers, SYNC replication, ASYNC_FLUSH): \
         SIGKILL of the master to the first send acknowledged by the new master"
    );
    let mut times = Vec::new();
    for run in 0..runs {
        let m = settled(dir.path()).await;
        let group = read_group(dir.path()).expect("group.json");
        let clients: Vec<RawClient> = group.iter().map(|b| RawClient::new(&b.client)).collect();
        let killed = Instant::now();
        // SAFETY: signalling a broker process of the local group we started.
        unsafe { libc::kill(group[m].pid as libc::pid_t, libc::SIGKILL) };
        let took = loop {
            let mut done = None;
            for (i, c) in clients.iter().enumerate() {
                if i == m {
                    continue;
                }
                let mut c = c.clone();
                let send = c.send("bench", 0, vec![b'y'; 1024], Default::default());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), send).await {
                    done = Some(killed.elapsed());
                    break;
                }
            }
            if let Some(d) = done {
                break d;
            }
            assert!(killed.elapsed() < Duration::from_secs(60), "no new master");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "   run {:>2}: killed {} -> writable again after {:>6.0} ms",
            run + 1,
            group[m].name,
            took.as_secs_f64() * 1000.0
        );
        times.push(took);
    }
    times.sort();
    let median = times[times.len() / 2];
    let max = times[times.len() - 1];
    println!(
        "failover: median {:.0} ms, max {:.0} ms over {} runs",
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        times.len()
    );
    // SAFETY: stopping the local group we started.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    let _ = dev.wait();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("KEELMQ_BENCH_ONLY").unwrap_or_default();
    // `cargo bench` passes --bench; nothing else is accepted.
    rt.block_on(async {
        if only.is_empty() || only == "throughput" {
            throughput(env_u64("KEELMQ_BENCH_SECONDS", 10)).await;
        }
        if only.is_empty() || only == "failover" {
            failover(env_u64("KEELMQ_BENCH_FAILOVERS", 10)).await;
        }
        if only.is_empty() || only == "slave_reads" {
            slave_reads(env_u64("KEELMQ_BENCH_READS", 20_000)).await;
        }
    });
}
