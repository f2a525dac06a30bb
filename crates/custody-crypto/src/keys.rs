//! Key types: the root key, the keys derived from it, and KMS key-version material.
//!
//! Each is its own type so that a barrier key can never be passed where a root key is expected;
//! none of them implements `Clone`, `PartialEq`, `Serialize` or a `Debug` that shows bytes.

use std::fmt;

use crate::random;
use crate::seal::{self, put_field, OpenError};
use crate::secret::{Secret32, SecretBytes};

/// HKDF salt for every key derived from the root key.
const ROOT_DERIVATION_SALT: &[u8] = b"custody/v1/root-derivation";
/// Derivation label of the storage barrier key.
const BARRIER_KEY_LABEL: &[u8] = b"custody/v1/barrier-key";
/// Derivation label of the key-version wrapping key.
const KEY_WRAPPING_KEY_LABEL: &[u8] = b"custody/v1/key-wrapping-key";
/// Derivation label of the root key's public check value.
const ROOT_CHECK_LABEL: &[u8] = b"custody/v1/root-check";
/// Seal label of a wrapped key version.
const WRAPPED_KEY_LABEL: &[u8] = b"custody/v1/wrapped-key-version";
/// Seal label of a storage-barrier row.
const ROW_LABEL: &[u8] = b"custody/v1/row";
/// Seal label of the next root key, sealed under the current one while a rotation runs.
const NEXT_ROOT_LABEL: &[u8] = b"custody/v1/next-root-key";
/// Derivation label of the backup key.
const BACKUP_KEY_LABEL: &[u8] = b"custody/v1/backup-key";
/// Seal label of a backup's payload.
const BACKUP_LABEL: &[u8] = b"custody/v1/backup";

/// The root of trust: wraps every key version and every sealed row, held only in memory after
/// unseal.
pub struct RootKey(Secret32);

impl RootKey {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// A fresh random root key.
    pub fn generate() -> Self {
        Self(Secret32(random::array()))
    }

    /// Rebuilds a root key from its bytes (a key file, recombined Shamir shares).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(Secret32(arr)))
    }

    /// The raw bytes, for the seal mechanisms only (key file, Shamir split).
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0 .0
    }

    /// A public value that lets the store confirm a candidate root key without holding it.
    pub fn check_value(&self) -> RootKeyCheck {
        let mut out = [0u8; 32];
        self.derive(ROOT_CHECK_LABEL, &mut out);
        RootKeyCheck(out)
    }

    /// The key that seals the storage barrier's rows.
    pub fn barrier_key(&self) -> BarrierKey {
        let mut out = [0u8; 32];
        self.derive(BARRIER_KEY_LABEL, &mut out);
        BarrierKey(Secret32(out))
    }

    /// Wraps a key version's material. `aad` names the version (tenant, key id, version), so a
    /// wrapped value copied to another key's row does not open there.
    pub fn wrap_key_material(&self, material: &KeyMaterial, aad: &WrapAad<'_>) -> Vec<u8> {
        let kek = self.key_wrapping_key();
        seal::seal(&kek.0, WRAPPED_KEY_LABEL, &aad.encode(), material.0.expose_secret())
    }

    /// Unwraps what [`RootKey::wrap_key_material`] made, for the same `aad`.
    pub fn unwrap_key_material(&self, wrapped: &[u8], aad: &WrapAad<'_>) -> Result<KeyMaterial, OpenError> {
        let kek = self.key_wrapping_key();
        seal::open(&kek.0, WRAPPED_KEY_LABEL, &aad.encode(), wrapped).map(KeyMaterial)
    }

    /// Seals `next`, the root key of `generation`, under this one: while a root rotation runs,
    /// whoever unseals the current root (shares, token) also gets the next, so a rotation resumes
    /// after a restart. The sealed value is deleted when the rotation finishes.
    pub fn seal_next_root(&self, next: &RootKey, generation: u32) -> Vec<u8> {
        let kek = self.key_wrapping_key();
        seal::seal(&kek.0, NEXT_ROOT_LABEL, &generation.to_be_bytes(), next.expose_secret())
    }

    /// Opens what [`RootKey::seal_next_root`] made for the same `generation`.
    pub fn open_next_root(&self, sealed: &[u8], generation: u32) -> Result<RootKey, OpenError> {
        let kek = self.key_wrapping_key();
        let bytes = seal::open(&kek.0, NEXT_ROOT_LABEL, &generation.to_be_bytes(), sealed)?;
        RootKey::from_bytes(bytes.expose_secret()).ok_or(OpenError)
    }

    /// Seals a backup's payload under a key derived from the root key, so whoever can unseal
    /// the store (Shamir shares or the key file) can open its backups, and nobody else. `header`
    /// (the backup's readable header) is bound as AAD.
    pub fn seal_backup(&self, header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut key = Secret32([0u8; 32]);
        self.derive(BACKUP_KEY_LABEL, &mut key.0);
        seal::seal(&key.0, BACKUP_LABEL, header, payload)
    }

    /// Opens what [`RootKey::seal_backup`] made, with the same header.
    pub fn open_backup(&self, header: &[u8], sealed: &[u8]) -> Result<SecretBytes, OpenError> {
        let mut key = Secret32([0u8; 32]);
        self.derive(BACKUP_KEY_LABEL, &mut key.0);
        seal::open(&key.0, BACKUP_LABEL, header, sealed)
    }

    fn key_wrapping_key(&self) -> Secret32 {
        let mut out = [0u8; 32];
        self.derive(KEY_WRAPPING_KEY_LABEL, &mut out);
        Secret32(out)
    }

    fn derive(&self, label: &[u8], out: &mut [u8; 32]) {
        seal::derive_subkey(&self.0 .0, ROOT_DERIVATION_SALT, &[label], out);
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootKey").finish_non_exhaustive()
    }
}

