//! custody's key management service: no HTTP, no TLS, just the service.
//!
//! A [`Kms`] owns a store [`Backend`], starts sealed, and is unsealed with Shamir shares or a key
//! file. Every operation takes an authenticated [`Caller`], resolves the key it names within the
//! caller's tenant, passes [`authz::authorize`] and the key-state table [`authz::check_state`],
//! acts, and commits its state change atomically (DESIGN.md §4).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod access;
mod access_keys;
pub mod audit;
pub mod authz;
mod backup;
mod certs;
mod check;
pub mod error;
mod grants;
pub mod ids;
pub mod model;
mod ops;
pub mod policy;
mod principals;
mod root;
mod seal;

use std::sync::{Arc, RwLock};

use custody_crypto::keys::WrapAad;
use custody_crypto::KeyMaterial;
use custody_store::{Backend, Barrier, Expect, Table, Versioned, Write};

pub use access::{default_policy, parse_action, AccessEntry, DefaultKeyPolicy, Explanation};
pub use access_keys::{AccessKeyInfo, NewAccessKey, SigV4Scope};
pub use audit::{
    AuditArrival, AuditCheckpoint, AuditEvent, AuditHealth, AuditQuery, AuditRecord, AuditScope, AuditSink,
    AuditVerification, ElidedRecord, ExportFrom, ExportLine, ExportPage, Outcome, RequestContexts, TrailRecord,
};
pub use authz::{Action, Caller};
pub use backup::{Backup, BackupHeader, Destroyed};
pub use certs::{CaRotation, CertKind, CertificateInfo, RevokeTarget, SERVER_CERT_LIFETIME};
pub use check::{CheckReport, KeyCheck};
pub use error::KmsError;
pub use grants::{CreateGrantRequest, GRANT_OPERATIONS};
pub use ids::{AliasName, KeyId, KeyRef, PrincipalName, TenantId};
pub use model::Role;
pub use ops::*;
pub use principals::{IssuedClientCert, PrincipalInfo, TenantInfo, CLIENT_CERT_TTL};
pub use root::{RootRotationStarted, RootStatus, RootWrapper};
pub use seal::{InitOptions, InitOutput, InitSeal, Pkcs11Seal, SealStatus, SealTarget, PKCS11_WRAP_AAD};

use crate::authz::{Authorized, CreatesMaterial, UsesMaterial};
use crate::model::{version_row, KeyRecord, VersionRecord};

/// One day, in milliseconds: the unit of deletion windows and rotation periods.
pub const DAY_MS: i64 = 86_400_000;

/// Service settings (the server fills them from its configuration).
#[derive(Debug, Clone)]
pub struct KmsConfig {
    /// Region in ARNs.
    pub region: String,
    /// Length of a "day" for deletion windows and rotation periods, in milliseconds.
    /// Production: [`DAY_MS`]. Shorter only through `danger_day_length_ms`, for tests.
    pub day_ms: i64,
    /// A signed audit checkpoint after every this many records.
    pub audit_checkpoint_every: u64,
    /// Keep audit records at least this many days (0: forever).
    pub audit_retain_days: u64,
    /// Keep at least this many of the newest audit records (0: all).
    pub audit_retain_records: u64,
    /// Whether a policy or grant may give one principal both administration of a key and
    /// Decrypt with it.
    pub separation_of_duties: SeparationOfDuties,
    /// Benchmarks only: write no audit records (`danger_disable_audit`).
    pub danger_disable_audit: bool,
    /// Longest the audit thread waits, before a group commit, for the records of requests
    /// being served (`audit_group_wait_us`; zero: commit what is queued at once).
    pub audit_group_wait: std::time::Duration,
    /// What the policy of a key created without one allows.
    pub default_key_policy: DefaultKeyPolicy,
    /// Encryptions under one key version after which the key rotates by itself
    /// ([`DEFAULT_KEY_USAGE_LIMIT`]; docs/SECURITY.md has the bound).
    pub key_usage_limit: u64,
}

/// How long a row opened by the storage barrier (and key material unwrapped from it) stays in
/// memory without being read; the scheduler's passes forget older ones.
pub(crate) const REMEMBERED_ROWS_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// Default of `audit_group_wait_us`: how long, at most, the audit thread waits for the records of
/// requests being served before a group commit. Zero: it pays where custody has its cores to
/// itself and costs where its clients share them (docs/BENCHMARKS.md "Session 8").
pub const DEFAULT_AUDIT_GROUP_WAIT_US: u64 = 0;

/// Encryptions per key version before an automatic rotation: 2^32, the limit NIST SP 800-38D
/// sets for AES-GCM with random 96-bit nonces under one key. custody's blobs derive a fresh key
/// and nonce per message from a 256-bit salt, so its own bound is far higher; this keeps every
/// version within the stricter, better-known one.
pub const DEFAULT_KEY_USAGE_LIMIT: u64 = 1 << 32;

