//! The KMS ciphertext blob: what Encrypt returns and Decrypt accepts.
//!
//! ```text
//! offset  size  field
//! 0       1     format, 0x01 (custody blob v1)
//! 1       16    key id (UUID, big-endian bytes)
//! 17      4     key version (u32 big-endian)
//! 21      32    salt                 \
//! 53      n     AES-256-GCM ciphertext > crate::seal, master = the version's key material
//! 53+n    16    tag                  /
//! AAD = header (bytes 0..21) || canonical encryption context
//! ```
//!
//! The blob names its key and version, so Decrypt needs no KeyId and rotation keeps every older
//! version usable. Everything a caller can change is authenticated: header bytes through the AAD,
//! the salt through the key derivation.

use crate::context::EncryptionContext;
use crate::keys::KeyMaterial;
use crate::seal::{self, OpenError};
use crate::secret::SecretBytes;

/// Format byte of version 1 blobs.
pub const FORMAT_V1: u8 = 0x01;
/// Length of the plaintext header.
pub const HEADER_LEN: usize = 21;
/// Smallest well-formed blob (empty plaintext).
pub const MIN_LEN: usize = HEADER_LEN + seal::OVERHEAD;
/// Seal label of blob encryption.
const BLOB_LABEL: &[u8] = b"custody/v1/kms-blob";

/// The plaintext header of a blob: which key version made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// Key id as 16 UUID bytes.
    pub key_id: [u8; 16],
    /// Key version number (1-based).
    pub version: u32,
}

/// Why a blob was refused. Callers map both to one opaque error for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Not a custody blob: too short or an unknown format byte.
    #[error("not a custody ciphertext blob")]
    Malformed,
    /// Well-formed but does not authenticate (changed bytes, wrong context, wrong key).
    #[error(transparent)]
    Unauthentic(#[from] OpenError),
}

impl BlobHeader {
    /// Reads the header, without authenticating anything yet.
    pub fn parse(blob: &[u8]) -> Result<Self, BlobError> {
        if blob.len() < MIN_LEN {
            return Err(BlobError::Malformed);
        }
        Self::peek(blob)
    }

    /// Reads the header from a blob's first [`HEADER_LEN`] bytes, whatever follows them (the
    /// audit trail names the key of a blob it only glanced at). [`BlobHeader::parse`] also
    /// checks the blob is long enough to be one.
    pub fn peek(prefix: &[u8]) -> Result<Self, BlobError> {
        if prefix.len() < HEADER_LEN || prefix[0] != FORMAT_V1 {
            return Err(BlobError::Malformed);
        }
        let mut key_id = [0u8; 16];
        key_id.copy_from_slice(&prefix[1..17]);
        let version = u32::from_be_bytes(prefix[17..21].try_into().expect("4 bytes"));
        Ok(Self { key_id, version })
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = FORMAT_V1;
        out[1..17].copy_from_slice(&self.key_id);
        out[17..21].copy_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// Encrypts `plaintext` under a key version, binding `context`.
pub fn encrypt(material: &KeyMaterial, header: BlobHeader, context: &EncryptionContext, plaintext: &[u8]) -> Vec<u8> {
    let head = header.encode();
    let sealed = seal::seal(material.0.expose_secret(), BLOB_LABEL, &aad(&head, context), plaintext);
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&sealed);
    out
}

/// Decrypts a blob made by [`encrypt`] with the material of the version its header names.
pub fn decrypt(material: &KeyMaterial, blob: &[u8], context: &EncryptionContext) -> Result<SecretBytes, BlobError> {
    BlobHeader::parse(blob)?;
    let (head, sealed) = blob.split_at(HEADER_LEN);
    Ok(seal::open(material.0.expose_secret(), BLOB_LABEL, &aad(head, context), sealed)?)
}

fn aad(head: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let ctx = context.canonical_bytes();
    let mut out = Vec::with_capacity(head.len() + ctx.len());
    out.extend_from_slice(head);
    out.extend_from_slice(&ctx);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ctx(k: &str, v: &str) -> EncryptionContext {
        EncryptionContext::new(BTreeMap::from([(k.to_string(), v.to_string())])).unwrap()
    }

    #[test]
    fn round_trip_names_its_version() {
        let m = KeyMaterial::generate(32);
        let header = BlobHeader { key_id: [9; 16], version: 3 };
        let blob = encrypt(&m, header, &ctx("purpose", "test"), b"secret");
        assert_eq!(BlobHeader::parse(&blob).unwrap(), header);
        assert_eq!(blob.len(), MIN_LEN + 6);
        let pt = decrypt(&m, &blob, &ctx("purpose", "test")).unwrap();
        assert_eq!(pt.expose_secret(), b"secret");
    }

    #[test]
    fn wrong_context_and_every_flipped_byte_fail() {
        let m = KeyMaterial::generate(32);
        let blob = encrypt(&m, BlobHeader { key_id: [1; 16], version: 1 }, &ctx("a", "1"), b"x");
        assert!(matches!(decrypt(&m, &blob, &ctx("a", "2")), Err(BlobError::Unauthentic(_))));
        assert!(decrypt(&m, &blob, &EncryptionContext::empty()).is_err());
        for i in 0..blob.len() {
            let mut t = blob.clone();
            t[i] ^= 0x80;
            assert!(decrypt(&m, &t, &ctx("a", "1")).is_err(), "flip at {i}");
        }
        for cut in 0..blob.len() {
            assert!(decrypt(&m, &blob[..cut], &ctx("a", "1")).is_err(), "truncated to {cut}");
        }
        let mut extended = blob.clone();
        extended.extend_from_slice(b"\0");
        assert!(decrypt(&m, &extended, &ctx("a", "1")).is_err());
    }

    #[test]
    fn another_versions_material_does_not_open() {
        let v1 = KeyMaterial::generate(32);
        let v2 = KeyMaterial::generate(32);
        let blob = encrypt(&v1, BlobHeader { key_id: [1; 16], version: 1 }, &EncryptionContext::empty(), b"x");
        assert!(decrypt(&v2, &blob, &EncryptionContext::empty()).is_err());
    }

    #[test]
    fn short_or_foreign_input_is_malformed() {
        assert_eq!(BlobHeader::parse(&[]).unwrap_err(), BlobError::Malformed);
        assert_eq!(BlobHeader::parse(&[0x02; 100]).unwrap_err(), BlobError::Malformed);
        assert_eq!(BlobHeader::parse(&[0x01; MIN_LEN - 1]).unwrap_err(), BlobError::Malformed);
        assert_eq!(BlobHeader::peek(&[0x01; HEADER_LEN - 1]).unwrap_err(), BlobError::Malformed);
        assert_eq!(
            BlobHeader::peek(&[0x01; HEADER_LEN]).unwrap(),
            BlobHeader { key_id: [1; 16], version: 0x0101_0101 }
        );
    }
}
