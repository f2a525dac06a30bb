//! Large output files written straight to the disk.
//!
//! A staged output ([`AtomicFile`]) is flushed to the disk before it is renamed into place, so
//! every byte is written to the disk once whatever the path. Through the page cache, a large file
//! is first copied into freshly allocated cache pages, then written back by the flush; with direct
//! I/O (`O_DIRECT`) the blocks go from this writer's buffer to the device and the flush at the
//! commit has little left to do. On the 2-core development VM (docs/BENCHMARKS.md, session 14) a
//! GiB is written in ~0.5 s that way against 0.8–2.7 s through the cache.
//!
//! Direct I/O needs the buffer's address, each write's length and the file offset aligned to the
//! device's block; whole [`CHUNK`]s from an [`ALIGN`]ed buffer are, and the tail (less than one
//! chunk) is written through the page cache at the commit. A file system without direct I/O
//! (refused when it is switched on) or one that refuses a write with `EINVAL` gets the same bytes
//! through the page cache: the result is the same file either way.

use std::io::Write;

use zeroize::Zeroizing;

use crate::AtomicFile;

/// Direct writes are aligned to this many bytes (a multiple of every common block size).
pub const ALIGN: usize = 4096;
/// Bytes per direct write.
pub const CHUNK: usize = 4 << 20;
/// Outputs expected to be at least this large are written with direct I/O. Smaller ones stay in
/// the page cache, where the next reader (an upload, a rewrap, a decryption) finds them: a
/// thousand 10 MiB files written directly and re-wrapped right after took 11.8 s instead of
/// 8.1 s, read back from the disk (docs/BENCHMARKS.md, session 14). A larger file's copy in the
/// cache costs more than it saves, and pushes out what other programs had there.
pub const DIRECT_FROM: u64 = 64 << 20;

/// A staged output file written in large blocks, with direct I/O when it is expected to be large
/// and the file system allows it; [`OutputFile::commit`] writes the rest, flushes and renames it
/// into place. The buffer may hold plaintext (a decryption's output): it is zeroized when dropped.
pub struct OutputFile {
    staged: AtomicFile,
    buf: Zeroizing<Vec<u8>>,
    /// Where the aligned part of `buf` starts.
    start: usize,
    /// Bytes waiting in `buf[start..]`.
    filled: usize,
    direct: bool,
}

impl std::fmt::Debug for OutputFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputFile").field("staged", &self.staged).field("direct", &self.direct).finish_non_exhaustive()
    }
}

impl OutputFile {
    /// Writes `staged`, expected to receive about `expected` bytes: direct I/O from
    /// [`DIRECT_FROM`] on, the page cache below it (or when `expected` is unknown).
    pub fn new(staged: AtomicFile, expected: Option<u64>) -> Self {
        let large = expected.is_some_and(|n| n >= DIRECT_FROM);
        let direct = large && set_direct(staged.as_file(), true).is_ok();
        // Through the page cache, a buffer no larger than the file needs (it is zeroized, every
        // byte of it, when dropped: a thousand small files do not each touch a MiB).
        let capacity = match expected {
            _ if direct => CHUNK,
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX).clamp(64 << 10, 1 << 20),
            None => 1 << 20,
        };
        let buf = Zeroizing::new(vec![0u8; capacity + ALIGN]);
        // Safe pointer arithmetic: where in the buffer the first ALIGN-aligned address is.
        let start = buf.as_ptr().align_offset(ALIGN);
        Self { staged, buf, start, filled: 0, direct }
    }

    /// The buffer's usable size (it holds [`ALIGN`] bytes more, to start at an aligned address).
    fn capacity(&self) -> usize {
        self.buf.len() - ALIGN
    }

    /// Whether blocks still go to the device directly.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Writes what the buffer holds. In direct mode a write the kernel refuses as misaligned
    /// (`EINVAL`) switches to the page cache and is written again from where it stopped.
    fn write_buffer(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        while done < self.filled {
            let chunk = &self.buf[self.start + done..self.start + self.filled];
            match self.staged.as_file().write(chunk) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    // A short direct write leaves the file offset unaligned: the rest goes
                    // through the page cache.
                    if self.direct && done < self.filled {
                        set_direct(self.staged.as_file(), false)?;
                        self.direct = false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    set_direct(self.staged.as_file(), false)?;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        self.filled = 0;
        Ok(())
    }

    /// Writes the rest through the page cache, flushes the file to the disk and renames it onto
    /// its destination.
    pub fn commit(mut self) -> std::io::Result<()> {
        if self.direct {
            // The tail is not a whole block.
            set_direct(self.staged.as_file(), false)?;
            self.direct = false;
        }
        self.write_buffer()?;
        let Self { staged, .. } = self;
        staged.commit()
    }
}

impl Write for OutputFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let capacity = self.capacity();
        if self.filled == capacity {
            self.write_buffer()?;
        }
        let n = bytes.len().min(capacity - self.filled);
        let at = self.start + self.filled;
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        Ok(n)
    }

    /// Writes nothing: only whole buffers are written before the commit (a partial one would
    /// leave direct writes misaligned).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Pipe buffer asked for by [`widen_pipe`]: Linux's default limit for an unprivileged process
