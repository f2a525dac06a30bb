//! One conformance suite for every [`Backend`]: written once, run on SQLite and on PostgreSQL.
//!
//! PostgreSQL is `CUSTODY_TEST_DATABASE_URL`, else the development and CI machines' server at
//! 127.0.0.1:5432 (database `test`, trust auth). If neither is reachable the PostgreSQL tests
//! fail and say how to provide one: they never pass without having run.

use std::sync::Arc;

use custody_store::{Backend, Expect, PostgresBackend, PostgresOptions, Row, SqliteBackend, StoreError, Table, Write};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh, empty store, and how to open the same store again.
trait Fixture {
    fn backend(&self) -> Arc<dyn Backend>;
    fn reopen(&self) -> Arc<dyn Backend>;
}

struct Sqlite {
    dir: tempfile::TempDir,
    first: Arc<dyn Backend>,
}

impl Sqlite {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let first: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("s.db")).unwrap());
        Self { dir, first }
    }
}

impl Fixture for Sqlite {
    fn backend(&self) -> Arc<dyn Backend> {
        self.first.clone()
    }
    fn reopen(&self) -> Arc<dyn Backend> {
        Arc::new(SqliteBackend::open(&self.dir.path().join("s.db")).unwrap())
    }
}

struct Postgres {
    opts: PostgresOptions,
    first: Option<Arc<PostgresBackend>>,
}

impl Postgres {
    fn new() -> Self {
        let url = std::env::var("CUSTODY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let schema = format!("custody_test_{}", uuid_like());
        let opts = PostgresOptions { url: url.clone(), schema, allow_plaintext: false, ca_file: None };
        let first = PostgresBackend::connect(&opts).unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url}: {e}\n\
                 Start it (scripts/test starts an installed but stopped server), or set \
                 CUSTODY_TEST_DATABASE_URL=postgres://USER@HOST:PORT/DB to a database these tests may \
                 create schemas in."
            )
        });
        Self { opts, first: Some(Arc::new(first)) }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(b) = self.first.take().and_then(|b| Arc::try_unwrap(b).ok()) {
            let _ = b.drop_schema();
        }
    }
}

impl Fixture for Postgres {
    fn backend(&self) -> Arc<dyn Backend> {
        self.first.clone().unwrap()
    }
    fn reopen(&self) -> Arc<dyn Backend> {
        Arc::new(PostgresBackend::connect(&self.opts).unwrap())
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}_{}", nanos, std::process::id())
}

fn put(table: Table, key: &str, value: &[u8], expect: Expect) -> Write {
    Write::Put { table, key: key.into(), value: value.to_vec(), expect }
}

fn keys(rows: Vec<Row>) -> Vec<String> {
    rows.into_iter().map(|r| r.key).collect()
}

fn revisions_and_preconditions(f: &dyn Fixture) {
    let b = f.backend();
    b.apply(&[put(Table::Keys, "a", b"1", Expect::Absent)]).unwrap();
    assert_eq!(b.get(Table::Keys, "a").unwrap().unwrap().rev, 1);
    assert!(matches!(b.apply(&[put(Table::Keys, "a", b"x", Expect::Absent)]), Err(StoreError::Conflict { .. })));
    b.apply(&[put(Table::Keys, "a", b"2", Expect::Rev(1))]).unwrap();
    let row = b.get(Table::Keys, "a").unwrap().unwrap();
    assert_eq!((row.rev, row.value.as_slice()), (2, &b"2"[..]));
    assert!(matches!(b.apply(&[put(Table::Keys, "a", b"3", Expect::Rev(1))]), Err(StoreError::Conflict { .. })));
    b.apply(&[put(Table::Keys, "a", b"3", Expect::Any)]).unwrap();
    assert_eq!(b.get(Table::Keys, "a").unwrap().unwrap().rev, 3);
    assert!(matches!(b.apply(&[put(Table::Keys, "nope", b"x", Expect::Rev(1))]), Err(StoreError::Conflict { .. })));
    // Delete with a stale revision fails; with the right one it goes.
    let del = |rev| Write::Delete { table: Table::Keys, key: "a".into(), expect: Expect::Rev(rev) };
    assert!(matches!(b.apply(&[del(2)]), Err(StoreError::Conflict { .. })));
    b.apply(&[del(3)]).unwrap();
    assert!(b.get(Table::Keys, "a").unwrap().is_none());
    // After a delete the key can be inserted again, from revision 1.
    b.apply(&[put(Table::Keys, "a", b"again", Expect::Absent)]).unwrap();
    assert_eq!(b.get(Table::Keys, "a").unwrap().unwrap().rev, 1);
}

