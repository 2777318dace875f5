//! The commit log: every record of the broker, appended in one sequence of
//! fixed-size segment files named by the offset of their first byte.
//!
//! Offsets are global byte positions: segment k covers
//! `[k × size, (k + 1) × size)`. A record never straddles two segments; the
//! space left at the end of a segment is closed by a blank filler. The
//! next segment is created and mapped by a background thread before it is
//! needed, so an append does not wait on file creation.
//!
//! The same thread keeps the process's share of the mapped log small: it
//! makes pages writable only a little ahead of the writer, and unmaps pages
//! well behind the end (they stay in the page cache, where the kernel ages
//! and reclaims them like any file's). The broker's resident size is its
//! own memory plus tens of MiB of log, not the gigabytes it wrote.

use std::collections::VecDeque;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use super::StoreError;
use super::consume_queue::{base_name, parse_base_name};
use super::mapped::{
    MappedFile, PAGE, SPARE_SUFFIX, holds_only_zeros, remove_temp_files, sync_dir,
};
use super::record::{BLANK_LEN, BLANK_MAGIC, blank_header, le_u32, le_u64};
use super::staging::Staged;

/// One segment file of the commit log.
pub struct Segment {
    /// Commit-log offset of the segment's first byte.
    pub base: u64,
    pub file: MappedFile,
    /// Set (under the log's seal lock) when the log rolled to the next
    /// segment and wrote this one's closing filler: nothing may write zeros
    /// here any more (see [`CommitLog::zero_ahead`]).
    sealed: AtomicBool,
    /// Made from a file retention took from the log (see
    /// [`CommitLog::delete_oldest_while`]), whose blocks past the records
    /// written so far hold an older segment's records, not zeros (cleared
    /// when a cut zeros the rest: those blocks are only reserved again).
    reused: AtomicBool,
    /// Where in the file the segment's filler starts, once known: written
    /// by [`CommitLog::roll`], passed by recovery's scan, or read from the
    /// filler's footer (see `filler_from_footer`). A file whose filler is
    /// not known is not reused (see [`MappedFile::reuse_as`]).
    filler_at: AtomicU64,
}

/// [`Segment::filler_at`] not known.
const FILLER_UNKNOWN: u64 = u64::MAX;

/// A filler this long or longer ends with where it starts (see
/// [`CommitLog::roll`]); a shorter one would have its header there.
const FILLER_FOOTER_MIN: u64 = BLANK_LEN as u64 + 8;

/// Where the filler of a segment file starts, as its footer says (see
/// [`CommitLog::roll`]), if a filler header is there that runs to the end
/// of the file; `None` when that cannot be told (no filler, a filler too
/// short for a footer, or a file written before footers).
fn filler_from_footer(file: &MappedFile) -> Option<u64> {
    let len = file.len();
    let mut footer = [0u8; 8];
    if len < FILLER_FOOTER_MIN || file.pread(&mut footer, len - 8).ok()? != 8 {
        return None;
    }
    let at = le_u64(&footer, 0);
    if at > len - FILLER_FOOTER_MIN {
        return None;
    }
    let mut head = [0u8; BLANK_LEN];
    if file.pread(&mut head, at).ok()? != BLANK_LEN {
        return None;
    }
    (le_u32(&head, 4) == BLANK_MAGIC && u64::from(le_u32(&head, 0)) == len - at).then_some(at)
}

impl Segment {
    fn new(base: u64, file: MappedFile) -> Self {
        Self {
            base,
            file,
            sealed: AtomicBool::new(false),
            reused: AtomicBool::new(false),
            filler_at: AtomicU64::new(FILLER_UNKNOWN),
        }
    }

    fn reused(base: u64, file: MappedFile) -> Self {
        let seg = Self::new(base, file);
        seg.reused.store(true, Ordering::Relaxed);
        seg
    }

    /// Whether the segment was made from a file retention took from the
    /// log and still holds that file's older records past its end.
    pub fn is_reused(&self) -> bool {
        self.reused.load(Ordering::Relaxed)
    }

    /// Records that the segment's filler starts at commit-log offset `at`.
    pub fn set_filler_at(&self, at: u64) {
        self.filler_at.store(at - self.base, Ordering::Relaxed);
    }

    pub fn end(&self) -> u64 {
        self.base + self.file.len()
    }
}

/// Where the next record goes; owned by whoever holds the store's append lock.
pub struct Tail {
    pub segment: Arc<Segment>,
    /// Commit-log offset of the next byte to write.
    pub pos: u64,
    /// Records appended but not yet written to the log (under SYNC_FLUSH,
    /// where the flusher writes them; always empty otherwise).
    pub staged: Staged,
}

/// How records reach a segment. Either way readers see them through the
/// mapping (one page cache), and every segment has its blocks reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// Positional writes to the file (used under SYNC_FLUSH, by the flusher:
    /// see the `staging` module). Measured on
    /// ext4 here: the fdatasync that follows takes a fifth of the time it
    /// takes after the same bytes were written through the mapping (about
    /// 0.2 ms against 1-1.7 ms for 32 KiB), and that flush is on every
    /// acknowledgement's path. Segments are reserved when created and, while
    /// flushes are small, the flusher writes zeros a little ahead of the
    /// end (see [`CommitLog::zero_ahead`]).
    ThroughFile,
    /// Stores into the mapping, whose pages a background thread makes
    /// writable a little ahead of the writer so appends rarely fault (used
    /// under ASYNC_FLUSH, where the append itself is what a send waits for).
    ThroughMapping,
}

/// Limits checked when the log grows by a segment.
#[derive(Clone, Debug)]
pub struct GrowthLimits {
    /// Refuse to hold more than this many bytes of segments.
    pub max_bytes: Option<u64>,
    /// Refuse to grow when the filesystem is fuller than this ratio.
    pub full_ratio: f64,
    /// How records are written, and so how new segments are prepared.
    pub writes: Writes,
    /// Under [`Writes::ThroughFile`], write zeros ahead of small flushes
    /// (see [`CommitLog::zero_ahead`]).
    pub zero_ahead: bool,
    /// Under [`Writes::ThroughFile`], keep files retention takes from the
    /// log and make the next segments of them (see
    /// [`CommitLog::delete_oldest_while`]).
    pub reuse_segments: bool,
    /// How full the log's filesystem is (see [`StoreConfig::fs_usage`]).
    ///
    /// [`StoreConfig::fs_usage`]: super::StoreConfig::fs_usage
    pub fs_usage: FsUsageFn,
}

