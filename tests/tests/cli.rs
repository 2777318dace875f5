//! The real `keelmq-broker` process driven by the real `keelmq` CLI:
//! topics through the admin API, health endpoints, the load tool, clean
//! shutdown on SIGTERM, and metadata that survives a restart.

use std::process::Command;

use keelmq_tests::{BrokerProcess, free_port, http_get, workspace_bin};

#[test]
fn topics_status_health_and_clean_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    assert!(
        http_get(b.http_port, "/healthz")
            .expect("healthz")
            .starts_with("HTTP/1.1 200")
    );
    let metrics = http_get(b.http_port, "/metrics").expect("metrics");
    for name in [
        "keelmq_commitlog_max_offset",
        "keelmq_commitlog_flushes_total",
        "keelmq_commitlog_flush_seconds_total",
        "keelmq_commitlog_group_commit_appends_total",
        "keelmq_commitlog_zeroed_ahead_bytes_total",
        "keelmq_commitlog_reused_segments_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }

    b.cli_ok(&[
        "topic", "create", "orders", "--queues", "4", "--type", "fifo",
    ]);
    b.cli_ok(&["topic", "create", "events"]);
    let list = b.cli_ok(&["topic", "list"]);
    assert!(list.contains("orders") && list.contains("FIFO"), "{list}");
    assert!(list.contains("events") && list.contains("NORMAL"), "{list}");
    let described = b.cli_ok(&["topic", "describe", "orders"]);
    assert!(described.contains("orders"), "{described}");

    // Clear errors for bad input.
    let err = b.cli_fails(&["topic", "create", "bad name"]);
    assert!(err.contains("topic names are"), "{err}");
    let err = b.cli_fails(&["topic", "create", "orders"]);
    assert!(err.contains("already exists"), "{err}");
    let err = b.cli_fails(&["topic", "update", "orders", "--queues", "2"]);
    assert!(err.contains("cannot be removed"), "{err}");
    let err = b.cli_fails(&["topic", "describe", "nope"]);
    assert!(err.contains("does not exist"), "{err}");
    b.cli_ok(&["topic", "update", "orders", "--queues", "8"]);
    b.cli_ok(&["topic", "delete", "events"]);
    let err = b.cli_fails(&["group", "describe", "nobody"]);
    assert!(err.contains("no committed offsets"), "{err}");

    // The load tool speaks the client protocol: a bounded run both ways.
    b.cli_ok(&["topic", "create", "bench", "--queues", "4"]);
    let client = format!("127.0.0.1:{}", b.client_port);
    let sent = b.cli_ok(&[
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
    // The senders spread over the topic's queues, as clients do.
    assert!(sent.contains("(4 queues)"), "{sent}");
    let described = b.cli_ok(&["topic", "describe", "bench"]);
    let per_queue: Vec<u64> = described
        .lines()
        .filter(|l| l.trim_start().starts_with("queue"))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    assert_eq!(per_queue.len(), 4, "{described}");
    assert_eq!(per_queue.iter().sum::<u64>(), 200, "{described}");
    assert!(per_queue.iter().all(|&n| n > 0), "{described}");
    // A refused send and an endpoint nobody listens on end the run clearly.
    let err = b.cli_fails(&["bench", "send", "--endpoint", &client, "--topic", "nope"]);
    assert!(err.contains("send refused: TOPIC_NOT_FOUND"), "{err}");
    let nobody = format!("127.0.0.1:{}", free_port());
    let err = b.cli_fails(&["bench", "send", "--endpoint", &nobody, "--count", "1"]);
    assert!(err.contains(&format!("connecting to {nobody}")), "{err}");
    // Paced: never more than the rate allows (plus each sender's first), and
    // it does send.
    b.cli_ok(&["topic", "create", "paced", "--queues", "1"]);
    let paced = b.cli_ok(&[
        "bench",
        "send",
        "--topic",
        "paced",
        "--endpoint",
        &client,
        "--concurrency",
        "2",
        "--duration-secs",
        "1",
        "--rate",
        "50",
    ]);
    assert!(paced.contains("rate 50 msg/s"), "{paced}");
    assert!(paced.contains("fell behind their schedule"), "{paced}");
    let paced_count: u64 = paced
        .split_once(" messages in")
        .and_then(|(head, _)| head.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .expect("message count");
    assert!((10..=52).contains(&paced_count), "{paced}");
    let consumed = b.cli_ok(&[
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
    // What the client port counted, and the group's lag, in /metrics.
    let metrics = http_get(b.http_port, "/metrics").expect("metrics");
    for line in [
        r#"keelmq_messages_in_total{topic="bench"} 200"#,
        r#"keelmq_messages_acked_total{group="bench-consumer",topic="bench"} 200"#,
        r#"keelmq_consumer_lag_messages{group="bench-consumer",topic="bench"} 0"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from {metrics}"
        );
    }
    for prefix in [
        r#"keelmq_message_bytes_in_total{topic="bench"} "#,
        r#"keelmq_client_requests_total{method="SendMessage",code="OK"} "#,
        r#"keelmq_client_requests_total{method="ReceiveMessage",code="OK"} "#,
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(prefix)),
            "{prefix} missing from {metrics}"
        );
    }
    assert!(!metrics.contains("%SYS_"), "{metrics}");
    // Consumer groups are listed; the broker's own progress records are not.
    let groups = b.cli_ok(&["group", "list"]);
    assert!(groups.contains("bench-consumer"), "{groups}");
    assert!(!groups.contains("%SYS_"), "{groups}");

    let status = b.cli_ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).expect("status is JSON");
    assert_eq!(v["role"], "master", "{status}");
    assert_eq!(v["epoch"], 1, "{status}");

    b.stop();
    // Topics survive; the store reports the clean shutdown.
    let b = BrokerProcess::start(dir.path(), &[]);
    let list = b.cli_ok(&["topic", "list"]);
    assert!(
        list.contains("orders") && !list.contains("events"),
        "{list}"
    );
    let described = b.cli_ok(&["topic", "describe", "orders"]);
    assert!(described.contains('8'), "queue count kept: {described}");
    b.stop();

    // A second broker on the same data directory is refused clearly.
    let b = BrokerProcess::start(dir.path(), &[]);
    let out = Command::new(workspace_bin("keelmq-broker"))
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
    let out = Command::new(workspace_bin("keelmq-broker"))
        .args(["--segment-size", "12 parsecs"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
}
