//! Whether a broker counts as ready (`/readyz`: the Kubernetes readiness
//! probe, hence the Services' endpoints and the PodDisruptionBudget).
//!
//! A master, and a standby waiting to be told what to be, are ready once
//! they serve. A slave that follows a master is ready only while its stream
//! from that master is up and it is *in sync* by the master's own rule
//! ([`within_in_sync_lag`], with the same `in_sync_max_lag_bytes`), judged
//! from the log end the master last announced: in its Welcome, then in
//! heartbeats, which a master also interleaves with its data while it
//! streams a backlog. So a drain cannot take the only in-sync slave because
//! another one, catching up or cut off from a master that is gone, counts
//! as available in its place.
//!
//! "Follows the current master" is what the stream enforces: a slave refuses
//! a master (Welcome or heartbeat) of an epoch older than the newest it was
//! told of, so a connected stream is one from a master of that epoch or a
//! newer one.
//!
//! No flapping on small lag: the threshold is the master's (64 MiB in the
//! broker), far above what is in flight between two heartbeats. A stream
//! that breaks and reconnects (the slave retries within 2 s) fails a probe
//! or two at most, and the kubelet marks a pod unready only after three
//! failed probes in a row, 5 s apart (the operator's pod template).

use super::Role;
use super::master::within_in_sync_lag;

/// What a slave knows of its stream from the master it follows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct StreamProgress {
    /// The follow it belongs to ([`super::ReplicationManager::follow`]
    /// numbers them): an update from a stream a newer follow replaced is
    /// not taken for the current one.
    pub session: u64,
    /// The handshake is done and the stream is up.
    pub connected: bool,
    /// The epoch the master announced.
    pub master_epoch: u64,
    /// Where the master's log ended when it last said so.
    pub master_end: u64,
    /// What this slave acknowledged last (where its stream started, before
    /// its first acknowledgement): what the master counts it by.
    pub acked: u64,
}

/// Whether the broker is ready, and why, in words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
}

impl Readiness {
    fn ready(reason: String) -> Self {
        Self {
            ready: true,
            reason,
        }
    }
    fn not_ready(reason: String) -> Self {
        Self {
            ready: false,
            reason,
        }
    }
}

/// What this broker is, as readiness looks at it.
pub(super) struct Following<'a> {
    pub role: Role,
    /// Epoch of the tail of its log (a master's own epoch).
    pub epoch: u64,
    /// For a slave told to follow: the master's replication address.
    pub master: Option<&'a str>,
    /// The epoch it was told to follow that master in.
    pub fence: u64,
    /// The number of that follow.
    pub session: u64,
}

/// Judges readiness (see the module docs); `max_lag` is the in-sync lag the
/// master uses.
pub(super) fn judge(
    me: &Following<'_>,
    stream: Option<&StreamProgress>,
    max_lag: u64,
) -> Readiness {
    let master = match (me.role, me.master) {
        (Role::Master, _) => return Readiness::ready(format!("master of epoch {}", me.epoch)),
        (Role::Slave, None) => {
            return Readiness::ready(
                "standby: waiting to be told to follow a master or to become one".into(),
            );
        }
        (Role::Slave, Some(m)) => m,
    };
    let Some(s) = stream.filter(|s| s.session == me.session && s.connected) else {
        return Readiness::not_ready(format!(
            "slave not connected to its master {master} (epoch {})",
            me.fence
        ));
    };
    let lag = s.master_end.saturating_sub(s.acked);
    if within_in_sync_lag(s.master_end, s.acked, max_lag) {
        Readiness::ready(format!(
            "slave of {master} in epoch {}, in sync: {} behind",
            s.master_epoch,
            bytes(lag)
        ))
    } else {
        Readiness::not_ready(format!(
            "slave catching up, {} behind master {master} (in sync within {})",
            bytes(lag),
            bytes(max_lag)
        ))
    }
}

/// A byte count in words: "512 B", "64.0 MiB", "1.2 GiB".
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_LAG: u64 = 64 << 20;

    fn slave(session: u64) -> Following<'static> {
        Following {
            role: Role::Slave,
            epoch: 2,
            master: Some("m:10912"),
            fence: 3,
            session,
        }
    }

    fn stream(session: u64, master_end: u64, acked: u64) -> StreamProgress {
        StreamProgress {
            session,
            connected: true,
            master_epoch: 3,
            master_end,
            acked,
        }
    }

    #[test]
    fn a_master_and_a_standby_are_ready_whatever_any_stream_says() {
        let master = Following {
            role: Role::Master,
            epoch: 4,
            master: None,
            fence: 4,
            session: 0,
        };
        assert_eq!(
            judge(&master, None, MAX_LAG),
            Readiness::ready("master of epoch 4".into())
        );
        let standby = Following {
            role: Role::Slave,
            master: None,
            ..master
        };
        assert!(judge(&standby, None, MAX_LAG).ready);
    }

    #[test]
    fn a_slave_is_ready_only_connected_and_within_the_masters_in_sync_lag() {
        let me = slave(7);
        let not_connected = judge(&me, None, MAX_LAG);
        assert_eq!(
            not_connected,
            Readiness::not_ready("slave not connected to its master m:10912 (epoch 3)".into())
        );
        let mut s = stream(7, 10 << 30, (10 << 30) - MAX_LAG);
        assert_eq!(
            judge(&me, Some(&s), MAX_LAG),
            Readiness::ready("slave of m:10912 in epoch 3, in sync: 64.0 MiB behind".into()),
            "exactly the lag the master still counts in sync"
        );
        s.acked -= 1;
        assert!(!judge(&me, Some(&s), MAX_LAG).ready, "one byte more is not");
        s.acked = (10 << 30) - (1288 << 20);
        assert_eq!(
            judge(&me, Some(&s), MAX_LAG).reason,
            "slave catching up, 1.3 GiB behind master m:10912 (in sync within 64.0 MiB)"
        );
        // Ahead of what the master last announced: caught up.
        s.acked = (10 << 30) + 100;
        assert!(judge(&me, Some(&s), MAX_LAG).ready);
        s.connected = false;
        assert!(!judge(&me, Some(&s), MAX_LAG).ready, "stream down");
    }

    #[test]
    fn a_stream_of_an_earlier_follow_does_not_count() {
        let s = stream(6, 100, 100);
        let r = judge(&slave(7), Some(&s), MAX_LAG);
        assert!(!r.ready, "{r:?}");
        assert!(judge(&slave(6), Some(&s), MAX_LAG).ready);
    }

    #[test]
    fn byte_counts_read_as_words() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(1_288_490_189), "1.2 GiB");
    }
}