/// The segment files and the published end of the log.
pub struct CommitLog {
    dir: PathBuf,
    segment_size: u64,
    segments: Arc<RwLock<Vec<Arc<Segment>>>>,
    /// Everything below this offset is written and may be read (shared with
    /// the preparer, which populates pages only a little ahead of it).
    max_offset: Arc<AtomicU64>,
    releaser: Arc<Releaser>,
    limits: GrowthLimits,
    preparer: Arc<Preparer>,
    maker: Arc<SegmentMaker>,
    preparer_thread: Mutex<Option<JoinHandle<()>>>,
    /// Under [`Writes::ThroughFile`]: blocks past the end of the log below
    /// this offset hold written zeros (see [`CommitLog::zero_ahead`]).
    zeroed: AtomicU64,
    /// Orders writing zeros ahead against a roll's closing filler.
    seal: Mutex<()>,
    /// Bytes of zeros written ahead since the log opened.
    zeroed_bytes: AtomicU64,
}

/// State shared with the thread that creates segments ahead of need.
struct Preparer {
    state: Mutex<PrepState>,
    wake: Condvar,
}

#[derive(Default)]
struct PrepState {
    /// Base offset of the segment wanted next.
    want: Option<u64>,
    ready: Option<Arc<Segment>>,
    /// Base of the segment the thread is creating right now.
    in_progress: Option<u64>,
    stop: bool,
    /// Files retention took from the log, kept to be made into the next
    /// segments, each with the name it has now (see [`SPARE_SUFFIX`]).
    spares: Vec<(Arc<Segment>, PathBuf)>,
}

/// Files retention took from the log that are kept for reuse at most:
/// enough for the preparer to find one at every roll while retention
/// keeps pace, without holding much disk that nothing uses.
const MAX_SPARES: usize = 2;

/// Makes new segment files: from a spare (see [`PrepState::spares`]) when
/// one is free, or created and reserved.
struct SegmentMaker {
    dir: PathBuf,
    size: u64,
    reuse: bool,
    /// Segments made of spares so far.
    made_of_spares: AtomicU64,
}

