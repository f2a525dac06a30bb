//! Command implementations.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use clap::{Args, Subcommand};
use custody_client::{Client, Profile};
use custody_kms::{PrincipalName, TenantId};
use custody_server::OutputTarget;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::bootstrap::{self, Bootstrap, SealChoice};
use crate::exit::{self, CliError};
use crate::{Cli, Command, ConnArgs};

type Result<T> = std::result::Result<T, CliError>;
/// What CLI commands return.
pub(crate) type CliResult<T> = Result<T>;

/// `custody init`
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory to create.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Seal method: `shamir`, `pkcs11` (the root key wrapped in an HSM; the server unseals
    /// itself at start) or `keyfile:PATH` (development only).
    #[arg(long, default_value = "shamir")]
    pub seal: String,
    /// Number of unseal shares (Shamir), or of recovery shares (PKCS#11).
    #[arg(long, default_value_t = 5)]
    pub shares: usize,
    /// Shares needed to unseal (Shamir) or to recover without the token (PKCS#11).
    #[arg(long, default_value_t = 3)]
    pub threshold: usize,
    /// The PKCS#11 token (with --seal pkcs11).
    #[command(flatten)]
    pub pkcs11: bootstrap::Pkcs11Args,
    /// Write each share to DIR/share-N.txt (mode 0600) instead of printing them.
    #[arg(long, value_name = "DIR")]
    pub shares_dir: Option<PathBuf>,
    /// DNS name or IP address for the server certificate (repeatable).
    #[arg(long = "server-name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub server_names: Vec<String>,
    /// First tenant's 12-digit account id (random if omitted).
    #[arg(long)]
    pub tenant: Option<String>,
    /// First administrator's name.
    #[arg(long, default_value = "admin")]
    pub admin: String,
    /// Endpoint to write into the administrator's profile.
    #[arg(long = "profile-endpoint", default_value = "https://localhost:8443")]
    pub profile_endpoint: String,
    /// Keep the store in PostgreSQL instead of DIR/custody.db (the server then needs the same
    /// `database_url`).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema for the store.
    #[arg(long, default_value = "custody")]
    pub database_schema: String,
    /// CA certificate (PEM) of the PostgreSQL server, for TLS (required for a remote database).
    #[arg(long, value_name = "FILE", env = "CUSTODY_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
}

/// `custody server`
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Configuration file (TOML); see docs/CONFIGURATION.md.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides the file and CUSTODY_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Listen address (overrides the file and CUSTODY_LISTEN).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
}

/// `custody unseal`
#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// File holding one share (repeatable). Without it, shares are read from the terminal.
    #[arg(long = "share-file", value_name = "FILE")]
    pub share_files: Vec<PathBuf>,
    /// The shares are the recovery shares of a PKCS#11-sealed store (its token is lost or
    /// refused the PIN). They unseal it the same way.
    #[arg(long)]
    pub recovery: bool,
}

/// `custody key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a symmetric key (AES-256-GCM).
    #[command(
        after_help = "Example:\n  custody key create --description 'payments' --alias alias/payments --tag team=payments"
    )]
    Create {
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Also create this alias for the new key (alias/NAME).
        #[arg(long)]
        alias: Option<String>,
        /// Tag as KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_pair)]
        tags: Vec<(String, String)>,
        /// Key policy (a JSON file); default: the server's default key policy.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
    /// Show or replace a key's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List keys.
    #[command(after_help = "Example:\n  custody key list --json")]
    List,
    /// Show a key's metadata.
    #[command(after_help = "Example:\n  custody key describe alias/payments")]
    Describe {
        /// Key id, key ARN, alias name or alias ARN.
        key: String,
    },
    /// Enable a disabled key.
    #[command(after_help = "Example:\n  custody key enable alias/payments")]
    Enable {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Disable a key: every cryptographic operation is refused until it is enabled again.
    #[command(after_help = "Example:\n  custody key disable alias/payments")]
    Disable {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Rotate now: a new version encrypts from now on; older versions still decrypt.
    #[command(after_help = "Example:\n  custody key rotate alias/payments")]
    Rotate {
        /// Key id, ARN or alias.
        key: String,
    },
    /// List a key's completed rotations.
    #[command(after_help = "Example:\n  custody key rotations alias/payments")]
    Rotations {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Schedule destruction after a waiting period (7-30 days, default 30).
    #[command(name = "schedule-deletion", after_help = "Example:\n  custody key schedule-deletion alias/old --days 7")]
    ScheduleDeletion {
        /// Key id, ARN or alias.
        key: String,
        /// Waiting period in days.
        #[arg(long)]
        days: Option<u32>,
    },
    /// Cancel a scheduled deletion (the key becomes Disabled).
    #[command(name = "cancel-deletion", after_help = "Example:\n  custody key cancel-deletion 1234abcd-...")]
    CancelDeletion {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Aliases: friendly names for keys.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Automatic rotation.
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// Add or replace tags.
    #[command(after_help = "Example:\n  custody key tag alias/payments env=prod owner=team-a")]
    Tag {
        /// Key id, ARN or alias.
        key: String,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_parser = parse_pair)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags.
    #[command(after_help = "Example:\n  custody key untag alias/payments env")]
    Untag {
        /// Key id, ARN or alias.
        key: String,
        /// Tag keys.
        #[arg(required = true)]
        tag_keys: Vec<String>,
    },
    /// List tags.
    #[command(after_help = "Example:\n  custody key tags alias/payments")]
    Tags {
        /// Key id, ARN or alias.
        key: String,
    },
}

/// `custody key alias ...`
#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Create an alias.
    #[command(after_help = "Example:\n  custody key alias create alias/payments 1234abcd-...")]
    Create {
        /// alias/NAME
        alias: String,
        /// Target key.
        key: String,
    },
    /// Point an alias at another key.
    #[command(after_help = "Example:\n  custody key alias update alias/payments 5678efgh-...")]
    Update {
        /// alias/NAME
        alias: String,
        /// New target key.
        key: String,
    },
    /// Delete an alias (the key is not affected).
    #[command(after_help = "Example:\n  custody key alias delete alias/payments")]
    Delete {
        /// alias/NAME
        alias: String,
    },
    /// List aliases.
    #[command(after_help = "Example:\n  custody key alias list --key 1234abcd-...")]
    List {
        /// Only aliases of this key.
        #[arg(long)]
        key: Option<String>,
    },
}

/// `custody key rotation ...`
#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Rotate automatically every period (90-2560 days, default 365).
    #[command(after_help = "Example:\n  custody key rotation enable alias/payments --period-days 90")]
    Enable {
        /// Key id, ARN or alias.
        key: String,
        /// Rotation period.
        #[arg(long)]
        period_days: Option<u32>,
    },
    /// Stop automatic rotation.
    #[command(after_help = "Example:\n  custody key rotation disable alias/payments")]
    Disable {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Show the rotation settings.
    #[command(after_help = "Example:\n  custody key rotation status alias/payments")]
    Status {
        /// Key id, ARN or alias.
        key: String,
    },
}

/// `custody audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit records of your account, oldest first, filtered. The table's last columns are the
    /// key with the version used (`KEY v2`; a ReEncrypt's `SOURCE v1 -> KEY v3`) and, for a
    /// refusal or failure, the AWS error code.
    #[command(
        after_help = "Examples:\n  custody audit query --action Decrypt --outcome failed --since 1h\n  custody audit query --key alias/payments --principal admin --json"
    )]
    Query {
        /// Key id, ARN or alias (records whose key contains this, a ReEncrypt's source key too;
        /// an alias also matches the key it names now).
        #[arg(long)]
        key: Option<String>,
        /// Principal (ARN or certificate identity contains this).
        #[arg(long)]
        principal: Option<String>,
        /// Action, e.g. Decrypt.
        #[arg(long)]
        action: Option<String>,
        /// success, denied, failed or unauthenticated.
        #[arg(long)]
        outcome: Option<String>,
        /// Only records from this long ago (30m, 1h, 2d) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most records to return (1-10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Check the whole trail: hash chain and signed checkpoints. Exits 1 and names the first
    /// broken link if anything was changed, deleted, reordered, inserted or truncated.
    #[command(
        after_help = "Examples:\n  custody audit verify\n  custody audit verify --from-export trail.jsonl --public-key 3b6a27bc..."
    )]
    Verify {
        /// Verify an export file instead of the server's trail.
        #[arg(long, value_name = "FILE")]
        from_export: Option<PathBuf>,
        /// Checkpoint public key (hex) to trust; by default the server's.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Export the trail as JSON lines (records and checkpoints) for a SIEM or offline
    /// verification. Records of other accounts appear as links only (`{"elided": ...}`: sequence
    /// number and hashes), so the export still verifies; a security officer gets every record.
    #[command(after_help = "\
Examples:
  custody audit export --out trail.jsonl
  custody audit export --since 1h > last-hour.jsonl
  custody audit verify --from-export last-hour.jsonl

With --since the export starts right after the newest signed checkpoint made before that time,
so it can be verified on its own; it may begin with a few older records.")]
    Export {
        /// Output file, written completely before it replaces anything (default: stdout); a
        /// pipe, device or /dev/stdout is written to as a stream, never replaced.
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Only records from this long ago (30m, 1h, 2d) or since an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// The newest records of your account; with -f, keep printing new ones as they come.
    #[command(after_help = "Examples:\n  custody audit tail\n  custody audit tail -f -n 50")]
    Tail {
        /// Keep following new records.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many recent records to start with.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u64,
    },
    /// The token a value has in audit records' encryption contexts (HMAC-SHA256 under the audit key).
    #[command(after_help = "Example:\n  custody audit query --json | grep \"$(custody audit hash acme-corp)\"")]
    Hash {
        /// The value to look for.
        value: String,
    },
}

/// `custody key policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print a key's policy (JSON).
    #[command(after_help = "Example:\n  custody key policy get alias/payments > policy.json")]
    Get {
        /// Key id, ARN or alias.
        key: String,
    },
    /// Replace a key's policy with the JSON in FILE.
    #[command(after_help = "Example:\n  custody key policy put alias/payments policy.json")]
    Put {
        /// Key id, ARN or alias.
        key: String,
        /// Policy document (JSON).
        file: PathBuf,
    },
}

