//! The operations, one method each, AWS semantics.

use std::collections::BTreeMap;
use std::ops::ControlFlow::{Break, Continue};

use custody_crypto::blob::{self, BlobHeader};
use custody_crypto::{random, EncryptionContext, SecretBytes};
use custody_store::{Expect, Table, Versioned};
use serde::Serialize;

use crate::authz::{self, act, authorize, ActionKind, Authorized, Caller};
use crate::error::KmsError;
use crate::ids::{self, AliasName, KeyId, KeyRef};
use crate::model::*;
use crate::{Kms, Unsealed};

/// Most bytes Encrypt accepts (AWS: 4096).
pub const MAX_ENCRYPT_PLAINTEXT: usize = 4096;
/// Most bytes GenerateDataKey / GenerateRandom return (AWS: 1024).
pub const MAX_GENERATED_BYTES: usize = 1024;
/// Deletion waiting period bounds and default, in days (AWS).
pub const DELETION_WINDOW_DAYS: (u32, u32, u32) = (7, 30, 30);
/// Rotation period bounds and default, in days (AWS).
pub const ROTATION_PERIOD_DAYS: (u32, u32, u32) = (90, 2560, 365);
/// Tags per key (AWS: 50).
pub const MAX_TAGS: usize = 50;
/// Default and maximum page size of list operations.
pub const PAGE_LIMIT: (usize, usize) = (100, 1000);

/// What CreateKey takes.
#[derive(Debug, Clone, Default)]
pub struct CreateKeyRequest {
    /// Description (0–8192 characters).
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Key spec (default SYMMETRIC_DEFAULT).
    pub spec: Option<KeySpec>,
    /// Key policy document (default: the default policy).
    pub policy: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// Items.
    pub items: Vec<T>,
    /// Marker for the next page, if there is one.
    pub next_marker: Option<String>,
}

/// ListKeys entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyListEntry {
    /// Key id.
    pub key_id: String,
    /// Key ARN.
    pub key_arn: String,
}

/// ListAliases entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AliasListEntry {
    /// `alias/...`
    pub alias_name: String,
    /// Alias ARN.
    pub alias_arn: String,
    /// Target key id.
    pub target_key_id: String,
    /// Seconds since epoch.
    pub creation_date: f64,
    /// Seconds since epoch.
    pub last_updated_date: f64,
}

/// ListKeyRotations entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RotationListEntry {
    /// Key ARN... AWS returns the key id here.
    pub key_id: String,
    /// Seconds since epoch.
    pub rotation_date: f64,
    /// AUTOMATIC or ON_DEMAND.
    pub rotation_type: &'static str,
}

/// GetKeyRotationStatus's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RotationStatus {
    /// Key ARN.
    pub key_id: String,
    /// Automatic rotation on?
    pub key_rotation_enabled: bool,
    /// Period, if enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_in_days: Option<u32>,
    /// Next automatic rotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation_date: Option<f64>,
}

/// ScheduleKeyDeletion's answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduledDeletion {
    /// Key ARN.
    pub key_id: String,
    /// When.
    pub deletion_date: f64,
    /// `PendingDeletion`.
    pub key_state: &'static str,
    /// Window chosen.
    pub pending_window_in_days: u32,
}

/// Result of an encryption (Encrypt, ReEncrypt, GenerateDataKey*).
#[derive(Debug)]
pub struct Encrypted {
    /// The ciphertext blob.
    pub ciphertext_blob: Vec<u8>,
    /// ARN of the key that encrypted.
    pub key_arn: String,
    /// The data key, for GenerateDataKey.
    pub plaintext: Option<SecretBytes>,
    /// ARN of the source key, for ReEncrypt.
    pub source_key_arn: Option<String>,
}

/// Result of Decrypt.
#[derive(Debug)]
pub struct Decrypted {
    /// Recovered plaintext.
    pub plaintext: SecretBytes,
    /// ARN of the key that decrypted.
    pub key_arn: String,
}

/// What one scheduler pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkReport {
    /// Keys rotated.
    pub rotated: usize,
    /// Keys destroyed.
    pub destroyed: usize,
    /// Keys in each state after the pass (index: [`KeyState::ALL`]'s order), every tenant.
    pub keys_by_state: [u64; 4],
}

impl Kms {
    // ----- keys -----

