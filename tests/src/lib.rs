//! Shared helpers for the end-to-end tests: real `keelmq-broker` processes
//! on loopback ports, driven with the `keelmq` CLI.

pub mod group;
pub mod rmq;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a binary built from this workspace (`keelmq-broker`, `keelmq`),
/// in the same target profile directory as the running test. The test
/// command's one build (`cargo test --workspace --all-targets --no-run`)
/// makes them before any test runs, so no test ever builds anything.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo test --workspace --no-run` (or `cargo build --workspace --bins`) first",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    free_port_block(1)
}

/// The first of `n` consecutive loopback ports that were all free a moment
/// ago.
///
/// Ports come from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), never from it: a test that restarts a
/// broker on the same ports must not find one taken by some process's
/// outgoing connection in between. Each process starts at its own random
/// point of the range and walks it, so concurrent tests rarely try the same
/// port and one process never hands out a port twice.
pub fn free_port_block(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = non_ephemeral_ports();
    let span = u32::from(high - low);
    let n32 = u32::from(n.max(1));
    assert!(n32 < span, "{n} ports do not fit in {low}..{high}");
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let _ = NEXT.compare_exchange(
            u32::MAX,
            seed.wrapping_mul(2_654_435_761) % span,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(n32, Ordering::Relaxed) % (span - n32);
        let base = low + offset as u16;
        let all_free = (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return base;
        }
    }
    panic!("no {n} consecutive free loopback ports in {low}..{high}");
}

/// The loopback ports tests may use: from 10000 up to the start of the
/// kernel's ephemeral range (to 32768 when it cannot be read).
fn non_ephemeral_ports() -> (u16, u16) {
    const LOW: u16 = 10_000;
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_start > LOW + 2_000 {
        (LOW, ephemeral_start)
    } else {
        // An unusual kernel setting: use the ports above the ephemeral range.
        (61_000, 65_000)
    }
}

/// A `keelmq-broker` process on loopback, killed when dropped.
pub struct BrokerProcess {
    child: Child,
    pub data_dir: PathBuf,
    pub client_port: u16,
    pub admin_port: u16,
    pub http_port: u16,
    pub replication_port: u16,
}

impl BrokerProcess {
    /// Starts a broker on `data_dir` with extra flags and waits until it is ready.
    pub fn start(data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        let ports = (free_port(), free_port(), free_port(), free_port());
        Self::start_on(data_dir, ports, extra)
    }

    /// Starts a broker on given (client, admin, http, replication) ports.
    pub fn start_on(data_dir: &Path, ports: (u16, u16, u16, u16), extra: &[&str]) -> BrokerProcess {
        let (client_port, admin_port, http_port, replication_port) = ports;
        let child = Command::new(workspace_bin("keelmq-broker"))
            .args(["--listen-address", "127.0.0.1"])
            // Small segments, so tests cross segment boundaries with little
            // data; an explicit `--segment-size` in `extra` overrides it.
            .env("KEELMQ_SEGMENT_SIZE", "4MiB")
            // How full the machine's disk is must not delete or refuse data
            // in tests that are about something else.
            .args(["--disk-high-watermark", "1.0", "--disk-full-ratio", "1.0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--client-port",
                &client_port.to_string(),
                "--admin-port",
                &admin_port.to_string(),
            ])
            .args([
                "--http-port",
                &http_port.to_string(),
                "--replication-port",
                &replication_port.to_string(),
            ])
            .args(extra)
            .env(
                "KEELMQ_LOG",
                std::env::var("KEELMQ_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start keelmq-broker");
        let b = BrokerProcess {
            child,
            data_dir: data_dir.to_owned(),
            client_port,
            admin_port,
            http_port,
            replication_port,
        };
        let start = Instant::now();
        while !b.ready() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "broker did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The client endpoint (`127.0.0.1:port`).
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        http_get(self.http_port, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// Runs the `keelmq` CLI against this broker's admin port.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(workspace_bin("keelmq"))
            .args(["--admin", &format!("127.0.0.1:{}", self.admin_port)])
            .args(args)
            .output()
            .expect("run keelmq")
    }

    /// Runs the CLI and insists that it succeeds; returns its output.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "keelmq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI and insists that it fails; returns its error output.
    pub fn cli_fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "keelmq {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "broker exited with {status}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "broker did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no clean-up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback; the whole response, or None.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
