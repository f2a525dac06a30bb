//! custody's storage.
//!
//! Two layers, one mechanism:
//!
//! - a [`Backend`] is an ordered key-value store of rows `(table, key) -> (revision, value)` with
//!   atomic batches of conditional writes. SQLite ([`SqliteBackend`]) is the embedded default;
//!   PostgreSQL ([`PostgresBackend`]) is the second implementation; one conformance suite
//!   (`tests/conformance.rs`) runs on both.
//! - the [`Barrier`] seals every row's value under a key derived from the root key, with the
//!   table and row key as AAD (DESIGN.md §10). The database sees table names, row keys (ids) and
//!   revisions; a value changed, swapped with another row's, or moved to another table fails to
//!   open with [`StoreError::Integrity`].
//!
//! Only the [`Table::Meta`] table is readable without the root key: it holds what is needed to
//! unseal (seal method, the root key's check value, share fingerprints), none of it secret.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod barrier;
mod postgres;
mod sqlite;

use std::fmt;

pub use barrier::{generation_of, Barrier, Versioned, GENERATION_TAG};
pub use postgres::{PostgresBackend, PostgresOptions};
pub use sqlite::SqliteBackend;

/// The key of an audit row or checkpoint ([`Table::Audit`], [`Table::AuditCheckpoints`]): its
/// sequence number in 20 digits, so that key order is sequence order.
pub fn sequence_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The tables custody keeps. Row keys are chosen so that a prefix scan lists what belongs
/// together (for example `<tenant>/` in [`Table::Aliases`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Table {
    /// Unsealed store metadata: store id, seal configuration, root key check value.
    Meta,
    /// Key metadata and state, by key id.
    Keys,
    /// Wrapped key-version material, by `<key id>/<version, 10 digits>`.
    Versions,
    /// Aliases, by `<tenant>/<alias name>`.
    Aliases,
    /// Principals, by `<tenant>/<principal name>`.
    Principals,
    /// Tenants, by tenant id.
    Tenants,
    /// Internal CA and issued certificates.
    Pki,
    /// Audit records, by sequence number (20 digits, so key order is sequence order). Its keys
    /// are always such numbers: a backend may store them as numbers and refuse other keys
    /// (SQLite keeps these rows in a table of their own, keyed by the number).
    Audit,
    /// SigV4 access keys, by access key id.
    AccessKeys,
    /// Grants, by `<key id>/<grant id>`.
    Grants,
    /// Signed audit checkpoints, by the sequence number they cover (20 digits).
    AuditCheckpoints,
}

impl Table {
    /// Every table, for migrations and tests.
    pub const ALL: [Table; 11] = [
        Table::Meta,
        Table::Keys,
        Table::Versions,
        Table::Aliases,
        Table::Principals,
        Table::Tenants,
        Table::Pki,
        Table::Audit,
        Table::AccessKeys,
        Table::Grants,
        Table::AuditCheckpoints,
    ];

    /// The stored name (part of every sealed row's AAD: never rename).
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Keys => "keys",
            Table::Versions => "versions",
            Table::Aliases => "aliases",
            Table::Principals => "principals",
            Table::Tenants => "tenants",
            Table::Pki => "pki",
            Table::Audit => "audit",
            Table::AccessKeys => "access_keys",
            Table::Grants => "grants",
            Table::AuditCheckpoints => "audit_checkpoints",
        }
    }
}

/// One stored row.
#[derive(Clone, PartialEq, Eq)]
pub struct Row {
    /// Row key.
    pub key: String,
    /// Revision: 1 on insert, +1 on each update.
    pub rev: u64,
    /// Stored bytes (sealed, except in [`Table::Meta`]).
    pub value: Vec<u8>,
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Row").field("key", &self.key).field("rev", &self.rev).field("len", &self.value.len()).finish()
    }
}

/// A precondition on a row, checked atomically with the batch it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// No precondition.
    Any,
    /// The row must not exist.
    Absent,
    /// The row must exist at exactly this revision.
    Rev(u64),
}

impl Expect {
    /// Checks the precondition against the row's current revision (`None`: no row), with the
    /// conflict error every backend reports.
    pub fn check(self, table: Table, key: &str, current: Option<u64>) -> Result<(), StoreError> {
        let ok = match self {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Rev(rev) => current == Some(rev),
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::Conflict { table: table.name(), key: key.to_string() })
        }
    }
}

/// One write in an atomic batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace a row.
    Put {
        /// table
        table: Table,
        /// row key
        key: String,
        /// stored bytes
        value: Vec<u8>,
        /// precondition
        expect: Expect,
    },
    /// Delete a row. The backend overwrites freed space (SQLite `secure_delete`).
    Delete {
        /// table
        table: Table,
        /// row key
        key: String,
        /// precondition
        expect: Expect,
    },
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption, locking).
    #[error("database error: {0}")]
    Database(String),
    /// A precondition of a batch did not hold; nothing in the batch was written.
    #[error("concurrent modification of {table}/{key}")]
    Conflict {
        /// table name
        table: &'static str,
        /// row key
        key: String,
    },
    /// A sealed row did not open: it was changed outside custody, or belongs elsewhere.
    #[error("integrity check failed for {table}/{key}: the row was changed outside custody")]
    Integrity {
        /// table name
        table: &'static str,
        /// row key
        key: String,
    },
    /// A row opened but its contents did not decode (a bug or an incompatible version).
    #[error("row {table}/{key} could not be decoded: {reason}")]
    Decode {
        /// table name
        table: &'static str,
        /// row key
        key: String,
        /// decoder message
        reason: String,
    },
    /// Another process has the SQLite store open.
    #[error("the store {} is in use by another process (a custody server already running on this data directory?); stop it first", path.display())]
    InUse {
        /// the database file
        path: std::path::PathBuf,
    },
    /// The store is newer than this binary.
    #[error("the store's schema version {found} is newer than this custody supports ({supported}); upgrade custody")]
    SchemaTooNew {
        /// found in the database
        found: u32,
        /// supported here
        supported: u32,
    },
}

/// An ordered key-value store with atomic, conditional batches.
///
/// Implementations must make [`Backend::apply`] atomic and durable before returning, and must
/// overwrite deleted rows' bytes rather than only unlink them.
pub trait Backend: Send + Sync + fmt::Debug {
    /// One row.
    fn get(&self, table: Table, key: &str) -> Result<Option<Row>, StoreError>;
    /// Rows whose key starts with `prefix`, in key order, strictly after `after` if given, at most
    /// `limit`.
    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<Row>, StoreError>;
    /// The row with the greatest key in `table`, if any.
    fn last(&self, table: Table) -> Result<Option<Row>, StoreError>;
    /// Applies every write or none. Fails with [`StoreError::Conflict`] if a precondition fails.
    fn apply(&self, writes: &[Write]) -> Result<(), StoreError>;
    /// Makes sure bytes of deleted rows no longer exist anywhere in the database files (for
    /// SQLite: checkpoint and truncate the write-ahead log).
    fn erase_freed(&self) -> Result<(), StoreError>;
    /// Lookups answered from this process's row cache and lookups that read the database,
    /// since start (`None`: the backend keeps no cache).
    fn cache_stats(&self) -> Option<CacheStats> {
        None
    }
}

/// How often a cache answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answered from the cache.
    pub hits: u64,
    /// Not in the cache.
    pub misses: u64,
}