fn read_policy(p: &Path) -> Result<String> {
    std::fs::read_to_string(p)
        .map_err(|e| CliError::new(exit::USAGE, format!("cannot read the policy {}: {e}", p.display())))
}

/// `custody access-key ...`
#[derive(Debug, Subcommand)]
pub enum AccessKeyCommand {
    /// Create an access key; the secret is shown once.
    #[command(
        after_help = "Examples:\n  custody access-key create\n  custody access-key create --principal ci-deployer --json"
    )]
    Create {
        /// Principal to hold the key (default: you).
        #[arg(long)]
        principal: Option<String>,
    },
    /// List access keys (never their secrets).
    #[command(after_help = "Example:\n  custody access-key list --principal admin")]
    List {
        /// Only this principal's keys.
        #[arg(long)]
        principal: Option<String>,
    },
    /// Disable an access key: requests signed with it are refused.
    #[command(after_help = "Example:\n  custody access-key disable AKIA...")]
    Disable {
        /// Access key id.
        id: String,
    },
    /// Enable a disabled access key.
    #[command(after_help = "Example:\n  custody access-key enable AKIA...")]
    Enable {
        /// Access key id.
        id: String,
    },
    /// Delete an access key.
    #[command(after_help = "Example:\n  custody access-key delete AKIA...")]
    Delete {
        /// Access key id.
        id: String,
    },
}

/// `custody encrypt-blob`
#[derive(Debug, Args)]
pub struct EncryptBlobArgs {
    /// Key id, ARN or alias.
    #[arg(short = 'k', long = "key")]
    pub key: String,
    /// Encryption context pair KEY=VALUE (repeatable); needed again to decrypt.
    #[arg(short = 'c', long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Write the raw blob here instead of base64 to stdout.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Plaintext file, or - for stdin (default).
    #[arg(default_value = "-")]
    pub input: String,
}

/// `custody decrypt-blob`
#[derive(Debug, Args)]
pub struct DecryptBlobArgs {
    /// Require that this key made the blob.
    #[arg(short = 'k', long = "key")]
    pub key: Option<String>,
    /// Encryption context pair KEY=VALUE (repeatable), exactly as at encryption.
    #[arg(short = 'c', long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Write the plaintext here instead of stdout.
    #[arg(short = 'o', long = "out")]
    pub out: Option<PathBuf>,
    /// Blob file (raw or base64), or - for stdin (default).
    #[arg(default_value = "-")]
    pub input: String,
}

/// `custody data-key`
#[derive(Debug, Args)]
pub struct DataKeyArgs {
    /// Key id, ARN or alias.
    #[arg(short = 'k', long = "key")]
    pub key: String,
    /// AES_256 (default) or AES_128.
    #[arg(long, conflicts_with = "bytes")]
    pub spec: Option<String>,
    /// Number of bytes (1-1024) instead of a spec.
    #[arg(long)]
    pub bytes: Option<u32>,
    /// Encryption context pair KEY=VALUE (repeatable).
    #[arg(short = 'c', long = "context", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Only the encrypted data key.
    #[arg(long)]
    pub without_plaintext: bool,
}

