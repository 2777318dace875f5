//! A broker group of real `keelmq-broker` processes on loopback with the
//! project's [`Supervisor`] running in the test process: what `keelmq dev`
//! runs, with the processes in the test's hands so it can kill, stop, wipe
//! and restart them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keelmq_broker::supervisor::{Member, Supervisor};
use keelmq_failover::{Policy, ReplicationMode};
use keelmq_proto::admin::StatusResponse;
use keelmq_proto::admin::broker_admin_client::BrokerAdminClient;

use crate::rmq::RawClient;
use crate::{BrokerProcess, free_port};

/// One member: its ports and data directory survive restarts.
pub struct GroupMember {
    pub name: String,
    pub ports: (u16, u16, u16, u16),
    pub data_dir: PathBuf,
    pub process: Option<BrokerProcess>,
}

impl GroupMember {
    pub fn client_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.ports.0)
    }
    pub fn admin_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.ports.1)
    }
}

/// Brokers plus a supervisor.
pub struct LocalGroup {
    _dir: tempfile::TempDir,
    pub members: Vec<GroupMember>,
    pub supervisor: Arc<Supervisor>,
    extra: Vec<String>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl LocalGroup {
    /// Starts `n` standby brokers with `mode` replication (one slave must
    /// confirm under SYNC) and a supervisor with `detection` as detection
    /// delay; returns once a master serves and every slave follows it.
    pub async fn start(
        n: usize,
        mode: ReplicationMode,
        detection: Duration,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.extend(
            [
                "--role",
                "standby",
                "--replication-mode",
                match mode {
                    ReplicationMode::Sync => "sync",
                    ReplicationMode::Async => "async",
                },
                "--min-in-sync-replicas",
                "1",
                "--auto-create-topics",
                "true",
            ]
            .map(String::from),
        );
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("b{i}");
            let ports = (free_port(), free_port(), free_port(), free_port());
            members.push(GroupMember {
                data_dir: dir.path().join(&name),
                name,
                ports,
                process: None,
            });
        }
        let policy = Policy {
            mode,
            min_in_sync_replicas: 1,
            replicas: n as u32,
            enabled: true,
            detection_delay: detection,
            allow_data_loss: false,
        };
        let supervisor = Supervisor::new(
            members
                .iter()
                .map(|m| Member {
                    name: m.name.clone(),
                    admin: m.admin_endpoint(),
                    replication: format!("127.0.0.1:{}", m.ports.3),
                })
                .collect(),
            policy,
            None,
        )
        .expect("supervisor");
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut g = LocalGroup {
            _dir: dir,
            members,
            supervisor,
            extra,
            stop,
        };
        for i in 0..n {
            g.restart(i).await;
        }
        let sup = g.supervisor.clone();
        tokio::spawn(async move {
            let mut rx = rx;
            sup.run(Duration::from_millis(100), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        });
        g.wait_healthy(Duration::from_secs(30)).await;
        g
    }

    /// Index of the member the supervisor records as master.
    pub fn master(&self) -> Option<usize> {
        let name = self.supervisor.record().master?;
        self.members.iter().position(|m| m.name == name)
    }

    /// Waits until the recorded master serves as master, writable, and
    /// every running member reports following it; returns the master.
    pub async fn wait_healthy(&self, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(m) = self.master()
                && let Some(st) = self.status(m).await
                && st.role == keelmq_proto::admin::Role::Master as i32
                && st.writable
            {
                let repl = format!("127.0.0.1:{}", self.members[m].ports.3);
                let mut all = true;
                for (i, mem) in self.members.iter().enumerate() {
                    if i == m || mem.process.is_none() {
                        continue;
                    }
                    match self.status(i).await {
                        Some(s)
                            if s.master_address == repl
                                && s.role == keelmq_proto::admin::Role::Slave as i32 => {}
                        _ => all = false,
                    }
                }
                if all {
                    return m;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "group not healthy within {timeout:?}; record {:?}",
                self.supervisor.record()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a member other than `old` is recorded master and serves.
    pub async fn wait_new_master(&self, old: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            if let Some(m) = self.master()
                && m != old
                && let Some(st) = self.status(m).await
                && st.role == keelmq_proto::admin::Role::Master as i32
                && st.writable
            {
                return m;
            }
            assert!(
                start.elapsed() < timeout,
                "no new master within {timeout:?}; record {:?}",
                self.supervisor.record()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A member's admin status, or None when it does not answer.
    pub async fn status(&self, i: usize) -> Option<StatusResponse> {
        let ep = tonic::transport::Endpoint::from_shared(format!(
            "http://{}",
            self.members[i].admin_endpoint()
        ))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2));
        let ch = ep.connect().await.ok()?;
        BrokerAdminClient::new(ch)
            .status(keelmq_proto::admin::StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// A client of member `i`'s client port.
    pub fn client(&self, i: usize) -> RawClient {
        RawClient::new(&self.members[i].client_endpoint())
    }

    /// SIGKILL member `i` and tell the supervisor its process is gone (as
    /// `keelmq dev` does when a child exits).
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.members[i].process.take() {
            p.kill();
        }
        self.supervisor.set_gone(&self.members[i].name, true);
    }

    /// SIGKILL member `i` without telling the supervisor: it has to notice.
    pub fn kill_silently(&mut self, i: usize) {
        if let Some(p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Sends a signal (SIGSTOP, SIGCONT) to member `i`. A SIGSTOP returns
    /// only once every thread of the member has stopped: `kill` returns
    /// when the signal is queued, and the process's other threads keep
    /// running until the thread chosen to take it is scheduled, which on a
    /// loaded machine can be milliseconds later.
    pub fn signal(&self, i: usize, sig: libc::c_int) {
        let Some(p) = &self.members[i].process else {
            return;
        };
        // SAFETY: signalling a child process this test started.
        let rc = unsafe { libc::kill(p.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", p.pid());
        if sig == libc::SIGSTOP {
            let start = Instant::now();
            while !all_threads_stopped(p.pid()) {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "member {i} (pid {}) did not stop",
                    p.pid()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Deletes member `i`'s data directory (it must not be running).
    pub fn wipe(&self, i: usize) {
        assert!(self.members[i].process.is_none(), "wipe a stopped member");
        let _ = std::fs::remove_dir_all(&self.members[i].data_dir);
    }

    /// (Re)starts member `i` on its ports and data directory, in standby.
    pub async fn restart(&mut self, i: usize) {
        let (dir, ports, extra) = (
            self.members[i].data_dir.clone(),
            self.members[i].ports,
            self.extra.clone(),
        );
        let name = self.members[i].name.clone();
        let p = tokio::task::spawn_blocking(move || {
            let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
            args.extend(["--broker-id", &name]);
            BrokerProcess::start_on(&dir, ports, &args)
        })
        .await
        .expect("start broker");
        self.members[i].process = Some(p);
        self.supervisor.set_gone(&self.members[i].name, false);
    }

    /// Stops every broker (SIGTERM) and the supervisor.
    pub fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for m in &mut self.members {
            if let Some(p) = m.process.take() {
                p.stop();
            }
        }
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The commit log of a data directory from offset 0 up to `end`, read from
/// its segment files (named by base offset), for byte comparisons.
pub fn commit_log_bytes(data_dir: &Path, end: u64) -> Vec<u8> {
    let dir = data_dir.join("commitlog");
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .expect("commitlog dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.len() == 20)
                .then(|| name.parse::<u64>().ok())
                .flatten()
                .map(|base| (base, e.path()))
        })
        .collect();
    segments.sort();
    let mut out = Vec::with_capacity(end as usize);
    for (i, (base, path)) in segments.iter().enumerate() {
        if *base >= end {
            break;
        }
        let next = segments.get(i + 1).map_or(u64::MAX, |s| s.0);
        let want = (end.min(next) - base) as usize;
        let bytes = std::fs::read(path).expect("segment");
        assert!(
            out.len() as u64 == *base,
            "segments do not start at 0 or leave a gap at {base}"
        );
        out.extend_from_slice(&bytes[..want.min(bytes.len())]);
    }
    out
}

/// Whether every thread of process `pid` is stopped (state `T` in
/// `/proc/<pid>/task/<tid>/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // "tid (comm) S ...": the state follows the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                == Some('T')
        })
    })
}
