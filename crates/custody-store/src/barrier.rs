//! The storage barrier: typed rows, sealed under a root-derived key.

use std::fmt;
use std::sync::Arc;

use custody_crypto::{BarrierKey, SecretBytes};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Backend, Expect, StoreError, Table, Write};

/// A decoded row and its revision (for the next conditional write).
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    /// Row key.
    pub key: String,
    /// Revision read.
    pub rev: u64,
    /// Decoded value.
    pub value: T,
}

/// Seals rows on the way in and opens them on the way out.
///
/// Every sealed value starts with the generation of the root key whose barrier key sealed it
/// ([`GENERATION_TAG`], then the generation as a big-endian `u32`), so a root rotation can tell
/// which rows it still has to re-seal. Values written before generations existed carry no tag and
/// are generation 1; a tagged value that does not open is also tried untagged (a legacy value's
/// random salt can start with the tag bytes; AEAD rules out a false accept either way).
pub struct Barrier {
    backend: Arc<dyn Backend>,
    /// The generation new rows are sealed under, and its key.
    write: (u32, Arc<BarrierKey>),
    /// Every generation this barrier opens (the write generation included).
    keys: Vec<(u32, Arc<BarrierKey>)>,
    /// Rows opened lately, by table and key: the sealed value and what it opened to. Opening is
    /// a pure function of the sealed bytes (under this barrier's keys), so a row read again with
    /// the same bytes needs no key derivation and no decryption; a changed or tampered row has
    /// other bytes and is opened (and checked) afresh. Plaintexts are wiped when evicted.
    opened: std::sync::Mutex<std::collections::HashMap<Table, std::collections::HashMap<String, Opened>>>,
}

/// A row as sealed, and its plaintext.
struct Opened {
    sealed: Vec<u8>,
    plain: Arc<SecretBytes>,
}

/// Opened rows kept, at most; past it the memo starts again empty.
const OPENED_ROWS: usize = 4096;

/// First bytes of a sealed value that records its root key generation.
pub const GENERATION_TAG: &[u8; 4] = b"\xc5gen";
/// Bytes before the sealed part of a tagged value.
const TAGGED_PREFIX: usize = GENERATION_TAG.len() + 4;

/// The root key generation a stored value claims (1 for a value without a tag). Untrusted until
/// the value opens under that generation's key.
pub fn generation_of(sealed: &[u8]) -> u32 {
    split_tag(sealed).map_or(1, |(generation, _)| generation)
}

