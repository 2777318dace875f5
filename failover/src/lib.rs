//! The failover decision shared by the local-group supervisor (`keelmq dev`)
//! and the Kubernetes operator.
//!
//! [`decide`] is a pure function: it looks at one [`Observation`] of a broker
//! group (who answers, who is ready, each broker's role, epoch and offsets, how
//! long the master has been unready) and the group's [`Policy`], and says what
//! to do next as a [`Decision`]: nothing, wait (and why), promote a broker,
//! choose the first master, or point stray brokers at the master. It does no
//! I/O, reads no clock and keeps no state, so the same observation always gives
//! the same decision; the caller measures time (`master_unready_for`) and
//! carries the decision out (admin API `promote`/`follow`, status, events).
//!
//! # The safety rule
//!
//! In `SYNC` mode a send is acknowledged once the master and at least
//! `min_in_sync_replicas` slaves hold it. If `slaves - min_in_sync_replicas + 1`
//! slaves are reachable, at least one of them holds every acknowledged record,
//! and the one with the highest `(epoch, max_offset)` holds them all: it is
//! promoted with an epoch above every epoch seen. With fewer reachable, the
//! decision is to wait and say why, unless the policy allows data loss. In
//! `ASYNC` mode the reachable slave with the highest `(epoch, max_offset)` is
//! promoted and the bytes that may have been lost are reported.
//!
//! A slave whose store is empty is not counted as holding anything (it may
//! have lost its volume), and is never promoted while a broker with data is
//! available.
//!
//! # What the executor must do with a promotion
//!
//! Fence first, then measure, then promote:
//! 1. Persist the new epoch and master (BrokerGroup status, written with
//!    optimistic concurrency) *before* acting on any broker.
//! 2. Tell every broker in `followers` to follow the chosen broker in
//!    `new_epoch` (it stops streaming from the old master, which may be
//!    alive and still acknowledging writes), and ask [`check_fenced`]
//!    whether enough of them did.
//! 3. Measure the chosen broker and the fenced ones again and ask
//!    [`check_measured`] whether the chosen one still holds every
//!    acknowledged record.
//! 4. Only then call `promote` on it, and have `followers` follow it again.
//!
//! When a check fails, promote nobody this round: record the old master
//! again (keeping the raised epoch, so the next round's promotion is in a
//! newer one) and let the next round decide from fresh offsets. Brokers that
//! were unreachable are pointed at the new master later by
//! [`Decision::MakeFollow`].

#![warn(missing_docs)]

mod decide;
mod fence;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use decide::decide;
pub use fence::{Hold, check_fenced, check_measured};

/// How a master acknowledges a send; decides which promotions are safe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicationMode {
    /// Acknowledged once the master and `min_in_sync_replicas` slaves hold it:
    /// failover can be made lossless.
    Sync,
    /// Acknowledged after the master's own write: failover may lose the tail
    /// the slaves had not yet received.
    Async,
}

/// The group's replication settings and failover policy, as the spec states
/// them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The replication mode the brokers run with.
    pub mode: ReplicationMode,
    /// In `SYNC` mode, how many slaves must hold a record before it is
    /// acknowledged.
    pub min_in_sync_replicas: u32,
    /// The declared group size (master plus slaves). The group is taken to be
    /// the larger of this and the brokers observed, so a member missing from
    /// the observation counts as unreachable instead of shrinking the quorum.
    pub replicas: u32,
    /// Whether a failed master is replaced automatically.
    pub enabled: bool,
    /// How long the master must be continuously unready before it counts as
    /// failed (a deleted pod or lost node counts at once).
    pub detection_delay: Duration,
    /// Promote the best broker available even when acknowledged messages may
    /// be lost (not enough slaves reachable, or only empty stores left).
    pub allow_data_loss: bool,
}

/// What a broker says it is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts writes (or believes it may).
    Master,
    /// Read-only: follows `BrokerStatus::master`, or waits for instructions
    /// when that is `None` (a broker started in standby).
    Slave,
    /// The broker reported a role this crate does not know.
    Unknown,
}

/// One broker's answer to the admin `status` call, reduced to what the
/// decision needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStatus {
    /// The role it reports.
    pub role: Role,
    /// The epoch of the newest entry in its epoch history: the epoch its log's
    /// tail was written in (a freshly promoted master records its epoch at
    /// once; a slave records a new epoch when the first bytes of it arrive).
    pub epoch: u64,
    /// The end of its commit log.
    pub max_offset: u64,
    /// Identity of its store, new whenever the data directory is created.
    pub store_id: String,
    /// Its store holds no messages (freshly created, or lost and recreated).
    pub empty: bool,
    /// For a slave: the name of the broker it follows (the caller maps the
    /// replication address to the member's name).
    pub master: Option<String>,
}

