//! Server configuration: one TOML file, every setting also a `CUSTODY_*` environment variable.
//!
//! [`SETTINGS`] is the single list of settings: it drives the environment overlay, and a test
//! keeps docs/CONFIGURATION.md in step with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One documented setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Dotted name in the TOML file (`tls.cert_file`).
    pub name: &'static str,
    /// Environment variable.
    pub env: &'static str,
    /// Value type.
    pub kind: Kind,
    /// Default, as documented.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

/// Setting value types (how an environment variable is parsed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Free text or a path.
    Text,
    /// Unsigned integer.
    Integer,
    /// `true` / `false`.
    Bool,
}

/// Largest `audit_group_wait_us` accepted.
const MAX_AUDIT_GROUP_WAIT_US: u64 = 10_000;

/// Every setting custody's server reads.
pub const SETTINGS: &[Setting] = &[
    Setting { name: "data_dir", env: "CUSTODY_DATA_DIR", kind: Kind::Text, default: "./custody-data", doc: "Directory with the store (custody.db) and the TLS files written by `custody init`." },
    Setting { name: "database_url", env: "CUSTODY_DATABASE_URL", kind: Kind::Text, default: "<none: SQLite in data_dir>", doc: "PostgreSQL connection string (`postgres://user@host:5432/db` or libpq key=value). Unset: the embedded SQLite store `<data_dir>/custody.db`. Several custody servers may share one database." },
    Setting { name: "database_schema", env: "CUSTODY_DATABASE_SCHEMA", kind: Kind::Text, default: "custody", doc: "PostgreSQL schema custody's table lives in (created if absent); one custody store per schema." },
    Setting { name: "database_ca_file", env: "CUSTODY_DATABASE_CA_FILE", kind: Kind::Text, default: "<none>", doc: "CA certificate(s), PEM, that sign the PostgreSQL server's certificate. Required when the database is not on this machine (custody then connects with TLS 1.3 and verifies the certificate and host name) or when the URL says `sslmode=require`." },
    Setting { name: "danger_allow_plaintext_database", env: "CUSTODY_DANGER_ALLOW_PLAINTEXT_DATABASE", kind: Kind::Bool, default: "false", doc: "DANGER: connect to a PostgreSQL server that is not on this machine without TLS. Sealed rows stay sealed, but row keys, revisions and the database password cross the network in the clear." },
    Setting { name: "listen", env: "CUSTODY_LISTEN", kind: Kind::Text, default: "127.0.0.1:8443", doc: "Address and port to listen on (port 0 picks a free port)." },
    Setting { name: "region", env: "CUSTODY_REGION", kind: Kind::Text, default: "us-east-1", doc: "Region named in key and alias ARNs." },
    Setting { name: "seal", env: "CUSTODY_SEAL", kind: Kind::Text, default: "as initialized", doc: "How the store is unsealed; by default as `custody init` set it up. `shamir`: start sealed, unseal with shares (for a PKCS#11 store: do not use the token, unseal with the recovery shares). `pkcs11`: unwrap the root key with the token at start. `keyfile:PATH`: development only, unseal at start with the root key in PATH (overrides the path recorded at init). A setting that contradicts the store is refused at start." },
    Setting { name: "scheduler_interval_ms", env: "CUSTODY_SCHEDULER_INTERVAL_MS", kind: Kind::Integer, default: "60000", doc: "How often the scheduler looks for due rotations and deletions." },
    Setting { name: "max_request_bytes", env: "CUSTODY_MAX_REQUEST_BYTES", kind: Kind::Integer, default: "65536", doc: "Largest request body accepted; larger requests get 413." },
    Setting { name: "max_connections", env: "CUSTODY_MAX_CONNECTIONS", kind: Kind::Integer, default: "4096", doc: "Most TLS connections open at once (handshakes included); a connection beyond it is closed as soon as it is accepted and counted in `custody_connections_refused_total`. Each open connection holds about 36 KB of locked memory. At least 1." },
    Setting { name: "max_connections_per_ip", env: "CUSTODY_MAX_CONNECTIONS_PER_IP", kind: Kind::Integer, default: "1024", doc: "Most connections open at once from one IP address (IPv4-mapped IPv6 counted as IPv4), so one client cannot take all of `max_connections`; more from it are closed on accept and counted in `custody_connections_refused_per_ip_total`. Behind a load balancer or proxy every client has its address: raise it to `max_connections`. At least 1." },
    Setting { name: "request_read_timeout_ms", env: "CUSTODY_REQUEST_READ_TIMEOUT_MS", kind: Kind::Integer, default: "30000", doc: "A connection must deliver each whole request (headers and body) within this many milliseconds of being opened or of its previous answer, or it is closed: idle keep-alive connections, slow headers and slow bodies alike. Behind a load balancer, set it above the balancer's idle timeout. At least 1000." },
        Setting {
        name: "audit_checkpoint_every",
        env: "CUSTODY_AUDIT_CHECKPOINT_EVERY",
        kind: Kind::Integer,
        default: "100",
        doc: "Sign an audit checkpoint after every this many records.",
    },
    Setting {
        name: "audit_checkpoint_interval_ms",
        env: "CUSTODY_AUDIT_CHECKPOINT_INTERVAL_MS",
        kind: Kind::Integer,
        default: "10000",
        doc: "Also sign a checkpoint this often when records have none yet, so the unsigned tail of the trail stays short.",
    },
Setting { name: "audit_group_wait_us", env: "CUSTODY_AUDIT_GROUP_WAIT_US", kind: Kind::Integer, default: "0", doc: "Before each group commit of the audit trail, wait at most this many microseconds for the records of requests being served and for a group as large as the last, so that one commit (one flush) carries them all: less CPU per request, for at most this much added latency; a client sending one request at a time is never held up. Worth it when custody has its cores to itself (250: +17 % Encrypt throughput with the server on its own core); when clients share its cores, 0 is faster (docs/BENCHMARKS.md, Session 8). 0: commit what is queued at once. At most 10000." },
Setting { name: "audit_retain_days", env: "CUSTODY_AUDIT_RETAIN_DAYS", kind: Kind::Integer, default: "0", doc: "Delete audit records older than this many days (0: keep forever). Pruning stops at a signed checkpoint, which anchors what remains, so the trail still verifies." },
    Setting { name: "audit_retain_records", env: "CUSTODY_AUDIT_RETAIN_RECORDS", kind: Kind::Integer, default: "0", doc: "Keep at most about this many of the newest audit records (0: all); pruned at checkpoints like `audit_retain_days`." },
    Setting { name: "audit_file", env: "CUSTODY_AUDIT_FILE", kind: Kind::Text, default: "<none>", doc: "Also append every audit record to this file as a JSON line (mode 0600), for log shippers. The database trail stays the authoritative, verifiable one." },
    Setting { name: "audit_file_max_bytes", env: "CUSTODY_AUDIT_FILE_MAX_BYTES", kind: Kind::Integer, default: "104857600", doc: "Rotate the audit file at this size, keeping five old files (FILE.1 to FILE.5)." },
    Setting { name: "metrics_listen", env: "CUSTODY_METRICS_LISTEN", kind: Kind::Text, default: "<none>", doc: "Serve Prometheus metrics at `GET /metrics` on this address, plain HTTP, without authentication; a loopback address only (127.0.0.1:PORT or [::1]:PORT), anything else is refused at start. Unset: no metrics listener. docs/OPERATIONS.md lists the metrics." },
    Setting { name: "node_name", env: "CUSTODY_NODE_NAME", kind: Kind::Text, default: "<host name>", doc: "This node's name in audit records." },
    Setting { name: "log_format", env: "CUSTODY_LOG_FORMAT", kind: Kind::Text, default: "text", doc: "`text` or `json` (one JSON object per line)." },
    Setting { name: "tls.cert_file", env: "CUSTODY_TLS_CERT_FILE", kind: Kind::Text, default: "<data_dir>/tls/server.crt", doc: "Server certificate chain (PEM). Unset: the server issues its own from the internal CA and renews it at two thirds of its life. Set (with `tls.key_file`): the operator provides the files; the server reloads them when they change, keeps the old certificate if new files do not load, and never renews them itself." },
    Setting { name: "tls.key_file", env: "CUSTODY_TLS_KEY_FILE", kind: Kind::Text, default: "<data_dir>/tls/server.key", doc: "Server private key (PEM, PKCS#8)." },
    Setting { name: "tls.client_ca_file", env: "CUSTODY_TLS_CLIENT_CA_FILE", kind: Kind::Text, default: "<data_dir>/tls/ca.crt", doc: "CA whose client certificates are accepted (the internal CA)." },
    Setting { name: "tls.expiry_warn_days", env: "CUSTODY_TLS_EXPIRY_WARN_DAYS", kind: Kind::Integer, default: "7", doc: "Inside this many days of the served certificate's or the CA's expiry, the server logs a warning and writes an audit alert once a day." },
    Setting { name: "danger_server_cert_lifetime_seconds", env: "CUSTODY_DANGER_SERVER_CERT_LIFETIME_SECONDS", kind: Kind::Integer, default: "2592000", doc: "DANGER, tests only below the default: the lifetime of the certificates the server issues itself (it renews at two thirds of it). Used to watch renewals happen in seconds." },
    Setting { name: "pkcs11.pin_file", env: "CUSTODY_PKCS11_PIN_FILE", kind: Kind::Text, default: "<none>", doc: "File holding the PKCS#11 token's user PIN (mode 0600). A store sealed with `--seal pkcs11` unseals itself at start with it; if the token refuses it or is missing, the server says why and stays sealed (`custody unseal --recovery` takes the recovery shares)." },
    Setting { name: "pkcs11.module", env: "CUSTODY_PKCS11_MODULE", kind: Kind::Text, default: "<as initialized>", doc: "The PKCS#11 module, when it is not where it was at `custody init` (the token and key labels are recorded in the store)." },
    Setting { name: "separation_of_duties", env: "CUSTODY_SEPARATION_OF_DUTIES", kind: Kind::Text, default: "enforce", doc: "`enforce`: a key policy or grant that would let one principal both administer a key and decrypt with it is refused. `warn`: allowed, with an audit alert (what `custody dev` uses)." },
    Setting { name: "default_key_policy", env: "CUSTODY_DEFAULT_KEY_POLICY", kind: Kind::Text, default: "key-admins", doc: "The policy of a key created without one. `key-admins`: the tenant's key admins administer it and nobody may use it until a key policy or grant opens it. `tenant`: also every key user of the tenant may use it (what `custody dev` uses)." },
    Setting { name: "key_usage_limit", env: "CUSTODY_KEY_USAGE_LIMIT", kind: Kind::Integer, default: "4294967296", doc: "Encryptions under one key version after which the key rotates by itself (audited as `Custody.RotateOnUsageLimit`). 2^32 by default; docs/SECURITY.md gives the bound and why the default is safe." },
    Setting { name: "danger_allow_swap", env: "CUSTODY_DANGER_ALLOW_SWAP", kind: Kind::Bool, default: "false", doc: "DANGER, development only: start even if memory cannot be locked (the locked-memory limit is too small and cannot be raised), so keys may be written to swap. Without it the server refuses to start and says how to raise the limit. `custody dev` sets it." },
    Setting { name: "danger_disable_audit", env: "CUSTODY_DANGER_DISABLE_AUDIT", kind: Kind::Bool, default: "false", doc: "DANGER, benchmarks only: write no audit records at all, so the audit's cost can be measured against the same server without it. Requests are then unrecorded; the server logs an error at start and `custody status` shows it." },
    Setting { name: "danger_day_length_ms", env: "CUSTODY_DANGER_DAY_LENGTH_MS", kind: Kind::Integer, default: "86400000", doc: "DANGER, tests only: the length of a \"day\" for deletion waiting periods and rotation periods. Anything below the default shortens the 7-day minimum deletion window and lets a test destroy keys in seconds; the server logs a warning at start when it is set." },
];

