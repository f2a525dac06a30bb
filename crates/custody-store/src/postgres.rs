//! The PostgreSQL backend: the same row store as SQLite, in one table of a schema of its own.
//!
//! custody-kms is synchronous; tokio-postgres is not. The backend owns a small runtime (one
//! thread) that runs the database connections; each [`Backend`] call hands its query to that
//! runtime and waits on a plain channel, so it may be called from anywhere, including from
//! inside another tokio runtime's worker.
//!
//! - Keys are `TEXT COLLATE "C"`, so key order is byte order, as in SQLite, whatever the
//!   database's locale.
//! - A batch is one transaction: `Expect::Absent` puts are `INSERT … ON CONFLICT DO NOTHING`
//!   (no row inserted is a conflict); other preconditions lock the row (`SELECT … FOR UPDATE`)
//!   before checking its revision, so concurrent writers (several nodes) serialize per row.
//! - Migrations take a transaction-scoped advisory lock, so nodes starting together apply each
//!   migration once.
//! - A connection to a host that is not loopback (nor a Unix socket) uses TLS 1.3 with the
//!   server's certificate verified against `ca_file` and its host name checked (rustls with
//!   aws-lc-rs, through tokio-postgres-rustls); plaintext there is refused unless
//!   `allow_plaintext` is set (`danger_allow_plaintext_database`). On loopback, `sslmode=require`
//!   in the URL asks for the same verified TLS.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::{Backend, Expect, Row, StoreError, Table, Write};

/// Migrations, applied in order, each once, inside the backend's schema. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: the row store.
    "CREATE TABLE rows (
        tbl   TEXT   NOT NULL,
        key   TEXT   COLLATE \"C\" NOT NULL,
        rev   BIGINT NOT NULL,
        value BYTEA  NOT NULL,
        PRIMARY KEY (tbl, key)
    );",
];

/// Arbitrary constant for the migration advisory lock ("custody" in ASCII).
const MIGRATION_LOCK: i64 = 0x0063_7573_746f_6479;

/// How to reach the database.
#[derive(Clone)]
pub struct PostgresOptions {
    /// A libpq-style connection string or `postgres://` URL.
    pub url: String,
    /// The schema custody's table lives in (created if absent).
    pub schema: String,
    /// Allow a plaintext connection to a host that is not loopback.
    pub allow_plaintext: bool,
    /// CA certificates (PEM) that sign the database server's certificate; needed for TLS.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresOptions {
    /// The URL may carry a password: only its hosts are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions").field("schema", &self.schema).finish_non_exhaustive()
    }
}

/// PostgreSQL-backed [`Backend`].
pub struct PostgresBackend {
    rt: Option<tokio::runtime::Runtime>,
    writer: Arc<tokio::sync::Mutex<Client>>,
    reader: Arc<Client>,
    schema: String,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn db(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => StoreError::Database(format!("{} ({})", d.message(), d.code().code())),
        None => {
            // The cause is usually in the chain ("invalid peer certificate: UnknownIssuer").
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            StoreError::Database(message)
        }
    }
}

/// TLS 1.3 only, server certificate verified against `ca_file` (rustls with aws-lc-rs).
fn tls_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| StoreError::Database(format!("database_ca_file {}: {why}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))?;
    for cert in certs {
        roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| StoreError::Database(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn is_loopback(host: &tokio_postgres::config::Host) -> bool {
    match host {
        tokio_postgres::config::Host::Tcp(h) => {
            h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        // A Unix socket never leaves the machine.
        tokio_postgres::config::Host::Unix(_) => true,
    }
}

/// A schema name custody accepts: letters, digits and `_`, not starting with a digit.
fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl PostgresBackend {
    /// Connects, creates the schema if needed and applies pending migrations.
    pub fn connect(opts: &PostgresOptions) -> Result<Self, StoreError> {
        if !valid_schema(&opts.schema) {
            return Err(StoreError::Database(format!(
                "invalid schema name {:?}: use letters, digits and _",
                opts.schema
            )));
        }
        let config: tokio_postgres::Config =
            opts.url.parse().map_err(|e| StoreError::Database(format!("the database URL is not valid: {e}")))?;
        let mut config = config;
        let remote = !config.get_hosts().iter().all(is_loopback);
        let asked = config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        let tls = if (remote && !opts.allow_plaintext) || asked {
            let Some(ca) = &opts.ca_file else {
                return Err(StoreError::Database(
                    "the database connection needs TLS (the database is not on this machine, or the URL says \
                     sslmode=require): set database_ca_file to the CA certificate that signed the database \
                     server's certificate (or, on a network you trust, danger_allow_plaintext_database = true)"
                        .into(),
                ));
            };
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(tls_config(ca)?)
        } else {
            if remote {
                tracing::warn!("danger_allow_plaintext_database: connecting to a remote database without TLS");
            }
            None
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("custody-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(format!("cannot start the database runtime: {e}")))?;
        let schema = opts.schema.clone();
        let connect = move |config: tokio_postgres::Config, schema: String| {
            let tls = tls.clone();
            async move {
                let client = match tls {
                    Some(tls) => {
                        let (client, connection) =
                            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)).await.map_err(db)?;
                        tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::error!(error = %e, "PostgreSQL connection ended");
                            }
                        });
                        client
                    }
                    None => {
                        let (client, connection) = config.connect(NoTls).await.map_err(db)?;
                        tokio::spawn(async move {
                            if let Err(e) = connection.await {
                                tracing::error!(error = %e, "PostgreSQL connection ended");
                            }
                        });
                        client
                    }
                };
                client
                    .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema};"))
                    .await
                    .map_err(db)?;
                Ok::<_, StoreError>(client)
            }
        };
        let (writer, reader) = run_on(&rt, async move {
            let writer = connect(config.clone(), schema.clone()).await?;
            let reader = connect(config, schema).await?;
            Ok::<_, StoreError>((writer, reader))
        })?;
        let backend = Self {
            rt: Some(rt),
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            reader: Arc::new(reader),
            schema: opts.schema.clone(),
        };
        backend.migrate()?;
        Ok(backend)
    }

    /// Schema version this binary writes.
    pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

    /// Runs `f` on the backend's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(self.rt.as_ref().expect("the runtime lives as long as the backend"), f)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let writer = self.writer.clone();
        self.run(async move {
            let mut client = writer.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now());",
            )
            .await
            .map_err(db)?;
            let current: i32 = tx
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(db)?
                .get(0);
            let current = current as u32;
            if current > Self::SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew { found: current, supported: Self::SCHEMA_VERSION });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
                tx.batch_execute(sql).await.map_err(db)?;
                tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&(i as i32 + 1)]).await.map_err(db)?;
            }
            tx.commit().await.map_err(db)
        })
    }

    /// Drops the backend's schema and everything in it (tests clean up with it).
    pub fn drop_schema(self) -> Result<(), StoreError> {
        let (writer, schema) = (self.writer.clone(), self.schema.clone());
        self.run(async move {
            writer.lock().await.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.map_err(db)
        })
    }
}

