//! Status conditions: set one by type, keeping its `lastTransitionTime`
//! when the status does not change (so `kubectl wait` and dashboards see
//! real transitions only).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: the group serves (a master, every broker ready and
/// following it, and under `SYNC` at least `minInSyncReplicas` slaves
/// connected to the master and in sync, so sends can be acknowledged).
pub const READY: &str = "Ready";
/// Condition type: the operator is changing something (creating, scaling, failing over).
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong that the operator cannot fix right now.
pub const DEGRADED: &str = "Degraded";
/// Condition type: the pause annotation is set.
pub const PAUSED: &str = "ReconciliationPaused";

/// Sets condition `type_` in `conditions`, replacing an older one of the
/// same type; the transition time moves only when the status changes.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    let transition = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: transition,
    });
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Whether condition `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// The reason of condition `type_`, if present.
pub fn reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

/// The message of condition `type_`, if present.
pub fn message<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.message.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("time"))
    }

    #[test]
    fn transition_time_moves_only_on_a_status_change() {
        let mut c = Vec::new();
        set(
            &mut c,
            READY,
            false,
            "Creating",
            "starting",
            Some(1),
            &t(10),
        );
        set(
            &mut c,
            READY,
            false,
            "Waiting",
            "still starting",
            Some(1),
            &t(20),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, t(10));
        assert_eq!(c[0].reason, "Waiting");
        set(&mut c, READY, true, "Serving", "ok", Some(2), &t(30));
        assert_eq!(c[0].last_transition_time, t(30));
        assert!(is_true(&c, READY));
        set(&mut c, DEGRADED, false, "Healthy", "fine", Some(2), &t(30));
        assert_eq!(
            c.iter().map(|c| c.type_.as_str()).collect::<Vec<_>>(),
            [DEGRADED, READY]
        );
        assert_eq!(message(&c, READY), Some("ok"));
        assert_eq!(reason(&c, READY), Some("Serving"));
    }
}