/// Server settings after file and environment are merged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// See [`SETTINGS`].
    #[serde(default = "defaults::data_dir")]
    pub data_dir: PathBuf,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub database_url: Option<String>,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::database_schema")]
    pub database_schema: String,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub database_ca_file: Option<PathBuf>,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub danger_allow_plaintext_database: bool,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::region")]
    pub region: String,
    /// See [`SETTINGS`]. `None`: as the store was initialized.
    #[serde(default)]
    pub seal: Option<String>,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::scheduler_interval_ms")]
    pub scheduler_interval_ms: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: usize,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::request_read_timeout_ms")]
    pub request_read_timeout_ms: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::audit_checkpoint_every")]
    pub audit_checkpoint_every: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::audit_checkpoint_interval_ms")]
    pub audit_checkpoint_interval_ms: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::audit_group_wait_us")]
    pub audit_group_wait_us: u64,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub audit_retain_days: u64,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub audit_retain_records: u64,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub audit_file: Option<PathBuf>,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::audit_file_max_bytes")]
    pub audit_file_max_bytes: u64,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// See [`SETTINGS`]. `None`: the host name.
    #[serde(default)]
    pub node_name: Option<String>,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::log_format")]
    pub log_format: String,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub tls: TlsSettings,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub pkcs11: Pkcs11Settings,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::day_length_ms")]
    pub danger_day_length_ms: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::separation_of_duties")]
    pub separation_of_duties: String,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub danger_disable_audit: bool,
    /// See [`SETTINGS`].
    #[serde(default)]
    pub danger_allow_swap: bool,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::key_usage_limit")]
    pub key_usage_limit: u64,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::default_key_policy")]
    pub default_key_policy: String,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::server_cert_lifetime_seconds")]
    pub danger_server_cert_lifetime_seconds: u64,
}