pub(crate) fn parse_pair(s: &str) -> std::result::Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.command {
        Command::Dev(args) => crate::dev::run(args, json).await,
        Command::Init(args) => init(args, json),
        Command::Server(args) => server(args).await,
        Command::Unseal(args) => unseal(&cli.conn, args, json).await,
        Command::Status => status(&cli.conn, json).await,
        Command::Key(k) => key(&cli.conn, k, json).await,
        Command::EncryptBlob(a) => encrypt_blob(&cli.conn, a, json).await,
        Command::DecryptBlob(a) => decrypt_blob(&cli.conn, a, json).await,
        Command::DataKey(a) => data_key(&cli.conn, a, json).await,
        Command::AccessKey(a) => access_key(&cli.conn, a, json).await,
        Command::Audit(cmd) => audit(&cli.conn, cmd, json).await,
        Command::Tenant(cmd) => crate::access::tenant(&cli.conn, cmd, json).await,
        Command::Principal(cmd) => crate::access::principal(&cli.conn, cmd, json).await,
        Command::Access(cmd) => crate::access::access(&cli.conn, cmd, json).await,
        Command::Pki(cmd) => crate::pki::pki(&cli.conn, cmd, json).await,
        Command::Root(cmd) => crate::root::root(&cli.conn, cmd, json).await,
        Command::Encrypt(args) => crate::envelope::encrypt(&cli.conn, args, json).await,
        Command::Decrypt(args) => crate::envelope::decrypt(&cli.conn, args, json).await,
        Command::Rewrap(args) => crate::envelope::rewrap(&cli.conn, args, json).await,
        Command::Agent(args) => crate::pki::agent(&cli.conn, args, json).await,
        Command::Check => check(&cli.conn, json).await,
        Command::Top(args) => crate::top::run(args, json).await,
        Command::Backup(cmd) => crate::backup::backup(&cli.conn, cmd, json).await,
        Command::Seal(cmd) => crate::seal::seal(cmd, json),
    }
}

fn init(a: InitArgs, json: bool) -> Result<()> {
    let usage = |m: String| CliError::new(exit::INVALID_REQUEST, m);
    let seal = match a.seal.as_str() {
        "shamir" => SealChoice::Shamir { threshold: a.threshold, shares: a.shares },
        "pkcs11" => SealChoice::Pkcs11 { hsm: a.pkcs11.clone(), threshold: a.threshold, shares: a.shares },
        s => match s.strip_prefix("keyfile:") {
            Some(p) if !p.is_empty() => SealChoice::KeyFile(PathBuf::from(p)),
            _ => return Err(usage(format!("--seal must be shamir, pkcs11 or keyfile:PATH, got {s:?}"))),
        },
    };
    let tenant = a
        .tenant
        .as_deref()
        .map(|t| TenantId::parse(t).ok_or_else(|| usage(format!("--tenant must be 12 digits, got {t:?}"))))
        .transpose()?;
    let admin = PrincipalName::parse(&a.admin)
        .ok_or_else(|| usage(format!("--admin {:?} is not a valid principal name", a.admin)))?;
    check_shares_dir(a.shares_dir.as_deref())?;
    let (layout, out) = bootstrap::init(Bootstrap {
        data_dir: a.data.clone(),
        admin_roles: custody_kms::InitOptions::FIRST_ADMIN_ROLES.to_vec(),
        seal: seal.clone(),
        tenant,
        admin,
        server_names: a.server_names,
        endpoint: a.profile_endpoint,
        database: bootstrap::database_options(a.database_url.clone(), &a.database_schema, a.database_ca_file.clone())
            .map_err(|m| CliError::new(exit::USAGE, m))?,
    })
    .map_err(|m| CliError::new(exit::FAILURE, m))?;
    let shares: Vec<Zeroizing<String>> = out.shares.iter().map(|s| s.to_text()).collect();
    let share_files = write_shares(a.shares_dir.as_deref(), &shares)?;
    if json {
        let printed: Vec<&str> =
            if a.shares_dir.is_none() { shares.iter().map(|s| s.as_str()).collect() } else { Vec::new() };
        print_json(&json!({
            "StoreId": out.store_id,
            "Account": out.tenant.as_str(),
            "Administrator": out.admin.as_str(),
            "Profile": layout.admin_profile(),
            "CaFile": layout.ca_cert(),
            "Shares": printed,
            "ShareFiles": share_files,
        }));
        return Ok(());
    }
    println!("Initialized custody in {} (store {})", a.data.display(), out.store_id);
    println!("  account:       {}", out.tenant);
    println!("  administrator: {} (profile {})", out.admin, layout.admin_profile().display());
    println!("  CA:            {}", layout.ca_cert().display());
    let kind = match &seal {
        SealChoice::KeyFile(p) => {
            println!("  seal:          key file {} (DEVELOPMENT ONLY)", p.display());
            None
        }
        SealChoice::Shamir { threshold, shares: n } => {
            println!("  seal:          Shamir, {threshold} of {n} shares unseal");
            Some("Unseal")
        }
        SealChoice::Pkcs11 { hsm, threshold, shares: n } => {
            println!(
                "  seal:          PKCS#11 token {:?}, key {:?} (the server unseals itself at start)",
                hsm.token_label, hsm.key_label
            );
            println!("  recovery:      {threshold} of {n} shares recover the store if the token is lost");
            Some("Recovery")
        }
    };
    if let Some(kind) = kind {
        print_shares(kind, &shares, &share_files);
    }
    match &seal {
        SealChoice::Pkcs11 { .. } => {
            println!("\nNext: CUSTODY_PKCS11_PIN_FILE=PIN-FILE custody server --data {}", a.data.display())
        }
        _ => println!(
            "\nNext: custody server --data {}   then   custody unseal --profile {}",
            a.data.display(),
            layout.admin_profile().display()
        ),
    }
    Ok(())
}

async fn server(a: ServerArgs) -> Result<()> {
    let mut config = custody_server::ServerConfig::load(a.config.as_deref())
        .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    if let Some(d) = a.data {
        config.data_dir = d;
    }
    if let Some(l) = a.listen {
        config.listen = l;
    }
    custody_server::process::harden(config.danger_allow_swap).map_err(|e| CliError::new(exit::FAILURE, e))?;
    let shutdown = Shutdown::install()?;
    let server =
        custody_server::Server::start(config).await.map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    let sealed = server.kms().status().map(|s| s.sealed).unwrap_or(true);
    eprintln!(
        "custody listening on https://{}{}",
        server.local_addr(),
        if sealed { " (sealed: run `custody unseal`)" } else { "" }
    );
    shutdown.wait().await;
    eprintln!("custody: shutting down");
    server.shutdown().await;
    Ok(())
}

/// Ctrl-C and SIGTERM, caught from the moment this is installed: install it before the server
/// says it is ready, so a supervisor's (or a test's) SIGTERM right after the ready line still
/// shuts down cleanly instead of killing the process with the default action.
pub(crate) struct Shutdown {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    pub(crate) fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let fail = |e: std::io::Error| CliError::new(exit::FAILURE, format!("cannot install signal handlers: {e}"));
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).map_err(fail)?,
            terminate: signal(SignalKind::terminate()).map_err(fail)?,
        })
    }

    /// Waits for either signal.
    pub(crate) async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Resolves the profile: --profile / CUSTODY_PROFILE, else ./.custody-dev/admin/profile.toml,
/// else ~/.config/custody/profile.toml; then flags and environment variables on top.
pub(crate) fn profile(conn: &ConnArgs) -> Result<Profile> {
    let candidates = [
        conn.profile.clone(),
        Some(PathBuf::from(".custody-dev/admin/profile.toml")).filter(|p| p.exists()),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/custody/profile.toml")).filter(|p| p.exists()),
    ];
    let base = match candidates.into_iter().flatten().next() {
        Some(p) => Profile::load(&p)?,
        None => Profile::default(),
    };
    Ok(base.overlay(Profile {
        endpoint: conn.endpoint.clone(),
        ca_file: conn.ca_file.clone(),
        cert_file: conn.cert_file.clone(),
        key_file: conn.key_file.clone(),
    }))
}

