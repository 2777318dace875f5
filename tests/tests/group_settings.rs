//! Per-group retry settings against a real broker: set through the `keelmq`
//! CLI, sent to consumers in the Settings reply, applied to dead-lettering,
//! and kept across a restart.

use std::collections::HashMap;
use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use keelmq_tests::BrokerProcess;
use keelmq_tests::rmq::RawClient;

const POLL: Duration = Duration::from_secs(2);
const INVISIBLE: Duration = Duration::from_secs(30);

/// Receives the one message of `topic` for `group`, expecting the given
/// delivery attempt.
async fn receive_one(
    c: &mut RawClient,
    group: &str,
    topic: &str,
    attempt: i32,
) -> keelmq_tests::rmq::Received {
    let got = c
        .receive(group, topic, 1, INVISIBLE, POLL)
        .await
        .expect("receive");
    assert_eq!(got.len(), 1, "{group}: one message, attempt {attempt}");
    assert_eq!(got[0].attempt, attempt, "{group}");
    got.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_settings_reach_its_consumers_and_decide_its_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = BrokerProcess::start(dir.path(), &[]);
    b.cli_ok(&["topic", "create", "jobs", "--queues", "1"]);
    let out = b.cli_ok(&[
        "group",
        "set",
        "strict",
        "--max-delivery-attempts",
        "2",
        "--backoff",
        "exponential:100ms,1m,2",
    ]);
    assert!(out.contains("max delivery attempts 2"), "{out}");

    // Consumers get their own group's policy; other groups the defaults.
    let mut c = RawClient::new(&b.endpoint());
    let strict = c
        .consumer_retry_policy("strict", "jobs")
        .await
        .expect("settings");
    assert_eq!(strict.max_attempts, 2);
    match strict.strategy {
        Some(pb::retry_policy::Strategy::ExponentialBackoff(e)) => {
            assert_eq!(
                e.initial.map(|d| (d.seconds, d.nanos)),
                Some((0, 100_000_000))
            );
            assert_eq!(e.max.map(|d| d.seconds), Some(60));
            assert_eq!(e.multiplier, 2.0);
        }
        other => panic!("exponential back-off expected, got {other:?}"),
    }
    let lenient = c
        .consumer_retry_policy("lenient", "jobs")
        .await
        .expect("settings");
    assert_eq!(lenient.max_attempts, 17);
    match lenient.strategy {
        Some(pb::retry_policy::Strategy::CustomizedBackoff(cb)) => {
            assert_eq!(cb.next.len(), 18);
            assert_eq!(cb.next[0].seconds, 1);
        }
        other => panic!("the default customized back-off expected, got {other:?}"),
    }

    // The message fails twice in both groups: "strict" dead-letters it after
    // its second delivery, "lenient" delivers it a third time.
    c.send("jobs", 0, b"work".to_vec(), HashMap::new())
        .await
        .expect("send");
    for group in ["strict", "lenient"] {
        for attempt in 1..=2 {
            let m = receive_one(&mut c, group, "jobs", attempt).await;
            c.nack(group, "jobs", &m, Duration::ZERO)
                .await
                .expect("nack");
        }
    }
    let third = c
        .receive("strict", "jobs", 1, INVISIBLE, POLL)
        .await
        .expect("receive");
    assert!(
        third.is_empty(),
        "strict gave up after 2 attempts: {third:?}"
    );
    let dead = c
        .receive("dlq-reader", "%DLQ%strict", 1, INVISIBLE, POLL)
        .await
        .expect("receive the dead letter");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body, b"work");
    let m = receive_one(&mut c, "lenient", "jobs", 3).await;
    assert!(
        c.ack("lenient", "jobs", &[m])
            .await
            .expect("ack")
            .is_empty()
    );

    // Bad settings are refused with the reason; nothing changes.
    for (args, why) in [
        (&["--backoff", "0ms"][..], "step of 0 ms"),
        (&["--backoff", "5x"][..], "unknown unit"),
        (
            &["--backoff", "exponential:1s,1m"][..],
            "exponential:INITIAL,MAX,MULTIPLIER",
        ),
        (
            &["--backoff", "exponential:1m,1s,2"][..],
            "the first no larger",
        ),
        (&["--max-delivery-attempts", "0"][..], "0"),
        (&["--max-delivery-attempts", "1001"][..], "1 to 1000"),
    ] {
        let err = b.cli_fails(&[&["group", "set", "strict"][..], args].concat());
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let err = b.cli_fails(&["group", "set", "%SYS_DELIVERY%"]);
    assert!(err.contains("broker's own"), "{err}");
    // A group with settings is listed before it consumes anything.
    b.cli_ok(&["group", "set", "idle", "--backoff", "1s"]);
    let listed = b.cli_ok(&["group", "list"]);
    assert!(
        listed.contains("idle") && listed.contains("strict"),
        "{listed}"
    );

    // Settings survive a restart; a reset goes back to the defaults.
    b.stop();
    let b = BrokerProcess::start(dir.path(), &[]);
    let described = b.cli_ok(&["group", "describe", "strict"]);
    assert!(
        described.contains("max delivery attempts 2\n"),
        "{described}"
    );
    assert!(
        described.contains("retry back-off exponential:100ms,1m,2"),
        "{described}"
    );
    b.cli_ok(&["group", "reset", "strict"]);
    let described = b.cli_ok(&["group", "describe", "strict"]);
    assert!(
        described.contains("max delivery attempts 17 (defaults)"),
        "{described}"
    );
    assert!(
        described.contains("retry back-off 1s,5s,10s,30s,1m,2m"),
        "{described}"
    );
    let err = b.cli_fails(&["group", "reset", "strict"]);
    assert!(err.contains("has no settings"), "{err}");
    b.stop();
}
