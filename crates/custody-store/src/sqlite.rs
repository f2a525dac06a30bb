//! The embedded SQLite backend (WAL, `synchronous=FULL`, `secure_delete=ON`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::{Backend, Expect, Row, StoreError, Table, Write};

/// Migrations, applied in order, each once. Append only; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: the row store.
    "CREATE TABLE rows (
        tbl   TEXT    NOT NULL,
        key   TEXT    NOT NULL,
        rev   INTEGER NOT NULL,
        value BLOB    NOT NULL,
        PRIMARY KEY (tbl, key)
    ) WITHOUT ROWID;",
    // 2: the same rows in a rowid table with an index on (tbl, key). A WITHOUT ROWID table keeps
    // whole rows in its b-tree's interior cells too, so every seek past an audit group row (a few
    // KB, spilling into overflow pages) read that row in full, and every append rewrote more
    // pages (docs/BENCHMARKS.md, Session 9). Here interior pages hold only row ids and keys.
    "CREATE TABLE rows_by_id (
        tbl   TEXT    NOT NULL,
        key   TEXT    NOT NULL,
        rev   INTEGER NOT NULL,
        value BLOB    NOT NULL,
        PRIMARY KEY (tbl, key)
    );
    INSERT INTO rows_by_id (tbl, key, rev, value) SELECT tbl, key, rev, value FROM rows ORDER BY tbl, key;
    DROP TABLE rows;
    ALTER TABLE rows_by_id RENAME TO rows;",
    // 3: the audit trail's rows in a table of their own, keyed by the integer their 20-digit key
    // spells. An append there touches only the table's last leaf (and, now and then, its
    // parent); in `rows` it also inserted into the (tbl, key) index: about a quarter of the WAL
    // frames of every audit group commit (docs/BENCHMARKS.md, Session 19).
    "CREATE TABLE audit_rows (
        seq   INTEGER PRIMARY KEY,
        rev   INTEGER NOT NULL,
        value BLOB    NOT NULL
    );
    INSERT INTO audit_rows (seq, rev, value)
        SELECT CAST(key AS INTEGER), rev, value FROM rows WHERE tbl = 'audit' ORDER BY key;
    DELETE FROM rows WHERE tbl = 'audit';",
];

/// Where a row is stored: the audit trail's rows in `audit_rows`, by the number their key spells
/// (keys there are sequence numbers written as 20 digits: [`Table::Audit`]), every other row in
/// `rows`, by table name and key.
#[derive(Debug, Clone, Copy)]
enum Place<'a> {
    Rows(&'static str, &'a str),
    Audit(i64),
}

impl<'a> Place<'a> {
    fn of(table: Table, key: &'a str) -> Result<Self, StoreError> {
        match table {
            Table::Audit => audit_seq(key).map(Place::Audit),
            _ => Ok(Place::Rows(table.name(), key)),
        }
    }
}

/// The number an audit row's key spells; anything but 20 digits is refused.
fn audit_seq(key: &str) -> Result<i64, StoreError> {
    match key.parse::<i64>() {
        Ok(n) if key.len() == 20 && key.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(StoreError::Database(format!("audit rows are keyed by 20-digit sequence numbers, not {key:?}"))),
    }
}

/// Read connections kept open beside the writer. WAL lets them read the last committed state
/// while the writer commits (and waits for its fsync), so a request's key lookup never queues
/// behind an audit group commit.
const READERS: usize = 4;

