//! Storage benchmark (not a test): measures, in one run and on one disk,
//! the raw ceiling of the device and the commit log under both flush modes.
//!
//! ```text
//! cargo bench -p keelmq-broker --bench storage
//! KEELMQ_BENCH_DIR=/mnt/fast KEELMQ_BENCH_SECONDS=5 cargo bench -p keelmq-broker --bench storage
//! ```
//!
//! Raw ceiling: sequential 1 MiB appends to a new file, each followed by
//! fdatasync (MB/s), the latency of fdatasync after a 1 KiB append, and 64 KiB
//! appends + fdatasync into reserved blocks and into written ones (the
//! latter is the most 64 closed-loop writers of 1 KiB records can reach, as
//! no flush can carry more and the log writes zeros ahead of small flushes).
//! Commit log, 1 KiB records: SYNC_FLUSH with 1, 16 and 64 concurrent
//! writers (each waits for its record to be durable before the next), with
//! how many appends shared each fdatasync; SYNC_FLUSH with 64 writers in
//! segments made of files retention took from the log, as in steady
//! operation (the reused/held segments are printed); then ASYNC_FLUSH with
//! one writer. Every figure is also given as a ratio to the raw ceiling.
//!
//! `ASYNC_FLUSH` writes into the page cache, so what bounds it is how fast
//! the machine gives the log new page-cache pages. A broker that has run for
//! a while has its memory full of the log's clean pages, and the kernel
//! reclaims those for new ones; a fresh machine hands out idle memory
//! instead, which on a VM that returns freed memory to its host (free page
//! reporting) costs a fault in the host at each first touch. The last run,
//! `ASYNC_FLUSH` sustained with the page cache full, first fills the page
//! cache by reading a sparse file as large as the memory available less
//! 512 MiB (at most 32 GiB; no disk I/O: holes read as zeros) and prints how
//! fast that went, which is the rate at which this machine gives out idle
//! memory.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keelmq_broker::store::{FlushMode, MessageStore, NewRecord, StoreConfig};

const RECORD_BODY: usize = 1024;

struct Latencies(Vec<u64>);

impl Latencies {
    fn pct(&mut self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() as f64 * p).ceil() as usize).clamp(1, self.0.len()) - 1;
        Duration::from_nanos(self.0[i])
    }
}

/// An empty file at `path` (replacing one left by an earlier run).
fn new_file(path: &Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(path)
}

struct Raw {
    mb_s: f64,
    /// 64 KiB writes + fdatasync into reserved blocks.
    group64_reserved_mb_s: f64,
    /// The same into written blocks: what 64 writers of 1 KiB records, each
    /// waiting for its own flush, can reach at best.
    group64_mb_s: f64,
    /// 32 KiB writes + fdatasync into written blocks from two threads at
    /// once, and their fdatasyncs per second: the most 64 such writers can
    /// reach split into two groups whose flushes overlap.
    group32x2_mb_s: f64,
    group32x2_syncs_s: f64,
    sync_p50: Duration,
    sync_p99: Duration,
    sync_p999: Duration,
}

