//! `custody backup create|verify|restore` (docs/OPERATIONS.md).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use clap::{Args, Subcommand};
use custody_crypto::RootKey;
use custody_kms::{Backup, Destroyed, Kms, KmsConfig};
use custody_store::Backend;
use serde_json::json;

use crate::bootstrap;
use crate::commands::{connect, output, CliResult};
use crate::exit::{self, CliError};
use crate::ConnArgs;

/// `custody backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write a backup of the store (security officer): one file, sealed under the root key.
    #[command(after_help = "Example:\n  custody backup create --out custody-$(date +%F).backup")]
    Create {
        /// File to write (mode 0600).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Prove a backup restores: opens it with the root key, restores it into a scratch store and
    /// decrypts every key version's canary. Exits 1 if anything is wrong.
    #[command(
        after_help = "Examples:\n  custody backup verify kms.backup --share-file s1 --share-file s2 --share-file s3\n  custody backup verify kms.backup --root-key-file ./d/root.key --json"
    )]
    Verify {
        /// Backup file.
        file: PathBuf,
        #[command(flatten)]
        root: RootArgs,
    },
    /// Restore a backup into a new data directory (or PostgreSQL schema). Keys the live store
    /// destroyed after the backup was taken stay destroyed unless --resurrect-destroyed.
    #[command(
        after_help = "Examples:\n  custody backup restore kms.backup --data /var/lib/custody-new --share-file s1 --share-file s2 --share-file s3\n  custody backup restore kms.backup --data ./d2 --root-key-file ./d/root.key --no-ledger   (the live store is gone)"
    )]
    Restore(RestoreArgs),
}

/// How to get the root key: shares or the key file.
#[derive(Debug, Args)]
pub struct RootArgs {
    /// A file holding one unseal share (repeatable; as many as the threshold).
    #[arg(long = "share-file", value_name = "FILE")]
    pub share_files: Vec<PathBuf>,
    /// The root key file (development stores sealed with a key file). Not `--key-file`, which
    /// is the client's TLS key.
    #[arg(long = "root-key-file", value_name = "FILE", conflicts_with = "share_files")]
    pub root_key_file: Option<PathBuf>,
}

/// `custody backup restore`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Backup file.
    pub file: PathBuf,
    /// New data directory (TLS files and the administrator's profile go here).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub root: RootArgs,
    /// Restore into PostgreSQL instead of DIR/custody.db.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema.
    #[arg(long, default_value = "custody")]
    pub database_schema: String,
    /// Bring back keys the live store destroyed after the backup was taken.
    #[arg(long)]
    pub resurrect_destroyed: bool,
    /// Do not ask the live store which keys it destroyed (it is gone): every key in the backup
    /// comes back.
    #[arg(long, conflicts_with = "resurrect_destroyed")]
    pub no_ledger: bool,
    /// Names for the new server certificate.
    #[arg(long = "server-name", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub server_names: Vec<String>,
    /// The administrator to issue a certificate and profile for.
    #[arg(long, default_value = "admin")]
    pub admin: String,
    /// Tenant of that administrator (default: the only tenant, if there is one).
    #[arg(long)]
    pub tenant: Option<String>,
}

fn fail(m: impl Into<String>) -> CliError {
    CliError::new(exit::FAILURE, m.into())
}

fn root_key(a: &RootArgs) -> CliResult<RootKey> {
    if let Some(k) = &a.root_key_file {
        return custody_server::keyfile::read(k).map_err(fail);
    }
    if a.share_files.is_empty() {
        return Err(CliError::new(
            exit::USAGE,
            "give the root key: --share-file (as many as the threshold) or --root-key-file",
        ));
    }
    let mut shares = Vec::new();
    for f in &a.share_files {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(f).map_err(|e| fail(format!("cannot read {}: {e}", f.display())))?,
        );
        shares.push(
            custody_crypto::shamir::UnsealShare::parse(text.trim())
                .map_err(|e| fail(format!("{}: {e}", f.display())))?,
        );
    }
    custody_crypto::shamir::combine(&shares).map_err(|e| fail(format!("the shares do not combine: {e}")))
}

