//! Stored records (sealed by the storage barrier) and the metadata shapes returned to callers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{KeyId, PrincipalName, TenantId};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_ms() -> Millis {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// AWS timestamps are seconds since the epoch as a JSON number.
pub fn aws_time(ms: Millis) -> f64 {
    ms as f64 / 1000.0
}

/// A key's lifecycle state (AWS names; `Destroyed` is custody's tombstone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    /// Usable.
    Enabled,
    /// Not usable for cryptographic operations; can be enabled again.
    Disabled,
    /// Scheduled for destruction; not usable; can be cancelled (back to Disabled).
    PendingDeletion,
    /// Material erased; metadata kept as a tombstone.
    Destroyed,
}

impl KeyState {
    /// Every state.
    pub const ALL: [KeyState; 4] =
        [KeyState::Enabled, KeyState::Disabled, KeyState::PendingDeletion, KeyState::Destroyed];

    /// The AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Enabled => "Enabled",
            KeyState::Disabled => "Disabled",
            KeyState::PendingDeletion => "PendingDeletion",
            KeyState::Destroyed => "Destroyed",
        }
    }
}

/// What a key is: symmetric encryption (AES-256-GCM) or HMAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeySpec {
    /// AES-256-GCM with per-call derived keys.
    SymmetricDefault,
    /// HMAC with SHA-224.
    Hmac224,
    /// HMAC with SHA-256.
    Hmac256,
    /// HMAC with SHA-384.
    Hmac384,
    /// HMAC with SHA-512.
    Hmac512,
}

impl KeySpec {
    /// Parses the AWS name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SYMMETRIC_DEFAULT" => Self::SymmetricDefault,
            "HMAC_224" => Self::Hmac224,
            "HMAC_256" => Self::Hmac256,
            "HMAC_384" => Self::Hmac384,
            "HMAC_512" => Self::Hmac512,
            _ => return None,
        })
    }

    /// AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SymmetricDefault => "SYMMETRIC_DEFAULT",
            Self::Hmac224 => "HMAC_224",
            Self::Hmac256 => "HMAC_256",
            Self::Hmac384 => "HMAC_384",
            Self::Hmac512 => "HMAC_512",
        }
    }

    /// The HMAC algorithm of an HMAC key.
    pub fn mac_algorithm(self) -> Option<custody_crypto::mac::MacAlgorithm> {
        use custody_crypto::mac::MacAlgorithm::*;
        match self {
            Self::SymmetricDefault => None,
            Self::Hmac224 => Some(HmacSha224),
            Self::Hmac256 => Some(HmacSha256),
            Self::Hmac384 => Some(HmacSha384),
            Self::Hmac512 => Some(HmacSha512),
        }
    }

    /// AWS KeyUsage.
    pub fn usage(self) -> &'static str {
        if self.mac_algorithm().is_some() {
            "GENERATE_VERIFY_MAC"
        } else {
            "ENCRYPT_DECRYPT"
        }
    }

    /// Bytes of material per version.
    pub fn material_len(self) -> usize {
        self.mac_algorithm().map_or(32, |a| a.key_len())
    }
}

/// How a rotation happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationKind {
    /// By the scheduler.
    Automatic,
    /// By RotateKeyOnDemand.
    OnDemand,
}

impl RotationKind {
    /// AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationKind::Automatic => "AUTOMATIC",
            RotationKind::OnDemand => "ON_DEMAND",
        }
    }
}

/// One completed rotation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationEntry {
    /// The version that became primary.
    pub version: u32,
    /// When.
    pub at: Millis,
    /// How.
    pub kind: RotationKind,
}

/// Automatic rotation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationSettings {
    /// Whether the scheduler rotates this key.
    pub enabled: bool,
    /// Period in days (90–2560).
    pub period_days: u32,
    /// When the scheduler rotates next (if enabled).
    pub next_rotation: Option<Millis>,
}

/// A KMS key (table `keys`, row key = key id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Id.
    pub id: KeyId,
    /// Owning tenant.
    pub tenant: TenantId,
    /// Free text.
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Millis,
    /// Lifecycle state.
    pub state: KeyState,
    /// Spec.
    pub spec: KeySpec,
    /// Version used for new encryptions.
    pub primary_version: u32,
    /// Rotation settings.
    pub rotation: RotationSettings,
    /// Completed rotations, oldest first.
    pub rotations: Vec<RotationEntry>,
    /// When a pending deletion happens.
    pub deletion_date: Option<Millis>,
    /// The waiting period chosen for a pending deletion.
    pub pending_window_days: Option<u32>,
    /// When the material was destroyed.
    pub destroyed_at: Option<Millis>,
    /// The key policy document (None: the default policy). Stored and returned; enforced once
    /// key policies are evaluated (the access-control work).
    #[serde(default)]
    pub policy: Option<String>,
}