    /// CreateKey: a new SYMMETRIC_DEFAULT key with its first version.
    pub fn create_key(&self, caller: &Caller, req: CreateKeyRequest) -> Result<KeyMetadata, KmsError> {
        let u = self.unsealed()?;
        let proof = authorize::<act::CreateKey>(caller)?;
        validate_description(&req.description)?;
        validate_tags(&req.tags)?;
        if let Some(p) = &req.policy {
            crate::grants::validate_policy(p)?;
        }
        let now = now_ms();
        let key = KeyRecord {
            id: KeyId::random(),
            tenant: caller.tenant.clone(),
            description: req.description,
            tags: req.tags,
            created_at: now,
            state: KeyState::Enabled,
            spec: req.spec.unwrap_or(KeySpec::SymmetricDefault),
            primary_version: 1,
            rotation: RotationSettings { enabled: false, period_days: ROTATION_PERIOD_DAYS.2, next_rotation: None },
            rotations: Vec::new(),
            deletion_date: None,
            pending_window_days: None,
            destroyed_at: None,
            policy: req.policy,
        };
        let policy = self.key_policy(&key)?;
        let conflicts = self.duty_conflicts(&u, &key, &policy, &[])?;
        self.enforce_duties(caller, "this key's policy", conflicts)?;
        let writes = vec![
            u.barrier.put(Table::Keys, &key.id.to_string(), &key, Expect::Absent),
            self.new_version(&u, &key, 1, now, &proof),
        ];
        self.commit(&u, caller.into(), Some(self.key_arn(&key)), writes)?;
        tracing::info!(key_id = %key.id, tenant = %key.tenant, "key created");
        Ok(self.metadata(&key))
    }

    /// DescribeKey.
    pub fn describe_key(&self, caller: &Caller, key: &KeyRef) -> Result<KeyMetadata, KmsError> {
        let (_, key, _) = self.prepare::<act::DescribeKey>(caller, key)?;
        Ok(self.metadata(&key.value))
    }

    /// ListKeys, in key id order.
    pub fn list_keys(
        &self,
        caller: &Caller,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<KeyListEntry>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ListKeys>(caller)?;
        let limit = page_limit(limit)?;
        let (mut items, mut next_marker) = (Vec::new(), None);
        // Keys of all tenants share the table: skip other tenants' until the page is full.
        u.barrier.for_each::<KeyRecord, KmsError>(Table::Keys, "", marker, |k| {
            if k.value.tenant != caller.tenant {
                return Ok(Continue(()));
            }
            if items.len() == limit {
                next_marker = items.last().map(|e: &KeyListEntry| e.key_id.clone());
                return Ok(Break(()));
            }
            items.push(KeyListEntry { key_id: k.value.id.to_string(), key_arn: self.key_arn(&k.value) });
            Ok(Continue(()))
        })?;
        Ok(Page { items, next_marker })
    }

    /// EnableKey.
    pub fn enable_key(&self, caller: &Caller, key: &KeyRef) -> Result<(), KmsError> {
        self.set_state::<act::EnableKey>(caller, key, KeyState::Enabled)
    }

    /// DisableKey.
    pub fn disable_key(&self, caller: &Caller, key: &KeyRef) -> Result<(), KmsError> {
        self.set_state::<act::DisableKey>(caller, key, KeyState::Disabled)
    }

    fn set_state<A: ActionKind>(&self, caller: &Caller, r: &KeyRef, state: KeyState) -> Result<(), KmsError> {
        let (u, mut key, _proof) = self.prepare::<A>(caller, r)?;
        if key.value.state != state {
            key.value.state = state;
            if state == KeyState::Enabled && key.value.rotation.enabled {
                // Rotation resumes from now (AWS does not rotate disabled keys).
                let next = key.value.rotation.next_rotation.unwrap_or(0).max(now_ms());
                key.value.rotation.next_rotation = Some(next);
            }
            self.save_key(&u, caller, &key, vec![])?;
            tracing::info!(key_id = %key.value.id, state = state.as_str(), "key state changed");
        }
        Ok(())
    }

    /// ScheduleKeyDeletion (7–30 days, default 30).
    pub fn schedule_key_deletion(
        &self,
        caller: &Caller,
        r: &KeyRef,
        days: Option<u32>,
    ) -> Result<ScheduledDeletion, KmsError> {
        let (min, max, default) = DELETION_WINDOW_DAYS;
        let days = days.unwrap_or(default);
        if !(min..=max).contains(&days) {
            return Err(KmsError::validation(
                "pendingWindowInDays",
                format!("Member must have value between {min} and {max}"),
            ));
        }
        let (u, mut key, _proof) = self.prepare::<act::ScheduleKeyDeletion>(caller, r)?;
        let date = now_ms() + i64::from(days) * self.config.day_ms;
        key.value.state = KeyState::PendingDeletion;
        key.value.deletion_date = Some(date);
        key.value.pending_window_days = Some(days);
        self.save_key(&u, caller, &key, vec![])?;
        tracing::warn!(key_id = %key.value.id, days, "key scheduled for deletion");
        Ok(ScheduledDeletion {
            key_id: self.key_arn(&key.value),
            deletion_date: aws_time(date),
            key_state: KeyState::PendingDeletion.as_str(),
            pending_window_in_days: days,
        })
    }

    /// CancelKeyDeletion: back to Disabled, as in AWS.
    pub fn cancel_key_deletion(&self, caller: &Caller, r: &KeyRef) -> Result<String, KmsError> {
        let (u, mut key, _proof) = self.prepare::<act::CancelKeyDeletion>(caller, r)?;
        key.value.state = KeyState::Disabled;
        key.value.deletion_date = None;
        key.value.pending_window_days = None;
        self.save_key(&u, caller, &key, vec![])?;
        tracing::info!(key_id = %key.value.id, "key deletion cancelled");
        Ok(self.key_arn(&key.value))
    }