pub(crate) async fn connect(conn: &ConnArgs) -> Result<Client> {
    Ok(Client::connect(&profile(conn)?).await?)
}

async fn unseal(conn: &ConnArgs, a: UnsealArgs, json: bool) -> Result<()> {
    let mut client = connect(conn).await?;
    let mut status = client.call("Custody.GetStatus", json!({})).await?;
    let interactive = a.share_files.is_empty();
    let mut files = a.share_files.into_iter();
    while status["Sealed"] == true {
        let share = if interactive {
            let kind = if a.recovery || status["SealType"] == "pkcs11" { "Recovery" } else { "Unseal" };
            let prompt = format!("{kind} share ({} of {} so far): ", status["Progress"], status["Threshold"]);
            if std::io::stdin().is_terminal() {
                Zeroizing::new(
                    rpassword::prompt_password(prompt).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?,
                )
            } else {
                let mut line = Zeroizing::new(String::new());
                if std::io::stdin().read_line(&mut line).map_err(|e| CliError::new(exit::FAILURE, e.to_string()))? == 0
                {
                    break;
                }
                line
            }
        } else {
            match files.next() {
                Some(f) => Zeroizing::new(
                    std::fs::read_to_string(&f)
                        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", f.display())))?,
                ),
                None => break,
            }
        };
        match client.call("Custody.Unseal", json!({ "Share": share.trim() })).await {
            Ok(s) => status = s,
            Err(custody_client::ClientError::Api { code, message, .. })
                if code == "InvalidShareException" && interactive =>
            {
                eprintln!("share refused: {message}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if json {
        print_json(&status);
    } else if status["Sealed"] == true {
        println!("Still sealed: {} of {} shares submitted.", status["Progress"], status["Threshold"]);
    } else {
        println!("Unsealed.");
    }
    if status["Sealed"] == true {
        return Err(CliError::new(exit::SEALED, "not enough shares to unseal"));
    }
    Ok(())
}

async fn status(conn: &ConnArgs, json: bool) -> Result<()> {
    let profile = profile(conn)?;
    let mut client = Client::connect(&profile).await?;
    let status = client.call("Custody.GetStatus", json!({})).await?;
    let who = if status["Sealed"] == false { client.call("Custody.WhoAmI", json!({})).await.ok() } else { None };
    let kx = client.key_exchange_group().unwrap_or("unknown").to_string();
    let endpoint = profile.endpoint()?.to_string();
    if json {
        print_json(&json!({ "Endpoint": endpoint, "Status": status, "Identity": who, "KeyExchange": kx }));
    } else {
        println!("endpoint:      {endpoint}");
        println!("version:       {}", status["Version"].as_str().unwrap_or("?"));
        println!("sealed:        {}", status["Sealed"]);
        println!("seal:          {}", status["SealType"].as_str().unwrap_or("?"));
        println!(
            "root key:      generation {}{}",
            status["RootGeneration"],
            if status["RootRotating"] == true { " (rotation under way: custody root status)" } else { "" }
        );
        if status["Sealed"] == true {
            println!("unseal:        {} of {} shares", status["Progress"], status["Threshold"]);
        }
        if let Some(w) = &who {
            println!("you are:       {}", w["Arn"].as_str().unwrap_or("?"));
        }
        if status["Sealed"] == false {
            let audit = if status["AuditDisabled"] == true {
                "DISABLED by danger_disable_audit: nothing is recorded"
            } else if status["AuditFailing"] == true {
                "FAILING: requests are refused"
            } else {
                "ok"
            };
            println!("audit trail:   {audit}; {} alerts since start", status["Alerts"]);
        }
        println!("TLS:           1.3, key exchange {kx}");
    }
    if status["Sealed"] == true {
        return Err(CliError::new(exit::SEALED, "custody is sealed: run `custody unseal`"));
    }
    Ok(())
}

async fn key(conn: &ConnArgs, cmd: KeyCommand, json: bool) -> Result<()> {
    let mut c = connect(conn).await?;
    match cmd {
        KeyCommand::Create { description, alias, tags, policy } => {
            let tags: Vec<Value> = tags.into_iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect();
            let mut body = json!({ "Description": description, "Tags": tags });
            if let Some(p) = policy {
                body["Policy"] = json!(read_policy(&p)?);
            }
            let r = c.call("TrentService.CreateKey", body).await?;
            if let Some(alias) = &alias {
                let id = r["KeyMetadata"]["KeyId"].clone();
                c.call("TrentService.CreateAlias", json!({ "AliasName": alias, "TargetKeyId": id })).await.map_err(|e| {
                    let e = CliError::from(e);
                    let hint = format!("created key {id} but not the alias; fix the name and run: custody key alias create ALIAS {id}");
                    CliError::new(e.code, format!("{}\n{hint}", e.message))
                })?;
            }
            output(json, &r, || {
                print_metadata(&r["KeyMetadata"]);
                if let Some(a) = &alias {
                    println!("Alias:        {a}");
                }
            });
        }
        KeyCommand::Policy(PolicyCommand::Get { key }) => {
            let r = c.call("TrentService.GetKeyPolicy", json!({ "KeyId": key, "PolicyName": "default" })).await?;
            output(json, &r, || {
                let text = r["Policy"].as_str().unwrap_or("");
                let pretty =
                    serde_json::from_str::<Value>(text).map(|v| serde_json::to_string_pretty(&v).unwrap_or_default());
                println!("{}", pretty.unwrap_or_else(|_| text.to_string()));
            });
        }
        KeyCommand::Policy(PolicyCommand::Put { key, file }) => {
            let body = json!({ "KeyId": key, "PolicyName": "default", "Policy": read_policy(&file)? });
            simple(&mut c, json, "TrentService.PutKeyPolicy", body, "Key policy replaced.").await?
        }
        KeyCommand::List => {
            let keys = paginate(&mut c, "TrentService.ListKeys", json!({}), "Keys").await?;
            output(json, &json!({ "Keys": keys }), || {
                for k in &keys {
                    println!("{}  {}", k["KeyId"].as_str().unwrap_or(""), k["KeyArn"].as_str().unwrap_or(""));
                }
            });
        }
        KeyCommand::Describe { key } => {
            let r = c.call("TrentService.DescribeKey", json!({ "KeyId": key })).await?;
            output(json, &r, || print_metadata(&r["KeyMetadata"]));
        }
        KeyCommand::Enable { key } => {
            simple(&mut c, json, "TrentService.EnableKey", json!({ "KeyId": key }), &format!("Enabled {key}.")).await?
        }
        KeyCommand::Disable { key } => {
            simple(&mut c, json, "TrentService.DisableKey", json!({ "KeyId": key }), &format!("Disabled {key}."))
                .await?
        }
        KeyCommand::Rotate { key } => {
            let r = c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": key })).await?;
            output(json, &r, || {
                println!("Rotated {}: a new version encrypts from now on.", r["KeyId"].as_str().unwrap_or(""))
            });
        }
        KeyCommand::Rotations { key } => {
            let rotations =
                paginate(&mut c, "TrentService.ListKeyRotations", json!({ "KeyId": key }), "Rotations").await?;
            output(json, &json!({ "Rotations": rotations }), || {
                if rotations.is_empty() {
                    println!("No rotations yet.");
                }
                for r in &rotations {
                    println!("{}  {}", fmt_time(&r["RotationDate"]), r["RotationType"].as_str().unwrap_or(""));
                }
            });
        }
        KeyCommand::ScheduleDeletion { key, days } => {
            let mut body = json!({ "KeyId": key });
            if let Some(d) = days {
                body["PendingWindowInDays"] = json!(d);
            }
            let r = c.call("TrentService.ScheduleKeyDeletion", body).await?;
            output(json, &r, || {
                println!(
                    "{} will be destroyed at {} ({} days). Cancel with: custody key cancel-deletion {}",
                    r["KeyId"].as_str().unwrap_or(""),
                    fmt_time(&r["DeletionDate"]),
                    r["PendingWindowInDays"],
                    key
                )
            });
        }
        KeyCommand::CancelDeletion { key } => {
            let r = c.call("TrentService.CancelKeyDeletion", json!({ "KeyId": key })).await?;
            output(json, &r, || {
                println!(
                    "Deletion cancelled; {} is now Disabled (enable it with custody key enable).",
                    r["KeyId"].as_str().unwrap_or("")
                )
            });
        }
        KeyCommand::Alias(a) => alias(&mut c, a, json).await?,
        KeyCommand::Rotation(RotationCommand::Enable { key, period_days }) => {
            let mut body = json!({ "KeyId": key });
            if let Some(p) = period_days {
                body["RotationPeriodInDays"] = json!(p);
            }
            simple(
                &mut c,
                json,
                "TrentService.EnableKeyRotation",
                body,
                &format!("Automatic rotation enabled for {key}."),
            )
            .await?
        }
        KeyCommand::Rotation(RotationCommand::Disable { key }) => {
            simple(
                &mut c,
                json,
                "TrentService.DisableKeyRotation",
                json!({ "KeyId": key }),
                &format!("Automatic rotation disabled for {key}."),
            )
            .await?
        }
        KeyCommand::Rotation(RotationCommand::Status { key }) => {
            let r = c.call("TrentService.GetKeyRotationStatus", json!({ "KeyId": key })).await?;
            output(json, &r, || {
                if r["KeyRotationEnabled"] == true {
                    println!(
                        "enabled, every {} days, next {}",
                        r["RotationPeriodInDays"],
                        fmt_time(&r["NextRotationDate"])
                    );
                } else {
                    println!("disabled");
                }
            });
        }
        KeyCommand::Tag { key, tags } => {
            let tags: Vec<Value> = tags.into_iter().map(|(k, v)| json!({"TagKey": k, "TagValue": v})).collect();
            simple(&mut c, json, "TrentService.TagResource", json!({ "KeyId": key, "Tags": tags }), "Tagged.").await?
        }
        KeyCommand::Untag { key, tag_keys } => {
            simple(
                &mut c,
                json,
                "TrentService.UntagResource",
                json!({ "KeyId": key, "TagKeys": tag_keys }),
                "Untagged.",
            )
            .await?
        }
        KeyCommand::Tags { key } => {
            let tags = paginate(&mut c, "TrentService.ListResourceTags", json!({ "KeyId": key }), "Tags").await?;
            output(json, &json!({ "Tags": tags }), || {
                for t in &tags {
                    println!("{}={}", t["TagKey"].as_str().unwrap_or(""), t["TagValue"].as_str().unwrap_or(""));
                }
            });
        }
    }
    Ok(())
}

async fn alias(c: &mut Client, a: AliasCommand, json: bool) -> Result<()> {
    match a {
        AliasCommand::Create { alias, key } => {
            simple(
                c,
                json,
                "TrentService.CreateAlias",
                json!({ "AliasName": alias, "TargetKeyId": key }),
                &format!("{alias} -> {key}"),
            )
            .await
        }
        AliasCommand::Update { alias, key } => {
            simple(
                c,
                json,
                "TrentService.UpdateAlias",
                json!({ "AliasName": alias, "TargetKeyId": key }),
                &format!("{alias} -> {key}"),
            )
            .await
        }
        AliasCommand::Delete { alias } => {
            simple(c, json, "TrentService.DeleteAlias", json!({ "AliasName": alias }), &format!("Deleted {alias}."))
                .await
        }
        AliasCommand::List { key } => {
            let body = key.map_or_else(|| json!({}), |k| json!({ "KeyId": k }));
            let aliases = paginate(c, "TrentService.ListAliases", body, "Aliases").await?;
            output(json, &json!({ "Aliases": aliases }), || {
                for a in &aliases {
                    println!("{}  {}", a["AliasName"].as_str().unwrap_or(""), a["TargetKeyId"].as_str().unwrap_or(""));
                }
            });
            Ok(())
        }
    }
}

async fn audit(conn: &ConnArgs, cmd: AuditCommand, json: bool) -> Result<()> {
    match cmd {
        AuditCommand::Query { key, principal, action, outcome, since, after, limit } => {
            let since = since.as_deref().map(parse_since).transpose()?;
            let mut c = connect(conn).await?;
            let body = json!({ "After": after, "Limit": limit, "KeyId": key, "Principal": principal, "Action": action,
                               "Outcome": outcome, "Since": since });
            let r = c.call("Custody.ListAuditRecords", body).await?;
            output(json, &r, || {
                let records = r["Records"].as_array().map(Vec::as_slice).unwrap_or_default();
                for rec in records {
                    print_audit_line(rec);
                }
                // Say on stderr when the page is full (there may be more) or empty, so that a
                // table on stdout stays clean for other tools.
                match records.last() {
                    None => eprintln!("no records match"),
                    Some(last) if records.len() == limit as usize => eprintln!(
                        "{limit} records shown (--limit); more may match: add --after {}",
                        last["seq"].as_u64().unwrap_or(0)
                    ),
                    Some(_) => {}
                }
            });
            Ok(())
        }
        AuditCommand::Verify { from_export, public_key } => {
            let v = match from_export {
                None => connect(conn).await?.call("Custody.VerifyAudit", json!({})).await?,
                Some(file) => {
                    let key = match public_key {
                        Some(k) => k,
                        None => {
                            let r = connect(conn).await?.call("Custody.GetAuditPublicKey", json!({})).await?;
                            r["PublicKey"].as_str().unwrap_or_default().to_string()
                        }
                    };
                    let key = hex_decode(&key)
                        .ok_or_else(|| CliError::new(exit::INVALID_REQUEST, "--public-key must be hex"))?;
                    verify_export(&file, &key)?
                }
            };
            output(json, &v, || match v["problem"].as_object() {
                None => {
                    let count = |field: &str, one: &str| match v[field].as_u64().unwrap_or(0) {
                        1 => format!("1 {one}"),
                        n => format!("{n} {one}s"),
                    };
                    let elided = match v["elided"].as_u64().unwrap_or(0) {
                        0 => String::new(),
                        n => format!(" ({n} of other accounts: links checked, content not shown)"),
                    };
                    println!(
                        "OK: {}{elided}, {}, chain intact from {} to {}.",
                        count("records", "record"),
                        count("checkpoints", "signed checkpoint"),
                        v["first_seq"],
                        v["last_seq"]
                    )
                }
                Some(p) => println!("BROKEN at record {}: {}", p["seq"], p["what"].as_str().unwrap_or("")),
            });
            if v["problem"].is_object() {
                return Err(CliError::new(exit::FAILURE, "the audit trail does not verify"));
            }
            Ok(())
        }
        AuditCommand::Export { out, since } => {
            let since = since.as_deref().map(parse_since).transpose()?;
            let mut c = connect(conn).await?;
            let io = export_write_error;
            // A file is staged (0600) and renamed over the path once complete; stdout, a
            // descriptor, a device or a pipe is written as a stream (renaming would replace it).
            let target = out.as_deref().map_or(OutputTarget::Descriptor(1), custody_server::output_target);
            let path = match out {
                Some(path) if target == OutputTarget::File => path,
                dest => {
                    let mut w =
                        std::io::BufWriter::new(crate::envelope::stream_output(dest.as_deref(), target).map_err(io)?);
                    export_trail(&mut c, since, &mut w, None).await?;
                    return w.flush().map_err(io);
                }
            };
            let mut staged = custody_server::AtomicFile::create(&path, Some(0o600)).map_err(io)?;
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} records  {per_sec}")
                        .expect("a valid template"),
                );
                bar
            });
            let mut w = std::io::BufWriter::new(&mut staged);
            let counts = export_trail(&mut c, since, &mut w, bar.as_ref()).await?;
            w.flush().map_err(io)?;
            drop(w);
            staged.commit().map_err(io)?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let summary = json!({ "Path": path, "Records": counts.0, "Elided": counts.1, "Checkpoints": counts.2 });
            output(json, &summary, || {
                eprintln!(
                    "exported {} records ({} of other accounts as links only) and {} checkpoints to {}",
                    counts.0,
                    counts.1,
                    counts.2,
                    path.display()
                )
            });
            Ok(())
        }
        AuditCommand::Tail { follow, lines } => {
            let mut c = connect(conn).await?;
            // This command's own requests are records too: they are not shown (with -f they
            // would be one line a second).
            let mut own = std::collections::VecDeque::new();
            let call = async |c: &mut Client, own: &mut std::collections::VecDeque<String>, body| {
                let r = c.call("Custody.ListAuditRecords", body).await?;
                own.extend(c.last_request_id().map(str::to_string));
                if own.len() > 64 {
                    own.pop_front();
                }
                Ok::<_, CliError>(r)
            };
            let last = call(&mut c, &mut own, json!({ "Limit": 1, "After": u64::MAX - 1 })).await?;
            let last_seq = last["LastSeq"].as_u64().unwrap_or(0);
            // The newest `lines` records of this account: other accounts' records are not
            // listed, so look further back until there are enough or the trail begins.
            let wanted = usize::try_from(lines).unwrap_or(usize::MAX);
            let mut window = lines.max(1);
            let newest = loop {
                let from = last_seq.saturating_sub(window);
                let mut newest = std::collections::VecDeque::new();
                let mut after = from;
                loop {
                    let r = call(&mut c, &mut own, json!({ "After": after, "Limit": 10_000 })).await?;
                    let page = r["Records"].as_array().cloned().unwrap_or_default();
                    for rec in &page {
                        after = rec["seq"].as_u64().unwrap_or(after);
                        if rec["seq"].as_u64().unwrap_or(0) <= last_seq {
                            newest.push_back(rec.clone());
                            if newest.len() > wanted {
                                newest.pop_front();
                            }
                        }
                    }
                    if page.len() < 10_000 || after >= last_seq {
                        break;
                    }
                }
                if newest.len() >= wanted || from == 0 {
                    break newest;
                }
                window = window.saturating_mul(4);
            };
            let show = |rec: &Value| {
                if json {
                    println!("{}", serde_json::to_string(rec).expect("json"));
                } else {
                    print_audit_line(rec);
                }
            };
            newest.iter().for_each(show);
            if !follow {
                return Ok(());
            }
            let mut after = last_seq;
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let r = call(&mut c, &mut own, json!({ "After": after, "Limit": 1000 })).await?;
                let records = r["Records"].as_array().map(Vec::as_slice).unwrap_or_default();
                // A full page: continue after its last record; else after the end of the trail
                // as it was when the query began (every record up to it was looked at), or
                // after the last record shown if that came later.
                let shown = records.last().and_then(|rec| rec["seq"].as_u64()).unwrap_or(after);
                after = match records.len() {
                    1000 => shown,
                    _ => shown.max(r["LastSeq"].as_u64().unwrap_or(after)),
                }
                .max(after);
                for rec in records {
                    if !own.iter().any(|id| rec["request_id"].as_str() == Some(id.as_str())) {
                        show(rec);
                    }
                }
            }
        }
        AuditCommand::Hash { value } => {
            let r = connect(conn).await?.call("Custody.AuditHash", json!({ "Value": value })).await?;
            output(json, &r, || println!("{}", r["Hash"].as_str().unwrap_or("")));
            Ok(())
        }
    }
}