/// A wrapped key version (table `versions`, row key = `<key id>/<version:010>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Version number, from 1.
    pub version: u32,
    /// Creation time.
    pub created_at: Millis,
    /// Material wrapped under the root key (AAD: tenant, key id, version).
    #[serde(with = "b64")]
    pub wrapped: Vec<u8>,
    /// The generation of the root key that wrapped `wrapped` (1 for versions from before root
    /// rotations existed).
    #[serde(default = "crate::root::first_generation")]
    pub root_generation: u32,
    /// A ciphertext of [`canary_plaintext`] under this version, made when it was created, so a
    /// check or a restored backup can prove the version still decrypts what it encrypted.
    /// Base64; absent for versions created before canaries.
    #[serde(default)]
    pub canary: Option<String>,
    /// Encryptions under this version, as last flushed ([`crate::Kms::flush_usage`]).
    #[serde(default)]
    pub encryptions: u64,
}

/// What a version's canary decrypts to.
pub fn canary_plaintext(id: KeyId, version: u32) -> Vec<u8> {
    format!("custody canary {id}/{version}").into_bytes()
}

/// The encryption context of canaries (no request ever uses this key).
pub fn canary_context() -> custody_crypto::EncryptionContext {
    let pairs = [("custody:canary".to_string(), "v1".to_string())].into_iter().collect();
    custody_crypto::EncryptionContext::new(pairs).expect("a one-pair context is valid")
}

/// Row key of a key version.
pub fn version_row(id: KeyId, version: u32) -> String {
    // `<key id>/<version, 10 digits>`, built by hand: every Encrypt and Decrypt reads one.
    let mut row = String::with_capacity(36 + 1 + 10);
    row.push_str(id.hyphenated(&mut [0u8; uuid::fmt::Hyphenated::LENGTH]));
    row.push('/');
    let (mut digits, mut rest) = ([b'0'; 10], version);
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    row.push_str(std::str::from_utf8(&digits).expect("ASCII digits"));
    row
}

/// An alias (table `aliases`, row key = `<tenant>/<alias name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AliasRecord {
    /// Full alias name.
    pub name: String,
    /// Target key.
    pub key_id: KeyId,
    /// Creation time.
    pub created_at: Millis,
    /// Last retarget.
    pub updated_at: Millis,
}

/// Built-in roles (docs/ACCESS.md has the table). A role says what kind of action a principal
/// may take at all; for actions on a key, the key's policy or a grant must also allow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages the principals of its tenant (and their credentials).
    TenantAdmin,
    /// Creates and manages keys: policy, rotation, enable/disable, deletion, aliases, tags,
    /// grants. No cryptographic operation.
    KeyAdmin,
    /// Uses keys that a key policy or grant opens to it.
    KeyUser,
    /// Reads the audit trail and asks who can do what.
    Auditor,
    /// Seal and unseal, tenants, backup and root rotation.
    SecurityOfficer,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [Role::TenantAdmin, Role::KeyAdmin, Role::KeyUser, Role::Auditor, Role::SecurityOfficer];

    /// The role's name (`key-admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::TenantAdmin => "tenant-admin",
            Role::KeyAdmin => "key-admin",
            Role::KeyUser => "key-user",
            Role::Auditor => "auditor",
            Role::SecurityOfficer => "security-officer",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A principal (table `principals`, row key = `<tenant>/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrincipalRecord {
    /// Tenant.
    pub tenant: TenantId,
    /// Name.
    pub name: PrincipalName,
    /// Roles.
    pub roles: Vec<Role>,
    /// Disabled principals cannot authenticate.
    pub enabled: bool,
    /// Creation time.
    pub created_at: Millis,
}

/// A tenant (table `tenants`, row key = tenant id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Id.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Creation time.
    pub created_at: Millis,
}

/// The internal CA (table `pki`, row key `ca`). The row is sealed by the barrier like every other.
#[derive(Serialize, Deserialize)]
pub(crate) struct CaRecord {
    pub cert_pem: String,
    /// PKCS#8 PEM. Only ever stored inside a sealed row; wiped from memory when dropped.
    pub key_pem: zeroize::Zeroizing<String>,
    pub serial: String,
    pub not_after: Millis,
}

/// DescribeKey's KeyMetadata, with AWS's field names.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadata {
    #[serde(rename = "AWSAccountId")]
    /// Tenant.
    pub aws_account_id: String,
    /// Key id.
    pub key_id: String,
    /// Key ARN.
    pub arn: String,
    /// Seconds since epoch.
    pub creation_date: f64,
    /// Whether the key is Enabled.
    pub enabled: bool,
    /// Description.
    pub description: String,
    /// `ENCRYPT_DECRYPT`.
    pub key_usage: &'static str,
    /// State name.
    pub key_state: &'static str,
    /// Pending deletion date.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<f64>,
    /// Pending deletion window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_deletion_window_in_days: Option<u32>,
    /// `AWS_KMS`.
    pub origin: &'static str,
    /// `CUSTOMER`.
    pub key_manager: &'static str,
    /// Deprecated AWS twin of KeySpec.
    pub customer_master_key_spec: &'static str,
    /// Key spec.
    pub key_spec: &'static str,
    /// Supported encryption algorithms (encryption keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_algorithms: Option<Vec<&'static str>>,
    /// Supported MAC algorithms (HMAC keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac_algorithms: Option<Vec<&'static str>>,
    /// Always false.
    pub multi_region: bool,
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
