//! Crash recovery with real `kill -9`: a child process appends under
//! SYNC_FLUSH from several threads and prints each record it saw
//! acknowledged; the parent kills it at a random moment, reopens the store
//! and checks that every acknowledged record reads back byte-identical and
//! that nothing but complete records is served. Bounded: a fixed number of
//! rounds, each child stops by itself after a few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keelmq_broker::store::{FlushMode, MessageStore, NewRecord, StoreConfig, StoreError};
use rand::Rng;

const DIR_ENV: &str = "KEELMQ_CRASH_DIR";
const START_ENV: &str = "KEELMQ_CRASH_START";
const QUEUES: u64 = 4;
const ROUNDS: usize = 8;

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = 256 * 1024;
    c.cq_entries_per_file = 1000;
    c.flush_mode = FlushMode::SyncFlush;
    c
}

fn body(seq: u64) -> Vec<u8> {
    let len = 64 + (seq as usize * 131) % 3000;
    (0..len)
        .map(|i| (seq.wrapping_mul(31) as usize + i) as u8)
        .collect()
}

fn record(seq: u64) -> NewRecord {
    NewRecord::new("crash", (seq % QUEUES) as u32, body(seq)).with_property("seq", seq.to_string())
}

/// The child: appends until killed (or 20 s pass), printing "ACK <seq>"
/// after each acknowledged append.
#[test]
#[ignore = "child process of sigkill_during_sync_appends_loses_nothing_acknowledged"]
fn crash_child_appender() {
    let dir = std::env::var(DIR_ENV).expect("child needs its directory");
    let start: u64 = std::env::var(START_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let store = MessageStore::open(config(Path::new(&dir))).expect("child opens the store");
    println!("READY");
    let next = Arc::new(AtomicU64::new(start));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let deadline = Instant::now() + Duration::from_secs(20);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (store, next, out) = (store.clone(), next.clone(), out.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    let a = store.append(record(seq)).expect("append");
                    store.wait_flushed_blocking(a.end_offset).expect("flush");
                    let mut o = out.lock().expect("stdout");
                    let _ = writeln!(o, "ACK {seq}");
                    let _ = o.flush();
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

/// Reads every record of every queue; all must decode (no garbage).
fn read_all(store: &MessageStore) -> BTreeMap<u64, Vec<u8>> {
    let mut seen = BTreeMap::new();
    for q in 0..QUEUES as u32 {
        let max = store.queue_max_offset("crash", q);
        for qo in store.queue_min_offset("crash", q)..max {
            let r = store
                .get("crash", q, qo)
                .unwrap_or_else(|e| panic!("queue {q} entry {qo}: {e}"))
                .unwrap_or_else(|| panic!("queue {q} entry {qo} missing below max {max}"));
            let seq: u64 = r.properties["seq"].parse().expect("seq property");
            assert_eq!(seq % QUEUES, u64::from(q));
            assert!(
                seen.insert(seq, r.body.to_vec()).is_none(),
                "record {seq} twice"
            );
        }
        assert!(store.get("crash", q, max).expect("read past end").is_none());
    }
    seen
}

#[test]
fn sigkill_during_sync_appends_loses_nothing_acknowledged() {
    let mut rng = keelmq_broker::testing::seeded_rng();
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked_total = BTreeSet::new();
    let mut start = 0u64;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_child_appender",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, dir.path())
            .env(START_ENV, start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(AtomicU64::new(0));
        let reader = {
            let (acked, ready) = (acked.clone(), ready.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if line.ends_with("READY") {
                        ready.store(1, Ordering::Release);
                    } else if let Some(seq) = line
                        .strip_prefix("ACK ")
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        acked.lock().expect("acked").push(seq);
                    }
                }
            })
        };
        let t0 = Instant::now();
        while ready.load(Ordering::Acquire) == 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(ready.load(Ordering::Acquire), 1, "child did not start");
        std::thread::sleep(Duration::from_millis(rng.random_range(20..400)));
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        reader.join().expect("reader");
        let acked = acked.lock().expect("acked").clone();
        assert!(!acked.is_empty(), "round {round}: nothing was acknowledged");

        let store = MessageStore::open(config(dir.path())).expect("recovery after SIGKILL");
        let seen = read_all(&store);
        assert!(matches!(
            store.read_at(store.max_offset()),
            Err(StoreError::OutOfRange { .. })
        ));
        for seq in acked.iter().chain(acked_total.iter()) {
            let got = seen.get(seq).unwrap_or_else(|| {
                panic!("round {round}: acknowledged record {seq} lost (the seed is printed above)")
            });
            assert_eq!(got, &body(*seq), "round {round}: record {seq} differs");
        }
        for (seq, b) in &seen {
            assert_eq!(
                b,
                &body(*seq),
                "unacknowledged record {seq} survived but differs"
            );
        }
        acked_total.extend(acked.iter().copied());
        // The next child continues after every record present (acknowledged
        // or not), so sequence numbers stay unique.
        start = seen.keys().next_back().map_or(0, |m| m + 1).max(start);
        eprintln!(
            "round {round}: {} acknowledged, {} recovered, end offset {}, torn tail cut: {:?}",
            acked.len(),
            seen.len(),
            store.max_offset(),
            store.recovery_report().truncated_bytes_at
        );
        drop(store);
    }
    assert!(
        acked_total.len() > ROUNDS,
        "the test must acknowledge records in every round"
    );
}
