//! The Settings reply on the Telemetry stream. Clients wait for it before
//! they start; the server owns the retry policy, body limit and consumer
//! batch and polling settings, with RocketMQ's defaults.

use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use pb::Code;

use super::status;
use crate::store::group_config::{GroupConfig, RetryBackoff};

fn ms(millis: u64) -> prost_types::Duration {
    d(0, millis)
}

fn d(secs: u64, millis: u64) -> prost_types::Duration {
    let dur = Duration::from_secs(secs) + Duration::from_millis(millis);
    prost_types::Duration {
        seconds: dur.as_secs() as i64,
        nanos: dur.subsec_nanos() as i32,
    }
}

/// A consumer group's retry policy as consumers receive it.
fn retry_policy(group: &GroupConfig) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: group.max_delivery_attempts as i32,
        strategy: Some(match &group.retry_backoff {
            RetryBackoff::Customized { steps_ms } => {
                pb::retry_policy::Strategy::CustomizedBackoff(pb::CustomizedBackoff {
                    next: steps_ms.iter().map(|&s| ms(s)).collect(),
                })
            }
            RetryBackoff::Exponential {
                initial_ms,
                max_ms,
                multiplier,
            } => pb::retry_policy::Strategy::ExponentialBackoff(pb::ExponentialBackoff {
                initial: Some(ms(*initial_ms)),
                max: Some(ms(*max_ms)),
                multiplier: *multiplier as f32,
            }),
        }),
    }
}

/// The client's settings with the server-owned fields filled in; a
/// consumer gets its group's retry policy from `group_settings`, and is
/// told to consume in order when `is_fifo` says a topic it subscribes to is
/// FIFO (the broker hands out such a queue in order; a push consumer must
/// then also process it in order, not on many threads at once).
pub fn reply(
    mut s: pb::Settings,
    group_settings: impl Fn(&str) -> GroupConfig,
    is_fifo: impl Fn(&str) -> bool,
) -> pb::TelemetryCommand {
    match s.pub_sub.as_mut() {
        Some(pb::settings::PubSub::Publishing(p)) => {
            p.max_body_size = 4 << 20;
            p.validate_message_type = true;
            s.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: 3,
                strategy: Some(pb::retry_policy::Strategy::ExponentialBackoff(
                    pb::ExponentialBackoff {
                        initial: Some(d(0, 10)),
                        max: Some(d(1, 0)),
                        multiplier: 2.0,
                    },
                )),
            });
        }
        Some(pb::settings::PubSub::Subscription(sub)) => {
            sub.receive_batch_size = Some(32);
            sub.long_polling_timeout = Some(d(20, 0));
            sub.fifo = Some(
                sub.subscriptions
                    .iter()
                    .any(|e| e.topic.as_ref().is_some_and(|t| is_fifo(&t.name))),
            );
            let group = sub.group.as_ref().map_or("", |g| g.name.as_str());
            s.backoff_policy = Some(retry_policy(&group_settings(group)));
        }
        None => {
            return pb::TelemetryCommand {
                status: Some(status(
                    Code::BadRequest,
                    "settings must say whether the client publishes or subscribes",
                )),
                command: None,
            };
        }
    }
    s.metric = Some(pb::Metric {
        on: false,
        endpoints: None,
    });
    pb::TelemetryCommand {
        status: Some(status(Code::Ok, "OK")),
        command: Some(pb::telemetry_command::Command::Settings(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(topics: &[&str], fifo: Option<bool>) -> pb::Settings {
        pb::Settings {
            pub_sub: Some(pb::settings::PubSub::Subscription(pb::Subscription {
                group: Some(pb::Resource {
                    resource_namespace: String::new(),
                    name: "g".into(),
                }),
                subscriptions: topics
                    .iter()
                    .map(|t| pb::SubscriptionEntry {
                        topic: Some(pb::Resource {
                            resource_namespace: String::new(),
                            name: (*t).into(),
                        }),
                        expression: None,
                    })
                    .collect(),
                fifo,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn fifo_in_reply(s: pb::Settings) -> Option<bool> {
        let reply = reply(s, GroupConfig::defaults, |t| t.starts_with("ordered"));
        match reply.command {
            Some(pb::telemetry_command::Command::Settings(pb::Settings {
                pub_sub: Some(pb::settings::PubSub::Subscription(sub)),
                ..
            })) => sub.fifo,
            other => panic!("not a subscription: {other:?}"),
        }
    }

    #[test]
    fn a_consumer_of_a_fifo_topic_is_told_to_consume_in_order() {
        // Python and Java push consumers never set fifo themselves.
        assert_eq!(fifo_in_reply(subscription(&["ordered"], None)), Some(true));
        assert_eq!(
            fifo_in_reply(subscription(&["plain", "ordered-2"], Some(false))),
            Some(true)
        );
        assert_eq!(fifo_in_reply(subscription(&["plain"], None)), Some(false));
        assert_eq!(
            fifo_in_reply(subscription(&["plain"], Some(true))),
            Some(false),
            "the topic decides, as the broker hands it out"
        );
    }
}