/// What was seen of one member of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerObservation {
    /// The member's stable name (pod name in Kubernetes); unique in the group.
    pub name: String,
    /// Its admin API answered this time.
    pub reachable: bool,
    /// Its readiness check passes (the store is loaded and it serves).
    pub ready: bool,
    /// Its status, when it answered. A status kept from an earlier answer may
    /// be passed for an unreachable broker: only its epoch is used then.
    pub status: Option<BrokerStatus>,
}

/// Everything the decision looks at, gathered by the caller at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// The group's epoch as recorded by the controller (BrokerGroup status).
    pub group_epoch: u64,
    /// The recorded master, `None` before the group has one.
    pub current_master: Option<String>,
    /// The store id the recorded master had when it was made master; a
    /// different one now means its store was replaced.
    pub master_store_id: Option<String>,
    /// The recorded master's end offset the last time it was seen (reset
    /// whenever the master changes). It tells a master that came back empty
    /// or shorter from one that never had the data, and estimates how much an
    /// `ASYNC` failover loses. `None` when never seen.
    pub last_known_master_offset: Option<u64>,
    /// Every member of the group, the master included, reachable or not.
    pub brokers: Vec<BrokerObservation>,
    /// How long the master has been *continuously* unready (unreachable or
    /// not ready); the caller resets it when the master is ready again. Only
    /// used while the master is observed down; `None` counts as zero.
    pub master_unready_for: Option<Duration>,
    /// The master's pod was deleted or its node is lost: it is failed at once,
    /// without the detection delay, unless it still answers and is ready.
    pub master_gone: bool,
}

/// Why the recorded master no longer counts as master.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterFailure {
    /// Its pod was deleted or its node lost.
    Gone,
    /// It stayed unready at least the detection delay.
    Unready {
        /// How long it has been unready.
        unready_for: Duration,
    },
    /// It came back with an empty or different store while other brokers
    /// hold data: it lost acknowledged records and must follow instead.
    StoreLost,
    /// It restarted (not serving as master) holding less than a slave does,
    /// for example after losing unflushed data.
    Behind {
        /// A broker holding more than the restarted master.
        broker: String,
    },
    /// It restarted (not serving as master) with its log ending before the
    /// offset it was last seen at: it lost its unflushed tail.
    Truncated {
        /// Where its log ends now.
        max_offset: u64,
        /// Where it was last seen to end.
        last_known: u64,
    },
    /// It restarted (not serving as master), and too few slaves are
    /// reachable to tell whether it lost anything written after it was last
    /// seen.
    Restarted {
        /// Where its log ends now.
        max_offset: u64,
    },
}

/// Why a broker is promoted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromoteReason {
    /// The master failed and this broker replaces it.
    MasterFailed(MasterFailure),
    /// The recorded master is back and holds everything, but is not serving
    /// as master in the group's epoch (it restarted in standby, or an earlier
    /// promotion was recorded but never carried out): make it master again.
    Reinstate,
}

/// How much acknowledged data a promotion may lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PossibleLoss {
    /// No acknowledged message can be lost.
    Nothing,
    /// The old master was last seen this many bytes ahead of the new master
    /// (it may have written more since).
    Bytes(u64),
    /// Not known: acknowledged messages may be lost, by an unknown amount.
    Unknown,
}

/// Why nothing is done yet; its `Display` text goes verbatim into
/// Kubernetes conditions, events and logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReason {
    /// The master is unready but not for long enough to fail over.
    DetectionDelay {
        /// How long it has been unready.
        unready_for: Duration,
        /// How long until it counts as failed.
        remaining: Duration,
    },
    /// The master failed, but the policy disables failover.
    FailoverDisabled {
        /// How the master failed.
        failure: MasterFailure,
    },
    /// `SYNC`: too few slaves are reachable to be sure one holds every
    /// acknowledged record.
    NotEnoughReachableSlaves {
        /// How the master failed.
        failure: MasterFailure,
        /// Slaves that are reachable, ready and hold data.
        reachable: u32,
        /// How many are needed: `slaves - min_in_sync_replicas + 1`.
        needed: u32,
        /// Slaves in the group.
        slaves: u32,
    },
    /// Every broker that could be promoted has an empty store while the
    /// master had data: promoting one would lose everything.
    OnlyEmptyStores {
        /// How the master failed.
        failure: MasterFailure,
    },
    /// The master failed and no other broker is reachable and ready.
    NoCandidate {
        /// How the master failed.
        failure: MasterFailure,
    },
    /// No master yet and not every member is up: choosing now could pick a
    /// broker holding less than one still starting.
    WaitingForMembers {
        /// Members reachable and ready.
        up: u32,
        /// Members in the group.
        total: u32,
    },
    /// A broker reports a newer epoch than the serving master: it was promoted
    /// outside this controller, and telling it to follow would be refused.
    NewerEpochElsewhere {
        /// The broker with the newer epoch.
        broker: String,
        /// Its epoch.
        epoch: u64,
        /// The serving master's epoch.
        master_epoch: u64,
    },
}