/// What happens when a key policy or grant would let one principal both administer a key and
/// decrypt with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeparationOfDuties {
    /// Refused (the default).
    #[default]
    Enforce,
    /// Allowed, with an audit alert (development).
    Warn,
}

impl KmsConfig {
    /// What `custody dev` runs with: separation of duties relaxed to `warn`, and new keys
    /// usable by the tenant's key users.
    pub fn development() -> Self {
        Self {
            separation_of_duties: SeparationOfDuties::Warn,
            default_key_policy: DefaultKeyPolicy::Tenant,
            ..Self::default()
        }
    }
}

impl Default for KmsConfig {
    fn default() -> Self {
        Self {
            region: "us-east-1".into(),
            day_ms: DAY_MS,
            audit_checkpoint_every: 100,
            audit_retain_days: 0,
            audit_retain_records: 0,
            separation_of_duties: SeparationOfDuties::Enforce,
            danger_disable_audit: false,
            audit_group_wait: std::time::Duration::from_micros(DEFAULT_AUDIT_GROUP_WAIT_US),
            default_key_policy: DefaultKeyPolicy::KeyAdminsOnly,
            key_usage_limit: DEFAULT_KEY_USAGE_LIMIT,
        }
    }
}

/// The key management service.
#[derive(Debug)]
pub struct Kms {
    backend: Arc<dyn Backend>,
    config: KmsConfig,
    seal: RwLock<seal::SealState>,
    audit_seq: audit::Sequencer,
    /// Parsed key policies by their text (a policy is parsed once, not on every request).
    policies: std::sync::Mutex<std::collections::HashMap<String, Arc<policy::Policy>>>,
    /// How often `policies` answered.
    policy_cache: CacheCounters,
    /// Serials of revoked certificates, as last loaded from the store ([`Kms::refresh_revocations`]).
    revoked: RwLock<std::collections::HashSet<String>>,
    /// Encryptions per key version since the last [`Kms::flush_usage`].
    usage: std::sync::Mutex<std::collections::HashMap<(ids::KeyId, u32), u64>>,
    /// How the PKCS#11 token wraps a new root key (root rotation of a PKCS#11 store).
    root_wrapper: root::WrapperSlot,
}

/// Hits and misses of a cache, counted as they happen.
#[derive(Debug, Default)]
struct CacheCounters {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

/// What exists only while unsealed.
#[derive(Debug)]
struct Unsealed {
    /// The root key, and during a root rotation the next one too.
    roots: root::RootRing,
    /// Opens rows of every generation in `roots`, seals under the newest.
    barrier: Barrier,
    /// Loaded once at unseal: every audit record with an encryption context uses it.
    audit_hmac: Arc<custody_crypto::audit::AuditHmacKey>,
}

impl Kms {
    /// The service's configuration.
    pub fn config(&self) -> &KmsConfig {
        &self.config
    }

    /// The service's caches and how often each answered: `store` (rows read by requests, when
    /// the backend keeps them) and `policy` (parsed key policies).
    pub fn cache_stats(&self) -> Vec<(&'static str, custody_store::CacheStats)> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut stats = Vec::new();
        if let Some(s) = self.backend.cache_stats() {
            stats.push(("store", s));
        }
        let policy = &self.policy_cache;
        stats.push((
            "policy",
            custody_store::CacheStats { hits: policy.hits.load(Relaxed), misses: policy.misses.load(Relaxed) },
        ));
        stats
    }

    /// The store backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    fn unsealed(&self) -> Result<Arc<Unsealed>, KmsError> {
        match &*self.seal.read().unwrap_or_else(|p| p.into_inner()) {
            seal::SealState::Unsealed(u) => Ok(u.clone()),
            seal::SealState::Sealed { .. } => Err(KmsError::Sealed),
        }
    }

    /// A key's ARN.
    pub fn key_arn(&self, key: &KeyRecord) -> String {
        ids::key_arn(&self.config.region, &key.tenant, key.id)
    }