fn read_backup(file: &Path, root: &RootKey) -> CliResult<Backup> {
    let bytes = std::fs::read(file).map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
    Backup::open(&bytes, root).map_err(|e| fail(e.to_string()))
}

/// Opens a restored store and unseals it with `root`.
fn unsealed(backend: Arc<dyn Backend>, root: RootKey) -> CliResult<Kms> {
    let kms = Kms::open(backend, KmsConfig::default()).map_err(|e| fail(e.to_string()))?;
    kms.unseal_with_root(root).map_err(|e| fail(e.to_string()))?;
    Ok(kms)
}

pub(crate) async fn backup(conn: &ConnArgs, cmd: BackupCommand, json: bool) -> CliResult<()> {
    match cmd {
        BackupCommand::Create { out } => {
            let mut c = connect(conn).await?;
            let r = c.call("Custody.CreateBackup", json!({})).await?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(r["Backup"].as_str().unwrap_or(""))
                .map_err(|_| fail("the server sent a backup that is not base64"))?;
            bootstrap::write_file(&out, &bytes, 0o600).map_err(fail)?;
            let shown = json!({ "File": out, "Bytes": bytes.len(), "Header": r["Header"] });
            output(json, &shown, || {
                println!(
                    "Backup of store {} written to {} ({} bytes).",
                    r["Header"]["StoreId"].as_str().unwrap_or(""),
                    out.display(),
                    bytes.len()
                );
                println!("It opens only with this store's root key (its unseal shares or key file). Prove it: custody backup verify {}", out.display());
            });
            Ok(())
        }
        BackupCommand::Verify { file, root } => {
            let root = root_key(&root)?;
            let backup = read_backup(&file, &root)?;
            let scratch = tempfile::tempdir().map_err(|e| fail(e.to_string()))?;
            let backend: Arc<dyn Backend> = Arc::new(
                custody_store::SqliteBackend::open(&scratch.path().join("verify.db"))
                    .map_err(|e| fail(e.to_string()))?,
            );
            backup.restore_into(backend.as_ref(), &BTreeSet::new()).map_err(|e| fail(e.to_string()))?;
            let report = unsealed(backend, root)?.check_as_root_holder().map_err(|e| fail(e.to_string()))?;
            let value = json!({ "Header": backup.header, "Check": report });
            output(json, &value, || {
                println!(
                    "Backup of store {} taken at {} ms, sealed under root key generation {}.",
                    backup.header.store_id, backup.header.created_at, backup.header.root_generation
                );
                for k in &report.key_details {
                    println!(
                        "{:<36}  {:<15} {} versions, {} canaries decrypted",
                        k.key_id, k.state, k.versions, k.canaries
                    );
                }
                if report.problems.is_empty() {
                    println!("It restores: {} keys, {} versions, every canary decrypts.", report.keys, report.versions);
                }
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
            });
            if report.problems.is_empty() {
                Ok(())
            } else {
                Err(fail(format!("{} problem(s) in the backup", report.problems.len())))
            }
        }
        BackupCommand::Restore(a) => restore(conn, a, json).await,
    }
}