    /// UpdateKeyDescription.
    pub fn update_key_description(&self, caller: &Caller, r: &KeyRef, description: String) -> Result<(), KmsError> {
        validate_description(&description)?;
        let (u, mut key, _proof) = self.prepare::<act::UpdateKeyDescription>(caller, r)?;
        key.value.description = description;
        self.save_key(&u, caller, &key, vec![])
    }

    // ----- rotation -----

    /// EnableKeyRotation (period 90–2560 days, default 365).
    pub fn enable_key_rotation(&self, caller: &Caller, r: &KeyRef, period: Option<u32>) -> Result<(), KmsError> {
        let (min, max, default) = ROTATION_PERIOD_DAYS;
        let period = period.unwrap_or(default);
        if !(min..=max).contains(&period) {
            return Err(KmsError::validation(
                "rotationPeriodInDays",
                format!("Member must have value between {min} and {max}"),
            ));
        }
        let (u, mut key, _proof) = self.prepare::<act::EnableKeyRotation>(caller, r)?;
        let rotation = &mut key.value.rotation;
        if !rotation.enabled || rotation.period_days != period {
            rotation.enabled = true;
            rotation.period_days = period;
            rotation.next_rotation = Some(now_ms() + i64::from(period) * self.config.day_ms);
            self.save_key(&u, caller, &key, vec![])?;
        }
        Ok(())
    }

    /// DisableKeyRotation.
    pub fn disable_key_rotation(&self, caller: &Caller, r: &KeyRef) -> Result<(), KmsError> {
        let (u, mut key, _proof) = self.prepare::<act::DisableKeyRotation>(caller, r)?;
        if key.value.rotation.enabled {
            key.value.rotation.enabled = false;
            key.value.rotation.next_rotation = None;
            self.save_key(&u, caller, &key, vec![])?;
        }
        Ok(())
    }

    /// GetKeyRotationStatus.
    pub fn get_key_rotation_status(&self, caller: &Caller, r: &KeyRef) -> Result<RotationStatus, KmsError> {
        let (_, key, _) = self.prepare::<act::GetKeyRotationStatus>(caller, r)?;
        let rot = &key.value.rotation;
        Ok(RotationStatus {
            key_id: self.key_arn(&key.value),
            key_rotation_enabled: rot.enabled,
            rotation_period_in_days: rot.enabled.then_some(rot.period_days),
            next_rotation_date: rot.next_rotation.filter(|_| rot.enabled).map(aws_time),
        })
    }

    /// RotateKeyOnDemand: a new primary version now. Returns the key id.
    pub fn rotate_key_on_demand(&self, caller: &Caller, r: &KeyRef) -> Result<String, KmsError> {
        let (u, key, proof) = self.prepare::<act::RotateKeyOnDemand>(caller, r)?;
        let id = key.value.id;
        self.rotate(&u, caller.into(), key, RotationKind::OnDemand, &proof)?;
        Ok(id.to_string())
    }

    fn rotate<A: authz::CreatesMaterial>(
        &self,
        u: &Unsealed,
        actor: crate::audit::Actor<'_>,
        mut key: Versioned<KeyRecord>,
        kind: RotationKind,
        proof: &Authorized<A>,
    ) -> Result<u32, KmsError> {
        let now = now_ms();
        let version = key.value.primary_version + 1;
        let write = self.new_version(u, &key.value, version, now, proof);
        key.value.primary_version = version;
        key.value.rotations.push(RotationEntry { version, at: now, kind });
        if key.value.rotation.enabled {
            key.value.rotation.next_rotation =
                Some(now + i64::from(key.value.rotation.period_days) * self.config.day_ms);
        }
        self.save_key(u, actor, &key, vec![write])?;
        tracing::info!(key_id = %key.value.id, version, kind = kind.as_str(), "key rotated");
        Ok(version)
    }

