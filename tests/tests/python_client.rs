//! The official Apache RocketMQ Python client (PyPI
//! `rocketmq-python-client`, pinned in scripts/requirements.txt and
//! installed into `.venv` by scripts/setup), unchanged, against a real
//! `keelmq-broker` process: NORMAL, FIFO (simple and push consumers) and
//! TRANSACTION with check-back.
//! Each case runs a small script from tests/python/ that prints what it
//! observed as one JSON line; the assertions are here.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keelmq_tests::BrokerProcess;
use serde_json::Value;

/// Longest a script may run before it is killed and the test fails.
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_owned()
}

/// The virtual environment's interpreter. Missing means the machine was
/// not set up: that is a failure, not a skip (CI always runs set-up).
fn python() -> PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run scripts/setup to create the Python environment with the official RocketMQ client",
        py.display()
    );
    py
}

/// Runs tests/python/<script> with `args`; its JSON result.
fn run_script(script: &str, args: &[&str]) -> Value {
    let home = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        // The client writes its log under $HOME/logs; keep it out of the real home.
        .env("HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > SCRIPT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} did not finish within {SCRIPT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    assert!(status.success(), "{script} failed ({status}):\n{err}");
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{script} printed {out:?}: {e}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn normal_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&["topic", "create", "py-normal", "--queues", "4"]);
    let r = run_script(
        "normal.py",
        &[&b.endpoint(), "py-normal", "py-readers", "20"],
    );
    let mut sent = strings(&r["sent"]);
    assert_eq!(sent.len(), 20);
    let received = r["received"].as_array().cloned().unwrap_or_default();
    let mut got: Vec<String> = received
        .iter()
        .map(|m| m[0].as_str().unwrap_or_default().to_owned())
        .collect();
    sent.sort();
    got.sort();
    assert_eq!(got, sent, "every message received once, with its id");
    for m in &received {
        assert!(m[1].as_str().unwrap_or_default().starts_with("normal "));
    }
}

#[test]
fn fifo_messages_keep_group_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&[
        "topic", "create", "py-fifo", "--queues", "4", "--type", "FIFO",
    ]);
    let r = run_script(
        "fifo.py",
        &[&b.endpoint(), "py-fifo", "py-fifo-readers", "5"],
    );
    let received = r["received"].as_array().cloned().unwrap_or_default();
    assert_eq!(received.len(), 15);
    for g in ["alpha", "beta", "gamma"] {
        let seq: Vec<String> = received
            .iter()
            .filter(|m| m[1] == g)
            .map(|m| m[0].as_str().unwrap_or_default().to_owned())
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("{g} {i}")).collect();
        assert_eq!(seq, want, "group {g} in order, each once");
    }
}

/// The PushConsumer learns from the settings the broker sends back whether
/// a subscription is FIFO; told so, it handles each message group one
/// message at a time and retries a failed message before the next one.
#[test]
fn fifo_push_consumer_retries_a_failed_message_before_the_next_of_its_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&[
        "topic",
        "create",
        "py-fifo-push",
        "--queues",
        "2",
        "--type",
        "FIFO",
    ]);
    let r = run_script(
        "fifo_push.py",
        &[&b.endpoint(), "py-fifo-push", "py-fifo-pushers", "4"],
    );
    let calls = r["calls"].as_array().cloned().unwrap_or_default();
    for g in ["alpha", "beta", "gamma"] {
        let seq: Vec<String> = calls
            .iter()
            .filter(|m| m[1] == g)
            .map(|m| m[0].as_str().unwrap_or_default().to_owned())
            .collect();
        let mut want: Vec<String> = (0..4).map(|i| format!("{g} {i}")).collect();
        if g == "alpha" {
            // The failed call of "alpha 1" is retried before "alpha 2".
            want.insert(2, "alpha 1".into());
        }
        assert_eq!(seq, want, "calls for group {g}");
    }
}

#[test]
fn transactions_commit_rollback_and_check_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(
        dir.path(),
        &[
            "--transaction-check-first-ms",
            "1000",
            "--transaction-check-interval-ms",
            "1000",
        ],
    );
    b.cli_ok(&[
        "topic",
        "create",
        "py-tx",
        "--queues",
        "2",
        "--type",
        "TRANSACTION",
    ]);
    let r = run_script("transaction.py", &[&b.endpoint(), "py-tx", "py-tx-readers"]);
    assert!(
        strings(&r["early"]).is_empty(),
        "a half message was visible"
    );
    assert_eq!(
        strings(&r["received"]),
        vec!["commit when asked", "explicit commit"],
        "committed (by the producer or its checker) and nothing else"
    );
    let asked = strings(&r["asked"]);
    for open in ["commit when asked", "rollback when asked"] {
        assert!(
            asked.iter().any(|a| a == open),
            "{open} was checked back: {asked:?}"
        );
    }
}
