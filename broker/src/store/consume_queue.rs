//! Consume queues: per topic-queue indexes into the commit log.
//!
//! Entry N of a queue is at byte N × 20 of the queue's files, so finding
//! message N is one multiplication. Each entry holds the commit-log offset
//! (8 bytes), the record size (4) and the tag hash (8); a zero size marks an
//! entry never written. Files hold a fixed number of entries and are named
//! by the index of their first entry. The queues are derived data: recovery
//! rebuilds them from the commit log.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::mapped::{MappedFile, remove_temp_files};
use super::record::{le_u32, le_u64};

/// Bytes per consume-queue entry.
pub const ENTRY_LEN: u64 = 20;

/// One entry of a consume queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CqEntry {
    pub offset: u64,
    pub size: u32,
    pub tag_hash: u64,
}

/// Size field of a blank entry: one standing for a message whose record
/// went with a deleted commit-log segment before this queue was built (see
/// [`ConsumeQueue::start_at`]). It counts as written, so a file's written
/// entries stay a prefix, and it is never handed to readers.
const BLANK_SIZE: u32 = u32::MAX;

impl CqEntry {
    const BLANK: CqEntry = CqEntry {
        offset: 0,
        size: BLANK_SIZE,
        tag_hash: 0,
    };

    /// Whether this entry stands for a message deleted before the queue was built.
    pub fn is_blank(&self) -> bool {
        self.size == BLANK_SIZE
    }
}

/// Where one entry of a consume queue is written: its index and the file
/// holding it (from [`ConsumeQueue::ensure`]).
pub struct CqSlot {
    file: Arc<CqFile>,
    index: u64,
}

impl CqSlot {
    /// The entry's index in its queue.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Writes the entry (store append or commit lock held). Writing the
    /// same entry twice with the same contents is harmless, which recovery
    /// relies on.
    pub fn put(&self, e: CqEntry) {
        let pos = (self.index - self.file.base) * ENTRY_LEN;
        // SAFETY: the append lock makes us the only writer; readers only read
        // entries below `published`, which this entry is not (or, during
        // recovery, nobody reads). `ensure` checked the index is in the file.
        let dst = unsafe { self.file.file.slice_mut(pos, ENTRY_LEN as usize) };
        dst[0..8].copy_from_slice(&e.offset.to_le_bytes());
        dst[8..12].copy_from_slice(&e.size.to_le_bytes());
        dst[12..20].copy_from_slice(&e.tag_hash.to_le_bytes());
    }
}

struct CqFile {
    /// Index of the first entry in this file.
    base: u64,
    file: MappedFile,
}

/// Entries this close to the end of a queue stay mapped (see
/// [`ConsumeQueue::release_behind`]): 64 KiB of them.
const KEEP_MAPPED_ENTRIES: u64 = (64 << 10) / ENTRY_LEN;

/// The writer's pages are released once this many more entries (1 MiB) are
/// behind the kept ones.
const RELEASE_STEP_ENTRIES: u64 = (1 << 20) / ENTRY_LEN;

const PAGE: u64 = 4096;

/// The consume queue of one topic-queue.
pub struct ConsumeQueue {
    dir: PathBuf,
    entries_per_file: u64,
    files: RwLock<Vec<Arc<CqFile>>>,
    /// Entries below this index are visible to readers.
    published: AtomicU64,
    /// Next index to hand out; only touched under the store's append lock.
    reserved: AtomicU64,
    /// Entries below this index are durable.
    flushed: AtomicU64,
    /// The writer's pages below this entry are released.
    released: AtomicU64,
}

/// File holding the next entry index of a retired queue.
const RETIRED: &str = "retired";

