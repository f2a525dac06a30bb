//! Backups: one file with every row custody needs to come back (keys with their wrapped
//! versions and canaries, metadata, aliases, policies, grants, principals and credentials, the CA,
//! the audit signing key), sealed under a key derived from the root key.
//!
//! File: `custody-backup v1\n`, a readable header (JSON, one line: store, time, row counts, the
//! newest audit checkpoint — nothing secret), `\n`, then the payload sealed with the header as
//! AAD. The rows inside keep their own sealing, so a restored store opens with the same root key
//! (the same Shamir shares or key file). Audit records are not in a backup: the trail stays in the
//! store, its exports and the audit file; the header records the checkpoint it had reached.
//!
//! Restoring into a new store copies the rows as they are, then turns every key that the live
//! store has destroyed since (its tombstones: the destruction ledger) back into a tombstone,
//! unless asked to resurrect them.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custody_crypto::RootKey;
use custody_store::{Backend, Expect, Table, Write};
use serde::{Deserialize, Serialize};

use crate::audit::AuditCheckpoint;
use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::model::{now_ms, KeyRecord, KeyState, Millis};
use crate::Kms;

const MAGIC: &[u8] = b"custody-backup v1\n";

/// The readable part of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct BackupHeader {
    /// The store it was taken from.
    pub store_id: String,
    /// When.
    pub created_at: Millis,
    /// Rows per table.
    pub tables: BTreeMap<String, u64>,
    /// The newest signed audit checkpoint at the time.
    pub audit_checkpoint: Option<AuditCheckpoint>,
    /// The generation of the root key that seals the backup: the shares (or token) that unsealed
    /// the store at that generation open it, even after later root rotations.
    #[serde(default = "crate::root::first_generation")]
    pub root_generation: u32,
}

#[derive(Serialize, Deserialize)]
struct RawRow {
    t: String,
    k: String,
    r: u64,
    /// Base64 of the stored (sealed) value.
    v: String,
}

/// A key the live store has destroyed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Destroyed {
    /// Key id.
    pub key_id: String,
    /// When its material was destroyed.
    pub destroyed_at: Millis,
}

/// An opened backup.
pub struct Backup {
    /// Its header.
    pub header: BackupHeader,
    rows: Vec<RawRow>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup").field("header", &self.header).finish_non_exhaustive()
    }
}

fn table_named(name: &str) -> Option<Table> {
    Table::ALL.into_iter().find(|t| t.name() == name)
}

impl Backup {
    /// Opens a backup file with the root key. A wrong root key, a changed header or a damaged
    /// file all fail here.
    pub fn open(bytes: &[u8], root: &RootKey) -> Result<Self, KmsError> {
        let bad = |why: &str| KmsError::validation("backup", format!("this is not a custody backup: {why}"));
        let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("it does not start with custody-backup v1"))?;
        let end = rest.iter().position(|b| *b == b'\n').ok_or_else(|| bad("no header"))?;
        let (header_bytes, sealed) = (&rest[..end], &rest[end + 1..]);
        let header: BackupHeader = serde_json::from_slice(header_bytes).map_err(|_| bad("the header is not valid"))?;
        let payload = root.open_backup(header_bytes, sealed).map_err(|_| {
            KmsError::InvalidShare(format!(
                "the backup does not open with this root key (it was sealed under root key generation {}: use the \
                 shares, token or key file of that generation; or the file was changed)",
                header.root_generation
            ))
        })?;
        let rows: Vec<RawRow> = serde_json::from_slice(payload.expose_secret()).map_err(|_| bad("damaged payload"))?;
        Ok(Self { header, rows })
    }

    /// Tenant ids in the backup.
    pub fn tenant_ids(&self) -> Vec<String> {
        self.rows.iter().filter(|r| r.t == Table::Tenants.name()).map(|r| r.k.clone()).collect()
    }

    /// Key ids in the backup.
    pub fn key_ids(&self) -> Vec<String> {
        self.rows.iter().filter(|r| r.t == Table::Keys.name()).map(|r| r.k.clone()).collect()
    }

    /// Writes every row into `backend`, which must hold no store yet; versions, aliases and
    /// grants of the keys in `destroyed` are left out (their key rows become tombstones in
    /// [`Kms::finish_restore`]).
    pub fn restore_into(&self, backend: &dyn Backend, destroyed: &BTreeSet<String>) -> Result<(), KmsError> {
        if !backend.scan(Table::Meta, "", None, 1)?.is_empty() {
            return Err(KmsError::AlreadyExists(
                "the target already holds a custody store; restore into a new one".into(),
            ));
        }
        let mut writes = Vec::new();
        for row in &self.rows {
            let table = table_named(&row.t).ok_or_else(|| KmsError::Integrity(format!("backup table {}", row.t)))?;
            let owner = match table {
                Table::Versions | Table::Grants => row.k.split('/').next(),
                _ => None,
            };
            if owner.is_some_and(|k| destroyed.contains(k)) {
                continue;
            }
            let value =
                STANDARD.decode(&row.v).map_err(|_| KmsError::Integrity(format!("backup row {}/{}", row.t, row.k)))?;
            writes.push(Write::Put { table, key: row.k.clone(), value, expect: Expect::Absent });
        }
        // Aliases point at keys inside their sealed value; they are removed after unsealing.
        for chunk in writes.chunks(500) {
            backend.apply(chunk)?;
        }
        Ok(())
    }
}

