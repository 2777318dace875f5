//! Store behaviour: round trips, recovery, corruption, retention, limits.

use super::*;
use rand::Rng;

const SEG: u64 = 64 * 1024;

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = SEG;
    c.cq_entries_per_file = 64;
    c.flush_mode = FlushMode::SyncFlush;
    c.retention_interval = Duration::from_secs(3600);
    // How full the machine's own disk is must not decide these tests: the
    // disk limits are exercised through `max_store_bytes`.
    c.disk_high_watermark = 1.0;
    c.disk_full_ratio = 1.0;
    c.fs_usage = |_| {
        Some(FsUsage {
            used: 0,
            avail: 1 << 40,
        })
    };
    c
}

fn body(seq: u64) -> Vec<u8> {
    let len = 200 + (seq as usize * 37) % 1500;
    (0..len).map(|i| (seq as usize + i * 7) as u8).collect()
}

fn record(seq: u64) -> NewRecord {
    NewRecord::new("orders", (seq % 3) as u32, body(seq))
        .with_property(
            keys::TAG,
            if seq.is_multiple_of(2) { "even" } else { "odd" },
        )
        .with_property("seq", seq.to_string())
}

/// Appends `n` records one by one; returns where each went.
fn fill(store: &MessageStore, from: u64, n: u64) -> Vec<Appended> {
    (from..from + n)
        .map(|s| {
            let a = store.append(record(s)).expect("append");
            store.wait_flushed_blocking(a.end_offset).expect("flushed");
            a
        })
        .collect()
}

fn check_all(store: &MessageStore, upto: u64) {
    let mut next = [0u64; 3];
    for seq in 0..upto {
        let q = (seq % 3) as u32;
        let r = store
            .get("orders", q, next[q as usize])
            .expect("read")
            .expect("present");
        assert_eq!(
            r.properties.get("seq").map(String::as_str),
            Some(seq.to_string().as_str())
        );
        assert_eq!(&r.body[..], &body(seq)[..], "body of record {seq}");
        next[q as usize] += 1;
    }
    for q in 0..3u32 {
        assert_eq!(
            store.queue_max_offset("orders", q),
            next[q as usize],
            "queue {q} length"
        );
        assert!(
            store
                .get("orders", q, next[q as usize])
                .expect("read")
                .is_none()
        );
    }
}

/// Opens the store in `dir`, checks its first `upto` records and shuts it down.
fn reopen_and_check(dir: &Path, upto: u64) {
    let store = MessageStore::open(config(dir)).expect("reopen");
    check_all(&store, upto);
    store.shutdown().expect("shutdown");
}

/// Runs `test` under each flush mode: SYNC_FLUSH stages records and the
/// flusher writes them through the file; ASYNC_FLUSH writes into the mapping.
fn in_both_modes(test: fn(FlushMode)) {
    for mode in [FlushMode::SyncFlush, FlushMode::AsyncFlush] {
        test(mode);
    }
}

#[test]
fn round_trip_across_segment_boundaries() {
    in_both_modes(round_trip);
}

fn round_trip(mode: FlushMode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |dir: &Path| StoreConfig {
        flush_mode: mode,
        ..config(dir)
    };
    let store = MessageStore::open(config(dir.path())).expect("open");
    let appended = fill(&store, 0, 300);
    assert!(
        store.max_offset() > 3 * SEG,
        "the test must cross several segments"
    );
    let segs: std::collections::BTreeSet<u64> = appended.iter().map(|a| a.offset / SEG).collect();
    assert!(segs.len() >= 4);
    for a in &appended {
        assert_eq!(
            a.offset / SEG,
            (a.end_offset - 1) / SEG,
            "a record never straddles segments"
        );
    }
    check_all(&store, 300);
    // Batches land contiguously with consecutive queue offsets.
    let batch: Vec<_> = (300..310)
        .map(|s| NewRecord::new("batch", 0, body(s)))
        .collect();
    let got = store.append_batch(batch).expect("batch");
    for w in got.windows(2) {
        assert_eq!(w[0].end_offset, w[1].offset);
        assert_eq!(w[0].queue_offset + 1, w[1].queue_offset);
    }
    if let Some(last) = got.last() {
        store
            .wait_flushed_blocking(last.end_offset)
            .expect("flushed");
    }
    let range = store
        .get_range("batch", 0, 0, 100, usize::MAX)
        .expect("range");
    assert_eq!(range.len(), 10);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert!(store.recovery_report().clean_shutdown);
    check_all(&store, 300);
    assert_eq!(
        store
            .get_range("batch", 0, 0, 100, usize::MAX)
            .expect("range")
            .len(),
        10
    );
    // The log continues after a restart.
    fill(&store, 300, 5);
    store.shutdown().expect("shutdown");
}

#[test]
fn bad_input_is_refused_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    assert!(matches!(
        store.append(NewRecord::new("bad topic", 0, "x")),
        Err(StoreError::InvalidName(_))
    ));
    assert!(matches!(
        store.append(NewRecord::new("t", 0, vec![0u8; SEG as usize])),
        Err(StoreError::RecordTooLarge { .. })
    ));
    assert!(matches!(
        store.append(NewRecord::new("t", 5000, "x")),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.append_batch(vec![]),
        Err(StoreError::InvalidArgument(_))
    ));
    assert_eq!(store.max_offset(), 0, "nothing was written");
    assert!(
        matches!(
            MessageStore::open(config(dir.path())),
            Err(StoreError::Config(_))
        ),
        "one broker per data dir"
    );
    store.shutdown().expect("shutdown");
}

/// Simulates a crash: the store is dropped without shutdown and its
/// threads exit, leaving a checkpoint that says "not clean".
fn crash(store: MessageStore) {
    store.inner.stopping.store(true, Ordering::Release);
    for h in store.inner.threads.lock().drain(..) {
        h.thread().unpark();
        let _ = h.join();
    }
    store.inner.clog.stop_preparer();
    store.inner.lock.lock().take();
}

#[test]
fn torn_tail_is_cut_and_nothing_past_it_is_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let appended = fill(&store, 0, 50);
    let last = *appended.last().expect("records");
    crash(store);
    // Tear the last record: keep its first half only.
    let seg_path = segment_path(dir.path(), SEG, last.offset);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&seg_path)
        .expect("segment");
    let rel = last.offset % SEG;
    let half = (last.end_offset - last.offset) / 2;
    use std::os::unix::fs::FileExt;
    f.write_all_at(
        &vec![0u8; (last.end_offset - last.offset - half) as usize],
        rel + half,
    )
    .expect("tear");
    // The torn record is past the last checkpointed flush only if the
    // checkpoint is older; make it so, as after a crash between checkpoints.
    let cp = Checkpoint {
        flushed_offset: last.offset,
        cq_offset: 0,
        clean: false,
        written_ms: 1,
    };
    save_json(&dir.path().join(CHECKPOINT), &cp).expect("checkpoint");
    let store = MessageStore::open(config(dir.path())).expect("recovers");
    assert_eq!(
        store.recovery_report().truncated_bytes_at,
        Some(last.offset)
    );
    assert_eq!(store.max_offset(), last.offset);
    check_all(&store, 49);
    assert!(matches!(
        store.read_at(last.offset),
        Err(StoreError::OutOfRange { .. })
    ));
    // Appends continue where the torn record was.
    let a = store.append(record(49)).expect("append");
    assert_eq!(a.offset, last.offset);
    store.wait_flushed_blocking(a.end_offset).expect("flush");
    check_all(&store, 50);
    store.shutdown().expect("shutdown");
}

#[test]
fn flipped_byte_refuses_start_until_truncation_is_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let appended = fill(&store, 0, 60);
    crash(store);
    let victim = appended[40];
    let seg_path = segment_path(dir.path(), SEG, victim.offset);
    let mut bytes = std::fs::read(&seg_path).expect("read");
    let at = (victim.offset % SEG) as usize + 70;
    bytes[at] ^= 0x01;
    std::fs::write(&seg_path, &bytes).expect("write");
    // Reads see the corruption as an error, never as a message. (Checked
    // on the bytes directly: the store refuses to open.)
    match MessageStore::open(config(dir.path())) {
        Err(StoreError::RefuseToStart { offset, .. }) => assert_eq!(offset, victim.offset),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
    let mut wrong = config(dir.path());
    wrong.allow_truncate_at = Some(victim.offset + 1);
    assert!(
        MessageStore::open(wrong).is_err(),
        "permission is for one exact offset"
    );
    open_cut_at_and_check(dir.path(), victim.offset, 40);
}

/// Opens the store in `dir` with the operator's permission to cut the log
/// at `offset`, checks that it ends there and serves its first `upto`
/// records, and shuts it down.
fn open_cut_at_and_check(dir: &Path, offset: u64, upto: u64) {
    let mut allowed = config(dir);
    allowed.allow_truncate_at = Some(offset);
    let store = open_bounded(allowed);
    assert_eq!(store.max_offset(), offset);
    check_all(&store, upto);
    store.shutdown().expect("shutdown");
}

#[test]
fn corrupt_record_read_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let a = fill(&store, 0, 3);
    // Corrupt the body in place through the mapping, as a bad disk would.
    let seg = store.inner.clog.segment_for(a[1].offset).expect("segment");
    // SAFETY: test-only write into a published record; no concurrent readers.
    unsafe { seg.file.slice_mut(a[1].offset - seg.base + 80, 1)[0] ^= 0xff };
    assert!(matches!(
        store.get("orders", 1, 0),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(store.get("orders", 0, 0).expect("others fine").is_some());
    crash(store);
}

#[test]
fn rebuilt_consume_queues_equal_the_originals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 400);
    let before: Vec<_> = store
        .queues()
        .into_iter()
        .map(|(t, q)| ((t.clone(), q), store.consume_queue_snapshot(&t, q)))
        .collect();
    store.shutdown().expect("shutdown");
    std::fs::remove_dir_all(dir.path().join("consumequeue")).expect("remove queues");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert!(store.recovery_report().rebuilt_consume_queues);
    let after: Vec<_> = store
        .queues()
        .into_iter()
        .map(|(t, q)| ((t.clone(), q), store.consume_queue_snapshot(&t, q)))
        .collect();
    assert_eq!(before, after);
    check_all(&store, 400);
    store.shutdown().expect("shutdown");
    // A queue that fell behind (one file lost) is rebuilt too.
    std::fs::remove_dir_all(dir.path().join("consumequeue/orders/1")).expect("remove one queue");
    let cp: Checkpoint = load_json(&dir.path().join(CHECKPOINT)).expect("checkpoint");
    save_json(
        &dir.path().join(CHECKPOINT),
        &Checkpoint { clean: false, ..cp },
    )
    .expect("mark crash");
    reopen_and_check(dir.path(), 400);
}

#[test]
fn retention_removes_only_whole_expired_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.retention = Duration::from_secs(3600);
    let store = MessageStore::open(cfg).expect("open");
    let day = 24 * 3600 * 1000;
    let t0 = now_ms() - 3 * day;
    // Old records in the first segments, new ones from the middle of a later segment.
    let mut appended = Vec::new();
    for s in 0..120u64 {
        appended.push(
            store
                .append_batch_at(vec![record(s)], t0 + s as i64)
                .expect("old")[0],
        );
    }
    // Under SYNC_FLUSH records are readable once the flusher wrote them.
    let flushed = |a: &Appended| store.wait_flushed_blocking(a.end_offset).expect("flushed");
    appended.iter().for_each(flushed);
    let old_end = store.max_offset();
    for s in 120..200u64 {
        appended.push(
            store
                .append_batch_at(vec![record(s)], now_ms())
                .expect("new")[0],
        );
    }
    appended.iter().for_each(flushed);
    let boundary_seg = old_end / SEG;
    let removed = store.enforce_retention(now_ms()).expect("retention");
    assert_eq!(
        removed as u64, boundary_seg,
        "segments wholly before the first new record go"
    );
    assert_eq!(store.min_offset(), boundary_seg * SEG);
    // The segment holding both old and new records stays, whole.
    for (s, a) in appended.iter().enumerate() {
        let r = store.read_at(a.offset);
        if a.offset < boundary_seg * SEG {
            assert!(r.is_err(), "record {s} in a removed segment");
        } else {
            assert_eq!(r.expect("kept").body, body(s as u64));
        }
    }
    let mut bases: Vec<u64> = std::fs::read_dir(dir.path().join("commitlog"))
        .expect("ls")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    bases.sort_unstable();
    assert_eq!(
        bases.first(),
        Some(&(boundary_seg * SEG)),
        "no older segment file is left"
    );
    let live = store.max_offset() / SEG - boundary_seg + 1;
    assert!(
        bases.len() as u64 == live || bases.len() as u64 == live + 1,
        "kept segments plus at most one prepared: {bases:?}"
    );
    for q in 0..3 {
        let min = store.queue_min_offset("orders", q);
        let first = store
            .get("orders", q, min)
            .expect("read")
            .expect("first kept");
        assert!(first.offset >= store.min_offset());
        if min > 0 {
            assert!(store.get("orders", q, min - 1).expect("read").is_none());
        }
    }
    assert_eq!(store.enforce_retention(now_ms()).expect("again"), 0);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert_eq!(store.min_offset(), boundary_seg * SEG);
    store.shutdown().expect("shutdown");
}

