//! Laying out a data directory: the store, TLS files and the first administrator's profile.
//!
//! ```text
//! DIR/custody.db            the store (SQLite, WAL)
//! DIR/tls/ca.crt            internal CA certificate (public; clients trust it)
//! DIR/tls/server.crt, .key  the server's certificate and key (key 0600)
//! DIR/admin/admin.crt, .key the first administrator's client certificate and key (key 0600)
//! DIR/admin/profile.toml    connection profile for the CLI
//! ```

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use custody_client::Profile;
use custody_crypto::RootKey;
use custody_kms::{InitOptions, InitOutput, InitSeal, Kms, PrincipalName, TenantId};
use custody_store::{Backend, SqliteBackend};

/// What to set up.
#[derive(Debug)]
pub struct Bootstrap {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Seal: Shamir shares or a key file to create.
    pub seal: SealChoice,
    /// First tenant (random if absent).
    pub tenant: Option<TenantId>,
    /// First administrator.
    pub admin: PrincipalName,
    /// Its roles (`custody init`: security officer and tenant admin; `custody dev`: all).
    pub admin_roles: Vec<custody_kms::Role>,
    /// Names in the server certificate.
    pub server_names: Vec<String>,
    /// Endpoint written into the administrator's profile.
    pub endpoint: String,
    /// PostgreSQL instead of `DIR/custody.db` (the data directory still holds TLS files and the
    /// administrator's profile).
    pub database: Option<custody_store::PostgresOptions>,
}

/// Seal choice at init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealChoice {
    /// k of n Shamir shares.
    Shamir {
        /// threshold
        threshold: usize,
        /// shares
        shares: usize,
    },
    /// Development: root key in this file (created, mode 0600).
    KeyFile(PathBuf),
    /// The root key wrapped by a key in a PKCS#11 token (created there if absent), with
    /// `threshold` of `shares` Shamir recovery shares.
    Pkcs11 {
        /// module, token, key, PIN file
        hsm: Pkcs11Args,
        /// recovery threshold
        threshold: usize,
        /// recovery shares
        shares: usize,
    },
}

/// How to reach a PKCS#11 token.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Pkcs11Args {
    /// The token vendor's PKCS#11 module.
    #[arg(long, value_name = "PATH", default_value = custody_hsm::softhsm::MODULE)]
    pub module: PathBuf,
    /// Label of the token.
    #[arg(long, value_name = "LABEL", default_value = "custody")]
    pub token_label: String,
    /// Label of the AES key that wraps the root key (created if absent).
    #[arg(long, value_name = "LABEL", default_value = "custody-root-wrap")]
    pub key_label: String,
    /// File holding the token's user PIN.
    #[arg(long, value_name = "FILE", env = "CUSTODY_PKCS11_PIN_FILE")]
    pub pin_file: Option<PathBuf>,
}

impl Pkcs11Args {
    /// Opens the token (creating the wrapping key if `create_key`).
    pub fn open(&self, create_key: bool) -> Result<custody_hsm::Hsm, String> {
        let pin_file =
            self.pin_file.as_ref().ok_or("--pin-file (or CUSTODY_PKCS11_PIN_FILE) is required for a PKCS#11 seal")?;
        let pin = custody_crypto::SecretBytes::new(
            std::fs::read(pin_file).map_err(|e| format!("cannot read the PIN file {}: {e}", pin_file.display()))?,
        );
        custody_hsm::Hsm::open(
            &custody_hsm::HsmConfig {
                module: self.module.clone(),
                token_label: self.token_label.clone(),
                key_label: self.key_label.clone(),
                pin,
            },
            create_key,
        )
        .map_err(|e| e.to_string())
    }

    /// Wraps `root` with the token's key: the seal metadata the store keeps.
    pub fn seal(&self, root: &RootKey, create_key: bool) -> Result<custody_kms::Pkcs11Seal, String> {
        let hsm = self.open(create_key)?;
        let wrapped_root = hsm.wrap(root.expose_secret(), custody_kms::PKCS11_WRAP_AAD).map_err(|e| e.to_string())?;
        Ok(custody_kms::Pkcs11Seal {
            module: std::path::absolute(&self.module).unwrap_or_else(|_| self.module.clone()).display().to_string(),
            token_label: self.token_label.clone(),
            key_label: self.key_label.clone(),
            wrapped_root,
        })
    }
}

/// Paths of what was written.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Data directory.
    pub data_dir: PathBuf,
}

impl Layout {
    /// The store file.
    pub fn database(&self) -> PathBuf {
        self.data_dir.join("custody.db")
    }
    /// CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.data_dir.join("tls/ca.crt")
    }
    /// Administrator profile.
    pub fn admin_profile(&self) -> PathBuf {
        self.data_dir.join("admin/profile.toml")
    }
    /// Whether a store exists here (a SQLite store, or the files `init` writes for any store).
    pub fn is_initialized(&self) -> bool {
        self.database().exists() || self.ca_cert().exists()
    }
}

