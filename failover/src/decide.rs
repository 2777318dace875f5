//! The decision itself: [`decide`] and the reading of an observation it
//! relies on.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::{
    BrokerObservation, BrokerStatus, Decision, MasterFailure, Observation, Policy, PossibleLoss,
    PromoteReason, ReplicationMode, Role, WaitReason,
};

/// Decides what to do with a broker group, given one observation of it and
/// its policy. Pure: the same inputs always give the same decision, whatever
/// the order of `obs.brokers`.
///
/// In order:
/// 1. No recorded master: [`Decision::Bootstrap`] the broker holding the most
///    data in the newest epoch, once every member is up (or at once when data
///    loss is allowed).
/// 2. The master came back with an empty or replaced store while it (when
///    last seen) or other brokers held data: it has failed, whatever its
///    readiness.
/// 3. The master is up: if it is not serving as master in the group's epoch
///    (it restarted in standby), it is made master again in a new epoch,
///    unless it lost part of its log (a broker holds more, or its log ends
///    before where it was last seen), which makes it failed; otherwise stray
///    brokers are told to follow it, or the group is [`Decision::Healthy`].
/// 4. The master is down: failed at once when gone, after the detection delay
///    when unready; until then [`WaitReason::DetectionDelay`].
/// 5. A failed master is replaced under the mode's rule (see the crate docs),
///    or the decision is to wait and say why.
pub fn decide(obs: &Observation, policy: &Policy) -> Decision {
    let group = Group::new(obs, policy);
    match obs.current_master.as_deref() {
        None => group.bootstrap(),
        Some(master) => group.supervise(master),
    }
}

/// An observation read against the policy: members by name, the group's
/// size, and the next epoch to hand out.
pub(crate) struct Group<'a> {
    obs: &'a Observation,
    policy: &'a Policy,
    /// Members by name (the first observation of a name wins), so every walk
    /// over them is in name order and independent of the input order.
    members: BTreeMap<&'a str, &'a BrokerObservation>,
    /// Master plus slaves.
    size: u32,
    /// Above the group's epoch and every epoch any broker reported.
    next_epoch: u64,
}

/// A broker's status if its admin API answered this time.
fn known(b: &BrokerObservation) -> Option<&BrokerStatus> {
    b.status.as_ref().filter(|_| b.reachable)
}

/// A broker that answered and is ready: the only kind that may be promoted.
fn up(b: &BrokerObservation) -> Option<&BrokerStatus> {
    known(b).filter(|_| b.ready)
}

/// Orders brokers by how much of the log they hold: any data beats an empty
/// store, then a newer epoch beats any offset in an older one, then the
/// higher offset. Among equals a broker already serving as master is
/// preferred, then the smaller name, so the choice is deterministic.
pub(crate) fn rank<'a>(name: &'a str, s: &BrokerStatus) -> impl Ord + use<'a> {
    (
        !s.empty,
        s.epoch,
        s.max_offset,
        s.role == Role::Master,
        Reverse(name),
    )
}

/// `a` holds log that `b` lacks, judged by (epoch, offset) on non-empty stores.
pub(crate) fn holds_more(a: &BrokerStatus, b: &BrokerStatus) -> bool {
    !a.empty && (b.empty || (a.epoch, a.max_offset) > (b.epoch, b.max_offset))
}

impl<'a> Group<'a> {
    pub(crate) fn new(obs: &'a Observation, policy: &'a Policy) -> Self {
        let mut members = BTreeMap::new();
        for b in &obs.brokers {
            members.entry(b.name.as_str()).or_insert(b);
        }
        let master_unlisted = obs
            .current_master
            .as_deref()
            .is_some_and(|m| !members.contains_key(m));
        let listed =
            u32::try_from(members.len() + usize::from(master_unlisted)).unwrap_or(u32::MAX);
        let newest = obs
            .brokers
            .iter()
            .filter_map(|b| b.status.as_ref().map(|s| s.epoch))
            .fold(obs.group_epoch, u64::max);
        Group {
            obs,
            policy,
            members,
            size: policy.replicas.max(listed),
            next_epoch: newest.saturating_add(1),
        }
    }

    /// `(slaves, needed)` under `SYNC`: the group's slaves, and how many of
    /// them must be compared for one to hold every acknowledged record
    /// (`slaves - min_in_sync_replicas + 1`, zero when more in-sync slaves
    /// are required than exist: then nothing is ever acknowledged).
    pub(crate) fn sync_quorum(&self) -> (u32, u32) {
        let slaves = self.size.saturating_sub(1);
        let needed = (slaves + 1).saturating_sub(self.policy.min_in_sync_replicas);
        (slaves, needed)
    }

