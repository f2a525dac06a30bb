//! The audit file sink: every committed record as one JSON line, for shipping with standard log
//! tools, rotated by size (`FILE`, `FILE.1` … `FILE.5`). The database trail is the authoritative
//! one (chained, signed, fail-closed); a failing file sink is logged, not fatal.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Rotated files kept besides the current one.
const KEEP: u32 = 5;

/// A size-rotated JSON-lines file.
#[derive(Debug)]
pub struct AuditFile {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<(File, u64)>,
}

impl AuditFile {
    /// Opens (appending) or creates the file, mode 0600.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { path: path.to_path_buf(), max_bytes, inner: Mutex::new((file, size)) })
    }

    /// Appends records (each one's JSON, as the trail stores it), rotating first if the file is
    /// full.
    pub fn write(&self, records: &[Vec<u8>]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
        for r in records {
            buf.extend_from_slice(r);
            buf.push(b'\n');
        }
        if inner.1 > 0 && inner.1 + buf.len() as u64 > self.max_bytes {
            match self.rotate() {
                Ok(file) => *inner = (file, 0),
                Err(e) => tracing::error!(error = %e, path = %self.path.display(), "audit file rotation failed"),
            }
        }
        match inner.0.write_all(&buf) {
            Ok(()) => inner.1 += buf.len() as u64,
            Err(e) => tracing::error!(error = %e, path = %self.path.display(), "audit file write failed"),
        }
    }

    fn rotate(&self) -> std::io::Result<File> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        for n in (1..KEEP).rev() {
            if numbered(n).exists() {
                std::fs::rename(numbered(n), numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))?;
        open(&self.path)
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)
}

#[cfg(test)]
mod tests {
    use custody_kms::AuditRecord;

    use super::*;

    fn record(seq: u64) -> AuditRecord {
        AuditRecord {
            seq,
            written_at: 0,
            prev_hash: "00".into(),
            hash: "11".into(),
            event: custody_kms::AuditEvent {
                time: 0,
                request_id: format!("r{seq}"),
                node: "n".into(),
                source: "s".into(),
                tls_identity: None,
                principal: None,
                access_key_id: None,
                action: "TrentService.ListKeys".into(),
                key_id: None,
                key_version: None,
                encryption_context: None,
                source_key_id: None,
                source_key_version: None,
                source_encryption_context: None,
                outcome: custody_kms::Outcome::Success,
                error_code: None,
                detail: None,
                duration_ms: 0,
                alert: false,
            },
        }
    }

    #[test]
    fn lines_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = AuditFile::open(&path, 2000).unwrap();
        for seq in 1..=40 {
            sink.write(&[serde_json::to_vec(&record(seq)).unwrap()]);
        }
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.lines().all(|l| serde_json::from_str::<AuditRecord>(l).is_ok()));
        assert!(std::fs::metadata(&path).unwrap().len() <= 2000);
        assert!(dir.path().join("audit.jsonl.1").exists(), "rotated by size");
        assert!(!dir.path().join("audit.jsonl.6").exists(), "at most 5 rotated files");
        let mut seqs: Vec<u64> = std::fs::read_dir(dir.path())
            .unwrap()
            .flat_map(|f| {
                std::fs::read_to_string(f.unwrap().path()).unwrap().lines().map(String::from).collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str::<AuditRecord>(&l).unwrap().seq)
            .collect();
        seqs.sort();
        assert_eq!(*seqs.last().unwrap(), 40, "the newest records are kept");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
