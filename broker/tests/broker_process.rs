//! The real `keelmq-broker` process driven by the real `keelmq` CLI:
//! topics through the admin API, health endpoints, clean shutdown on
//! SIGTERM, and metadata that survives a restart.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Broker {
    child: Child,
    admin: String,
    http: u16,
    client_port: u16,
}

impl Broker {
    fn start(dir: &Path) -> Broker {
        let (admin, http, repl, client) = (free_port(), free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_keelmq-broker"))
            .args(["--listen-address", "127.0.0.1", "--segment-size", "1MiB"])
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--admin-port",
                &admin.to_string(),
                "--http-port",
                &http.to_string(),
            ])
            .args([
                "--replication-port",
                &repl.to_string(),
                "--client-port",
                &client.to_string(),
            ])
            .env("KEELMQ_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start keelmq-broker");
        let b = Broker {
            child,
            admin: format!("127.0.0.1:{admin}"),
            http,
            client_port: client,
        };
        let start = Instant::now();
        while http_get(b.http, "/readyz").is_none_or(|r| !r.starts_with("HTTP/1.1 200")) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "broker did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_keelmq"))
            .args(["--admin", &self.admin])
            .args(args)
            .output()
            .expect("run keelmq")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "keelmq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "keelmq {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) -> String {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(status.success(), "broker exited with {status}: {err}");
                return err;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "broker did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
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

#[test]
fn topics_status_health_and_clean_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = Broker::start(dir.path());
    assert!(
        http_get(b.http, "/healthz")
            .expect("healthz")
            .starts_with("HTTP/1.1 200")
    );
    let metrics = http_get(b.http, "/metrics").expect("metrics");
    assert!(metrics.contains("keelmq_commitlog_max_offset"), "{metrics}");

    b.ok(&[
        "topic", "create", "orders", "--queues", "4", "--type", "fifo",
    ]);
    b.ok(&["topic", "create", "events"]);
    let list = b.ok(&["topic", "list"]);
    assert!(list.contains("orders") && list.contains("FIFO"), "{list}");
    assert!(list.contains("events") && list.contains("NORMAL"), "{list}");
    let described = b.ok(&["topic", "describe", "orders"]);
    assert!(described.contains("orders"), "{described}");

    // Clear errors for bad input.
    let err = b.fails(&["topic", "create", "bad name"]);
    assert!(err.contains("topic names are"), "{err}");
    let err = b.fails(&["topic", "create", "orders"]);
    assert!(err.contains("already exists"), "{err}");
    let err = b.fails(&["topic", "update", "orders", "--queues", "2"]);
    assert!(err.contains("cannot be removed"), "{err}");
    let err = b.fails(&["topic", "describe", "nope"]);
    assert!(err.contains("does not exist"), "{err}");
    b.ok(&["topic", "update", "orders", "--queues", "8"]);
    b.ok(&["topic", "delete", "events"]);
    let err = b.fails(&["group", "describe", "nobody"]);
    assert!(err.contains("no committed offsets"), "{err}");

    // The load tool speaks the client protocol: a bounded run both ways.
    b.ok(&["topic", "create", "bench", "--queues", "4"]);
    let client = format!("127.0.0.1:{}", b.client_port);
    let sent = b.ok(&[
        "bench",
        "send",
        "--endpoint",
        &client,
        "--concurrency",
        "4",
        "--count",
        "200",
        "--batch",
        "4",
    ]);
    assert!(sent.contains("200 messages"), "{sent}");
    assert!(sent.contains("p99"), "{sent}");
    let consumed = b.ok(&[
        "bench",
        "consume",
        "--endpoint",
        &client,
        "--concurrency",
        "2",
        "--count",
        "200",
    ]);
    assert!(consumed.contains("200 messages"), "{consumed}");

    let status = b.ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    assert_eq!(v["role"], "master", "{status}");
    assert_eq!(v["epoch"], 1, "{status}");

    b.stop();
    // Topics survive; the store reports the clean shutdown.
    let b = Broker::start(dir.path());
    let list = b.ok(&["topic", "list"]);
    assert!(
        list.contains("orders") && !list.contains("events"),
        "{list}"
    );
    let described = b.ok(&["topic", "describe", "orders"]);
    assert!(described.contains('8'), "queue count kept: {described}");
    b.stop();

    // A second broker on the same data directory is refused clearly.
    let b = Broker::start(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_keelmq-broker"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen-address",
            "127.0.0.1",
            "--admin-port",
            "0",
            "--http-port",
            "0",
        ])
        .args([
            "--replication-port",
            "0",
            "--client-port",
            &free_port().to_string(),
        ])
        .output()
        .expect("second broker");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    b.stop();
}

#[test]
fn bad_configuration_exits_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_keelmq-broker"))
        .args(["--segment-size", "12 parsecs"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
}