impl SegmentMaker {
    fn make(&self, prep: &Preparer, base: u64) -> Result<Segment, StoreError> {
        let spare = if self.reuse {
            let mut st = prep.state.lock();
            // Only a file nothing maps any more: a reader that took the
            // segment before retention removed it may still be reading.
            // Nothing can take it again (it is in no list but this), so a
            // count of one stays one.
            let free = st
                .spares
                .iter()
                .position(|(seg, _)| Arc::strong_count(seg) == 1);
            free.map(|i| st.spares.remove(i))
        } else {
            None
        };
        let path = self.dir.join(base_name(base));
        if let Some((seg, now_at)) = spare {
            match Arc::try_unwrap(seg) {
                Ok(Segment {
                    file, filler_at, ..
                }) => match file.reuse_as(&now_at, filler_at.into_inner(), &path) {
                    Ok(file) => {
                        tracing::debug!(base, "made a commit log segment of a spare file");
                        self.made_of_spares.fetch_add(1, Ordering::Relaxed);
                        return Ok(Segment::reused(base, file));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, base, "could not reuse a spare commit log file; creating a new one");
                        let _ = std::fs::remove_file(&now_at);
                        if e.kind() != io::ErrorKind::AlreadyExists {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                },
                Err(seg) => prep.state.lock().spares.push((seg, now_at)),
            }
        }
        let file = create_segment(&self.dir, base, self.size)?;
        Ok(Segment::new(base, file))
    }
}

impl CommitLog {
    /// Opens the segments in `dir` (creating the first one in an empty log).
    /// Nothing is verified here: recovery scans what it needs afterwards and
    /// then sets the end with [`CommitLog::set_end`].
    pub fn open(dir: &Path, segment_size: u64, limits: GrowthLimits) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(StoreError::io(format!("creating {}", dir.display())))?;
        remove_temp_files(dir).map_err(StoreError::io(format!("cleaning {}", dir.display())))?;
        let mut bases = Vec::new();
        for entry in
            std::fs::read_dir(dir).map_err(StoreError::io(format!("listing {}", dir.display())))?
        {
            let entry = entry.map_err(StoreError::io(format!("listing {}", dir.display())))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_base_name) {
                Some(b) => bases.push(b),
                None => {
                    // Temp files from an interrupted segment creation are harmless.
                    tracing::debug!(file = ?name, "ignoring non-segment file in the commit log directory");
                }
            }
        }
        bases.sort_unstable();
        drop_empty_segments_after_a_hole(dir, segment_size, &mut bases)?;
        let mut segments = Vec::with_capacity(bases.len());
        for (i, &base) in bases.iter().enumerate() {
            if !base.is_multiple_of(segment_size) {
                return Err(StoreError::Config(format!(
                    "segment {} does not start at a multiple of the configured segment size {segment_size}; \
                     was the log written with another segment size?",
                    base_name(base)
                )));
            }
            if i > 0 && bases[i - 1] + segment_size != base {
                return Err(StoreError::Corrupt {
                    offset: bases[i - 1] + segment_size,
                    reason: format!(
                        "segment {} is missing",
                        base_name(bases[i - 1] + segment_size)
                    ),
                });
            }
            let path = dir.join(base_name(base));
            let file = MappedFile::open(&path, segment_size).map_err(|e| {
                if e.kind() == io::ErrorKind::InvalidData {
                    StoreError::Config(format!(
                        "{e}; was the log written with another segment size?"
                    ))
                } else {
                    StoreError::Io {
                        context: format!("mapping {}", path.display()),
                        source: e,
                    }
                }
            })?;
            segments.push(Arc::new(Segment::new(base, file)));
        }
        if segments.is_empty() {
            let file = create_segment(dir, 0, segment_size)?;
            segments.push(Arc::new(Segment::new(0, file)));
        }
        let end = segments.last().map_or(0, |s| s.end());
        let segments = Arc::new(RwLock::new(segments));
        let max_offset = Arc::new(AtomicU64::new(end));
        Ok(Self {
            dir: dir.to_owned(),
            segment_size,
            segments: segments.clone(),
            max_offset: max_offset.clone(),
            releaser: Arc::new(Releaser {
                segments,
                end: max_offset,
                released: AtomicU64::new(0),
            }),
            maker: Arc::new(SegmentMaker {
                dir: dir.to_owned(),
                size: segment_size,
                reuse: limits.reuse_segments && limits.writes == Writes::ThroughFile,
                made_of_spares: AtomicU64::new(0),
            }),
            limits,
            preparer: Arc::new(Preparer {
                state: Mutex::new(PrepState::default()),
                wake: Condvar::new(),
            }),
            preparer_thread: Mutex::new(None),
            zeroed: AtomicU64::new(0),
            seal: Mutex::new(()),
            zeroed_bytes: AtomicU64::new(0),
        })
    }

    /// Starts the thread that creates the next segment ahead of need.
    pub fn start_preparer(&self) {
        let prep = self.preparer.clone();
        let maker = self.maker.clone();
        let populate = self.populates();
        let published = self.max_offset.clone();
        let releaser = self.releaser.clone();
        // The segment being written at start was only reserved (so the
        // broker could listen at once); its pages ahead of the end are
        // populated in the background like any other's. Populating only
        // faults pages in: it never changes their contents, so it is safe
        // while appends go on.
        let end = self.max_offset();
        let start: VecDeque<_> = match self.segments.read().last() {
            Some(seg) if populate => {
                // From the step holding the end: what lies before is written.
                let from = end.saturating_sub(seg.base) / POPULATE_STEP * POPULATE_STEP;
                [(seg.clone(), from)].into()
            }
            _ => VecDeque::new(),
        };
        let handle = std::thread::Builder::new()
            .name("keelmq-segment-prep".into())
            .spawn(move || {
                prepare_loop(&prep, &maker, populate, &published, &releaser, start);
            })
            .ok();
        *self.preparer_thread.lock() = handle;
        self.request_next();
    }

    /// Stops the preparer thread.
    pub fn stop_preparer(&self) {
        self.preparer.state.lock().stop = true;
        self.preparer.wake.notify_all();
        if let Some(h) = self.preparer_thread.lock().take() {
            let _ = h.join();
        }
        // A prepared but unused segment is removed so that the directory
        // only holds segments of the log.
        // So are spare files.
        let (ready, spares) = {
            let mut st = self.preparer.state.lock();
            (st.ready.take(), std::mem::take(&mut st.spares))
        };
        if let Some(seg) = ready {
            let _ = std::fs::remove_file(seg.file.path());
        }
        for (_, at) in spares {
            let _ = std::fs::remove_file(at);
        }
    }

    pub fn segment_size(&self) -> u64 {
        self.segment_size
    }

    /// Space on the log's filesystem, through the configured probe.
    pub fn fs_usage(&self) -> Option<FsUsage> {
        (self.limits.fs_usage)(&self.dir)
    }

    /// First readable offset.
    pub fn min_offset(&self) -> u64 {
        self.segments.read().first().map_or(0, |s| s.base)
    }

    /// End of the published log.
    pub fn max_offset(&self) -> u64 {
        self.max_offset.load(Ordering::Acquire)
    }

    /// Sets the published end (recovery and truncation).
    pub fn set_end(&self, end: u64) {
        self.max_offset.store(end, Ordering::Release);
        // After a cut, what is written again past the new end is released
        // again as the end passes it.
        self.releaser
            .released
            .fetch_min(end / POPULATE_GRANULE * POPULATE_GRANULE, Ordering::AcqRel);
        // A cut leaves only reserved blocks past the new end.
        self.zeroed.fetch_min(end, Ordering::AcqRel);
    }

    /// All segments, oldest first.
    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments.read().clone()
    }

    /// The segment holding `offset`.
    pub fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segs = self.segments.read();
        let i = segs.partition_point(|s| s.base <= offset).checked_sub(1)?;
        let s = &segs[i];
        (offset < s.end()).then(|| s.clone())
    }

    /// A tail positioned at `end`.
    pub fn tail_at(&self, end: u64) -> Result<Tail, StoreError> {
        let segs = self.segments.read();
        let seg = segs
            .iter()
            .rev()
            .find(|s| s.base <= end && end <= s.end())
            .cloned()
            .ok_or_else(|| StoreError::Corrupt {
                offset: end,
                reason: "no segment holds the end of the log".into(),
            })?;
        Ok(Tail {
            segment: seg,
            pos: end,
            staged: Staged::default(),
        })
    }

    /// Copies `len` bytes from `offset`; they must lie in one segment and
    /// below the published end.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        // A length from a damaged consume-queue entry may be anything: no
        // buffer larger than a segment is made for it.
        if len as u64 > self.segment_size {
            return Err(StoreError::InvalidArgument(format!(
                "{len} bytes at offset {offset} are more than a segment holds"
            )));
        }
        let mut out = vec![0u8; len];
        self.with_bytes(offset, |b| {
            if b.len() < len {
                return Err(StoreError::InvalidArgument(format!(
                    "{len} bytes at offset {offset} run past the end of the log"
                )));
            }
            out.copy_from_slice(&b[..len]);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with the published bytes from `offset` to the end of its
    /// segment or of the log, whichever comes first.
    pub fn with_bytes<T>(
        &self,
        offset: u64,
        f: impl FnOnce(&[u8]) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let end = self.max_offset();
        let seg = self
            .segment_for(offset)
            .filter(|_| offset < end)
            .ok_or_else(|| StoreError::OutOfRange {
                offset,
                min: self.min_offset(),
                max: end,
            })?;
        let limit = end.min(seg.end());
        // SAFETY: bytes below the published end are never written again
        // (truncation happens only under the append lock with no readers of
        // the cut range), and the segment stays mapped while `seg` lives.
        let bytes = unsafe { seg.file.slice(offset - seg.base, (limit - offset) as usize) };
        f(bytes)
    }

    /// Makes sure `len` bytes fit in the tail's segment, closing it with a
    /// blank filler and moving to the next segment when they do not.
    pub fn make_room(&self, tail: &mut Tail, len: u64) -> Result<(), StoreError> {
        if len + BLANK_LEN as u64 > self.segment_size {
            return Err(StoreError::RecordTooLarge {
                size: len,
                max: self.segment_size - BLANK_LEN as u64,
            });
        }
        if tail.pos + len + BLANK_LEN as u64 <= tail.segment.end() {
            return Ok(());
        }
        self.roll(tail)
    }

    /// Closes the tail's segment with a blank filler and moves the tail to
    /// the start of the next segment.
    pub fn roll(&self, tail: &mut Tail) -> Result<(), StoreError> {
        let next = self.next_segment(tail.segment.end())?;
        let seg = &tail.segment;
        let rel = tail.pos - seg.base;
        let blank = seg.file.len() - rel;
        // Under SYNC_FLUSH the flusher may be writing zeros ahead in this
        // segment; once sealed it leaves the segment (and this filler) alone.
        let _seal = self.seal.lock();
        seg.sealed.store(true, Ordering::Release);
        // SAFETY: the append lock is held; the range is past the published end.
        let dst = unsafe { seg.file.slice_mut(rel, BLANK_LEN) };
        dst.copy_from_slice(&blank_header(blank as u32));
        // Where the filler starts, in the filler's own last 8 bytes (when
        // they are not its header), so that after a restart retention can
        // find it with one read (see `filler_from_footer`).
        if blank >= FILLER_FOOTER_MIN {
            // SAFETY: as above: inside this filler, past the published end.
            let footer = unsafe { seg.file.slice_mut(seg.file.len() - 8, 8) };
            footer.copy_from_slice(&rel.to_le_bytes());
        }
        seg.filler_at.store(rel, Ordering::Relaxed);
        tail.segment = next;
        tail.pos = tail.segment.base;
        Ok(())
    }

    /// The writable bytes `[offset, offset + len)` of `segment` (the tail's
    /// segment and position); room must have been made.
    ///
    /// # Safety
    /// The caller holds the append lock and publishes the bytes only after
    /// writing them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn reserve<'a>(
        &self,
        segment: &'a Segment,
        offset: u64,
        len: usize,
    ) -> &'a mut [u8] {
        // SAFETY: past the published end, single writer (caller's contract).
        unsafe { segment.file.slice_mut(offset - segment.base, len) }
    }

    /// Writes `bytes` at `offset` of `segment`, as [`Writes`] says, below the
    /// segment's end (room must have been made).
    ///
    /// # Safety
    /// The caller is the log's only writer of the range (it holds the append
    /// lock, or the commit lock for staged records), `[offset, offset +
    /// bytes.len())` is past the published end, and it is published only
    /// after this returns.
    pub unsafe fn write(&self, segment: &Segment, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let at = offset - segment.base;
        match self.limits.writes {
            Writes::ThroughFile => {
                // Zeros up to the next page boundary (past room for a
                // filler's header) go with the bytes. In a reused segment no
                // page is then read from the disk before it is written, and
                // recovery finds zeros, not an older segment's bytes, where
                // the records end; that holds for a segment opened again
                // after a restart too, which is not known to be reused.
                // Elsewhere the zeros cost a copy into a page written anyway.
                // Not once the segment is sealed: its filler is past the
                // bytes.
                let _seal = self.seal.lock();
                if segment.sealed.load(Ordering::Acquire) {
                    segment.file.write_at(at, bytes)
                } else {
                    let end = at + bytes.len() as u64;
                    segment.file.write_at_padded(
                        at,
                        bytes,
                        (end + BLANK_LEN as u64).next_multiple_of(PAGE),
                    )
                }
            }
            Writes::ThroughMapping => {
                // SAFETY: past the published end, single writer (caller's contract).
                unsafe { segment.file.slice_mut(at, bytes.len()) }.copy_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// How records are written to this log.
    pub fn writes(&self) -> Writes {
        self.limits.writes
    }

    /// Publishes everything written up to the tail.
    pub fn publish(&self, tail: &Tail) {
        self.publish_to(tail.pos);
    }

    /// Publishes everything written below `end`.
    pub fn publish_to(&self, end: u64) {
        let before = self.max_offset.swap(end, Ordering::Release);
        // The preparer populates pages a bounded distance ahead of the end
        // and releases them a bounded distance behind it; tell it each time
        // the end moves on by a granule.
        if before / POPULATE_GRANULE != end / POPULATE_GRANULE {
            let _st = self.preparer.state.lock();
            self.preparer.wake.notify_all();
        }
    }

    /// Unmaps pages well behind the end of the log from this process (see
    /// [`Releaser`]); the preparer does it as the end moves, this is for
    /// pages readers mapped while the log stood still.
    pub fn release_behind(&self) {
        self.releaser.run();
    }

    /// Whether the preparer makes pages writable ahead of the writer.
    fn populates(&self) -> bool {
        self.limits.writes == Writes::ThroughMapping
    }

    /// Writes zeros into the reserved blocks just past `pos`, the log's
    /// write position (staged records included), so that the records
    /// written there next overwrite written blocks. Called by the SYNC_FLUSH
    /// flusher after a flush for which [`CommitLog::zeroes_ahead_after`]
    /// holds (not under [`Writes::ThroughMapping`], nor after very small or
    /// large flushes).
    ///
    /// Why: on ext4 an fdatasync after writing into reserved (unwritten)
    /// blocks must also record that they now hold data, a second
    /// synchronous write; after overwriting written blocks it writes only
    /// the data. Measured on this project's disk with 72 KiB writes each
    /// followed by an fdatasync and 100 µs of other work: fdatasync p50 about
    /// 180 µs into reserved blocks, 80-100 µs into zeroed ones, 218-229
    /// against 273-297 MB/s, with 128-256 KiB of zeros written per step just
    /// after a flush, while the disk is otherwise idle (the group's callers
    /// are appending again). Zeroing far ahead, in large steps or from
    /// another thread at arbitrary times made flushes wait behind the zeros
    /// instead. Every zeroed byte is written twice, so under large flushes
    /// (over [`ZERO_MAX_FLUSH`]), where the saving is small against the
    /// flush itself, nothing is zeroed. Nor under flushes of less than two
    /// blocks ([`ZERO_MIN_FLUSH`], a lone writer's): most of them land in a
    /// block an earlier flush already wrote, so there is little to save,
    /// and a step of zeros in flight delays the flush after it (the lone
    /// writer's p99 rose by half when it zeroed).
    ///
    /// # Safety
    /// The caller holds the commit lock (no other thread writes the log's
    /// file past `pos`; appenders only stage) and `pos` is the write
    /// position read after taking it.
    pub unsafe fn zero_ahead(&self, pos: u64) -> io::Result<()> {
        let mut at = self
            .zeroed
            .load(Ordering::Acquire)
            .max(pos.next_multiple_of(ZERO_STEP));
        let mut steps = 0;
        while at < pos + ZERO_AHEAD && steps < ZERO_STEPS_PER_FLUSH {
            // Only the segments the log has: the next one is prepared (and
            // reserved) by the preparer, and zeroed from its start once
            // the log moved into it.
            let Some(seg) = self.segment_for(at) else {
                break;
            };
            if seg.is_reused() {
                // Its blocks are written already (see `SegmentMaker`).
                at = seg.end();
                continue;
            }
            let len = ZERO_STEP.min(seg.end() - at);
            {
                let _seal = self.seal.lock();
                if seg.sealed.load(Ordering::Acquire) {
                    // Rolled past: the filler ends this segment's records.
                    at = seg.end();
                    continue;
                }
                seg.file.write_zeros(at - seg.base, len)?;
            }
            self.zeroed_bytes.fetch_add(len, Ordering::Relaxed);
            at += len;
            steps += 1;
        }
        self.zeroed.store(at, Ordering::Release);
        Ok(())
    }

    /// Whether a flush of `flushed` bytes is followed by zeros ahead (see
    /// [`CommitLog::zero_ahead`]).
    pub fn zeroes_ahead_after(&self, flushed: u64) -> bool {
        self.limits.writes == Writes::ThroughFile
            && self.limits.zero_ahead
            && (ZERO_MIN_FLUSH..=ZERO_MAX_FLUSH).contains(&flushed)
    }

    /// Segments made of spare files since the log opened (see
    /// [`CommitLog::delete_oldest_while`]).
    pub fn segments_made_of_spares(&self) -> u64 {
        self.maker.made_of_spares.load(Ordering::Relaxed)
    }

    /// Bytes of zeros [`CommitLog::zero_ahead`] wrote since the log opened.
    pub fn zeroed_ahead_bytes(&self) -> u64 {
        self.zeroed_bytes.load(Ordering::Relaxed)
    }

    /// Makes `[from, to)` durable.
    pub fn flush(&self, from: u64, to: u64) -> io::Result<()> {
        for seg in self.segments() {
            if seg.end() <= from || seg.base >= to {
                continue;
            }
            let a = from.max(seg.base) - seg.base;
            let b = to.min(seg.end()) - seg.base;
            seg.file.flush_range(a, b)?;
        }
        Ok(())
    }

    /// Cuts the log at `end`: zeros the rest of its segment (unless
    /// `zero_rest` is false: recovery found nothing there that could be
    /// taken for a record, or, after a clean shutdown, nothing there can be
    /// the log's; see `recovery::recover`), deletes later
    /// segments. The caller holds the append lock.
    pub fn truncate(&self, end: u64, zero_rest: bool) -> Result<Tail, StoreError> {
        let mut doomed = Vec::new();
        {
            let mut segs = self.segments.write();
            while segs.len() > 1 && segs.last().is_some_and(|s| s.base > end) {
                if let Some(s) = segs.pop() {
                    doomed.push(s);
                }
            }
        }
        if self.max_offset() > end {
            self.set_end(end);
        }
        // The prepared segment may be for a base we no longer want. It goes
        // before the directory is synced: left on disk after a crash, it
        // would stand after a hole where the removed segments were.
        let prepared = self.preparer.state.lock().ready.take();
        let prepared_removed =
            prepared.is_some_and(|seg| std::fs::remove_file(seg.file.path()).is_ok());
        for s in &doomed {
            std::fs::remove_file(s.file.path()).map_err(StoreError::io(format!(
                "removing {}",
                s.file.path().display()
            )))?;
        }
        if !doomed.is_empty() || prepared_removed {
            sync_dir(&self.dir).map_err(StoreError::io("syncing the commit log directory"))?;
        }
        let tail = self.tail_at(end)?;
        {
            // A cut before a segment's filler removes the filler: the
            // segment takes records again.
            let _seal = self.seal.lock();
            if zero_rest {
                tail.segment
                    .file
                    .zero_from(end - tail.segment.base)
                    .map_err(StoreError::io("zeroing the cut tail of the commit log"))?;
                tail.segment.reused.store(false, Ordering::Relaxed);
            }
            if end < tail.segment.end() {
                tail.segment
                    .filler_at
                    .store(FILLER_UNKNOWN, Ordering::Relaxed);
                tail.segment.sealed.store(false, Ordering::Release);
            }
        }
        self.request_next_after(tail.segment.end());
        Ok(tail)
    }

    /// Deletes every segment and starts the log again, empty, at `base` (a
    /// multiple of the segment size, at or past the end). The caller holds
    /// the append lock. Segments go oldest first, each removal made durable
    /// before the next, so a crash leaves a log that is a suffix of this one
    /// (or, after the last removal, an empty directory: an empty log at 0),
    /// never one with a hole.
    pub fn restart_at(&self, base: u64) -> Result<Tail, StoreError> {
        if !base.is_multiple_of(self.segment_size) {
            return Err(StoreError::InvalidArgument(format!(
                "the log cannot start at {base}: not a multiple of this broker's segment size {} \
                 (master and slaves must use the same segment size)",
                self.segment_size
            )));
        }
        if base < self.max_offset() {
            return Err(StoreError::InvalidArgument(format!(
                "the log cannot start again at {base}, before its end {}",
                self.max_offset()
            )));
        }
        // Readers keep the old mappings until the new segment replaces them.
        let old = self.segments();
        for s in &old {
            if s.base == base {
                continue;
            }
            std::fs::remove_file(s.file.path()).map_err(StoreError::io(format!(
                "removing {}",
                s.file.path().display()
            )))?;
            sync_dir(&self.dir).map_err(StoreError::io("syncing the commit log directory"))?;
        }
        // The last old segment may already be the one at `base` (an empty
        // log whose end is that segment's start); otherwise it is taken from
        // the preparer or created.
        let seg = match old.into_iter().find(|s| s.base == base) {
            Some(s) => s,
            None => self.take_or_create(base)?,
        };
        *self.segments.write() = vec![seg.clone()];
        self.max_offset.store(base, Ordering::Release);
        self.releaser.released.store(
            base / POPULATE_GRANULE * POPULATE_GRANULE,
            Ordering::Release,
        );
        self.zeroed.store(base, Ordering::Release);
        self.request_next_after(base + self.segment_size);
        self.tail_at(base)
    }

    /// Deletes the oldest segments while `doom(segment, next segment)` says
    /// so; the segment holding the end is always kept. Returns how many
    /// went. `doom` runs with the segments lock held for writing: it must
    /// not call anything that takes that lock (`segments`, `segment_for`,
    /// `min_offset`, `disk_bytes`, reads of the log...), which would
    /// deadlock.
    ///
    /// With `keep_within` (and reuse on, under [`Writes::ThroughFile`]),
    /// up to [`MAX_SPARES`] of the files are renamed to spares rather than
    /// deleted, as long as [`CommitLog::disk_bytes`] stays within it, and
    /// the next segments are made of them. Only files whose filler is known
    /// (see [`Segment::filler_at`]) are kept. Measured on ext4
    /// here: a flush that overwrites written blocks skips the metadata
    /// write that turns reserved blocks into written ones, and nothing
    /// needs zeros written ahead (see the README's benchmarks).
    pub fn delete_oldest_while(
        &self,
        keep_within: Option<u64>,
        mut doom: impl FnMut(&Segment, &Segment) -> bool,
    ) -> Result<usize, StoreError> {
        let mut removed = Vec::new();
        {
            let mut segs = self.segments.write();
            let end = self.max_offset();
            while segs.len() > 1 && segs[1].base <= end && doom(&segs[0], &segs[1]) {
                removed.push(segs.remove(0));
            }
        }
        let count = removed.len();
        let mut kept = Vec::new();
        for s in removed {
            let path = s.file.path().to_owned();
            if self.keeps(&s, kept.len(), keep_within) {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("segment");
                let spare = path.with_file_name(format!(".{name}{SPARE_SUFFIX}"));
                std::fs::rename(&path, &spare)
                    .map_err(StoreError::io(format!("renaming {}", path.display())))?;
                tracing::info!(segment = %path.display(), "retention removed a commit log segment; its file is kept to make a later segment of");
                kept.push((s, spare));
                continue;
            }
            std::fs::remove_file(&path)
                .map_err(StoreError::io(format!("removing {}", path.display())))?;
            tracing::info!(segment = %path.display(), "retention removed a commit log segment");
        }
        if !kept.is_empty() {
            // The renames are durable before the preparer writes to a
            // spare: a crash must not bring it back under its old name
            // with its first page zeroed.
            sync_dir(&self.dir).map_err(StoreError::io("syncing the commit log directory"))?;
            self.preparer.state.lock().spares.extend(kept);
        }
        Ok(count)
    }

    /// Whether `seg`, just taken from the log, is kept as a spare, with
    /// `kept` others taken in the same pass (see
    /// [`CommitLog::delete_oldest_while`]). Cheapest checks first: the
    /// footer is read only for a file that would otherwise be kept.
    fn keeps(&self, seg: &Segment, kept: usize, keep_within: Option<u64>) -> bool {
        let Some(limit) = keep_within.filter(|_| self.maker.reuse) else {
            return false;
        };
        if self.preparer.state.lock().spares.len() + kept >= MAX_SPARES
            || self.disk_bytes() + (kept as u64 + 1) * self.segment_size > limit
        {
            return false;
        }
        if seg.filler_at.load(Ordering::Relaxed) == FILLER_UNKNOWN
            && let Some(at) = filler_from_footer(&seg.file)
        {
            seg.filler_at.store(at, Ordering::Relaxed);
        }
        seg.filler_at.load(Ordering::Relaxed) != FILLER_UNKNOWN
    }

    /// Deletes the spare files (see [`CommitLog::delete_oldest_while`]);
    /// returns the bytes they held.
    pub fn drop_spares(&self) -> u64 {
        let spares = std::mem::take(&mut self.preparer.state.lock().spares);
        let mut freed = 0;
        for (seg, at) in spares {
            if std::fs::remove_file(&at).is_ok() {
                freed += seg.file.len();
            }
        }
        freed
    }

    /// Bytes held in segment files, including the next one, prepared or
    /// about to be (requested or being created): it is there or will be,
    /// and retention must not count on its space.
    pub fn disk_bytes(&self) -> u64 {
        let (next, spares) = {
            let st = self.preparer.state.lock();
            (
                st.ready.is_some() || st.in_progress.is_some() || st.want.is_some(),
                st.spares.len() as u64,
            )
        };
        (self.segments.read().len() as u64 + u64::from(next) + spares) * self.segment_size
    }

    fn request_next(&self) {
        let next = self.segments.read().last().map_or(0, |s| s.end());
        self.request_next_after(next);
    }

    fn request_next_after(&self, base: u64) {
        if let Some(max) = self.limits.max_bytes {
            let held = self.segments.read().len() as u64 * self.segment_size;
            if held + self.segment_size > max {
                return;
            }
        }
        let mut st = self.preparer.state.lock();
        st.want = Some(base);
        self.preparer.wake.notify_all();
    }

    /// The segment starting at `base`: the prepared one, or created now.
    fn next_segment(&self, base: u64) -> Result<Arc<Segment>, StoreError> {
        let held = self.segments.read().len() as u64 * self.segment_size;
        if let Some(max) = self.limits.max_bytes
            && held + self.segment_size > max
        {
            return Err(StoreError::DiskFull(format!(
                "the commit log holds {held} bytes and another segment of {} would pass the configured limit of {max} bytes",
                self.segment_size
            )));
        }
        if let Some(ratio) = self.fs_usage().and_then(|u| u.used_ratio())
            && ratio >= self.limits.full_ratio
        {
            return Err(StoreError::DiskFull(format!(
                "the filesystem of {} is {:.1} % full (limit {:.1} %)",
                self.dir.display(),
                ratio * 100.0,
                self.limits.full_ratio * 100.0
            )));
        }
        let seg = self.take_or_create(base)?;
        self.segments.write().push(seg.clone());
        self.request_next_after(base + self.segment_size);
        Ok(seg)
    }

    /// The segment file starting at `base`: the prepared one, or created now.
    fn take_or_create(&self, base: u64) -> Result<Arc<Segment>, StoreError> {
        let prepared = {
            let mut st = self.preparer.state.lock();
            // If the thread is creating this very segment, wait for it.
            while st.in_progress == Some(base) {
                self.preparer.wake.wait(&mut st);
            }
            // If the thread has not started on this segment yet, it must
            // not: two creators of one file would collide on its temp name.
            if st.want == Some(base) {
                st.want = None;
            }
            match st.ready.take() {
                Some(s) if s.base == base => Some(s),
                Some(other) => {
                    let _ = std::fs::remove_file(other.file.path());
                    None
                }
                None => None,
            }
        };
        Ok(match prepared {
            Some(s) => s,
            None => {
                tracing::debug!(base, "making a commit log segment on the write path");
                Arc::new(self.maker.make(&self.preparer, base)?)
            }
        })
    }
}

/// Segments after a hole in the log that hold no record of their own
/// offsets (nothing but zeros, or a file made of a spare: its first page
/// zeroed, then only older records) are removed (from `bases` and the directory): a cut that removed a segment
/// and the prepared one after it, with a crash before the directory was
/// synced, leaves such a file. A segment after a hole that holds a record
/// is left for `CommitLog::open` to refuse.
fn drop_empty_segments_after_a_hole(
    dir: &Path,
    segment_size: u64,
    bases: &mut Vec<u64>,
) -> Result<(), StoreError> {
    let Some(hole) = (1..bases.len()).find(|&i| bases[i - 1] + segment_size != bases[i]) else {
        return Ok(());
    };
    for &base in &bases[hole..] {
        let path = dir.join(base_name(base));
        // A file made of a spare has its first page zeroed before it gets
        // its name (see `MappedFile::reuse_as`); nothing else is dropped
        // unless it holds only zeros.
        let empty = holds_only_zeros(&path)
            .map_err(StoreError::io(format!("reading {}", path.display())))?
            || MappedFile::open(&path, segment_size).is_ok_and(|file| {
                let mut first = [1u8; PAGE as usize];
                let first_zeroed = file.len() >= PAGE
                    && file.pread(&mut first, 0).is_ok_and(|n| n == first.len())
                    && first.iter().all(|&b| b == 0);
                first_zeroed
                    && super::recovery::visit_valid_records_in(&file, base, 0, u64::MAX, |_, _| {
                        ControlFlow::Break(())
                    })
                    .is_continue()
            });
        if !empty {
            return Ok(());
        }
    }
    for &base in bases[hole..].iter().rev() {
        let path = dir.join(base_name(base));
        tracing::warn!(
            segment = %path.display(),
            "removing a commit log segment that holds no record, left after a missing one (an interrupted cut)"
        );
        std::fs::remove_file(&path)
            .map_err(StoreError::io(format!("removing {}", path.display())))?;
    }
    sync_dir(dir).map_err(StoreError::io("syncing the commit log directory"))?;
    bases.truncate(hole);
    Ok(())
}

/// Creates, reserves and maps a segment file, and makes its name durable.
/// Populating its pages is left to the preparer thread.
fn create_segment(dir: &Path, base: u64, size: u64) -> Result<MappedFile, StoreError> {
    let path = dir.join(base_name(base));
    let file = MappedFile::create(&path, size).map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
            StoreError::DiskFull(format!(
                "no space left to create segment {}",
                path.display()
            ))
        } else {
            StoreError::Io {
                context: format!("creating segment {}", path.display()),
                source: e,
            }
        }
    })?;
    sync_dir(dir).map_err(StoreError::io("syncing the commit log directory"))?;
    Ok(file)
}