#[test]
fn full_disk_refuses_writes_clearly_and_restarts_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.max_store_bytes = Some(3 * SEG);
    let store = MessageStore::open(cfg.clone()).expect("open");
    let mut acked = 0u64;
    let err = loop {
        match store.append(record(acked)) {
            Ok(a) => {
                store.wait_flushed_blocking(a.end_offset).expect("flush");
                acked += 1;
            }
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the limit must be reached");
    };
    assert!(matches!(err, StoreError::DiskFull(_)), "got {err}");
    assert!(err.to_string().contains("disk full"), "message: {err}");
    assert!(store.append(record(acked)).is_err(), "still refused");
    check_all(&store, acked);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(cfg).expect("clean restart");
    assert!(store.recovery_report().clean_shutdown);
    check_all(&store, acked);
    store.shutdown().expect("shutdown");
}

#[test]
fn replication_bytes_reproduce_the_log_exactly() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let master = MessageStore::open(config(a_dir.path())).expect("open");
    // The slave writes into its mapping (ASYNC_FLUSH), the master through
    // the file (SYNC_FLUSH): both ways give the same bytes.
    let async_config = |dir: &Path| StoreConfig {
        flush_mode: FlushMode::AsyncFlush,
        ..config(dir)
    };
    let slave = MessageStore::open(async_config(b_dir.path())).expect("open");
    fill(&master, 0, 250);
    let mut pos = slave.max_offset();
    while pos < master.max_offset() {
        let chunk = master.read_raw(pos, 16 * 1024).expect("read raw");
        assert!(!chunk.is_empty());
        pos = slave.append_raw(pos, &chunk).expect("append raw");
    }
    assert_eq!(pos, master.max_offset());
    assert!(matches!(
        slave.append_raw(0, &[]),
        Err(StoreError::OffsetMismatch { .. })
    ));
    // A frame too short to hold a record is refused as corrupt (it used to
    // panic the replication task) and leaves the log as it was.
    for stray in 1..8usize {
        let end = slave.max_offset();
        assert!(matches!(
            slave.append_raw(end, &vec![1u8; stray]),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(slave.max_offset(), end);
    }
    check_all(&slave, 250);
    // The same bytes but for the marks each store sets by its own flushes
    // (and the checksums that cover them).
    let mut at = 0;
    while at < master.max_offset() {
        let m = master.read_raw(at, 16 * 1024).expect("master bytes");
        assert!(!m.is_empty());
        let s = slave.read_raw(at, m.len()).expect("slave bytes");
        assert!(
            record::without_flush_marks(&m) == record::without_flush_marks(&s),
            "bytes differ at {at}"
        );
        at += m.len() as u64;
    }
    for (t, q) in master.queues() {
        assert_eq!(
            master.consume_queue_snapshot(&t, q),
            slave.consume_queue_snapshot(&t, q)
        );
    }
    // Cut both at the same record boundary; they stay identical.
    let cut = master
        .get("orders", 0, 20)
        .expect("read")
        .expect("present")
        .offset;
    slave.truncate_to(cut).expect("truncate");
    assert_eq!(slave.max_offset(), cut);
    assert!(matches!(
        slave.truncate_to(cut + 1),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(slave.get("orders", 0, 20).expect("read").is_none());
    assert!(slave.get("orders", 0, 19).expect("read").is_some());
    master.shutdown().expect("shutdown");
    slave.shutdown().expect("shutdown");
    let slave = MessageStore::open(async_config(b_dir.path())).expect("reopen");
    assert_eq!(slave.max_offset(), cut);
    slave.shutdown().expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_acknowledges_concurrent_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    // A lone writer: each append has a flush of its own; a batch is one
    // append.
    let before = store.flush_counts();
    for i in 0..10u64 {
        let a = store
            .append(NewRecord::new("g", 0, body(i)))
            .expect("append");
        store.wait_flushed(a.end_offset).await.expect("flushed");
    }
    let batch = (0..5).map(|i| NewRecord::new("g", 1, body(i))).collect();
    let end = store.append_batch(batch).expect("batch")[4].end_offset;
    store.wait_flushed(end).await.expect("flushed");
    let alone = store.flush_counts();
    assert_eq!(alone.group_appends - before.group_appends, 11);
    assert!(alone.flushes - before.flushes >= 11, "{before:?} {alone:?}");
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50u64 {
                let a = store
                    .append(NewRecord::new("g", (w % 4) as u32, body(w * 1000 + i)))
                    .expect("append");
                store.wait_flushed(a.end_offset).await.expect("flushed");
                assert!(store.flushed_offset() >= a.end_offset);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let total: u64 = (0..4).map(|q| store.queue_max_offset("g", q)).sum();
    assert_eq!(total, 815);
    // The 800 concurrent appends shared flushes.
    let after = store.flush_counts();
    assert_eq!(after.group_appends - alone.group_appends, 800);
    assert!(after.flushes - alone.flushes < 800, "{alone:?} {after:?}");
    store.shutdown().expect("shutdown");
}

/// The time spent flushing is counted, and only that: it grows with each
/// flush and never exceeds the time that passed.
#[test]
fn the_store_counts_the_time_it_spends_flushing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let before = store.flush_counts();
    let started = Instant::now();
    fill(&store, 0, 20);
    let during = started.elapsed();
    let after = store.flush_counts();
    assert!(after.flushes - before.flushes >= 1, "{before:?} {after:?}");
    let spent = after.flush_time - before.flush_time;
    assert!(spent > Duration::ZERO, "{before:?} {after:?}");
    assert!(spent <= during, "{spent:?} spent flushing in {during:?}");
    // Nothing to flush: the count stands.
    store.flush().expect("flush");
    assert_eq!(store.flush_counts().flush_time, after.flush_time);
    store.shutdown().expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_flush_times_out_its_waiters_and_they_recover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.flush_timeout = Duration::from_millis(200);
    let store = MessageStore::open(c).expect("open");
    let a = store.append(record(0)).expect("append");
    store.wait_flushed(a.end_offset).await.expect("flushed");
    // Another thread holds the flush lock, so the flusher stops in front
    // of its next fdatasync as if the disk did not answer.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let store = store.clone();
        std::thread::spawn(move || {
            let _stuck = store.inner.flush_lock.lock();
            held_tx.send(()).expect("send");
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
        })
    };
    held_rx.recv().expect("lock held");
    let b = store.append(record(1)).expect("append");
    // Bounded so that a missing timeout fails the test instead of hanging it.
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(Duration::from_secs(30), store.wait_flushed(b.end_offset))
        .await
        .expect("the wait ends while the flush is stuck");
    assert!(
        matches!(waited, Err(StoreError::FlushTimeout { offset, .. }) if offset == b.end_offset),
        "{waited:?}"
    );
    // Waits count the watchdog's ticks instead of reading the clock; they
    // must never give up before the timeout.
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "timed out after {:?}",
        started.elapsed()
    );
    let blocking = store.wait_flushed_blocking(b.end_offset);
    assert!(
        matches!(blocking, Err(StoreError::FlushTimeout { .. })),
        "{blocking:?}"
    );
    assert!(store.flushed_offset() < b.end_offset);
    release_tx.send(()).expect("release");
    holder.join().expect("holder");
    // Once the disk answers again, the same record becomes durable and new
    // appends are acknowledged.
    store.wait_flushed(b.end_offset).await.expect("flushed");
    let c = store.append(record(2)).expect("append");
    store.wait_flushed(c.end_offset).await.expect("flushed");
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    check_all(&store, 3);
    store.shutdown().expect("shutdown");
}

#[test]
fn sync_flush_writes_staged_groups_across_segment_rolls() {
    // Eight writers append concurrently under SYNC_FLUSH, so groups of
    // staged records are written together and often span a segment roll,
    // while a reader checks that everything published decodes (bytes are
    // published only after they are written).
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let done = AtomicBool::new(false);
    let appended: Vec<Vec<(u64, Appended)>> = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut pos = store.min_offset();
            let mut records = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                if pos >= store.max_offset() {
                    if finished {
                        return records;
                    }
                    std::thread::yield_now();
                    continue;
                }
                let bytes = store.read_raw(pos, 64 * 1024).expect("published bytes");
                assert!(!bytes.is_empty(), "no record readable at {pos}");
                let mut n = 0;
                while n < bytes.len() {
                    let len = record::le_u32(&bytes, n) as usize;
                    if record::le_u32(&bytes, n + 4) == RECORD_MAGIC {
                        record::decode(&bytes[n..n + len], pos + n as u64)
                            .expect("a published record decodes");
                        records += 1;
                    }
                    n += len;
                }
                pos += bytes.len() as u64;
            }
        });
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let store = &store;
                s.spawn(move || {
                    let got: Vec<_> = (0..100u64)
                        .map(|i| {
                            let seq = w * 1000 + i;
                            (seq, store.append(record(seq)).expect("append"))
                        })
                        .collect();
                    if let Some((_, last)) = got.last() {
                        store
                            .wait_flushed_blocking(last.end_offset)
                            .expect("flushed");
                    }
                    got
                })
            })
            .collect();
        let appended = writers
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect();
        done.store(true, Ordering::Release);
        let seen = reader.join().expect("reader");
        assert_eq!(seen, 800, "the reader saw every record once");
        appended
    });
    let all: Vec<_> = appended.into_iter().flatten().collect();
    let segments: std::collections::BTreeSet<u64> =
        all.iter().map(|(_, a)| a.offset / SEG).collect();
    assert!(segments.len() >= 8, "the test must roll segments often");
    let verify = |store: &MessageStore| {
        for (seq, a) in &all {
            let r = store.read_at(a.offset).expect("read");
            assert_eq!(&r.body[..], &body(*seq)[..], "body of record {seq}");
            let q = (seq % 3) as u32;
            let e = store
                .get("orders", q, a.queue_offset)
                .expect("read")
                .expect("indexed");
            assert_eq!(e.offset, a.offset, "queue entry of record {seq}");
        }
        for q in 0..3u32 {
            let n = all
                .iter()
                .filter(|(seq, _)| seq % 3 == u64::from(q))
                .count();
            assert_eq!(store.queue_max_offset("orders", q), n as u64);
        }
    };
    verify(&store);
    assert_eq!(store.flushed_offset(), store.max_offset());
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    verify(&store);
    store.shutdown().expect("shutdown");
}

/// Checks every `(seq, appended)` record by its offset and queue entry.
fn verify_appended(store: &MessageStore, all: &[(u64, Appended)]) {
    for (seq, a) in all {
        let r = store.read_at(a.offset).expect("read");
        assert_eq!(&r.body[..], &body(*seq)[..], "body of record {seq}");
        let e = store
            .get("orders", (seq % 3) as u32, a.queue_offset)
            .expect("read")
            .expect("indexed");
        assert_eq!(e.offset, a.offset, "queue entry of record {seq}");
    }
}

#[test]
fn zeros_written_ahead_never_cover_a_segment_filler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.segment_size = 1 << 20;
    let store = MessageStore::open(c.clone()).expect("open");
    // Lone appends, each waiting for its flush (too small to zero ahead),
    // ending exactly at 256 KiB, where a step of zeros may start.
    let stop = 256u64 << 10;
    let mut all = Vec::new();
    let mut seq = 0u64;
    loop {
        let left = stop - store.max_offset();
        let mut r = record(seq);
        if left < 2 * r.encoded_len() as u64 + 2048 {
            let bare = r.encoded_len() - r.body.len();
            r.body = (0..left as usize - bare)
                .map(|i| (seq as usize + i * 7) as u8)
                .collect::<Vec<u8>>()
                .into();
        }
        let expected = r.body.clone();
        let a = store.append(r).expect("append");
        store.wait_flushed_blocking(a.end_offset).expect("flushed");
        if a.end_offset == stop {
            let got = store.read_at(a.offset).expect("read");
            assert_eq!(got.body, expected);
            break;
        }
        all.push((seq, a));
        seq += 1;
    }
    assert_eq!(store.flush_counts().zeroed_ahead_bytes, 0);
    let inner = &store.inner;
    {
        // The flusher has read the write position (256 KiB); before it
        // writes its zeros, an appender rolls to the next segment and
        // closes this one with a filler right there.
        let _c = inner.commit_lock.lock();
        let mut tail = inner.tail.lock();
        let pos = tail.pos;
        assert_eq!(pos, stop);
        inner.clog.roll(&mut tail).expect("roll");
        drop(tail);
        // SAFETY: the commit lock is held; `pos` is what the flusher read.
        unsafe { inner.clog.zero_ahead(pos) }.expect("zeros");
    }
    // It zeroed only where nothing was written: the new segment's start.
    assert!(store.flush_counts().zeroed_ahead_bytes > 0);
    for _ in 0..20 {
        let a = store.append(record(seq)).expect("append");
        store.wait_flushed_blocking(a.end_offset).expect("flushed");
        assert!(a.offset >= 1 << 20, "past the filler, in the next segment");
        all.push((seq, a));
        seq += 1;
    }
    verify_appended(&store, &all);
    // The filler is intact, and a recovery that scans the whole log (as
    // after a crash with an old checkpoint) crosses it into the next segment.
    let mut filler = [0u8; 8];
    std::fs::File::open(dir.path().join("commitlog").join(format!("{:020}", 0)))
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut filler, stop)
        })
        .expect("segment");
    assert_eq!(record::le_u32(&filler, 4), record::BLANK_MAGIC);
    crash(store);
    let cp = Checkpoint {
        flushed_offset: 0,
        cq_offset: 0,
        clean: false,
        written_ms: 1,
    };
    save_json(&dir.path().join(CHECKPOINT), &cp).expect("checkpoint");
    let store = MessageStore::open(c).expect("recovers across the filler");
    assert_eq!(store.recovery_report().truncated_bytes_at, None);
    verify_appended(&store, &all);
    store.shutdown().expect("shutdown");
}