fn raw_ceiling(dir: &Path, seconds: f64) -> std::io::Result<Raw> {
    // Plain sequential appends to a new file, as `dd oflag=dsync` does.
    let path = dir.join("raw-sequential");
    let f = new_file(&path)?;
    let len: u64 = 1 << 30;
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut pos = 0u64;
    while start.elapsed().as_secs_f64() < seconds && pos + (1 << 20) <= len {
        f.write_all_at(&buf, pos)?;
        f.sync_data()?;
        pos += 1 << 20;
    }
    let mb_s = pos as f64 / 1e6 / start.elapsed().as_secs_f64();
    // fdatasync latency after a small write, continuing sequentially.
    let small = vec![0xa5u8; RECORD_BODY];
    let mut lat = Latencies(Vec::new());
    let start = Instant::now();
    let mut pos = 0u64;
    let f2 = new_file(&dir.join("raw-sync"))?;
    while start.elapsed().as_secs_f64() < seconds.min(5.0) && lat.0.len() < 20_000 {
        f2.write_all_at(&small, pos)?;
        let t = Instant::now();
        f2.sync_data()?;
        lat.0.push(t.elapsed().as_nanos() as u64);
        pos += small.len() as u64;
    }
    drop(f);
    drop(f2);
    std::fs::remove_file(&path)?;
    std::fs::remove_file(dir.join("raw-sync"))?;
    let group = dir.join("raw-group");
    let secs = seconds.min(5.0);
    let (group64_reserved_mb_s, _) = group_ceiling(&group, secs, false, 1, 64 << 10)?;
    let (group64_mb_s, _) = group_ceiling(&group, secs, true, 1, 64 << 10)?;
    let (group32x2_mb_s, group32x2_syncs_s) = group_ceiling(&group, secs, true, 2, 32 << 10)?;
    Ok(Raw {
        mb_s,
        group64_reserved_mb_s,
        group64_mb_s,
        group32x2_mb_s,
        group32x2_syncs_s,
        sync_p50: lat.pct(0.50),
        sync_p99: lat.pct(0.99),
        sync_p999: lat.pct(0.999),
    })
}

/// 64 KiB appends, each followed by fdatasync, into a file whose blocks are
/// reserved up front as a segment's are, or (`written`) written with zeros
/// first. With 64 closed-loop writers of 1 KiB records no flush can carry
/// more than 64 KiB, so the written line is the best such a group can do on
/// the disk, however the log batches (the log writes zeros just ahead of
/// such flushes). Into reserved blocks each fdatasync must also record
/// that they now hold data.
/// `threads` write and flush their own `step`s at once; returns MB/s and
/// fdatasyncs per second.
fn group_ceiling(
    path: &Path,
    seconds: f64,
    written: bool,
    threads: usize,
    step: u64,
) -> std::io::Result<(f64, f64)> {
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::AtomicU64;
    let f = new_file(path)?;
    let len: u64 = 256 << 20;
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    if written {
        let zeros = vec![0u8; 1 << 20];
        for at in (0..len).step_by(zeros.len()) {
            f.write_all_at(&zeros, at)?;
        }
        f.sync_data()?;
    }
    let (next, syncs) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> std::io::Result<()> {
                    let buf = vec![0x3cu8; step as usize];
                    while start.elapsed().as_secs_f64() < seconds {
                        let pos = next.fetch_add(step, Ordering::Relaxed);
                        if pos + step > len {
                            break;
                        }
                        f.write_all_at(&buf, pos)?;
                        f.sync_data()?;
                        syncs.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
        })
    })?;
    let secs = start.elapsed().as_secs_f64();
    let done = syncs.load(Ordering::Relaxed);
    drop(f);
    std::fs::remove_file(path)?;
    Ok(((done * step) as f64 / 1e6 / secs, done as f64 / secs))
}

struct Run {
    name: String,
    records: u64,
    elapsed: Duration,
    lat: Latencies,
    /// SYNC_FLUSH: appends that shared each fdatasync, on average.
    per_flush: Option<f64>,
    /// SYNC_FLUSH: the share of the run the log spent in fdatasync, and
    /// the mean fdatasync; the rest of the time the disk waited for the
    /// writers.
    flushing: Option<(f64, Duration)>,
}

fn store_config(dir: &Path, mode: FlushMode) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.flush_mode = mode;
    c.zero_ahead = zero_ahead();
    c
}

/// `KEELMQ_BENCH_ZERO_AHEAD=false` runs SYNC_FLUSH without zeros ahead
/// (default: on, as the broker's default).
fn zero_ahead() -> bool {
    std::env::var("KEELMQ_BENCH_ZERO_AHEAD").map_or(true, |v| v != "false" && v != "0")
}

fn record(i: u64, body: &bytes::Bytes) -> NewRecord {
    NewRecord {
        topic: "bench".into(),
        queue_id: (i % 8) as u32,
        born_ms: 0,
        flags: 0,
        properties: Default::default(),
        body: body.clone(),
    }
}

