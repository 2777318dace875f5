//! A fixed-size file mapped into memory: the building block of commit-log
//! segments and consume-queue files.
//!
//! One writer appends below the file's end under the owner's lock and then
//! publishes how far it wrote; readers only look below what was published.
//! Those two rules are what make the raw-pointer accesses below sound.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// A preallocated, memory-mapped file of fixed size.
pub struct MappedFile {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    len: u64,
    /// Read through [`MappedFile::slice`] since the last
    /// [`MappedFile::release_behind`].
    read: AtomicBool,
    /// Bytes flushed through [`MappedFile::flush_range`] (tests check what
    /// was made durable).
    #[cfg(test)]
    pub flushed_bytes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl MappedFile {
    /// Creates a new file of `len` bytes with its blocks reserved up front
    /// (so writes through the mapping can never hit a full disk), then maps
    /// it. The file is prepared under a temporary name and renamed into
    /// place, so a crash never leaves a half-created file under the real
    /// name (the temporary one is removed by [`remove_temp_files`]).
    pub fn create(path: &Path, len: u64) -> io::Result<Self> {
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        let tmp = path.with_file_name(format!(".{name}{TEMP_SUFFIX}"));
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        if let Err(e) = reserve(&file, len).and_then(|()| std::fs::rename(&tmp, path)) {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Self::map(path.to_owned(), file, len)
    }

    /// Maps an existing file, which must be exactly `len` bytes long.
    pub fn open(path: &Path, len: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let actual = file.metadata()?.len();
        if actual != len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {actual} bytes long, expected {len}", path.display()),
            ));
        }
        Self::map(path.to_owned(), file, len)
    }

    fn map(path: PathBuf, file: File, len: u64) -> io::Result<Self> {
        let map = MmapOptions::new().len(len as usize).map_raw(&file)?;
        Ok(Self {
            path,
            file,
            map,
            len,
            read: AtomicBool::new(false),
            #[cfg(test)]
            flushed_bytes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// A view of `[pos, pos + len)`.
    ///
    /// # Safety
    /// The range must be inside the file and must not be written while the
    /// returned slice lives (callers only read what has been published).
    pub unsafe fn slice(&self, pos: u64, len: usize) -> &[u8] {
        debug_assert!(pos + len as u64 <= self.len);
        if !self.read.load(Ordering::Relaxed) {
            self.read.store(true, Ordering::Relaxed);
        }
        // SAFETY: in bounds (checked by the caller), and the caller
        // guarantees that no writer touches the range meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(pos as usize), len) }
    }

    /// A mutable view of `[pos, pos + len)`.
    ///
    /// # Safety
    /// The range must be inside the file, and the caller must be the only
    /// writer and no reader may look at the range until it is published.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, pos: u64, len: usize) -> &mut [u8] {
        debug_assert!(pos + len as u64 <= self.len);
        // SAFETY: as documented above.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(pos as usize), len) }
    }

    /// Writes `bytes` at `pos` through the file (a positional write; the
    /// mapping sees them, as it shares the page cache).
    pub fn write_at(&self, pos: u64, bytes: &[u8]) -> io::Result<()> {
        debug_assert!(pos + bytes.len() as u64 <= self.len);
        self.file.write_all_at(bytes, pos)
    }

    /// Writes `bytes` at `pos` through the file and, in the same system
    /// call, zeros from there to `pad_to` (at most a page and 8 bytes on).
    /// Every page the write touches is then either written whole or was
    /// written before, so the kernel never reads one from the disk first:
    /// a page of a reused file that is no longer cached would otherwise be
    /// read before a partial overwrite. The zeros also end the records
    /// written: what follows them is no longer the file's old contents.
    pub fn write_at_padded(&self, pos: u64, bytes: &[u8], pad_to: u64) -> io::Result<()> {
        static PAD: [u8; 2 * PAGE as usize] = [0; 2 * PAGE as usize];
        let end = pos + bytes.len() as u64;
        let pad = pad_to.min(self.len).saturating_sub(end) as usize;
        if pad == 0 || pad > PAD.len() {
            return self.write_at(pos, bytes);
        }
        let (mut data, mut zeros, mut at) = (bytes, &PAD[..pad], pos);
        while !data.is_empty() || !zeros.is_empty() {
            let iov = [
                libc::iovec {
                    iov_base: data.as_ptr() as *mut libc::c_void,
                    iov_len: data.len(),
                },
                libc::iovec {
                    iov_base: zeros.as_ptr() as *mut libc::c_void,
                    iov_len: zeros.len(),
                },
            ];
            let (iov, cnt) = if data.is_empty() {
                (&iov[1..], 1)
            } else {
                (&iov[..], 2)
            };
            // SAFETY: the iovecs point into live slices of the given lengths
            // and the descriptor is ours; the kernel only reads them.
            let n = unsafe {
                libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), cnt, at as libc::off_t)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file took no bytes",
                ));
            }
            let mut n = n as usize;
            at += n as u64;
            let d = n.min(data.len());
            data = &data[d..];
            n -= d;
            zeros = &zeros[n.min(zeros.len())..];
        }
        Ok(())
    }

    /// Makes this file, whose old contents are of no further use and which
    /// now has the name `now_at`, ready to be a new segment at `path`:
    /// zeros over its first page and over its last segment filler (at
    /// `filler_at`) and everything after it, made durable, then the rename,
    /// made durable.
    ///
    /// Its other blocks keep what they hold: records of another offset
    /// range, which nothing takes for this one's, as every record carries
    /// its own offset. A filler carries none, so the old ones must go:
    /// records of the file's last life lie contiguously before its filler,
    /// so any older filler that was not overwritten lies after it, in the
    /// range zeroed here (usually a few KiB). Fails if `path` exists.
    pub fn reuse_as(mut self, now_at: &Path, filler_at: u64, path: &Path) -> io::Result<Self> {
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        if filler_at >= self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: where its filler starts is not known", now_at.display()),
            ));
        }
        let first = PAGE.min(self.len) as usize;
        self.write_at(0, &[0u8; PAGE as usize][..first])?;
        self.write_zeros_to(filler_at.max(first as u64), self.len)?;
        self.file.sync_data()?;
        std::fs::rename(now_at, path)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        self.path = path.to_owned();
        self.read.store(false, Ordering::Relaxed);
        Ok(self)
    }

    /// Writes zeros over `[from, from + len)` through the file and starts
    /// writing them to the disk without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, best effort). Blocks a
    /// filesystem has only reserved (as `fallocate` leaves them) become
    /// written blocks, so later writes there are overwrites that an
    /// fdatasync does not have to record in the file's metadata.
    pub fn write_zeros(&self, from: u64, len: u64) -> io::Result<()> {
        let end = (from + len).min(self.len);
        self.write_zeros_to(from, end)?;
        if end > from {
            // SAFETY: plain syscall on a descriptor we own.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from as libc::off64_t,
                    (end - from) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        Ok(())
    }

    /// Makes `[from, to)` durable (msync, which on Linux is an fdatasync of
    /// the range).
    pub fn flush_range(&self, from: u64, to: u64) -> io::Result<()> {
        if to > from {
            self.map.flush_range(from as usize, (to - from) as usize)?;
            #[cfg(test)]
            self.flushed_bytes.fetch_add(to - from, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sets `[from, len)` to zeros and makes that durable. Used to cut a
    /// torn or divergent tail; the caller holds the writer's lock.
    pub fn zero_from(&self, from: u64) -> io::Result<()> {
        if from >= self.len {
            return Ok(());
        }
        // Zero through the file so untouched pages are not faulted in; fall
        // back to writing zeros where the filesystem cannot zero a range.
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                (self.len - from) as libc::off_t,
            )
        };
        if rc != 0 {
            self.write_zeros_to(from, self.len)?;
        }
        self.file.sync_data()?;
        Ok(())
    }

    /// Writes zeros over `[from, end)` through the file.
    fn write_zeros_to(&self, from: u64, end: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut pos = from;
        while pos < end {
            let n = ((end - pos) as usize).min(ZEROS.len());
            self.file.write_all_at(&ZEROS[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Maps the pages of `[from, from + len)` (clamped to the file) writable
    /// now, ahead of the writes, so that appends do not take page faults
    /// (best effort: ignored where unsupported). `from` must be a multiple of
    /// the page size.
    ///
    /// The kernel holds the process's memory-map lock for reading during
    /// each call, and anything that changes the process's mappings (the
    /// allocator growing or trimming a heap, a new thread's stack) waits for
    /// it, and every page fault of every thread then waits behind that.
    /// Populating a 64 MiB step in one call stalled the whole broker for
    /// tens of milliseconds at a time (seen with `perf` as request threads
    /// blocked in `mprotect`); small calls keep each hold short.
    pub fn populate_write_range(&self, from: u64, len: u64) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        // Unsupported (older kernel) or out of memory: the writer's own
        // faults do the rest.
        self.advise(from, len, 512 << 10, MADV_POPULATE_WRITE);
    }

    /// Unmaps from this process the pages of `[from, to)`, or of `[0, to)`
    /// when the file was read through [`MappedFile::slice`] since the last
    /// call (readers may have mapped pages anywhere below). Owners call it
    /// with `from` where their last call stopped, so pages written through
    /// the mapping go as the end moves on. See [`MappedFile::release_range`].
    pub fn release_behind(&self, from: u64, to: u64) {
        let from = if self.read.swap(false, Ordering::Relaxed) {
            0
        } else {
            from
        };
        if from < to {
            self.release_range(from, to - from);
        }
    }

    /// Unmaps the pages of `[from, from + len)` (clamped to the file) from
    /// this process without touching the file's data: `MADV_DONTNEED` on a
    /// shared file mapping drops only the page-table entries (a dirty page
    /// stays dirty in the page cache and is written back as usual), and a
    /// later access maps the same page-cache page again. The pages then no
    /// longer count in the process's resident size and age in the page
    /// cache like any file's. Best effort; `from` must be a multiple of the
    /// page size. Small calls, for the memory-map lock's sake (see
    /// [`MappedFile::populate_write_range`]).
    fn release_range(&self, from: u64, len: u64) {
        self.advise(from, len, 2 << 20, libc::MADV_DONTNEED);
    }

    /// `madvise(advice)` on `[from, from + len)` clamped to the file, in
    /// calls of at most `chunk` bytes; stops at the first failure.
    fn advise(&self, from: u64, len: u64, chunk: u64, advice: libc::c_int) {
        let end = from.saturating_add(len).min(self.len);
        let mut pos = from;
        while pos < end {
            let n = chunk.min(end - pos);
            // SAFETY: advice on a range inside our own shared file mapping
            // (clamped above); neither advice used here changes a byte
            // anyone can read, and a failure is harmless.
            let rc = unsafe {
                libc::madvise(
                    self.map.as_mut_ptr().add(pos as usize).cast(),
                    n as usize,
                    advice,
                )
            };
            if rc != 0 {
                return;
            }
            pos += n;
        }
    }

    /// Reads through the file rather than the mapping (so scanning does not
    /// fault pages into the mapping).
    pub fn pread(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.file.read_at(buf, pos)
    }

    /// The ranges at or after `from` that may hold data, skipping what the
    /// filesystem knows holds none (holes, and on most filesystems blocks
    /// only reserved and never written): `lseek` with `SEEK_DATA` and
    /// `SEEK_HOLE`. Where the filesystem cannot tell, all of `[from, len)`.
    /// Pages in the page cache count as data, so a caller asks before it
    /// reads (its reads bring in pages ahead of them).
    pub fn data_ranges(&self, from: u64) -> Vec<(u64, u64)> {
        let fd = self.file.as_raw_fd();
        let seek = |pos: u64, whence| {
            // SAFETY: plain syscall on a descriptor we own.
            let rc = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
            if rc >= 0 {
                Ok((rc as u64).min(self.len))
            } else {
                Err(io::Error::last_os_error().raw_os_error())
            }
        };
        let mut ranges = Vec::new();
        let mut pos = from;
        while pos < self.len {
            let start = match seek(pos, libc::SEEK_DATA) {
                Ok(at) => at,
                Err(Some(libc::ENXIO)) => break,
                Err(_) => return vec![(from, self.len)],
            };
            let end = match seek(start, libc::SEEK_HOLE) {
                Ok(at) => at,
                Err(_) => self.len,
            };
            if end <= start {
                break;
            }
            ranges.push((start, end));
            pos = end;
        }
        ranges
    }
}

/// How much [`holds_only_zeros`] reads at a time: a buffer on the stack
/// (no allocation per call, and far below any thread's stack), large
/// enough that a segment written with zeros takes few reads.
const ZERO_CHECK_CHUNK: usize = 64 << 10;

/// Whether the file at `path` holds nothing but zeros. Only what the
/// filesystem reports as data is read (`SEEK_DATA`/`SEEK_HOLE`; all of it
/// where it cannot tell), so a reserved, never written file costs nothing.
pub fn holds_only_zeros(path: &Path) -> io::Result<bool> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence| {
        // SAFETY: plain syscall on a descriptor we own.
        let rc = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if rc >= 0 {
            Ok((rc as u64).min(len))
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let mut buf = [0u8; ZERO_CHECK_CHUNK];
    let mut pos = 0;
    while pos < len {
        let start = match seek(pos, libc::SEEK_DATA) {
            Ok(at) => at,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(_) => pos,
        };
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(len);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let got = file.read_at(&mut buf[..n], at)?;
            if got == 0 {
                return Ok(true);
            }
            if buf[..got].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            at += got as u64;
        }
        if end <= start {
            break;
        }
        pos = end;
    }
    Ok(true)
}

/// The page size writes are padded to (see [`MappedFile::write_at_padded`]).
pub const PAGE: u64 = 4096;

/// Suffix of files being created.
const TEMP_SUFFIX: &str = ".creating";

/// Suffix of files kept for reuse (see `CommitLog::delete_oldest_while`).
pub const SPARE_SUFFIX: &str = ".spare";

/// Removes files left half-created by a crash in `dir`, and files kept
/// for reuse (a restart starts without them).
pub fn remove_temp_files(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(TEMP_SUFFIX) || n.ends_with(SPARE_SUFFIX))
        {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Reserves `len` bytes of disk for `file`.
fn reserve(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        libc::EOPNOTSUPP | libc::EINVAL => file.set_len(len),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Writes `bytes` to `path` so that after a crash the file holds either the
/// old or the new contents: temp file, fsync, rename, fsync of the directory.
pub fn persist_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_ranges_cover_every_written_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 8 << 20;
        let m = MappedFile::create(&dir.path().join("f"), len).expect("create");
        let written = [
            (5 << 20, 3),
            ((3 << 20) + 4095, 2),
            ((1 << 20) + 17, 100),
            (len - 4, 4),
        ];
        for (at, n) in written {
            m.write_at(at, &vec![0xab; n]).expect("write");
        }
        m.flush_range(0, len).expect("flush");
        for from in [0, 1 << 20, (1 << 20) + 50, 6 << 20] {
            let ranges = m.data_ranges(from);
            for &(at, n) in &written {
                for b in at..at + n as u64 {
                    assert!(
                        b < from || ranges.iter().any(|&(s, e)| s <= b && b < e),
                        "byte {b} written but not in {ranges:?} (from {from})"
                    );
                }
            }
            assert!(ranges.iter().all(|&(s, e)| from <= s && s < e && e <= len));
        }
    }

    #[test]
    fn create_write_flush_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let m = MappedFile::create(&p, 8192).expect("create");
        // SAFETY: single-threaded test, in bounds.
        unsafe { m.slice_mut(100, 5) }.copy_from_slice(b"hello");
        m.flush_range(0, 105).expect("flush");
        drop(m);
        let m = MappedFile::open(&p, 8192).expect("open");
        // SAFETY: as above.
        assert_eq!(unsafe { m.slice(100, 5) }, b"hello");
        m.zero_from(102).expect("zero");
        // SAFETY: as above.
        assert_eq!(unsafe { m.slice(100, 5) }, b"he\0\0\0");
        assert!(MappedFile::open(&p, 4096).is_err(), "wrong size is refused");
        assert!(MappedFile::create(&p, 8192).is_err(), "never overwrites");
        // A crash mid-creation leaves only a temporary file, which is cleaned.
        std::fs::write(dir.path().join(".00000000000000000007.creating"), b"").expect("write");
        remove_temp_files(dir.path()).expect("clean");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn persist_atomically_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub/meta.json");
        persist_atomically(&p, b"one").expect("first");
        persist_atomically(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("ls")
            .collect();
        assert_eq!(leftovers.len(), 1);
    }

    /// `holds_only_zeros` reads data of many times its buffer, written
    /// zeros, holes and all: zeros only is true, and a single other byte
    /// anywhere (in the first chunk, across a chunk boundary, after a hole,
    /// in the last byte) makes it false.
    #[test]
    fn holds_only_zeros_reads_every_data_byte() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 4 * ZERO_CHECK_CHUNK as u64 + 1000 + (1 << 20);
        let p = dir.path().join("f");
        let zeros = |p: &Path| {
            let f = File::create(p).expect("create");
            f.set_len(len).expect("size");
            // Written zeros over more than a few chunks, then a hole.
            f.write_all_at(&vec![0u8; 4 * ZERO_CHECK_CHUNK + 1000], 0)
                .expect("zeros");
            f
        };
        assert!(holds_only_zeros(&p).is_err(), "no file");
        File::create(&p).expect("empty");
        assert!(holds_only_zeros(&p).expect("empty"));
        drop(zeros(&p));
        assert!(holds_only_zeros(&p).expect("zeros"));
        for at in [
            0,
            ZERO_CHECK_CHUNK as u64 - 1,
            3 * ZERO_CHECK_CHUNK as u64 + 1,
            4 * ZERO_CHECK_CHUNK as u64 + 999,
            len - (1 << 19),
            len - 1,
        ] {
            std::fs::remove_file(&p).expect("remove");
            zeros(&p).write_all_at(&[7], at).expect("byte");
            assert!(!holds_only_zeros(&p).expect("read"), "a byte at {at}");
        }
    }
}