fn print_audit_line(rec: &Value) {
    let who =
        rec["principal"].as_str().or(rec["tls_identity"].as_str()).or(rec["access_key_id"].as_str()).unwrap_or("-");
    // Why a request was refused or failed, last (absent for successes).
    let why = rec["error_code"].as_str().map(|c| format!("  {c}")).unwrap_or_default();
    println!(
        "{:>8}  {}  {:<15}{}  {:<36}  {}  {}{why}",
        rec["seq"],
        fmt_time(&json!(rec["time"].as_f64().map(|t| t / 1000.0))),
        rec["outcome"].as_str().unwrap_or("-"),
        if rec["alert"] == true { " !" } else { "  " },
        rec["action"].as_str().unwrap_or("-"),
        who,
        audit_keys(rec)
    );
}

/// The key a record names, with its version (`KEY v3`); a ReEncrypt's as `SOURCE v1 -> KEY v3`.
fn audit_keys(rec: &Value) -> String {
    let key = |id: &str, version: &str| match (rec[id].as_str(), rec[version].as_u64()) {
        (Some(k), Some(v)) => format!("{k} v{v}"),
        (Some(k), None) => k.to_string(),
        (None, _) => "-".to_string(),
    };
    match rec["source_key_id"].as_str() {
        Some(_) => format!("{} -> {}", key("source_key_id", "source_key_version"), key("key_id", "key_version")),
        None => key("key_id", "key_version"),
    }
}