fn prepare_loop(
    prep: &Preparer,
    maker: &SegmentMaker,
    populate: bool,
    published: &AtomicU64,
    releaser: &Releaser,
    mut populating: VecDeque<(Arc<Segment>, u64)>,
) {
    loop {
        if releaser.due() {
            releaser.run();
        }
        let base = {
            let mut st = prep.state.lock();
            loop {
                if st.stop {
                    return;
                }
                if let Some(b) = st.want.take()
                    && st.ready.as_ref().is_none_or(|r| r.base != b)
                    && !maker.dir.join(base_name(b)).exists()
                {
                    st.in_progress = Some(b);
                    break Some(b);
                }
                let end = published.load(Ordering::Acquire);
                skip_written(&mut populating, end);
                if populating
                    .front()
                    .is_some_and(|(seg, from)| seg.base + from < end + POPULATE_AHEAD)
                {
                    break None;
                }
                if releaser.due() {
                    break None;
                }
                prep.wake.wait(&mut st);
            }
        };
        let Some(base) = base else {
            // One step of the oldest segment not fully populated (the one
            // the writer reaches first), then look for requests again:
            // creating a wanted segment never waits behind populating. Pages
            // are populated only up to a bounded distance ahead of the end,
            // so the work (zeroing fresh page cache) follows the write rate
            // instead of taking whole segments of memory and CPU at once; a
            // writer that outruns the preparer faults its pages in itself.
            let end = published.load(Ordering::Acquire);
            if let Some((seg, from)) = populating.pop_front() {
                if seg.base + from < end + POPULATE_AHEAD {
                    seg.file.populate_write_range(from, POPULATE_STEP);
                    let next = from + POPULATE_STEP;
                    if next < seg.file.len() {
                        populating.push_front((seg, next));
                    }
                } else {
                    // Woken to release pages, not yet to populate.
                    populating.push_front((seg, from));
                }
            }
            continue;
        };
        let created = maker.make(prep, base);
        let mut st = prep.state.lock();
        st.in_progress = None;
        match created {
            Ok(seg) => {
                let seg = Arc::new(seg);
                if populate {
                    populating.push_back((seg.clone(), 0));
                }
                if let Some(old) = st.ready.replace(seg) {
                    let _ = std::fs::remove_file(old.file.path());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, base, "could not prepare the next commit log segment")
            }
        }
        prep.wake.notify_all();
    }
}