    /// Finds the key `r` names: by id or alias in the caller's tenant, or by key ARN in any
    /// tenant (authorization then decides; a foreign key the caller may not use is reported as
    /// not found, exactly like a key that does not exist).
    fn resolve(&self, u: &Unsealed, caller: &Caller, r: &KeyRef) -> Result<Versioned<KeyRecord>, KmsError> {
        let not_found = |what: &str| KmsError::NotFound(format!("{what} is not found."));
        let in_scope = |region: &str, tenant: &TenantId| region == self.config.region && *tenant == caller.tenant;
        let id = match r {
            KeyRef::Id(id) => *id,
            KeyRef::KeyArn { region, tenant, id } if region == &self.config.region => {
                return match self.key_by_id(u, *id)? {
                    Some(k) if k.value.tenant == *tenant => Ok(k),
                    _ => Err(not_found(&ids::key_arn(region, tenant, *id))),
                };
            }
            KeyRef::KeyArn { region, tenant, id } => return Err(not_found(&ids::key_arn(region, tenant, *id))),
            KeyRef::Alias(alias) => self.alias_target(u, caller, alias)?,
            KeyRef::AliasArn { region, tenant, alias } if in_scope(region, tenant) => {
                self.alias_target(u, caller, alias)?
            }
            KeyRef::AliasArn { region, tenant, alias } => {
                return Err(not_found(&ids::alias_arn(region, tenant, alias)))
            }
        };
        let key = self.key_by_id(u, id)?;
        match key {
            Some(k) if k.value.tenant == caller.tenant => Ok(k),
            _ => Err(not_found(&ids::key_arn(&self.config.region, &caller.tenant, id))),
        }
    }

    fn key_by_id(&self, u: &Unsealed, id: KeyId) -> Result<Option<Versioned<KeyRecord>>, KmsError> {
        Ok(u.barrier.get_decoded::<KeyRecord>(Table::Keys, &id.to_string())?)
    }

    fn alias_target(&self, u: &Unsealed, caller: &Caller, alias: &AliasName) -> Result<KeyId, KmsError> {
        let row = format!("{}/{}", caller.tenant, alias);
        u.barrier.get_decoded::<model::AliasRecord>(Table::Aliases, &row)?.map(|a| a.value.key_id).ok_or_else(|| {
            KmsError::NotFound(format!(
                "Alias {} is not found.",
                ids::alias_arn(&self.config.region, &caller.tenant, alias)
            ))
        })
    }

    /// Unwraps one version's material. Requires proof of an action that may use it. The
    /// material is remembered with the version row's sealed bytes (ARCHITECTURE "Opened rows"):
    /// unwrapped once, not on every request, and dropped (wiped) with the memo entry.
    /// The request's audit record notes the version (ReEncrypt's: the destination key's; the
    /// source's is the one its ciphertext names).
    fn material<A: UsesMaterial>(
        &self,
        u: &Unsealed,
        caller: &Caller,
        key: &KeyRecord,
        version: u32,
        _proof: &Authorized<A>,
    ) -> Result<Arc<KeyMaterial>, KmsError> {
        if let Some(scope) = caller.audit.as_ref().filter(|_| A::ACTION != Action::ReEncryptFrom) {
            scope.use_version(version);
        }
        let unwrap = |row: &VersionRecord| {
            let aad = WrapAad { tenant: key.tenant.as_str(), key_id: &key.id.to_string(), version };
            u.roots.unwrap_version(row, &aad).map_err(|_| {
                tracing::error!(key_id = %key.id, version, "wrapped key version failed its integrity check");
                KmsError::Integrity(format!("versions/{}", version_row(key.id, version)))
            })
        };
        u.barrier
            .get_derived::<VersionRecord, _, KmsError>(Table::Versions, &version_row(key.id, version), unwrap)?
            .ok_or(KmsError::InvalidCiphertext)
    }

    /// Creates version `version` of `key`: fresh material, wrapped under the root key.
    fn new_version<A: CreatesMaterial>(
        &self,
        u: &Unsealed,
        key: &KeyRecord,
        version: u32,
        now: model::Millis,
        _proof: &Authorized<A>,
    ) -> Write {
        let material = KeyMaterial::generate(key.spec.material_len());
        let aad = WrapAad { tenant: key.tenant.as_str(), key_id: &key.id.to_string(), version };
        let canary = custody_crypto::blob::encrypt(
            &material,
            custody_crypto::blob::BlobHeader { key_id: key.id.to_bytes(), version },
            &model::canary_context(),
            &model::canary_plaintext(key.id, version),
        );
        use base64::Engine;
        let (root_generation, root) = u.roots.write();
        let record = VersionRecord {
            version,
            created_at: now,
            wrapped: root.wrap_key_material(&material, &aad),
            root_generation,
            canary: Some(base64::engine::general_purpose::STANDARD.encode(canary)),
            encryptions: 0,
        };
        u.barrier.put(Table::Versions, &version_row(key.id, version), &record, Expect::Absent)
    }

    /// Writes a changed key record (conditional on the revision read) with `extra` writes and
    /// the audit record, atomically.
    fn save_key<'a>(
        &self,
        u: &Unsealed,
        actor: impl Into<audit::Actor<'a>>,
        key: &Versioned<KeyRecord>,
        extra: Vec<Write>,
    ) -> Result<(), KmsError> {
        let mut writes = vec![u.barrier.put(Table::Keys, &key.key, &key.value, Expect::Rev(key.rev))];
        writes.extend(extra);
        self.commit(u, actor.into(), Some(self.key_arn(&key.value)), writes)
    }
}