fn export_write_error(e: std::io::Error) -> CliError {
    CliError::new(exit::FAILURE, format!("cannot write the export: {e}"))
}

/// Writes the trail to `w` page by page (the server sends at most 1,000 records at a time): a
/// header line, then every record, elided record and checkpoint as a JSON line, in order.
/// Returns how many records, of them elided, and checkpoints were written.
async fn export_trail(
    c: &mut Client,
    since: Option<i64>,
    w: &mut dyn Write,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(u64, u64, u64)> {
    let io = export_write_error;
    let mut request = match since {
        Some(ms) => json!({ "Since": ms, "Limit": 1000 }),
        None => json!({ "Limit": 1000 }),
    };
    let (mut records, mut elided, mut checkpoints) = (0u64, 0u64, 0u64);
    let mut header = true;
    loop {
        let page = c.call("Custody.ExportAudit", request).await?;
        if std::mem::take(&mut header) {
            let line = json!({ "custody_audit_export": 2, "public_key": page["PublicKey"] });
            writeln!(w, "{line}").map_err(io)?;
        }
        for line in page["Lines"].as_array().into_iter().flatten() {
            if line.get("checkpoint").is_some() {
                checkpoints += 1;
            } else {
                records += 1;
                elided += u64::from(line.get("elided").is_some());
            }
            writeln!(w, "{line}").map_err(io)?;
        }
        if let Some(bar) = bar {
            bar.set_position(records);
        }
        match page["Next"].as_u64() {
            Some(next) => request = json!({ "After": next, "Limit": 1000 }),
            None => return Ok((records, elided, checkpoints)),
        }
    }
}

/// Verifies an export file with the same verifier the server uses, in two passes over its lines
/// (checkpoints first, then the records streamed through the verification), so memory does not
/// grow with the file.
fn verify_export(file: &Path, public_key: &[u8]) -> Result<Value> {
    use std::io::BufRead;
    let unreadable =
        move |e: std::io::Error| CliError::new(exit::FAILURE, format!("cannot read {}: {e}", file.display()));
    let lines = || -> Result<_> {
        let f = std::fs::File::open(file).map_err(unreadable)?;
        Ok(std::io::BufReader::new(f).lines().enumerate().map(move |(n, line)| {
            let line = line.map_err(unreadable)?;
            if line.trim().is_empty() {
                return Ok(None);
            }
            let known = ["record", "elided", "checkpoint", "custody_audit_export"];
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if known.iter().any(|k| v.get(k).is_some()) => Ok(Some(v)),
                _ => Err(CliError::new(
                    exit::INVALID_REQUEST,
                    format!("{} line {}: not a custody audit export line", file.display(), n + 1),
                )),
            }
        }))
    };
    let mut checkpoints = Vec::new();
    for v in lines()? {
        if let Some(c) = v?.as_ref().and_then(|v| v.get("checkpoint")) {
            let seq = c["seq"].as_u64().unwrap_or(0);
            checkpoints.push(serde_json::from_value::<custody_kms::AuditCheckpoint>(c.clone()).map_err(|_| seq));
        }
    }
    // The first pass found every unreadable line; the second only converts.
    let records = lines()?.filter_map(|v| {
        let v = v.ok()??;
        if let Some(r) = v.get("record") {
            let seq = r["seq"].as_u64().unwrap_or(0);
            let record = serde_json::from_value::<custody_kms::AuditRecord>(r.clone());
            Some(record.map(|r| custody_kms::TrailRecord::Whole(Box::new(r))).map_err(|_| seq))
        } else if let Some(r) = v.get("elided") {
            let seq = r["seq"].as_u64().unwrap_or(0);
            let record = serde_json::from_value::<custody_kms::ElidedRecord>(r.clone());
            Some(record.map(custody_kms::TrailRecord::Elided).map_err(|_| seq))
        } else {
            None
        }
    });
    let result = custody_kms::audit::verify_trail(public_key, records, checkpoints);
    Ok(serde_json::to_value(result).expect("serializable"))
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// `30m`, `1h`, `2d`, or an RFC 3339 time → milliseconds since the epoch.
fn parse_since(s: &str) -> Result<i64> {
    let now = time::OffsetDateTime::now_utc();
    let unit = |c: char| match c {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86_400),
        _ => None,
    };
    let t = match (s[..s.len().saturating_sub(1)].parse::<i64>(), s.chars().last().and_then(unit)) {
        (Ok(n), Some(secs)) => now - time::Duration::seconds(n * secs),
        _ => time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
            CliError::new(exit::INVALID_REQUEST, format!("--since {s:?}: use 30m, 1h, 2d or an RFC 3339 time"))
        })?,
    };
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn access_key(conn: &ConnArgs, cmd: AccessKeyCommand, json: bool) -> Result<()> {
    let mut c = connect(conn).await?;
    match cmd {
        AccessKeyCommand::Create { principal } => {
            let r = c.call("Custody.CreateAccessKey", json!({ "Principal": principal })).await?;
            output(json, &r, || {
                let k = &r["AccessKey"];
                println!("AccessKeyId:     {}", k["AccessKeyId"].as_str().unwrap_or(""));
                println!("SecretAccessKey: {}", k["SecretAccessKey"].as_str().unwrap_or(""));
                println!("Principal:       {}", k["Principal"].as_str().unwrap_or(""));
                println!("\nThe secret is shown once and cannot be retrieved again. For the AWS SDKs and CLI:");
                println!("  export AWS_ACCESS_KEY_ID={}", k["AccessKeyId"].as_str().unwrap_or(""));
                println!("  export AWS_SECRET_ACCESS_KEY=<the secret above>");
            });
        }
        AccessKeyCommand::List { principal } => {
            let r = c.call("Custody.ListAccessKeys", json!({ "Principal": principal })).await?;
            output(json, &r, || {
                for k in r["AccessKeys"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {}  {}",
                        k["AccessKeyId"].as_str().unwrap_or(""),
                        k["Status"].as_str().unwrap_or(""),
                        k["Principal"].as_str().unwrap_or("")
                    );
                }
            });
        }
        AccessKeyCommand::Disable { id } => {
            let body = json!({ "AccessKeyId": id, "Status": "Inactive" });
            simple(&mut c, json, "Custody.UpdateAccessKey", body, &format!("Disabled {id}.")).await?
        }
        AccessKeyCommand::Enable { id } => {
            let body = json!({ "AccessKeyId": id, "Status": "Active" });
            simple(&mut c, json, "Custody.UpdateAccessKey", body, &format!("Enabled {id}.")).await?
        }
        AccessKeyCommand::Delete { id } => {
            simple(&mut c, json, "Custody.DeleteAccessKey", json!({ "AccessKeyId": id }), &format!("Deleted {id}."))
                .await?
        }
    }
    Ok(())
}