/// (`/proc/sys/fs/pipe-max-size`).
pub const PIPE_SIZE: usize = 1 << 20;

/// If `fd` is a pipe, asks for a buffer of [`PIPE_SIZE`] (or the largest half of it the system
/// allows) instead of Linux's 64 KiB: a stream written or read in MiB blocks then moves a block
/// per system call, instead of blocking sixteen times on the program at the other end
/// (docs/BENCHMARKS.md, session 15: `custody decrypt | cat` 2.5x faster). Best effort: not a pipe,
/// a pipe already as large, or a limit below 128 KiB leaves it as it is.
pub fn widen_pipe(fd: impl std::os::fd::AsFd) {
    #[cfg(target_os = "linux")]
    if let Some(now) = pipe_size(&fd) {
        let mut size = PIPE_SIZE;
        // EPERM above `pipe-max-size` or past the user's pipe budget; EBUSY if it holds more.
        while size > now && rustix::pipe::fcntl_setpipe_size(&fd, size).is_err() {
            size /= 2;
        }
    }
}

/// The buffer size of `fd` if it is a pipe.
pub fn pipe_size(fd: impl std::os::fd::AsFd) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{fstat, FileType};
        let st = fstat(&fd).ok()?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Fifo {
            return None;
        }
        rustix::pipe::fcntl_getpipe_size(&fd).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}