impl Kms {
    /// CreateBackup (security officer): the backup file's bytes.
    pub fn create_backup(&self, caller: &Caller) -> Result<(BackupHeader, Vec<u8>), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::CreateBackup>(caller)?;
        let mut rows = Vec::new();
        let mut tables = BTreeMap::new();
        for table in Table::ALL.into_iter().filter(|t| !matches!(t, Table::Audit | Table::AuditCheckpoints)) {
            let all = u.barrier.backend().scan(table, "", None, usize::MAX)?;
            tables.insert(table.name().to_string(), all.len() as u64);
            rows.extend(all.into_iter().map(|r| RawRow {
                t: table.name().into(),
                k: r.key,
                r: r.rev,
                v: STANDARD.encode(&r.value),
            }));
        }
        let audit_checkpoint = match u.barrier.backend().last(Table::AuditCheckpoints)? {
            Some(row) => Some(u.barrier.open_row::<AuditCheckpoint>(Table::AuditCheckpoints, row)?.value),
            None => None,
        };
        let header = BackupHeader {
            store_id: self.store_id()?,
            created_at: now_ms(),
            tables,
            audit_checkpoint,
            root_generation: u.roots.current_generation(),
        };
        let header_bytes = serde_json::to_vec(&header).expect("headers serialize");
        let payload = zeroize::Zeroizing::new(serde_json::to_vec(&rows).expect("rows serialize"));
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&header_bytes);
        out.push(b'\n');
        out.extend(u.roots.current().seal_backup(&header_bytes, &payload));
        tracing::info!(rows = rows.len(), "backup created");
        Ok((header, out))
    }

    /// The destruction ledger (security officer): every key whose material this store destroyed.
    pub fn destruction_ledger(&self, caller: &Caller) -> Result<Vec<Destroyed>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::CreateBackup>(caller)?;
        let keys = u.barrier.scan::<KeyRecord>(Table::Keys, "", None, usize::MAX)?;
        Ok(keys
            .into_iter()
            .filter(|k| k.value.state == KeyState::Destroyed)
            .map(|k| Destroyed { key_id: k.value.id.to_string(), destroyed_at: k.value.destroyed_at.unwrap_or(0) })
            .collect())
    }

    /// After [`Backup::restore_into`] and unsealing: turns the keys in `destroyed` into
    /// tombstones and removes aliases that point at them. For the restore tool, which holds the
    /// root key.
    pub fn finish_restore(&self, destroyed: &[Destroyed]) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let ids: BTreeSet<&str> = destroyed.iter().map(|d| d.key_id.as_str()).collect();
        let mut writes = Vec::new();
        for d in destroyed {
            if let Some(mut k) = u.barrier.get::<KeyRecord>(Table::Keys, &d.key_id)? {
                k.value.state = KeyState::Destroyed;
                k.value.destroyed_at = Some(d.destroyed_at);
                k.value.rotation.enabled = false;
                k.value.rotation.next_rotation = None;
                writes.push(u.barrier.put(Table::Keys, &k.key, &k.value, Expect::Rev(k.rev)));
            }
        }
        u.barrier.for_each::<crate::model::AliasRecord, KmsError>(Table::Aliases, "", None, |a| {
            if ids.contains(a.value.key_id.to_string().as_str()) {
                writes.push(u.barrier.delete(Table::Aliases, &a.key, Expect::Rev(a.rev)));
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(u.barrier.apply(&writes)?)
    }
}