/// Runs `f` on `rt` and waits on a plain channel: callable from any thread, including a worker
/// of another runtime (where `block_on` would panic).
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().map_err(|_| StoreError::Database("the database task stopped".into()))?
}

fn row(r: &tokio_postgres::Row, key: Option<String>) -> Row {
    let key = key.unwrap_or_else(|| r.get("key"));
    Row { key, rev: r.get::<_, i64>("rev") as u64, value: r.get("value") }
}

impl Backend for PostgresBackend {
    fn get(&self, table: Table, key: &str) -> Result<Option<Row>, StoreError> {
        let (reader, key) = (self.reader.clone(), key.to_string());
        self.run(async move {
            let r = reader
                .query_opt("SELECT rev, value FROM rows WHERE tbl = $1 AND key = $2", &[&table.name(), &key])
                .await
                .map_err(db)?;
            Ok(r.map(|r| row(&r, Some(key))))
        })
    }

    fn scan(&self, table: Table, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<Row>, StoreError> {
        let reader = self.reader.clone();
        let upper = format!("{prefix}\u{10FFFF}");
        let strict = after.is_some_and(|a| a >= prefix);
        let lower = after.filter(|a| *a >= prefix).unwrap_or(prefix).to_string();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.run(async move {
            let sql = if strict {
                "SELECT key, rev, value FROM rows WHERE tbl = $1 AND key > $2 AND key < $3 ORDER BY key LIMIT $4"
            } else {
                "SELECT key, rev, value FROM rows WHERE tbl = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4"
            };
            let rows = reader.query(sql, &[&table.name(), &lower, &upper, &limit]).await.map_err(db)?;
            Ok(rows.iter().map(|r| row(r, None)).collect())
        })
    }

    fn last(&self, table: Table) -> Result<Option<Row>, StoreError> {
        let reader = self.reader.clone();
        self.run(async move {
            let r = reader
                .query_opt(
                    "SELECT key, rev, value FROM rows WHERE tbl = $1 ORDER BY key DESC LIMIT 1",
                    &[&table.name()],
                )
                .await
                .map_err(db)?;
            Ok(r.map(|r| row(&r, None)))
        })
    }

    fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let (writer, writes) = (self.writer.clone(), writes.to_vec());
        self.run(async move {
            let mut client = writer.lock().await;
            let tx = client.transaction().await.map_err(db)?;
            for w in &writes {
                if let Write::Put { table, key, value, expect: Expect::Absent } = w {
                    let n = tx
                        .execute(
                            "INSERT INTO rows (tbl, key, rev, value) VALUES ($1, $2, 1, $3) ON CONFLICT (tbl, key) DO NOTHING",
                            &[&table.name(), key, value],
                        )
                        .await
                        .map_err(db)?;
                    if n == 0 {
                        return Err(StoreError::Conflict { table: table.name(), key: key.clone() });
                    }
                    continue;
                }
                let (table, key, expect) = match w {
                    Write::Put { table, key, expect, .. } | Write::Delete { table, key, expect } => (*table, key, *expect),
                };
                let current: Option<i64> = tx
                    .query_opt("SELECT rev FROM rows WHERE tbl = $1 AND key = $2 FOR UPDATE", &[&table.name(), key])
                    .await
                    .map_err(db)?
                    .map(|r| r.get(0));
                expect.check(table, key, current.map(|r| r as u64))?;
                match w {
                    Write::Put { value, .. } => {
                        tx.execute(
                            "INSERT INTO rows (tbl, key, rev, value) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (tbl, key) DO UPDATE SET rev = excluded.rev, value = excluded.value",
                            &[&table.name(), key, &(current.unwrap_or(0) + 1), value],
                        )
                        .await
                        .map_err(db)?;
                    }
                    Write::Delete { .. } => {
                        tx.execute("DELETE FROM rows WHERE tbl = $1 AND key = $2", &[&table.name(), key])
                            .await
                            .map_err(db)?;
                    }
                }
            }
            tx.commit().await.map_err(db)
        })
    }

    fn erase_freed(&self) -> Result<(), StoreError> {
        // PostgreSQL has no secure delete: VACUUM makes dead rows' space reusable, and the bytes
        // disappear as pages and WAL segments are rewritten and recycled (docs/SECURITY.md).
        let writer = self.writer.clone();
        self.run(async move { writer.lock().await.batch_execute("VACUUM rows").await.map_err(db) })
    }
}
