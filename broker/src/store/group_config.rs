//! Consumer group settings: how many times a message is delivered before it
//! moves to the group's dead-letter topic, and the back-off a client waits
//! before each retry. A group without settings uses the broker's defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::record::{MAX_TOPIC_LEN, validate_topic};

/// Deliveries of a message (the first one included) by default: sixteen
/// retries, as RocketMQ's `retryMaxTimes` default.
pub const DEFAULT_MAX_DELIVERY_ATTEMPTS: u32 = 17;
/// Most deliveries a group may ask for.
pub const MAX_DELIVERY_ATTEMPTS: u32 = 1000;
/// Longest wait before a retry (RocketMQ's last default step).
pub const MAX_BACKOFF: Duration = Duration::from_secs(2 * 3600);
/// Most steps of a customized back-off.
pub const MAX_BACKOFF_STEPS: usize = 64;

/// RocketMQ's default retry steps, in seconds: the wait before the first
/// retry, the second, ...; the last step repeats.
const DEFAULT_STEPS_S: [u64; 18] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
];

/// One consumer group's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub name: String,
    /// Deliveries of a message, the first included, before it moves to
    /// `%DLQ%<group>`.
    pub max_delivery_attempts: u32,
    pub retry_backoff: RetryBackoff,
}

/// How long a client waits before it retries a message it failed to
/// consume (sent to consumers in the Settings reply).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RetryBackoff {
    /// The nth retry waits `steps_ms[n - 1]`; the last step repeats.
    Customized { steps_ms: Vec<u64> },
    /// The nth retry waits `initial * multiplier^(n - 1)`, at most `max`.
    Exponential {
        initial_ms: u64,
        max_ms: u64,
        multiplier: f64,
    },
}

impl Default for RetryBackoff {
    fn default() -> Self {
        RetryBackoff::Customized {
            steps_ms: DEFAULT_STEPS_S.iter().map(|s| s * 1000).collect(),
        }
    }
}

impl GroupConfig {
    /// The settings of a group nobody configured.
    pub fn defaults(name: &str) -> Self {
        GroupConfig {
            name: name.to_owned(),
            max_delivery_attempts: DEFAULT_MAX_DELIVERY_ATTEMPTS,
            retry_backoff: RetryBackoff::default(),
        }
    }