    /// ListKeyRotations, oldest first. The marker is the last version listed.
    pub fn list_key_rotations(
        &self,
        caller: &Caller,
        r: &KeyRef,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<RotationListEntry>, KmsError> {
        let (_, key, _) = self.prepare::<act::ListKeyRotations>(caller, r)?;
        let limit = page_limit(limit)?;
        let after: u32 = parse_marker(marker)?;
        let mut rest = key.value.rotations.iter().filter(|e| e.version > after);
        let items: Vec<_> = rest
            .by_ref()
            .take(limit)
            .map(|e| RotationListEntry {
                key_id: key.value.id.to_string(),
                rotation_date: aws_time(e.at),
                rotation_type: e.kind.as_str(),
            })
            .collect();
        let last =
            key.value.rotations.iter().filter(|e| e.version > after).nth(limit.saturating_sub(1)).map(|e| e.version);
        let next_marker = if rest.next().is_some() { last.map(|v| v.to_string()) } else { None };
        Ok(Page { items, next_marker })
    }

    // ----- tags -----

    /// TagResource: adds or replaces tags.
    pub fn tag_resource(&self, caller: &Caller, r: &KeyRef, tags: BTreeMap<String, String>) -> Result<(), KmsError> {
        let (u, mut key, _proof) = self.prepare::<act::TagResource>(caller, r)?;
        key.value.tags.extend(tags);
        validate_tags(&key.value.tags)?;
        self.save_key(&u, caller, &key, vec![])
    }

    /// UntagResource: removes tags by key (absent keys are ignored, as in AWS).
    pub fn untag_resource(&self, caller: &Caller, r: &KeyRef, keys: &[String]) -> Result<(), KmsError> {
        let (u, mut key, _proof) = self.prepare::<act::UntagResource>(caller, r)?;
        for k in keys {
            key.value.tags.remove(k);
        }
        self.save_key(&u, caller, &key, vec![])
    }

    /// ListResourceTags, in tag-key order. The marker is the last tag key listed.
    pub fn list_resource_tags(
        &self,
        caller: &Caller,
        r: &KeyRef,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<(String, String)>, KmsError> {
        let (_, key, _) = self.prepare::<act::ListResourceTags>(caller, r)?;
        let limit = page_limit(limit)?;
        let all: Vec<_> = key.value.tags.into_iter().filter(|(k, _)| marker.is_none_or(|m| k.as_str() > m)).collect();
        let more = all.len() > limit;
        let items: Vec<_> = all.into_iter().take(limit).collect();
        let next_marker = if more { items.last().map(|(k, _)| k.clone()) } else { None };
        Ok(Page { items, next_marker })
    }

    // ----- aliases -----

    /// CreateAlias.
    pub fn create_alias(&self, caller: &Caller, alias: &AliasName, target: &KeyRef) -> Result<(), KmsError> {
        let (u, key, _proof) = self.prepare::<act::CreateAlias>(caller, target)?;
        let now = now_ms();
        let record = AliasRecord { name: alias.to_string(), key_id: key.value.id, created_at: now, updated_at: now };
        let row = format!("{}/{}", caller.tenant, alias);
        let write = u.barrier.put(Table::Aliases, &row, &record, Expect::Absent);
        self.commit(&u, caller.into(), Some(self.key_arn(&key.value)), vec![write]).map_err(|e| match e {
            KmsError::Conflict => KmsError::AlreadyExists(format!(
                "An alias with the name {} already exists",
                ids::alias_arn(&self.config.region, &caller.tenant, alias)
            )),
            other => other,
        })
    }

    /// UpdateAlias: points an existing alias at another key.
    pub fn update_alias(&self, caller: &Caller, alias: &AliasName, target: &KeyRef) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let row = format!("{}/{}", caller.tenant, alias);
        let mut existing =
            u.barrier.get::<AliasRecord>(Table::Aliases, &row)?.ok_or_else(|| self.alias_not_found(caller, alias))?;
        let old = self.key_by_id(&u, existing.value.key_id)?;
        if let Some(old) = &old {
            let _proof = self.authorize_key::<act::UpdateAlias>(&u, caller, &old.value, None)?;
        }
        let (u, key, _proof) = self.prepare::<act::UpdateAlias>(caller, target)?;
        existing.value.key_id = key.value.id;
        existing.value.updated_at = now_ms();
        let write = u.barrier.put(Table::Aliases, &row, &existing.value, Expect::Rev(existing.rev));
        self.commit(&u, caller.into(), Some(self.key_arn(&key.value)), vec![write])
    }

    /// DeleteAlias.
    pub fn delete_alias(&self, caller: &Caller, alias: &AliasName) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let row = format!("{}/{}", caller.tenant, alias);
        let existing =
            u.barrier.get::<AliasRecord>(Table::Aliases, &row)?.ok_or_else(|| self.alias_not_found(caller, alias))?;
        if let Some(key) = self.key_by_id(&u, existing.value.key_id)? {
            let _proof = self.authorize_key::<act::DeleteAlias>(&u, caller, &key.value, None)?;
        }
        self.commit(&u, caller.into(), None, vec![u.barrier.delete(Table::Aliases, &row, Expect::Rev(existing.rev))])
    }

    fn alias_not_found(&self, caller: &Caller, alias: &AliasName) -> KmsError {
        KmsError::NotFound(format!(
            "Alias {} is not found.",
            ids::alias_arn(&self.config.region, &caller.tenant, alias)
        ))
    }