/// SQLite-backed [`Backend`]: one writer connection (SQLite serializes writers anyway) and a few
/// read-only connections, each behind its own mutex.
///
/// A database file belongs to one process: the first open takes an exclusive lock on
/// `<file>-lock`, and opening it from another process fails with [`StoreError::InUse`]. Handles
/// opened in the same process share that lock and a cache of the rows requests read on every
/// call (principals, keys, versions, aliases...): every write goes through one of those handles
/// and evicts what it changes, so the cache is never stale, and a request's lookups do not each
/// start a SQLite read transaction.
#[derive(Debug)]
pub struct SqliteBackend {
    shared: Arc<Shared>,
    conn: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: std::sync::atomic::AtomicUsize,
    /// Dropping it stops the checkpoint thread.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

/// Rows kept in the cache, at most; past it the cache starts again empty.
const CACHE_ROWS: usize = 16_384;

/// Tables whose rows are cached: all but the audit trail's, which are written on every request
/// and read only by queries and verification (which scan).
fn cached(table: Table) -> bool {
    !matches!(table, Table::Audit | Table::AuditCheckpoints)
}

/// What every handle on one database file in this process shares.
struct Shared {
    /// Held for as long as a handle lives: keeps other processes out (see [`SqliteBackend`]).
    lock: Option<std::fs::File>,
    /// The database path, as registered in [`OPEN`].
    path: PathBuf,
    cache: Mutex<HashMap<Table, TableCache>>,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl Drop for Shared {
    /// Releases the lock, then leaves the registry: until then, an open in this process waits
    /// for the lock to be free instead of mistaking it for another process's.
    fn drop(&mut self) {
        drop(self.lock.take());
        OPEN.lock().unwrap_or_else(|p| p.into_inner()).retain(|(p, _)| *p != self.path);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// One table's cached rows (`None`: known absent), and how many writes it has seen, so that a
/// read that raced a write does not cache what it read.
#[derive(Default)]
struct TableCache {
    generation: u64,
    rows: HashMap<String, Option<Row>>,
}

/// The handles open in this process, by database path.
static OPEN: Mutex<Vec<(PathBuf, Weak<Shared>)>> = Mutex::new(Vec::new());

/// The lock and cache for the database at `path`: those of a handle already open in this
/// process, or new ones after taking the file's lock.
fn share(path: &Path) -> Result<Arc<Shared>, StoreError> {
    let name =
        path.file_name().ok_or_else(|| StoreError::Database(format!("{} is not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| StoreError::Database(format!("cannot open the directory of {}: {e}", path.display())))?;
    let canonical = dir.join(name);
    let mut open = loop {
        let open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        match open.iter().find(|(p, _)| *p == canonical) {
            None => break open,
            Some((_, w)) => match w.upgrade() {
                Some(shared) => return Ok(shared),
                // The last handle of this process is closing: wait until it released the lock.
                None => {
                    drop(open);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            },
        }
    };
    let mut lock_name = name.to_os_string();
    lock_name.push("-lock");
    let lock_path = dir.join(lock_name);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Database(format!("cannot open {}: {e}", lock_path.display())))?;
    // A lock can outlive its last handle for a moment: a child process forked by another thread
    // holds a copy of the descriptor until it execs. Another process really holding it still
    // does after a second.
    let mut attempts = 0;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if attempts < 100 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::InUse { path: canonical }),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::Database(format!("cannot lock {}: {e}", lock_path.display())))
            }
        }
    }
    let shared = Arc::new(Shared {
        lock: Some(lock),
        path: canonical.clone(),
        cache: Mutex::new(HashMap::new()),
        hits: Default::default(),
        misses: Default::default(),
    });
    open.push((canonical, Arc::downgrade(&shared)));
    Ok(shared)
}

/// How often the checkpoint thread copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// WAL size (pages) at which a commit checkpoints by itself. The checkpoint thread's PASSIVE
/// checkpoints copy frames into the database file but, while commits keep coming, never find the
/// whole WAL copied, so they neither fsync the database file nor let the WAL start over: under
/// sustained writes the WAL grows to this size (80 MiB) and then the writing commit completes
/// the checkpoint itself (it has only the last ≤ 200 ms of frames left to copy; its fsync of the
/// database file took 1–9 ms, measured in BENCHMARKS session 15), and the WAL restarts.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 20_000;

/// Copies committed WAL frames into the database file, beside the writer (a PASSIVE checkpoint
/// neither blocks nor waits for it), until `stop`'s sender is dropped.
fn checkpointer(conn: Connection, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the next one retries");
        }
    }
}

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let shared = share(path)?;
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
        // WAL for concurrent readers; FULL so a committed batch survives power loss;
        // secure_delete so deleted rows (destroyed key material) are overwritten with zeros.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        conn.pragma_update(None, "secure_delete", "ON").map_err(db)?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).map_err(db)?;
        let checkpoint_conn = Connection::open(path).map_err(db)?;
        checkpoint_conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
        checkpoint_conn.pragma_update(None, "synchronous", "FULL").map_err(db)?;
        let (stop, stopped) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("custody-checkpoint".into())
            .spawn(move || checkpointer(checkpoint_conn, stopped))
            .map_err(|e| StoreError::Database(format!("cannot start the checkpoint thread: {e}")))?;
        let mut backend = Self {
            shared,
            conn: Mutex::new(conn),
            readers: Vec::new(),
            next_reader: Default::default(),
            _checkpointer: stop,
        };
        backend.migrate()?;
        for _ in 0..READERS {
            let reader = Connection::open(path).map_err(db)?;
            reader.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
            reader.pragma_update(None, "query_only", "ON").map_err(db)?;
            backend.readers.push(Mutex::new(reader));
        }
        Ok(backend)
    }

    /// Schema version this binary writes.
    pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);",
        )
        .map_err(db)?;
        let current: u32 =
            tx.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", [], |r| r.get(0)).map_err(db)?;
        if current > Self::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew { found: current, supported: Self::SCHEMA_VERSION });
        }
        // A new store (no rows table yet) just creates its tables; an existing one is rewritten.
        let existing: bool = tx
            .query_row("SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE name = 'rows')", [], |r| r.get(0))
            .map_err(db)?;
        let upgrading = existing && current < Self::SCHEMA_VERSION;
        let started = std::time::Instant::now();
        if upgrading {
            tracing::info!(
                from = current,
                to = Self::SCHEMA_VERSION,
                "upgrading the store's schema: every row is copied once (15-25 s per GB of store on a small VM), which needs free disk space of about twice the store until it is done"
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.execute_batch(sql).map_err(db)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, datetime('now'))",
                params![i as u32 + 1],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        if upgrading {
            // The rewrite went through the WAL, which keeps its size once grown: copy it into the
            // database and truncate it, so the upgrade leaves no store-sized WAL behind. The
            // upgrade is committed either way: if the checkpoint thread keeps the log busy (a
            // large log on a slow disk), say so and open the store rather than fail.
            if let Err(e) = checkpoint_truncate(&conn) {
                tracing::warn!(error = %e, "the upgrade is done, but the write-ahead log could not be truncated: it keeps its size (reused, not grown) until the next truncation, which a key's destruction makes");
            }
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "store schema upgraded");
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied batch (transactions roll
        // back on drop), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free read connection if there is one, else the next in turn. Each read is one
    /// statement in autocommit mode, so it sees everything committed before it started.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        let start = self.next_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..self.readers.len() {
            match self.readers[(start + i) % self.readers.len()].try_lock() {
                Ok(g) => return g,
                Err(std::sync::TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        self.readers[start % self.readers.len()].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<Table, TableCache>> {
        self.shared.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the rows `writes` touch. Called after their transaction ends, whatever its
    /// outcome, with the writer lock still held.
    fn evict(&self, writes: &[Write]) {
        let mut cache = self.cache();
        for w in writes {
            let (Write::Put { table, key, .. } | Write::Delete { table, key, .. }) = w;
            if cached(*table) {
                let t = cache.entry(*table).or_default();
                t.generation += 1;
                t.rows.remove(key);
            }
        }
    }

    fn read_row(&self, table: Table, key: &str) -> Result<Option<Row>, StoreError> {
        let conn = self.reader();
        let row =
            |r: &rusqlite::Row<'_>| Ok(Row { key: key.to_string(), rev: r.get::<_, i64>(0)? as u64, value: r.get(1)? });
        match Place::of(table, key) {
            Ok(Place::Rows(tbl, key)) => conn
                .prepare_cached("SELECT rev, value FROM rows WHERE tbl = ?1 AND key = ?2")
                .map_err(db)?
                .query_row(params![tbl, key], row),
            Ok(Place::Audit(seq)) => conn
                .prepare_cached("SELECT rev, value FROM audit_rows WHERE seq = ?1")
                .map_err(db)?
                .query_row([seq], row),
            // No such key can have been written.
            Err(_) => return Ok(None),
        }
        .optional()
        .map_err(db)
    }

    /// [`Backend::scan`] of the audit trail's rows, whose keys are all 20 digits: those starting
    /// with `prefix` are a range of numbers, and those after `after` the numbers from the first
    /// 20-digit key above it.
    fn scan_audit(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<Row>, StoreError> {
        if prefix.len() > 20 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Vec::new());
        }
        let low = padded(prefix, '0').max(after.map_or(0, first_key_above));
        let high = padded(prefix, '9').min(i128::from(i64::MAX));
        if low > high {
            return Ok(Vec::new());
        }
        let (low, high) = (low as i64, high as i64);
        let conn = self.reader();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, rev, value FROM audit_rows WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt.query_map(params![low, high, limit.min(i64::MAX as usize) as i64], audit_row).map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }
}

/// `head` (at most 20 digits) filled up to 20 with `fill` (a digit), as a number.
fn padded(head: &str, fill: char) -> i128 {
    let mut k = head.to_string();
    k.extend(std::iter::repeat_n(fill, 20 - head.len()));
    k.parse().expect("20 digits fit in an i128")
}

/// The smallest number whose 20-digit key sorts after `a` in byte order.
fn first_key_above(a: &str) -> i128 {
    // Keys that start with `a`'s leading digits sort after `a` when `a` ends before their 20th
    // digit, or continues with a byte below '0'; otherwise all of them sort before it.
    let digits = a.bytes().take_while(u8::is_ascii_digit).count().min(20);
    let head = &a[..digits];
    match a.as_bytes().get(digits) {
        None if digits < 20 => padded(head, '0'),
        Some(b) if digits < 20 && *b < b'0' => padded(head, '0'),
        _ => padded(head, '9') + 1,
    }
}

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row { key: crate::sequence_key(r.get::<_, i64>(0)? as u64), rev: r.get::<_, i64>(1)? as u64, value: r.get(2)? })
}

impl Backend for SqliteBackend {
    fn cache_stats(&self) -> Option<crate::CacheStats> {
        use std::sync::atomic::Ordering::Relaxed;
        Some(crate::CacheStats { hits: self.shared.hits.load(Relaxed), misses: self.shared.misses.load(Relaxed) })
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Row>, StoreError> {
        if !cached(table) {
            return self.read_row(table, key);
        }
        let generation = {
            let mut cache = self.cache();
            let t = cache.entry(table).or_default();
            if let Some(hit) = t.rows.get(key) {
                self.shared.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(hit.clone());
            }
            t.generation
        };
        self.shared.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let row = self.read_row(table, key)?;
        let mut cache = self.cache();
        // A write to this table since the read began may have made `row` old: then do not keep it.
        if cache.get(&table).is_some_and(|t| t.generation == generation) {
            if cache.values().map(|t| t.rows.len()).sum::<usize>() >= CACHE_ROWS {
                cache.values_mut().for_each(|t| t.rows.clear());
            }
            cache.entry(table).or_default().rows.insert(key.to_string(), row.clone());
        }
        Ok(row)
    }

    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<Row>, StoreError> {
        if table == Table::Audit {
            return self.scan_audit(prefix, after, limit);
        }
        let conn = self.reader();
        // Range scan on the primary key: prefix <= key < prefix + U+10FFFF, which covers every
        // key starting with `prefix` without LIKE's escaping rules.
        let upper = format!("{prefix}\u{10FFFF}");
        let lower = after.filter(|a| *a >= prefix).unwrap_or(prefix);
        let strict = after.is_some_and(|a| a >= prefix);
        let sql = if strict {
            "SELECT key, rev, value FROM rows WHERE tbl = ?1 AND key > ?2 AND key < ?3 ORDER BY key LIMIT ?4"
        } else {
            "SELECT key, rev, value FROM rows WHERE tbl = ?1 AND key >= ?2 AND key < ?3 ORDER BY key LIMIT ?4"
        };
        let mut stmt = conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt
            .query_map(params![table.name(), lower, upper, limit.min(i64::MAX as usize) as i64], |r| {
                Ok(Row { key: r.get(0)?, rev: r.get::<_, i64>(1)? as u64, value: r.get(2)? })
            })
            .map_err(db)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db)
    }

    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        let conn = self.reader();
        if table == Table::Audit {
            return conn
                .prepare_cached("SELECT seq, rev, value FROM audit_rows ORDER BY seq DESC LIMIT 1")
                .map_err(db)?
                .query_row([], audit_row)
                .optional()
                .map_err(db);
        }
        let mut stmt = conn
            .prepare_cached("SELECT key, rev, value FROM rows WHERE tbl = ?1 ORDER BY key DESC LIMIT 1")
            .map_err(db)?;
        stmt.query_row(params![table.name()], |r| {
            Ok(Row { key: r.get(0)?, rev: r.get::<_, i64>(1)? as u64, value: r.get(2)? })
        })
        .optional()
        .map_err(db)
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let result = Self::apply_in(&mut conn, writes);
        self.evict(writes);
        result
    }

    fn erase_freed(&self) -> Result<(), StoreError> {
        let conn = self.lock();
        // Copy the WAL's pages (including the zeroed ones secure_delete wrote) into the main file
        // and truncate the WAL, so old page images with the deleted bytes are gone from it.
        checkpoint_truncate(&conn)
    }
}

