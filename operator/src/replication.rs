//! The master's view of replication, read for the Ready, Progressing and
//! Degraded conditions of a group whose failover decision is `Healthy`.
//!
//! That decision only checks that every reachable slave *says* it follows
//! the master. A slave can say so while nothing reaches it (the replication
//! port blocked, its follow loop failing): only the master knows which
//! slaves are connected and in sync (`StatusResponse.slaves`), and under
//! `SYNC` replication it acknowledges a send only once `minInSyncReplicas`
//! of them hold it. The rule ([`judge`]):
//!
//! - A slave is *in sync* when the master lists it connected and in sync,
//!   *catching up* when it lists it connected but further behind than the
//!   broker's in-sync lag, and *not connected* otherwise (listed as
//!   disconnected, or not listed at all: it has not connected to this master
//!   since it became master).
//! - `SYNC` with `minInSyncReplicas` above zero and fewer slaves in sync than
//!   that: the master cannot acknowledge a send, whatever the cause, so the
//!   group is not Ready ([`REASON_NOT_ENOUGH_IN_SYNC`]). No grace: Ready
//!   promises that sends succeed.
//! - A slave that serves (its pod is ready, or it follows the master and
//!   answers: [`crate::failover::serving`], since a following slave's pod is
//!   ready only while it is connected and in sync) and that has not been
//!   connected for the grace ([`REPLICATION_GRACE`]) or longer is *broken*: Degraded
//!   ([`REASON_REPLICATION_BROKEN`]) in both modes, since its data is not
//!   being copied; under `ASYNC` (or with enough other slaves in sync) the
//!   group stays Ready.
//! - A slave catching up, or not connected for less than the grace (it just
//!   started, or was just told to follow, and its follow loop is still
//!   connecting: it retries within 2 s), is Progressing
//!   ([`REASON_CATCHING_UP`]), never Degraded: a restart or a failover does
//!   not flap Degraded.
//!
//! How long a slave has not been connected is measured by the operator
//! ([`Disconnects`], in memory): from the first reconcile that saw it so,
//! restarted whenever the master changes, the epoch changes, or the
//! executor acts (promotes, redirects, waits), so a slave told to follow is
//! given the grace afresh. An operator restart only delays Degraded by one
//! grace.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keelmq_failover::{Policy, ReplicationMode};

use crate::failover::Observed;

/// How long a slave that serves may stay unconnected to the master
/// before the group is Degraded: well above the slave's reconnect backoff
/// (at most 2 s), equal to the silence after which the master drops a slave.
pub const REPLICATION_GRACE: Duration = Duration::from_secs(10);

/// Ready reason: under `SYNC`, fewer than `minInSyncReplicas` slaves are
/// connected and in sync, so sends fail.
pub const REASON_NOT_ENOUGH_IN_SYNC: &str = "NotEnoughInSyncReplicas";
/// Degraded reason: a ready slave has not been connected to the master for
/// the grace or longer.
pub const REASON_REPLICATION_BROKEN: &str = "ReplicationBroken";
/// Progressing reason: a slave is catching up, or (re)connecting within the
/// grace.
pub const REASON_CATCHING_UP: &str = "CatchingUp";

/// How the master sees one slave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Connected and within the broker's in-sync lag.
    InSync,
    /// Connected, further behind than the in-sync lag.
    CatchingUp {
        /// Bytes behind the master's log end.
        lag_bytes: u64,
    },
    /// Listed as disconnected, or not listed.
    NotConnected,
}

/// One slave (a member other than the master) and its link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlaveLink {
    /// Pod name (the broker id the slave announces to the master).
    pub name: String,
    /// It serves ([`crate::failover::serving`]): its pod is Ready, or it
    /// follows a master and answers (its pod's readiness then also needs it
    /// connected and in sync, which is what is judged here).
    pub ready: bool,
    /// How the master sees it.
    pub link: Link,
}