    /// ListAliases, optionally only those of one key. The marker is the last alias name listed.
    pub fn list_aliases(
        &self,
        caller: &Caller,
        key: Option<&KeyRef>,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<AliasListEntry>, KmsError> {
        let limit = page_limit(limit)?;
        let u = self.unsealed()?;
        // An account-level action (AWS: an IAM permission, not a key policy one), even when
        // filtered by a key of the caller's tenant.
        let _proof = authorize::<act::ListAliases>(caller)?;
        let filter = match key {
            Some(r) => {
                let k = self.resolve(&u, caller, r)?;
                if k.value.tenant != caller.tenant {
                    return Err(KmsError::NotFound(format!("{} is not found.", self.key_arn(&k.value))));
                }
                Some(k.value.id)
            }
            None => None,
        };
        let prefix = format!("{}/", caller.tenant);
        let after = marker.map(|m| format!("{prefix}{m}"));
        let (mut items, mut next_marker) = (Vec::new(), None);
        u.barrier.for_each::<AliasRecord, KmsError>(Table::Aliases, &prefix, after.as_deref(), |a| {
            if filter.is_some_and(|id| id != a.value.key_id) {
                return Ok(Continue(()));
            }
            if items.len() == limit {
                next_marker = items.last().map(|e: &AliasListEntry| e.alias_name.clone());
                return Ok(Break(()));
            }
            let name = AliasName::parse(&a.value.name)?;
            items.push(AliasListEntry {
                alias_arn: ids::alias_arn(&self.config.region, &caller.tenant, &name),
                alias_name: a.value.name,
                target_key_id: a.value.key_id.to_string(),
                creation_date: aws_time(a.value.created_at),
                last_updated_date: aws_time(a.value.updated_at),
            });
            Ok(Continue(()))
        })?;
        Ok(Page { items, next_marker })
    }

    // ----- cryptographic operations -----

    /// Encrypt: at most 4096 bytes under the key's primary version.
    pub fn encrypt(
        &self,
        caller: &Caller,
        r: &KeyRef,
        plaintext: &SecretBytes,
        context: &EncryptionContext,
    ) -> Result<Encrypted, KmsError> {
        if plaintext.is_empty() || plaintext.len() > MAX_ENCRYPT_PLAINTEXT {
            return Err(KmsError::validation(
                "plaintext",
                format!("Member must have length between 1 and {MAX_ENCRYPT_PLAINTEXT}"),
            ));
        }
        let (u, key, proof) = self.prepare_in::<act::Encrypt>(caller, r, Some(context))?;
        let blob = self.seal_blob(&u, caller, &key.value, context, plaintext.expose_secret(), &proof)?;
        Ok(Encrypted {
            ciphertext_blob: blob,
            key_arn: self.key_arn(&key.value),
            plaintext: None,
            source_key_arn: None,
        })
    }

    /// Decrypt: the blob names its key and version; `key`, if given, must be that key.
    pub fn decrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        context: &EncryptionContext,
        key: Option<&KeyRef>,
    ) -> Result<Decrypted, KmsError> {
        let (u, key, proof) = self.prepare_blob::<act::Decrypt>(caller, ciphertext, key, context)?;
        let plaintext = self.open_blob(&u, caller, &key.value, ciphertext, context, &proof)?;
        Ok(Decrypted { plaintext, key_arn: self.key_arn(&key.value) })
    }

    /// ReEncrypt: decrypts under the source key and encrypts under the destination key, without
    /// the plaintext leaving the service.
    pub fn re_encrypt(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        source_context: &EncryptionContext,
        source_key: Option<&KeyRef>,
        destination_key: &KeyRef,
        destination_context: &EncryptionContext,
    ) -> Result<Encrypted, KmsError> {
        let (u, src, src_proof) =
            self.prepare_blob::<act::ReEncryptFrom>(caller, ciphertext, source_key, source_context)?;
        let (_, dst, dst_proof) =
            self.prepare_in::<act::ReEncryptTo>(caller, destination_key, Some(destination_context))?;
        let plaintext = self.open_blob(&u, caller, &src.value, ciphertext, source_context, &src_proof)?;
        let blob =
            self.seal_blob(&u, caller, &dst.value, destination_context, plaintext.expose_secret(), &dst_proof)?;
        Ok(Encrypted {
            ciphertext_blob: blob,
            key_arn: self.key_arn(&dst.value),
            plaintext: None,
            source_key_arn: Some(self.key_arn(&src.value)),
        })
    }

    /// GenerateDataKey (with the plaintext) or GenerateDataKeyWithoutPlaintext.
    pub fn generate_data_key(
        &self,
        caller: &Caller,
        r: &KeyRef,
        len: usize,
        context: &EncryptionContext,
        with_plaintext: bool,
    ) -> Result<Encrypted, KmsError> {
        if len == 0 || len > MAX_GENERATED_BYTES {
            return Err(KmsError::validation(
                "numberOfBytes",
                format!("Member must have value between 1 and {MAX_GENERATED_BYTES}"),
            ));
        }
        let data_key = random::secret(len);
        let (blob, key) = if with_plaintext {
            let (u, key, proof) = self.prepare_in::<act::GenerateDataKey>(caller, r, Some(context))?;
            (self.seal_blob(&u, caller, &key.value, context, data_key.expose_secret(), &proof)?, key)
        } else {
            let (u, key, proof) = self.prepare_in::<act::GenerateDataKeyWithoutPlaintext>(caller, r, Some(context))?;
            (self.seal_blob(&u, caller, &key.value, context, data_key.expose_secret(), &proof)?, key)
        };
        Ok(Encrypted {
            ciphertext_blob: blob,
            key_arn: self.key_arn(&key.value),
            plaintext: with_plaintext.then_some(data_key),
            source_key_arn: None,
        })
    }