/// Drops from the queue of steps to populate what the writer has already
/// passed (its pages are faulted in).
fn skip_written(populating: &mut VecDeque<(Arc<Segment>, u64)>, end: u64) {
    while let Some((seg, from)) = populating.front_mut() {
        if seg.end() <= end {
            populating.pop_front();
        } else {
            if seg.base + *from + POPULATE_STEP <= end {
                *from = (end - seg.base) / POPULATE_STEP * POPULATE_STEP;
            }
            return;
        }
    }
}

/// Zeros are written ahead of the SYNC_FLUSH writer in steps of this size,
/// at most [`ZERO_STEPS_PER_FLUSH`] after each flush, until they reach
/// [`ZERO_AHEAD`] past its position (see [`CommitLog::zero_ahead`]).
const ZERO_STEP: u64 = 128 << 10;
const ZERO_STEPS_PER_FLUSH: u32 = 2;
const ZERO_AHEAD: u64 = 1 << 20;
/// Only flushes covering between these many bytes zero ahead.
const ZERO_MIN_FLUSH: u64 = 8 << 10;
const ZERO_MAX_FLUSH: u64 = 2 * ZERO_STEP;

/// How much of a segment the preparer populates before it looks for a
/// request to create the next one.
const POPULATE_STEP: u64 = 16 << 20;