#[test]
fn group_flushes_write_zeros_ahead_and_lone_flushes_do_not() {
    let run = |flush_mode: FlushMode, zero_ahead: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(dir.path());
        c.segment_size = 4 << 20;
        c.flush_mode = flush_mode;
        c.zero_ahead = zero_ahead;
        let store = MessageStore::open(c.clone()).expect("open");
        let mut all = Vec::new();
        for seq in 0..20u64 {
            let a = store.append(record(seq)).expect("append");
            store.wait_flushed_blocking(a.end_offset).expect("flushed");
            all.push((seq, a));
        }
        let lone = store.flush_counts().zeroed_ahead_bytes;
        // Sixteen writers, each waiting for its record: groups of several
        // KiB per flush.
        let store_ref = &store;
        let grouped: Vec<(u64, Appended)> = std::thread::scope(|s| {
            let writers: Vec<_> = (0..16u64)
                .map(|w| {
                    s.spawn(move || {
                        (0..40u64)
                            .map(|i| {
                                let seq = 1000 + w * 100 + i;
                                let a = store_ref.append(record(seq)).expect("append");
                                store_ref
                                    .wait_flushed_blocking(a.end_offset)
                                    .expect("flushed");
                                (seq, a)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            writers
                .into_iter()
                .flat_map(|h| h.join().expect("writer"))
                .collect()
        });
        all.extend(grouped);
        let zeroed = store.flush_counts().zeroed_ahead_bytes;
        let cow = commit_log::copy_on_write_fs(dir.path());
        verify_appended(&store, &all);
        store.shutdown().expect("shutdown");
        let store = MessageStore::open(c).expect("reopen");
        assert_eq!(store.recovery_report().truncated_bytes_at, None);
        verify_appended(&store, &all);
        store.shutdown().expect("shutdown");
        (lone, zeroed, cow)
    };
    let (lone, grouped, cow) = run(FlushMode::SyncFlush, true);
    assert_eq!(lone, 0, "a lone writer's flushes do not zero ahead");
    if cow.is_none() {
        assert!(grouped > 0, "group flushes zero ahead");
    } else {
        assert_eq!(grouped, 0, "never on a copy-on-write filesystem ({cow:?})");
    }
    let zeros = |(lone, grouped, _): (u64, u64, Option<&str>)| (lone, grouped);
    assert_eq!(
        zeros(run(FlushMode::SyncFlush, false)),
        (0, 0),
        "unless turned off"
    );
    assert_eq!(
        zeros(run(FlushMode::AsyncFlush, true)),
        (0, 0),
        "nor under ASYNC_FLUSH"
    );
}

#[test]
fn staged_records_go_first_when_the_log_is_flushed_or_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 3);
    // Appended without waiting: possibly still staged.
    let pending: Vec<_> = (3..8)
        .map(|s| store.append(record(s)).expect("append"))
        .collect();
    let last = pending.last().expect("records").end_offset;
    assert_eq!(store.flush().expect("flush"), last);
    assert_eq!(store.flushed_offset(), last);
    check_all(&store, 8);
    // Cutting the log writes what is staged before it cuts.
    let more: Vec<_> = (8..12)
        .map(|s| store.append(record(s)).expect("append"))
        .collect();
    store.truncate_to(more[2].offset).expect("truncate");
    assert_eq!(store.max_offset(), more[2].offset);
    check_all(&store, 10);
    // Appends continue at the cut.
    let next = fill(&store, 10, 2);
    assert_eq!(next[0].offset, more[2].offset);
    check_all(&store, 12);
    store.shutdown().expect("shutdown");
    reopen_and_check(dir.path(), 12);
}

#[test]
fn publishing_records_notifies_the_replication_streams() {
    // Under SYNC_FLUSH records become readable only when the flusher writes
    // them, after the append returned; under ASYNC_FLUSH when the append
    // returns. Whoever ships them (the streams to the slaves) must be woken
    // then, in both modes.
    in_both_modes(publishing_notifies);
}

fn publishing_notifies(mode: FlushMode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(StoreConfig {
        flush_mode: mode,
        ..config(dir.path())
    })
    .expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let published = store.published_notify();
    for seq in 0..20 {
        let notified = published.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let a = store.append(record(seq)).expect("append");
        rt.block_on(async {
            // The bound only turns a missing notification into a failure.
            tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .expect("notified when the record was published");
        });
        assert!(
            store.max_offset() >= a.end_offset,
            "the record is readable once the streams are woken"
        );
        store.read_at(a.offset).expect("readable");
    }
    check_all(&store, 20);
    store.shutdown().expect("shutdown");
}

/// Resident kB of this process's mappings of `file`, from /proc/self/smaps.
fn resident_kb(file: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let name = file.to_string_lossy();
    let mut inside = false;
    let mut kb = 0;
    for line in smaps.lines() {
        // A mapping's header: "start-end perms offset dev inode [path]".
        let is_header = line
            .split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'));
        if is_header {
            inside = line.ends_with(&*name);
        } else if inside && let Some(v) = line.strip_prefix("Rss:") {
            kb += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .expect("Rss value");
        }
    }
    kb
}

#[test]
fn pages_far_behind_the_end_leave_the_process_and_read_back_intact() {
    // 160 MiB written through the mapping (ASYNC_FLUSH) into 64 MiB
    // segments: the first segment ends far behind the end of the log.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(mapped_config(dir.path())).expect("open");
    let body = |i: u64| vec![(i % 251) as u8; 16 << 10];
    for i in 0..10_240u64 {
        store
            .append(NewRecord::new("big", 0, body(i)))
            .expect("append");
    }
    let segment = |base: u64| {
        dir.path()
            .join("commitlog")
            .join(consume_queue::base_name(base))
    };
    let (first, second) = (segment(0), segment(64 << 20));
    store.inner.clog.release_behind();
    assert_eq!(resident_kb(&first), 0, "the first segment is still mapped");
    assert_eq!(
        resident_kb(&second),
        0,
        "the second segment is still mapped"
    );
    // Everything reads back, which maps pages of the old segments again ...
    for i in 0..10_240u64 {
        let r = store.get("big", 0, i).expect("read").expect("present");
        assert_eq!(&r.body[..], &body(i)[..], "record {i}");
    }
    assert!(
        resident_kb(&first) > 0,
        "reading did not map the first segment"
    );
    let cq = dir
        .path()
        .join("consumequeue/big/0")
        .join(consume_queue::base_name(0));
    let read = resident_kb(&cq);
    assert!(read > 64, "reading mapped only {read} kB of the queue");
    // ... and the readers' pages are released too: all of the log's old
    // segments, all but the newest 64 KiB (and a page) of the queue.
    store.release_mapped_behind();
    assert_eq!(resident_kb(&first), 0, "read pages stay mapped");
    let kept = resident_kb(&cq);
    assert!(kept <= 68, "{kept} kB of the queue stay mapped");
    store.shutdown().expect("shutdown");
    reopen_and_check_bodies(dir.path(), &body);
}

/// ASYNC_FLUSH (records written through the mapping), 64 MiB segments and
/// the default consume-queue files.
fn mapped_config(dir: &Path) -> StoreConfig {
    let mut c = config(dir);
    c.flush_mode = FlushMode::AsyncFlush;
    c.segment_size = 64 << 20;
    c.cq_entries_per_file = StoreConfig::new(dir).cq_entries_per_file;
    c
}

fn reopen_and_check_bodies(dir: &Path, body: &dyn Fn(u64) -> Vec<u8>) {
    let store = MessageStore::open(mapped_config(dir)).expect("reopen");
    assert_eq!(store.queue_max_offset("big", 0), 10_240);
    for i in [0u64, 4095, 4096, 10_239] {
        let r = store.get("big", 0, i).expect("read").expect("present");
        assert_eq!(&r.body[..], &body(i)[..], "record {i} after reopen");
    }
    store.shutdown().expect("shutdown");
}

/// Zeros the first bytes of the record at `offset` in the data directory.
fn zero_record_start(dir: &Path, offset: u64) {
    write_into_log(dir, SEG, offset, &[0u8; 16]);
}

/// Writes `bytes` at commit-log offset `offset` into the segment file
/// holding it, in the data directory `dir` of a log of `segment_size`-byte
/// segments.
fn write_into_log(dir: &Path, segment_size: u64, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(dir, segment_size, offset))
        .expect("segment")
        .write_all_at(bytes, offset % segment_size)
        .expect("write into the log");
}

/// Leaves an unclean checkpoint in `dir` that claims the log and the
/// consume queues flushed up to `offset` (as a crash after it left it).
fn unclean_checkpoint_at(dir: &Path, offset: u64) {
    save_json(
        &dir.join(CHECKPOINT),
        &Checkpoint {
            flushed_offset: offset,
            cq_offset: offset,
            clean: false,
            written_ms: 1,
        },
    )
    .expect("checkpoint");
}

/// After a crash of a store that wrote `batch` as one group: leaves an
/// unclean checkpoint at the batch's first record and zeros the start of
/// its 11th (a write of the group the disk lost).
fn lose_a_write_in(dir: &Path, batch: &[Appended]) {
    unclean_checkpoint_at(dir, batch[0].offset);
    zero_record_start(dir, batch[10].offset);
}

#[test]
fn zeros_over_a_record_start_refuse_start_when_records_follow_or_were_flushed() {
    let refused_at = |dir: &Path| match MessageStore::open(config(dir)) {
        Err(StoreError::RefuseToStart { offset, why, .. }) => (offset, why),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a log with a lost write in the middle"),
    };
    // After a crash, with valid records after the zeros (a lost write in
    // the middle of the segment being written).
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let a = fill(&store, 0, 30);
    crash(store);
    assert_eq!(a[29].end_offset / SEG, 0, "all in the first segment");
    zero_record_start(dir.path(), a[20].offset);
    let (offset, why) = refused_at(dir.path());
    assert_eq!(offset, a[20].offset);
    assert!(why.contains("valid record follows"), "{why}");
    open_cut_at_and_check(dir.path(), a[20].offset, 20);
    // After a clean shutdown, zeros over the last record: the checkpoint
    // says it was flushed, so it was lost, not never written.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let a = fill(&store, 0, 30);
    store.shutdown().expect("shutdown");
    zero_record_start(dir.path(), a[29].offset);
    let (offset, why) = refused_at(dir.path());
    assert_eq!(offset, a[29].offset);
    assert!(why.contains("checkpoint"), "{why}");
    // After a crash past the last checkpoint, the same zeros are a write
    // that never reached the disk: the log ends there.
    unclean_checkpoint_at(dir.path(), a[29].offset);
    let store = MessageStore::open(config(dir.path())).expect("recovers");
    assert_eq!(store.max_offset(), a[29].offset);
    check_all(&store, 29);
    store.shutdown().expect("shutdown");
}

#[test]
fn async_flush_cuts_an_unflushed_gap_after_a_power_loss() {
    // ASYNC_FLUSH promised nothing past the last flush: after a power loss
    // the disk may hold later pages and not earlier ones. A gap past the
    // checkpointed flush is cut; one below it is corruption.
    for (checkpointed, refused) in [(10, false), (25, true)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.flush_mode = FlushMode::AsyncFlush;
        let store = MessageStore::open(cfg.clone()).expect("open");
        let a: Vec<Appended> = (0..30)
            .map(|s| store.append(record(s)).expect("append"))
            .collect();
        store.flush().expect("flush");
        crash(store);
        unclean_checkpoint_at(dir.path(), a[checkpointed].offset);
        zero_record_start(dir.path(), a[20].offset);
        match MessageStore::open(cfg) {
            Err(StoreError::RefuseToStart { offset, .. }) if refused => {
                assert_eq!(offset, a[20].offset);
            }
            Ok(store) if !refused => {
                assert_eq!(
                    store.recovery_report().truncated_bytes_at,
                    Some(a[20].offset)
                );
                assert_eq!(store.max_offset(), a[20].offset);
                check_all(&store, 20);
                store.shutdown().expect("shutdown");
            }
            Err(e) => panic!("checkpoint at record {checkpointed}: {e}"),
            Ok(_) => panic!("checkpoint at record {checkpointed}: opened a corrupt log"),
        }
    }
}

/// Copies a data directory (files and subdirectories) for a fresh attempt.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

/// What a store opened over a log damaged in `damaged` may serve: every
/// record it returns is the one written there, byte for byte, and every
/// record outside the damage is still served, unless it lies past the end
/// an operator allowed the log to be cut at.
fn check_never_garbage(
    store: &MessageStore,
    layout: &[Appended],
    damaged: std::ops::Range<u64>,
    allowed_cut: Option<u64>,
    what: &str,
) {
    let mut next = [0u64; 3];
    for (seq, a) in layout.iter().enumerate() {
        let seq = seq as u64;
        let q = (seq % 3) as u32;
        let got = store.get("orders", q, next[q as usize]);
        next[q as usize] += 1;
        let intact = (a.end_offset <= damaged.start || a.offset >= damaged.end)
            && allowed_cut.is_none_or(|cut| a.end_offset <= cut);
        match got {
            Ok(Some(r)) => {
                assert_eq!(
                    r.properties.get("seq").map(String::as_str),
                    Some(seq.to_string().as_str()),
                    "{what}: record {seq} is another record"
                );
                assert_eq!(&r.body[..], &body(seq)[..], "{what}: body of record {seq}");
            }
            Ok(None) => assert!(
                !intact && a.offset >= store.max_offset(),
                "{what}: record {seq} at {} is missing (log end {})",
                a.offset,
                store.max_offset()
            ),
            Err(e) => assert!(!intact, "{what}: intact record {seq} unreadable: {e}"),
        }
    }
}

#[test]
fn random_damage_is_refused_or_cut_and_never_served() {
    let mut rng = crate::testing::seeded_rng();
    // A log of a little over three segments, left by a crash (no clean
    // checkpoint) and, separately, by a clean shutdown.
    let pristine = tempfile::tempdir().expect("tempdir");
    let crashed = pristine.path().join("crashed");
    let clean = pristine.path().join("clean");
    let store = MessageStore::open(config(&crashed)).expect("open");
    let layout = fill(&store, 0, 200);
    let end = layout.last().expect("records").end_offset;
    crash(store);
    copy_tree(&crashed, &clean);
    let store = MessageStore::open(config(&clean)).expect("open clean copy");
    store.shutdown().expect("shutdown");
    let starts: Vec<u64> = layout.iter().map(|a| a.offset).collect();
    for round in 0..120 {
        let base = if round % 2 == 0 { &crashed } else { &clean };
        let dir = pristine.path().join(format!("round{round}"));
        copy_tree(base, &dir);
        // The damage: where, how long, and what.
        let kind = rng.random_range(0..5);
        // A lost write starts where a group of records started.
        let at = if kind == 4 {
            starts[rng.random_range(0..starts.len())]
        } else {
            rng.random_range(0..end)
        };
        let len = match kind {
            0 => 1,
            1 => rng.random_range(1..64),
            2 => 4096 - at % 4096,
            3 => end - at,
            _ => rng.random_range(8..8192),
        };
        let seg_base = at / SEG * SEG;
        let len = len.min(seg_base + SEG - at);
        let path = segment_path(&dir, SEG, at);
        let mut bytes = std::fs::read(&path).expect("segment");
        let range = (at - seg_base) as usize..(at - seg_base + len) as usize;
        match kind {
            0 => bytes[range.start] ^= 1 << rng.random_range(0..8),
            1 | 3 => rng.fill(&mut bytes[range]),
            _ => bytes[range].fill(0),
        }
        std::fs::write(&path, &bytes).expect("damage");
        let what = format!(
            "round {round} ({}), damage kind {kind} at {at}+{len}",
            if round % 2 == 0 { "crash" } else { "clean" }
        );
        let mut allowed_cut = None;
        let store = match MessageStore::open(config(&dir)) {
            Ok(s) => s,
            Err(StoreError::RefuseToStart { offset, .. }) => {
                // The start of the damaged record, or of the filler that
                // closes a segment (where the record before it ends).
                assert!(
                    offset <= at
                        && layout
                            .iter()
                            .any(|a| a.offset == offset || a.end_offset == offset),
                    "{what}: refused at {offset}, not where the damaged record or filler starts"
                );
                let mut allowed = config(&dir);
                allowed.allow_truncate_at = Some(offset);
                let s = MessageStore::open(allowed).expect("opens once truncation is allowed");
                assert_eq!(s.max_offset(), offset, "{what}");
                allowed_cut = Some(offset);
                s
            }
            Err(e) => panic!("{what}: {e}"),
        };
        assert!(store.max_offset() <= end, "{what}");
        check_never_garbage(&store, &layout, at..at + len, allowed_cut, &what);
        // The store goes on: a new record lands at the end and reads back.
        let a = store.append(record(1_000)).expect("append after recovery");
        store.wait_flushed_blocking(a.end_offset).expect("flushed");
        assert_eq!(
            a.offset,
            store.max_offset() - (a.end_offset - a.offset),
            "{what}"
        );
        store.shutdown().expect("shutdown");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn a_flush_aimed_before_a_cut_never_marks_bytes_past_the_end_flushed() {
    in_both_modes(|mode| {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.flush_mode = mode;
        let store = MessageStore::open(cfg).expect("open");
        let a: Vec<Appended> = (0..10)
            .map(|s| store.append(record(s)).expect("append"))
            .collect();
        store.flush().expect("flush");
        let old_end = store.max_offset();
        // The flusher read the end, then a cut ran before it flushed.
        store.truncate_to(a[5].offset).expect("cut");
        store.flush_to(old_end).expect("flush with a stale target");
        assert_eq!(store.flushed_offset(), a[5].offset);
        // A record appended at the cut is not durable until flushed.
        let b = store.append(record(5)).expect("append");
        assert_eq!(b.offset, a[5].offset);
        assert!(store.flushed_offset() < b.end_offset);
        store.wait_flushed_blocking(b.end_offset).expect("flushed");
        store.shutdown().expect("shutdown");
    });
}

#[test]
fn a_cut_where_a_segment_filler_starts_is_at_a_record_boundary() {
    // A slave may hold a segment's last record and not the filler its
    // master wrote after it; the master, turned slave, cuts there.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let mut appended = fill(&store, 0, 1);
    while appended.last().expect("records").offset < SEG {
        appended.extend(fill(&store, appended.len() as u64, 1));
    }
    let n = appended.len();
    let filler_at = appended[n - 2].end_offset;
    assert!(filler_at < SEG, "the segment ends with a filler");
    store.truncate_to(filler_at).expect("cut at the filler");
    assert_eq!(store.max_offset(), filler_at);
    check_all(&store, n as u64 - 1);
    // Appends go on: the same record rolls to the next segment again.
    let again = fill(&store, n as u64 - 1, 1);
    assert_eq!(again[0].offset, SEG);
    store.shutdown().expect("shutdown");
    reopen_and_check(dir.path(), n as u64);
}

/// One record as the model of the store knows it.
#[derive(Clone)]
struct Modelled {
    seq: u64,
    topic: &'static str,
    queue: u32,
    queue_offset: u64,
    offset: u64,
    store_ms: i64,
}

fn model_body(seq: u64) -> Vec<u8> {
    // 100 to 3,100 bytes: segments of 64 KiB roll every few dozen records.
    let len = 100 + (seq.wrapping_mul(2_654_435_761) % 3_000) as usize;
    (0..len).map(|i| (seq as usize ^ i) as u8).collect()
}

/// Checks the store against the model: the log's end, every queue's
/// length, and every record still in the log read back through its queue.
fn check_model(store: &MessageStore, model: &[Modelled], end: u64, step: usize) {
    assert_eq!(store.max_offset(), end, "step {step}: end of the log");
    let min = store.min_offset();
    for topic in ["a", "b"] {
        for queue in 0..3 {
            let len = model
                .iter()
                .rfind(|m| m.topic == topic && m.queue == queue)
                .map_or(0, |m| m.queue_offset + 1);
            assert_eq!(
                store.queue_max_offset(topic, queue),
                len,
                "step {step}: length of {topic}/{queue}"
            );
            assert!(store.get(topic, queue, len).expect("read").is_none());
        }
    }
    for m in model {
        let got = store.get(m.topic, m.queue, m.queue_offset).expect("read");
        if m.offset < min {
            assert!(got.is_none(), "step {step}: record {} was removed", m.seq);
            continue;
        }
        let r = got.unwrap_or_else(|| panic!("step {step}: record {} missing", m.seq));
        assert_eq!(r.offset, m.offset, "step {step}: record {}", m.seq);
        assert_eq!(r.store_ms, m.store_ms, "step {step}: record {}", m.seq);
        assert_eq!(
            &r.body[..],
            &model_body(m.seq)[..],
            "step {step}: record {}",
            m.seq
        );
    }
}

#[test]
fn random_operations_keep_the_store_equal_to_a_model() {
    in_both_modes(operations_against_a_model);
}

/// Appends, cuts, restarts (clean and after a process crash, which loses
/// nothing in either flush mode: the page cache survives) and retention in
/// a random order, checking the store against a model after each step.
fn operations_against_a_model(mode: FlushMode) {
    let mut rng = crate::testing::seeded_rng();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.flush_mode = mode;
    let retention_ms = cfg.retention.as_millis() as i64;
    let mut store = MessageStore::open(cfg.clone()).expect("open");
    let mut model: Vec<Modelled> = Vec::new();
    let (mut seq, mut end, mut clock) = (0u64, 0u64, now_ms());
    for step in 0..400 {
        match rng.random_range(0..100) {
            // Appends, one at a time or in a batch.
            0..60 => {
                let n = rng.random_range(1..6);
                let batch: Vec<(&'static str, u32)> = (0..n)
                    .map(|_| (["a", "b"][rng.random_range(0..2)], rng.random_range(0..3)))
                    .collect();
                let records = batch
                    .iter()
                    .enumerate()
                    .map(|(i, &(t, q))| NewRecord::new(t, q, model_body(seq + i as u64)))
                    .collect();
                clock += rng.random_range(1..5_000);
                let done = store.append_batch_at(records, clock).expect("append");
                for (&(topic, queue), a) in batch.iter().zip(&done) {
                    model.push(Modelled {
                        seq,
                        topic,
                        queue,
                        queue_offset: a.queue_offset,
                        offset: a.offset,
                        store_ms: a.store_ms,
                    });
                    seq += 1;
                    end = a.end_offset;
                }
                if mode == FlushMode::SyncFlush {
                    store.wait_flushed_blocking(end).expect("flushed");
                }
            }
            // A cut at one of the last records (as a slave cuts a forked tail).
            60..68 => {
                let min = store.min_offset();
                let kept = model.iter().filter(|m| m.offset >= min).count();
                if kept == 0 {
                    continue;
                }
                let back = rng.random_range(1..=kept.min(6));
                let cut = model[model.len() - back].offset;
                store.truncate_to(cut).expect("truncate");
                model.truncate(model.len() - back);
                end = cut;
            }
            // Restarts, clean and after a crash.
            68..76 => {
                store.shutdown().expect("shutdown");
                store = MessageStore::open(cfg.clone()).expect("reopen");
            }
            76..84 => {
                crash(store);
                store = MessageStore::open(cfg.clone()).expect("reopen after crash");
            }
            // Retention up to a record's time: a segment goes when the next
            // one starts with an older record, never the one being written.
            84..90 => {
                let min = store.min_offset();
                let kept = model.iter().filter(|m| m.offset >= min).count();
                if kept == 0 {
                    continue;
                }
                // Up to about three segments' worth of records.
                let Some(h) = model
                    .iter()
                    .filter(|m| m.offset >= min)
                    .map(|m| m.store_ms)
                    .nth(rng.random_range(0..kept.min(120)))
                else {
                    continue;
                };
                let first_in = |base: u64| model.iter().find(|m| m.offset / SEG * SEG == base);
                let mut expect = min;
                while first_in(expect + SEG).is_some_and(|m| m.store_ms < h) {
                    expect += SEG;
                }
                store
                    .enforce_retention(h + retention_ms)
                    .expect("retention");
                assert_eq!(
                    store.min_offset(),
                    expect,
                    "step {step}: retention up to {h}"
                );
            }
            _ => {}
        }
        check_model(&store, &model, end, step);
    }
    store.shutdown().expect("shutdown");
}

#[test]
fn damaged_consume_queue_entries_are_rewritten_from_the_commit_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 400);
    let before = store.consume_queue_snapshot("orders", 1);
    let q = store.queue("orders", 1).expect("queue");
    let len = store.queue_max_offset("orders", 1);
    let entry = |i: u64| q.get(i).expect("entry");
    let damage = |i: u64, e: CqEntry| q.slot(i).expect("slot").put(e);
    let zeros = CqEntry {
        offset: 0,
        size: 0,
        tag_hash: 0,
    };
    // Zeros: the first entry (no earlier one to start the search from),
    // one in the middle, two side by side, the last (no later one).
    for i in [0, 5, 10, 11, len - 1] {
        damage(i, zeros);
    }
    // Garbage: past the end of the log, another message's place, a size
    // one byte short, in the queue's second file.
    damage(
        70,
        CqEntry {
            offset: u64::MAX / 2,
            size: 100,
            tag_hash: 1,
        },
    );
    damage(71, entry(3));
    let e = entry(72);
    damage(
        72,
        CqEntry {
            size: e.size - 1,
            ..e
        },
    );
    // Every message reads back, through the entries found again.
    check_all(&store, 400);
    assert_eq!(
        store.consume_queue_snapshot("orders", 1),
        before,
        "the rewritten entries are the originals"
    );
    // An entry whose record is damaged too is an error, not the end of the
    // queue: the messages after it are still there.
    let e = entry(20);
    damage(20, zeros);
    let seg = store.inner.clog.segment_for(e.offset).expect("segment");
    // SAFETY: test-only write into a published record; no concurrent readers.
    unsafe { seg.file.slice_mut(e.offset - seg.base + 80, 1)[0] ^= 0xff };
    assert!(matches!(
        store.get("orders", 1, 20),
        Err(StoreError::DamagedIndex {
            queue_offset: 20,
            ..
        })
    ));
    assert!(store.get("orders", 1, 21).expect("read").is_some());
    assert_eq!(store.queue_entry("orders", 1, 20), None, "skipped, logged");
    crash(store);
}

#[test]
fn a_damaged_entry_does_not_end_a_queue_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Entry 256 is where the search for a queue's end looks first (after 512).
    let store = reopen_with_zeroed_idle_entries(dir.path(), 1024, &[256]);
    assert_eq!(store.queue_max_offset("idle", 0), 300, "the queue's end");
    check_idle_queue_goes_on(store);
}

/// Body of message `i` of `topic` in the idle-queue tests (1000 bytes).
fn idle_body(topic: &str, i: u64) -> Vec<u8> {
    let mut b = format!("{topic}-{i}-").into_bytes();
    b.resize(1000, b'.');
    b
}

/// Appends 300 messages to "idle", then 200 to "busy" (so later segments
/// hold no record of "idle" and recovery does not look at it), zeroes the
/// entries `zeroed` of idle's queue (files of `entries_per_file`), and
/// reopens the store, checking that recovery started past idle's records.
fn reopen_with_zeroed_idle_entries(
    dir: &Path,
    entries_per_file: u64,
    zeroed: &[u64],
) -> MessageStore {
    let mut cfg = config(dir);
    cfg.cq_entries_per_file = entries_per_file;
    let store = MessageStore::open(cfg.clone()).expect("open");
    let put = |topic: &str, n: u64| {
        for i in 0..n {
            let a = store
                .append(NewRecord::new(topic, 0, idle_body(topic, i)))
                .expect("append");
            store.wait_flushed_blocking(a.end_offset).expect("flushed");
        }
    };
    put("idle", 300);
    put("busy", 200);
    let q = store.queue("idle", 0).expect("queue");
    for &i in zeroed {
        q.slot(i).expect("slot").put(CqEntry {
            offset: 0,
            size: 0,
            tag_hash: 0,
        });
    }
    drop(q);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(cfg).expect("reopen");
    assert!(store.recovery_report().scanned_from > 300 * 1000);
    store
}

/// The next message of "idle" goes after its 300, and all 301 read back.
fn check_idle_queue_goes_on(store: MessageStore) {
    let a = store
        .append(NewRecord::new("idle", 0, idle_body("idle", 300)))
        .expect("append");
    store.wait_flushed_blocking(a.end_offset).expect("flushed");
    assert_eq!(a.queue_offset, 300, "the next append goes after the end");
    for i in 0..=300 {
        let r = store.get("idle", 0, i).expect("read").expect("present");
        assert_eq!(r.body, idle_body("idle", i), "message {i}");
    }
    store.shutdown().expect("shutdown");
}

#[test]
fn consumer_offsets_past_the_end_of_a_queue_are_brought_back_at_open() {
    // Offsets are saved on their own schedule: after losing a tail (an
    // ASYNC_FLUSH crash) a group's offset can lie past its queue's end.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 3);
    let (t, q) = store.queues()[0].clone();
    let end = store.queue_max_offset(&t, q);
    store.metadata().commit_offset("g", &t, q, end + 5);
    store.metadata().commit_offset("h", &t, q, end);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert_eq!(store.metadata().get_offset("g", &t, q), Some(end));
    assert_eq!(store.metadata().get_offset("h", &t, q), Some(end));
    assert_eq!(store.clamp_consumer_offsets(), 0);
    store.shutdown().expect("shutdown");
}

/// Opens the store in `dir` on another thread, failing if that takes more
/// than a minute (recovery that never ends must fail the test, not hang it).
fn open_bounded(cfg: StoreConfig) -> MessageStore {
    try_open_bounded(cfg).expect("open")
}

/// Opens the store on another thread, failing the test if that takes more
/// than a minute (an open that never returns must fail it, not hang it).
fn try_open_bounded(cfg: StoreConfig) -> Result<MessageStore, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(MessageStore::open(cfg));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the store opens within a minute")
}

#[test]
fn consume_queues_rebuilt_after_retention_start_past_the_deleted_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let appended = fill(&store, 0, 400);
    let far_future = now_ms() + 10 * 365 * 24 * 3600 * 1000;
    assert!(store.enforce_retention(far_future).expect("retention") >= 2);
    let min = store.min_offset();
    let mut kept: Vec<u64> = (0..400)
        .filter(|&s| appended[s as usize].offset >= min)
        .collect();
    let firsts: Vec<u64> = (0..3)
        .map(|q| store.queue_min_offset("orders", q))
        .collect();
    assert!(
        firsts.iter().all(|&f| f > 0),
        "every queue lost its first entries: {firsts:?}"
    );
    store.shutdown().expect("shutdown");
    // The consume queues are lost: they are rebuilt from a log whose first
    // records are far into each queue (this used to loop for ever). The
    // second round opens the rebuilt, blank-filled queue files as they are.
    std::fs::remove_dir_all(dir.path().join("consumequeue")).expect("remove queues");
    for round in 0..2u64 {
        let store = open_bounded(config(dir.path()));
        assert_eq!(store.recovery_report().rebuilt_consume_queues, round == 0);
        for q in 0..3u32 {
            assert_eq!(
                store.queue_min_offset("orders", q),
                firsts[q as usize],
                "round {round}: first message of queue {q}"
            );
            assert!(
                store
                    .get("orders", q, firsts[q as usize] - 1)
                    .expect("read")
                    .is_none()
            );
        }
        let mut got: Vec<u64> = Vec::new();
        for q in 0..3u32 {
            for i in store.queue_min_offset("orders", q)..store.queue_max_offset("orders", q) {
                let r = store.get("orders", q, i).expect("read").expect("present");
                assert_eq!(
                    r.offset,
                    store.queue_entry("orders", q, i).expect("entry").offset
                );
                got.push(r.properties["seq"].parse::<u64>().expect("seq"));
            }
        }
        got.sort_unstable();
        assert_eq!(got, kept, "round {round}: the kept messages, each once");
        // Appends go on after the last entry of each queue.
        let from = 400 + 6 * round;
        fill(&store, from, 6);
        kept.extend(from..from + 6);
        store.shutdown().expect("shutdown");
    }
}

