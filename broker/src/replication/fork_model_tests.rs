//! Failovers in a random order over real stores and epoch histories: the
//! fork point never cuts a byte two logs share and always cuts what they do
//! not, followers hold a prefix of their master's log, and a promotion of
//! the most caught-up slave keeps every acknowledged byte.

use rand::Rng;

use super::epoch::{EpochHistory, fork_point};
use crate::store::{MessageStore, NewRecord, StoreConfig};

struct Node {
    _dir: tempfile::TempDir,
    config: StoreConfig,
    store: MessageStore,
    history: EpochHistory,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = crate::testing::async_store_config(dir.path(), 64 * 1024);
        let store = MessageStore::open(config.clone()).expect("open");
        Node {
            _dir: dir,
            config,
            store,
            history: EpochHistory::default(),
        }
    }

    fn end(&self) -> u64 {
        self.store.max_offset()
    }

    /// The log's bytes in `[0, to)`, segment fillers included.
    fn bytes(&self, to: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while (out.len() as u64) < to {
            let chunk = self
                .store
                .read_raw(out.len() as u64, (to - out.len() as u64) as usize)
                .expect("read");
            assert!(!chunk.is_empty(), "nothing readable at {}", out.len());
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out.len() as u64, to, "records end at {to}");
        out
    }
}

/// What a slave does on a Data frame: a chunk from its end, not crossing
/// the start of the master's next epoch, entering that chunk's epoch in the
/// slave's history if it is newer than the slave's last.
fn replicate(master: &Node, slave: &mut Node, max: usize) -> bool {
    let pos = slave.end();
    if pos >= master.end() {
        return false;
    }
    let limit = master
        .history
        .next_epoch_start_after(pos)
        .unwrap_or(u64::MAX);
    let bytes = master
        .store
        .read_raw(pos, (limit - pos).min(max as u64) as usize)
        .expect("read");
    let epoch = master
        .history
        .epoch_at(pos)
        .expect("the master's history covers its log");
    if epoch > slave.history.last_epoch() {
        slave.history.begin(epoch, pos).expect("newer epoch");
    }
    slave.store.append_raw(pos, &bytes).expect("append");
    true
}

#[test]
fn random_failovers_keep_logs_agreeing_up_to_the_fork_point() {
    let mut rng = crate::testing::seeded_rng();
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::new()).collect();
    let (mut master, mut epoch, mut seq) = (0usize, 1u64, 0u64);
    nodes[0].history.begin(1, 0).expect("first epoch");
    // Bytes acknowledged with one in-sync slave: on the master and on a
    // slave following it.
    let mut acked: Vec<u8> = Vec::new();
    let (mut safe, mut unsafe_) = (0, 0);
    for step in 0..300 {
        match rng.random_range(0..100) {
            0..40 => {
                let m = &nodes[master];
                for _ in 0..rng.random_range(1..5) {
                    let len = rng.random_range(50..4_000);
                    let body: Vec<u8> = (0..len).map(|i| (seq as usize + i) as u8).collect();
                    m.store
                        .append(NewRecord::new("t", (seq % 3) as u32, body))
                        .expect("append");
                    seq += 1;
                }
            }
            40..75 => {
                let i = (master + rng.random_range(1..3)) % 3;
                let max = rng.random_range(1..20_000);
                let (m, s) = pair(&mut nodes, master, i);
                if replicate(m, s, max) {
                    let s_end = s.end();
                    if s_end > acked.len() as u64 {
                        acked = m.bytes(s_end);
                    }
                }
            }
            75..92 => {
                // Promote a slave: the most caught-up one (safe), or any
                // (a forced failover that may lose acknowledged bytes).
                let slaves: Vec<usize> = (0..3).filter(|&i| i != master).collect();
                let forced = rng.random_range(0..4) == 0;
                let next = if forced {
                    slaves[rng.random_range(0..2)]
                } else {
                    *slaves
                        .iter()
                        .max_by_key(|&&i| nodes[i].end())
                        .expect("two slaves")
                };
                if forced {
                    unsafe_ += 1;
                } else {
                    safe += 1;
                    assert!(
                        nodes[next].end() >= acked.len() as u64,
                        "step {step}: the most caught-up slave lacks acknowledged bytes"
                    );
                }
                epoch += 1;
                let start = nodes[next].end();
                nodes[next].history.begin(epoch, start).expect("promotion");
                master = next;
                let m_end = nodes[master].end();
                let m_bytes = nodes[master].bytes(m_end);
                acked.truncate(m_end as usize);
                assert_eq!(
                    m_bytes[..acked.len()],
                    acked[..],
                    "step {step}: acknowledged bytes"
                );
                // Everyone else follows: cut at the fork point first.
                for i in (0..3).filter(|&i| i != master) {
                    let (m, n) = pair(&mut nodes, master, i);
                    let n_end = n.end();
                    let fork = fork_point(&n.history, n_end, &m.history, m_end);
                    assert!(fork <= n_end && fork <= m_end, "step {step}: fork {fork}");
                    let common = common_prefix(&n.bytes(n_end), &m_bytes);
                    assert!(
                        fork <= common,
                        "step {step}: node {i} forks at {fork}, past the {common} bytes it shares with the master"
                    );
                    // What the new master never had, or wrote differently,
                    // goes; nothing the two share is cut unless the node's
                    // history cannot vouch for it.
                    if common == n_end.min(m_end) {
                        assert_eq!(fork, common, "step {step}: node {i} loses shared bytes");
                    }
                    n.store.truncate_to(fork).expect("cut at the fork");
                    n.history.truncate_to(fork);
                }
            }
            92..96 => {
                // A restart of any broker's store (clean).
                let n = &mut nodes[rng.random_range(0..3)];
                n.store.shutdown().expect("shutdown");
                n.store = MessageStore::open(n.config.clone()).expect("reopen");
            }
            _ => {
                // One slave catches up completely.
                let i = (master + rng.random_range(1..3)) % 3;
                let (m, s) = pair(&mut nodes, master, i);
                while replicate(m, s, 1 << 20) {}
                assert_eq!(s.end(), m.end());
                acked = m.bytes(m.end());
            }
        }
        // Slaves hold a prefix of their master's log.
        let m_end = nodes[master].end();
        let m_bytes = nodes[master].bytes(m_end);
        for (i, n) in nodes.iter().enumerate().filter(|&(i, _)| i != master) {
            let n_end = n.end();
            assert!(n_end <= m_end, "step {step}: node {i} ahead of its master");
            assert!(
                n.bytes(n_end) == m_bytes[..n_end as usize],
                "step {step}: node {i} is not a prefix of its master's log"
            );
        }
    }
    assert!(safe > 0 && unsafe_ > 0, "both kinds of failover ran");
    for n in nodes {
        n.store.shutdown().expect("shutdown");
    }
}

/// The master and another node, borrowed together.
fn pair(nodes: &mut [Node], master: usize, other: usize) -> (&Node, &mut Node) {
    assert_ne!(master, other);
    if master < other {
        let (a, b) = nodes.split_at_mut(other);
        (&a[master], &mut b[0])
    } else {
        let (a, b) = nodes.split_at_mut(master);
        (&b[0], &mut a[other])
    }
}

/// How many leading bytes `a` and `b` share.
fn common_prefix(a: &[u8], b: &[u8]) -> u64 {
    a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
}
