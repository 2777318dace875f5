//! `keelmq dev`, the README's "run it" command, as a user runs it: three
//! broker processes and a supervisor; kill -9 the master, a slave takes over,
//! the killed broker is restarted and follows; Ctrl-C (SIGTERM) stops all.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelmq_tests::rmq::RawClient;
use keelmq_tests::{free_port_block, workspace_bin};

use keelmq_broker::cli::dev::{DevBroker, read_group as group};

fn status_json(admin: &str) -> Option<serde_json::Value> {
    let out = Command::new(workspace_bin("keelmq"))
        .args(["--admin", admin, "status", "--json"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// The member that answers a send, trying each (slaves refuse).
async fn writable(brokers: &[DevBroker], except: Option<&str>) -> Option<String> {
    for b in brokers {
        if Some(b.name.as_str()) == except {
            continue;
        }
        let mut c = RawClient::new(&b.client);
        let send = c.send("demo", 0, b"hello".to_vec(), Default::default());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), send).await {
            return Some(b.name.clone());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keelmq_dev_runs_a_group_that_survives_losing_its_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Consecutive ports from a base that were free a moment ago.
    let base = free_port_block(24);
    let mut dev = Command::new(workspace_bin("keelmq"))
        .args([
            "dev",
            "--base-port",
            &base.to_string(),
            "--segment-size",
            "4MiB",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start keelmq dev");

    let start = Instant::now();
    let (brokers, master) = loop {
        if let Some(b) = group(dir.path())
            && let Some(m) = writable(&b, None).await
        {
            break (b, m);
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no writable master"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(brokers.len(), 3);
    let old = brokers
        .iter()
        .find(|b| b.name == master)
        .expect("master")
        .clone();
    let st = status_json(&old.admin).expect("status");
    assert_eq!(st["role"], "master", "{st}");

    // SIGKILL the master: another member becomes writable.
    // SAFETY: signalling a broker process of the group this test started.
    unsafe { libc::kill(old.pid as libc::pid_t, libc::SIGKILL) };
    let killed = Instant::now();
    let new = loop {
        if let Some(m) = writable(&brokers, Some(&old.name)).await {
            break m;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(new, old.name);

    // The killed broker is restarted (new pid) and follows the new master.
    let start = Instant::now();
    loop {
        let restarted = group(dir.path())
            .and_then(|g| g.into_iter().find(|b| b.name == old.name))
            .filter(|b| b.pid != old.pid);
        if restarted.is_some()
            && let Some(st) = status_json(&old.admin)
            && st["role"] == "slave"
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "killed broker did not come back as a slave"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGTERM stops the supervisor and every broker.
    let pids: Vec<u32> = group(dir.path())
        .expect("group")
        .iter()
        .map(|b| b.pid)
        .collect();
    // SAFETY: signalling the keelmq dev process this test started.
    unsafe { libc::kill(dev.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = dev.try_wait() {
            assert!(status.success(), "keelmq dev exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "keelmq dev did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in pids {
        assert!(
            !alive(pid),
            "broker {pid} still running after keelmq dev stopped"
        );
    }
    let mut banner = String::new();
    use std::io::Read;
    dev.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut banner)
        .expect("banner");
    assert!(banner.contains("KeelMQ local group: 3 brokers"), "{banner}");
}