fn async_one_writer(
    dir: &Path,
    seconds: f64,
    max_records: u64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let store = MessageStore::open(store_config(dir, FlushMode::AsyncFlush))?;
    let body = bytes::Bytes::from(vec![7u8; RECORD_BODY]);
    let mut lat = Latencies(Vec::with_capacity(max_records as usize));
    let start = Instant::now();
    let (mut i, mut t) = (0u64, start);
    // One clock read per record: one append's end is the next one's start.
    while i < max_records && (!i.is_multiple_of(1024) || (t - start).as_secs_f64() < seconds) {
        store.append(record(i, &body))?;
        let now = Instant::now();
        lat.0.push((now - t).as_nanos() as u64);
        t = now;
        i += 1;
    }
    let elapsed = start.elapsed();
    store.shutdown()?;
    Ok(Run {
        name: "commit log ASYNC_FLUSH, 1 writer".into(),
        records: i,
        elapsed,
        lat,
        per_flush: None,
        flushing: None,
    })
}

/// Fills the page cache with clean pages, as a long-running broker's is
/// (see the module doc), by reading a sparse file in `dir` of the memory
/// available less 512 MiB (at most 32 GiB; within a cgroup v2 memory limit,
/// what the limit leaves); returns the file, to delete after the run, with
/// its size and how long the read took. `Err` says why it did not: too
/// little memory, no `/proc/meminfo`, or a filesystem that keeps no holes
/// or caches none (tmpfs serves holes without caching them).
fn fill_page_cache(dir: &Path) -> Result<(PathBuf, u64, Duration), String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let kib = |field: &str| -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let v = meminfo.lines().find_map(|l| l.strip_prefix(field))?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    };
    let available = kib("MemAvailable:").ok_or("no MemAvailable in /proc/meminfo")? * 1024;
    let len = (available.min(cgroup_memory_left().unwrap_or(u64::MAX)))
        .saturating_sub(512 << 20)
        .min(32 << 30)
        & !((1 << 20) - 1);
    if len < 1 << 30 {
        return Err(format!("too little memory available ({available} bytes)"));
    }
    let path = dir.join("page-cache-fill");
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = new_file(&path).map_err(io)?;
    f.set_len(len).map_err(io)?;
    if f.metadata().map_err(io)?.blocks() != 0 {
        let _ = std::fs::remove_file(&path);
        return Err("the filesystem keeps no holes (reading would write the disk)".into());
    }
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut read = 0u64;
    while read < len {
        match f.read(&mut buf).map_err(io)? {
            0 => break,
            n => read += n as u64,
        }
    }
    let took = start.elapsed();
    // Whether the read cached the file, asked of the file itself: how much
    // the page cache grew says nothing when the read had to evict as much
    // (a cache already full of earlier runs' files).
    let cached = resident_bytes(&f, read).map_err(io)?;
    if cached < read / 2 {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "reading {read} bytes of holes left only {cached} of them in the page cache (tmpfs?)"
        ));
    }
    Ok((path, read, took))
}

/// How many of the first `len` bytes of `f` are in the page cache
/// (mincore(2) over a mapping of them; nothing is read through it).
fn resident_bytes(f: &std::fs::File, len: u64) -> std::io::Result<u64> {
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a read-only mapping of a file this process created and holds
    // open; it is only asked which of its pages are resident.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(usize::try_from(len).map_err(std::io::Error::other)?)
            .map(f)?
    };
    // SAFETY: sysconf takes no pointers.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096);
    let mut pages = vec![0u8; len.div_ceil(page) as usize];
    // SAFETY: the range is the mapping above, and `pages` has one byte for
    // each of its pages, as mincore(2) requires.
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            pages.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(pages.iter().filter(|&&p| p & 1 != 0).count() as u64 * page)
}