    /// Refuses settings a broker cannot honour, saying which and why.
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_group_name(&self.name)?;
        let bad = |why: String| Err(StoreError::InvalidArgument(why));
        if !(1..=MAX_DELIVERY_ATTEMPTS).contains(&self.max_delivery_attempts) {
            return bad(format!(
                "max delivery attempts {} out of range (1 to {MAX_DELIVERY_ATTEMPTS})",
                self.max_delivery_attempts
            ));
        }
        let max_ms = MAX_BACKOFF.as_millis() as u64;
        let step_ok = |ms: u64| (1..=max_ms).contains(&ms);
        match &self.retry_backoff {
            RetryBackoff::Customized { steps_ms } => {
                if steps_ms.is_empty() || steps_ms.len() > MAX_BACKOFF_STEPS {
                    return bad(format!(
                        "a customized back-off has 1 to {MAX_BACKOFF_STEPS} steps, not {}",
                        steps_ms.len()
                    ));
                }
                if let Some(s) = steps_ms.iter().find(|&&s| !step_ok(s)) {
                    return bad(format!(
                        "back-off step of {s} ms out of range (1 ms to {max_ms} ms)"
                    ));
                }
            }
            RetryBackoff::Exponential {
                initial_ms,
                max_ms: cap,
                multiplier,
            } => {
                if !step_ok(*initial_ms) || !step_ok(*cap) || cap < initial_ms {
                    return bad(format!(
                        "exponential back-off from {initial_ms} ms to {cap} ms: both must be 1 ms to {max_ms} ms, the first no larger"
                    ));
                }
                if !multiplier.is_finite() || !(1.0..=100.0).contains(multiplier) {
                    return bad(format!(
                        "back-off multiplier {multiplier} out of range (1 to 100)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Consumer group names: what a topic name may be (so `%DLQ%<group>` is a
/// valid dead-letter topic), not starting with `%SYS_`.
pub fn validate_group_name(name: &str) -> Result<(), StoreError> {
    if name.len() > MAX_TOPIC_LEN || validate_topic(name).is_err() {
        return Err(StoreError::InvalidName(format!(
            "{name:?}: group names are 1 to {MAX_TOPIC_LEN} characters of letters, digits, '_', '-', '%' and '|'"
        )));
    }
    if name.starts_with("%SYS_") {
        return Err(StoreError::InvalidName(format!(
            "{name}: names starting with %SYS_ are the broker's own"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(attempts: u32, retry_backoff: RetryBackoff) -> GroupConfig {
        GroupConfig {
            name: "orders-consumer".into(),
            max_delivery_attempts: attempts,
            retry_backoff,
        }
    }

    #[test]
    fn defaults_are_valid_and_match_rocketmq() {
        let d = GroupConfig::defaults("g");
        d.validate().expect("valid");
        assert_eq!(d.max_delivery_attempts, 17);
        let RetryBackoff::Customized { steps_ms } = d.retry_backoff else {
            panic!("customized by default")
        };
        assert_eq!((steps_ms[0], steps_ms[17]), (1000, 7_200_000));
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let exp = |i, m, x| RetryBackoff::Exponential {
            initial_ms: i,
            max_ms: m,
            multiplier: x,
        };
        let cases = [
            (
                config(0, RetryBackoff::default()),
                "max delivery attempts 0",
            ),
            (
                config(1001, RetryBackoff::default()),
                "out of range (1 to 1000)",
            ),
            (
                config(3, RetryBackoff::Customized { steps_ms: vec![] }),
                "1 to 64 steps",
            ),
            (
                config(
                    3,
                    RetryBackoff::Customized {
                        steps_ms: vec![10, 0],
                    },
                ),
                "step of 0 ms",
            ),
            (
                config(
                    3,
                    RetryBackoff::Customized {
                        steps_ms: vec![7_200_001],
                    },
                ),
                "step of 7200001 ms",
            ),
            (config(3, exp(100, 10, 2.0)), "the first no larger"),
            (config(3, exp(0, 10, 2.0)), "both must be"),
            (config(3, exp(10, 100, 0.5)), "multiplier 0.5"),
            (config(3, exp(10, 100, f64::NAN)), "multiplier NaN"),
        ];
        for (c, want) in cases {
            let err = c.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
        let mut c = config(3, exp(10, 100, 2.0));
        c.validate().expect("valid");
        c.name = "has space".into();
        assert!(c.validate().is_err());
        c.name = "%SYS_DELIVERY%".into();
        assert!(
            c.validate()
                .expect_err("reserved")
                .to_string()
                .contains("%SYS_")
        );
    }

    #[test]
    fn every_valid_group_has_a_valid_dead_letter_topic() {
        for ok in [
            "g",
            "orders-consumer",
            "A_b|c%d",
            &"g".repeat(MAX_TOPIC_LEN),
        ] {
            validate_group_name(ok).expect(ok);
            validate_topic(&format!("%DLQ%{ok}")).expect("its dead-letter topic");
            validate_topic(&format!("%RETRY%{ok}")).expect("its retry topic");
        }
        let long_dlq = format!("%DLQ%{}", "g".repeat(MAX_TOPIC_LEN));
        for bad in [
            "",
            "a.b",
            "svc:pay",
            "a b",
            &"g".repeat(MAX_TOPIC_LEN + 1),
            &long_dlq,
            "%SYS_X",
        ] {
            assert!(validate_group_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_round_trip_through_json() {
        for b in [
            RetryBackoff::default(),
            RetryBackoff::Exponential {
                initial_ms: 250,
                max_ms: 60_000,
                multiplier: 1.5,
            },
        ] {
            let c = config(5, b);
            let json = serde_json::to_string(&c).expect("json");
            assert_eq!(
                serde_json::from_str::<GroupConfig>(&json).expect("parse"),
                c
            );
        }
    }
}
