//! `custody check`: the store's integrity, end to end. Every sealed row opens, every key
//! version that should exist unwraps under the root key, every alias points at a live key of its
//! tenant, every grant at an existing key, and the audit trail verifies.

use serde::Serialize;

use custody_store::Table;

use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::model::{version_row, AliasRecord, KeyRecord, KeyState, VersionRecord};
use crate::Kms;

/// What `check` found.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct CheckReport {
    // (Fields in the order `custody check` prints them.)
    /// Sealed rows opened, all tables.
    pub rows: u64,
    /// Keys checked.
    pub keys: u64,
    /// Key versions unwrapped.
    pub versions: u64,
    /// Of those, versions whose canary decrypted (versions made before canaries have none).
    pub canaries: u64,
    /// Audit records verified.
    pub audit_records: u64,
    /// Every problem, one sentence each (empty: the store is sound).
    pub problems: Vec<String>,
    /// Per key: state, versions unwrapped, canaries decrypted.
    pub key_details: Vec<KeyCheck>,
}

/// One key's part of a [`CheckReport`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyCheck {
    /// Key id.
    pub key_id: String,
    /// State name.
    pub state: &'static str,
    /// Versions unwrapped.
    pub versions: u32,
    /// Canaries decrypted.
    pub canaries: u32,
}

impl Kms {
    /// Checks the whole store (security officer or auditor). Reads only.
    pub fn check_store(&self, caller: &Caller) -> Result<CheckReport, KmsError> {
        let _proof = authorize::<act::CheckStore>(caller)?;
        self.check_as_root_holder()
    }

    /// [`Kms::check_store`] for a tool that holds the root key itself (`custody backup verify`
    /// on a scratch store): no caller, since the root key reads everything anyway.
    pub fn check_as_root_holder(&self) -> Result<CheckReport, KmsError> {
        let u = self.unsealed()?;
        let mut r = CheckReport::default();
        // Every sealed row opens, keys and aliases as what they are (kept for the checks below);
        // a row that does not is a problem, never a reason to skip the rest.
        let mut keys = Vec::new();
        let mut aliases = Vec::new();
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Meta) {
            let mut after: Option<String> = None;
            loop {
                let rows = u.barrier.backend().scan(table, "", after.as_deref(), 512)?;
                let Some(last) = rows.last().map(|row| row.key.clone()) else { break };
                for row in rows {
                    let key = row.key.clone();
                    let opened = match table {
                        Table::Keys => u.barrier.open_row::<KeyRecord>(table, row).map(|k| keys.push(k)),
                        Table::Aliases => u.barrier.open_row::<AliasRecord>(table, row).map(|a| aliases.push(a)),
                        _ => u.barrier.open_row::<serde_json::Value>(table, row).map(drop),
                    };
                    match opened {
                        Ok(()) => r.rows += 1,
                        Err(e) => r.problems.push(format!("{}/{key}: {e}", table.name())),
                    }
                }
                after = Some(last);
            }
        }
        // Every key's versions unwrap; destroyed keys have none left.
        for k in &keys {
            let key = &k.value;
            r.keys += 1;
            let (versions_before, canaries_before) = (r.versions, r.canaries);
            let versions = u.barrier.backend().scan(Table::Versions, &format!("{}/", key.id), None, usize::MAX)?;
            if key.state == KeyState::Destroyed {
                r.key_details.push(KeyCheck {
                    key_id: key.id.to_string(),
                    state: key.state.as_str(),
                    versions: 0,
                    canaries: 0,
                });
                if !versions.is_empty() {
                    r.problems.push(format!("key {} is destroyed but {} version rows remain", key.id, versions.len()));
                }
                continue;
            }
            for v in 1..=key.primary_version {
                let row = u.barrier.get::<VersionRecord>(Table::Versions, &version_row(key.id, v));
                let aad = custody_crypto::keys::WrapAad {
                    tenant: key.tenant.as_str(),
                    key_id: &key.id.to_string(),
                    version: v,
                };
                match row {
                    Ok(Some(row)) => match u.roots.unwrap_version(&row.value, &aad) {
                        Ok(material) => {
                            r.versions += 1;
                            match canary_problem(&material, key, v, row.value.canary.as_deref()) {
                                Some(problem) => r.problems.push(problem),
                                None if row.value.canary.is_some() => r.canaries += 1,
                                None => {}
                            }
                        }
                        Err(_) => {
                            r.problems.push(format!("key {} version {v} does not unwrap under the root key", key.id))
                        }
                    },
                    Ok(None) => r.problems.push(format!("key {} version {v} is missing", key.id)),
                    Err(e) => r.problems.push(format!("key {} version {v}: {e}", key.id)),
                }
            }
            r.key_details.push(KeyCheck {
                key_id: key.id.to_string(),
                state: key.state.as_str(),
                versions: (r.versions - versions_before) as u32,
                canaries: (r.canaries - canaries_before) as u32,
            });
            if versions.len() as u32 > key.primary_version {
                r.problems.push(format!(
                    "key {} has {} version rows but its primary version is {}",
                    key.id,
                    versions.len(),
                    key.primary_version
                ));
            }
        }
        // Aliases point at live keys of their own tenant.
        let live = |id: crate::KeyId| keys.iter().find(|k| k.value.id == id).map(|k| &k.value);
        for a in aliases {
            let tenant = a.key.split('/').next().unwrap_or("");
            match live(a.value.key_id) {
                Some(k) if k.tenant.as_str() == tenant && k.state != KeyState::Destroyed => {}
                Some(k) if k.state == KeyState::Destroyed => {
                    r.problems.push(format!("alias {} points at destroyed key {}", a.key, k.id))
                }
                Some(k) => r.problems.push(format!("alias {} points at key {} of another tenant", a.key, k.id)),
                None => r.problems.push(format!("alias {} points at missing key {}", a.key, a.value.key_id)),
            }
        }
        // Grants belong to existing keys.
        for g in u.barrier.backend().scan(Table::Grants, "", None, usize::MAX)? {
            let key_id = g.key.split('/').next().and_then(crate::KeyId::parse);
            if key_id.and_then(live).is_none() {
                r.problems.push(format!("grant {} belongs to no key", g.key));
            }
        }
        // The audit trail.
        let v = self.verify_trail_unchecked(&u)?;
        r.audit_records = v.records;
        if let Some(p) = v.problem {
            r.problems.push(format!("audit trail: record {}: {}", p.seq, p.what));
        }
        Ok(r)
    }
}