/// What to do with the group now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// The master serves and every reachable broker follows it.
    Healthy,
    /// Do nothing yet, for the stated reason.
    Wait {
        /// Why.
        reason: WaitReason,
    },
    /// Make `broker` master in `new_epoch`, then have `followers` follow it.
    Promote {
        /// The broker to promote.
        broker: String,
        /// Above the group's epoch and every epoch observed.
        new_epoch: u64,
        /// The other reachable brokers, sorted by name, to follow `broker`.
        followers: Vec<String>,
        /// How much acknowledged data this promotion may lose.
        possible_loss: PossibleLoss,
        /// Why.
        reason: PromoteReason,
    },
    /// The group has no master yet: make `broker` (the one holding the most
    /// data in the newest epoch) master in `epoch`, then have `followers`
    /// follow it.
    Bootstrap {
        /// The broker to make master.
        broker: String,
        /// The first epoch of the group (above every epoch observed).
        epoch: u64,
        /// The other reachable brokers, sorted by name.
        followers: Vec<String>,
    },
    /// These brokers, sorted by name, do not follow the serving master (an
    /// old master that came back, a restarted empty broker, a slave of
    /// another master): tell them to follow `master` in `epoch`.
    MakeFollow {
        /// The brokers to redirect.
        brokers: Vec<String>,
        /// The serving master.
        master: String,
        /// The serving master's epoch.
        epoch: u64,
    },
}

/// Formats a duration for people: `250ms`, `10s`, `12.5s`.
struct Human(Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d < Duration::from_secs(1) {
            write!(f, "{}ms", d.as_millis())
        } else if d.subsec_millis() == 0 {
            write!(f, "{}s", d.as_secs())
        } else {
            write!(f, "{:.1}s", d.as_secs_f64())
        }
    }
}

impl fmt::Display for ReplicationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicationMode::Sync => "SYNC",
            ReplicationMode::Async => "ASYNC",
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Master => "master",
            Role::Slave => "slave",
            Role::Unknown => "unknown",
        })
    }
}

impl fmt::Display for MasterFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterFailure::Gone => f.write_str("the master's pod or node is gone"),
            MasterFailure::Unready { unready_for } => {
                write!(f, "the master has been unready for {}", Human(*unready_for))
            }
            MasterFailure::StoreLost => f.write_str(
                "the master came back with an empty or replaced store while other brokers hold data",
            ),
            MasterFailure::Behind { broker } => write!(
                f,
                "the master restarted holding less data than broker {broker}"
            ),
            MasterFailure::Truncated {
                max_offset,
                last_known,
            } => write!(
                f,
                "the master restarted with its log ending at offset {max_offset}, \
                 before the offset {last_known} it was last seen at"
            ),
            MasterFailure::Restarted { max_offset } => write!(
                f,
                "the master restarted in standby with its log ending at offset {max_offset}"
            ),
        }
    }
}

impl fmt::Display for PromoteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromoteReason::MasterFailed(failure) => write!(f, "{failure}"),
            PromoteReason::Reinstate => f.write_str(
                "the master is back with all its data but is not serving as master in the group's epoch",
            ),
        }
    }
}

impl fmt::Display for PossibleLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PossibleLoss::Nothing => f.write_str("no acknowledged message is lost"),
            PossibleLoss::Bytes(0) => {
                f.write_str("the new master holds everything the old master was last seen holding")
            }
            PossibleLoss::Bytes(n) => write!(
                f,
                "up to {n} bytes may be lost (the old master was last seen {n} bytes ahead)"
            ),
            PossibleLoss::Unknown => {
                f.write_str("acknowledged messages may be lost, amount unknown")
            }
        }
    }
}

