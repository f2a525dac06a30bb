//! The `custody` command line: thin; every command calls the client or the server library.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod access;
mod backup;
pub mod bootstrap;
mod commands;
mod dev;
mod envelope;
pub mod exit;
mod pki;
mod root;
mod seal;
mod top;

/// The process's allocator. glibc's malloc serialized the server's threads on its arena locks
/// (perf: futex waits under malloc/free, from buffers allocated on one thread and freed on
/// another, e.g. audit events); mimalloc's thread-local free lists do not. Declared here, in the
/// library, so the binary, its tests and its benchmarks all run on the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use commands::run;

/// custody: a self-hosted key management service that speaks the AWS KMS protocol.
#[derive(Debug, Parser)]
#[command(name = "custody", version, about, long_about = None, after_help = "\
Examples:
  custody dev                              start a local server (TLS 1.3, unsealed, embedded store)
  source .custody-dev/env                  point this shell at it
  custody key create --description demo    create a key
  echo -n secret | custody encrypt-blob -k alias/demo > secret.b64

Connection settings come from flags, CUSTODY_* environment variables, or a profile:
--profile / CUSTODY_PROFILE, else ./.custody-dev/admin/profile.toml if present,
else ~/.config/custody/profile.toml.")]
pub struct Cli {
    #[command(flatten)]
    /// Connection settings.
    pub conn: ConnArgs,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    /// The command.
    pub command: Command,
}

/// How to reach custody.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Profile file with endpoint, CA and client certificate.
    #[arg(long, global = true, env = "CUSTODY_PROFILE", value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Server endpoint, e.g. https://127.0.0.1:8443.
    #[arg(long, global = true, env = "CUSTODY_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// CA certificate that signed the server's certificate.
    #[arg(long, global = true, env = "CUSTODY_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true, env = "CUSTODY_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, global = true, env = "CUSTODY_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local development server: initializes on first use (key-file seal), starts
    /// unsealed, prints the environment to use it.
    #[command(after_help = "\
Examples:
  custody dev                                   ./.custody-dev, https://127.0.0.1:8443
  custody dev --data /tmp/kms --listen 127.0.0.1:0   a free port; the real one is printed and written to DIR/env")]
    Dev(dev::DevArgs),
    /// Initialize a data directory: root key (Shamir shares or key file), internal CA, server
    /// certificate, first administrator.
    #[command(after_help = "\
Examples:
  custody init --data /var/lib/custody                      3-of-5 shares, printed once
  custody init --data ./d --shares 5 --threshold 3 --shares-dir ./shares
  custody init --data ./d --seal keyfile:./d/root.key       development only
  custody init --data ./d --database-url postgres://custody@127.0.0.1/kms
                                    (then run the server with CUSTODY_DATABASE_URL set the same)")]
    Init(commands::InitArgs),
    /// Run the server.
    #[command(after_help = "\
Examples:
  custody server --data /var/lib/custody
  custody server --config /etc/custody/custody.toml
  CUSTODY_LISTEN=0.0.0.0:8443 custody server --data ./d")]
    Server(commands::ServerArgs),
    /// Submit unseal shares to a sealed server.
    #[command(after_help = "\
Examples:
  custody unseal                                  prompts for shares until unsealed
  custody unseal --share-file s1 --share-file s2 --share-file s3")]
    Unseal(commands::UnsealArgs),
    /// Show the server's seal state, version and your identity.
    #[command(after_help = "Example:\n  custody status --json")]
    Status,
    /// Manage keys.
    #[command(subcommand)]
    Key(commands::KeyCommand),
    /// Encrypt up to 4096 bytes with a KMS key (the raw KMS Encrypt; for files use envelope encryption).
    #[command(
        name = "encrypt-blob",
        after_help = "\
Examples:
  echo -n 'db password' | custody encrypt-blob -k alias/app -c app=billing > secret.b64
  custody encrypt-blob -k 1234abcd-... --out secret.bin secret.txt"
    )]
    EncryptBlob(commands::EncryptBlobArgs),
    /// Decrypt a KMS ciphertext blob (base64 or raw).
    #[command(
        name = "decrypt-blob",
        after_help = "\
Examples:
  custody decrypt-blob -c app=billing secret.b64
  custody decrypt-blob -k alias/app --out secret.txt secret.bin"
    )]
    DecryptBlob(commands::DecryptBlobArgs),
    /// Encrypt files or streams (envelope encryption, AWS Encryption SDK message format): a fresh
    /// data key per message from custody KMS keys and/or raw AES keys; the bulk work is local.
    #[command(after_help = "\