async fn restore(conn: &ConnArgs, a: RestoreArgs, json: bool) -> CliResult<()> {
    let root = root_key(&a.root)?;
    let backup = read_backup(&a.file, &root)?;
    // The destruction ledger of the live store.
    let ledger: Vec<Destroyed> = if a.no_ledger {
        Vec::new()
    } else {
        let mut c = connect(conn).await.map_err(|e| {
            fail(format!(
                "{}\nThe restore asks the live store which keys it destroyed after the backup was taken, so they are not \
                 brought back. If the live store is gone, pass --no-ledger.",
                e.message
            ))
        })?;
        let r = c.call("Custody.GetDestructionLedger", json!({})).await?;
        serde_json::from_value(r["Destroyed"].clone()).map_err(|e| fail(e.to_string()))?
    };
    let in_backup: BTreeSet<String> = backup.key_ids().into_iter().collect();
    let destroyed: Vec<Destroyed> = ledger.into_iter().filter(|d| in_backup.contains(&d.key_id)).collect();
    let kept_destroyed: Vec<Destroyed> = if a.resurrect_destroyed { Vec::new() } else { destroyed.clone() };

    let layout = bootstrap::Layout { data_dir: a.data.clone() };
    if layout.is_initialized() {
        return Err(fail(format!("{} already holds a store; restore into a new directory", a.data.display())));
    }
    for d in [a.data.clone(), a.data.join("tls"), a.data.join("admin")] {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&d)
            .map_err(|e| fail(format!("cannot create {}: {e}", d.display())))?;
    }
    let database = bootstrap::database_options(a.database_url.clone(), &a.database_schema, None).map_err(fail)?;
    let backend = bootstrap::open_new_store(&layout, database.as_ref()).map_err(fail)?;
    let skip: BTreeSet<String> = kept_destroyed.iter().map(|d| d.key_id.clone()).collect();
    backup.restore_into(backend.as_ref(), &skip).map_err(|e| fail(e.to_string()))?;
    let kms = unsealed(backend, root)?;
    kms.finish_restore(&kept_destroyed).map_err(|e| fail(e.to_string()))?;

    // New TLS files and an administrator profile from the restored CA.
    let admin =
        custody_kms::PrincipalName::parse(&a.admin).ok_or_else(|| CliError::new(exit::USAGE, "invalid --admin"))?;
    let tenant = match &a.tenant {
        Some(t) => {
            custody_kms::TenantId::parse(t).ok_or_else(|| CliError::new(exit::USAGE, "a tenant is 12 digits"))?
        }
        None => only_tenant(&backup)?,
    };
    let (ca, server, client) =
        kms.bootstrap_certificates(&a.server_names, &tenant, &admin).map_err(|e| fail(e.to_string()))?;
    let w = |p: PathBuf, b: &[u8], mode| bootstrap::write_file(&p, b, mode).map_err(fail);
    w(layout.ca_cert(), ca.as_bytes(), 0o644)?;
    w(a.data.join("tls/server.crt"), server.cert_pem.as_bytes(), 0o644)?;
    w(a.data.join("tls/server.key"), server.key_pem.expose_secret(), 0o600)?;
    w(a.data.join(format!("admin/{admin}.crt")), client.cert_pem.as_bytes(), 0o644)?;
    w(a.data.join(format!("admin/{admin}.key")), client.key_pem.expose_secret(), 0o600)?;
    let profile = bootstrap::write_profile(&layout, admin.as_str(), "https://localhost:8443").map_err(fail)?;
    let report = kms.check_as_root_holder().map_err(|e| fail(e.to_string()))?;

    let value = json!({
        "Data": a.data, "Profile": profile, "Keys": report.keys, "Versions": report.versions,
        "KeptDestroyed": kept_destroyed, "Resurrected": if a.resurrect_destroyed { json!(destroyed) } else { json!([]) },
        "Problems": report.problems,
    });
    output(json, &value, || {
        println!("Restored {} keys ({} versions) into {}.", report.keys, report.versions, a.data.display());
        for d in &kept_destroyed {
            println!(
                "NOT brought back: key {} was destroyed after this backup (pass --resurrect-destroyed to restore it).",
                d.key_id
            );
        }
        if a.resurrect_destroyed {
            for d in &destroyed {
                println!("RESURRECTED: key {} (destroyed by the live store after this backup).", d.key_id);
            }
        }
        println!("Start it: custody server --data {}   (same unseal shares or key file as before)", a.data.display());
    });
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(fail(format!(
            "restored, but check found {} problem(s): {}",
            report.problems.len(),
            report.problems.join("; ")
        )))
    }
}

fn only_tenant(backup: &Backup) -> CliResult<custody_kms::TenantId> {
    let tenants = backup.tenant_ids();
    match tenants.as_slice() {
        [one] => custody_kms::TenantId::parse(one).ok_or_else(|| fail("bad tenant id in the backup")),
        _ => Err(CliError::new(
            exit::USAGE,
            format!("the backup has {} tenants: name the administrator's with --tenant", tenants.len()),
        )),
    }
}
