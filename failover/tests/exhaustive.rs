//! Exhaustive checks of `decide` over small groups (1 to 4 brokers): every
//! combination of each broker's reachability, readiness, epoch and offset,
//! every way the master can be seen to fail, both modes, `minInSyncReplicas`
//! 0 to 2, with and without data loss allowed, with failover on and off.
//!
//! Each generated group comes with what really happened before it was
//! observed: which records were acknowledged, and who held them, including
//! brokers that are now down or lost their store. The central check is the
//! safety property: in `SYNC` mode without `allow_data_loss`, a promoted
//! broker holds every acknowledged record.

use std::time::Duration;

use keelmq_failover::{
    BrokerObservation, BrokerStatus, Decision, MasterFailure, Observation, Policy, PossibleLoss,
    PromoteReason, ReplicationMode, Role, WaitReason, decide,
};

const DELAY: Duration = Duration::from_secs(10);
const OFFSETS: [u64; 2] = [10, 20];

/// A slave's log as it really is (or was, before a lost store).
#[derive(Clone, Copy, Debug)]
enum Log {
    /// Never held anything.
    Empty,
    /// Held `offset` bytes, its tail written in `epoch`.
    At { epoch: u64, offset: u64 },
    /// Held the newest epoch up to `offset`, then lost its store: it is
    /// empty now, but it acknowledged those bytes.
    Lost { offset: u64 },
}

/// How a slave answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reach {
    Down,
    Unready,
    Up,
}

/// How the master is seen.
#[derive(Clone, Copy, Debug, PartialEq)]
enum MasterSeen {
    /// Serving as master, store intact.
    Serving,
    /// Restarted in standby (role slave), store intact.
    Standby,
    /// Restarted in standby having lost the last 10 bytes it held (unflushed
    /// when its node died).
    StandbyShort,
    /// Restarted with a new, empty store (role slave).
    EmptyStore,
    /// Pod deleted / node lost.
    Gone,
    /// Unreachable past the detection delay.
    DownLong,
    /// Unreachable within the detection delay.
    DownShort,
    /// Answers but not ready, past the detection delay.
    UnreadyLong,
}

const MASTER_SEEN: [MasterSeen; 8] = [
    MasterSeen::Serving,
    MasterSeen::Standby,
    MasterSeen::StandbyShort,
    MasterSeen::EmptyStore,
    MasterSeen::Gone,
    MasterSeen::DownLong,
    MasterSeen::DownShort,
    MasterSeen::UnreadyLong,
];

/// One generated group: the observation and the truth behind it.
struct World {
    obs: Observation,
    master: String,
    /// The newest epoch (the master's).
    epoch: u64,
    master_seen: MasterSeen,
    /// Per slave name: the true log.
    slaves: Vec<(String, Log)>,
    /// Whether the master's own store is intact and it answers.
    master_intact_up: bool,
}

impl World {
    /// The highest acknowledged offset in the newest epoch under `min_in_sync`
    /// (0 when nothing in it can have been acknowledged).
    fn acknowledged(&self, master_offset: u64, min_in_sync: u32) -> u64 {
        let mut acked = 0;
        for a in OFFSETS.into_iter().filter(|a| *a <= master_offset) {
            let holders = self
                .slaves
                .iter()
                .filter(|(_, log)| match *log {
                    Log::At { epoch, offset } => epoch == self.epoch && offset >= a,
                    Log::Lost { offset } => offset >= a,
                    Log::Empty => false,
                })
                .count();
            if holders >= min_in_sync as usize {
                acked = a;
            }
        }
        acked
    }
}

fn slave_states(epoch: u64, master_offset: u64) -> Vec<Log> {
    let mut logs = vec![Log::Empty];
    for offset in OFFSETS {
        if offset <= master_offset {
            logs.push(Log::At { epoch, offset });
            logs.push(Log::Lost { offset });
        }
        if epoch > 1 {
            // An older epoch: a slave that never caught up, or an old master
            // with a tail nobody else received (any offset).
            logs.push(Log::At {
                epoch: epoch - 1,
                offset,
            });
        }
    }
    logs
}