fn batches_are_all_or_nothing(f: &dyn Fixture) {
    let b = f.backend();
    b.apply(&[put(Table::Keys, "a", b"1", Expect::Absent)]).unwrap();
    // A failed precondition anywhere in the batch writes nothing, wherever it comes.
    for order in [0, 1] {
        let mut batch = vec![
            put(Table::Keys, "b", b"new", Expect::Absent),
            put(Table::Aliases, "x", b"new", Expect::Any),
            Write::Delete { table: Table::Keys, key: "a".into(), expect: Expect::Any },
            put(Table::Keys, "a", b"stale", Expect::Rev(7)),
        ];
        if order == 1 {
            batch.reverse();
        }
        assert!(matches!(b.apply(&batch), Err(StoreError::Conflict { .. })));
        assert!(b.get(Table::Keys, "b").unwrap().is_none());
        assert!(b.get(Table::Aliases, "x").unwrap().is_none());
        assert_eq!(b.get(Table::Keys, "a").unwrap().unwrap().value, b"1");
    }
    // An empty batch is fine.
    b.apply(&[]).unwrap();
}

fn scans_are_ordered_prefixed_and_paginated(f: &dyn Fixture) {
    let b = f.backend();
    let names = ["t1/a", "t1/b", "t1/c", "t2/a", "t1", "t1/B", "t1/é", "t1/Z"];
    let writes: Vec<_> = names.iter().map(|k| put(Table::Aliases, k, b"v", Expect::Any)).collect();
    b.apply(&writes).unwrap();
    // Byte order (upper case before lower case; UTF-8 after ASCII), whatever the locale.
    assert_eq!(
        keys(b.scan(Table::Aliases, "t1/", None, 10).unwrap()),
        ["t1/B", "t1/Z", "t1/a", "t1/b", "t1/c", "t1/é"]
    );
    assert_eq!(keys(b.scan(Table::Aliases, "t1/", None, 2).unwrap()), ["t1/B", "t1/Z"]);
    assert_eq!(keys(b.scan(Table::Aliases, "t1/", Some("t1/b"), 10).unwrap()), ["t1/c", "t1/é"]);
    // `after` before the prefix starts at the prefix.
    assert_eq!(keys(b.scan(Table::Aliases, "t1/", Some("a"), 1).unwrap()), ["t1/B"]);
    assert_eq!(keys(b.scan(Table::Aliases, "", None, 100).unwrap()).len(), names.len());
    assert!(b.scan(Table::Keys, "", None, 10).unwrap().is_empty(), "tables are separate");
    assert_eq!(b.last(Table::Aliases).unwrap().unwrap().key, "t2/a");
    assert!(b.last(Table::Keys).unwrap().is_none());
    // Zero-padded sequence numbers sort as numbers (the audit trail relies on it).
    let seq: Vec<_> =
        [9u64, 10, 100, 2].iter().map(|n| put(Table::Audit, &format!("{n:020}"), b"r", Expect::Absent)).collect();
    b.apply(&seq).unwrap();
    assert_eq!(b.last(Table::Audit).unwrap().unwrap().key, format!("{:020}", 100));
}

fn values_are_kept_exactly(f: &dyn Fixture) {
    let b = f.backend();
    let big: Vec<u8> = (0..65_536u32).map(|i| (i * 31 % 251) as u8).collect();
    let zeros = vec![0u8; 1000];
    b.apply(&[
        put(Table::Versions, "big", &big, Expect::Absent),
        put(Table::Versions, "zeros", &zeros, Expect::Absent),
        put(Table::Versions, "empty", b"", Expect::Absent),
    ])
    .unwrap();
    assert_eq!(b.get(Table::Versions, "big").unwrap().unwrap().value, big);
    assert_eq!(b.get(Table::Versions, "zeros").unwrap().unwrap().value, zeros);
    assert_eq!(b.get(Table::Versions, "empty").unwrap().unwrap().value, b"");
}

fn reopening_keeps_data_and_schema(f: &dyn Fixture) {
    f.backend().apply(&[put(Table::Meta, "m", b"v", Expect::Any)]).unwrap();
    let again = f.reopen();
    assert_eq!(again.get(Table::Meta, "m").unwrap().unwrap().value, b"v");
    // And the reopened store sees later writes of the first.
    f.backend().apply(&[put(Table::Meta, "n", b"w", Expect::Any)]).unwrap();
    assert_eq!(again.get(Table::Meta, "n").unwrap().unwrap().value, b"w");
}

