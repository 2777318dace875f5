//! Start-up recovery: find the true end of the commit log and bring the
//! consume queues in line with it.
//!
//! After a clean shutdown only the tail segment is verified, and zeros
//! exactly where the checkpoint says the log ends are its end: only a
//! window past them is searched for records (a start writes an unclean
//! checkpoint before it appends anything, so nothing there can be the
//! log's unless the disk lost writes). After a crash
//! the scan starts at the segment holding the older of the last
//! checkpoint's flushed offset and consume-queue offset, checks every
//! record's checksum and re-indexes it (consume-queue entries sit at fixed
//! positions, so writing one again is harmless). What the scan stops on
//! decides what happens next:
//!
//! - zeros at or past the last checkpointed flush, with no valid record
//!   anywhere after (after a clean shutdown, zeros exactly at it with none
//!   in a window after them): the end of the log;
//! - a bad record past the last checkpointed flush with nothing valid
//!   after it: a torn tail, cut off with a warning;
//! - zeros or a bad record before the checkpointed flush, or under
//!   SYNC_FLUSH with a record after them that the flusher wrote once
//!   everything before it was durable (a write lost in the middle of the
//!   log, such as a disk returning zeros for a block): corruption. The
//!   broker refuses to start and names the offset; the operator may allow
//!   truncation at exactly that offset;
//! - zeros or a bad record past the checkpointed flush with valid records
//!   after them, none of them so marked under SYNC_FLUSH: what a power loss
//!   leaves of writes not yet flushed, or of the flush it interrupted (the
//!   disk may keep any part of them; none of it was acknowledged). Cut off
//!   there with a warning.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::commit_log::CommitLog;
use super::consume_queue::{ConsumeQueue, CqEntry};
use super::mapped::MappedFile;
use super::record::{self, Probe, RECORD_MAGIC};
use super::{Checkpoint, FlushMode, RecoveryReport, StoreConfig, StoreError, queue_dir};

pub(super) type Queues = HashMap<String, Vec<Option<Arc<ConsumeQueue>>>>;

pub(super) struct Recovered {
    pub queues: Queues,
    pub report: RecoveryReport,
}

enum Stop {
    /// Clean end of the data: zeros, or a segment filler with no segment
    /// after it (`true`).
    End(u64, bool),
    /// Something unreadable at this offset.
    Bad(u64, String),
    /// A record whose consume queue is missing earlier entries: rebuild,
    /// or, when the queues are being rebuilt already, damage (the log
    /// itself lacks records of that queue before this one).
    Gap(u64, String),
}