/// Every member but `master`, in name order, as `master`'s admin status
/// lists it; `None` when the master's status was not read.
pub fn links(observed: &Observed, master: &str) -> Option<Vec<SlaveLink>> {
    let ms = observed.statuses.get(master)?;
    Some(
        observed
            .observation
            .brokers
            .iter()
            .filter(|b| b.name != master)
            .map(|b| {
                let listed = ms
                    .slaves
                    .iter()
                    .find(|s| s.broker_id == b.name && s.connected);
                let link = match listed {
                    Some(s) if s.in_sync => Link::InSync,
                    Some(s) => Link::CatchingUp {
                        lag_bytes: s.lag_bytes,
                    },
                    None => Link::NotConnected,
                };
                SlaveLink {
                    name: b.name.clone(),
                    ready: b.ready,
                    link,
                }
            })
            .collect(),
    )
}

/// What the master's view of replication means for the conditions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Under `SYNC`, why sends cannot be acknowledged now (Ready=False,
    /// [`REASON_NOT_ENOUGH_IN_SYNC`]); `None` when they can.
    pub not_ready: Option<String>,
    /// Ready slaves not connected for the grace or longer, and why (Degraded=True,
    /// [`REASON_REPLICATION_BROKEN`]); `None` when there are none.
    pub broken: Option<String>,
    /// Slaves catching up or connecting within the grace (Progressing=True,
    /// [`REASON_CATCHING_UP`]); `None` when there are none.
    pub pending: Option<String>,
}