fn every_handle_reads_every_write(f: &dyn Fixture) {
    // A row one handle has read (and may keep) changes, disappears and comes back through the
    // other: the first handle sees each state at once, never an older one.
    let (a, b) = (f.backend(), f.reopen());
    a.apply(&[put(Table::Keys, "hot", b"1", Expect::Absent)]).unwrap();
    for _ in 0..2 {
        assert_eq!(a.get(Table::Keys, "hot").unwrap().unwrap().value, b"1");
    }
    assert!(a.get(Table::Principals, "later").unwrap().is_none());
    b.apply(&[put(Table::Keys, "hot", b"2", Expect::Rev(1)), put(Table::Principals, "later", b"p", Expect::Absent)])
        .unwrap();
    let row = a.get(Table::Keys, "hot").unwrap().unwrap();
    assert_eq!((row.rev, row.value.as_slice()), (2, &b"2"[..]));
    assert_eq!(a.get(Table::Principals, "later").unwrap().unwrap().value, b"p");
    b.apply(&[Write::Delete { table: Table::Keys, key: "hot".into(), expect: Expect::Rev(2) }]).unwrap();
    assert!(a.get(Table::Keys, "hot").unwrap().is_none());
    // Reads racing writes: whatever a reader sees is never older than the last write it knows of.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 1..=300u32 {
                b.apply(&[put(Table::Keys, "race", &i.to_be_bytes(), Expect::Any)]).unwrap();
            }
        });
        s.spawn(|| {
            let mut last = 0;
            while last < 300 {
                if let Some(row) = a.get(Table::Keys, "race").unwrap() {
                    let seen = u32::from_be_bytes(row.value.as_slice().try_into().unwrap());
                    assert!(seen >= last, "read {seen} after {last}");
                    last = seen;
                }
            }
        });
    });
}

fn concurrent_writers_never_both_win(f: &dyn Fixture) {
    // Two handles (two nodes, for PostgreSQL) race to move the same row from revision 1.
    let (a, b) = (f.backend(), f.reopen());
    for round in 0..20 {
        let key = format!("race-{round}");
        a.apply(&[put(Table::Keys, &key, b"0", Expect::Absent)]).unwrap();
        let results: Vec<bool> = std::thread::scope(|s| {
            let ha = s.spawn(|| a.apply(&[put(Table::Keys, &key, b"a", Expect::Rev(1))]).is_ok());
            let hb = s.spawn(|| b.apply(&[put(Table::Keys, &key, b"b", Expect::Rev(1))]).is_ok());
            vec![ha.join().unwrap(), hb.join().unwrap()]
        });
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "round {round}: {results:?}");
        assert_eq!(a.get(Table::Keys, &key).unwrap().unwrap().rev, 2);
    }
    // Many appends from several threads: every one lands once.
    std::thread::scope(|s| {
        for t in 0..4 {
            let h = if t % 2 == 0 { a.clone() } else { b.clone() };
            s.spawn(move || {
                for i in 0..25 {
                    h.apply(&[put(Table::Audit, &format!("{:020}", t * 1000 + i), b"x", Expect::Absent)]).unwrap();
                }
            });
        }
    });
    assert_eq!(a.scan(Table::Audit, "", None, 1000).unwrap().len(), 100);
}

fn erase_freed_runs(f: &dyn Fixture) {
    let b = f.backend();
    b.apply(&[put(Table::Versions, "k/1", b"secret", Expect::Any)]).unwrap();
    b.apply(&[Write::Delete { table: Table::Versions, key: "k/1".into(), expect: Expect::Any }]).unwrap();
    b.erase_freed().unwrap();
    assert!(b.get(Table::Versions, "k/1").unwrap().is_none());
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(&super::Sqlite::new()); })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(&super::Postgres::new()); })*
        }
    };
}

suite!(
    revisions_and_preconditions,
    batches_are_all_or_nothing,
    scans_are_ordered_prefixed_and_paginated,
    values_are_kept_exactly,
    reopening_keeps_data_and_schema,
    every_handle_reads_every_write,
    concurrent_writers_never_both_win,
    erase_freed_runs,
);