Examples:
  custody encrypt -k alias/app -c purpose=backup -o db.dump.encrypted db.dump
  tar c dir | custody encrypt -k alias/app > dir.tar.encrypted
  custody encrypt -k alias/app -k alias/dr --suite committed-signed -r ./docs --out-dir ./sealed
  custody encrypt --raw-aes-key acme/backup-2026=./backup.key -o out.encrypted in.bin   (offline)

The output is readable by the AWS Encryption SDKs and their CLI (aws-encryption-cli).
A file output is written to a temporary name and renamed once complete.")]
    Encrypt(envelope::EncryptArgs),
    /// Decrypt what `custody encrypt` (or an AWS Encryption SDK) made.
    #[command(after_help = "\
Examples:
  custody decrypt -k alias/app --require-context purpose=backup -o db.dump db.dump.encrypted
  custody decrypt --discovery < dir.tar.encrypted | tar x
  custody decrypt -r ./sealed --out-dir ./plain -v
  custody decrypt --raw-aes-key acme/backup-2026=./backup.key -o in.bin out.encrypted

With -k, only data keys of those keys are tried (strict); without any key, every custody key
you may use is (discovery). A file output appears only once the whole message, its last frame
and its signature are verified.")]
    Decrypt(envelope::DecryptArgs),
    /// Re-wrap the data keys of encrypted files under a key's current version (or another key),
    /// in place: only the header changes, every body byte stays; resumable.
    #[command(after_help = "\
Examples:
  custody rewrap -k alias/app ./archive                  after a rotation: current version
  custody rewrap -k alias/new --from alias/old --rate 200 --concurrency 8 --resume rewrap.journal ./archive
  custody rewrap -k alias/app --dry-run ./archive --json

Files already wrapped by the key's current version are skipped. Signed messages (--suite
committed-signed) cannot be re-wrapped: their signature covers the header.")]
    Rewrap(envelope::RewrapArgs),
    /// Read the audit trail.
    #[command(subcommand)]
    Audit(commands::AuditCommand),
    /// Watch a running server: requests per second, errors and latency by action, the audit's
    /// group commits, seal state, keys, caches and certificates, refreshed in place (from its
    /// metrics listener).
    #[command(after_help = "\
Examples:
  custody top                                         http://127.0.0.1:9464/metrics, every 2 s
  custody top --metrics http://127.0.0.1:9500/metrics -i 5
  custody top --once --json                           one view over one interval, as JSON
  custody top --json > top.jsonl                      a JSON line per interval, for a file

The server serves its metrics only with metrics_listen (custody dev: CUSTODY_METRICS_LISTEN),
on a loopback address; `custody dev` writes CUSTODY_METRICS_URL to .custody-dev/env.")]
    Top(top::TopArgs),
    /// SigV4 access keys, for the AWS SDKs and CLI.
    #[command(name = "access-key", subcommand)]
    AccessKey(commands::AccessKeyCommand),
    /// Generate a data key: plaintext and its ciphertext under a KMS key.
    #[command(
        name = "data-key",
        after_help = "\
Examples:
  custody data-key -k alias/app --json
  custody data-key -k alias/app --bytes 64 --without-plaintext"
    )]
    DataKey(commands::DataKeyArgs),
    /// Tenants (security officer).
    #[command(subcommand)]
    Tenant(access::TenantCommand),
    /// Principals of your tenant (tenant admin).
    #[command(subcommand)]
    Principal(access::PrincipalCommand),
    /// Backups that are proven to restore (security officer).
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// How the root key is kept: `custody seal migrate` between Shamir shares and a PKCS#11
    /// token (offline).
    #[command(subcommand)]
    Seal(seal::SealCommand),
    /// Check the store's integrity: every row opens, every key version unwraps, aliases point at
    /// live keys, the audit trail verifies. Exits 1 if anything is wrong.
    #[command(after_help = "Examples:\n  custody check\n  custody check --json")]
    Check,
    /// Who can do what: `who-can` and `explain` (auditor or key admin).
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// The internal CA's certificates: issue, list, revoke, renew, status.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// The root key: its generation, and rotation to a new one (security officer).
    #[command(subcommand)]
    Root(root::RootCommand),
    /// Keep a workload's client certificate fresh: renews it at two thirds of its life and
    /// replaces the profile's files atomically (the Rust client picks the new one up by itself).
    Agent(pki::AgentArgs),
}