fn observe_slave(
    name: &str,
    log: Log,
    reach: Reach,
    master: &str,
    index: usize,
) -> BrokerObservation {
    let status = match log {
        Log::Empty | Log::Lost { .. } => BrokerStatus {
            role: Role::Slave,
            epoch: 0,
            max_offset: 0,
            store_id: format!("store-{name}-new"),
            empty: true,
            master: None,
        },
        Log::At { epoch, offset } => BrokerStatus {
            // Older-epoch brokers alternate between an old master that came
            // back and a slave that never caught up.
            role: if index % 2 == 1 && epoch > 0 && !matches!(reach, Reach::Down) {
                Role::Master
            } else {
                Role::Slave
            },
            epoch,
            max_offset: offset,
            store_id: format!("store-{name}"),
            empty: false,
            master: Some(master.to_owned()),
        },
    };
    BrokerObservation {
        name: name.to_owned(),
        reachable: reach != Reach::Down,
        ready: reach == Reach::Up,
        status: (reach != Reach::Down).then_some(status),
    }
}

fn observe_master(name: &str, epoch: u64, offset: u64, seen: MasterSeen) -> BrokerObservation {
    let intact = |role| BrokerStatus {
        role,
        epoch,
        max_offset: offset,
        store_id: format!("store-{name}"),
        empty: offset == 0,
        master: None,
    };
    let (reachable, ready, status) = match seen {
        MasterSeen::Serving => (true, true, Some(intact(Role::Master))),
        MasterSeen::Standby => (true, true, Some(intact(Role::Slave))),
        MasterSeen::StandbyShort => (
            true,
            true,
            Some(BrokerStatus {
                max_offset: offset - 10,
                empty: offset == 10,
                ..intact(Role::Slave)
            }),
        ),
        MasterSeen::UnreadyLong => (true, false, Some(intact(Role::Master))),
        MasterSeen::EmptyStore => (
            true,
            true,
            Some(BrokerStatus {
                role: Role::Slave,
                epoch: 0,
                max_offset: 0,
                store_id: format!("store-{name}-new"),
                empty: true,
                master: None,
            }),
        ),
        MasterSeen::Gone | MasterSeen::DownLong | MasterSeen::DownShort => (false, false, None),
    };
    BrokerObservation {
        name: name.to_owned(),
        reachable,
        ready,
        status,
    }
}

/// Calls `f` with every world of `n` brokers.
fn for_each_world(n: usize, mut f: impl FnMut(&World)) {
    let names: Vec<String> = (0..n).map(|i| format!("b-{i}")).collect();
    for epoch in 1..=2u64 {
        for master_offset in [0, 10, 20] {
            let logs = slave_states(epoch, master_offset);
            let per_slave: Vec<(Log, Reach)> = logs
                .iter()
                .flat_map(|l| [Reach::Down, Reach::Unready, Reach::Up].map(|r| (*l, r)))
                .collect();
            // The master is the first or the last by name.
            let master_positions = if n > 1 { vec![0, n - 1] } else { vec![0] };
            for &mi in &master_positions {
                let master = names[mi].clone();
                let slave_names: Vec<&String> = names
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != mi)
                    .map(|(_, s)| s)
                    .collect();
                let combos = per_slave.len().pow(slave_names.len() as u32);
                for seen in MASTER_SEEN {
                    if seen == MasterSeen::StandbyShort && master_offset == 0 {
                        continue;
                    }
                    for mut combo in 0..combos {
                        let mut brokers = Vec::with_capacity(n);
                        let mut slaves = Vec::with_capacity(n);
                        brokers.push(observe_master(&master, epoch, master_offset, seen));
                        for (i, name) in slave_names.iter().enumerate() {
                            let (log, reach) = per_slave[combo % per_slave.len()];
                            combo /= per_slave.len();
                            brokers.push(observe_slave(name, log, reach, &master, i));
                            slaves.push(((*name).clone(), log));
                        }
                        let unready_for = match seen {
                            MasterSeen::DownShort => Some(DELAY - Duration::from_millis(1)),
                            MasterSeen::DownLong | MasterSeen::UnreadyLong => Some(DELAY),
                            _ => None,
                        };
                        let obs = Observation {
                            group_epoch: epoch,
                            current_master: Some(master.clone()),
                            master_store_id: Some(format!("store-{master}")),
                            last_known_master_offset: Some(master_offset),
                            brokers,
                            master_unready_for: unready_for,
                            master_gone: seen == MasterSeen::Gone,
                        };
                        f(&World {
                            obs,
                            master: master.clone(),
                            epoch,
                            master_seen: seen,
                            slaves,
                            master_intact_up: matches!(
                                seen,
                                MasterSeen::Serving | MasterSeen::Standby
                            ),
                        });
                    }
                }
            }
        }
    }
}