/// Appends `n` records in batches of ten, each batch flushed; returns
/// where each went.
fn fill_batched(store: &MessageStore, from: u64, n: u64) -> Vec<Appended> {
    let mut out = Vec::new();
    let mut s = from;
    while s < from + n {
        let upto = (s + 10).min(from + n);
        let got = store
            .append_batch((s..upto).map(record).collect())
            .expect("append");
        if let Some(last) = got.last() {
            store
                .wait_flushed_blocking(last.end_offset)
                .expect("flushed");
        }
        out.extend(got);
        s = upto;
    }
    out
}

/// Appends records in flushed batches of ten, from sequence 0, until the
/// log reaches `end`; returns how many were appended.
fn fill_batched_to(store: &MessageStore, end: u64) -> u64 {
    let mut n = 0;
    while store.max_offset() < end {
        fill_batched(store, n, 10);
        n += 10;
    }
    n
}

/// Runs retention on another thread, failing if it takes more than 30 s
/// (a retention pass that deadlocks must fail the test, not hang it).
fn retention_bounded(store: &MessageStore, now: i64) -> usize {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = store.clone();
    std::thread::spawn(move || {
        let _ = tx.send(s.enforce_retention(now));
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("retention finishes within 30 s")
        .expect("retention")
}

#[test]
fn watermark_retention_under_a_store_size_cap_frees_down_to_the_watermark() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.max_store_bytes = Some(10 * SEG);
    cfg.disk_high_watermark = 0.5;
    let store = MessageStore::open(cfg).expect("open");
    let mut appended = Vec::new();
    while store.max_offset() < 6 * SEG + SEG / 2 {
        let from = appended.len() as u64;
        appended.extend(fill_batched(&store, from, 10));
    }
    let before = store.inner.clog.disk_bytes();
    assert!(before > 5 * SEG, "{before}");
    let removed = retention_bounded(&store, now_ms());
    let after = store.inner.clog.disk_bytes();
    assert!(after <= 5 * SEG, "at or below the watermark: {after}");
    assert!(
        after + SEG > 5 * SEG,
        "no more than needed: {before} -> {after}, {removed} removed"
    );
    assert_eq!(removed as u64, (before - after) / SEG);
    for (s, a) in appended.iter().enumerate() {
        if a.offset >= store.min_offset() {
            assert_eq!(store.read_at(a.offset).expect("kept").body, body(s as u64));
        }
    }
    store.shutdown().expect("shutdown");
}

#[test]
fn watermark_retention_frees_what_the_filesystem_is_over_by_and_no_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.disk_high_watermark = 0.85;
    // 90 % used, each segment 1 % of the disk: five segments must go.
    cfg.fs_usage = |_| {
        Some(FsUsage {
            used: 90 * SEG,
            avail: 10 * SEG,
        })
    };
    let store = MessageStore::open(cfg).expect("open");
    fill_batched_to(&store, 8 * SEG + SEG / 2);
    let min = store.min_offset();
    assert_eq!(retention_bounded(&store, now_ms()), 5);
    assert_eq!(store.min_offset(), min + 5 * SEG);
    store.shutdown().expect("shutdown");
}