/// How far past the end of the log a step may start to be populated: pages
/// are made writable at most this much (plus a step) ahead of the writer.
const POPULATE_AHEAD: u64 = POPULATE_STEP;

/// The writer wakes the preparer each time the end of the log passes a
/// multiple of this.
const POPULATE_GRANULE: u64 = 8 << 20;

/// Pages less than this far behind the end of the log stay mapped (the
/// newest records are what consumers and the replication stream read).
const KEEP_MAPPED: u64 = 8 << 20;

/// Unmaps, from the process, mapped pages of the log more than
/// [`KEEP_MAPPED`] behind its end: the pages the writer wrote through the
/// mapping (in steps, as the end moves) and those readers mapped (in
/// segments read since their last release). The data stays in the file and
/// its page cache; only the process's page-table entries go.
struct Releaser {
    segments: Arc<RwLock<Vec<Arc<Segment>>>>,
    end: Arc<AtomicU64>,
    /// Everything below this was released as the end passed it.
    released: AtomicU64,
}

impl Releaser {
    /// Where the released range may end now: the end of the log less
    /// [`KEEP_MAPPED`], in whole granules.
    fn upto(&self) -> u64 {
        let end = self.end.load(Ordering::Acquire);
        end.saturating_sub(KEEP_MAPPED) / POPULATE_GRANULE * POPULATE_GRANULE
    }