/// A tagged value's generation and sealed part (`None`: no tag, a value from before generations).
fn split_tag(sealed: &[u8]) -> Option<(u32, &[u8])> {
    let rest = sealed.strip_prefix(GENERATION_TAG.as_slice())?;
    let (generation, body) = rest.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*generation), body))
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl Barrier {
    /// A barrier over `backend` with the key derived from the unsealed root key of generation 1.
    pub fn new(backend: Arc<dyn Backend>, key: BarrierKey) -> Self {
        let key = Arc::new(key);
        Self { backend, write: (1, key.clone()), keys: vec![(1, key)], opened: Default::default() }
    }

    /// A barrier that seals under `write` and opens the generations in `keys` as well (during a
    /// root rotation: the current root's and the next one's).
    pub fn with_generations(
        backend: Arc<dyn Backend>,
        write: (u32, Arc<BarrierKey>),
        keys: Vec<(u32, Arc<BarrierKey>)>,
    ) -> Self {
        let mut keys = keys;
        if !keys.iter().any(|(g, _)| *g == write.0) {
            keys.push(write.clone());
        }
        Self { backend, write, keys, opened: Default::default() }
    }

    /// The generation new rows are sealed under.
    pub fn write_generation(&self) -> u32 {
        self.write.0
    }

    /// The backend underneath (for the unsealed meta table and `erase_freed`).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Reads and opens one row.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
        self.backend.get(table, key)?.map(|row| self.open(table, row.key, row.rev, &row.value)).transpose()
    }

    /// Reads and opens rows by prefix (see [`Backend::scan`]).
    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        self.backend
            .scan(table, prefix, after, limit)?
            .into_iter()
            .map(|row| self.open(table, row.key, row.rev, &row.value))
            .collect()
    }

    /// Visits every row with `prefix` after `after`, in key order, reading in bounded chunks, until
    /// `f` breaks or the rows run out.
    pub fn for_each<T: DeserializeOwned, E: From<StoreError>>(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        mut f: impl FnMut(Versioned<T>) -> Result<std::ops::ControlFlow<()>, E>,
    ) -> Result<(), E> {
        const CHUNK: usize = 256;
        let mut after = after.map(str::to_string);
        loop {
            let chunk = self.scan::<T>(table, prefix, after.as_deref(), CHUNK)?;
            let exhausted = chunk.len() < CHUNK;
            for row in chunk {
                after = Some(row.key.clone());
                if f(row)?.is_break() {
                    return Ok(());
                }
            }
            if exhausted {
                return Ok(());
            }
        }
    }

    /// A sealed put, to apply in a batch.
    pub fn put<T: Serialize + ?Sized>(&self, table: Table, key: &str, value: &T, expect: Expect) -> Write {
        let json = zeroize::Zeroizing::new(serde_json::to_vec(value).expect("records serialize to JSON"));
        self.put_plain(table, key, &json, expect)
    }

    /// A sealed put of bytes already encoded (a row re-sealed as it is by a root rotation).
    pub fn put_plain(&self, table: Table, key: &str, plain: &[u8], expect: Expect) -> Write {
        assert_ne!(table, Table::Meta, "the meta table is never sealed");
        let (generation, barrier_key) = &self.write;
        let sealed = barrier_key.seal_row(table.name(), key, plain);
        let mut value = Vec::with_capacity(TAGGED_PREFIX + sealed.len());
        value.extend_from_slice(GENERATION_TAG);
        value.extend_from_slice(&generation.to_be_bytes());
        value.extend_from_slice(&sealed);
        Write::Put { table, key: key.to_string(), value, expect }
    }

    /// Opens a raw row without decoding it (a root rotation re-seals it as it is; the audit trail
    /// decodes one of two layouts itself).
    pub fn open_plain(&self, table: Table, row: &crate::Row) -> Result<SecretBytes, StoreError> {
        let plain = self.open_bytes(table, &row.key, &row.value)?;
        Ok(SecretBytes::new(plain.expose_secret().to_vec()))
    }

    /// A delete, to apply in a batch.
    pub fn delete(&self, table: Table, key: &str, expect: Expect) -> Write {
        Write::Delete { table, key: key.to_string(), expect }
    }

    /// Applies a batch atomically.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        self.backend.apply(writes)
    }

    /// Opens one raw row (from [`Backend::scan`]), so a caller can handle a row that fails its
    /// integrity check without losing the others.
    pub fn open_row<T: DeserializeOwned>(&self, table: Table, row: crate::Row) -> Result<Versioned<T>, StoreError> {
        self.open(table, row.key, row.rev, &row.value)
    }

    fn open<T: DeserializeOwned>(
        &self,
        table: Table,
        key: String,
        rev: u64,
        sealed: &[u8],
    ) -> Result<Versioned<T>, StoreError> {
        let plain = self.open_bytes(table, &key, sealed)?;
        let value = serde_json::from_slice(plain.expose_secret()).map_err(|e| StoreError::Decode {
            table: table.name(),
            key: key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Versioned { key, rev, value })
    }

    fn open_bytes(&self, table: Table, key: &str, sealed: &[u8]) -> Result<Arc<SecretBytes>, StoreError> {
        let memo = |opened: &std::collections::HashMap<Table, std::collections::HashMap<String, Opened>>| {
            let hit = opened.get(&table)?.get(key)?;
            (hit.sealed == sealed).then(|| hit.plain.clone())
        };
        // The audit trail is read by scans of thousands of records, each once: not worth keeping.
        if matches!(table, Table::Audit | Table::AuditCheckpoints) {
            return self.open_sealed(table, key, sealed).map(Arc::new);
        }
        if let Some(plain) = memo(&self.opened.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(plain);
        }
        let plain = Arc::new(self.open_sealed(table, key, sealed)?);
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if opened.values().map(|t| t.len()).sum::<usize>() >= OPENED_ROWS {
            opened.clear();
        }
        opened
            .entry(table)
            .or_default()
            .insert(key.to_string(), Opened { sealed: sealed.to_vec(), plain: plain.clone() });
        Ok(plain)
    }

    fn open_sealed(&self, table: Table, key: &str, sealed: &[u8]) -> Result<SecretBytes, StoreError> {
        let key_of = |generation: u32| self.keys.iter().find(|(g, _)| *g == generation).map(|(_, k)| k);
        let tagged = split_tag(sealed)
            .and_then(|(generation, body)| Some((key_of(generation)?, body)))
            .and_then(|(k, body)| k.open_row(table.name(), key, body).ok());
        let opened = tagged.or_else(|| key_of(1).and_then(|k| k.open_row(table.name(), key, sealed).ok()));
        opened.ok_or_else(|| {
            tracing::error!(table = table.name(), key = %key, generation = generation_of(sealed), "storage integrity check failed: row changed outside custody, or sealed under a root key this node does not hold");
            StoreError::Integrity { table: table.name(), key: key.to_string() }
        })
    }
}