#[test]
fn damaged_entries_at_the_search_points_do_not_end_a_queue_at_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 150 and 75 are where a binary search over [0, 300) looks first; 256
    // starts the queue's last file.
    let store = reopen_with_zeroed_idle_entries(dir.path(), 64, &[150, 75, 256]);
    assert_eq!(store.queue_max_offset("idle", 0), 300, "the queue's end");
    let files = std::fs::read_dir(dir.path().join("consumequeue/idle/0"))
        .expect("ls")
        .count();
    assert_eq!(files, 5, "every file of the queue is kept");
    check_idle_queue_goes_on(store);
}

#[test]
fn reopening_after_a_kill_flushes_the_queue_entries_past_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let store = MessageStore::open(cfg.clone()).expect("open");
    fill(&store, 0, 30);
    store.checkpoint_with(|| {}).expect("checkpoint");
    fill(&store, 30, 30);
    // Killed: the last 30 entries are in the page cache only, and the
    // checkpoint does not cover them.
    crash(store);
    let store = MessageStore::open(cfg).expect("reopen");
    for q in 0..3 {
        let flushed = store.queue("orders", q).expect("queue").flushed_bytes();
        assert!(
            flushed >= 10 * consume_queue::ENTRY_LEN,
            "queue {q}: {flushed} bytes flushed at open"
        );
    }
    let cp: Checkpoint = load_json(&dir.path().join(CHECKPOINT)).expect("checkpoint");
    assert_eq!(cp.cq_offset, store.max_offset());
    check_all(&store, 60);
    store.shutdown().expect("shutdown");
}

#[test]
fn the_checkpoint_claims_only_queue_entries_flushed_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    // Only the test writes checkpoints.
    cfg.checkpoint_interval = Duration::from_secs(3600);
    let store = MessageStore::open(cfg).expect("open");
    fill(&store, 0, 20);
    let end = store.max_offset();
    store
        .checkpoint_with(|| {
            // Appended after the queues were flushed: their entries are not
            // durable when the checkpoint is written.
            fill(&store, 20, 20);
        })
        .expect("checkpoint");
    let cp = store.inner.last_checkpoint.lock().clone();
    assert!(store.flushed_offset() > end);
    assert!(
        cp.cq_offset <= end,
        "checkpoint claims queue entries up to {} flushed, only {end} were",
        cp.cq_offset
    );
    store.checkpoint_with(|| {}).expect("checkpoint");
    let cp = store.inner.last_checkpoint.lock().clone();
    assert_eq!(cp.cq_offset, store.max_offset());
    store.shutdown().expect("shutdown");
}