/// Initializes `b.data_dir`. Fails, changing nothing, if it is already initialized.
pub fn init(b: Bootstrap) -> Result<(Layout, InitOutput), String> {
    let layout = Layout { data_dir: b.data_dir.clone() };
    if layout.is_initialized() {
        return Err(format!(
            "{} is already initialized (custody.db or tls/ca.crt exists); nothing was changed",
            b.data_dir.display()
        ));
    }
    let io = |what: &str, p: &Path, e: std::io::Error| format!("cannot write {what} {}: {e}", p.display());
    for d in [b.data_dir.clone(), b.data_dir.join("tls"), b.data_dir.join("admin")] {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(|e| io("directory", &d, e))?;
    }
    let seal = match &b.seal {
        SealChoice::Shamir { threshold, shares } => InitSeal::Shamir { threshold: *threshold, shares: *shares },
        SealChoice::KeyFile(path) => {
            let root = if path.exists() {
                custody_server::keyfile::read(path)?
            } else {
                let root = RootKey::generate();
                custody_server::keyfile::write(path, &root).map_err(|e| io("the key file", path, e))?;
                root
            };
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            InitSeal::KeyFile { root, path: Some(abs.display().to_string()) }
        }
        SealChoice::Pkcs11 { hsm, threshold, shares } => {
            let root = RootKey::generate();
            let seal = hsm.seal(&root, true)?;
            InitSeal::Pkcs11 { root, seal, threshold: *threshold, shares: *shares }
        }
    };
    let backend = open_new_store(&layout, b.database.as_ref())?;
    let out = Kms::init(
        &backend,
        InitOptions {
            seal,
            tenant: b.tenant,
            admin: b.admin.clone(),
            admin_roles: b.admin_roles,
            server_names: b.server_names,
        },
    )
    .map_err(|e| e.to_string())?;
    let tls = b.data_dir.join("tls");
    let admin = b.data_dir.join("admin");
    write_file(&tls.join("ca.crt"), out.ca_cert_pem.as_bytes(), 0o644)?;
    write_file(&tls.join("server.crt"), out.server_cert.cert_pem.as_bytes(), 0o644)?;
    write_file(&tls.join("server.key"), out.server_cert.key_pem.expose_secret(), 0o600)?;
    let admin_name = b.admin.as_str();
    write_file(&admin.join(format!("{admin_name}.crt")), out.admin_cert.cert_pem.as_bytes(), 0o644)?;
    write_file(&admin.join(format!("{admin_name}.key")), out.admin_cert.key_pem.expose_secret(), 0o600)?;
    write_profile(&layout, admin_name, &b.endpoint)?;
    Ok((layout, out))
}

/// (Re)writes the administrator's profile with `endpoint`.
pub fn write_profile(layout: &Layout, admin_name: &str, endpoint: &str) -> Result<PathBuf, String> {
    let admin = layout.data_dir.join("admin");
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let profile = Profile {
        endpoint: Some(endpoint.to_string()),
        ca_file: Some(abs(layout.ca_cert())),
        cert_file: Some(abs(admin.join(format!("{admin_name}.crt")))),
        key_file: Some(abs(admin.join(format!("{admin_name}.key")))),
    };
    let path = layout.admin_profile();
    profile.save(&path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// Writes a file with `mode`, replacing an existing one atomically ([`custody_server::write_file`]).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    custody_server::write_file(path, bytes, mode).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The store a command creates (init, restore): PostgreSQL if given, else `DIR/custody.db`.
pub fn open_new_store(
    layout: &Layout,
    database: Option<&custody_store::PostgresOptions>,
) -> Result<Arc<dyn Backend>, String> {
    Ok(match database {
        Some(pg) => Arc::new(custody_store::PostgresBackend::connect(pg).map_err(|e| format!("PostgreSQL: {e}"))?),
        None => Arc::new(SqliteBackend::open(&layout.database()).map_err(|e| e.to_string())?),
    })
}

/// PostgreSQL options for a command that opens a store itself: the URL and schema from its
/// flags; the TLS settings (`database_ca_file`, `danger_allow_plaintext_database`) read as the
/// server reads them, from `CUSTODY_*` variables, unless `ca_file` is given.
pub fn database_options(
    url: Option<String>,
    schema: &str,
    ca_file: Option<PathBuf>,
) -> Result<Option<custody_store::PostgresOptions>, String> {
    let Some(url) = url else { return Ok(None) };
    let mut config = custody_server::ServerConfig::load(None).map_err(|e| e.to_string())?;
    config.database_url = Some(url);
    config.database_schema = schema.to_string();
    if ca_file.is_some() {
        config.database_ca_file = ca_file;
    }
    Ok(config.postgres())
}