    /// GenerateMac: HMAC of a message (1–4096 bytes) with an HMAC key.
    pub fn generate_mac(
        &self,
        caller: &Caller,
        r: &KeyRef,
        message: &[u8],
        algorithm: &str,
    ) -> Result<(Vec<u8>, String), KmsError> {
        validate_message(message)?;
        let (u, key, proof) = self.prepare::<act::GenerateMac>(caller, r)?;
        let alg = mac_algorithm_for(&key.value, algorithm)?;
        let material = self.material(&u, caller, &key.value, key.value.primary_version, &proof)?;
        Ok((custody_crypto::mac::sign(alg, &material, message), self.key_arn(&key.value)))
    }

    /// VerifyMac: Ok(key ARN) if `mac` is the HMAC of `message`; [`KmsError::InvalidMac`] if not.
    pub fn verify_mac(
        &self,
        caller: &Caller,
        r: &KeyRef,
        message: &[u8],
        mac: &[u8],
        algorithm: &str,
    ) -> Result<String, KmsError> {
        validate_message(message)?;
        let (u, key, proof) = self.prepare::<act::VerifyMac>(caller, r)?;
        let alg = mac_algorithm_for(&key.value, algorithm)?;
        let material = self.material(&u, caller, &key.value, key.value.primary_version, &proof)?;
        if custody_crypto::mac::verify(alg, &material, message, mac) {
            Ok(self.key_arn(&key.value))
        } else {
            Err(KmsError::InvalidMac)
        }
    }

    /// GenerateRandom: 1–1024 random bytes.
    pub fn generate_random(&self, caller: &Caller, len: usize) -> Result<SecretBytes, KmsError> {
        self.unsealed()?;
        let _proof = authorize::<act::GenerateRandom>(caller)?;
        if len == 0 || len > MAX_GENERATED_BYTES {
            return Err(KmsError::validation(
                "numberOfBytes",
                format!("Member must have value between 1 and {MAX_GENERATED_BYTES}"),
            ));
        }
        Ok(random::secret(len))
    }

    fn seal_blob<A: authz::UsesMaterial>(
        &self,
        u: &Unsealed,
        caller: &Caller,
        key: &KeyRecord,
        context: &EncryptionContext,
        plaintext: &[u8],
        proof: &Authorized<A>,
    ) -> Result<Vec<u8>, KmsError> {
        let version = key.primary_version;
        let material = self.material(u, caller, key, version, proof)?;
        let blob = blob::encrypt(&material, BlobHeader { key_id: key.id.to_bytes(), version }, context, plaintext);
        *self.usage.lock().unwrap_or_else(|p| p.into_inner()).entry((key.id, version)).or_default() += 1;
        Ok(blob)
    }

    fn open_blob<A: authz::UsesMaterial>(
        &self,
        u: &Unsealed,
        caller: &Caller,
        key: &KeyRecord,
        ciphertext: &[u8],
        context: &EncryptionContext,
        proof: &Authorized<A>,
    ) -> Result<SecretBytes, KmsError> {
        let header = BlobHeader::parse(ciphertext).map_err(|_| KmsError::InvalidCiphertext)?;
        if header.version == 0 || header.version > key.primary_version {
            return Err(KmsError::InvalidCiphertext);
        }
        let material = self.material(u, caller, key, header.version, proof)?;
        blob::decrypt(&material, ciphertext, context).map_err(|_| KmsError::InvalidCiphertext)
    }

    /// Resolves the key a blob names (checking an explicit KeyId against it), then authorizes.
    /// The blob may name a key of another tenant whose policy opens it to the caller.
    #[allow(clippy::type_complexity)]
    fn prepare_blob<A: ActionKind>(
        &self,
        caller: &Caller,
        ciphertext: &[u8],
        key: Option<&KeyRef>,
        context: &EncryptionContext,
    ) -> Result<(std::sync::Arc<Unsealed>, Versioned<KeyRecord>, Authorized<A>), KmsError> {
        let header = BlobHeader::parse(ciphertext).map_err(|_| KmsError::InvalidCiphertext)?;
        let named = KeyId::from_bytes(header.key_id);
        let u = self.unsealed()?;
        if let Some(r) = key {
            if self.resolve(&u, caller, r)?.value.id != named {
                return Err(KmsError::IncorrectKey);
            }
        }
        // A blob naming a key the caller cannot see is simply an invalid ciphertext to them. The
        // blob names the key by id, whatever its tenant: authorization decides (a foreign key
        // opens only where its policy names the caller).
        let key = self.key_by_id(&u, named)?.ok_or(KmsError::InvalidCiphertext)?;
        let proof = self.check_resolved::<A>(&u, caller, &key, Some(context)).map_err(|e| match e {
            KmsError::NotFound(_) => KmsError::InvalidCiphertext,
            other => other,
        })?;
        Ok((u, key, proof))
    }

    /// Resolve, authorize, check state: the common start of every key operation.
    #[allow(clippy::type_complexity)]
    pub(crate) fn prepare<A: ActionKind>(
        &self,
        caller: &Caller,
        r: &KeyRef,
    ) -> Result<(std::sync::Arc<Unsealed>, Versioned<KeyRecord>, Authorized<A>), KmsError> {
        self.prepare_in::<A>(caller, r, None)
    }

