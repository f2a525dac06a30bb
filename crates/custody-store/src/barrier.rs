//! The storage barrier: typed rows, sealed under a root-derived key.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A value kept in a memo entry, of the type its reader asked for.
type Kept = Option<Arc<dyn Any + Send + Sync>>;

/// A row as sealed, its plaintext, and what readers made of it.
struct Opened {
    sealed: Vec<u8>,
    plain: Arc<SecretBytes>,
    /// The row decoded, for a reader that asked for it as a type ([`Barrier::get_decoded`]).
    decoded: Kept,
    /// A value derived from the decoded row ([`Barrier::get_derived`]: unwrapped key material).
    derived: Kept,
    /// When a read last found these bytes.
    used: Instant,
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
        self.read(table, key)?.map(|row| self.open(table, row.key, row.rev, &row.value)).transpose()
    }

    /// Reads one row like [`Barrier::get`], and remembers it decoded beside its sealed bytes, so
    /// that reading the same bytes again costs a comparison and a clone instead of a JSON decode.
    /// For the rows every request reads (keys, versions, principals). `T` must hold no secret: a
    /// decoded value is not wiped when forgotten (secret-bearing records are not `Clone`).
    pub fn get_decoded<T>(&self, table: Table, key: &str) -> Result<Option<Versioned<T>>, StoreError>
    where
        T: DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let Some(row) = self.read(table, key)? else { return Ok(None) };
        let (decoded, _) = self.remembered(table, &row);
        let value = self.decoded::<T>(table, &row, decoded)?;
        Ok(Some(Versioned { key: row.key, rev: row.rev, value: T::clone(&value) }))
    }

    /// Reads one row and answers a value `derive` makes of it (decoded as by
    /// [`Barrier::get_decoded`], and kept decoded too), computed once per sealed bytes and
    /// remembered with them: a changed row (a write, another node's write, tampering) is opened,
    /// checked and derived afresh. For what is a function of the row's bytes alone: key material
    /// unwrapped from a version row, an access key's SigV4 verifier. Both values are dropped
    /// (a `KeyMaterial`, `SecretBytes` or `Zeroizing` in them wiped) when the row is written or
    /// deleted through this barrier, found deleted, unused for [`Barrier::forget_idle`]'s limit,
    /// or the memo is emptied (when full, and with the barrier at seal or root rotation); so a
    /// secret in `T` or `D` must be held in a type that wipes itself on drop.
    pub fn get_derived<T, D, E>(
        &self,
        table: Table,
        key: &str,
        derive: impl FnOnce(&T) -> Result<D, E>,
    ) -> Result<Option<Arc<D>>, E>
    where
        T: DeserializeOwned + Send + Sync + 'static,
        D: Send + Sync + 'static,
        E: From<StoreError>,
    {
        let Some(row) = self.read(table, key)? else { return Ok(None) };
        let (decoded, derived) = self.remembered(table, &row);
        if let Some(d) = derived.and_then(|d| d.downcast::<D>().ok()) {
            return Ok(Some(d));
        }
        let value = self.decoded::<T>(table, &row, decoded)?;
        let d = Arc::new(derive(&value)?);
        self.entry(table, &row.key, &row.value, |o| o.derived = Some(d.clone()));
        Ok(Some(d))
    }

    /// Forgets remembered rows that no read has found for `max_idle`: what a deleted row left
    /// (on another node, a key destroyed there) does not stay in memory for long.
    pub fn forget_idle(&self, max_idle: Duration) {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        for rows in opened.values_mut() {
            rows.retain(|_, o| o.used.elapsed() < max_idle);
        }
    }

    /// Reads one raw row; a row found deleted is forgotten at once, with anything derived from it.
    fn read(&self, table: Table, key: &str) -> Result<Option<crate::Row>, StoreError> {
        let row = self.backend.get(table, key)?;
        if row.is_none() {
            self.forget(table, key);
        }
        Ok(row)
    }

    fn forget(&self, table: Table, key: &str) {
        if !remembers(table) {
            return;
        }
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rows) = opened.get_mut(&table) {
            rows.remove(key);
        }
    }

    /// The row decoded as `T`: the `remembered` one, or opened, decoded and remembered.
    fn decoded<T>(&self, table: Table, row: &crate::Row, remembered: Kept) -> Result<Arc<T>, StoreError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        if let Some(v) = remembered.and_then(|d| d.downcast::<T>().ok()) {
            return Ok(v);
        }
        let plain = self.open_bytes(table, &row.key, &row.value)?;
        let value = Arc::new(decode::<T>(table, &row.key, plain.expose_secret())?);
        let erased: Arc<dyn Any + Send + Sync> = value.clone();
        self.entry(table, &row.key, &row.value, |o| o.decoded = Some(erased));
        Ok(value)
    }

    /// The memo's entry for row `key` if it holds these `sealed` bytes (marked used), given to
    /// `f`; `None`: not remembered, or remembered with other bytes (or forgotten meanwhile: then
    /// nothing is added to it). Every use of the memo goes through here.
    fn entry<R>(&self, table: Table, key: &str, sealed: &[u8], f: impl FnOnce(&mut Opened) -> R) -> Option<R> {
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        let hit = opened.get_mut(&table)?.get_mut(key)?;
        if hit.sealed != sealed {
            return None;
        }
        hit.used = Instant::now();
        Some(f(hit))
    }

    /// What the memo holds for `row`'s bytes: (decoded, derived).
    fn remembered(&self, table: Table, row: &crate::Row) -> (Kept, Kept) {
        self.entry(table, &row.key, &row.value, |o| (o.decoded.clone(), o.derived.clone())).unwrap_or_default()
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

    /// Applies a batch atomically. Then the memo forgets the rows it wrote (what was derived
    /// from their old bytes, key material included, is dropped now, not when next read; a read
    /// racing the write may remember the old bytes again, until a read finds other bytes or none,
    /// or [`Barrier::forget_idle`]).
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let applied = self.backend.apply(writes);
        for w in writes {
            let (Write::Put { table, key, .. } | Write::Delete { table, key, .. }) = w;
            self.forget(*table, key);
        }
        applied
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
        let value = decode(table, &key, plain.expose_secret())?;
        Ok(Versioned { key, rev, value })
    }

    fn open_bytes(&self, table: Table, key: &str, sealed: &[u8]) -> Result<Arc<SecretBytes>, StoreError> {
        if !remembers(table) {
            return self.open_sealed(table, key, sealed).map(Arc::new);
        }
        if let Some(plain) = self.entry(table, key, sealed, |o| o.plain.clone()) {
            return Ok(plain);
        }
        let plain = Arc::new(self.open_sealed(table, key, sealed)?);
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if opened.values().map(|t| t.len()).sum::<usize>() >= OPENED_ROWS {
            opened.clear();
        }
        opened.entry(table).or_default().insert(key.to_string(), Opened::new(sealed.to_vec(), plain.clone()));
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

impl Opened {
    fn new(sealed: Vec<u8>, plain: Arc<SecretBytes>) -> Self {
        Self { sealed, plain, decoded: None, derived: None, used: Instant::now() }
    }
}

/// Whether the memo keeps `table`'s rows. The audit trail is read by scans of thousands of
/// records, each once, and appended to on every request: not worth keeping.
fn remembers(table: Table) -> bool {
    !matches!(table, Table::Audit | Table::AuditCheckpoints)
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, plain: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(plain).map_err(|e| StoreError::Decode {
        table: table.name(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use custody_crypto::RootKey;

    use super::*;
    use crate::SqliteBackend;

    /// A SQLite store with two rows of `table` written through a barrier of a fresh root key.
    fn store_with(table: Table, rows: [(&str, &str); 2]) -> (tempfile::TempDir, Arc<dyn Backend>, Barrier) {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("s.db")).unwrap());
        let barrier = Barrier::new(backend.clone(), RootKey::generate().barrier_key());
        barrier.apply(&rows.map(|(key, value)| barrier.put(table, key, &value, Expect::Absent))).unwrap();
        (dir, backend, barrier)
    }

    /// Writes `value` as row `key`'s stored bytes, behind any barrier's back.
    fn write_raw(backend: &Arc<dyn Backend>, table: Table, key: &str, value: Vec<u8>) {
        backend.apply(&[Write::Put { table, key: key.into(), value, expect: Expect::Any }]).unwrap();
    }

    #[test]
    fn rows_are_sealed_and_tampering_is_detected() {
        let (_dir, backend, barrier) = store_with(Table::Keys, [("a", "Enabled"), ("b", "Disabled")]);
        let a: Versioned<String> = barrier.get(Table::Keys, "a").unwrap().unwrap();
        assert_eq!((a.value.as_str(), a.rev), ("Enabled", 1));
        let raw = backend.get(Table::Keys, "a").unwrap().unwrap().value;
        assert!(!raw.windows(7).any(|w| w == b"Enabled"), "values are not stored in the clear");

        // Read again: the same bytes, answered from the memo of opened rows.
        let again: Versioned<String> = barrier.get(Table::Keys, "a").unwrap().unwrap();
        assert_eq!(again.value, "Enabled");

        // Copy b's sealed value over a: the row no longer opens (the memo holds a's old bytes,
        // so the new ones are opened and checked, not answered from it).
        write_raw(&backend, Table::Keys, "a", backend.get(Table::Keys, "b").unwrap().unwrap().value);
        assert!(matches!(barrier.get::<String>(Table::Keys, "a"), Err(StoreError::Integrity { .. })));

        // Another root key opens nothing.
        let other = Barrier::new(backend, RootKey::generate().barrier_key());
        assert!(matches!(other.get::<String>(Table::Keys, "b"), Err(StoreError::Integrity { .. })));
    }

    #[test]
    fn decoded_and_derived_values_follow_the_sealed_bytes() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (_dir, backend, barrier) = store_with(Table::Versions, [("k/1", "one"), ("k/2", "two")]);
        let derivations = AtomicUsize::new(0);
        let derive = |v: &String| {
            derivations.fetch_add(1, Ordering::Relaxed);
            Ok::<_, StoreError>(format!("derived from {v}"))
        };
        let read = || {
            let derived = barrier.get_derived::<String, String, StoreError>(Table::Versions, "k/1", derive).unwrap();
            let row = barrier.get_decoded::<String>(Table::Versions, "k/1").unwrap();
            row.zip(derived)
        };

        // Derived once for the same bytes; the decoded row is the stored one.
        let (row, first) = read().unwrap();
        assert_eq!((row.value.as_str(), row.rev, first.as_str()), ("one", 1, "derived from one"));
        let (_, again) = read().unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(derivations.load(Ordering::Relaxed), 1);
        assert_eq!(barrier.get_decoded::<String>(Table::Versions, "k/1").unwrap().unwrap().value, "one");
        let held = Arc::downgrade(&first);
        drop((first, again));
        assert!(held.upgrade().is_some(), "remembered while the row is unchanged");

        // A write through the barrier drops what was derived at once, and the next read derives
        // from the new bytes.
        barrier.apply(&[barrier.put(Table::Versions, "k/1", &"uno", Expect::Rev(1))]).unwrap();
        assert!(held.upgrade().is_none(), "dropped when the row was written");
        let (row, now) = read().unwrap();
        assert_eq!((row.value.as_str(), row.rev, now.as_str()), ("uno", 2, "derived from uno"));
        assert_eq!(derivations.load(Ordering::Relaxed), 2);

        // Bytes changed behind the barrier (another node, or tampering): opened and checked
        // afresh, never answered from the memo.
        write_raw(&backend, Table::Versions, "k/1", backend.get(Table::Versions, "k/2").unwrap().unwrap().value);
        assert!(matches!(
            barrier.get_derived::<String, String, StoreError>(Table::Versions, "k/1", derive),
            Err(StoreError::Integrity { .. })
        ));
        assert!(matches!(barrier.get_decoded::<String>(Table::Versions, "k/1"), Err(StoreError::Integrity { .. })));
        assert_eq!(derivations.load(Ordering::Relaxed), 2);

        // A row deleted behind the barrier: not found, and what was derived from it is dropped
        // as soon as a read finds it gone.
        barrier.apply(&[barrier.put(Table::Versions, "k/1", &"again", Expect::Any)]).unwrap();
        let held = Arc::downgrade(&read().unwrap().1);
        backend.apply(&[Write::Delete { table: Table::Versions, key: "k/1".into(), expect: Expect::Any }]).unwrap();
        assert!(held.upgrade().is_some());
        assert!(read().is_none());
        assert!(held.upgrade().is_none(), "dropped when a read found the row deleted");

        // Unused rows are forgotten by age.
        let derived = barrier
            .get_derived::<String, String, StoreError>(Table::Versions, "k/2", |v| Ok(v.clone()))
            .unwrap()
            .unwrap();
        let held = Arc::downgrade(&derived);
        drop(derived);
        barrier.forget_idle(Duration::from_secs(60));
        assert!(held.upgrade().is_some(), "read just now");
        barrier.forget_idle(Duration::ZERO);
        assert!(held.upgrade().is_none(), "forgotten when idle");

        // A failed derivation is an error, and nothing is remembered for it.
        let failed = barrier.get_derived::<String, String, StoreError>(Table::Versions, "k/2", |_| {
            Err(StoreError::Integrity { table: "versions", key: "k/2".into() })
        });
        assert!(matches!(failed, Err(StoreError::Integrity { .. })));
        let ok = barrier
            .get_derived::<String, String, StoreError>(Table::Versions, "k/2", |v| Ok(v.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(ok.as_str(), "two");
    }

    #[test]
    fn rows_record_their_root_generation_and_legacy_rows_are_generation_one() {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("s.db")).unwrap());
        let (one, two) = (RootKey::generate(), RootKey::generate());
        // A row from before generations: sealed without a tag.
        let legacy = one.barrier_key().seal_row("keys", "old", b"\"legacy\"");
        write_raw(&backend, Table::Keys, "old", legacy);
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
        write_raw(&backend, Table::Keys, "a", forged);
        assert!(matches!(only_two.get::<String>(Table::Keys, "a"), Err(StoreError::Integrity { .. })));
    }
}
