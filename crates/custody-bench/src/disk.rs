//! How long the disk under a directory takes to make one small write durable: the floor under
//! every audit group commit (one `fdatasync` of SQLite's write-ahead log), measured in the same
//! run as the load, so a reader can tell the machine's share of the audited latency from
//! custody's.
//!
//! Serial 4 KiB overwrites of a file whose blocks were written first (as the reused WAL is), each
//! followed by `fdatasync`. `scripts/bench-fsync` does the same from Python, with other modes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Size of each write: about one group commit's worth of log.
const WRITE: usize = 4096;
/// The file's size: writes go round it, so each overwrites blocks that exist.
const FILE: usize = 16 << 20;

/// What the probe measured.
#[derive(Debug, Clone, Serialize)]
pub struct Flushes {
    /// Durable writes made.
    pub writes: u64,
    /// Durable writes per second, one after another.
    pub writes_per_second: f64,
    /// Median time of one write and its flush, µs.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Slowest, µs.
    pub max_us: u64,
}

/// Writes and flushes 4 KiB at a time in a file in `dir` for `duration`, then removes the file.
pub fn probe(dir: &Path, duration: Duration) -> std::io::Result<Flushes> {
    let path = dir.join("custody-bench-flush-probe.bin");
    let result = run(&path, duration);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(path: &Path, duration: Duration) -> std::io::Result<Flushes> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    // Written zeros, so the blocks exist and overwriting them changes no metadata.
    let zeros = vec![0u8; 1 << 20];
    for i in 0..FILE / zeros.len() {
        file.write_all_at(&zeros, (i * zeros.len()) as u64)?;
    }
    file.sync_all()?;
    let block = [0x5au8; WRITE];
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let started = Instant::now();
    let mut offset = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        file.write_all_at(&block, offset as u64)?;
        file.sync_data()?;
        latency.record(t.elapsed().as_micros().max(1) as u64).expect("the histogram grows");
        offset = (offset + WRITE) % FILE;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Flushes {
        writes: latency.len(),
        writes_per_second: latency.len() as f64 / elapsed,
        p50_us: latency.value_at_quantile(0.50),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        max_us: latency.max(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_makes_durable_writes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let f = probe(dir.path(), Duration::from_millis(200)).unwrap();
        assert!(f.writes > 0 && f.writes_per_second > 0.0, "{f:?}");
        assert!(f.p50_us > 0 && f.p50_us <= f.p99_us && f.p99_us <= f.p999_us && f.p999_us <= f.max_us, "{f:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe's file is removed");
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_an_error() {
        assert!(probe(Path::new("/nonexistent/custody-bench"), Duration::from_millis(10)).is_err());
    }
}
