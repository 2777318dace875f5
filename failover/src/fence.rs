//! Carrying out a [`Decision::Promote`](crate::Decision::Promote) safely:
//! fence first, then measure, then promote.
//!
//! The decision compares offsets observed at one instant. A master that is
//! alive but unreachable from the executor (its admin port stalls, a partial
//! partition) keeps acknowledging `SYNC` writes through the slaves that
//! still stream from it; a promotion made from the earlier offsets would
//! later cut those writes at the fork point. So the executor, after
//! recording the decision (which raises the group's epoch), first tells
//! every reachable follower to follow the chosen broker in the new epoch: a
//! broker that does stops streaming from the old master and refuses it from
//! then on (its fence). [`check_fenced`] then says whether enough of them
//! stopped for the old master to be unable to complete an acknowledgement
//! without the chosen broker; the executor measures the chosen broker and
//! the fenced ones again, and [`check_measured`] says whether the chosen one
//! still holds every acknowledged record. Only then is it promoted.
//!
//! Either check failing means: promote nobody this round, say why, and let
//! the next round decide again (in a higher epoch, since the group's epoch
//! was already raised).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::decide::{Group, holds_more, rank};
use crate::{BrokerStatus, Observation, Policy, ReplicationMode};

/// Why a promotion the decision chose is not carried out this round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    /// `SYNC`: too few brokers stopped following the old master; with the
    /// others it could still complete acknowledgements the chosen broker
    /// would not hold.
    NotEnoughFenced {
        /// Slaves of the old master that can no longer acknowledge its
        /// writes without the chosen broker holding them: the fenced ones
        /// plus the chosen one.
        fenced: u32,
        /// How many are needed: `slaves - min_in_sync_replicas + 1`.
        needed: u32,
        /// Slaves in the group.
        slaves: u32,
    },
    /// The chosen broker did not answer when measured again.
    ChosenUnreachable {
        /// The chosen broker.
        broker: String,
    },
    /// A fenced broker holds log the chosen one lacks (it received more
    /// from the old master after the observation the decision used).
    FencedHoldsMore {
        /// The fenced broker holding more.
        broker: String,
        /// Its epoch and end offset.
        epoch: u64,
        /// Its end offset.
        max_offset: u64,
        /// The chosen broker.
        chosen: String,
        /// The chosen broker's epoch.
        chosen_epoch: u64,
        /// The chosen broker's end offset.
        chosen_offset: u64,
    },
    /// `SYNC`: too few brokers with data answered when measured again to be
    /// sure the chosen one holds every acknowledged record.
    NotEnoughMeasured {
        /// Brokers with data measured after the fence (the chosen one
        /// included, unless it is the recorded master).
        measured: u32,
        /// How many are needed: `slaves - min_in_sync_replicas + 1`.
        needed: u32,
        /// Slaves in the group.
        slaves: u32,
    },
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::NotEnoughFenced {
                fenced,
                needed,
                slaves,
            } => write!(
                f,
                "only {fenced} of {slaves} slaves stopped following the old master (the chosen one included), {needed} are needed: it could still get writes acknowledged that the new master would not hold"
            ),
            Hold::ChosenUnreachable { broker } => write!(
                f,
                "{broker} did not answer when measured again after the others were fenced"
            ),
            Hold::FencedHoldsMore {
                broker,
                epoch,
                max_offset,
                chosen,
                chosen_epoch,
                chosen_offset,
            } => write!(
                f,
                "{broker} holds more than {chosen} once fenced (epoch {epoch} offset {max_offset}, against epoch {chosen_epoch} offset {chosen_offset}): it received more from the old master after the observation"
            ),
            Hold::NotEnoughMeasured {
                measured,
                needed,
                slaves,
            } => write!(
                f,
                "only {measured} of {slaves} slaves answered with data when measured again after the fence, {needed} are needed to be sure the chosen broker holds every acknowledged record"
            ),
        }
    }
}