/// `[tls]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// Server certificate chain.
    pub cert_file: Option<PathBuf>,
    /// Server private key.
    pub key_file: Option<PathBuf>,
    /// Client CA.
    pub client_ca_file: Option<PathBuf>,
    /// See [`SETTINGS`].
    #[serde(default = "defaults::expiry_warn_days")]
    pub expiry_warn_days: u64,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self { cert_file: None, key_file: None, client_ca_file: None, expiry_warn_days: defaults::expiry_warn_days() }
    }
}

/// `[pkcs11]` settings (the token and key labels are recorded in the store at init).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// The PKCS#11 module, if not the one recorded at init.
    pub module: Option<PathBuf>,
    /// File holding the token's user PIN.
    pub pin_file: Option<PathBuf>,
}

/// How the server unseals itself at start, if at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealSetting {
    /// Start sealed; wait for shares.
    Shamir,
    /// Read the root key from this file at start.
    KeyFile(PathBuf),
    /// Unwrap the root key with the PKCS#11 token at start.
    Pkcs11,
}

/// A configuration problem, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

mod defaults {
    use super::*;
    pub fn data_dir() -> PathBuf {
        PathBuf::from("./custody-data")
    }
    pub fn listen() -> SocketAddr {
        "127.0.0.1:8443".parse().expect("valid default address")
    }
    pub fn region() -> String {
        "us-east-1".into()
    }
    pub fn scheduler_interval_ms() -> u64 {
        60_000
    }
    pub fn key_usage_limit() -> u64 {
        custody_kms::DEFAULT_KEY_USAGE_LIMIT
    }
    pub fn expiry_warn_days() -> u64 {
        7
    }
    pub fn server_cert_lifetime_seconds() -> u64 {
        30 * 24 * 3600
    }
    pub fn max_request_bytes() -> usize {
        65_536
    }
    pub fn max_connections() -> usize {
        4096
    }
    pub fn max_connections_per_ip() -> usize {
        1024
    }
    pub fn request_read_timeout_ms() -> u64 {
        30_000
    }
    pub fn audit_file_max_bytes() -> u64 {
        100 * 1024 * 1024
    }
    pub fn audit_checkpoint_every() -> u64 {
        100
    }
    pub fn audit_checkpoint_interval_ms() -> u64 {
        10_000
    }
    pub fn audit_group_wait_us() -> u64 {
        custody_kms::DEFAULT_AUDIT_GROUP_WAIT_US
    }
    pub fn log_format() -> String {
        "text".into()
    }
    pub fn database_schema() -> String {
        "custody".into()
    }
    pub fn default_key_policy() -> String {
        "key-admins".into()
    }
    pub fn separation_of_duties() -> String {
        "enforce".into()
    }
    pub fn day_length_ms() -> u64 {
        custody_kms::DAY_MS as u64
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::from_toml_and_env("", |_| None).expect("defaults are valid")
    }
}