#[cfg(test)]
mod tests {
    use custody_crypto::RootKey;

    use super::*;
    use crate::SqliteBackend;

    #[test]
    fn rows_are_sealed_and_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("s.db")).unwrap());
        let barrier = Barrier::new(backend.clone(), RootKey::generate().barrier_key());
        barrier
            .apply(&[
                barrier.put(Table::Keys, "a", &"Enabled", Expect::Absent),
                barrier.put(Table::Keys, "b", &"Disabled", Expect::Absent),
            ])
            .unwrap();
        let a: Versioned<String> = barrier.get(Table::Keys, "a").unwrap().unwrap();
        assert_eq!((a.value.as_str(), a.rev), ("Enabled", 1));
        let raw = backend.get(Table::Keys, "a").unwrap().unwrap().value;
        assert!(!raw.windows(7).any(|w| w == b"Enabled"), "values are not stored in the clear");

        // Read again: the same bytes, answered from the memo of opened rows.
        let again: Versioned<String> = barrier.get(Table::Keys, "a").unwrap().unwrap();
        assert_eq!(again.value, "Enabled");

        // Copy b's sealed value over a: the row no longer opens (the memo holds a's old bytes,
        // so the new ones are opened and checked, not answered from it).
        let b_raw = backend.get(Table::Keys, "b").unwrap().unwrap().value;
        backend
            .apply(&[Write::Put { table: Table::Keys, key: "a".into(), value: b_raw, expect: Expect::Any }])
            .unwrap();
        assert!(matches!(barrier.get::<String>(Table::Keys, "a"), Err(StoreError::Integrity { .. })));

        // Another root key opens nothing.
        let other = Barrier::new(backend, RootKey::generate().barrier_key());
        assert!(matches!(other.get::<String>(Table::Keys, "b"), Err(StoreError::Integrity { .. })));
    }

    #[test]
    fn rows_record_their_root_generation_and_legacy_rows_are_generation_one() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("s.db")).unwrap());
        let (one, two) = (RootKey::generate(), RootKey::generate());
        // A row from before generations: sealed without a tag.
        let legacy = one.barrier_key().seal_row("keys", "old", b"\"legacy\"");
        backend
            .apply(&[Write::Put { table: Table::Keys, key: "old".into(), value: legacy, expect: Expect::Any }])
            .unwrap();
        let first = Barrier::new(backend.clone(), one.barrier_key());
        first.apply(&[first.put(Table::Keys, "a", &"one", Expect::Absent)]).unwrap();
        let raw = |k: &str| backend.get(Table::Keys, k).unwrap().unwrap().value;
        assert_eq!((generation_of(&raw("old")), generation_of(&raw("a"))), (1, 1));

        // During a rotation: both open, new rows are generation 2.
        let both = Barrier::with_generations(
            backend.clone(),
            (2, Arc::new(two.barrier_key())),
            vec![(1, Arc::new(one.barrier_key()))],
        );
        both.apply(&[both.put(Table::Keys, "b", &"two", Expect::Absent)]).unwrap();
        assert_eq!(generation_of(&raw("b")), 2);
        for k in ["old", "a", "b"] {
            assert!(both.get::<String>(Table::Keys, k).is_ok(), "{k}");
        }
        // After it: generation 1 rows no longer open; a forged tag does not help.
        let only_two = Barrier::with_generations(backend.clone(), (2, Arc::new(two.barrier_key())), Vec::new());
        assert!(only_two.get::<String>(Table::Keys, "b").is_ok());
        for k in ["old", "a"] {
            assert!(matches!(only_two.get::<String>(Table::Keys, k), Err(StoreError::Integrity { .. })), "{k}");
        }
        let mut forged = raw("a");
        forged[4..8].copy_from_slice(&2u32.to_be_bytes());
        backend
            .apply(&[Write::Put { table: Table::Keys, key: "a".into(), value: forged, expect: Expect::Any }])
            .unwrap();
        assert!(matches!(only_two.get::<String>(Table::Keys, "a"), Err(StoreError::Integrity { .. })));
    }
}
