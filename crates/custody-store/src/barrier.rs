//! The storage barrier: typed rows, sealed under a root-derived key.

use std::fmt;
use std::sync::Arc;

use custody_crypto::BarrierKey;
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
pub struct Barrier {
    backend: Arc<dyn Backend>,
    key: BarrierKey,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl Barrier {
    /// A barrier over `backend` with the key derived from the unsealed root key.
    pub fn new(backend: Arc<dyn Backend>, key: BarrierKey) -> Self {
        Self { backend, key }
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
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T, expect: Expect) -> Write {
        assert_ne!(table, Table::Meta, "the meta table is never sealed");
        let json = serde_json::to_vec(value).expect("records serialize to JSON");
        let value = self.key.seal_row(table.name(), key, &json);
        Write::Put { table, key: key.to_string(), value, expect }
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
        let plain = match self.key.open_row(table.name(), &key, sealed) {
            Ok(p) => p,
            Err(_) => {
                tracing::error!(table = table.name(), key = %key, "storage integrity check failed: row changed outside custody");
                return Err(StoreError::Integrity { table: table.name(), key });
            }
        };
        let value = serde_json::from_slice(plain.expose_secret()).map_err(|e| StoreError::Decode {
            table: table.name(),
            key: key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Versioned { key, rev, value })
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

        // Copy b's sealed value over a: the row no longer opens.
        let b_raw = backend.get(Table::Keys, "b").unwrap().unwrap().value;
        backend
            .apply(&[Write::Put { table: Table::Keys, key: "a".into(), value: b_raw, expect: Expect::Any }])
            .unwrap();
        assert!(matches!(barrier.get::<String>(Table::Keys, "a"), Err(StoreError::Integrity { .. })));

        // Another root key opens nothing.
        let other = Barrier::new(backend, RootKey::generate().barrier_key());
        assert!(matches!(other.get::<String>(Table::Keys, "b"), Err(StoreError::Integrity { .. })));
    }
}