/// Whether `SYNC`'s safety rule is in force: it is waived in `ASYNC` mode and
/// when the policy allows data loss (the decision reported the loss).
fn sync_rule(policy: &Policy) -> bool {
    policy.mode == ReplicationMode::Sync && !policy.allow_data_loss
}

/// The recorded master when it is not the chosen broker: the old master
/// that may still be serving.
fn old_master<'a>(obs: &'a Observation, chosen: &str) -> Option<&'a str> {
    obs.current_master.as_deref().filter(|m| *m != chosen)
}

/// After fencing: may the promotion of `chosen` go on? `fenced` are the
/// brokers that accepted `follow(chosen, new_epoch)`.
///
/// Under `SYNC` a write is acknowledged once the old master and
/// `min_in_sync_replicas` of its slaves hold it. A fenced slave acknowledges
/// nothing more. The chosen broker is not fenced: it keeps streaming from
/// the old master until it is promoted, and whatever it acknowledges it
/// holds when promoted. So a write acknowledged from now on that the chosen
/// broker lacks needs `min_in_sync_replicas` acknowledgements from slaves
/// that are neither fenced nor the chosen one. That is impossible once
/// `slaves - (fenced + 1) < min_in_sync_replicas`, i.e. once
/// `fenced + 1 >= slaves - min_in_sync_replicas + 1`: the same `needed` as
/// the decision's rule. A fenced old master (reachable, told to follow)
/// acknowledges nothing at all. `ASYNC` (and a policy allowing data loss)
/// fences what it can and goes on.
pub fn check_fenced(
    obs: &Observation,
    policy: &Policy,
    chosen: &str,
    fenced: &[String],
) -> Result<(), Hold> {
    if !sync_rule(policy) {
        return Ok(());
    }
    let (slaves, needed) = Group::new(obs, policy).sync_quorum();
    let old = old_master(obs, chosen);
    if needed == 0 || old.is_some_and(|m| fenced.iter().any(|f| f == m)) {
        return Ok(());
    }
    let others: BTreeSet<&str> = fenced
        .iter()
        .map(String::as_str)
        .filter(|f| *f != chosen)
        .collect();
    let count = u32::try_from(others.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    if count >= needed {
        Ok(())
    } else {
        Err(Hold::NotEnoughFenced {
            fenced: count,
            needed,
            slaves,
        })
    }
}

/// After fencing and measuring again: is `chosen` (`chosen_now`, `None` when
/// it did not answer) still the broker to promote? `fenced_now` are the
/// fenced brokers with their status measured after the fence (`None` for
/// one that did not answer).
///
/// It is not when a fenced broker holds log it lacks (judged as the decision
/// judges it): that broker received more from the old master after the
/// observation, possibly acknowledged writes. The old master itself is not
/// compared (the decision never promotes it over a slave). Under `SYNC` the
/// brokers measured with data (the chosen one, unless it is the recorded
/// master being reinstated, which the decision does not count either) must
/// still be `slaves - min_in_sync_replicas + 1`, the decision's rule applied
/// to offsets that can no longer grow behind the chosen broker's back.
pub fn check_measured(
    obs: &Observation,
    policy: &Policy,
    chosen: &str,
    chosen_now: Option<&BrokerStatus>,
    fenced_now: &[(String, Option<BrokerStatus>)],
) -> Result<(), Hold> {
    let Some(c) = chosen_now else {
        return Err(Hold::ChosenUnreachable {
            broker: chosen.to_owned(),
        });
    };
    let old = old_master(obs, chosen);
    let answered: Vec<(&str, &BrokerStatus)> = fenced_now
        .iter()
        .filter(|(name, _)| name != chosen && Some(name.as_str()) != old)
        .filter_map(|(name, s)| s.as_ref().map(|s| (name.as_str(), s)))
        .collect();
    if let Some((ahead, s)) = answered
        .iter()
        .filter(|(_, s)| holds_more(s, c))
        .max_by_key(|(name, s)| rank(name, s))
    {
        return Err(Hold::FencedHoldsMore {
            broker: (*ahead).to_owned(),
            epoch: s.epoch,
            max_offset: s.max_offset,
            chosen: chosen.to_owned(),
            chosen_epoch: c.epoch,
            chosen_offset: c.max_offset,
        });
    }
    if !sync_rule(policy) {
        return Ok(());
    }
    let (slaves, needed) = Group::new(obs, policy).sync_quorum();
    let mut with_data: BTreeSet<&str> = answered
        .iter()
        .filter(|(_, s)| !s.empty)
        .map(|(name, _)| *name)
        .collect();
    if !c.empty && obs.current_master.as_deref() != Some(chosen) {
        with_data.insert(chosen);
    }
    let measured = u32::try_from(with_data.len()).unwrap_or(u32::MAX);
    if needed == 0 || measured >= needed {
        Ok(())
    } else {
        Err(Hold::NotEnoughMeasured {
            measured,
            needed,
            slaves,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{BrokerObservation, Role};

    fn st(role: Role, epoch: u64, offset: u64) -> BrokerStatus {
        BrokerStatus {
            role,
            epoch,
            max_offset: offset,
            store_id: "s".into(),
            empty: offset == 0,
            master: None,
        }
    }

    fn obs(master: &str, names: &[&str]) -> Observation {
        Observation {
            group_epoch: 1,
            current_master: Some(master.into()),
            brokers: names
                .iter()
                .map(|n| BrokerObservation {
                    name: (*n).into(),
                    reachable: true,
                    ready: true,
                    status: Some(st(Role::Slave, 1, 100)),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn policy(mode: ReplicationMode, min_isr: u32, replicas: u32) -> Policy {
        Policy {
            mode,
            min_in_sync_replicas: min_isr,
            replicas,
            enabled: true,
            detection_delay: Duration::from_secs(1),
            allow_data_loss: false,
        }
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    /// 3 brokers, minISR 1: 2 slaves, needed 2 = the chosen one plus one fenced.
    #[test]
    fn sync_needs_all_but_min_isr_minus_one_slaves_fenced_counting_the_chosen_one() {
        let o = obs("a", &["a", "b", "c"]);
        let p = policy(ReplicationMode::Sync, 1, 3);
        assert_eq!(check_fenced(&o, &p, "b", &names(&["c"])), Ok(()));
        assert_eq!(
            check_fenced(&o, &p, "b", &[]),
            Err(Hold::NotEnoughFenced {
                fenced: 1,
                needed: 2,
                slaves: 2
            })
        );
        // The chosen one is not counted twice.
        assert!(check_fenced(&o, &p, "b", &names(&["b"])).is_err());
        // A fenced old master acknowledges nothing at all.
        assert_eq!(check_fenced(&o, &p, "b", &names(&["a"])), Ok(()));
        // 5 brokers, minISR 2: 4 slaves, needed 3: the chosen one and two fenced.
        let o = obs("a", &["a", "b", "c", "d", "e"]);
        let p = policy(ReplicationMode::Sync, 2, 5);
        assert!(check_fenced(&o, &p, "b", &names(&["c"])).is_err());
        assert_eq!(check_fenced(&o, &p, "b", &names(&["c", "d"])), Ok(()));
        // More in-sync slaves required than exist: nothing is acknowledged.
        let p = policy(ReplicationMode::Sync, 5, 5);
        assert_eq!(check_fenced(&o, &p, "b", &[]), Ok(()));
    }

    #[test]
    fn async_and_allowed_loss_fence_what_they_can_and_go_on() {
        let o = obs("a", &["a", "b", "c"]);
        assert_eq!(
            check_fenced(&o, &policy(ReplicationMode::Async, 1, 3), "b", &[]),
            Ok(())
        );
        let mut p = policy(ReplicationMode::Sync, 1, 3);
        p.allow_data_loss = true;
        assert_eq!(check_fenced(&o, &p, "b", &[]), Ok(()));
    }

    #[test]
    fn a_fenced_broker_holding_more_prevents_the_promotion() {
        let o = obs("a", &["a", "b", "c"]);
        for mode in [ReplicationMode::Sync, ReplicationMode::Async] {
            let p = policy(mode, 1, 3);
            let b = st(Role::Slave, 1, 100);
            let ahead = [("c".to_owned(), Some(st(Role::Slave, 1, 120)))];
            assert_eq!(
                check_measured(&o, &p, "b", Some(&b), &ahead),
                Err(Hold::FencedHoldsMore {
                    broker: "c".into(),
                    epoch: 1,
                    max_offset: 120,
                    chosen: "b".into(),
                    chosen_epoch: 1,
                    chosen_offset: 100,
                })
            );
            let equal = [("c".to_owned(), Some(st(Role::Slave, 1, 100)))];
            assert_eq!(check_measured(&o, &p, "b", Some(&b), &equal), Ok(()));
            // The old master is not compared.
            let old = [
                ("a".to_owned(), Some(st(Role::Master, 1, 500))),
                ("c".to_owned(), Some(st(Role::Slave, 1, 90))),
            ];
            assert_eq!(check_measured(&o, &p, "b", Some(&b), &old), Ok(()));
            assert_eq!(
                check_measured(&o, &p, "b", None, &equal),
                Err(Hold::ChosenUnreachable { broker: "b".into() })
            );
        }
    }

    #[test]
    fn sync_needs_enough_brokers_measured_after_the_fence() {
        let o = obs("a", &["a", "b", "c"]);
        let p = policy(ReplicationMode::Sync, 1, 3);
        let b = st(Role::Slave, 1, 100);
        assert_eq!(
            check_measured(&o, &p, "b", Some(&b), &[("c".into(), None)]),
            Err(Hold::NotEnoughMeasured {
                measured: 1,
                needed: 2,
                slaves: 2
            })
        );
        assert!(
            check_measured(
                &o,
                &p,
                "b",
                Some(&b),
                &[("c".into(), Some(st(Role::Slave, 0, 0)))]
            )
            .is_err(),
            "an empty store is not counted"
        );
        assert_eq!(
            check_measured(&o, &p, "b", Some(&b), &[("c".into(), Some(b.clone()))]),
            Ok(())
        );
    }

    /// Reinstating the recorded master: it is compared with every fenced
    /// broker, and (as in the decision) not counted among the slaves.
    #[test]
    fn reinstatement_compares_the_master_with_the_fenced_slaves() {
        let o = obs("a", &["a", "b", "c"]);
        let p = policy(ReplicationMode::Sync, 1, 3);
        let a = st(Role::Slave, 1, 100);
        let both = [
            ("b".to_owned(), Some(st(Role::Slave, 1, 100))),
            ("c".to_owned(), Some(st(Role::Slave, 1, 90))),
        ];
        assert_eq!(check_fenced(&o, &p, "a", &names(&["b", "c"])), Ok(()));
        assert_eq!(check_measured(&o, &p, "a", Some(&a), &both), Ok(()));
        let one = [("b".to_owned(), Some(st(Role::Slave, 1, 100)))];
        assert!(matches!(
            check_measured(&o, &p, "a", Some(&a), &one),
            Err(Hold::NotEnoughMeasured { measured: 1, .. })
        ));
        let ahead = [
            ("b".to_owned(), Some(st(Role::Slave, 1, 100))),
            ("c".to_owned(), Some(st(Role::Slave, 1, 101))),
        ];
        assert!(matches!(
            check_measured(&o, &p, "a", Some(&a), &ahead),
            Err(Hold::FencedHoldsMore { ref broker, .. }) if broker == "c"
        ));
    }
}