fn policies(replicas: u32) -> Vec<Policy> {
    let mut out = Vec::new();
    for mode in [ReplicationMode::Sync, ReplicationMode::Async] {
        for min_in_sync_replicas in 0..=2 {
            for allow_data_loss in [false, true] {
                for enabled in [true, false] {
                    out.push(Policy {
                        mode,
                        min_in_sync_replicas,
                        replicas,
                        enabled,
                        detection_delay: DELAY,
                        allow_data_loss,
                    });
                }
            }
        }
    }
    out
}

fn find<'a>(obs: &'a Observation, name: &str) -> &'a BrokerObservation {
    obs.brokers
        .iter()
        .find(|b| b.name == name)
        .expect("named broker exists")
}

fn up(b: &BrokerObservation) -> Option<&BrokerStatus> {
    b.status.as_ref().filter(|_| b.reachable && b.ready)
}

fn rank(s: &BrokerStatus) -> (bool, u64, u64) {
    (!s.empty, s.epoch, s.max_offset)
}

/// Carries out a promotion as the brokers would, with every reachable broker
/// reached: the next observation of the group.
fn apply(obs: &Observation, broker: &str, new_epoch: u64) -> Observation {
    let mut next = obs.clone();
    let head = find(obs, broker)
        .status
        .clone()
        .expect("promoted has a status");
    for b in &mut next.brokers {
        let Some(s) = b.status.as_mut().filter(|_| b.reachable) else {
            continue;
        };
        if b.name == broker {
            s.role = Role::Master;
            s.epoch = new_epoch;
            s.master = None;
            next.master_store_id = Some(s.store_id.clone());
            next.last_known_master_offset = Some(s.max_offset);
        } else {
            s.role = Role::Slave;
            s.master = Some(broker.to_owned());
            if (s.epoch, s.max_offset) > (head.epoch, head.max_offset) {
                s.epoch = s.epoch.min(head.epoch);
                s.max_offset = s.max_offset.min(head.max_offset);
            }
        }
    }
    next.group_epoch = new_epoch;
    next.current_master = Some(broker.to_owned());
    next.master_unready_for = None;
    next.master_gone = false;
    next
}