    fn due(&self) -> bool {
        self.upto() > self.released.load(Ordering::Acquire)
    }

    fn run(&self) {
        let upto = self.upto();
        let from = self.released.fetch_max(upto, Ordering::AcqRel);
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .iter()
            .filter(|s| s.base < upto)
            .cloned()
            .collect();
        for seg in segments {
            let rel = |offset: u64| offset.clamp(seg.base, seg.end()) - seg.base;
            seg.file.release_behind(rel(from), rel(upto));
        }
    }
}

/// Space on a filesystem, as `df` reports it: blocks reserved for root (or
/// held back by the storage layer) count neither as used nor as available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes in use.
    pub used: u64,
    /// Bytes available to unprivileged users.
    pub avail: u64,
}

impl FsUsage {
    /// `used / (used + avail)`, if the filesystem has any space.
    pub fn used_ratio(&self) -> Option<f64> {
        let total = self.used.saturating_add(self.avail);
        (total > 0).then(|| self.used as f64 / total as f64)
    }

    /// Bytes to free to bring use down to `ratio` of the space (0 if it is
    /// not above it).
    pub fn excess_over(&self, ratio: f64) -> u64 {
        let total = self.used.saturating_add(self.avail);
        let allowed = (ratio * total as f64).ceil() as u64;
        self.used.saturating_sub(allowed)
    }
}