/// Public check value of a root key (stored; reveals nothing about the key).
#[derive(Clone, Copy)]
pub struct RootKeyCheck([u8; 32]);

impl RootKeyCheck {
    /// From stored bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The bytes to store.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `root` is the key this value was made from (constant time).
    pub fn matches(&self, root: &RootKey) -> bool {
        root.check_value_secret().ct_eq(&self.0)
    }
}

impl RootKey {
    fn check_value_secret(&self) -> Secret32 {
        Secret32(*self.check_value().as_bytes())
    }
}

impl fmt::Debug for RootKeyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootKeyCheck").finish_non_exhaustive()
    }
}

/// What a wrapped key version is bound to.
#[derive(Debug, Clone, Copy)]
pub struct WrapAad<'a> {
    /// Tenant (account) id.
    pub tenant: &'a str,
    /// Key id (UUID text).
    pub key_id: &'a str,
    /// Version number.
    pub version: u32,
}

impl WrapAad<'_> {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        put_field(&mut out, self.tenant.as_bytes());
        put_field(&mut out, self.key_id.as_bytes());
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// The secret material of one KMS key version.
pub struct KeyMaterial(pub(crate) SecretBytes);

impl KeyMaterial {
    /// Fresh material of `len` bytes (32 for SYMMETRIC_DEFAULT).
    pub fn generate(len: usize) -> Self {
        Self(random::secret(len))
    }

    /// Length in bytes (not secret).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for empty material (never produced by [`KeyMaterial::generate`] with a nonzero length).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes. Only tests that prove material never reaches the disk in the clear call this.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial").field("len", &self.0.len()).finish_non_exhaustive()
    }
}

/// Seals and opens storage rows (DESIGN.md §10, the storage barrier).
pub struct BarrierKey(Secret32);

impl BarrierKey {
    /// Seals a row's value, binding the table and the row key as AAD.
    pub fn seal_row(&self, table: &str, row_key: &str, value: &[u8]) -> Vec<u8> {
        seal::seal(&self.0 .0, ROW_LABEL, &row_aad(table, row_key), value)
    }

    /// Opens a row sealed by [`BarrierKey::seal_row`] for the same table and row key.
    pub fn open_row(&self, table: &str, row_key: &str, sealed: &[u8]) -> Result<SecretBytes, OpenError> {
        seal::open(&self.0 .0, ROW_LABEL, &row_aad(table, row_key), sealed)
    }
}

impl fmt::Debug for BarrierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BarrierKey").finish_non_exhaustive()
    }
}

fn row_aad(table: &str, row_key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(table.len() + row_key.len() + 4);
    put_field(&mut out, table.as_bytes());
    put_field(&mut out, row_key.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_tells_root_keys_apart() {
        let a = RootKey::generate();
        let b = RootKey::generate();
        let check = a.check_value();
        assert!(check.matches(&a));
        assert!(!check.matches(&b));
        assert_ne!(check.as_bytes(), a.expose_secret(), "the check value is not the key");
    }

    #[test]
    fn wrapped_material_is_bound_to_its_version() {
        let root = RootKey::generate();
        let material = KeyMaterial::generate(32);
        let aad = WrapAad { tenant: "111122223333", key_id: "k1", version: 1 };
        let wrapped = root.wrap_key_material(&material, &aad);
        let back = root.unwrap_key_material(&wrapped, &aad).unwrap();
        assert_eq!(back.expose_secret(), material.expose_secret());
        for other in
            [WrapAad { version: 2, ..aad }, WrapAad { key_id: "k2", ..aad }, WrapAad { tenant: "111122223334", ..aad }]
        {
            assert!(root.unwrap_key_material(&wrapped, &other).is_err());
        }
        assert!(RootKey::generate().unwrap_key_material(&wrapped, &aad).is_err());
    }

    #[test]
    fn rows_are_bound_to_table_and_key() {
        let barrier = RootKey::generate().barrier_key();
        let sealed = barrier.seal_row("keys", "a", b"{\"state\":\"Enabled\"}");
        assert!(barrier.open_row("keys", "a", &sealed).is_ok());
        assert!(barrier.open_row("keys", "b", &sealed).is_err());
        assert!(barrier.open_row("aliases", "a", &sealed).is_err());
        // The field encoding is unambiguous: ("ke", "ysa") is not ("keys", "a").
        assert!(barrier.open_row("ke", "ysa", &sealed).is_err());
    }

    #[test]
    fn debug_shows_no_bytes() {
        let root = RootKey::from_bytes(&[0x41; 32]).unwrap();
        assert_eq!(format!("{root:?}"), "RootKey { .. }");
        let m = KeyMaterial::generate(32);
        assert!(!format!("{m:?}").contains(&format!("{:?}", m.expose_secret())));
    }
}