/// Every invariant for one world under one policy. Returns whether it
/// promoted, for coverage counting.
fn check(w: &World, p: &Policy) -> bool {
    let obs = &w.obs;
    let d = decide(obs, p);
    let ctx = || {
        format!(
            "\npolicy {p:?}\nmaster seen {:?}\nslaves {:?}\nobs {obs:#?}\ndecision {d:?}",
            w.master_seen, w.slaves
        )
    };

    // (4) Deterministic, and independent of the order brokers are listed in.
    assert_eq!(decide(obs, p), d, "not deterministic{}", ctx());
    let mut reversed = obs.clone();
    reversed.brokers.reverse();
    assert_eq!(decide(&reversed, p), d, "depends on broker order{}", ctx());
    assert!(!d.to_string().is_empty());

    let max_epoch = obs
        .brokers
        .iter()
        .filter_map(|b| b.status.as_ref().map(|s| s.epoch))
        .fold(obs.group_epoch, u64::max);

    match &d {
        Decision::Promote {
            broker,
            new_epoch,
            followers,
            possible_loss,
            reason,
        } => {
            let chosen = find(obs, broker);
            // (1) Only a reachable, ready broker with a status.
            let s =
                up(chosen).unwrap_or_else(|| panic!("promoted a broker that is not up{}", ctx()));
            // (3) A new epoch above everything seen.
            assert!(*new_epoch > max_epoch, "epoch not new{}", ctx());
            // Followers: every other reachable broker, sorted, not the new master.
            let expect: Vec<String> = {
                let mut v: Vec<String> = obs
                    .brokers
                    .iter()
                    .filter(|b| b.name != *broker && b.reachable && b.status.is_some())
                    .map(|b| b.name.clone())
                    .collect();
                v.sort();
                v
            };
            assert_eq!(followers, &expect, "followers{}", ctx());

            match reason {
                PromoteReason::Reinstate => {
                    assert_eq!(broker, &w.master, "reinstated a non-master{}", ctx());
                    // Back in standby with its log, or a fresh group's
                    // master that came back empty having never held data.
                    let fresh = w.master_seen == MasterSeen::EmptyStore
                        && obs.last_known_master_offset == Some(0);
                    assert!(
                        w.master_seen == MasterSeen::Standby || fresh,
                        "reinstated a master that lost data{}",
                        ctx()
                    );
                    // Under SYNC without enough slaves to check it, only
                    // when data loss is allowed, and said so.
                    let expect = if p.mode == ReplicationMode::Sync
                        && p.allow_data_loss
                        && !sync_quorum_up(obs, &w.master, p)
                    {
                        PossibleLoss::Unknown
                    } else {
                        PossibleLoss::Nothing
                    };
                    assert_eq!(*possible_loss, expect, "{}", ctx());
                    if p.mode == ReplicationMode::Sync && !p.allow_data_loss {
                        assert!(
                            sync_quorum_up(obs, &w.master, p),
                            "reinstated without the quorum{}",
                            ctx()
                        );
                    }
                }
                PromoteReason::MasterFailed(failure) => {
                    assert_ne!(
                        broker,
                        &w.master,
                        "failed over to the failed master{}",
                        ctx()
                    );
                    // (6) Never with failover disabled.
                    assert!(p.enabled, "promoted with failover disabled{}", ctx());
                    // (5)/(7) Never from a serving master, never before the delay.
                    assert!(
                        !matches!(w.master_seen, MasterSeen::Serving | MasterSeen::DownShort),
                        "promoted away from a serving or briefly unready master{}",
                        ctx()
                    );
                    if w.master_seen == MasterSeen::Standby {
                        assert!(matches!(failure, MasterFailure::Behind { .. }), "{}", ctx());
                    }
                    if w.master_seen == MasterSeen::StandbyShort {
                        assert!(
                            matches!(
                                failure,
                                MasterFailure::Truncated { .. }
                                    | MasterFailure::Behind { .. }
                                    | MasterFailure::StoreLost
                            ),
                            "{}",
                            ctx()
                        );
                    }
                    // The candidate ranks highest among up brokers other than
                    // the failed master: data over empty, newer epoch over any
                    // offset, then offset.
                    for other in obs.brokers.iter().filter(|b| b.name != w.master) {
                        if let Some(o) = up(other) {
                            assert!(
                                rank(s) >= rank(o),
                                "{} outranks the promoted{}",
                                other.name,
                                ctx()
                            );
                        }
                    }
                    if p.mode == ReplicationMode::Sync && !p.allow_data_loss {
                        // (2) Enough slaves with data were up ...
                        let slaves = (obs.brokers.len() - 1) as u32;
                        let needed = (slaves + 1).saturating_sub(p.min_in_sync_replicas);
                        let with_data = obs
                            .brokers
                            .iter()
                            .filter(|b| b.name != w.master)
                            .filter_map(up)
                            .filter(|s| !s.empty)
                            .count() as u32;
                        assert!(with_data >= needed, "promoted without the quorum{}", ctx());
                        assert_eq!(*possible_loss, PossibleLoss::Nothing);
                    }
                }
            }
            // The safety property: in SYNC without data loss allowed, the new
            // master holds every acknowledged record of the newest epoch.
            if p.mode == ReplicationMode::Sync && !p.allow_data_loss {
                let master_offset = obs.last_known_master_offset.unwrap_or(0);
                let acked = w.acknowledged(master_offset, p.min_in_sync_replicas);
                let has_slaves_for_acks = p.min_in_sync_replicas as usize <= w.slaves.len();
                if acked > 0 && has_slaves_for_acks {
                    assert!(
                        s.epoch >= w.epoch && s.max_offset >= acked,
                        "lost acknowledged offset {acked}{}",
                        ctx()
                    );
                }
            }
            // Once carried out, the group settles: the next decision is
            // healthy, not another promotion.
            let next = apply(obs, broker, *new_epoch);
            let again = decide(&next, p);
            assert_eq!(
                again,
                Decision::Healthy,
                "did not settle after promoting{}\nnext {next:#?}",
                ctx()
            );
            true
        }
        Decision::Wait { reason } => {
            assert!(!reason.to_string().is_empty());
            match reason {
                WaitReason::DetectionDelay { remaining, .. } => {
                    assert_eq!(w.master_seen, MasterSeen::DownShort, "{}", ctx());
                    assert!(*remaining > Duration::ZERO);
                }
                WaitReason::FailoverDisabled { .. } => assert!(!p.enabled, "{}", ctx()),
                WaitReason::NotEnoughReachableSlaves { .. } => {
                    assert!(
                        p.mode == ReplicationMode::Sync && !p.allow_data_loss,
                        "{}",
                        ctx()
                    );
                }
                WaitReason::OnlyEmptyStores { .. } => assert!(!p.allow_data_loss, "{}", ctx()),
                WaitReason::NoCandidate { .. } => {
                    let any_up = obs
                        .brokers
                        .iter()
                        .filter(|b| b.name != w.master)
                        .any(|b| up(b).is_some());
                    assert!(!any_up, "a candidate was up{}", ctx());
                }
                WaitReason::WaitingForMembers { .. } | WaitReason::NewerEpochElsewhere { .. } => {
                    panic!("unexpected wait{}", ctx())
                }
            }
            // A master that serves is never left waiting: only failures wait.
            assert!(!matches!(w.master_seen, MasterSeen::Serving), "{}", ctx());
            false
        }
        Decision::Healthy | Decision::MakeFollow { .. } => {
            // Only a serving master with its store is healthy.
            assert_eq!(w.master_seen, MasterSeen::Serving, "{}", ctx());
            assert!(w.master_intact_up);
            if let Decision::MakeFollow {
                brokers,
                master,
                epoch,
            } = &d
            {
                assert_eq!(master, &w.master);
                assert_eq!(*epoch, w.epoch);
                assert!(!brokers.is_empty() && !brokers.contains(master));
                assert!(
                    brokers.windows(2).all(|x| x[0] < x[1]),
                    "not sorted{}",
                    ctx()
                );
            }
            false
        }
        Decision::Bootstrap { .. } => panic!("bootstrap with a recorded master{}", ctx()),
    }
}