    /// Members other than `except`, in name order.
    fn others(
        &self,
        except: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a BrokerObservation)> + '_ {
        self.members
            .iter()
            .filter(move |(name, _)| **name != except)
            .map(|(name, b)| (*name, *b))
    }

    /// The reachable brokers other than `new_master`, to point at it.
    fn followers_of(&self, new_master: &str) -> Vec<String> {
        self.others(new_master)
            .filter(|(_, b)| known(b).is_some())
            .map(|(name, _)| name.to_owned())
            .collect()
    }

    /// No master yet: choose the broker holding the most data, but only once
    /// every member can be compared (unless data loss is allowed).
    fn bootstrap(&self) -> Decision {
        let up: Vec<(&str, &BrokerStatus)> = self
            .members
            .iter()
            .filter_map(|(name, b)| up(b).map(|s| (*name, s)))
            .collect();
        let up_count = u32::try_from(up.len()).unwrap_or(u32::MAX);
        let waiting = Decision::Wait {
            reason: WaitReason::WaitingForMembers {
                up: up_count,
                total: self.size,
            },
        };
        if up_count < self.size && !self.policy.allow_data_loss {
            return waiting;
        }
        match up.into_iter().max_by_key(|(name, s)| rank(name, s)) {
            Some((name, _)) => Decision::Bootstrap {
                broker: name.to_owned(),
                epoch: self.next_epoch,
                followers: self.followers_of(name),
            },
            None => waiting,
        }
    }

    /// There is a recorded master: is it serving, restarting, or failed?
    fn supervise(&self, master: &'a str) -> Decision {
        let observed = self.members.get(master).copied();
        if let Some(s) = observed.and_then(known)
            && self.store_lost(master, s)
        {
            return self.fail_over(master, MasterFailure::StoreLost);
        }
        if let Some(s) = observed.and_then(up) {
            if s.role == Role::Master && s.epoch >= self.obs.group_epoch {
                return self.tidy(master, s);
            }
            // Back, but not serving as master: a master that restarted in
            // standby. Nothing was written meanwhile, so it is safe to make it
            // master again unless it lost part of its log (a broker holds
            // more, or it ends before where it was last seen).
            if let Some((ahead, _)) = self
                .others(master)
                .filter_map(|(name, b)| known(b).map(|o| (name, o)))
                .find(|(_, o)| holds_more(o, s))
            {
                let failure = MasterFailure::Behind {
                    broker: ahead.to_owned(),
                };
                return self.fail_over(master, failure);
            }
            if let Some(last_known) = self
                .obs
                .last_known_master_offset
                .filter(|end| *end > s.max_offset)
            {
                let failure = MasterFailure::Truncated {
                    max_offset: s.max_offset,
                    last_known,
                };
                return self.fail_over(master, failure);
            }
            // Under SYNC, "nobody holds more" proves nothing unless enough
            // slaves are there to ask: it may have lost a tail written after
            // it was last seen (an unflushed one), which only a slave that is
            // down now would hold. The promotion rule applies as to any
            // other promotion.
            let mut possible_loss = PossibleLoss::Nothing;
            if self.policy.mode == ReplicationMode::Sync {
                let (slaves, needed) = self.sync_quorum();
                let with_data = self
                    .others(master)
                    .filter_map(|(_, b)| up(b))
                    .filter(|o| !o.empty)
                    .count();
                let with_data = u32::try_from(with_data).unwrap_or(u32::MAX);
                if needed > 0 && with_data < needed {
                    if !self.policy.allow_data_loss {
                        return Decision::Wait {
                            reason: WaitReason::NotEnoughReachableSlaves {
                                failure: MasterFailure::Restarted {
                                    max_offset: s.max_offset,
                                },
                                reachable: with_data,
                                needed,
                                slaves,
                            },
                        };
                    }
                    possible_loss = PossibleLoss::Unknown;
                }
            }
            return Decision::Promote {
                broker: master.to_owned(),
                new_epoch: self.next_epoch,
                followers: self.followers_of(master),
                possible_loss,
                reason: PromoteReason::Reinstate,
            };
        }
        if self.obs.master_gone {
            return self.fail_over(master, MasterFailure::Gone);
        }
        let unready_for = self.obs.master_unready_for.unwrap_or(Duration::ZERO);
        if unready_for >= self.policy.detection_delay {
            return self.fail_over(master, MasterFailure::Unready { unready_for });
        }
        Decision::Wait {
            reason: WaitReason::DetectionDelay {
                unready_for,
                remaining: self.policy.detection_delay - unready_for,
            },
        }
    }

    /// The master answers with an empty or different store while it, or the
    /// group, had data: whatever it acknowledged is gone from it.
    fn store_lost(&self, master: &str, s: &BrokerStatus) -> bool {
        let replaced = self
            .obs
            .master_store_id
            .as_deref()
            .is_some_and(|id| id != s.store_id);
        if !s.empty && !replaced {
            return false;
        }
        let data_elsewhere = || {
            self.others(master)
                .filter_map(|(_, b)| known(b))
                .any(|o| !o.empty)
        };
        match self.obs.last_known_master_offset {
            // It was seen holding data.
            Some(end) if end > 0 => true,
            // It was seen empty: a new store is only a loss if others hold
            // data it never had.
            Some(_) => replaced && data_elsewhere(),
            None => data_elsewhere(),
        }
    }

    /// The master serves: point brokers that do not follow it at it.
    fn tidy(&self, master: &str, s: &BrokerStatus) -> Decision {
        let known_others: Vec<(&str, &BrokerStatus)> = self
            .others(master)
            .filter_map(|(name, b)| known(b).map(|o| (name, o)))
            .collect();
        if let Some((rival, o)) = known_others.iter().find(|(_, o)| o.epoch > s.epoch) {
            return Decision::Wait {
                reason: WaitReason::NewerEpochElsewhere {
                    broker: (*rival).to_owned(),
                    epoch: o.epoch,
                    master_epoch: s.epoch,
                },
            };
        }
        let strays: Vec<String> = known_others
            .iter()
            .filter(|(_, o)| o.role != Role::Slave || o.master.as_deref() != Some(master))
            .map(|(name, _)| (*name).to_owned())
            .collect();
        if strays.is_empty() {
            Decision::Healthy
        } else {
            Decision::MakeFollow {
                brokers: strays,
                master: master.to_owned(),
                epoch: s.epoch,
            }
        }
    }

    /// The master has failed: replace it under the mode's rule, or wait.
    fn fail_over(&self, master: &'a str, failure: MasterFailure) -> Decision {
        let wait = |reason| Decision::Wait { reason };
        if !self.policy.enabled {
            return wait(WaitReason::FailoverDisabled { failure });
        }
        let candidates: Vec<(&str, &BrokerStatus)> = self
            .others(master)
            .filter_map(|(name, b)| up(b).map(|s| (name, s)))
            .collect();
        let best = |pool: &[(&'a str, &'a BrokerStatus)]| {
            pool.iter().copied().max_by_key(|(name, s)| rank(name, s))
        };
        let Some((best_name, best_status)) = best(&candidates) else {
            return wait(WaitReason::NoCandidate { failure });
        };
        let promote = |name: &str, possible_loss| Decision::Promote {
            broker: name.to_owned(),
            new_epoch: self.next_epoch,
            followers: self.followers_of(name),
            possible_loss,
            reason: PromoteReason::MasterFailed(failure.clone()),
        };
        match self.policy.mode {
            ReplicationMode::Sync => {
                let (slaves, needed) = self.sync_quorum();
                let with_data = candidates.iter().filter(|(_, s)| !s.empty).count();
                let with_data = u32::try_from(with_data).unwrap_or(u32::MAX);
                if needed == 0 {
                    // More in-sync slaves required than exist: no send could
                    // ever be acknowledged, so nothing acknowledged can be lost.
                    promote(best_name, PossibleLoss::Nothing)
                } else if with_data >= needed {
                    // At least one of these holds every acknowledged record,
                    // and the best of them holds all of them.
                    promote(best_name, PossibleLoss::Nothing)
                } else if self.policy.allow_data_loss {
                    promote(best_name, PossibleLoss::Unknown)
                } else {
                    wait(WaitReason::NotEnoughReachableSlaves {
                        failure,
                        reachable: with_data,
                        needed,
                        slaves,
                    })
                }
            }
            ReplicationMode::Async => {
                let loss = match self.obs.last_known_master_offset {
                    Some(end) => PossibleLoss::Bytes(end.saturating_sub(best_status.max_offset)),
                    None => PossibleLoss::Unknown,
                };
                if best_status.empty
                    && loss != PossibleLoss::Bytes(0)
                    && !self.policy.allow_data_loss
                {
                    wait(WaitReason::OnlyEmptyStores { failure })
                } else {
                    promote(best_name, loss)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerObservation;

    const DELAY: Duration = Duration::from_secs(10);

    fn status(
        role: Role,
        epoch: u64,
        offset: u64,
        master: Option<&str>,
        store: &str,
    ) -> BrokerStatus {
        BrokerStatus {
            role,
            epoch,
            max_offset: offset,
            store_id: store.to_owned(),
            empty: offset == 0,
            master: master.map(str::to_owned),
        }
    }

    /// A reachable, ready master of `epoch` with its log ending at `offset`.
    fn master(name: &str, epoch: u64, offset: u64) -> BrokerObservation {
        BrokerObservation {
            name: name.to_owned(),
            reachable: true,
            ready: true,
            status: Some(status(
                Role::Master,
                epoch,
                offset,
                None,
                &format!("store-{name}"),
            )),
        }
    }

    /// A reachable, ready slave of `of`, its log's tail in `epoch`.
    fn slave(name: &str, epoch: u64, offset: u64, of: &str) -> BrokerObservation {
        BrokerObservation {
            name: name.to_owned(),
            reachable: true,
            ready: true,
            status: Some(status(
                Role::Slave,
                epoch,
                offset,
                Some(of),
                &format!("store-{name}"),
            )),
        }
    }

    /// A broker whose admin API does not answer (killed, partitioned).
    fn down(name: &str) -> BrokerObservation {
        BrokerObservation {
            name: name.to_owned(),
            reachable: false,
            ready: false,
            status: None,
        }
    }

    fn policy(mode: ReplicationMode, min_in_sync_replicas: u32, replicas: u32) -> Policy {
        Policy {
            mode,
            min_in_sync_replicas,
            replicas,
            enabled: true,
            detection_delay: DELAY,
            allow_data_loss: false,
        }
    }

    fn sync(min_in_sync_replicas: u32, replicas: u32) -> Policy {
        policy(ReplicationMode::Sync, min_in_sync_replicas, replicas)
    }

    fn group(current_master: &str, epoch: u64, brokers: Vec<BrokerObservation>) -> Observation {
        Observation {
            group_epoch: epoch,
            current_master: Some(current_master.to_owned()),
            master_store_id: Some(format!("store-{current_master}")),
            last_known_master_offset: None,
            brokers,
            master_unready_for: None,
            master_gone: false,
        }
    }

    /// The master `b-0` has been down past the detection delay.
    fn master_dead(mut obs: Observation) -> Observation {
        let m = obs.current_master.clone().expect("a master");
        for b in &mut obs.brokers {
            if b.name == m {
                *b = down(&m);
            }
        }
        obs.master_unready_for = Some(DELAY);
        obs
    }

    /// Carries a decision out the way the brokers would: the promoted broker
    /// becomes master of the new epoch, its followers follow it (truncating
    /// whatever they held beyond it), the status records the new master.
    fn apply(obs: &Observation, decision: &Decision) -> Observation {
        let mut next = obs.clone();
        let (new_master, epoch, followers) = match decision {
            Decision::Promote {
                broker,
                new_epoch,
                followers,
                ..
            } => (broker.clone(), *new_epoch, followers.clone()),
            Decision::Bootstrap {
                broker,
                epoch,
                followers,
            } => (broker.clone(), *epoch, followers.clone()),
            other => panic!("nothing to apply for {other:?}"),
        };
        let head = next
            .brokers
            .iter()
            .find(|b| b.name == new_master)
            .and_then(|b| b.status.clone())
            .expect("promoted broker has a status");
        for b in &mut next.brokers {
            let Some(s) = b.status.as_mut().filter(|_| b.reachable) else {
                continue;
            };
            if b.name == new_master {
                s.role = Role::Master;
                s.epoch = epoch;
                s.master = None;
                next.master_store_id = Some(s.store_id.clone());
                next.last_known_master_offset = Some(s.max_offset);
            } else if followers.contains(&b.name) {
                s.role = Role::Slave;
                s.master = Some(new_master.clone());
                if (s.epoch, s.max_offset) > (head.epoch, head.max_offset) {
                    s.epoch = s.epoch.min(head.epoch);
                    s.max_offset = s.max_offset.min(head.max_offset);
                }
            }
        }
        next.group_epoch = epoch;
        next.current_master = Some(new_master);
        next.master_unready_for = None;
        next.master_gone = false;
        next
    }

    /// The master writes `bytes` in its epoch; `acked_by` slaves receive them.
    fn write(obs: &mut Observation, bytes: u64, acked_by: &[&str]) {
        let m = obs.current_master.clone().expect("a master");
        let (epoch, end) = {
            let s = obs
                .brokers
                .iter_mut()
                .find(|b| b.name == m)
                .and_then(|b| b.status.as_mut())
                .expect("master status");
            s.max_offset += bytes;
            s.empty = false;
            (s.epoch, s.max_offset)
        };
        obs.last_known_master_offset = Some(end);
        for b in &mut obs.brokers {
            if acked_by.contains(&b.name.as_str()) {
                let s = b.status.as_mut().expect("slave status");
                s.epoch = epoch;
                s.max_offset = end;
                s.empty = false;
            }
        }
    }

    fn promoted(d: &Decision) -> (&str, u64) {
        match d {
            Decision::Promote {
                broker, new_epoch, ..
            } => (broker, *new_epoch),
            other => panic!("expected a promotion, got {other:?}"),
        }
    }

    fn wait_reason(d: Decision) -> WaitReason {
        match d {
            Decision::Wait { reason } => reason,
            other => panic!("expected to wait, got {other:?}"),
        }
    }

    fn three(m_offset: u64, s1: u64, s2: u64) -> Observation {
        group(
            "b-0",
            1,
            vec![
                master("b-0", 1, m_offset),
                slave("b-1", 1, s1, "b-0"),
                slave("b-2", 1, s2, "b-0"),
            ],
        )
    }

    #[test]
    fn a_serving_master_with_following_slaves_is_healthy() {
        assert_eq!(
            decide(&three(300, 300, 250), &sync(1, 3)),
            Decision::Healthy
        );
        assert_eq!(
            decide(&three(300, 300, 250), &policy(ReplicationMode::Async, 0, 3)),
            Decision::Healthy
        );
    }

    #[test]
    fn killed_master_is_replaced_by_the_slave_with_the_higher_offset() {
        let obs = master_dead(three(300, 200, 300));
        let d = decide(&obs, &sync(1, 3));
        assert_eq!(
            d,
            Decision::Promote {
                broker: "b-2".into(),
                new_epoch: 2,
                followers: vec!["b-1".into()],
                possible_loss: PossibleLoss::Nothing,
                reason: PromoteReason::MasterFailed(MasterFailure::Unready { unready_for: DELAY }),
            }
        );
    }

    #[test]
    fn a_lagging_slave_is_not_chosen_whatever_its_name_or_position() {
        // b-1 sorts first and is listed first, but lags.
        let mut obs = master_dead(three(300, 299, 300));
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-2", 2));
        obs.brokers.reverse();
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-2", 2));
        // Equal offsets: the smaller name, deterministically.
        let obs = master_dead(three(300, 300, 300));
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-1", 2));
    }

    #[test]
    fn a_newer_epoch_beats_a_higher_offset_in_an_older_one() {
        // b-0 (epoch 1, offset 900, never replicated past 500) was replaced by
        // b-1 in epoch 2; b-1 now fails too. b-0 came back with its old tail.
        let mut obs = group(
            "b-1",
            2,
            vec![
                BrokerObservation {
                    status: Some(status(Role::Master, 1, 900, None, "store-b-0")),
                    ..master("b-0", 1, 900)
                },
                down("b-1"),
                slave("b-2", 2, 600, "b-1"),
            ],
        );
        obs.master_gone = true;
        let d = decide(&obs, &sync(1, 3));
        assert_eq!(promoted(&d), ("b-2", 3));
        let Decision::Promote { followers, .. } = d else {
            unreachable!()
        };
        assert_eq!(followers, vec!["b-0".to_owned()]);
    }

    #[test]
    fn too_few_reachable_slaves_means_waiting_unless_data_loss_is_allowed() {
        // 2 slaves, minInSync 1: a record may be acked by either, so both are
        // needed (2 - 1 + 1). b-2 is unreachable.
        let mut obs = master_dead(three(300, 300, 300));
        obs.brokers[2] = down("b-2");
        let reason = wait_reason(decide(&obs, &sync(1, 3)));
        assert_eq!(
            reason,
            WaitReason::NotEnoughReachableSlaves {
                failure: MasterFailure::Unready { unready_for: DELAY },
                reachable: 1,
                needed: 2,
                slaves: 2,
            }
        );
        assert_eq!(
            reason.to_string(),
            "the master has been unready for 10s; 1 of 2 slaves are reachable and ready with data, \
             2 are needed to be sure no acknowledged message is lost; \
             allowing data loss in the failover policy would promote anyway"
        );

        let lossy = Policy {
            allow_data_loss: true,
            ..sync(1, 3)
        };
        let d = decide(&obs, &lossy);
        assert_eq!(promoted(&d), ("b-1", 2));
        assert!(matches!(
            d,
            Decision::Promote {
                possible_loss: PossibleLoss::Unknown,
                ..
            }
        ));

        // The same group with minInSync 2: every ack is on both slaves, so
        // one reachable slave is enough (2 - 2 + 1).
        assert_eq!(promoted(&decide(&obs, &sync(2, 3))), ("b-1", 2));
    }

    #[test]
    fn a_member_missing_from_the_observation_still_counts_in_the_quorum() {
        // replicas = 3 but only two brokers listed: b-2 is not forgotten.
        let mut obs = master_dead(three(300, 300, 300));
        obs.brokers.truncate(2);
        assert!(matches!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::NotEnoughReachableSlaves {
                reachable: 1,
                needed: 2,
                ..
            }
        ));
    }

    #[test]
    fn a_reachable_but_unready_slave_is_not_promoted_nor_counted() {
        let mut obs = master_dead(three(300, 100, 300));
        obs.brokers[2].ready = false;
        assert!(matches!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::NotEnoughReachableSlaves { reachable: 1, .. }
        ));
        // With minInSync 2 one slave suffices, and it must be the ready one.
        assert_eq!(promoted(&decide(&obs, &sync(2, 3))), ("b-1", 2));
    }

    #[test]
    fn an_empty_slave_does_not_count_towards_the_quorum() {
        // b-2 restarted with a fresh volume: it may have acked records it no
        // longer holds.
        let obs = master_dead(three(300, 300, 0));
        assert!(matches!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::NotEnoughReachableSlaves {
                reachable: 1,
                needed: 2,
                ..
            }
        ));
    }

    #[test]
    fn min_in_sync_zero_in_sync_mode_can_never_fail_over_safely() {
        let obs = master_dead(three(300, 300, 300));
        assert!(matches!(
            wait_reason(decide(&obs, &sync(0, 3))),
            WaitReason::NotEnoughReachableSlaves {
                reachable: 2,
                needed: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_master_that_restarted_empty_is_replaced_at_once_and_then_follows() {
        // The master's volume was lost; it restarted (ready, role slave,
        // empty) before the detection delay could even start.
        let mut obs = three(300, 300, 280);
        obs.last_known_master_offset = Some(300);
        obs.brokers[0] = BrokerObservation {
            status: Some(status(Role::Slave, 0, 0, None, "store-new")),
            ..master("b-0", 1, 0)
        };
        let d = decide(&obs, &sync(1, 3));
        assert_eq!(
            d,
            Decision::Promote {
                broker: "b-1".into(),
                new_epoch: 2,
                followers: vec!["b-0".into(), "b-2".into()],
                possible_loss: PossibleLoss::Nothing,
                reason: PromoteReason::MasterFailed(MasterFailure::StoreLost),
            }
        );
        // Once carried out, the group is healthy and the old master follows.
        let next = apply(&obs, &d);
        assert_eq!(decide(&next, &sync(1, 3)), Decision::Healthy);

        // Had the executor not reached b-0, the next round points it at b-1.
        let mut next = next;
        next.brokers[0].status.as_mut().unwrap().master = None;
        assert_eq!(
            decide(&next, &sync(1, 3)),
            Decision::MakeFollow {
                brokers: vec!["b-0".into()],
                master: "b-1".into(),
                epoch: 2,
            }
        );
    }

    #[test]
    fn a_master_with_a_replaced_store_is_replaced_even_if_it_still_serves() {
        let mut obs = three(300, 300, 300);
        obs.brokers[0].status.as_mut().unwrap().store_id = "store-restored".into();
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-1", 2));
        // With failover disabled it is reported, not acted on.
        let off = Policy {
            enabled: false,
            ..sync(1, 3)
        };
        assert_eq!(
            wait_reason(decide(&obs, &off)),
            WaitReason::FailoverDisabled {
                failure: MasterFailure::StoreLost
            }
        );
    }

    #[test]
    fn an_empty_master_of_a_fresh_group_is_fine() {
        assert_eq!(decide(&three(0, 0, 0), &sync(1, 3)), Decision::Healthy);
    }

    #[test]
    fn two_failures_in_a_row_promote_again_only_when_the_rule_allows() {
        for (min_in_sync, second_allowed) in [(1, false), (2, true)] {
            let p = sync(min_in_sync, 3);
            let mut obs = three(0, 0, 0);
            write(&mut obs, 100, &["b-1", "b-2"]);
            write(&mut obs, 50, &["b-1"]); // b-2 lags
            if min_in_sync == 2 {
                write(&mut obs, 0, &["b-2"]);
            }
            let first = decide(&master_dead(obs.clone()), &p);
            assert_eq!(promoted(&first), ("b-1", 2));
            let mut obs = apply(&master_dead(obs), &first);
            assert_eq!(decide(&obs, &p), Decision::Healthy);
            // b-0 never came back; epoch 2 writes reach b-2 only.
            write(&mut obs, 40, &["b-2"]);
            // Now b-1 fails as well: only b-2 is left.
            let second = decide(&master_dead(obs.clone()), &p);
            if second_allowed {
                assert_eq!(promoted(&second), ("b-2", 3));
            } else {
                assert!(matches!(
                    wait_reason(second),
                    WaitReason::NotEnoughReachableSlaves {
                        reachable: 1,
                        needed: 2,
                        slaves: 2,
                        ..
                    }
                ));
            }
        }
    }

    #[test]
    fn flapping_readiness_never_promotes_before_the_delay() {
        let mut obs = three(300, 300, 300);
        obs.brokers[0].ready = false;
        for secs in [0, 3, 9] {
            obs.master_unready_for = Some(Duration::from_secs(secs));
            assert_eq!(
                wait_reason(decide(&obs, &sync(1, 3))),
                WaitReason::DetectionDelay {
                    unready_for: Duration::from_secs(secs),
                    remaining: DELAY - Duration::from_secs(secs),
                }
            );
        }
        // Ready again: healthy, even if the caller still reports a duration.
        obs.brokers[0].ready = true;
        assert_eq!(decide(&obs, &sync(1, 3)), Decision::Healthy);
        // Unready again, the caller restarted the count: still no promotion.
        obs.brokers[0].ready = false;
        obs.master_unready_for = Some(Duration::from_millis(9_999));
        let reason = wait_reason(decide(&obs, &sync(1, 3)));
        assert_eq!(
            reason.to_string(),
            "the master has been unready for 10.0s; it counts as failed in 1ms (detection delay)"
        );
        // No duration at all counts as zero, not as failed.
        obs.master_unready_for = None;
        assert!(matches!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::DetectionDelay { .. }
        ));
        // Exactly the delay: failed.
        obs.master_unready_for = Some(DELAY);
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-1", 2));
    }

    #[test]
    fn a_gone_master_fails_at_once_but_an_answering_one_is_not_gone() {
        let mut obs = three(300, 300, 300);
        obs.master_gone = true;
        assert_eq!(decide(&obs, &sync(1, 3)), Decision::Healthy);
        obs.brokers[0] = down("b-0");
        let d = decide(&obs, &sync(1, 3));
        assert!(matches!(
            d,
            Decision::Promote {
                reason: PromoteReason::MasterFailed(MasterFailure::Gone),
                ..
            }
        ));
    }

    #[test]
    fn failover_disabled_reports_the_failure_and_still_honours_the_delay() {
        let off = Policy {
            enabled: false,
            ..sync(1, 3)
        };
        let mut obs = master_dead(three(300, 300, 300));
        obs.master_unready_for = Some(Duration::from_secs(2));
        assert!(matches!(
            wait_reason(decide(&obs, &off)),
            WaitReason::DetectionDelay { .. }
        ));
        obs.master_unready_for = Some(Duration::from_secs(30));
        let reason = wait_reason(decide(&obs, &off));
        assert_eq!(
            reason.to_string(),
            "the master has been unready for 30s, but failover is disabled"
        );
    }

    #[test]
    fn bootstrap_chooses_the_broker_with_the_most_data_never_an_empty_one() {
        let standby = |name: &str, epoch, offset| BrokerObservation {
            status: Some(status(
                Role::Slave,
                epoch,
                offset,
                None,
                &format!("store-{name}"),
            )),
            ..master(name, epoch, offset)
        };
        let mut obs = Observation {
            brokers: vec![
                standby("b-0", 0, 0),
                standby("b-1", 1, 500),
                standby("b-2", 2, 100),
            ],
            ..Observation::default()
        };
        assert_eq!(
            decide(&obs, &sync(1, 3)),
            Decision::Bootstrap {
                broker: "b-2".into(),
                epoch: 3,
                followers: vec!["b-0".into(), "b-1".into()],
            }
        );
        // Only the empty broker and one with data are up: the empty one is
        // not chosen, and nothing is chosen while b-2 is still starting.
        obs.brokers[2] = down("b-2");
        assert_eq!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::WaitingForMembers { up: 2, total: 3 }
        );
        let lossy = Policy {
            allow_data_loss: true,
            ..sync(1, 3)
        };
        assert!(matches!(
            decide(&obs, &lossy),
            Decision::Bootstrap { broker, epoch: 2, .. } if broker == "b-1"
        ));
        // A brand-new group: all empty, the first by name.
        let fresh = Observation {
            brokers: vec![standby("b-1", 0, 0), standby("b-0", 0, 0)],
            ..Observation::default()
        };
        assert!(matches!(
            decide(&fresh, &sync(1, 2)),
            Decision::Bootstrap { broker, epoch: 1, .. } if broker == "b-0"
        ));
    }

    #[test]
    fn async_failover_reports_the_bytes_that_may_be_lost() {
        let p = policy(ReplicationMode::Async, 0, 3);
        let mut obs = master_dead(three(300, 220, 250));
        obs.last_known_master_offset = Some(300);
        let d = decide(&obs, &p);
        assert_eq!(promoted(&d), ("b-2", 2));
        assert!(matches!(
            d,
            Decision::Promote {
                possible_loss: PossibleLoss::Bytes(50),
                ..
            }
        ));
        assert!(d.to_string().contains("up to 50 bytes may be lost"), "{d}");
        // One slave is enough in ASYNC.
        obs.brokers[2] = down("b-2");
        let d = decide(&obs, &p);
        assert_eq!(promoted(&d), ("b-1", 2));
        assert!(matches!(
            d,
            Decision::Promote {
                possible_loss: PossibleLoss::Bytes(80),
                ..
            }
        ));
        // Master end never seen: unknown.
        obs.last_known_master_offset = None;
        assert!(matches!(
            decide(&obs, &p),
            Decision::Promote {
                possible_loss: PossibleLoss::Unknown,
                ..
            }
        ));
    }

    #[test]
    fn async_does_not_promote_an_empty_store_over_the_masters_data() {
        let p = policy(ReplicationMode::Async, 0, 2);
        let mut obs = master_dead(group(
            "b-0",
            1,
            vec![master("b-0", 1, 300), slave("b-1", 0, 0, "b-0")],
        ));
        obs.last_known_master_offset = Some(300);
        assert!(matches!(
            wait_reason(decide(&obs, &p)),
            WaitReason::OnlyEmptyStores { .. }
        ));
        // Nothing was ever written: nothing to lose.
        obs.last_known_master_offset = Some(0);
        assert_eq!(promoted(&decide(&obs, &p)), ("b-1", 2));
    }

    #[test]
    fn brokers_not_following_the_master_are_told_to() {
        let mut obs = three(300, 300, 300);
        obs.group_epoch = 2;
        obs.brokers[0].status.as_mut().unwrap().epoch = 2;
        // b-1: an old master that came back still believing it is master.
        obs.brokers[1].status.as_mut().unwrap().role = Role::Master;
        obs.brokers[1].status.as_mut().unwrap().master = None;
        // b-2: follows someone else.
        obs.brokers[2].status.as_mut().unwrap().master = Some("b-9".into());
        // b-3: restarted empty, waiting in standby.
        obs.brokers.push(BrokerObservation {
            status: Some(status(Role::Slave, 0, 0, None, "store-b-3")),
            ..slave("b-3", 0, 0, "b-0")
        });
        // b-4: catching up in an older epoch, following the right master: fine.
        obs.brokers.push(slave("b-4", 1, 10, "b-0"));
        // b-5: unreachable: nothing can be told to it now.
        obs.brokers.push(down("b-5"));
        assert_eq!(
            decide(&obs, &sync(1, 6)),
            Decision::MakeFollow {
                brokers: vec!["b-1".into(), "b-2".into(), "b-3".into()],
                master: "b-0".into(),
                epoch: 2,
            }
        );
    }

    #[test]
    fn a_broker_with_a_newer_epoch_than_the_master_stops_everything() {
        let mut obs = three(300, 300, 300);
        obs.brokers[2].status.as_mut().unwrap().epoch = 5;
        assert_eq!(
            wait_reason(decide(&obs, &sync(1, 3))),
            WaitReason::NewerEpochElsewhere {
                broker: "b-2".into(),
                epoch: 5,
                master_epoch: 1,
            }
        );
    }

    #[test]
    fn a_master_that_restarted_in_standby_is_reinstated_unless_it_lost_data() {
        let mut obs = three(300, 300, 250);
        {
            let s = obs.brokers[0].status.as_mut().unwrap();
            s.role = Role::Slave;
        }
        assert_eq!(
            decide(&obs, &sync(1, 3)),
            Decision::Promote {
                broker: "b-0".into(),
                new_epoch: 2,
                followers: vec!["b-1".into(), "b-2".into()],
                possible_loss: PossibleLoss::Nothing,
                reason: PromoteReason::Reinstate,
            }
        );
        // Reinstating is not a failover: it happens with failover disabled.
        let off = Policy {
            enabled: false,
            ..sync(1, 3)
        };
        assert_eq!(promoted(&decide(&obs, &off)), ("b-0", 2));
        // It came back shorter than b-1 (lost its unflushed tail): b-1 holds
        // acknowledged records it lacks, so b-1 takes over.
        obs.brokers[0].status.as_mut().unwrap().max_offset = 280;
        let d = decide(&obs, &sync(1, 3));
        assert_eq!(
            d,
            Decision::Promote {
                broker: "b-1".into(),
                new_epoch: 2,
                followers: vec!["b-0".into(), "b-2".into()],
                possible_loss: PossibleLoss::Nothing,
                reason: PromoteReason::MasterFailed(MasterFailure::Behind {
                    broker: "b-1".into()
                }),
            }
        );
        // A master whose promotion was recorded (epoch 2) but never carried
        // out serves epoch 1: make it master of a new epoch.
        let mut obs = three(300, 300, 300);
        obs.group_epoch = 2;
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-0", 3));
    }

    #[test]
    fn a_master_that_restarted_shorter_than_last_seen_is_not_reinstated() {
        // It was seen at 300, came back in standby at 280 (its node died with
        // 20 bytes unflushed). b-1 holds 280 too, so "nobody holds more" is
        // not enough to trust it.
        let mut obs = three(280, 280, 280);
        obs.brokers[0].status.as_mut().unwrap().role = Role::Slave;
        obs.brokers[2] = down("b-2");
        obs.last_known_master_offset = Some(300);
        let failure = MasterFailure::Truncated {
            max_offset: 280,
            last_known: 300,
        };
        let reason = wait_reason(decide(&obs, &sync(1, 3)));
        assert_eq!(
            reason.to_string(),
            "the master restarted with its log ending at offset 280, before the offset 300 \
             it was last seen at; 1 of 2 slaves are reachable and ready with data, 2 are needed \
             to be sure no acknowledged message is lost; \
             allowing data loss in the failover policy would promote anyway"
        );
        // With minInSync 2 every ack is on b-1 as well: it takes over.
        let d = decide(&obs, &sync(2, 3));
        assert_eq!(promoted(&d), ("b-1", 2));
        assert!(
            matches!(d, Decision::Promote { reason: PromoteReason::MasterFailed(f), .. } if f == failure)
        );
    }

    #[test]
    fn a_restarted_master_is_reinstated_only_with_enough_slaves_to_check_it() {
        // Back in standby at 300, where it was last seen; b-1 holds 290 and
        // b-2 is down. b-2 may hold records acknowledged after the last look
        // that the master lost with an unflushed tail: with minInSync 1 both
        // slaves must be asked.
        let mut obs = three(300, 290, 0);
        obs.brokers[0].status.as_mut().unwrap().role = Role::Slave;
        obs.brokers[2] = down("b-2");
        obs.last_known_master_offset = Some(300);
        let reason = wait_reason(decide(&obs, &sync(1, 3)));
        assert_eq!(
            reason.to_string(),
            "the master restarted in standby with its log ending at offset 300; 1 of 2 slaves \
             are reachable and ready with data, 2 are needed to be sure no acknowledged message \
             is lost; allowing data loss in the failover policy would promote anyway"
        );
        // With minInSync 2 every acknowledged record is on b-1 too, which
        // holds no more than the master: it is safe to reinstate.
        let d = decide(&obs, &sync(2, 3));
        assert_eq!(promoted(&d), ("b-0", 2));
        assert!(matches!(
            d,
            Decision::Promote {
                reason: PromoteReason::Reinstate,
                possible_loss: PossibleLoss::Nothing,
                ..
            }
        ));
        // Allowed to lose data, it is reinstated, and the loss is unknown.
        let mut lossy = sync(1, 3);
        lossy.allow_data_loss = true;
        assert!(matches!(
            decide(&obs, &lossy),
            Decision::Promote {
                reason: PromoteReason::Reinstate,
                possible_loss: PossibleLoss::Unknown,
                ..
            }
        ));
        // Under ASYNC nothing is promised beyond the master's own log.
        let mut asynchronous = sync(1, 3);
        asynchronous.mode = ReplicationMode::Async;
        assert_eq!(promoted(&decide(&obs, &asynchronous)), ("b-0", 2));
    }

    #[test]
    fn no_candidate_at_all_is_said_plainly() {
        let obs = master_dead(group("b-0", 1, vec![master("b-0", 1, 10), down("b-1")]));
        let reason = wait_reason(decide(&obs, &sync(1, 2)));
        assert_eq!(
            reason.to_string(),
            "the master has been unready for 10s; no other broker is reachable and ready"
        );
    }

    #[test]
    fn the_new_epoch_is_above_every_epoch_seen_even_unreachable_ones() {
        let mut obs = master_dead(three(300, 300, 300));
        obs.brokers[0].status = Some(status(Role::Master, 7, 300, None, "store-b-0"));
        assert_eq!(promoted(&decide(&obs, &sync(1, 3))), ("b-1", 8));
    }
}
