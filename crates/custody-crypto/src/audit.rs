//! Cryptography of the audit trail: the record hash chain, checkpoint signatures (Ed25519) and
//! the HMAC that hides encryption-context values while keeping them searchable.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair};
use aws_lc_rs::{digest, hmac};

use crate::keys::RootKey;
use crate::seal;
use crate::secret::SecretBytes;

/// Domain separation of record hashes.
const RECORD_HASH_LABEL: &[u8] = b"custody/v1/audit-record";
/// Domain separation of checkpoint signatures.
const CHECKPOINT_LABEL: &[u8] = b"custody/v1/audit-checkpoint";
/// Derivation label of the audit HMAC key.
const AUDIT_HMAC_LABEL: &[u8] = b"custody/v1/audit-hmac-key";

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0u8; 32];

/// `SHA-256(label || prev || record)`: each record's hash covers its predecessor's.
pub fn chain_hash(prev: &[u8; 32], record: &[u8]) -> [u8; 32] {
    chain_hash_parts(prev, &[record])
}

/// [`chain_hash`] of a record given in pieces (their concatenation), so that a caller can hash
/// an encoding it assembles from parts without copying them together first.
pub fn chain_hash_parts(prev: &[u8; 32], record: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(RECORD_HASH_LABEL);
    ctx.update(prev);
    for part in record {
        ctx.update(part);
    }
    ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// What a checkpoint signs: the sequence number and hash of the last record it covers, and when.
pub fn checkpoint_message(seq: u64, hash: &[u8; 32], time_ms: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_LABEL.len() + 48);
    m.extend_from_slice(CHECKPOINT_LABEL);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

/// The Ed25519 key that signs checkpoints. Its PKCS#8 form is kept only in a sealed row.
pub struct AuditSigningKey(Ed25519KeyPair);

impl fmt::Debug for AuditSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigningKey").field("public", &hex_lower(self.public_key())).finish_non_exhaustive()
    }
}

impl AuditSigningKey {
    /// A new key and its PKCS#8 encoding (to store sealed).
    pub fn generate() -> (Self, SecretBytes) {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("Ed25519 key generation cannot fail");
        let pkcs8 = SecretBytes::copy_from(doc.as_ref());
        (Self(Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("freshly generated PKCS#8 parses")), pkcs8)
    }

    /// From the stored PKCS#8 encoding.
    pub fn from_pkcs8(pkcs8: &SecretBytes) -> Option<Self> {
        Ed25519KeyPair::from_pkcs8(pkcs8.expose_secret()).ok().map(Self)
    }

    /// The public key (32 bytes).
    pub fn public_key(&self) -> &[u8] {
        self.0.public_key().as_ref()
    }

    /// Signs a checkpoint message.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).as_ref().to_vec()
    }
}

/// Whether `sig` is a valid Ed25519 signature of `message` by `public_key`.
pub fn verify_checkpoint(public_key: &[u8], message: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key).verify(message, sig).is_ok()
}

/// The key that turns encryption-context values into searchable, non-reversible tokens.
pub struct AuditHmacKey(hmac::Key);

impl fmt::Debug for AuditHmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditHmacKey").finish_non_exhaustive()
    }
}

impl RootKey {
    /// The audit HMAC key, derived from the root key (until a root rotation stores it: then
    /// [`AuditHmacKey::from_secret`] of the stored bytes, so that tokens stay the same).
    pub fn audit_hmac_key(&self) -> AuditHmacKey {
        AuditHmacKey::from_secret(&self.audit_hmac_secret())
    }

    /// The bytes of [`RootKey::audit_hmac_key`], for a root rotation to store (sealed).
    pub fn audit_hmac_secret(&self) -> SecretBytes {
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        seal::derive_subkey(self.expose_secret(), b"custody/v1/root-derivation", &[AUDIT_HMAC_LABEL], &mut k[..]);
        SecretBytes::copy_from(&k[..])
    }
}

impl AuditHmacKey {
    /// The key from its bytes (as [`RootKey::audit_hmac_secret`] gave them).
    pub fn from_secret(bytes: &SecretBytes) -> Self {
        AuditHmacKey(hmac::Key::new(hmac::HMAC_SHA256, bytes.expose_secret()))
    }

    /// `hmac-sha256:<hex>` of a value.
    pub fn token(&self, value: &str) -> String {
        format!("hmac-sha256:{}", hex_lower(hmac::sign(&self.0, value.as_bytes()).as_ref()))
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_and_checkpoints() {
        let h1 = chain_hash(&GENESIS, b"{\"seq\":1}");
        let h2 = chain_hash(&h1, b"{\"seq\":2}");
        assert_ne!(h1, h2);
        assert_ne!(chain_hash(&GENESIS, b"{\"seq\":2}"), h2, "the predecessor is covered");
        let (key, pkcs8) = AuditSigningKey::generate();
        let msg = checkpoint_message(2, &h2, 1_700_000_000_000);
        let sig = key.sign(&msg);
        assert!(verify_checkpoint(key.public_key(), &msg, &sig));
        assert!(!verify_checkpoint(key.public_key(), &checkpoint_message(3, &h2, 1_700_000_000_000), &sig));
        let again = AuditSigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn context_tokens_are_stable_per_root_and_hide_values() {
        let root = RootKey::generate();
        let t = root.audit_hmac_key().token("acme-corp");
        assert_eq!(t, root.audit_hmac_key().token("acme-corp"));
        assert!(t.starts_with("hmac-sha256:") && !t.contains("acme"));
        assert_ne!(t, RootKey::generate().audit_hmac_key().token("acme-corp"));
    }
}