pub(super) fn recover(
    config: &StoreConfig,
    clog: &CommitLog,
    cq_dir: &Path,
    checkpoint: Option<&Checkpoint>,
) -> Result<Recovered, StoreError> {
    let started = Instant::now();
    SEARCHED.set(0);
    let clean = checkpoint.is_some_and(|c| c.clean);
    let mut rebuild = checkpoint.is_none() || !cq_dir.exists();
    let min = clog.min_offset();
    let flushed_mark = checkpoint.map_or(0, |c| c.flushed_offset);
    loop {
        let mut queues = if rebuild {
            if cq_dir.exists() {
                std::fs::remove_dir_all(cq_dir)
                    .map_err(StoreError::io("removing stale consume queues"))?;
            }
            Queues::new()
        } else {
            let Some(queues) = load_queues(cq_dir, config.cq_entries_per_file)? else {
                rebuild = true;
                continue;
            };
            // Entries the checkpoint does not cover may still be only in the
            // page cache (a killed process wrote them): they are flushed below.
            let durable = checkpoint.map_or(0, |c| c.cq_offset.min(c.flushed_offset));
            for q in queues.values().flatten().flatten() {
                q.assume_flushed_below(durable);
            }
            queues
        };
        std::fs::create_dir_all(cq_dir)
            .map_err(StoreError::io("creating the consume queue directory"))?;
        let from = if rebuild {
            min
        } else {
            let cp = checkpoint.map_or(0, |c| c.flushed_offset.min(c.cq_offset));
            let seg = clog.segment_size();
            (cp - cp % seg).max(min)
        };
        let mut scanned = 0u64;
        let stop = scan(
            clog,
            cq_dir,
            config.cq_entries_per_file,
            &mut queues,
            from,
            rebuild,
            &mut scanned,
        )?;
        let (end, truncated_at, zero_rest) = match stop {
            Stop::Gap(..) if !rebuild => {
                tracing::warn!("consume queues are behind the commit log; rebuilding them all");
                rebuild = true;
                continue;
            }
            Stop::End(end, at_filler) => {
                let cut = if clean
                    && end == flushed_mark
                    && !any_record_within(clog, end, CLEAN_END_WINDOW)
                {
                    // The last run stopped cleanly with everything below
                    // `end` flushed, and a start writes an unclean
                    // checkpoint before it appends anything (nothing writes
                    // the log once shutdown has begun): nothing past `end`
                    // can be this log's, so the search of `settle` is not
                    // needed (in a reused segment it would read the rest of
                    // the file, the older records it holds). Only a window
                    // past `end` is searched, for a disk that lost both the
                    // next start's unclean checkpoint and the first block
                    // of its appends: that run's records start at `end`,
                    // so some of them lie in the window, and `settle` then
                    // decides as after a crash.
                    false
                } else {
                    settle(
                        config,
                        clog,
                        end,
                        "zeros where a record was expected",
                        true,
                        flushed_mark,
                    )?
                };
                (end, cut.then_some(end), cut || at_filler)
            }
            Stop::Bad(at, reason) | Stop::Gap(at, reason) => {
                settle(config, clog, at, &reason, false, flushed_mark)?;
                (at, Some(at), true)
            }
        };
        // Cut everything after the end: the rest of its segment and any
        // later segments. Zeros go over the rest of the segment only where
        // something was cut, or over a filler the log now writes past:
        // otherwise nothing there is a record of this log (`settle` found
        // none, or after a clean shutdown none can be there), nor can
        // become one, and a file whose blocks are written
        // (zeros ahead, or a reused segment) keeps them written.
        clog.truncate(end, zero_rest)?;
        for qs in queues.values() {
            for q in qs.iter().flatten() {
                q.truncate_to_log_end(end)
                    .map_err(StoreError::io("truncating a consume queue"))?;
            }
        }
        clog.set_end(end);
        // What was read back may still sit only in the page cache (after a
        // process crash); make it durable before anything relies on it.
        clog.flush(from, end)
            .map_err(StoreError::io("flushing the recovered commit log"))?;
        for qs in queues.values() {
            for q in qs.iter().flatten() {
                q.flush()
                    .map_err(StoreError::io("flushing a consume queue"))?;
            }
        }
        return Ok(Recovered {
            queues,
            report: RecoveryReport {
                clean_shutdown: clean,
                scanned_from: from,
                end,
                records_scanned: scanned,
                truncated_bytes_at: truncated_at,
                rebuilt_consume_queues: rebuild,
                searched_bytes: SEARCHED.get(),
                elapsed: started.elapsed(),
            },
        });
    }
}