/// What the cgroup v2 memory limit of this process leaves (`memory.max`
/// less `memory.current`), when there is one.
fn cgroup_memory_left() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let base = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(base.join(name)).ok();
    let max: u64 = read("memory.max")?.trim().parse().ok()?;
    let current: u64 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Writes back whatever earlier runs left dirty (and lets the deletions of
/// their files complete), so that a run does not share the disk with the
/// one before it. Runs that wait on the disk come first, right after the
/// raw ceiling they are compared to; the `ASYNC_FLUSH` runs come last:
/// each writes gigabytes (flushed by its store's shutdown, outside the
/// measured time) that are then deleted, and churns the page cache.
fn quiet_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn sync_writers(
    dir: &Path,
    writers: usize,
    seconds: f64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let store = MessageStore::open(store_config(dir, FlushMode::SyncFlush))?;
    let mut run = measure_sync(&store, writers, seconds)?;
    store.shutdown()?;
    run.name = format!("SYNC_FLUSH, {writers} writers");
    Ok(run)
}

/// SYNC_FLUSH as in steady operation, where retention deletes segments as
/// the log grows: the log first passes three segments of records four
/// days old (written in batches, not measured), with retention run at each
/// roll, so the segments the writers then fill are made of the files
/// retention took (see `StoreConfig::reuse_segments`).
fn sync_writers_reused(
    dir: &Path,
    writers: usize,
    seconds: f64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let store = MessageStore::open(store_config(dir, FlushMode::SyncFlush))?;
    let segment = 1u64 << 30;
    let old = keelmq_broker::store::now_ms() - 4 * 24 * 3600 * 1000;
    let body = bytes::Bytes::from(vec![7u8; RECORD_BODY]);
    let mut i = 0u64;
    while store.max_offset() < 3 * segment + (1 << 20) {
        let before = store.max_offset() / segment;
        let batch = (i..i + 256).map(|k| record(k, &body)).collect();
        let appended = store.append_batch_at(batch, old)?;
        if let Some(last) = appended.last() {
            store.wait_flushed_blocking(last.end_offset)?;
        }
        i += 256;
        if store.max_offset() / segment != before {
            store.enforce_retention(keelmq_broker::store::now_ms())?;
        }
    }
    store.enforce_retention(keelmq_broker::store::now_ms())?;
    let mut run = measure_sync(&store, writers, seconds)?;
    run.name = format!(
        "SYNC_FLUSH, {writers} writers, reused ({}/{})",
        store.reused_segments(),
        store.segments_held()
    );
    store.shutdown()?;
    // After a crash recovery would read what follows the end in a reused
    // segment (the older records it still holds) to make sure no record of
    // the log is there; after this clean shutdown it searches only a window
    // past the end (see the store's `recovery` module).
    let started = Instant::now();
    let store = MessageStore::open(store_config(dir, FlushMode::SyncFlush))?;
    println!(
        "  reopening the reused run's store after its clean shutdown took {:.2?}",
        started.elapsed()
    );
    store.shutdown()?;
    // The same store as after a crash once everything was flushed: the
    // checkpoint says "not clean", the files are whole and in the page
    // cache (as after the process was killed; after a power loss they
    // would be read from the disk).
    mark_unclean(dir)?;
    let started = Instant::now();
    let store = MessageStore::open(store_config(dir, FlushMode::SyncFlush))?;
    let report = store.recovery_report();
    println!(
        "  reopening it as after a crash took {:.2?} (recovery {:.2?}: {} records checked, {:.0} MiB searched past the end)",
        started.elapsed(),
        report.elapsed,
        report.records_scanned,
        report.searched_bytes as f64 / f64::from(1 << 20)
    );
    store.shutdown()?;
    Ok(run)
}

/// Rewrites the store's checkpoint in `dir` to say the broker did not stop
/// cleanly, leaving the rest of it as it is.
fn mark_unclean(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let path = dir.join("checkpoint.json");
    let mut cp: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let clean = cp
        .get_mut("clean")
        .ok_or("the checkpoint has no \"clean\" field")?;
    *clean = serde_json::Value::Bool(false);
    std::fs::write(&path, serde_json::to_vec(&cp)?)?;
    Ok(())
}

/// `writers` tasks appending 1 KiB records to `store` for `seconds`, each
/// waiting for its record to be durable before the next.
fn measure_sync(
    store: &MessageStore,
    writers: usize,
    seconds: f64,
) -> Result<Run, Box<dyn std::error::Error>> {
    let flushed_before = store.flush_counts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let body = bytes::Bytes::from(vec![7u8; RECORD_BODY]);
    // The writers check a flag rather than the clock, and read the clock
    // once per record (one record's end is the next one's start): the
    // harness's own clock reads are not what is measured.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let lats = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let (store, body, stop) = (store.clone(), body.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut i = w as u64;
                let mut t = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let a = store.append(record(i, &body)).map_err(|e| e.to_string())?;
                    store
                        .wait_flushed(a.end_offset)
                        .await
                        .map_err(|e| e.to_string())?;
                    let now = Instant::now();
                    lat.push((now - t).as_nanos() as u64);
                    t = now;
                    i += writers as u64;
                }
                Ok::<_, String>(lat)
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| e.to_string())??);
        }
        Ok::<_, String>(all)
    })?;
    let elapsed = start.elapsed();
    let flushed = store.flush_counts();
    let (appends, flushes, flush_time) = (
        flushed.group_appends - flushed_before.group_appends,
        flushed.flushes - flushed_before.flushes,
        flushed.flush_time.saturating_sub(flushed_before.flush_time),
    );
    Ok(Run {
        name: String::new(),
        records: lats.len() as u64,
        elapsed,
        lat: Latencies(lats),
        per_flush: Some(appends as f64 / flushes.max(1) as f64),
        flushing: Some((
            flush_time.as_secs_f64() / elapsed.as_secs_f64(),
            flush_time / u32::try_from(flushes.max(1)).unwrap_or(u32::MAX),
        )),
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base: PathBuf = std::env::var_os("KEELMQ_BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    std::fs::create_dir_all(&base)?;
    let seconds: f64 = std::env::var("KEELMQ_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let tmp = tempfile::tempdir_in(&base)?;
    let dir = tmp.path();
    println!("storage benchmark");
    println!(
        "  directory {} (filesystem {:.0} % used), {seconds} s per run, 1 KiB record bodies, 1 GiB segments, SYNC_FLUSH zeros ahead {}",
        dir.display(),
        keelmq_broker::store::fs_used_ratio(dir).unwrap_or(0.0) * 100.0,
        if zero_ahead() { "on" } else { "off" }
    );
    println!(
        "  machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // KEELMQ_BENCH_ONLY=raw,sync1,sync16,sync64,sync64r,async1,async1full picks runs
    // (default: all, in that order).
    let only = std::env::var("KEELMQ_BENCH_ONLY").unwrap_or_default();
    let want = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    let raw = if want("raw") {
        raw_ceiling(dir, seconds)?
    } else {
        Raw {
            mb_s: f64::NAN,
            group64_reserved_mb_s: f64::NAN,
            group64_mb_s: f64::NAN,
            group32x2_mb_s: f64::NAN,
            group32x2_syncs_s: f64::NAN,
            sync_p50: Duration::ZERO,
            sync_p99: Duration::ZERO,
            sync_p999: Duration::ZERO,
        }
    };
    println!();
    println!("raw ceiling");
    println!(
        "  sequential 1 MiB writes + fdatasync: {:>10.1} MB/s",
        raw.mb_s
    );
    println!(
        "  fdatasync after a 1 KiB write:        p50 {:?}  p99 {:?}  p999 {:?}",
        raw.sync_p50, raw.sync_p99, raw.sync_p999
    );
    println!(
        "  64 KiB writes + fdatasync, reserved:  {:>10.1} MB/s ({:.2} x raw)",
        raw.group64_reserved_mb_s,
        raw.group64_reserved_mb_s / raw.mb_s
    );
    println!(
        "  64 KiB writes + fdatasync, written:   {:>10.1} MB/s ({:.2} x raw: the most 64 writers of 1 KiB records can reach)",
        raw.group64_mb_s,
        raw.group64_mb_s / raw.mb_s
    );
    println!(
        "  32 KiB, 2 threads at once, written:   {:>10.1} MB/s ({:.2} x raw, {:.0} fdatasyncs/s: 64 writers in two groups whose flushes overlap)",
        raw.group32x2_mb_s,
        raw.group32x2_mb_s / raw.mb_s,
        raw.group32x2_syncs_s
    );
    let mut runs = Vec::new();
    quiet_disk();
    for w in [1usize, 16, 64] {
        if !want(&format!("sync{w}")) {
            continue;
        }
        let d = dir.join(format!("sync{w}"));
        runs.push(sync_writers(&d, w, seconds)?);
        std::fs::remove_dir_all(&d)?;
        quiet_disk();
    }
    if want("sync64r") {
        let d = dir.join("sync64r");
        runs.push(sync_writers_reused(&d, 64, seconds)?);
        std::fs::remove_dir_all(&d)?;
        quiet_disk();
    }
    if want("async1") {
        // Within one prepared segment (what the preparer thread provides
        // when it keeps ahead), and sustained across segments.
        let mut r = async_one_writer(&dir.join("async1"), seconds, 900_000)?;
        r.name = "ASYNC_FLUSH, 1 writer, 1 segment".into();
        runs.push(r);
        std::fs::remove_dir_all(dir.join("async1"))?;
        quiet_disk();
        let mut r = async_one_writer(&dir.join("async1"), seconds, 20_000_000)?;
        r.name = "ASYNC_FLUSH, 1 writer, sustained".into();
        runs.push(r);
        std::fs::remove_dir_all(dir.join("async1"))?;
    }
    if want("async1full") {
        println!();
        // The last run: a failure is reported, and the figures above are
        // still printed.
        let run = || -> Result<Run, Box<dyn std::error::Error>> {
            let (fill, len, took) = fill_page_cache(dir)?;
            println!(
                "page cache filled: {:.1} GiB read from a sparse file in {took:.1?} ({:.0} MB/s: the rate this machine gives out memory, idle or reclaimed)",
                len as f64 / (1u64 << 30) as f64,
                len as f64 / 1e6 / took.as_secs_f64()
            );
            let mut r = async_one_writer(&dir.join("async1"), seconds, 20_000_000)?;
            r.name = "ASYNC_FLUSH, 1 writer, sustained, full cache".into();
            std::fs::remove_dir_all(dir.join("async1"))?;
            std::fs::remove_file(fill)?;
            Ok(r)
        };
        match run() {
            Ok(r) => runs.push(r),
            Err(e) => println!("ASYNC_FLUSH with the page cache full: no figure ({e})"),
        }
    }
    println!();
    println!(
        "{:<44} {:>12} {:>9} {:>8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10}",
        "configuration",
        "records/s",
        "MB/s",
        "x raw",
        "p50",
        "p99",
        "p999",
        "max",
        "p99/raw",
        "per flush",
        "flushing",
        "mean flush"
    );
    for mut r in runs {
        let rate = r.records as f64 / r.elapsed.as_secs_f64();
        let mb = rate * RECORD_BODY as f64 / 1e6;
        let (p50, p99, p999) = (r.lat.pct(0.5), r.lat.pct(0.99), r.lat.pct(0.999));
        let max = r.lat.pct(1.0);
        println!(
            "{:<44} {:>12.0} {:>9.1} {:>8.2} {:>10.1?} {:>10.1?} {:>10.1?} {:>10.1?} {:>9.2} {:>9} {:>9} {:>10}",
            r.name,
            rate,
            mb,
            mb / raw.mb_s,
            p50,
            p99,
            p999,
            max,
            p99.as_secs_f64() / raw.sync_p99.as_secs_f64(),
            r.per_flush
                .map_or_else(|| "-".to_owned(), |g| format!("{g:.1}")),
            r.flushing.map_or_else(
                || "-".to_owned(),
                |(share, _)| format!("{:.0} %", share * 100.0)
            ),
            r.flushing
                .map_or_else(|| "-".to_owned(), |(_, mean)| format!("{mean:.1?}"))
        );
    }
    Ok(())
}
