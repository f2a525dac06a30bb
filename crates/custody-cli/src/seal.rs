//! `custody seal migrate`: move a store between Shamir shares and a PKCS#11 token. The root key
//! stays the same, so no key version, sealed row or ciphertext changes; only how the root key is
//! kept does.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use custody_kms::{Kms, SealTarget};
use serde_json::json;
use zeroize::Zeroizing;

use crate::bootstrap::{self, Layout, Pkcs11Args};
use crate::commands::{output, CliResult};
use crate::exit::{self, CliError};

/// `custody seal ...`
#[derive(Debug, Subcommand)]
pub enum SealCommand {
    /// Reseal a store with a PKCS#11 token (its Shamir shares become the recovery shares), or
    /// with Shamir shares again (the recovery shares become the unseal shares). Offline: stop
    /// the server first.
    #[command(after_help = "\
Examples:
  custody seal migrate --data /var/lib/custody --to pkcs11 --token-label custody --pin-file /etc/custody/pin \\
      --share-file s1.txt --share-file s2.txt --share-file s3.txt
  custody seal migrate --data /var/lib/custody --to shamir --pin-file /etc/custody/pin
  custody seal migrate --data /var/lib/custody --to shamir --share-file s1.txt ...   # the token is lost")]
    Migrate(MigrateArgs),
}

/// `custody seal migrate`
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Data directory of the store.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The new seal.
    #[arg(long, value_parser = ["pkcs11", "shamir"])]
    pub to: String,
    /// Shares of the store (as many as its threshold), when the root key comes from shares.
    #[arg(long = "share-file", value_name = "FILE")]
    pub share_files: Vec<PathBuf>,
    /// The token (for --to pkcs11; for --to shamir without shares, the store's own token).
    #[command(flatten)]
    pub pkcs11: Pkcs11Args,
    /// PostgreSQL store (as for `custody init`).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema.
    #[arg(long, default_value = "custody")]
    pub database_schema: String,
}

pub(crate) fn seal(cmd: SealCommand, json: bool) -> CliResult<()> {
    let SealCommand::Migrate(a) = cmd;
    let fail = |m: String| CliError::new(exit::FAILURE, m);
    let layout = Layout { data_dir: a.data.clone() };
    let database = bootstrap::database_options(a.database_url.clone(), &a.database_schema, None)
        .map_err(|m| CliError::new(exit::USAGE, m))?;
    if database.is_none() && !layout.database().exists() {
        return Err(CliError::new(exit::USAGE, format!("no store in {}", a.data.display())));
    }
    let backend = bootstrap::open_new_store(&layout, database.as_ref()).map_err(fail)?;
    let current = Kms::open(backend.clone(), custody_kms::KmsConfig::development())
        .and_then(|k| k.pkcs11_seal())
        .map_err(|e| fail(e.to_string()))?;
    let root = if !a.share_files.is_empty() {
        // Zeroized when dropped, whatever happens.
        let mut texts = Zeroizing::new(Vec::new());
        for f in &a.share_files {
            let t = Zeroizing::new(
                std::fs::read_to_string(f).map_err(|e| fail(format!("cannot read {}: {e}", f.display())))?,
            );
            texts.push(t.trim().to_string());
        }
        Kms::root_from_shares(&backend, &texts).map_err(|e| fail(e.to_string()))?
    } else if let Some(seal) = &current {
        // The store's own token: labels as recorded, module unless given.
        let hsm =
            Pkcs11Args { token_label: seal.token_label.clone(), key_label: seal.key_label.clone(), ..a.pkcs11.clone() };
        let root = hsm.open(false).map_err(fail)?.unwrap(&seal.wrapped_root, custody_kms::PKCS11_WRAP_AAD);
        let root = root.map_err(|e| fail(e.to_string()))?;
        custody_crypto::RootKey::from_bytes(root.expose_secret())
            .ok_or_else(|| fail("the unwrapped root key is not 32 bytes".into()))?
    } else {
        return Err(CliError::new(exit::USAGE, "give the store's shares with --share-file (as many as its threshold)"));
    };
    let target = match a.to.as_str() {
        "pkcs11" => SealTarget::Pkcs11(a.pkcs11.seal(&root, true).map_err(fail)?),
        _ => SealTarget::Shamir,
    };
    Kms::migrate_seal(&backend, &root, target).map_err(|e| fail(e.to_string()))?;
    let report = json!({ "Seal": a.to, "Data": a.data });
    output(json, &report, || match a.to.as_str() {
        "pkcs11" => println!(
            "Sealed with the PKCS#11 token {:?}: the server unseals itself at start (set pkcs11.pin_file). \
             The Shamir shares are now the recovery shares: keep them.",
            a.pkcs11.token_label
        ),
        _ => println!(
            "Sealed with Shamir shares (the former recovery shares): the server starts sealed; custody unseal."
        ),
    });
    Ok(())
}