impl ConsumeQueue {
    /// Opens (or creates) the queue stored in `dir`.
    pub fn open(dir: &Path, entries_per_file: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        remove_temp_files(dir)?;
        let file_len = entries_per_file * ENTRY_LEN;
        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(base) = parse_base_name(name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let mut files = Vec::with_capacity(bases.len());
        for base in bases {
            if !base.is_multiple_of(entries_per_file) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "consume queue file {base} in {} does not match {entries_per_file} entries per file",
                        dir.display()
                    ),
                ));
            }
            let file = MappedFile::open(&dir.join(base_name(base)), file_len)?;
            files.push(Arc::new(CqFile { base, file }));
        }
        let next = match files.last() {
            None => 0,
            Some(last) => last.base + written_entries(&last.file, entries_per_file),
        };
        // A retired queue (no file) keeps its length.
        let next = match files.last() {
            Some(_) => next,
            None => match std::fs::read_to_string(dir.join(RETIRED)) {
                Ok(s) => s.trim().parse::<u64>().map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", dir.join(RETIRED).display()),
                    )
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            },
        };
        let first = files.first().map_or(next, |f| f.base);
        Ok(Self {
            dir: dir.to_owned(),
            entries_per_file,
            files: RwLock::new(files),
            // Entries in the page cache when a killed process left them
            // count as written, not as durable: see `assume_flushed_below`.
            flushed: AtomicU64::new(first),
            published: AtomicU64::new(next),
            reserved: AtomicU64::new(next),
            released: AtomicU64::new(0),
        })
    }

    /// Whether the queue has any file (a retired one has none).
    pub fn holds_files(&self) -> bool {
        !self.files.read().is_empty()
    }

    /// Whether entries were handed out that are not published yet (records
    /// staged for the next group commit). Store append lock held.
    pub fn has_unpublished(&self) -> bool {
        self.reserved.load(Ordering::Relaxed) > self.max_index()
    }

    /// Deletes every file of the queue, keeping only its length in a small
    /// file (written first, so a crash in between leaves the queue as it
    /// was, or retired): for a queue whose topic is gone and whose entries
    /// all point into deleted segments. It reads as holding no entry; the
    /// next one written goes at its end, in a new file whose entries before
    /// it are blanks (see [`ConsumeQueue::start_at`]). Store append lock held.
    pub fn retire(&self) -> io::Result<()> {
        super::mapped::persist_atomically(
            &self.dir.join(RETIRED),
            self.max_index().to_string().as_bytes(),
        )?;
        let files: Vec<_> = self.files.write().drain(..).collect();
        for f in &files {
            std::fs::remove_file(f.file.path())?;
        }
        super::mapped::sync_dir(&self.dir)
    }

    /// Index one past the last visible entry.
    pub fn max_index(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Index of the first entry still on disk (older files are deleted).
    pub fn first_file_index(&self) -> u64 {
        self.files
            .read()
            .first()
            .map_or_else(|| self.max_index(), |f| f.base)
    }

    /// Hands out the next index (store append lock held).
    pub fn reserve(&self) -> u64 {
        self.reserved.fetch_add(1, Ordering::Relaxed)
    }

    /// Gives back reservations that were not written (store append lock held).
    pub fn unreserve_to(&self, next: u64) {
        self.reserved.store(next, Ordering::Relaxed);
    }

    /// Makes sure the file for entry `index` exists and returns where the
    /// entry goes, so that writing it later ([`CqSlot::put`])
    /// cannot fail and needs no second look-up.
    pub fn ensure(&self, index: u64) -> io::Result<CqSlot> {
        Ok(CqSlot {
            file: self.file_for_write(index)?,
            index,
        })
    }

    /// Makes entries below `next` visible (store append lock held).
    pub fn publish(&self, next: u64) {
        self.published.fetch_max(next, Ordering::AcqRel);
        self.reserved.fetch_max(next, Ordering::Relaxed);
    }

    /// Entry `index`, if it is visible, still on disk and not a blank.
    pub fn get(&self, index: u64) -> Option<CqEntry> {
        self.get_stored(index)
            .filter(|e| e.size != 0 && !e.is_blank())
    }

    /// Whether the queue has never held an entry (no file, nothing published).
    pub fn is_new(&self) -> bool {
        self.max_index() == 0 && self.files.read().is_empty()
    }

    /// Starts a new queue at entry `first`: its earlier entries belonged to
    /// commit-log segments deleted before this queue was built (a consume
    /// queue rebuilt after retention, or a slave that began its log at its
    /// master's oldest segment). The entries before `first` in its file are
    /// written as blanks, so the file reads as written up to `first` when
    /// opened again, and readers start at `first`
    /// ([`ConsumeQueue::min_index`]). Store append lock held, or recovery.
    pub fn start_at(&self, first: u64) -> io::Result<()> {
        if !self.is_new() {
            return Err(io::Error::other(format!(
                "consume queue {} already holds entries; it cannot start at {first}",
                self.dir.display()
            )));
        }
        if first == 0 {
            return Ok(());
        }
        // A queue of that length with no file, as a retired one is: its
        // first file is written with blanks up to its end when created.
        self.publish(first);
        self.file_for_write(first).map(|_| ())
    }

    /// Entry `index` as stored, zeros included (a visible entry that reads
    /// as never written is damaged), if it is visible and still on disk.
    pub fn get_stored(&self, index: u64) -> Option<CqEntry> {
        let files = self.files.read();
        let f = self.file_of(&files, index)?;
        // SAFETY: the entry is below `published`, so it is fully written.
        let b = unsafe {
            f.file
                .slice((index - f.base) * ENTRY_LEN, ENTRY_LEN as usize)
        };
        Some(decode_entry(b))
    }

    /// Where visible entry `index` is stored, if its file is still on disk
    /// (to rewrite a damaged entry with [`CqSlot::put`]).
    pub fn slot(&self, index: u64) -> Option<CqSlot> {
        let files = self.files.read();
        self.file_of(&files, index).map(|f| CqSlot {
            file: f.clone(),
            index,
        })
    }

    /// The file of `files` holding visible entry `index`.
    fn file_of<'a>(&self, files: &'a [Arc<CqFile>], index: u64) -> Option<&'a Arc<CqFile>> {
        if index >= self.max_index() {
            return None;
        }
        let i = files.partition_point(|f| f.base <= index).checked_sub(1)?;
        let f = &files[i];
        (index < f.base + self.entries_per_file).then_some(f)
    }

    /// Unmaps, from the process, pages of this queue's files more than
    /// [`KEEP_MAPPED_ENTRIES`] behind its end: those the writer filled (once
    /// a step's worth is behind) and those readers mapped since the last
    /// call. The entries stay in the files and their page cache (see
    /// [`MappedFile::release_range`]).
    pub fn release_behind(&self) {
        let upto = self.max_index().saturating_sub(KEEP_MAPPED_ENTRIES);
        let from = self.released.load(Ordering::Acquire);
        let advance = upto >= from + RELEASE_STEP_ENTRIES;
        if advance {
            self.released.store(upto, Ordering::Release);
        }
        // Without a step's worth, only pages readers mapped go.
        let from = if advance { from } else { upto };
        let files: Vec<Arc<CqFile>> = self.files.read().clone();
        for f in files {
            // Byte offsets in the file, in whole pages (rounding down keeps
            // a partly kept page).
            let byte = |index: u64| {
                (index.clamp(f.base, f.base + self.entries_per_file) - f.base) * ENTRY_LEN / PAGE
                    * PAGE
            };
            f.file.release_behind(byte(from), byte(upto));
        }
    }

    /// Takes the entries of records below commit-log offset `clog_offset`
    /// as durable (a checkpoint said so), so that the next
    /// [`ConsumeQueue::flush`] starts after them. Recovery only.
    pub fn assume_flushed_below(&self, clog_offset: u64) {
        self.flushed
            .store(self.min_index(clog_offset), Ordering::Release);
    }

    /// Makes every written entry durable.
    pub fn flush(&self) -> io::Result<()> {
        let upto = self.max_index();
        let from = self.flushed.load(Ordering::Acquire);
        if upto <= from {
            return Ok(());
        }
        let files: Vec<_> = self.files.read().clone();
        for f in files {
            let end = f.base + self.entries_per_file;
            if end <= from || f.base >= upto {
                continue;
            }
            let a = from.max(f.base) - f.base;
            let b = upto.min(end) - f.base;
            f.file.flush_range(a * ENTRY_LEN, b * ENTRY_LEN)?;
        }
        self.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Drops every entry that points at or past `clog_end` (used after the
    /// commit log was cut). Returns the new entry count.
    ///
    /// The end is found walking back from the last entry written, dropping
    /// entries that read as zeros or point at or past `clog_end`, up to the
    /// first one that points before it: a damaged (zeroed) entry amid sound
    /// ones is kept (it is rewritten when read), never taken for the end.
    /// This looks at the entries past the end only, usually none.
    pub fn truncate_to_log_end(&self, clog_end: u64) -> io::Result<u64> {
        let first = self.first_file_index();
        let mut keep = self.reserved.load(Ordering::Relaxed).max(self.max_index());
        while keep > first {
            match self.raw_entry(keep - 1) {
                Some(e) if e.is_blank() || (e.size != 0 && e.offset < clog_end) => break,
                _ => keep -= 1,
            }
        }
        // The in-memory state changes first, so that a failure below never
        // leaves the queue without the files its entries are in.
        let (straddling, doomed) = {
            let mut files = self.files.write();
            let first_base = files.first().map(|f| f.base);
            let (kept, doomed): (Vec<_>, Vec<_>) = files
                .drain(..)
                .partition(|f| f.base < keep || Some(f.base) == first_base);
            *files = kept;
            let straddling = files
                .last()
                .filter(|f| f.base + self.entries_per_file > keep)
                .cloned();
            (straddling, doomed)
        };
        self.published.store(keep, Ordering::Release);
        self.reserved.store(keep, Ordering::Relaxed);
        self.flushed.fetch_min(keep, Ordering::AcqRel);
        if let Some(f) = straddling {
            f.file.zero_from((keep.max(f.base) - f.base) * ENTRY_LEN)?;
        }
        // Newest first: a crash in between leaves a queue that ends earlier,
        // never one with a hole.
        for f in doomed.iter().rev() {
            std::fs::remove_file(f.file.path())?;
        }
        Ok(keep)
    }

    /// Deletes whole files whose entries all point below `clog_min`.
    /// The file holding the newest entry is kept, and so is any file with
    /// an entry not yet published: a [`CqSlot`] handed out for it (a record
    /// staged for the next group commit) writes there later.
    pub fn delete_before(&self, clog_min: u64) -> io::Result<usize> {
        let mut doomed = Vec::new();
        {
            let files = self.files.read();
            for (i, f) in files.iter().enumerate() {
                if i + 1 == files.len() || f.base + self.entries_per_file > self.max_index() {
                    break;
                }
                let last =
                    (f.base + self.entries_per_file - 1).min(self.max_index().saturating_sub(1));
                match self.raw_entry(last) {
                    Some(e) if e.size != 0 && e.offset < clog_min => doomed.push(f.base),
                    _ => break,
                }
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.files.write().retain(|f| !doomed.contains(&f.base));
        for base in &doomed {
            std::fs::remove_file(self.dir.join(base_name(*base)))?;
        }
        Ok(doomed.len())
    }

    /// First index whose entry points at or past `clog_min`: the first
    /// message of the queue still readable. A damaged (zeroed) entry is
    /// judged by the nearest sound entry after it.
    pub fn min_index(&self, clog_min: u64) -> u64 {
        let mut lo = self.first_file_index();
        let mut hi = self.max_index();
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let sound = (mid..hi)
                .map(|i| (i, self.get_stored(i)))
                .find(|(_, e)| e.is_none_or(|e| e.size != 0));
            match sound {
                Some((i, Some(e))) if e.is_blank() || e.offset < clog_min => lo = i + 1,
                _ => hi = mid,
            }
        }
        lo
    }

    /// Bytes flushed from this queue's files since they were opened.
    #[cfg(test)]
    pub fn flushed_bytes(&self) -> u64 {
        self.files
            .read()
            .iter()
            .map(|f| f.file.flushed_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Raw bytes of all files (for comparing rebuilt queues in tests and tools).
    pub fn snapshot(&self) -> Vec<u8> {
        let n = self.max_index();
        let mut out = Vec::new();
        for i in self.first_file_index()..n {
            if let Some(e) = self.get(i) {
                out.extend_from_slice(&e.offset.to_le_bytes());
                out.extend_from_slice(&e.size.to_le_bytes());
                out.extend_from_slice(&e.tag_hash.to_le_bytes());
            }
        }
        out
    }

    /// An entry regardless of publication (recovery and truncation only).
    fn raw_entry(&self, index: u64) -> Option<CqEntry> {
        let files = self.files.read();
        let i = files.partition_point(|f| f.base <= index).checked_sub(1)?;
        let f = &files[i];
        if index >= f.base + self.entries_per_file {
            return None;
        }
        // SAFETY: only used while the append lock is held or before the
        // store is shared, so nothing writes concurrently.
        let b = unsafe {
            f.file
                .slice((index - f.base) * ENTRY_LEN, ENTRY_LEN as usize)
        };
        Some(decode_entry(b))
    }

    fn file_for_write(&self, index: u64) -> io::Result<Arc<CqFile>> {
        {
            let files = self.files.read();
            if let Some(i) = files.partition_point(|f| f.base <= index).checked_sub(1) {
                let f = &files[i];
                if index < f.base + self.entries_per_file {
                    return Ok(f.clone());
                }
            }
        }
        let base = index - index % self.entries_per_file;
        let file = MappedFile::create(
            &self.dir.join(base_name(base)),
            self.entries_per_file * ENTRY_LEN,
        )?;
        let f = Arc::new(CqFile { base, file });
        let mut files = self.files.write();
        // The first file of a retired queue: the entries before its end
        // are blanks, so the file reads as written up to there when opened
        // again, and they are flushed with the next entries.
        let end = self.max_index().min(base + self.entries_per_file);
        if files.is_empty() && end > base {
            for i in base..end {
                CqSlot {
                    file: f.clone(),
                    index: i,
                }
                .put(CqEntry::BLANK);
            }
            self.flushed.fetch_min(base, Ordering::AcqRel);
        }
        let at = files.partition_point(|x| x.base < base);
        files.insert(at, f.clone());
        Ok(f)
    }
}

fn decode_entry(b: &[u8]) -> CqEntry {
    CqEntry {
        offset: le_u64(b, 0),
        size: le_u32(b, 8),
        tag_hash: le_u64(b, 12),
    }
}

/// Number of written entries at the start of a file: written entries are a
/// prefix, so a binary search on "size is not zero" finds the end, checked
/// against entries just past it that were written all the same (damage).
fn written_entries(file: &MappedFile, entries_per_file: u64) -> u64 {
    // SAFETY: in bounds; the queue is not shared yet while opening.
    let written = |i: u64| le_u32(unsafe { file.slice(i * ENTRY_LEN, ENTRY_LEN as usize) }, 8) != 0;
    let mut lo = 0;
    loop {
        let mut hi = entries_per_file;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if written(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        // Entries reading as zeros amid written ones (damage, rewritten
        // when read) would end the queue early, and the next appends would
        // overwrite the entries after them: look a little further.
        let past = (lo + 1..(lo + LOOK_PAST_ENTRIES).min(entries_per_file)).find(|&i| written(i));
        match past {
            Some(i) => lo = i + 1,
            None => return lo,
        }
    }
}

/// How far past the first entry that reads as never written the end of a
/// queue file is looked for at open: 1024 entries (five pages).
const LOOK_PAST_ENTRIES: u64 = 1024;

/// File name for a file whose first entry is `base`.
pub fn base_name(base: u64) -> String {
    format!("{base:020}")
}

/// Parses a 20-digit file name.
pub fn parse_base_name(name: &str) -> Option<u64> {
    (name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> CqEntry {
        CqEntry {
            offset: 1000 + i * 100,
            size: 100,
            tag_hash: i,
        }
    }

    /// Reserves, writes and publishes the next entry (`entry(i)`); returns
    /// its index.
    fn append(q: &ConsumeQueue, i: u64) -> u64 {
        let idx = q.reserve();
        q.ensure(idx).expect("ensure").put(entry(i));
        q.publish(idx + 1);
        idx
    }

    #[test]
    fn entries_span_files_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = ConsumeQueue::open(dir.path(), 4).expect("open");
        for i in 0..10 {
            assert_eq!(append(&q, i), i);
        }
        assert_eq!(q.get(9), Some(entry(9)));
        assert_eq!(q.get(10), None);
        q.flush().expect("flush");
        drop(q);
        let q = ConsumeQueue::open(dir.path(), 4).expect("reopen");
        assert_eq!(q.max_index(), 10);
        assert_eq!(q.get(5), Some(entry(5)));
        assert_eq!(q.min_index(1000 + 3 * 100), 3);
        assert_eq!(q.truncate_to_log_end(1000 + 6 * 100).expect("truncate"), 6);
        assert_eq!(q.get(6), None);
        assert_eq!(
            q.delete_before(1000 + 5 * 100).expect("delete"),
            1,
            "only file 0..4 is wholly older"
        );
        assert_eq!(q.first_file_index(), 4);
        drop(q);
        let q = ConsumeQueue::open(dir.path(), 4).expect("reopen");
        assert_eq!(q.max_index(), 6);
        assert_eq!(q.get(3), None);
        assert_eq!(q.get(4), Some(entry(4)));
    }

    /// A damaged (zeroed) entry must not move a search for the first
    /// readable entry, or for the end of the queue after a cut.
    #[test]
    fn zeroed_entries_do_not_mislead_the_searches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = ConsumeQueue::open(dir.path(), 16).expect("open");
        for i in 0..40 {
            append(&q, i);
        }
        let zero = CqEntry {
            offset: 0,
            size: 0,
            tag_hash: 0,
        };
        // 20 and 10 are the first points a binary search over [0, 40) looks at.
        for i in [20, 10] {
            q.slot(i).expect("slot").put(zero);
        }
        assert_eq!(q.min_index(entry(30).offset), 30);
        assert_eq!(q.min_index(entry(5).offset), 5);
        assert_eq!(q.min_index(entry(15).offset), 15);
        assert_eq!(q.min_index(0), 0);
        assert_eq!(q.min_index(u64::MAX), 40);
        assert_eq!(q.truncate_to_log_end(entry(35).offset).expect("cut"), 35);
        assert_eq!(q.get(34), Some(entry(34)));
        assert_eq!(q.get_stored(20), Some(zero), "damage before the cut stays");
        drop(q);
        let q = ConsumeQueue::open(dir.path(), 16).expect("reopen");
        assert_eq!(q.max_index(), 35);
    }

    /// Entries reserved for records staged for the next group commit are
    /// written through the slots `ensure` returned; retention running in
    /// between must not delete the file those slots point into, even when
    /// every published entry of it is old and a newer file exists.
    #[test]
    fn retention_keeps_files_with_entries_still_to_be_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = ConsumeQueue::open(dir.path(), 4).expect("open");
        for i in 0..2 {
            append(&q, i);
        }
        // Entries 2-5 are reserved (2 and 3 in file 0, 4 and 5 in file 4)
        // but not yet written.
        let slots: Vec<_> = (2..6)
            .map(|_| q.ensure(q.reserve()).expect("ensure"))
            .collect();
        assert_eq!(
            q.delete_before(u64::MAX).expect("delete"),
            0,
            "file 0 still has entries to write"
        );
        for (slot, i) in slots.iter().zip(2..) {
            slot.put(entry(i));
        }
        q.publish(6);
        q.flush().expect("flush");
        drop(slots);
        drop(q);
        let q = ConsumeQueue::open(dir.path(), 4).expect("reopen");
        assert_eq!(q.max_index(), 6);
        for i in 0..6 {
            assert_eq!(q.get(i), Some(entry(i)), "entry {i}");
        }
        // Once everything in it is published, file 0 may go.
        assert_eq!(q.delete_before(u64::MAX).expect("delete"), 1);
        assert_eq!(q.first_file_index(), 4);
    }
}