#[test]
fn a_stalled_flush_caps_what_sync_flush_appends_stage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.max_staged_bytes = 256 << 10;
    cfg.flush_timeout = Duration::from_secs(30);
    let store = MessageStore::open(cfg).expect("open");
    let rec = || NewRecord::new("big", 0, vec![7u8; 8 << 10]);
    // Another thread holds the flush lock: the flusher writes one group and
    // then waits in front of its fdatasync, as on a stalled disk.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let store = store.clone();
        std::thread::spawn(move || {
            let _stuck = store.inner.flush_lock.lock();
            held_tx.send(()).expect("send");
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
        })
    };
    held_rx.recv().expect("lock held");
    let mut accepted = Vec::new();
    let refused = loop {
        match store.append(rec()) {
            Ok(a) => accepted.push(a),
            Err(e) => break e,
        }
        let staged = store.inner.tail.lock().staged.byte_len();
        assert!(staged <= (256 << 10) + (9 << 10), "{staged} bytes staged");
        assert!(
            accepted.len() < 512,
            "4 MiB staged behind a stalled flush and never refused"
        );
    };
    assert!(matches!(refused, StoreError::Busy(_)), "{refused}");
    assert!(refused.to_string().contains("retry"), "{refused}");
    release_tx.send(()).expect("release");
    holder.join().expect("holder");
    let last = accepted.last().expect("some appends were taken");
    store
        .wait_flushed_blocking(last.end_offset)
        .expect("flushed once the disk answers");
    let a = store.append(rec()).expect("taken again");
    store.wait_flushed_blocking(a.end_offset).expect("flushed");
    for a in &accepted {
        assert_eq!(
            store.read_at(a.offset).expect("read").queue_offset,
            a.queue_offset
        );
    }
    store.shutdown().expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_a_record_the_log_cut_fails_even_once_the_offset_is_flushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 3);
    let a = store.append(record(3)).expect("append");
    // A returning master follows another: the record is cut, and the
    // other master's records take its offsets.
    store.truncate_to(a.offset).expect("cut");
    let b = store.append(record(3)).expect("append");
    assert_eq!((b.offset, b.end_offset), (a.offset, a.end_offset));
    let waited = tokio::time::timeout(Duration::from_secs(30), store.wait_appended(&a))
        .await
        .expect("the wait ends");
    assert!(
        matches!(waited, Err(StoreError::Truncated { offset }) if offset == a.offset),
        "{waited:?}"
    );
    store
        .wait_appended(&b)
        .await
        .expect("the new record is durable");
    store.shutdown().expect("shutdown");
}

/// A cut removed segment 2 and the prepared segment 3, and a crash came
/// before the removal of 3 was made durable: segment 3 holds what
/// `stray(commit-log directory)` gives, and is dropped at open.
fn stray_after_a_hole_is_dropped(stray: fn(&Path) -> Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let n = fill_batched_to(&store, SEG + SEG / 2);
    store.shutdown().expect("shutdown");
    let clog = dir.path().join("commitlog");
    let path = clog.join(consume_queue::base_name(3 * SEG));
    let _ = std::fs::remove_file(clog.join(consume_queue::base_name(2 * SEG)));
    std::fs::write(&path, stray(&clog)).expect("write");
    let store = open_bounded(config(dir.path()));
    assert!(!path.exists(), "the segment after the hole is gone");
    check_all(&store, n);
    fill(&store, n, 100);
    check_all(&store, n + 100);
    store.shutdown().expect("shutdown");
    reopen_and_check(dir.path(), n + 100);
}

#[test]
fn an_empty_segment_after_a_hole_is_dropped_at_open() {
    stray_after_a_hole_is_dropped(|_| vec![0u8; SEG as usize]);
}

#[test]
fn a_segment_with_records_after_a_hole_still_refuses_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill_batched_to(&store, 2 * SEG + SEG / 2);
    store.shutdown().expect("shutdown");
    std::fs::remove_file(
        dir.path()
            .join("commitlog")
            .join(consume_queue::base_name(SEG)),
    )
    .expect("remove segment 1");
    match MessageStore::open(config(dir.path())) {
        Err(StoreError::Corrupt { offset, reason }) => {
            assert_eq!(offset, SEG);
            assert!(reason.contains("missing"), "{reason}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a log with a missing segment"),
    }
}

#[test]
fn consume_queues_of_deleted_topics_are_released_once_their_messages_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let topic = |name: &str| TopicConfig {
        name: name.into(),
        queue_count: 1,
        message_type: MessageType::default(),
    };
    for t in ["gone", "kept"] {
        store.metadata().create_topic(topic(t)).expect("create");
    }
    store.metadata().commit_offset("g", "gone", 0, 1);
    for i in 0..5 {
        for t in ["gone", "kept"] {
            let a = store
                .append(NewRecord::new(t, 0, format!("{t}-{i}")))
                .expect("append");
            store.wait_flushed_blocking(a.end_offset).expect("flushed");
        }
    }
    store.metadata().delete_topic("gone").expect("delete");
    assert_eq!(store.metadata().get_offset("g", "gone", 0), None);
    // Until their messages expire, the queues stay.
    store.enforce_retention(now_ms()).expect("retention");
    assert!(store.queue("gone", 0).expect("queue").holds_files());
    fill_batched_to(&store, 3 * SEG);
    let far_future = now_ms() + 10 * 365 * 24 * 3600 * 1000;
    assert!(store.enforce_retention(far_future).expect("retention") > 0);
    let held = |t: &str| store.queue(t, 0).expect("queue").holds_files();
    assert!(!held("gone"), "the deleted topic's queue holds no file");
    assert!(held("kept"));
    assert_eq!(store.queue_max_offset("gone", 0), 5, "its length is kept");
    assert!(store.get("gone", 0, 4).expect("read").is_none());
    let files = |t: &str| {
        std::fs::read_dir(dir.path().join("consumequeue").join(t).join("0"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(consume_queue::parse_base_name)
                            .is_some()
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(files("gone"), 0, "its files are removed");
    assert_eq!(files("kept"), 1);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert_eq!(
        store.queue_max_offset("gone", 0),
        5,
        "kept across a restart"
    );
    assert!(!store.queue("gone", 0).expect("queue").holds_files());
    // A topic created again under the name goes on from the old queue's
    // end (consumers' positions stay meaningful), across restarts.
    store
        .metadata()
        .create_topic(topic("gone"))
        .expect("create");
    let a = store
        .append(NewRecord::new("gone", 0, "again"))
        .expect("append");
    store.wait_flushed_blocking(a.end_offset).expect("flushed");
    assert_eq!(a.queue_offset, 5);
    assert_eq!(store.queue_min_offset("gone", 0), 5);
    store.shutdown().expect("shutdown");
    let store = MessageStore::open(config(dir.path())).expect("reopen");
    assert_eq!(store.queue_max_offset("gone", 0), 6);
    let r = store.get("gone", 0, 5).expect("read").expect("present");
    assert_eq!(&r.body[..], b"again");
    assert!(store.get("gone", 0, 4).expect("read").is_none());
    store.shutdown().expect("shutdown");
}

/// A SYNC_FLUSH store in `dir` with 5 records, then 40 appended as one
/// batch (one group: one write, one fdatasync), flushed; the batch.
fn one_flushed_group(dir: &Path) -> (MessageStore, Vec<Appended>) {
    let store = MessageStore::open(config(dir)).expect("open");
    fill(&store, 0, 5);
    let batch = store
        .append_batch((5..45).map(record).collect())
        .expect("batch");
    let end = batch.last().expect("records").end_offset;
    store.wait_flushed_blocking(end).expect("flushed");
    (store, batch)
}

#[test]
fn sync_flush_cuts_the_group_a_power_loss_tore_and_refuses_when_a_later_group_follows() {
    // One batch is one staged append: one group, written with one write and
    // made durable by one fdatasync. A power loss during that fdatasync may
    // keep any of its pages: nothing in it was acknowledged.
    let setup = |after: bool| {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, batch) = one_flushed_group(dir.path());
        if after {
            // A group written after that flush returned.
            fill(&store, 45, 1);
        }
        crash(store);
        lose_a_write_in(dir.path(), &batch);
        (dir, batch)
    };
    let (dir, batch) = setup(false);
    let store = open_bounded(config(dir.path()));
    assert_eq!(
        store.recovery_report().truncated_bytes_at,
        Some(batch[10].offset)
    );
    assert_eq!(store.max_offset(), batch[10].offset);
    check_all(&store, 15);
    assert_eq!(store.read_at(batch[0].offset).expect("read").flags, 0);
    store.shutdown().expect("shutdown");

    let (dir, batch) = setup(true);
    match MessageStore::open(config(dir.path())) {
        Err(StoreError::RefuseToStart { offset, .. }) => assert_eq!(offset, batch[10].offset),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("cut records a later flush had made durable"),
    }
}

#[test]
fn an_unreadable_store_id_is_an_error_not_a_new_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let id = store.store_id().to_owned();
    store.shutdown().expect("shutdown");
    let path = dir.path().join("store_id");
    std::fs::write(&path, [0xff, 0xfe, 0x00]).expect("damage");
    assert!(MessageStore::open(config(dir.path())).is_err());
    assert_eq!(std::fs::read(&path).expect("read"), [0xff, 0xfe, 0x00]);
    std::fs::write(&path, &id).expect("restore");
    let store = MessageStore::open(config(dir.path())).expect("open");
    assert_eq!(store.store_id(), id);
    store.shutdown().expect("shutdown");
    // Missing or empty: a new disk, a new identity.
    std::fs::write(&path, "").expect("empty");
    let store = MessageStore::open(config(dir.path())).expect("open");
    assert_ne!(store.store_id(), id);
    store.shutdown().expect("shutdown");
}

#[test]
fn consume_queues_of_another_file_size_are_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    fill(&store, 0, 200);
    store.shutdown().expect("shutdown");
    let mut cfg = config(dir.path());
    cfg.cq_entries_per_file = 100;
    let store = open_bounded(cfg.clone());
    assert!(store.recovery_report().rebuilt_consume_queues);
    check_all(&store, 200);
    fill(&store, 200, 10);
    store.shutdown().expect("shutdown");
    let store = open_bounded(cfg);
    assert!(!store.recovery_report().rebuilt_consume_queues);
    check_all(&store, 210);
    store.shutdown().expect("shutdown");
}

#[test]
fn a_high_watermark_above_the_full_ratio_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.disk_high_watermark = 0.96;
    cfg.disk_full_ratio = 0.95;
    assert!(matches!(cfg.validate(), Err(StoreError::Config(_))));
    cfg.disk_high_watermark = 0.95;
    cfg.validate().expect("equal is allowed");
}

