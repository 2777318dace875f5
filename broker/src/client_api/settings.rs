//! The Settings reply on the Telemetry stream. Clients wait for it before
//! they start; the server owns the retry policy, body limit and consumer
//! batch and polling settings, with RocketMQ's defaults.

use std::time::Duration;

use keelmq_proto::rocketmq::v2 as pb;
use pb::Code;

use super::status;

fn d(secs: u64, millis: u64) -> prost_types::Duration {
    let dur = Duration::from_secs(secs) + Duration::from_millis(millis);
    prost_types::Duration {
        seconds: dur.as_secs() as i64,
        nanos: dur.subsec_nanos() as i32,
    }
}

/// The client's settings with the server-owned fields filled in.
pub fn reply(mut s: pb::Settings) -> pb::TelemetryCommand {
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
            // 16 retries after the first delivery, with RocketMQ's default
            // back-off steps.
            let steps = [
                1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600,
                7200,
            ];
            s.backoff_policy = Some(pb::RetryPolicy {
                max_attempts: 17,
                strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(
                    pb::CustomizedBackoff {
                        next: steps.iter().map(|&x| d(x, 0)).collect(),
                    },
                )),
            });
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