async fn encrypt_blob(conn: &ConnArgs, a: EncryptBlobArgs, json: bool) -> Result<()> {
    let plaintext = read_input(&a.input)?;
    if plaintext.len() > 4096 {
        return Err(CliError::new(
            exit::INVALID_REQUEST,
            format!(
                "{} bytes is more than the 4096 a KMS key encrypts directly; use envelope encryption for files",
                plaintext.len()
            ),
        ));
    }
    let mut c = connect(conn).await?;
    let body =
        json!({ "KeyId": a.key, "Plaintext": B64.encode(&*plaintext), "EncryptionContext": context(&a.context) });
    let r = c.call("TrentService.Encrypt", body).await?;
    let blob = r["CiphertextBlob"].as_str().unwrap_or("");
    match (&a.out, json) {
        (Some(path), _) => {
            let raw = B64.decode(blob).map_err(|_| CliError::new(exit::FAILURE, "the server sent an invalid blob"))?;
            std::fs::write(path, raw)
                .map_err(|e| CliError::new(exit::FAILURE, format!("cannot write {}: {e}", path.display())))?;
            if json {
                print_json(&json!({ "KeyId": r["KeyId"], "Out": path }));
            }
        }
        (None, true) => print_json(&r),
        (None, false) => println!("{blob}"),
    }
    Ok(())
}