    /// [`Kms::prepare`] for an action that takes an encryption context (key policy conditions
    /// and grant constraints see it).
    #[allow(clippy::type_complexity)]
    pub(crate) fn prepare_in<A: ActionKind>(
        &self,
        caller: &Caller,
        r: &KeyRef,
        context: Option<&EncryptionContext>,
    ) -> Result<(std::sync::Arc<Unsealed>, Versioned<KeyRecord>, Authorized<A>), KmsError> {
        let u = self.unsealed()?;
        let key = self.resolve(&u, caller, r)?;
        let proof = self.check_resolved::<A>(&u, caller, &key, context)?;
        Ok((u, key, proof))
    }

    /// Authorizes `A` on a resolved key and checks the key's state for it.
    fn check_resolved<A: ActionKind>(
        &self,
        u: &Unsealed,
        caller: &Caller,
        key: &Versioned<KeyRecord>,
        context: Option<&EncryptionContext>,
    ) -> Result<Authorized<A>, KmsError> {
        let proof = self.authorize_key::<A>(u, caller, &key.value, context.map(|c| c.pairs()))?;
        authz::check_state(&key.value, A::ACTION, &self.key_arn(&key.value))?;
        Ok(proof)
    }

    fn metadata(&self, key: &KeyRecord) -> KeyMetadata {
        KeyMetadata {
            aws_account_id: key.tenant.to_string(),
            key_id: key.id.to_string(),
            arn: self.key_arn(key),
            creation_date: aws_time(key.created_at),
            enabled: key.state == KeyState::Enabled,
            description: key.description.clone(),
            key_usage: key.spec.usage(),
            key_state: key.state.as_str(),
            deletion_date: key.deletion_date.filter(|_| key.state == KeyState::PendingDeletion).map(aws_time),
            pending_deletion_window_in_days: key.pending_window_days.filter(|_| key.state == KeyState::PendingDeletion),
            origin: "AWS_KMS",
            key_manager: "CUSTOMER",
            customer_master_key_spec: key.spec.as_str(),
            key_spec: key.spec.as_str(),
            encryption_algorithms: key.spec.mac_algorithm().is_none().then(|| vec!["SYMMETRIC_DEFAULT"]),
            mac_algorithms: key.spec.mac_algorithm().map(|a| vec![a.as_str()]),
            multi_region: false,
        }
    }

    // ----- scheduler -----

    /// One pass of the background scheduler: rotates keys whose period is due and destroys keys
    /// whose deletion date has passed. Safe to run concurrently with requests: every change is a
    /// conditional write, and a key changed meanwhile is left for the next pass.
    pub fn run_due_work(&self) -> Result<WorkReport, KmsError> {
        let u = self.unsealed()?;
        // Rows nobody read lately leave memory, with the key material unwrapped from them: on
        // this node a destroyed key's material went when its rows were deleted; on another node
        // it goes here, or as soon as a request finds the rows gone.
        u.barrier.forget_idle(crate::REMEMBERED_ROWS_IDLE);
        let now = now_ms();
        let mut report = WorkReport::default();
        u.barrier.for_each::<KeyRecord, KmsError>(Table::Keys, "", None, |key| {
            let before = key.value.state;
            let result = match key.value.state {
                KeyState::Enabled
                    if key.value.rotation.enabled && key.value.rotation.next_rotation.is_some_and(|t| t <= now) =>
                {
                    let proof = authz::scheduler::<act::RotateKeyOnDemand>();
                    let actor = crate::audit::Actor::Scheduler { action: "Custody.ScheduledRotation" };
                    self.rotate(&u, actor, key, RotationKind::Automatic, &proof).map(|_| {
                        report.rotated += 1;
                        None
                    })
                }
                KeyState::PendingDeletion if key.value.deletion_date.is_some_and(|t| t <= now) => {
                    self.destroy(&u, key).map(|_| {
                        report.destroyed += 1;
                        Some(KeyState::Destroyed)
                    })
                }
                _ => Ok(None),
            };
            let after = match result {
                Ok(Some(state)) => state,
                Ok(None) | Err(KmsError::Conflict) => before,
                Err(e) => {
                    tracing::error!(error = %e, "scheduled work failed; will retry on the next pass");
                    before
                }
            };
            let index = KeyState::ALL.iter().position(|s| *s == after).expect("every state is listed");
            report.keys_by_state[index] += 1;
            Ok(Continue(()))
        })?;
        Ok(report)
    }