/// A SQLite store belongs to one process (its handles share a cache of hot rows, which another
/// process's writes would make stale): a second process cannot open it while one has it open.
#[test]
fn a_sqlite_store_belongs_to_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let lock = dir.path().join("s.db-lock");
    let try_lock_elsewhere = || {
        let status = std::process::Command::new("flock").arg("--nonblock").arg(&lock).arg("true").status();
        status.expect("util-linux flock runs").success()
    };
    let first = SqliteBackend::open(&path).unwrap();
    let second = SqliteBackend::open(&path).unwrap();
    assert!(!try_lock_elsewhere(), "another process must not get the store while this one has it open");
    drop(first);
    assert!(!try_lock_elsewhere(), "one handle still has it open");
    drop(second);
    assert!(try_lock_elsewhere(), "free once every handle is closed");

    // And the other way round: a store another process holds is refused, with what to do.
    let mut holder = std::process::Command::new("flock").arg(&lock).arg("sleep").arg("30").spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused = loop {
        match SqliteBackend::open(&path) {
            Err(e @ StoreError::InUse { .. }) => break e,
            Ok(b) if std::time::Instant::now() < deadline => {
                drop(b);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => panic!("the store must be refused while another process holds it: {other:?}"),
        }
    };
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(refused.to_string().contains("in use by another process"), "{refused}");
}

#[test]
fn a_remote_database_without_tls_is_refused() {
    let opts = PostgresOptions {
        url: "postgres://custody@db.example.internal:5432/custody".into(),
        schema: "custody".into(),
        allow_plaintext: false,
        ca_file: None,
    };
    let e = PostgresBackend::connect(&opts).unwrap_err().to_string();
    assert!(e.contains("database_ca_file") && e.contains("danger_allow_plaintext_database"), "{e}");
    // A bad schema name never reaches SQL.
    let bad = PostgresOptions {
        url: DEFAULT_URL.into(),
        schema: "x; DROP TABLE y".into(),
        allow_plaintext: false,
        ca_file: None,
    };
    assert!(PostgresBackend::connect(&bad).unwrap_err().to_string().contains("invalid schema name"));
}

/// The test server's own certificate file and whether it has TLS on (asked over a plain
/// loopback connection).
fn server_tls() -> (bool, String) {
    let url = std::env::var("CUSTODY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let ssl: String = client.query_one("SHOW ssl", &[]).await.unwrap().get(0);
        let cert: String = client.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
        (ssl == "on", cert)
    })
}

#[test]
fn tls_to_postgresql_is_verified() {
    let (on, cert) = server_tls();
    assert!(
        on,
        "the test PostgreSQL has ssl = off: turn it on (Debian's default configuration has it, with the snakeoil \
         certificate for localhost) so the TLS path is tested"
    );
    let schema = format!("custody_test_{}", uuid_like());
    let url = "postgres://postgres@localhost:5432/test?sslmode=require&application_name=custody_tls_test".to_string();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&cert, &ca).unwrap_or_else(|e| panic!("cannot read the server certificate {cert}: {e}"));

    // Verified against the right CA: TLS 1.3, and it works.
    let opts =
        PostgresOptions { url: url.clone(), schema: schema.clone(), allow_plaintext: false, ca_file: Some(ca.clone()) };
    let b = PostgresBackend::connect(&opts).unwrap();
    b.apply(&[put(Table::Meta, "tls", b"yes", Expect::Any)]).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls13: i64 = rt.block_on(async {
        let plain = std::env::var("CUSTODY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        let (client, conn) = tokio_postgres::connect(&plain, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid)
                 WHERE application_name = 'custody_tls_test' AND ssl AND version = 'TLSv1.3'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    });
    assert!(tls13 >= 2, "custody's connections are TLS 1.3: {tls13}");
    b.drop_schema().unwrap();

    // Another CA: the handshake fails, nothing is sent.
    let other = dir.path().join("other.pem");
    let now = time::OffsetDateTime::now_utc();
    let foreign = custody_crypto::pki::new_ca("not the database's CA", now, time::Duration::days(1)).unwrap();
    std::fs::write(&other, foreign.cert_pem).unwrap();
    let e =
        PostgresBackend::connect(&PostgresOptions { ca_file: Some(other), ..opts.clone() }).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // sslmode=require without a CA file: refused with what to set.
    let e = PostgresBackend::connect(&PostgresOptions { ca_file: None, ..opts }).unwrap_err().to_string();
    assert!(e.contains("database_ca_file"), "{e}");
}