impl ServerConfig {
    /// Reads `file` (if given), then overlays `CUSTODY_*` variables from the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| ConfigError(format!("cannot read the configuration file {}: {e}", p.display())))?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, |k| std::env::var(k).ok())
    }

    /// Parses TOML text and overlays variables from `env` (a lookup, so tests need not touch the
    /// process environment).
    pub fn from_toml_and_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse().map_err(|e| ConfigError(format!("the configuration file is not valid TOML: {e}")))?;
        for s in SETTINGS {
            let Some(raw) = env(s.env) else { continue };
            let value = match s.kind {
                Kind::Text => toml::Value::String(raw),
                Kind::Integer => toml::Value::Integer(
                    raw.trim()
                        .parse()
                        .map_err(|_| ConfigError(format!("{} must be a whole number, got {raw:?}", s.env)))?,
                ),
                Kind::Bool => toml::Value::Boolean(
                    raw.trim()
                        .parse()
                        .map_err(|_| ConfigError(format!("{} must be true or false, got {raw:?}", s.env)))?,
                ),
            };
            let mut parts: Vec<&str> = s.name.split('.').collect();
            let leaf = parts.pop().expect("names are non-empty");
            let mut t = &mut table;
            for p in parts {
                t = t
                    .entry(p)
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| ConfigError(format!("{p} must be a table")))?;
            }
            t.insert(leaf.to_string(), value);
        }
        let config: ServerConfig =
            table.try_into().map_err(|e: toml::de::Error| ConfigError(format!("invalid configuration: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.seal_setting()?;
        if let Some(addr) = &self.metrics_listen {
            crate::metrics::check_listen(addr).map_err(ConfigError)?;
        }
        if self.scheduler_interval_ms == 0 {
            return Err(ConfigError("scheduler_interval_ms must be at least 1".into()));
        }
        if self.audit_checkpoint_every == 0 || self.audit_checkpoint_interval_ms == 0 {
            return Err(ConfigError(
                "audit_checkpoint_every and audit_checkpoint_interval_ms must be at least 1".into(),
            ));
        }
        if self.audit_group_wait_us > MAX_AUDIT_GROUP_WAIT_US {
            return Err(ConfigError(format!(
                "audit_group_wait_us is {}: at most {MAX_AUDIT_GROUP_WAIT_US} (every request may wait this long)",
                self.audit_group_wait_us
            )));
        }
        if self.danger_server_cert_lifetime_seconds < 5 {
            return Err(ConfigError("danger_server_cert_lifetime_seconds must be at least 5".into()));
        }
        if self.danger_day_length_ms == 0 {
            return Err(ConfigError("danger_day_length_ms must be at least 1".into()));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError(format!("log_format must be text or json, got {:?}", self.log_format)));
        }
        if !matches!(self.separation_of_duties.as_str(), "enforce" | "warn") {
            return Err(ConfigError(format!(
                "separation_of_duties must be `enforce` or `warn`, got {:?}",
                self.separation_of_duties
            )));
        }
        if !matches!(self.default_key_policy.as_str(), "key-admins" | "tenant") {
            return Err(ConfigError(format!(
                "default_key_policy must be `key-admins` or `tenant`, got {:?}",
                self.default_key_policy
            )));
        }
        if self.key_usage_limit == 0 {
            return Err(ConfigError("key_usage_limit must be at least 1".into()));
        }
        if self.max_request_bytes < 1024 {
            return Err(ConfigError("max_request_bytes must be at least 1024".into()));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("max_connections must be at least 1".into()));
        }
        if self.max_connections_per_ip == 0 {
            return Err(ConfigError("max_connections_per_ip must be at least 1".into()));
        }
        if self.request_read_timeout_ms < 1000 {
            return Err(ConfigError("request_read_timeout_ms must be at least 1000".into()));
        }
        Ok(())
    }

    /// The seal setting, parsed (`None`: as the store was initialized).
    pub fn seal_setting(&self) -> Result<Option<SealSetting>, ConfigError> {
        let Some(seal) = self.seal.as_deref() else { return Ok(None) };
        match seal {
            "shamir" => Ok(Some(SealSetting::Shamir)),
            "pkcs11" => Ok(Some(SealSetting::Pkcs11)),
            s => match s.strip_prefix("keyfile:") {
                Some(p) if !p.is_empty() => Ok(Some(SealSetting::KeyFile(PathBuf::from(p)))),
                _ => Err(ConfigError(format!("seal must be `shamir`, `pkcs11` or `keyfile:PATH`, got {s:?}"))),
            },
        }
    }

    /// This node's name: the setting, else the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "custody".into())
        })
    }

    /// The store database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("custody.db")
    }

    /// PostgreSQL options, when `database_url` is set.
    pub fn postgres(&self) -> Option<custody_store::PostgresOptions> {
        self.database_url.as_ref().map(|url| custody_store::PostgresOptions {
            url: url.clone(),
            schema: self.database_schema.clone(),
            allow_plaintext: self.danger_allow_plaintext_database,
            ca_file: self.database_ca_file.clone(),
        })
    }

    /// Opens the configured store: PostgreSQL if `database_url` is set, else SQLite in
    /// `data_dir` (which must have been initialized).
    pub fn open_backend(&self) -> Result<std::sync::Arc<dyn custody_store::Backend>, String> {
        if let Some(pg) = self.postgres() {
            let b = custody_store::PostgresBackend::connect(&pg).map_err(|e| format!("PostgreSQL: {e}"))?;
            return Ok(std::sync::Arc::new(b));
        }
        let db = self.database_path();
        if !db.exists() {
            return Err(format!(
                "{} is not initialized: run `custody init --data {}` first",
                self.data_dir.display(),
                self.data_dir.display()
            ));
        }
        Ok(std::sync::Arc::new(custody_store::SqliteBackend::open(&db).map_err(|e| e.to_string())?))
    }

    /// Server certificate file.
    pub fn cert_file(&self) -> PathBuf {
        self.tls.cert_file.clone().unwrap_or_else(|| self.data_dir.join("tls/server.crt"))
    }

    /// Server key file.
    pub fn key_file(&self) -> PathBuf {
        self.tls.key_file.clone().unwrap_or_else(|| self.data_dir.join("tls/server.key"))
    }

    /// Client CA file.
    pub fn client_ca_file(&self) -> PathBuf {
        self.tls.client_ca_file.clone().unwrap_or_else(|| self.data_dir.join("tls/ca.crt"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_settings_table() {
        let c = ServerConfig::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.seal_setting().unwrap(), None, "as initialized");
        assert_eq!(c.danger_day_length_ms, 86_400_000);
        for s in SETTINGS {
            if s.default.starts_with('<') {
                continue;
            }
            let shown = match s.name {
                "data_dir" => c.data_dir.display().to_string(),
                "listen" => c.listen.to_string(),
                "region" => c.region.clone(),
                "seal" => c.seal.clone().unwrap_or_else(|| "as initialized".into()),
                "scheduler_interval_ms" => c.scheduler_interval_ms.to_string(),
                "max_request_bytes" => c.max_request_bytes.to_string(),
                "request_read_timeout_ms" => c.request_read_timeout_ms.to_string(),
                "max_connections" => c.max_connections.to_string(),
                "max_connections_per_ip" => c.max_connections_per_ip.to_string(),
                "log_format" => c.log_format.clone(),
                "audit_checkpoint_every" => c.audit_checkpoint_every.to_string(),
                "audit_retain_days" => c.audit_retain_days.to_string(),
                "audit_file_max_bytes" => c.audit_file_max_bytes.to_string(),
                "audit_retain_records" => c.audit_retain_records.to_string(),
                "audit_checkpoint_interval_ms" => c.audit_checkpoint_interval_ms.to_string(),
                "audit_group_wait_us" => c.audit_group_wait_us.to_string(),
                "danger_day_length_ms" => c.danger_day_length_ms.to_string(),
                "separation_of_duties" => c.separation_of_duties.clone(),
                "danger_disable_audit" => c.danger_disable_audit.to_string(),
                "danger_allow_swap" => c.danger_allow_swap.to_string(),
                "key_usage_limit" => c.key_usage_limit.to_string(),
                "database_url" => c.database_url.clone().unwrap_or_else(|| "<none: SQLite in data_dir>".into()),
                "database_schema" => c.database_schema.clone(),
                "danger_allow_plaintext_database" => c.danger_allow_plaintext_database.to_string(),
                "database_ca_file" => c.database_ca_file.as_ref().map_or("<none>".into(), |p| p.display().to_string()),
                "default_key_policy" => c.default_key_policy.clone(),
                "tls.expiry_warn_days" => c.tls.expiry_warn_days.to_string(),
                "danger_server_cert_lifetime_seconds" => c.danger_server_cert_lifetime_seconds.to_string(),
                other => panic!("setting {other} has no default check"),
            };
            assert_eq!(shown, s.default, "{}", s.name);
        }
    }

    #[test]
    fn environment_overrides_file() {
        let toml = "region = \"eu-west-1\"\nlisten = \"127.0.0.1:9000\"\n[tls]\ncert_file = \"/a\"\n";
        let env = |k: &str| match k {
            "CUSTODY_LISTEN" => Some("127.0.0.1:0".to_string()),
            "CUSTODY_TLS_KEY_FILE" => Some("/k".to_string()),
            "CUSTODY_SCHEDULER_INTERVAL_MS" => Some("50".to_string()),
            _ => None,
        };
        let c = ServerConfig::from_toml_and_env(toml, env).unwrap();
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.cert_file(), PathBuf::from("/a"));
        assert_eq!(c.key_file(), PathBuf::from("/k"));
        assert_eq!(c.scheduler_interval_ms, 50);
    }

    #[test]
    fn bad_configuration_is_explained() {
        let err = |t: &str| ServerConfig::from_toml_and_env(t, |_| None).unwrap_err().0;
        assert!(err("nonsense = 1").contains("unknown field"));
        assert!(err("seal = \"hsm\"").contains("keyfile:PATH"));
        assert!(err("listen = \"nowhere\"").contains("invalid"));
        assert!(err("[").contains("not valid TOML"));
        assert!(err("audit_group_wait_us = 10001").contains("at most 10000"));
        assert!(err("request_read_timeout_ms = 999").contains("request_read_timeout_ms must be at least 1000"));
        assert!(err("max_connections = 0").contains("max_connections must be at least 1"));
        assert!(err("max_connections_per_ip = 0").contains("max_connections_per_ip must be at least 1"));
        assert_eq!(
            ServerConfig::from_toml_and_env("audit_group_wait_us = 250", |_| None).unwrap().audit_group_wait_us,
            250
        );
        let e = ServerConfig::from_toml_and_env("", |k| (k == "CUSTODY_SCHEDULER_INTERVAL_MS").then(|| "soon".into()));
        assert!(e.unwrap_err().0.contains("whole number"));
    }
}
