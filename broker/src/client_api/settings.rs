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
/// consumer gets its group's retry policy from `group_settings`.
pub fn reply(
    mut s: pb::Settings,
    group_settings: impl Fn(&str) -> GroupConfig,
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
            sub.fifo = Some(sub.fifo.unwrap_or(false));
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