/// Switches direct I/O on or off for `file`.
#[cfg(target_os = "linux")]
fn set_direct(file: &std::fs::File, on: bool) -> std::io::Result<()> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    let flags = fcntl_getfl(file)?;
    let flags = if on { flags | OFlags::DIRECT } else { flags - OFlags::DIRECT };
    Ok(fcntl_setfl(file, flags)?)
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_: &std::fs::File, on: bool) -> std::io::Result<()> {
    if on {
        Err(std::io::ErrorKind::Unsupported.into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 4096) as u8).collect()
    }

    /// Writes `data` in pieces of the given sizes, in turn.
    fn write_in_pieces(out: &mut OutputFile, data: &[u8], pieces: &[usize]) {
        let mut at = 0;
        for size in pieces.iter().cycle() {
            if at == data.len() {
                break;
            }
            let end = (at + size).min(data.len());
            out.write_all(&data[at..end]).unwrap();
            at = end;
        }
    }

    /// Whether this directory's file system takes direct I/O at all.
    fn takes_direct_io(dir: &std::path::Path) -> bool {
        use rustix::fs::{open, Mode, OFlags};
        open(dir.join("probe"), OFlags::CREATE | OFlags::WRONLY | OFlags::DIRECT, Mode::from_raw_mode(0o600)).is_ok()
    }

    #[test]
    fn every_byte_lands_whatever_the_size_and_the_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let direct_here = takes_direct_io(dir.path());
        for (i, n) in [0, 1, ALIGN - 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + ALIGN + 5].into_iter().enumerate() {
            let data = bytes(n);
            for (j, pieces) in [&[7usize, 65_536 + 29][..], &[CHUNK + 3], &[1 << 20]].into_iter().enumerate() {
                let dest = dir.path().join(format!("out-{i}-{j}"));
                let mut out = OutputFile::new(AtomicFile::create(&dest, None).unwrap(), Some(DIRECT_FROM));
                assert_eq!(out.is_direct(), direct_here, "direct I/O is used where the file system takes it");
                write_in_pieces(&mut out, &data, pieces);
                assert_eq!(out.is_direct(), direct_here, "aligned whole chunks never fall back");
                out.commit().unwrap();
                assert!(std::fs::read(&dest).unwrap() == data, "{n} bytes in pieces of {pieces:?}");
            }
        }
        assert!(
            direct_here || std::env::var_os("CUSTODY_TEST_NO_DIRECT_IO").is_some(),
            "the temporary directory's file system takes no direct I/O; set CUSTODY_TEST_NO_DIRECT_IO=1 to accept that"
        );
    }

    #[test]
    fn small_or_unknown_outputs_go_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        for expected in [None, Some(DIRECT_FROM - 1)] {
            let dest = dir.path().join("small");
            let mut out = OutputFile::new(AtomicFile::create(&dest, None).unwrap(), expected);
            assert!(!out.is_direct());
            let data = bytes(3 * (1 << 20) + 17);
            write_in_pieces(&mut out, &data, &[1000]);
            out.commit().unwrap();
            assert!(std::fs::read(&dest).unwrap() == data);
        }
    }

    #[test]
    fn a_refused_direct_write_is_written_again_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        if !takes_direct_io(dir.path()) {
            assert!(std::env::var_os("CUSTODY_TEST_NO_DIRECT_IO").is_some(), "no direct I/O here: see above");
            return;
        }
        let dest = dir.path().join("misaligned");
        let mut out = OutputFile::new(AtomicFile::create(&dest, None).unwrap(), Some(DIRECT_FROM));
        assert!(out.is_direct());
        // A buffer address the kernel refuses for direct I/O (EINVAL), as a device with larger
        // blocks than ALIGN would.
        out.start += 1;
        let data = bytes(2 * CHUNK + 99);
        write_in_pieces(&mut out, &data, &[65_536]);
        assert!(!out.is_direct(), "the refused write switched to the page cache");
        out.commit().unwrap();
        assert!(std::fs::read(&dest).unwrap() == data);
    }

    #[test]
    fn an_output_dropped_before_its_commit_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("kept");
        std::fs::write(&dest, b"the old file").unwrap();
        let mut out = OutputFile::new(AtomicFile::create(&dest, None).unwrap(), Some(DIRECT_FROM));
        write_in_pieces(&mut out, &bytes(CHUNK + 5), &[4096]);
        drop(out);
        assert_eq!(std::fs::read(&dest).unwrap(), b"the old file");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["kept"], "no staged file left behind");
    }

    #[test]
    fn pipes_are_widened_and_nothing_else_is_touched() {
        let (r, w) = std::io::pipe().unwrap();
        assert_eq!(pipe_size(&r), Some(64 << 10), "Linux's default");
        widen_pipe(&w);
        assert_eq!(pipe_size(&r), Some(PIPE_SIZE), "one pipe, either end");
        // Never shrunk.
        rustix::pipe::fcntl_setpipe_size(&r, 2 * PIPE_SIZE).ok();
        let before = pipe_size(&r);
        widen_pipe(&r);
        assert_eq!(pipe_size(&r), before);
        // A file is not a pipe.
        let file = tempfile::tempfile().unwrap();
        assert_eq!(pipe_size(&file), None);
        widen_pipe(&file);
    }
}