/// Under SYNC_FLUSH, damage followed first by valid records that carry no
/// `record::FLUSHED_BEFORE` (the rest of the torn group) and then by one
/// that does (a later group): recovery's one scan from the damage tells
/// both apart, and the refusal names the marked record, not the first
/// valid one after the damage.
#[test]
fn a_sync_flush_refusal_names_the_first_record_marked_flushed_before() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, batch) = one_flushed_group(dir.path());
    let later = fill(&store, 45, 2);
    crash(store);
    assert_eq!(later[1].end_offset / SEG, 0, "all in the first segment");
    let marked = |offset: u64| {
        let f = std::fs::File::open(segment_path(dir.path(), SEG, offset)).expect("segment");
        let mut head = [0u8; 16];
        f.read_exact_at(&mut head, offset % SEG).expect("read");
        record::is_flushed_before(&head)
    };
    assert!(
        batch[11..].iter().all(|a| !marked(a.offset)),
        "the rest of the batch is not marked"
    );
    assert!(marked(later[0].offset), "the next group is");
    lose_a_write_in(dir.path(), &batch);
    match MessageStore::open(config(dir.path())) {
        Err(StoreError::RefuseToStart { offset, why, .. }) => {
            assert_eq!(offset, batch[10].offset);
            assert_eq!(
                why,
                format!(
                    "a valid record follows at offset {}, written once everything before it had \
                     been flushed",
                    later[0].offset
                )
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("cut records a later flush had made durable"),
    }
    open_cut_at_and_check(dir.path(), batch[10].offset, 15);
}

/// After a clean shutdown recovery takes the checkpointed end as the end
/// and searches only a window past it (in a reused segment the full search
/// would read the older records the rest of the file holds). Records of
/// the log's own shape are planted past the end, marked as written once
/// everything before them was flushed (after a crash: a write lost in the
/// middle of the log): one beyond the window is neither refused on nor
/// served; one inside it (as the records of a next run whose unclean
/// checkpoint and first block the disk lost would be) makes recovery search
/// as after a crash, and refuse.
#[test]
fn after_a_clean_shutdown_recovery_takes_the_checkpointed_end_as_the_end() {
    const BIG_SEG: u64 = 4 << 20;
    let (dir, end) = clean_log_of_30(BIG_SEG);
    // Queue 0 holds records 0, 3, ..., 27: a planted one would be its 11th.
    let plant = |at: u64| {
        let planted = record(30);
        let mut bytes = vec![0u8; planted.encoded_len()];
        record::encode_into(&mut bytes, &planted, at, 10, now_ms());
        record::set_flushed_before(&mut bytes, true);
        assert!(at + bytes.len() as u64 <= BIG_SEG, "in the first segment");
        write_into_log(dir.path(), BIG_SEG, at, &bytes);
    };
    let far = (end + recovery::CLEAN_END_WINDOW).next_multiple_of(4096);
    plant(far);
    let store = open_bounded(config_with_segments(dir.path(), BIG_SEG));
    let report = store.recovery_report();
    assert!(report.clean_shutdown);
    assert_eq!(report.truncated_bytes_at, None);
    assert_eq!(store.max_offset(), end);
    check_all(&store, 30);
    store.shutdown().expect("shutdown");
    let near = (end + 8192).next_multiple_of(4096);
    plant(near);
    match MessageStore::open(config_with_segments(dir.path(), BIG_SEG)) {
        Err(StoreError::RefuseToStart { offset, why, .. }) => {
            assert_eq!(offset, end);
            assert!(why.contains(&format!("at offset {near}")), "{why}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("took the end for clean with records of the log just past it"),
    }
}

/// The test configuration with `segment_size`-byte segments.
fn config_with_segments(dir: &Path, segment_size: u64) -> StoreConfig {
    StoreConfig {
        segment_size,
        ..config(dir)
    }
}

/// A store of 30 records in `segment_size`-byte segments, shut down
/// cleanly: its directory, and where its log ends.
fn clean_log_of_30(segment_size: u64) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config_with_segments(dir.path(), segment_size)).expect("open");
    fill(&store, 0, 30);
    let end = store.max_offset();
    store.shutdown().expect("shutdown");
    (dir, end)
}

/// What recovery reads past the end of the log: after a clean shutdown only
/// the window, whatever the rest of the segment holds (here 2 MiB of
/// non-zero bytes that are no records, as an older file's would be in a
/// reused segment); after a crash, all of it.
#[test]
fn a_clean_restart_reads_only_the_window_past_the_end() {
    const BIG_SEG: u64 = 8 << 20;
    const OLD: u64 = 2 << 20;
    let (dir, end) = clean_log_of_30(BIG_SEG);
    let old_at = (end + recovery::CLEAN_END_WINDOW).next_multiple_of(4096) + 4096;
    assert!(old_at + OLD <= BIG_SEG);
    write_into_log(dir.path(), BIG_SEG, old_at, &vec![0x5au8; OLD as usize]);
    let reopen = || {
        let store = open_bounded(config_with_segments(dir.path(), BIG_SEG));
        let report = store.recovery_report().clone();
        assert_eq!((report.end, report.truncated_bytes_at), (end, None));
        check_all(&store, 30);
        store.shutdown().expect("shutdown");
        report
    };
    let report = reopen();
    assert!(report.clean_shutdown);
    assert!(
        report.searched_bytes <= 2 * recovery::CLEAN_END_WINDOW,
        "read {} bytes past a clean end",
        report.searched_bytes
    );
    unclean_checkpoint_at(dir.path(), end);
    let report = reopen();
    assert!(
        report.searched_bytes >= OLD,
        "read only {} bytes past the end after a crash",
        report.searched_bytes
    );
}

/// A segment filler found exactly at a clean end, with no segment after it
/// (a roll whose next segment was lost): the clean end stands and, as
/// wherever the log is to write past a filler, the filler and the footer
/// that says where it starts are zeroed (the clean-end rule skips only the
/// search past the end, not this), so nothing of that roll is left past
/// the end; the log then goes on from there.
#[test]
fn a_filler_at_a_clean_end_is_zeroed_for_the_log_to_write_past() {
    use std::os::unix::fs::FileExt;
    const BIG_SEG: u64 = 4 << 20;
    let (dir, end) = clean_log_of_30(BIG_SEG);
    let _ = std::fs::remove_file(segment_path(dir.path(), BIG_SEG, BIG_SEG));
    let blank = BIG_SEG - end;
    write_into_log(
        dir.path(),
        BIG_SEG,
        end,
        &record::blank_header(blank as u32),
    );
    write_into_log(dir.path(), BIG_SEG, BIG_SEG - 8, &end.to_le_bytes());

    let store = open_bounded(config_with_segments(dir.path(), BIG_SEG));
    let report = store.recovery_report().clone();
    assert!(report.clean_shutdown);
    assert_eq!((report.end, report.truncated_bytes_at), (end, None));
    assert_eq!(store.max_offset(), end);
    store.shutdown().expect("shutdown");
    let file = std::fs::File::open(segment_path(dir.path(), BIG_SEG, 0)).expect("segment");
    let mut rest = vec![0u8; blank as usize];
    file.read_exact_at(&mut rest, end).expect("read the rest");
    assert!(
        rest.iter().all(|&b| b == 0),
        "the filler at the clean end was left in place"
    );

    // The log goes on where the filler was, across a restart after a crash.
    let store = open_bounded(config_with_segments(dir.path(), BIG_SEG));
    let more = fill(&store, 30, 6);
    assert_eq!(more[0].offset, end);
    let new_end = store.max_offset();
    drop(store);
    unclean_checkpoint_at(dir.path(), new_end);
    let store = open_bounded(config_with_segments(dir.path(), BIG_SEG));
    assert_eq!(store.max_offset(), new_end);
    check_all(&store, 36);
    store.shutdown().expect("shutdown");
}

/// Nothing writes or cuts the log once shutdown has begun, replication's
/// paths included (a slave's write may wait for the commit lock behind
/// `shutdown`): recovery takes a clean checkpoint's end as the end of the
/// log, so nothing may land past it.
#[test]
fn nothing_writes_or_cuts_the_log_once_shutdown_has_begun() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let master = MessageStore::open(config(a_dir.path())).expect("open");
    let a = fill(&master, 0, 10);
    let slave = MessageStore::open(config(b_dir.path())).expect("open");
    let held = slave
        .append_raw(0, &master.read_raw(0, a[5].offset as usize).expect("read"))
        .expect("append raw");
    assert_eq!(held, a[5].offset);
    slave.shutdown().expect("shutdown");
    let rest = master
        .read_raw(held, (a[9].end_offset - held) as usize)
        .expect("read");
    assert!(matches!(
        slave.append_raw(held, &rest),
        Err(StoreError::Closed)
    ));
    assert!(matches!(slave.flush(), Err(StoreError::Closed)));
    assert!(matches!(
        slave.truncate_to(a[2].offset),
        Err(StoreError::Closed)
    ));
    assert!(matches!(slave.restart_at(SEG), Err(StoreError::Closed)));
    assert!(matches!(slave.append(record(5)), Err(StoreError::Closed)));
    drop(slave);
    master.shutdown().expect("shutdown");
    let slave = open_bounded(config(b_dir.path()));
    assert!(slave.recovery_report().clean_shutdown);
    assert_eq!(slave.max_offset(), held);
    check_all(&slave, 5);
    slave.shutdown().expect("shutdown");
}

/// Appends records one by one, each flushed before the next, numbered from
/// `*n` on, until the log reaches `end`; returns where they went.
fn fill_to(store: &MessageStore, n: &mut u64, end: u64) -> Vec<Appended> {
    let mut appended = Vec::new();
    while store.max_offset() < end {
        appended.extend(fill(store, *n, 1));
        *n += 1;
    }
    appended
}

/// The spare files retention kept in the commit-log directory.
fn spare_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("commitlog"))
        .expect("ls")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name()
                .to_str()?
                .ends_with(mapped::SPARE_SUFFIX)
                .then(|| e.path())
        })
        .collect();
    v.sort();
    v
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").ino()
}

/// Old records (three days old) over the first three segments, then
/// retention: returns the store, how many records, and what the spare
/// files retention kept hold, by inode.
fn store_with_spares(dir: &Path) -> (MessageStore, u64, HashMap<u64, Vec<u8>>) {
    store_with_spares_in(dir, |_| {}, false)
}

/// What each spare file held before it was reused, by inode.
fn spare_contents(dir: &Path) -> HashMap<u64, Vec<u8>> {
    spare_files(dir)
        .iter()
        .map(|p| (inode(p), std::fs::read(p).expect("read spare")))
        .collect()
}

/// Where the filler of a segment's contents `bytes` starts.
fn filler_in(bytes: &[u8], base: u64) -> usize {
    let mut pos = 0;
    loop {
        match record::probe(&bytes[pos..], base + pos as u64) {
            record::Probe::Record { len, .. } => pos += len,
            record::Probe::Blank => return pos,
            _ => panic!("no filler found: stopped at {pos}"),
        }
    }
}

/// [`store_with_spares`], with the configuration changed by `adjust`,
/// and the store restarted before retention runs when `restart` is set.
fn store_with_spares_in(
    dir: &Path,
    adjust: impl FnOnce(&mut StoreConfig),
    restart: bool,
) -> (MessageStore, u64, HashMap<u64, Vec<u8>>) {
    let mut cfg = config(dir);
    adjust(&mut cfg);
    cfg.retention = Duration::from_secs(3600);
    let mut store = MessageStore::open(cfg.clone()).expect("open");
    let t0 = now_ms() - 3 * 24 * 3600 * 1000;
    let mut n = 0u64;
    while store.max_offset() < 3 * SEG + SEG / 4 {
        let a = store
            .append_batch_at(vec![record(n)], t0 + n as i64)
            .expect("old")[0];
        store.wait_flushed_blocking(a.end_offset).expect("flushed");
        n += 1;
    }
    // A new record, so that the segment before the end's expires as well.
    fill(&store, n, 1);
    n += 1;
    if restart {
        store.shutdown().expect("shutdown");
        store = open_bounded(cfg);
    }
    let removed = retention_bounded(&store, now_ms());
    assert_eq!(removed, 3, "the three old segments expired");
    let spares = spare_files(dir);
    assert_eq!(spares.len(), 2, "two of them are kept: {spares:?}");
    (store, n, spare_contents(dir))
}

#[test]
fn retention_keeps_expired_files_and_the_next_segments_are_made_of_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, mut n, spares) = store_with_spares(dir.path());
    let first_new = n - 1;
    let start = store.max_offset();
    // Two more segments: the prepared one may predate the spares; the one
    // after it is made of one.
    let appended = fill_to(&store, &mut n, start + 3 * SEG);
    let reused: Vec<Arc<commit_log::Segment>> = store
        .inner
        .clog
        .segments()
        .into_iter()
        .filter(|s| s.is_reused())
        .collect();
    assert!(!reused.is_empty(), "a segment was made of a spare file");
    assert!(
        store.flush_counts().reused_segments >= reused.len() as u64,
        "counted"
    );
    for seg in &reused {
        let old = spares
            .get(&inode(seg.file.path()))
            .unwrap_or_else(|| panic!("{} is one of the spare files", seg.file.path().display()));
        // The old filler is gone: nothing past this life's records
        // closes the segment early.
        let now = std::fs::read(seg.file.path()).expect("read");
        let filler = filler_in(old, record::le_u64(old, 28));
        if seg.base + filler as u64 >= store.max_offset() {
            assert_eq!(&now[filler..filler + 8], &[0u8; 8], "old filler zeroed");
        }
    }
    assert!(
        spare_files(dir.path()).len() < 2,
        "spares were taken from the pool"
    );
    let check = |store: &MessageStore| {
        for (i, a) in appended.iter().enumerate() {
            let r = store.read_at(a.offset).expect("read back");
            assert_eq!(r.body, body(first_new + 1 + i as u64), "record {i}");
        }
        // Nothing before the kept segments is served, whatever the reused
        // files still hold.
        assert!(store.read_at(0).is_err());
        assert!(
            store
                .get("orders", 0, 0)
                .expect("read")
                .is_none_or(|r| r.offset >= store.min_offset())
        );
    };
    check(&store);
    // After a crash, recovery finds the end where the records end: the
    // older records the reused files hold are neither the log's nor damage.
    let end = store.max_offset();
    let flushed_before = appended[appended.len() / 2].offset;
    crash(store);
    unclean_checkpoint_at(dir.path(), flushed_before);
    let store = open_bounded(config(dir.path()));
    assert_eq!(store.recovery_report().truncated_bytes_at, None);
    assert_eq!(store.max_offset(), end);
    check(&store);
    // Appends go on, and a clean restart finds everything.
    let more = fill(&store, n, 50);
    store.shutdown().expect("shutdown");
    let store = open_bounded(config(dir.path()));
    assert_eq!(store.recovery_report().truncated_bytes_at, None);
    for (i, a) in more.iter().enumerate() {
        assert_eq!(
            store.read_at(a.offset).expect("read").body,
            body(n + i as u64)
        );
    }
    assert!(
        spare_files(dir.path()).is_empty(),
        "a restart starts without spares"
    );
    store.shutdown().expect("shutdown");
}