impl SqliteBackend {
    fn apply_in(conn: &mut Connection, writes: &[Write]) -> Result<(), StoreError> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        for w in writes {
            let (table, key, expect) = match w {
                Write::Put { table, key, expect, .. } | Write::Delete { table, key, expect } => (*table, key, *expect),
            };
            let place = Place::of(table, key)?;
            // The common append (audit records, new keys): one INSERT, a duplicate is a conflict.
            if let Write::Put { value, expect: Expect::Absent, .. } = w {
                let inserted = match place {
                    Place::Rows(tbl, key) => tx
                        .prepare_cached("INSERT INTO rows (tbl, key, rev, value) VALUES (?1, ?2, 1, ?3) ON CONFLICT (tbl, key) DO NOTHING")
                        .map_err(db)?
                        .execute(params![tbl, key, value]),
                    Place::Audit(seq) => tx
                        .prepare_cached("INSERT INTO audit_rows (seq, rev, value) VALUES (?1, 1, ?2) ON CONFLICT (seq) DO NOTHING")
                        .map_err(db)?
                        .execute(params![seq, value]),
                }
                .map_err(db)?;
                if inserted == 0 {
                    return Err(StoreError::Conflict { table: table.name(), key: key.clone() });
                }
                continue;
            }
            let current: Option<i64> = match place {
                Place::Rows(tbl, key) => tx
                    .prepare_cached("SELECT rev FROM rows WHERE tbl = ?1 AND key = ?2")
                    .map_err(db)?
                    .query_row(params![tbl, key], |r| r.get(0)),
                Place::Audit(seq) => tx
                    .prepare_cached("SELECT rev FROM audit_rows WHERE seq = ?1")
                    .map_err(db)?
                    .query_row([seq], |r| r.get(0)),
            }
            .optional()
            .map_err(db)?;
            expect.check(table, key, current.map(|r| r as u64))?;
            let rev = current.unwrap_or(0) + 1;
            match (w, place) {
                (Write::Put { value, .. }, Place::Rows(tbl, key)) => tx
                    .prepare_cached(
                        "INSERT INTO rows (tbl, key, rev, value) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (tbl, key) DO UPDATE SET rev = excluded.rev, value = excluded.value",
                    )
                    .map_err(db)?
                    .execute(params![tbl, key, rev, value]),
                (Write::Put { value, .. }, Place::Audit(seq)) => tx
                    .prepare_cached(
                        "INSERT INTO audit_rows (seq, rev, value) VALUES (?1, ?2, ?3)
                         ON CONFLICT (seq) DO UPDATE SET rev = excluded.rev, value = excluded.value",
                    )
                    .map_err(db)?
                    .execute(params![seq, rev, value]),
                (Write::Delete { .. }, Place::Rows(tbl, key)) => tx
                    .prepare_cached("DELETE FROM rows WHERE tbl = ?1 AND key = ?2")
                    .map_err(db)?
                    .execute(params![tbl, key]),
                (Write::Delete { .. }, Place::Audit(seq)) => {
                    tx.prepare_cached("DELETE FROM audit_rows WHERE seq = ?1").map_err(db)?.execute([seq])
                }
            }
            .map_err(db)?;
        }
        tx.commit().map_err(db)
    }
}