/// Decides what damage at `at` (zeros where a record should start, or a
/// bad record) means: corruption, on which the broker refuses to start
/// unless the operator allowed a cut there, or the end of what reached the
/// disk. Returns whether bytes at and after `at` are to be cut.
fn settle(
    config: &StoreConfig,
    clog: &CommitLog,
    at: u64,
    reason: &str,
    zeros: bool,
    flushed_mark: u64,
) -> Result<bool, StoreError> {
    let sync = config.flush_mode == FlushMode::SyncFlush;
    // One scan from the damage finds both the first valid record after it
    // (`later`) and, under SYNC_FLUSH, the first one marked
    // `record::FLUSHED_BEFORE` (`durable_after`, never before `later`).
    let (mut later, mut durable_after) = (None, None);
    visit_valid_records_after(clog, at, u64::MAX, |offset, rec| {
        later.get_or_insert(offset);
        if !sync {
            return ControlFlow::Break(());
        }
        if record::is_flushed_before(rec) {
            durable_after = Some(offset);
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    });
    // Flushes cover the log in order, one at a time: if a record after the
    // damage was acknowledged, a flush that completed covered the damaged
    // bytes too, and they were lost after being made durable (corruption).
    // Otherwise the damage and everything after it belong to the flush a
    // power loss interrupted (the disk may keep any part of it) or to
    // writes never flushed: nothing there was acknowledged. Under
    // SYNC_FLUSH, a record the flusher marked as written after everything
    // before it was durable (`record::FLUSHED_BEFORE`) tells the first case;
    // under ASYNC_FLUSH nothing past the last flush was promised.
    if at < flushed_mark || durable_after.is_some() {
        let why = match durable_after {
            Some(d) => format!(
                "a valid record follows at offset {d}, written once everything before it had \
                 been flushed"
            ),
            None => format!(
                "the last checkpoint recorded everything below offset {flushed_mark} as flushed"
            ),
        };
        refuse_or_cut(config, at, reason, why)?;
        return Ok(true);
    }
    match later {
        Some(later) if sync => tracing::warn!(
            offset = at,
            reason,
            next_valid_record = later,
            "SYNC_FLUSH: cutting the commit log where the flush interrupted by the crash did not complete; nothing from there on was acknowledged"
        ),
        Some(later) => tracing::warn!(
            offset = at,
            reason,
            next_valid_record = later,
            "ASYNC_FLUSH: cutting the commit log where a write never reached the disk; what follows was not flushed either"
        ),
        None if zeros => return Ok(false),
        None => tracing::warn!(
            offset = at,
            reason,
            "cutting a torn tail off the commit log (a write that never completed)"
        ),
    }
    Ok(true)
}

fn refuse_or_cut(
    config: &StoreConfig,
    at: u64,
    reason: &str,
    why: String,
) -> Result<(), StoreError> {
    if config.allow_truncate_at == Some(at) {
        tracing::warn!(offset = at, reason, why = %why, "corrupt commit log: truncating at the offset the operator allowed");
        return Ok(());
    }
    Err(StoreError::RefuseToStart {
        offset: at,
        reason: reason.to_owned(),
        why,
    })
}

fn scan(
    clog: &CommitLog,
    cq_dir: &Path,
    per_file: u64,
    queues: &mut Queues,
    from: u64,
    rebuild: bool,
    scanned: &mut u64,
) -> Result<Stop, StoreError> {
    let mut pos = from;
    loop {
        let Some(seg) = clog.segment_for(pos) else {
            return Ok(Stop::End(pos, false));
        };
        let rest = (seg.end() - pos) as usize;
        // SAFETY: recovery runs before the store is shared: nothing writes.
        let bytes = unsafe { seg.file.slice(pos - seg.base, rest) };
        match record::probe(bytes, pos) {
            Probe::Empty => return Ok(Stop::End(pos, false)),
            Probe::Bad(reason) => return Ok(Stop::Bad(pos, reason)),
            Probe::Blank => {
                // A blank closes a segment; the log continues in the next one
                // (or ends here if there is none yet).
                if clog.segment_for(seg.end()).is_none() {
                    return Ok(Stop::End(pos, true));
                }
                seg.set_filler_at(pos);
                pos = seg.end();
            }
            Probe::Record {
                len,
                queue_offset,
                queue_id,
            } => {
                let rec = &bytes[..len];
                let (topic, tag_hash) =
                    record::topic_and_tag_hash(rec).map_err(|reason| StoreError::Corrupt {
                        offset: pos,
                        reason,
                    })?;
                let q = queue(queues, cq_dir, per_file, topic, queue_id)?;
                if rebuild && queue_offset > 0 && q.is_new() {
                    // The queue's earlier entries pointed into segments
                    // retention has deleted.
                    q.start_at(queue_offset)
                        .map_err(StoreError::io("starting a rebuilt consume queue"))?;
                }
                if queue_offset > q.max_index() {
                    return Ok(Stop::Gap(
                        pos,
                        format!(
                            "record is entry {queue_offset} of {topic}/{queue_id}, but the log \
                             before it holds only {} of that queue's entries",
                            q.max_index()
                        ),
                    ));
                }
                let slot = q
                    .ensure(queue_offset)
                    .map_err(StoreError::io("creating a consume queue file"))?;
                slot.put(CqEntry {
                    offset: pos,
                    size: len as u32,
                    tag_hash,
                });
                q.publish(queue_offset + 1);
                *scanned += 1;
                pos += len as u64;
            }
        }
    }
}

fn queue(
    queues: &mut Queues,
    cq_dir: &Path,
    per_file: u64,
    topic: &str,
    queue_id: u32,
) -> Result<Arc<ConsumeQueue>, StoreError> {
    let slots = queues.entry(topic.to_owned()).or_default();
    let i = queue_id as usize;
    if slots.len() <= i {
        slots.resize(i + 1, None);
    }
    if let Some(q) = &slots[i] {
        return Ok(q.clone());
    }
    let dir = queue_dir(cq_dir, topic, queue_id);
    let q = Arc::new(
        ConsumeQueue::open(&dir, per_file)
            .map_err(StoreError::io(format!("opening {}", dir.display())))?,
    );
    slots[i] = Some(q.clone());
    Ok(q)
}

/// The consume queues on disk, or `None` if one has files of another size
/// (`cq_entries_per_file` changed, or a damaged file): they are derived
/// data, rebuilt from the log.
fn load_queues(cq_dir: &Path, per_file: u64) -> Result<Option<Queues>, StoreError> {
    let mut queues = Queues::new();
    let Ok(topics) = std::fs::read_dir(cq_dir) else {
        return Ok(Some(queues));
    };
    for t in topics {
        let t = t.map_err(StoreError::io("listing consume queues"))?;
        let Some(topic) = t.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Ok(ids) = std::fs::read_dir(t.path()) else {
            continue;
        };
        for id in ids {
            let id = id.map_err(StoreError::io("listing consume queues"))?;
            let Some(qid) = id.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            match queue(&mut queues, cq_dir, per_file, &topic, qid) {
                Ok(_) => {}
                Err(StoreError::Io { context, source })
                    if source.kind() == std::io::ErrorKind::InvalidData =>
                {
                    tracing::warn!(
                        error = %source,
                        queue = context,
                        "a consume queue does not match this configuration; rebuilding them all"
                    );
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Some(queues))
}

/// Hands `visit` each offset after `at` and before `before` where a
/// complete, valid record starts, with the record, in order, until it
/// breaks; read through the files (not the mappings), in this segment and
/// every later one. Runs at every start, so it skips what the filesystem
/// knows holds no data (the reserved, never written rest of a segment) and
/// all-zero chunks without looking closer.
fn visit_valid_records_after(
    clog: &CommitLog,
    at: u64,
    before: u64,
    mut visit: impl FnMut(u64, &[u8]) -> ControlFlow<()>,
) {
    for seg in clog.segments() {
        if seg.end() <= at || seg.base >= before {
            continue;
        }
        let from = if seg.base > at { 0 } else { at - seg.base + 1 };
        let to = before - seg.base;
        if visit_valid_records_in(&seg.file, seg.base, from, to, &mut visit).is_break() {
            return;
        }
    }
}

/// Whether a valid record of the log starts within `window` bytes after
/// `at` (see [`visit_valid_records_after`]).
fn any_record_within(clog: &CommitLog, at: u64, window: u64) -> bool {
    let mut found = false;
    visit_valid_records_after(clog, at, at.saturating_add(window), |_, _| {
        found = true;
        ControlFlow::Break(())
    });
    found
}

thread_local! {
    /// Bytes [`visit_valid_records_in`] read on this thread since
    /// [`recover`] began (reported as `RecoveryReport::searched_bytes`).
    static SEARCHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// After a clean shutdown, how far past the checkpointed end recovery still
/// looks for records of the log (see [`recover`]).
pub(super) const CLEAN_END_WINDOW: u64 = 1 << 20;

/// How much [`visit_valid_records_in`] reads at a time.
const SEARCH_CHUNK: usize = 1 << 20;

/// [`visit_valid_records_after`] for one segment file starting at
/// commit-log offset `base`, for records starting at positions in
/// `[from, to)` of the file. A record
/// only counts where it carries its own offset: the records a reused file
/// holds from its earlier life (see `CommitLog::delete_oldest_while`) are
/// passed over without being read again.
pub(super) fn visit_valid_records_in(
    file: &MappedFile,
    base: u64,
    from: u64,
    to: u64,
    mut visit: impl FnMut(u64, &[u8]) -> ControlFlow<()>,
) -> ControlFlow<()> {
    const OFFSET_FIELD: usize = 28;
    let len = file.len();
    let max_rec = len as usize;
    let mut buf = vec![0u8; SEARCH_CHUNK + 64];
    let magic_bytes = RECORD_MAGIC.to_le_bytes();
    let magic = memchr::memmem::Finder::new(&magic_bytes);
    for (start, end) in file.data_ranges(from) {
        let (mut pos, end) = (start, end.min(to));
        while pos < end && pos + 8 <= len {
            // Past `end` only the overlap a candidate just before it needs
            // for its offset field.
            let n = ((len - pos).min(end - pos + 64) as usize).min(SEARCH_CHUNK + 64);
            if file.pread(&mut buf[..n], pos).is_err() {
                break;
            }
            SEARCHED.set(SEARCHED.get() + n as u64);
            let chunk = &buf[..n];
            if chunk.iter().all(|&b| b == 0) {
                pos += SEARCH_CHUNK as u64;
                continue;
            }
            // Candidates start at every `i` below `limit` where the magic
            // follows the length field (it cannot overlap itself, so
            // `find_iter` misses none).
            let limit = n.saturating_sub(8).min(SEARCH_CHUNK);
            for i in magic.find_iter(chunk.get(4..limit + 7).unwrap_or_default()) {
                let cand = pos + i as u64;
                if cand >= end {
                    break;
                }
                let rlen = record::le_u32(chunk, i) as usize;
                if rlen < record::FIXED_HEADER_LEN || rlen > max_rec || cand + rlen as u64 > len {
                    continue;
                }
                if i + OFFSET_FIELD + 8 <= n
                    && record::le_u64(chunk, i + OFFSET_FIELD) != base + cand
                {
                    continue;
                }
                let mut rec = vec![0u8; rlen];
                if file.pread(&mut rec, cand).is_ok()
                    && matches!(record::probe(&rec, base + cand), Probe::Record { .. })
                    && visit(base + cand, &rec).is_break()
                {
                    return ControlFlow::Break(());
                }
            }
            pos += SEARCH_CHUNK as u64;
        }
    }
    ControlFlow::Continue(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewRecord;

    /// A record of the log at `at` in a segment based at `base` (it
    /// carries `base + at` as its offset).
    fn encoded(seq: u64, base: u64, at: u64) -> Vec<u8> {
        let rec = NewRecord::new("orders", 0, format!("record {seq}").into_bytes());
        let mut buf = vec![0u8; rec.encoded_len()];
        record::encode_into(&mut buf, &rec, base + at, seq, 1);
        buf
    }

    fn visited(file: &MappedFile, base: u64, from: u64, to: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        let _ = visit_valid_records_in(file, base, from, to, |offset, _| {
            seen.push(offset - base);
            ControlFlow::Continue(())
        });
        seen
    }

    /// The search finds every record of the log wherever it starts: at the
    /// edges of the chunks it reads (its magic in the next chunk, or split
    /// between the two) and at the end of the file, among what a reused
    /// file holds from an earlier life (old records, which carry other
    /// offsets, and arbitrary bytes), and nothing else.
    #[test]
    fn the_search_finds_records_across_its_read_chunks_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 3 * SEARCH_CHUNK as u64;
        let base = 7 * len;
        let file = MappedFile::create(&dir.path().join("segment"), len).expect("create");
        // An earlier life: every byte written, none of it zero.
        file.write_at(0, &vec![0xA5; len as usize])
            .expect("old bytes");
        let chunk = SEARCH_CHUNK as u64;
        let last = len - encoded(5, base, 0).len() as u64;
        let ours = [100, chunk - 6, chunk + 200, 2 * chunk - 1, last];
        for (seq, &at) in ours.iter().enumerate() {
            file.write_at(at, &encoded(seq as u64, base, at))
                .expect("record");
        }
        // Records of the file's earlier life, where it was based elsewhere.
        for at in [5_000, chunk + 5_000, 2 * chunk - 3_000] {
            file.write_at(at, &encoded(9, 2 * len, at))
                .expect("old record");
        }
        // The magic after lengths no record can have.
        let mut junk = Vec::new();
        for bad_len in [3u32, u32::MAX] {
            junk.extend_from_slice(&bad_len.to_le_bytes());
            junk.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        }
        file.write_at(9_000, &junk).expect("junk");
        // A record of the log with a flipped byte in its body.
        let mut damaged = encoded(8, base, 20_000);
        let at = damaged.len() - 3;
        damaged[at] ^= 0x40;
        file.write_at(20_000, &damaged).expect("damaged record");

        assert_eq!(
            visited(&file, base, 0, u64::MAX),
            ours,
            "every record, in order"
        );
        assert_eq!(
            visited(&file, base, 101, chunk + 200),
            [chunk - 6],
            "only those starting in [from, to)"
        );
        assert_eq!(
            visited(&file, base, chunk + 200, u64::MAX),
            [chunk + 200, 2 * chunk - 1, last],
            "from a record's own position"
        );
    }
}