#[test]
fn a_torn_record_in_a_reused_segment_is_cut_and_its_old_bytes_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, mut n, spares) = store_with_spares(dir.path());
    let start = store.max_offset();
    let appended = fill_to(&store, &mut n, start + 2 * SEG + SEG / 2);
    let last = *appended.last().expect("records");
    let seg = store.inner.clog.segment_for(last.offset).expect("segment");
    assert!(seg.is_reused(), "the last records are in a reused segment");
    drop(seg);
    crash(store);
    // From the middle of the last record on, the file holds what it held
    // before it was reused (the rest of that write never reached the
    // disk): older records, and no zeros where this life's records end.
    let path = segment_path(dir.path(), SEG, last.offset);
    let older = spares.get(&inode(&path)).expect("a spare's contents");
    let mut torn = std::fs::read(&path).expect("read");
    let cut = (last.offset % SEG + (last.end_offset - last.offset) / 2) as usize;
    torn[cut..].copy_from_slice(&older[cut..]);
    assert_ne!(&torn[cut..cut + 64], &[0u8; 64], "older bytes, not zeros");
    std::fs::write(&path, &torn).expect("tear");
    unclean_checkpoint_at(dir.path(), appended[0].offset);
    let store = open_bounded(config(dir.path()));
    assert_eq!(
        store.recovery_report().truncated_bytes_at,
        Some(last.offset)
    );
    assert_eq!(store.max_offset(), last.offset);
    for a in &appended[..appended.len() - 1] {
        store.read_at(a.offset).expect("kept");
    }
    assert!(store.read_at(last.offset).is_err());
    let a = store.append(record(n)).expect("append");
    assert_eq!(a.offset, last.offset);
    store.wait_flushed_blocking(a.end_offset).expect("flush");
    assert_eq!(store.read_at(a.offset).expect("read").body, body(n));
    store.shutdown().expect("shutdown");
}

#[test]
fn a_reused_file_after_a_hole_holds_no_record_and_is_dropped_at_open() {
    // Made of a spare: its first page zeroed, the rest segment 0's records.
    stray_after_a_hole_is_dropped(|clog| {
        let mut old = std::fs::read(clog.join(consume_queue::base_name(0))).expect("segment 0");
        old[..mapped::PAGE as usize].fill(0);
        old
    });
}

/// Bytes the filesystem of `over_the_watermark_spare_files_go_first`
/// has in use.
static USED_BYTES: AtomicU64 = AtomicU64::new(0);

#[test]
fn over_the_watermark_spare_files_go_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _, _) = store_with_spares_in(
        dir.path(),
        |cfg| {
            cfg.disk_high_watermark = 0.5;
            cfg.fs_usage = |_| {
                let used = USED_BYTES.load(Ordering::Relaxed);
                Some(FsUsage {
                    used,
                    avail: 200 * SEG - used,
                })
            };
        },
        false,
    );
    let min = store.min_offset();
    // Over the watermark by less than the spares hold: they are enough.
    USED_BYTES.store(100 * SEG + SEG / 2, Ordering::Relaxed);
    assert_eq!(retention_bounded(&store, now_ms()), 0, "no segment went");
    assert_eq!(store.min_offset(), min);
    assert!(spare_files(dir.path()).is_empty(), "the spares went");
    // With no spares, segments go, and none is kept as a spare.
    let mut n = 1_000_000;
    fill_to(&store, &mut n, min + 2 * SEG + SEG / 4);
    USED_BYTES.store(100 * SEG + SEG + SEG / 2, Ordering::Relaxed);
    assert_eq!(retention_bounded(&store, now_ms()), 2);
    assert_eq!(store.min_offset(), min + 2 * SEG);
    assert!(spare_files(dir.path()).is_empty());
    store.shutdown().expect("shutdown");
}

#[test]
fn a_reused_segment_opened_again_still_ends_its_writes_with_zeros() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, mut n, _) = store_with_spares(dir.path());
    let start = store.max_offset();
    fill_to(&store, &mut n, start + 2 * SEG + SEG / 8);
    let seg = store
        .inner
        .clog
        .segment_for(store.max_offset())
        .expect("tail");
    assert!(seg.is_reused(), "the tail segment is a reused one");
    drop(seg);
    store.shutdown().expect("shutdown");
    // Opened again, the segment is not known to be reused; its writes
    // still end with zeros up to the next page boundary, past older bytes.
    let store = open_bounded(config(dir.path()));
    assert_eq!(store.recovery_report().truncated_bytes_at, None);
    let mut ends = Vec::new();
    let mut appended = Vec::new();
    while store.max_offset() < start + 2 * SEG + SEG / 2 {
        appended.extend(fill(&store, n, 1));
        n += 1;
        let end = store.max_offset();
        let seg = store.inner.clog.segment_for(end).expect("tail");
        let rel = (end - seg.base) as usize;
        let upto = (rel + record::BLANK_LEN).next_multiple_of(mapped::PAGE as usize);
        let mut after = vec![1u8; upto.min(SEG as usize) - rel];
        seg.file.pread(&mut after, rel as u64).expect("read");
        ends.push(after.iter().all(|&b| b == 0));
    }
    assert!(ends.iter().all(|&z| z), "zeros after every write: {ends:?}");
    store.shutdown().expect("shutdown");
    let store = open_bounded(config(dir.path()));
    assert_eq!(
        store.recovery_report().truncated_bytes_at,
        None,
        "a clean restart cuts nothing"
    );
    for (i, a) in appended.iter().enumerate() {
        let first = n - appended.len() as u64;
        assert_eq!(
            store.read_at(a.offset).expect("read").body,
            body(first + i as u64)
        );
    }
    store.shutdown().expect("shutdown");
}

#[test]
fn a_log_missing_records_of_a_queue_is_damage_not_an_endless_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let appended = fill(&store, 0, 30);
    store.shutdown().expect("shutdown");
    // Record 20 claims a later entry of its queue than it is (as if the
    // log had lost records of that queue before it), with a valid
    // checksum; the consume queues are gone, so they are rebuilt.
    let target = appended[20];
    let path = segment_path(dir.path(), SEG, target.offset);
    let mut seg = std::fs::read(&path).expect("read");
    let at = (target.offset % SEG) as usize;
    let len = (target.end_offset - target.offset) as usize;
    let rec = &mut seg[at..at + len];
    let qo = record::le_u64(rec, 20) + 5;
    rec[20..28].copy_from_slice(&qo.to_le_bytes());
    record::seal(rec);
    std::fs::write(&path, &seg).expect("write");
    std::fs::remove_dir_all(dir.path().join("consumequeue")).expect("remove queues");
    // Below the last checkpointed flush: corruption, named.
    match try_open_bounded(config(dir.path())) {
        Err(StoreError::RefuseToStart { offset, reason, .. }) => {
            assert_eq!(offset, target.offset);
            assert!(reason.contains("entries"), "{reason}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("opened a log that lacks records of a queue"),
    }
    // Allowed, the log is cut there and everything before it is served.
    open_cut_at_and_check(dir.path(), target.offset, 20);
}

#[test]
fn files_rolled_before_a_restart_are_kept_and_reused_too() {
    // Their fillers are found from the footers the rolls wrote.
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, mut n, spares) = store_with_spares_in(dir.path(), |_| {}, true);
    let start = store.max_offset();
    let appended = fill_to(&store, &mut n, start + 3 * SEG);
    assert!(store.reused_segments() > 0, "a segment was made of a spare");
    for seg in store.inner.clog.segments().iter().filter(|s| s.is_reused()) {
        assert!(spares.contains_key(&inode(seg.file.path())));
    }
    let first = n - appended.len() as u64;
    for (i, a) in appended.iter().enumerate() {
        assert_eq!(
            store.read_at(a.offset).expect("read").body,
            body(first + i as u64)
        );
    }
    store.shutdown().expect("shutdown");
    let store = open_bounded(config(dir.path()));
    assert_eq!(store.recovery_report().truncated_bytes_at, None);
    store.shutdown().expect("shutdown");
}

/// A cut that fails half-way (here: a segment it must remove cannot be)
/// leaves the store failed: nothing more is appended, so nothing can be
/// acknowledged as flushed in a segment the log no longer lists. The next
/// start recovers from the files.
#[test]
fn a_cut_that_fails_half_way_leaves_the_store_refusing_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let mut n = 0;
    let acked = fill_to(&store, &mut n, 2 * SEG + SEG / 2);
    // The last segment's name becomes a directory that is not empty, so
    // removing it fails (the file itself stays mapped under another name).
    let last = segment_path(dir.path(), SEG, store.max_offset());
    std::fs::rename(&last, dir.path().join("moved-segment")).expect("move segment");
    std::fs::create_dir_all(last.join("inside")).expect("directory in its place");
    let (cut_at, end) = (acked[3].offset, store.max_offset());
    assert!(store.truncate_to(cut_at).is_err(), "the cut fails");
    assert!(
        store.append(record(n)).is_err(),
        "an append after a failed cut is refused"
    );
    assert!(store.truncate_to(cut_at).is_err(), "and so is another cut");
    crash(store);
    std::fs::remove_dir_all(&last).expect("remove the directory");
    std::fs::rename(dir.path().join("moved-segment"), &last).expect("segment back");
    // It failed on the first file it had to remove: the log is whole.
    let store = open_bounded(config(dir.path()));
    assert_eq!(store.max_offset(), end);
    check_all(&store, n);
    store.shutdown().expect("shutdown");
}

/// A slave's restart of its log at a later base that fails once the old
/// segments are gone (here: the new segment's file cannot be created)
/// leaves the store failed, and the next start opens an empty log instead
/// of taking the missing segments for lost writes and refusing to start.
#[test]
fn a_restart_of_the_log_that_fails_half_way_opens_empty_afterwards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let mut n = 0;
    fill_to(&store, &mut n, 2 * SEG + SEG / 2);
    store.checkpoint_with(|| {}).expect("checkpoint");
    let base = 5 * SEG;
    let blocker = segment_path(dir.path(), SEG, base);
    std::fs::create_dir_all(&blocker).expect("directory where the new segment goes");
    assert!(store.restart_at(base).is_err(), "the restart fails");
    assert!(
        store.append(record(n)).is_err(),
        "an append after a failed restart is refused"
    );
    crash(store);
    std::fs::remove_dir_all(&blocker).expect("remove the directory");
    let store = open_bounded(config(dir.path()));
    assert_eq!(
        store.min_offset(),
        store.max_offset(),
        "an empty log after the failed restart"
    );
    let a = store.append(record(n)).expect("append");
    store.wait_flushed_blocking(a.end_offset).expect("flushed");
    store.shutdown().expect("shutdown");
}

/// A replicated record's topic becomes a directory under the consume
/// queues: one whose checksum holds but whose topic is no valid name
/// (`..` in it) is refused, and nothing is created outside the store.
#[test]
fn a_replicated_record_naming_no_valid_topic_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let slave = MessageStore::open(config(&data)).expect("open");
    let rec = NewRecord::new("../../escaped", 0, &b"body"[..]);
    let mut bytes = vec![0u8; rec.encoded_len()];
    record::encode_into(&mut bytes, &rec, 0, 0, 1);
    assert!(matches!(
        slave.append_raw(0, &bytes),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(slave.max_offset(), 0, "nothing appended");
    assert!(
        !dir.path().join("escaped").exists(),
        "no directory outside the store"
    );
    slave.shutdown().expect("shutdown");
}

/// A read's length may come from a damaged consume-queue entry: one longer
/// than a segment is refused with an error before any buffer is made for
/// it (it used to ask for a buffer of that size first; the largest panics).
#[test]
fn a_read_longer_than_a_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = MessageStore::open(config(dir.path())).expect("open");
    let a = fill(&store, 0, 3);
    for len in [SEG as usize + 1, usize::MAX] {
        assert!(matches!(
            store.inner.clog.read(a[0].offset, len),
            Err(StoreError::InvalidArgument(_))
        ));
    }
    let whole = (a[0].end_offset - a[0].offset) as usize;
    assert_eq!(
        store
            .inner
            .clog
            .read(a[0].offset, whole)
            .expect("read")
            .len(),
        whole
    );
    store.shutdown().expect("shutdown");
}

/// A slave writes its master's records as they are, but the master's
/// `FLUSHED_BEFORE` marks say what was durable on the master, not on the
/// slave: a SYNC_FLUSH slave sets them as its own flusher would. Here the
/// slave takes the master's two groups in one write, so one of its flushes
/// covers both; a power loss during it tears the first group, and the
/// record the master marked after it is no proof that the slave had made
/// the torn bytes durable: the slave cuts there (it used to refuse to
/// start). Everything before the tear reads back.
#[test]
fn a_slave_marks_records_durable_by_its_own_flushes_not_its_masters() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let (master, batch) = one_flushed_group(a_dir.path());
    // A group the master wrote after that flush returned: marked there.
    let later = fill(&master, 45, 1);
    let bytes = master
        .read_raw(0, later[0].end_offset as usize)
        .expect("the master's log");
    let later_at = |bytes: &[u8]| bytes[later[0].offset as usize..].to_vec();
    assert!(
        record::is_flushed_before(&later_at(&bytes)),
        "marked on the master"
    );
    master.shutdown().expect("shutdown");

    let slave = MessageStore::open(config(b_dir.path())).expect("open");
    assert_eq!(
        slave.append_raw(0, &bytes).expect("append raw"),
        later[0].end_offset
    );
    let copied = slave
        .read_raw(0, later[0].end_offset as usize)
        .expect("the slave's log");
    assert!(
        !record::is_flushed_before(&later_at(&copied)),
        "not marked on the slave, which had not flushed what came before"
    );
    crash(slave);
    lose_a_write_in(b_dir.path(), &batch);
    let slave = open_bounded(config(b_dir.path()));
    assert_eq!(
        slave.recovery_report().truncated_bytes_at,
        Some(batch[10].offset)
    );
    check_all(&slave, 15);
    slave.shutdown().expect("shutdown");
}