/// Copies the whole WAL into the database file and truncates it. SQLite answers "busy" without
/// doing anything while another checkpoint runs (the checkpoint thread's, every 200 ms): try
/// again until it is done, for at most 10 s.
fn checkpoint_truncate(conn: &Connection) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).map_err(db)?;
        if busy == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(StoreError::Database(
                "the write-ahead log could not be checkpointed: the database stayed busy for 10 s".into(),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(table: Table, key: &str, value: &[u8], expect: Expect) -> Write {
        Write::Put { table, key: key.into(), value: value.to_vec(), expect }
    }

    /// A store written by a binary of schema 1 (rows in a WITHOUT ROWID table) opens with every
    /// row, revision and byte intact, now in a rowid table (the audit trail's in its own), and
    /// takes writes as before.
    #[test]
    fn a_schema_1_store_is_migrated_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let big = vec![7u8; 20_000];
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
                 INSERT INTO schema_migrations VALUES (1, datetime('now'));",
            )
            .unwrap();
            let mut insert = conn.prepare("INSERT INTO rows (tbl, key, rev, value) VALUES (?1, ?2, ?3, ?4)").unwrap();
            insert.execute(params![Table::Keys.name(), "k1", 3, b"one".as_slice()]).unwrap();
            insert.execute(params![Table::Audit.name(), "00000000000000000042", 1, big.as_slice()]).unwrap();
        }
        let b = SqliteBackend::open(&path).unwrap();
        let k1 = b.get(Table::Keys, "k1").unwrap().unwrap();
        assert_eq!((k1.rev, k1.value.as_slice()), (3, b"one".as_slice()));
        assert_eq!(b.last(Table::Audit).unwrap().unwrap().value, big);
        b.apply(&[put(Table::Keys, "k1", b"two", Expect::Rev(3)), put(Table::Keys, "k2", b"new", Expect::Absent)])
            .unwrap();
        assert_eq!(b.get(Table::Keys, "k1").unwrap().unwrap().rev, 4);
        let conflict = b.apply(&[put(Table::Keys, "k2", b"again", Expect::Absent)]).unwrap_err();
        assert!(matches!(conflict, StoreError::Conflict { .. }), "{conflict}");
        let conn = b.lock();
        let sql: String =
            conn.query_row("SELECT sql FROM sqlite_schema WHERE name = 'rows'", [], |r| r.get(0)).unwrap();
        assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
        let version: u32 = conn.query_row("SELECT MAX(version) FROM schema_migrations", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SqliteBackend::SCHEMA_VERSION);
        assert_eq!(version, 3);
        let left: i64 = conn.query_row("SELECT count(*) FROM rows WHERE tbl = 'audit'", [], |r| r.get(0)).unwrap();
        let moved: (i64, i64) =
            conn.query_row("SELECT seq, rev FROM audit_rows", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!((left, moved), (0, (42, 1)));
        drop(conn);
        // The rewrite (20 KB of audit row, copied) left no WAL behind.
        let wal = std::fs::metadata(dir.path().join("s.db-wal")).map(|m| m.len()).unwrap_or(0);
        assert!(wal < 20_000, "WAL of {wal} bytes after the upgrade");
    }

    /// The audit trail's rows, stored by number, scan exactly as keys in byte order would: every
    /// prefix and every `after` (keys of the table or not) against a model of sorted strings.
    #[test]
    fn audit_rows_scan_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = SqliteBackend::open(&dir.path().join("s.db")).unwrap();
        let seqs = [0u64, 1, 2, 9, 10, 11, 99, 100, 101, 1000, 123_456, 9_000_000_000_000_000_000, i64::MAX as u64];
        let keys: Vec<String> = seqs.iter().map(|n| format!("{n:020}")).collect();
        b.apply(&keys.iter().map(|k| put(Table::Audit, k, k.as_bytes(), Expect::Absent)).collect::<Vec<_>>()).unwrap();
        let mut probes: Vec<String> = keys.clone();
        probes.extend(
            ["", "0", "00000000000000000001", "0000000000000000001", "00000000000000000010x", "0000000000000000000/"]
                .map(String::from),
        );
        probes.extend(
            ["0000000000000000001:", "000000000000000000099", "9", "a", "/", "00000000000000000100"].map(String::from),
        );
        probes
            .extend(["99999999999999999999", "099999999999999999999", "09223372036854775806x", "1"].map(String::from));
        let prefixes =
            ["", "0", "000000000000000000", "0000000000000000001", "00000000000000000100", "9", "x", "1", "09", "0922"];
        for prefix in prefixes {
            for after in probes.iter().map(|a| Some(a.as_str())).chain([None]) {
                for limit in [1, 3, 100] {
                    let got: Vec<String> =
                        b.scan(Table::Audit, prefix, after, limit).unwrap().into_iter().map(|r| r.key).collect();
                    let want: Vec<String> = keys
                        .iter()
                        .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
                        .take(limit)
                        .cloned()
                        .collect();
                    assert_eq!(got, want, "prefix {prefix:?}, after {after:?}, limit {limit}");
                }
            }
        }
        assert_eq!(b.last(Table::Audit).unwrap().unwrap().key, keys[keys.len() - 1]);
        assert_eq!(b.get(Table::Audit, &keys[3]).unwrap().unwrap().value, keys[3].as_bytes());
        assert!(b.get(Table::Audit, "9").unwrap().is_none());
        let refused = b.apply(&[put(Table::Audit, "42", b"r", Expect::Absent)]).unwrap_err();
        assert!(refused.to_string().contains("20-digit"), "{refused}");
        let dup = b.apply(&[put(Table::Audit, &keys[0], b"r", Expect::Absent)]).unwrap_err();
        assert!(matches!(dup, StoreError::Conflict { .. }), "{dup}");
        b.apply(&[
            put(Table::Audit, &keys[0], b"resealed", Expect::Rev(1)),
            Write::Delete { table: Table::Audit, key: keys[1].clone(), expect: Expect::Rev(1) },
        ])
        .unwrap();
        assert_eq!(b.get(Table::Audit, &keys[0]).unwrap().unwrap().rev, 2);
        assert!(b.get(Table::Audit, &keys[1]).unwrap().is_none());
    }

    /// `erase_freed` is done only when the WAL is empty, also when the checkpoint thread was
    /// copying the WAL at the same moment (SQLite then answers "busy" and copies nothing).
    #[test]
    fn erase_freed_empties_the_wal_even_beside_the_checkpoint_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let b = SqliteBackend::open(&path).unwrap();
        let wal = dir.path().join("s.db-wal");
        for round in 0..12 {
            for i in 0..150 {
                b.apply(&[put(Table::Versions, &format!("r{round}/{i}"), &[round as u8; 3000], Expect::Any)]).unwrap();
            }
            b.erase_freed().unwrap();
            let left = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            assert_eq!(left, 0, "round {round}: {left} bytes of WAL after erase_freed");
        }
    }

    #[test]
    fn deleted_bytes_leave_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let b = SqliteBackend::open(&path).unwrap();
        let canary = b"canary-0123456789-canary-0123456789";
        b.apply(&[
            put(Table::Versions, "k/1", canary, Expect::Any),
            put(Table::Versions, "k/2", b"other", Expect::Any),
        ])
        .unwrap();
        b.apply(&[Write::Delete { table: Table::Versions, key: "k/1".into(), expect: Expect::Any }]).unwrap();
        b.erase_freed().unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(f.unwrap().path()).unwrap();
            assert!(!bytes.windows(canary.len()).any(|w| w == canary));
        }
    }
}