const DATA_LOSS_HINT: &str = "allowing data loss in the failover policy would promote anyway";

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::DetectionDelay {
                unready_for,
                remaining,
            } => write!(
                f,
                "the master has been unready for {}; it counts as failed in {} (detection delay)",
                Human(*unready_for),
                Human(*remaining)
            ),
            WaitReason::FailoverDisabled { failure } => {
                write!(f, "{failure}, but failover is disabled")
            }
            WaitReason::NotEnoughReachableSlaves {
                failure,
                reachable,
                needed,
                slaves,
            } => write!(
                f,
                "{failure}; {reachable} of {slaves} slaves are reachable and ready with data, \
                 {needed} are needed to be sure no acknowledged message is lost; {DATA_LOSS_HINT}"
            ),
            WaitReason::OnlyEmptyStores { failure } => write!(
                f,
                "{failure}; every broker that could be promoted has an empty store, \
                 so promoting one would lose all data; {DATA_LOSS_HINT}"
            ),
            WaitReason::NoCandidate { failure } => {
                write!(f, "{failure}; no other broker is reachable and ready")
            }
            WaitReason::WaitingForMembers { up, total } => write!(
                f,
                "no master yet: {up} of {total} brokers are reachable and ready; \
                 waiting for all of them to choose the one holding the most data"
            ),
            WaitReason::NewerEpochElsewhere {
                broker,
                epoch,
                master_epoch,
            } => write!(
                f,
                "broker {broker} reports epoch {epoch}, newer than the master's epoch {master_epoch}: \
                 it was promoted outside this controller; not acting until that is resolved"
            ),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Healthy => f.write_str("healthy"),
            Decision::Wait { reason } => write!(f, "waiting: {reason}"),
            Decision::Promote {
                broker,
                new_epoch,
                possible_loss,
                reason,
                ..
            } => write!(
                f,
                "promote {broker} to master of epoch {new_epoch}: {reason}; {possible_loss}"
            ),
            Decision::Bootstrap { broker, epoch, .. } => write!(
                f,
                "make {broker} the first master, epoch {epoch}: it holds the most data"
            ),
            Decision::MakeFollow {
                brokers,
                master,
                epoch,
            } => write!(
                f,
                "tell {} to follow master {master} in epoch {epoch}",
                brokers.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(Human(Duration::from_millis(250)).to_string(), "250ms");
        assert_eq!(Human(Duration::from_secs(30)).to_string(), "30s");
        assert_eq!(Human(Duration::from_millis(12_500)).to_string(), "12.5s");
    }

    #[test]
    fn wait_reasons_read_as_sentences() {
        let cases = [
            (
                WaitReason::WaitingForMembers { up: 2, total: 3 },
                "no master yet: 2 of 3 brokers are reachable and ready; \
                 waiting for all of them to choose the one holding the most data",
            ),
            (
                WaitReason::OnlyEmptyStores {
                    failure: MasterFailure::Gone,
                },
                "the master's pod or node is gone; every broker that could be promoted has an \
                 empty store, so promoting one would lose all data; \
                 allowing data loss in the failover policy would promote anyway",
            ),
            (
                WaitReason::NewerEpochElsewhere {
                    broker: "b-2".into(),
                    epoch: 5,
                    master_epoch: 3,
                },
                "broker b-2 reports epoch 5, newer than the master's epoch 3: it was promoted \
                 outside this controller; not acting until that is resolved",
            ),
            (
                WaitReason::FailoverDisabled {
                    failure: MasterFailure::StoreLost,
                },
                "the master came back with an empty or replaced store while other brokers hold \
                 data, but failover is disabled",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn decisions_summarise_themselves_for_logs() {
        let d = Decision::Promote {
            broker: "b-1".into(),
            new_epoch: 4,
            followers: vec!["b-0".into()],
            possible_loss: PossibleLoss::Nothing,
            reason: PromoteReason::MasterFailed(MasterFailure::Unready {
                unready_for: Duration::from_secs(30),
            }),
        };
        assert_eq!(
            d.to_string(),
            "promote b-1 to master of epoch 4: the master has been unready for 30s; \
             no acknowledged message is lost"
        );
        let d = Decision::MakeFollow {
            brokers: vec!["b-0".into(), "b-2".into()],
            master: "b-1".into(),
            epoch: 4,
        };
        assert_eq!(
            d.to_string(),
            "tell b-0, b-2 to follow master b-1 in epoch 4"
        );
    }
}