/// Reads how full the filesystem holding a path is.
pub type FsUsageFn = fn(&Path) -> Option<FsUsage>;

/// Space on the filesystem holding `dir` (statvfs), if known.
pub fn fs_usage(dir: &Path) -> Option<FsUsage> {
    let c = c_path(dir)?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_blocks == 0 {
        return None;
    }
    let unit = st.f_frsize as u64;
    Some(FsUsage {
        used: (st.f_blocks.saturating_sub(st.f_bfree) as u64).saturating_mul(unit),
        avail: (st.f_bavail as u64).saturating_mul(unit),
    })
}

/// Fraction of the filesystem holding `dir` that is in use, if known.
pub fn fs_used_ratio(dir: &Path) -> Option<f64> {
    fs_usage(dir)?.used_ratio()
}

/// `path` as a C string for the `stat*fs` calls (`None` if it holds a NUL).
fn c_path(path: &Path) -> Option<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).ok()
}

/// The name of the filesystem holding `dir` if it writes every overwrite to
/// new blocks (copy-on-write: btrfs, ZFS, bcachefs), where writing zeros
/// ahead of the log only doubles its writes.
pub fn copy_on_write_fs(dir: &Path) -> Option<&'static str> {
    let c = c_path(dir)?;
    // SAFETY: statfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    // The filesystems' magic numbers (linux/magic.h; ZFS's own).
    match st.f_type as u64 {
        0x9123_683e => Some("btrfs"),
        0x2fc1_2fc1 => Some("zfs"),
        0xca45_1a4e => Some("bcachefs"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dir: &Path, base: u64, size: u64) -> Arc<Segment> {
        let file = MappedFile::create(&dir.join(base_name(base)), size).expect("create segment");
        Arc::new(Segment::new(base, file))
    }

    #[test]
    fn populating_skips_what_the_writer_has_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 4 * POPULATE_STEP;
        let (a, b) = (
            segment(dir.path(), 0, size),
            segment(dir.path(), size, size),
        );
        let mut q: VecDeque<_> = [(a.clone(), 0), (b.clone(), 0)].into();

        // The writer is inside the first step: nothing to skip.
        skip_written(&mut q, POPULATE_STEP / 2);
        assert_eq!(q.front().map(|(s, f)| (s.base, *f)), Some((0, 0)));

        // Two and a half steps in: populating resumes at the step holding
        // the end, not at the steps already written.
        skip_written(&mut q, 2 * POPULATE_STEP + POPULATE_STEP / 2);
        assert_eq!(
            q.front().map(|(s, f)| (s.base, *f)),
            Some((0, 2 * POPULATE_STEP))
        );

        // Past the first segment: it leaves the queue, the next is untouched.
        skip_written(&mut q, size + 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.front().map(|(s, f)| (s.base, *f)), Some((size, 0)));

        // Past both: nothing is left to populate.
        skip_written(&mut q, 2 * size);
        assert!(q.is_empty());
    }
}