/// Whether a version's canary (if it has one: versions created before canaries do not) decrypts
/// to what it should under the version's material.
fn canary_problem(
    material: &custody_crypto::KeyMaterial,
    key: &KeyRecord,
    version: u32,
    canary: Option<&str>,
) -> Option<String> {
    use base64::Engine;
    let canary = canary?;
    let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(canary) else {
        return Some(format!("key {} version {version}: its canary is not base64", key.id));
    };
    match custody_crypto::blob::decrypt(material, &blob, &crate::model::canary_context()) {
        Ok(pt) if pt.expose_secret() == crate::model::canary_plaintext(key.id, version).as_slice() => None,
        _ => Some(format!("key {} version {version}: its canary does not decrypt", key.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KeySpec, RotationSettings};

    #[test]
    fn a_canary_decrypts_only_under_its_own_material() {
        let key = KeyRecord {
            id: crate::KeyId::random(),
            tenant: crate::TenantId::random(),
            description: String::new(),
            tags: Default::default(),
            created_at: 0,
            state: KeyState::Enabled,
            spec: KeySpec::SymmetricDefault,
            primary_version: 1,
            rotation: RotationSettings { enabled: false, period_days: 365, next_rotation: None },
            rotations: vec![],
            deletion_date: None,
            pending_window_days: None,
            destroyed_at: None,
            policy: None,
        };
        let (right, wrong) = (custody_crypto::KeyMaterial::generate(32), custody_crypto::KeyMaterial::generate(32));
        let blob = custody_crypto::blob::encrypt(
            &right,
            custody_crypto::blob::BlobHeader { key_id: key.id.to_bytes(), version: 1 },
            &crate::model::canary_context(),
            &crate::model::canary_plaintext(key.id, 1),
        );
        use base64::Engine;
        let canary = base64::engine::general_purpose::STANDARD.encode(&blob);
        assert_eq!(canary_problem(&right, &key, 1, Some(&canary)), None);
        assert!(canary_problem(&wrong, &key, 1, Some(&canary)).unwrap().contains("does not decrypt"));
        // Another version's canary under the right material: its plaintext names version 1.
        assert!(canary_problem(&right, &key, 2, Some(&canary)).is_some());
        assert!(canary_problem(&right, &key, 1, Some("%%")).unwrap().contains("base64"));
        assert_eq!(canary_problem(&right, &key, 1, None), None, "versions from before canaries have none");
    }
}