async fn decrypt_blob(conn: &ConnArgs, a: DecryptBlobArgs, json: bool) -> Result<()> {
    let input = read_input(&a.input)?;
    // Raw blobs start with the format byte 0x01, which is never base64 text.
    let blob = match std::str::from_utf8(&input).ok().and_then(|s| B64.decode(s.trim()).ok()) {
        Some(decoded) => decoded,
        None => input.to_vec(),
    };
    let mut c = connect(conn).await?;
    let mut body = json!({ "CiphertextBlob": B64.encode(&blob), "EncryptionContext": context(&a.context) });
    if let Some(k) = a.key {
        body["KeyId"] = json!(k);
    }
    let r = c.call("TrentService.Decrypt", body).await?;
    if json {
        print_json(&r);
        return Ok(());
    }
    let plaintext = Zeroizing::new(
        B64.decode(r["Plaintext"].as_str().unwrap_or(""))
            .map_err(|_| CliError::new(exit::FAILURE, "the server sent invalid plaintext"))?,
    );
    write_output(a.out.as_deref(), &plaintext)
}

async fn data_key(conn: &ConnArgs, a: DataKeyArgs, json: bool) -> Result<()> {
    let mut c = connect(conn).await?;
    let mut body = json!({ "KeyId": a.key, "EncryptionContext": context(&a.context) });
    match a.bytes {
        Some(n) => body["NumberOfBytes"] = json!(n),
        None => body["KeySpec"] = json!(a.spec.as_deref().unwrap_or("AES_256")),
    }
    let action = if a.without_plaintext {
        "TrentService.GenerateDataKeyWithoutPlaintext"
    } else {
        "TrentService.GenerateDataKey"
    };
    let r = c.call(action, body).await?;
    output(json, &r, || {
        println!("key:        {}", r["KeyId"].as_str().unwrap_or(""));
        if let Some(p) = r["Plaintext"].as_str() {
            println!("plaintext:  {p}");
        }
        println!("ciphertext: {}", r["CiphertextBlob"].as_str().unwrap_or(""));
    });
    Ok(())
}

async fn check(conn: &ConnArgs, json: bool) -> Result<()> {
    let mut c = connect(conn).await?;
    let r = c.call("Custody.CheckStore", json!({})).await?;
    let problems: Vec<&str> = r["Problems"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    output(json, &r, || {
        println!(
            "{} rows opened, {} keys, {} versions unwrapped ({} canaries decrypted), {} audit records verified.",
            r["Rows"], r["Keys"], r["Versions"], r["Canaries"], r["AuditRecords"]
        );
        if problems.is_empty() {
            println!("The store is sound.");
        }
        for p in &problems {
            println!("PROBLEM: {p}");
        }
    });
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(exit::FAILURE, format!("{} problem(s) found in the store", problems.len())))
    }
}

pub(crate) async fn simple(c: &mut Client, json: bool, target: &str, body: Value, done: &str) -> Result<()> {
    let r = c.call(target, body).await?;
    output(json, &r, || println!("{done}"));
    Ok(())
}

async fn paginate(c: &mut Client, target: &str, mut body: Value, field: &str) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    loop {
        let r = c.call(target, body.clone()).await?;
        all.extend(r[field].as_array().cloned().unwrap_or_default());
        match r["NextMarker"].as_str() {
            Some(m) if r["Truncated"] == true => body["Marker"] = json!(m),
            _ => return Ok(all),
        }
    }
}

pub(crate) fn context(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

fn read_input(input: &str) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    if input == "-" {
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read stdin: {e}")))?;
    } else {
        std::fs::File::open(input)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|e| CliError::new(exit::FAILURE, format!("cannot read {input}: {e}")))?;
    }
    Ok(buf)
}

fn write_output(out: Option<&Path>, bytes: &[u8]) -> Result<()> {
    match out {
        Some(p) => bootstrap::write_file(p, bytes, 0o600).map_err(|m| CliError::new(exit::FAILURE, m)),
        None => std::io::stdout().write_all(bytes).map_err(|e| CliError::new(exit::FAILURE, e.to_string())),
    }
}

/// Refuses a `--shares-dir` that holds anything (shares are never overwritten).
pub(crate) fn check_shares_dir(dir: Option<&Path>) -> Result<()> {
    if let Some(dir) = dir {
        if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(CliError::new(
                exit::INVALID_REQUEST,
                format!("--shares-dir {} must be a new or empty directory", dir.display()),
            ));
        }
    }
    Ok(())
}

/// Writes each share to `dir/share-N.txt` (0600), if a directory is given; returns the files.
pub(crate) fn write_shares(dir: Option<&Path>, shares: &[Zeroizing<String>]) -> Result<Vec<PathBuf>> {
    let Some(dir) = dir else { return Ok(Vec::new()) };
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot create {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for (i, s) in shares.iter().enumerate() {
        let p = dir.join(format!("share-{}.txt", i + 1));
        bootstrap::write_file(&p, format!("{}\n", s.as_str()).as_bytes(), 0o600)
            .map_err(|m| CliError::new(exit::FAILURE, m))?;
        files.push(p);
    }
    Ok(files)
}

/// Prints the shares (shown once), or where they were written.
pub(crate) fn print_shares(kind: &str, shares: &[Zeroizing<String>], files: &[PathBuf]) {
    if files.is_empty() {
        println!("\n{kind} shares. They are shown ONCE and stored nowhere. Give each to a different person:\n");
        for (i, s) in shares.iter().enumerate() {
            println!("  share {}: {}", i + 1, s.as_str());
        }
    } else {
        println!("\n{kind} shares written to:");
        for p in files {
            println!("  {}", p.display());
        }
    }
}

pub(crate) fn output(json: bool, value: &Value, human: impl FnOnce()) {
    if json {
        print_json(value);
    } else {
        human();
    }
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON values serialize"));
}

fn print_metadata(m: &Value) {
    let s = |k: &str| m[k].as_str().unwrap_or("").to_string();
    println!("KeyId:        {}", s("KeyId"));
    println!("Arn:          {}", s("Arn"));
    println!("State:        {}", s("KeyState"));
    println!("Description:  {}", s("Description"));
    println!("Created:      {}", fmt_time(&m["CreationDate"]));
    println!("Spec:         {} ({})", s("KeySpec"), s("KeyUsage"));
    if m.get("DeletionDate").is_some() {
        println!("Deletion:     {}", fmt_time(&m["DeletionDate"]));
    }
}

fn fmt_time(v: &Value) -> String {
    let Some(secs) = v.as_f64() else { return "-".into() };
    fmt_secs(secs as i64)
}

/// Seconds since the epoch as RFC 3339.
pub(crate) fn fmt_secs(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}