/// A duration in words, to the millisecond below one second.
fn words(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// Judges `links` of `master` under `policy` (see the module docs);
/// `unconnected_for` says how long each not-connected slave has been seen
/// so (missing: just now).
pub fn judge(
    policy: &Policy,
    master: &str,
    links: &[SlaveLink],
    unconnected_for: &BTreeMap<String, Duration>,
    grace: Duration,
) -> Verdict {
    let mut in_sync = 0u32;
    let mut broken = Vec::new();
    let mut pending = Vec::new();
    let mut lagging = Vec::new();
    for l in links {
        match &l.link {
            Link::InSync => in_sync += 1,
            Link::CatchingUp { lag_bytes } => {
                let what = format!("{} is catching up ({lag_bytes} bytes behind)", l.name);
                lagging.push(what.clone());
                pending.push(what);
            }
            Link::NotConnected => {
                let for_ = unconnected_for
                    .get(&l.name)
                    .copied()
                    .unwrap_or(Duration::ZERO);
                let what = format!("{} is not connected", l.name);
                lagging.push(what);
                if !l.ready {
                    // It does not serve (starting, stopping, its pod
                    // going): counted as a broker not ready, not as broken
                    // replication.
                } else if for_ >= grace {
                    broken.push(l.name.as_str());
                } else {
                    pending.push(format!(
                        "{} is not connected yet (broken if still not after {})",
                        l.name,
                        words(grace)
                    ));
                }
            }
        }
    }
    let required = policy.min_in_sync_replicas;
    let not_ready = (policy.mode == ReplicationMode::Sync && required > 0 && in_sync < required)
        .then(|| {
            let why = if lagging.is_empty() {
                format!("the group has {} slave(s)", links.len())
            } else {
                lagging.join(", ")
            };
            format!(
                "SYNC sends cannot be acknowledged: {in_sync} slave(s) connected to master {master} and in sync, minInSyncReplicas is {required}; {why}"
            )
        });
    let broken = (!broken.is_empty()).then(|| {
        let (who, it) = match broken.as_slice() {
            [one] => (format!("{one} has"), "it"),
            many => (format!("{} have", many.join(", ")), "them"),
        };
        let acks = if not_ready.is_some() {
            "and SYNC sends fail".to_string()
        } else if policy.mode == ReplicationMode::Sync {
            "sends are acknowledged by the other slaves".to_string()
        } else {
            format!("ASYNC sends are acknowledged without {it}")
        };
        format!(
            "{who} not been connected to master {master} for {} or more: nothing is copied to {it}, {acks}",
            words(grace)
        )
    });
    let pending = (!pending.is_empty())
        .then(|| format!("replication from master {master}: {}", pending.join(", ")));
    Verdict {
        not_ready,
        broken,
        pending,
    }
}

/// Since when each group's slaves have been seen not connected to the
/// master (in memory; see the module docs).
#[derive(Debug, Default)]
pub struct Disconnects {
    groups: Mutex<HashMap<String, Seen>>,
}

#[derive(Debug)]
struct Seen {
    master: String,
    epoch: i64,
    since: BTreeMap<String, Instant>,
    /// The broken replication last announced (Warning event).
    announced: Option<String>,
}

impl Disconnects {
    /// Records that, as of `now`, the not-connected slaves of group `key`
    /// (master `master` of `epoch`) are those in `links`; returns how long
    /// each has been seen so without a break. A change of master or epoch
    /// starts every clock again.
    pub fn observe(
        &self,
        key: &str,
        master: &str,
        epoch: i64,
        links: &[SlaveLink],
        now: Instant,
    ) -> BTreeMap<String, Duration> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let seen = groups.entry(key.to_string()).or_insert_with(|| Seen {
            master: master.to_string(),
            epoch,
            since: BTreeMap::new(),
            announced: None,
        });
        if seen.master != master || seen.epoch != epoch {
            seen.master = master.to_string();
            seen.epoch = epoch;
            seen.since.clear();
            seen.announced = None;
        }
        let down: Vec<&str> = links
            .iter()
            .filter(|l| l.link == Link::NotConnected)
            .map(|l| l.name.as_str())
            .collect();
        seen.since.retain(|name, _| down.contains(&name.as_str()));
        down.into_iter()
            .map(|name| {
                let since = *seen.since.entry(name.to_string()).or_insert(now);
                (name.to_string(), now.saturating_duration_since(since))
            })
            .collect()
    }

    /// Whether `broken` (a [`Verdict::broken`] of group `key`, observed just
    /// before) is news to announce: it differs from the last one announced.
    /// `None` (nothing broken) is never news, and makes the next breakage news.
    pub fn announce(&self, key: &str, broken: Option<&str>) -> bool {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let Some(seen) = groups.get_mut(key) else {
            return false;
        };
        let news = broken.is_some() && seen.announced.as_deref() != broken;
        seen.announced = broken.map(str::to_string);
        news
    }

    /// Forgets group `key`: the next observation starts every clock again.
    pub fn forget(&self, key: &str) {
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: ReplicationMode, min_in_sync_replicas: u32) -> Policy {
        Policy {
            mode,
            min_in_sync_replicas,
            replicas: 3,
            enabled: true,
            detection_delay: Duration::from_secs(10),
            allow_data_loss: false,
        }
    }

    fn slave(name: &str, link: Link) -> SlaveLink {
        SlaveLink {
            name: name.into(),
            ready: true,
            link,
        }
    }

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn every_slave_in_sync_is_ready_and_healthy() {
        let links = [slave("g-0", Link::InSync), slave("g-1", Link::InSync)];
        for mode in [ReplicationMode::Sync, ReplicationMode::Async] {
            assert_eq!(
                judge(&policy(mode, 2), "g-2", &links, &BTreeMap::new(), GRACE),
                Verdict::default()
            );
        }
    }

    #[test]
    fn sync_below_min_in_sync_is_not_ready_at_once_and_broken_only_after_the_grace() {
        let links = [slave("g-0", Link::InSync), slave("g-1", Link::NotConnected)];
        let p = policy(ReplicationMode::Sync, 2);
        let fresh = judge(&p, "g-2", &links, &BTreeMap::new(), GRACE);
        let why = fresh.not_ready.expect("sends fail");
        assert!(
            why.contains("1 slave(s)") && why.contains("g-1 is not connected"),
            "{why}"
        );
        assert_eq!(fresh.broken, None, "within the grace");
        assert!(
            fresh
                .pending
                .expect("pending")
                .contains("g-1 is not connected yet")
        );

        let long = BTreeMap::from([("g-1".to_string(), GRACE)]);
        let late = judge(&p, "g-2", &links, &long, GRACE);
        assert!(late.not_ready.is_some());
        let broken = late.broken.expect("broken");
        assert!(
            broken.starts_with("g-1 has not been connected to master g-2 for 10s or more")
                && broken.contains("SYNC sends fail"),
            "{broken}"
        );
        assert_eq!(late.pending, None);
    }

    #[test]
    fn enough_in_sync_or_async_stays_ready_but_a_broken_slave_is_degraded() {
        let links = [slave("g-0", Link::InSync), slave("g-1", Link::NotConnected)];
        let long = BTreeMap::from([("g-1".to_string(), GRACE * 2)]);
        for (mode, min) in [(ReplicationMode::Sync, 1), (ReplicationMode::Async, 2)] {
            let v = judge(&policy(mode, min), "g-2", &links, &long, GRACE);
            assert_eq!(v.not_ready, None, "{mode:?}");
            let broken = v.broken.expect("broken");
            assert!(broken.starts_with("g-1 has not been connected"), "{broken}");
        }
    }

    #[test]
    fn catching_up_is_progressing_never_degraded() {
        let links = [slave("g-0", Link::CatchingUp { lag_bytes: 5 })];
        let long = BTreeMap::from([("g-0".to_string(), GRACE * 10)]);
        let sync = judge(
            &policy(ReplicationMode::Sync, 1),
            "g-1",
            &links,
            &long,
            GRACE,
        );
        assert!(
            sync.not_ready
                .expect("sends wait")
                .contains("g-0 is catching up")
        );
        assert_eq!(sync.broken, None);
        assert!(sync.pending.expect("pending").contains("5 bytes behind"));
        let asynchronous = judge(
            &policy(ReplicationMode::Async, 1),
            "g-1",
            &links,
            &long,
            GRACE,
        );
        assert_eq!((asynchronous.not_ready, asynchronous.broken), (None, None));
    }

    #[test]
    fn an_unready_slave_is_not_judged_broken_here() {
        let mut down = slave("g-0", Link::NotConnected);
        down.ready = false;
        let long = BTreeMap::from([("g-0".to_string(), GRACE * 2)]);
        let v = judge(
            &policy(ReplicationMode::Async, 1),
            "g-1",
            &[down],
            &long,
            GRACE,
        );
        assert_eq!(v, Verdict::default());
    }

    #[test]
    fn sync_with_min_in_sync_zero_acknowledges_without_slaves() {
        let links = [slave("g-0", Link::CatchingUp { lag_bytes: 1 })];
        let v = judge(
            &policy(ReplicationMode::Sync, 0),
            "g-1",
            &links,
            &BTreeMap::new(),
            GRACE,
        );
        assert_eq!(v.not_ready, None);
    }

    #[test]
    fn clocks_run_while_unconnected_and_restart_on_reconnect_or_a_new_master() {
        let d = Disconnects::default();
        let t0 = Instant::now();
        let down = [slave("g-0", Link::NotConnected)];
        let up = [slave("g-0", Link::InSync)];
        let s = Duration::from_secs;
        assert_eq!(d.observe("ns/g", "g-1", 1, &down, t0)["g-0"], s(0));
        assert_eq!(d.observe("ns/g", "g-1", 1, &down, t0 + s(4))["g-0"], s(4));
        assert!(d.observe("ns/g", "g-1", 1, &up, t0 + s(5)).is_empty());
        assert_eq!(d.observe("ns/g", "g-1", 1, &down, t0 + s(6))["g-0"], s(0));
        assert_eq!(d.observe("ns/g", "g-1", 1, &down, t0 + s(9))["g-0"], s(3));
        assert_eq!(d.observe("ns/g", "g-1", 2, &down, t0 + s(10))["g-0"], s(0));
        assert_eq!(d.observe("ns/g", "g-1", 2, &down, t0 + s(11))["g-0"], s(1));
        d.forget("ns/g");
        assert_eq!(d.observe("ns/g", "g-1", 2, &down, t0 + s(12))["g-0"], s(0));
    }

    #[test]
    fn breakage_is_announced_once_per_change() {
        let d = Disconnects::default();
        let down = [slave("g-0", Link::NotConnected)];
        let now = Instant::now();
        d.observe("ns/g", "g-1", 1, &down, now);
        assert!(d.announce("ns/g", Some("g-0 broken")));
        assert!(!d.announce("ns/g", Some("g-0 broken")));
        assert!(d.announce("ns/g", Some("g-0, g-2 broken")));
        assert!(!d.announce("ns/g", None));
        assert!(d.announce("ns/g", Some("g-0 broken")));
        d.observe("ns/g", "g-1", 2, &down, now);
        assert!(
            d.announce("ns/g", Some("g-0 broken")),
            "a new epoch is news"
        );
    }
}