fn run(n: usize) -> (usize, usize) {
    let policies = policies(n as u32);
    let (mut cases, mut promotions) = (0, 0);
    for_each_world(n, |w| {
        for p in &policies {
            cases += 1;
            promotions += usize::from(check(w, p));
        }
    });
    (cases, promotions)
}

#[test]
fn every_group_of_one_or_two_brokers() {
    let (cases, promotions) = run(1);
    assert!(cases > 0);
    let (cases, promotions2) = run(2);
    assert!(cases > 1000, "{cases}");
    assert!(
        promotions + promotions2 > 100,
        "too few promotions exercised"
    );
}

#[test]
fn every_group_of_three_brokers() {
    let (cases, promotions) = run(3);
    eprintln!("three: {cases} cases, {promotions} promotions");
    assert!(cases > 100_000, "{cases}");
    assert!(promotions > 10_000, "{promotions}");
}

#[test]
fn every_group_of_four_brokers() {
    let (cases, promotions) = run(4);
    eprintln!("four: {cases} cases, {promotions} promotions");
    assert!(cases > 1_000_000, "{cases}");
    assert!(promotions > 100_000, "{promotions}");
}

/// Bootstrap: every combination of up to four brokers' states with no master
/// recorded.
#[test]
fn every_bootstrap_of_up_to_four_brokers() {
    let positions: Vec<Option<(u64, u64)>> =
        vec![None, Some((1, 10)), Some((1, 20)), Some((2, 10))];
    for n in 1..=4usize {
        let per: Vec<(Option<(u64, u64)>, Reach)> = positions
            .iter()
            .flat_map(|pos| [Reach::Down, Reach::Unready, Reach::Up].map(|r| (*pos, r)))
            .collect();
        for mut combo in 0..per.len().pow(n as u32) {
            let mut brokers = Vec::new();
            for i in 0..n {
                let (pos, reach) = per[combo % per.len()];
                combo /= per.len();
                let name = format!("b-{i}");
                let (epoch, offset) = pos.unwrap_or((0, 0));
                brokers.push(BrokerObservation {
                    name: name.clone(),
                    reachable: reach != Reach::Down,
                    ready: reach == Reach::Up,
                    status: (reach != Reach::Down).then(|| BrokerStatus {
                        role: Role::Slave,
                        epoch,
                        max_offset: offset,
                        store_id: format!("store-{name}"),
                        empty: pos.is_none(),
                        master: None,
                    }),
                });
            }
            let obs = Observation {
                brokers,
                ..Observation::default()
            };
            for p in policies(n as u32) {
                let d = decide(&obs, &p);
                assert_eq!(decide(&obs, &p), d);
                let all_up = obs.brokers.iter().all(|b| up(b).is_some());
                match &d {
                    Decision::Bootstrap {
                        broker,
                        epoch,
                        followers,
                    } => {
                        assert!(all_up || p.allow_data_loss, "{obs:?} {d:?}");
                        let s = up(find(&obs, broker)).expect("bootstrapped broker is up");
                        for o in obs.brokers.iter().filter_map(up) {
                            assert!(rank(s) >= rank(o), "{obs:?} {d:?}");
                        }
                        assert!(*epoch >= 1);
                        assert!(
                            obs.brokers
                                .iter()
                                .filter_map(|b| b.status.as_ref())
                                .all(|o| o.epoch < *epoch)
                        );
                        assert!(!followers.contains(broker));
                        let next = apply(&obs, broker, *epoch);
                        assert_eq!(decide(&next, &p), Decision::Healthy, "{next:?}");
                    }
                    Decision::Wait {
                        reason: WaitReason::WaitingForMembers { up: u, total },
                    } => {
                        assert_eq!(*total as usize, n);
                        assert!(!all_up || *u == 0);
                    }
                    other => panic!("unexpected {other:?} for {obs:?}"),
                }
            }
        }
    }
}

/// Whether enough slaves with data are up for the SYNC promotion rule:
/// `slaves - minInSyncReplicas + 1` of them, besides `master`.
fn sync_quorum_up(obs: &Observation, master: &str, p: &Policy) -> bool {
    let slaves = (obs.brokers.len() - 1) as u32;
    let needed = (slaves + 1).saturating_sub(p.min_in_sync_replicas);
    let with_data = obs
        .brokers
        .iter()
        .filter(|b| b.name != master)
        .filter_map(up)
        .filter(|s| !s.empty)
        .count() as u32;
    with_data >= needed
}