    /// Adds the encryptions counted since the last flush to each version's stored count, and
    /// rotates a key whose primary version reached `key_usage_limit` (audited as
    /// `Custody.RotateOnUsageLimit`). The server calls it every second; counts of the last second
    /// before a crash are lost, which the limit's margin absorbs.
    pub fn flush_usage(&self) -> Result<WorkReport, KmsError> {
        let u = self.unsealed()?;
        let counted = std::mem::take(&mut *self.usage.lock().unwrap_or_else(|p| p.into_inner()));
        let mut report = WorkReport::default();
        for ((id, version), n) in counted {
            let row = crate::model::version_row(id, version);
            let mut total = None;
            // Other nodes add their counts too: retry a lost race a few times.
            for _ in 0..5 {
                let Some(mut v) = u.barrier.get::<VersionRecord>(Table::Versions, &row)? else { break };
                v.value.encryptions = v.value.encryptions.saturating_add(n);
                match u.barrier.apply(&[u.barrier.put(Table::Versions, &row, &v.value, Expect::Rev(v.rev))]) {
                    Ok(()) => {
                        total = Some(v.value.encryptions);
                        break;
                    }
                    Err(custody_store::StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(total) = total else {
                // Put the count back for the next flush rather than lose it.
                *self.usage.lock().unwrap_or_else(|p| p.into_inner()).entry((id, version)).or_default() += n;
                continue;
            };
            if total < self.config.key_usage_limit {
                continue;
            }
            let Some(key) = u.barrier.get::<KeyRecord>(Table::Keys, &id.to_string())? else { continue };
            if key.value.primary_version != version || key.value.state != KeyState::Enabled {
                continue;
            }
            let proof = authz::scheduler::<act::RotateKeyOnDemand>();
            let actor = crate::audit::Actor::Scheduler { action: "Custody.RotateOnUsageLimit" };
            tracing::warn!(key_id = %id, version, encryptions = total, "key version reached its usage limit: rotating");
            match self.rotate(&u, actor, key, RotationKind::Automatic, &proof) {
                Ok(_) => report.rotated += 1,
                Err(KmsError::Conflict) => {}
                Err(e) => tracing::error!(error = %e, "rotation on the usage limit failed; retried at the next flush"),
            }
        }
        Ok(report)
    }

    /// Erases a key's material; keeps the key record as a tombstone; deletes its aliases.
    fn destroy(&self, u: &Unsealed, mut key: Versioned<KeyRecord>) -> Result<(), KmsError> {
        let id = key.value.id;
        let mut writes = Vec::new();
        for v in 1..=key.value.primary_version {
            writes.push(u.barrier.delete(Table::Versions, &version_row(id, v), Expect::Any));
        }
        let prefix = format!("{}/", key.value.tenant);
        u.barrier.for_each::<AliasRecord, KmsError>(Table::Aliases, &prefix, None, |a| {
            if a.value.key_id == id {
                writes.push(u.barrier.delete(Table::Aliases, &a.key, Expect::Rev(a.rev)));
            }
            Ok(Continue(()))
        })?;
        writes.extend(self.grant_deletes(u, id)?);
        key.value.state = KeyState::Destroyed;
        key.value.destroyed_at = Some(now_ms());
        key.value.rotation.enabled = false;
        key.value.rotation.next_rotation = None;
        self.save_key(u, crate::audit::Actor::Scheduler { action: "Custody.ScheduledDestruction" }, &key, writes)?;
        u.barrier.backend().erase_freed()?;
        tracing::warn!(key_id = %id, "key material destroyed");
        Ok(())
    }
}

fn page_limit(limit: Option<usize>) -> Result<usize, KmsError> {
    let (default, max) = PAGE_LIMIT;
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(KmsError::validation("limit", format!("Member must have value between 1 and {max}"))),
    }
}

fn parse_marker(marker: Option<&str>) -> Result<u32, KmsError> {
    marker.map_or(Ok(0), |m| m.parse().map_err(|_| KmsError::validation("marker", "Invalid marker")))
}

fn validate_message(message: &[u8]) -> Result<(), KmsError> {
    if message.is_empty() || message.len() > MAX_ENCRYPT_PLAINTEXT {
        return Err(KmsError::validation(
            "message",
            format!("Member must have length between 1 and {MAX_ENCRYPT_PLAINTEXT}"),
        ));
    }
    Ok(())
}

/// The MAC algorithm named in the request must be the key's.
fn mac_algorithm_for(key: &KeyRecord, algorithm: &str) -> Result<custody_crypto::mac::MacAlgorithm, KmsError> {
    let requested = custody_crypto::mac::MacAlgorithm::parse(algorithm).ok_or_else(|| {
        KmsError::validation(
            "macAlgorithm",
            "Member must satisfy enum value set: [HMAC_SHA_224, HMAC_SHA_256, HMAC_SHA_384, HMAC_SHA_512]",
        )
    })?;
    match key.spec.mac_algorithm() {
        Some(a) if a == requested => Ok(a),
        _ => Err(KmsError::InvalidKeyUsage(format!("{algorithm} is not valid for a {} key.", key.spec.as_str()))),
    }
}

fn validate_description(d: &str) -> Result<(), KmsError> {
    if d.chars().count() > 8192 {
        return Err(KmsError::validation("description", "Member must have length less than or equal to 8192"));
    }
    Ok(())
}

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), KmsError> {
    if tags.len() > MAX_TAGS {
        return Err(KmsError::validation("tags", format!("a key may have at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(KmsError::validation("tags.member.tagKey", "Member must have length between 1 and 128"));
        }
        if v.chars().count() > 256 {
            return Err(KmsError::validation("tags.member.tagValue", "Member must have length between 0 and 256"));
        }
    }
    Ok(())
}
