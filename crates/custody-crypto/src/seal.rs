//! The one sealing construction custody uses for everything it encrypts.
//!
//! ```text
//! sealed = salt (32 random bytes) || AES-256-GCM(k, n, aad, plaintext) || tag (16)
//! k || n = HKDF-SHA256(ikm = master key, salt = salt, info = label), 32 + 12 bytes
//! ```
//!
//! Every call derives a fresh key and nonce from a fresh 256-bit salt, as AWS KMS does for its
//! ciphertexts, so the same master key can seal far more than the 2^32 messages NIST SP 800-38D
//! allows for random 96-bit nonces under one key: a collision needs two equal 256-bit salts. The
//! label separates uses (blob, row, key wrapping) so that a ciphertext of one kind never opens as
//! another.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

use crate::random;
use crate::secret::SecretBytes;

/// Bytes of random salt at the start of every sealed value.
pub const SALT_LEN: usize = 32;
/// Bytes of GCM tag at the end of every sealed value.
pub const TAG_LEN: usize = 16;
/// The smallest sealed value (empty plaintext).
pub const OVERHEAD: usize = SALT_LEN + TAG_LEN;

/// A sealed value did not open: wrong key, wrong associated data, or changed bytes.
///
/// Deliberately carries no detail (which of these it was is exactly what an attacker would like
/// to learn).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sealed value could not be opened (wrong key, wrong context or changed bytes)")]
pub struct OpenError;

/// Seals `plaintext` under `master`, binding `aad`.
pub(crate) fn seal(master: &[u8], label: &[u8], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let salt: [u8; SALT_LEN] = random::array();
    let (key, nonce) = derive(master, &salt, label);
    let body = gcm_seal(&key[..], nonce, aad, plaintext);
    let mut out = Vec::with_capacity(SALT_LEN + body.len());
    out.extend_from_slice(&salt);
    out.extend_from_slice(&body);
    out
}

/// Opens a value made by [`seal`] with the same `master`, `label` and `aad`.
pub(crate) fn open(master: &[u8], label: &[u8], aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, OpenError> {
    if sealed.len() < OVERHEAD {
        return Err(OpenError);
    }
    let (salt, body) = sealed.split_at(SALT_LEN);
    let (key, nonce) = derive(master, salt, label);
    gcm_open(&key[..], nonce, aad, body)
}

/// One-time key and nonce for one seal.
fn derive(master: &[u8], salt: &[u8], label: &[u8]) -> (Zeroizing<[u8; 32]>, [u8; 12]) {
    let mut okm = Zeroizing::new([0u8; 44]);
    hkdf_sha256(master, salt, &[label], &mut okm[..])
        .expect("44 bytes is far below HKDF-SHA256's 8160-byte output limit");
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&okm[..32]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    (key, nonce)
}

/// AES-GCM (128- or 256-bit key, 96-bit nonce, 128-bit tag): `ciphertext || tag`.
pub(crate) fn gcm_seal(key: &[u8], nonce: [u8; 12], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut buf = plaintext.to_vec();
    gcm_key(key)
        // The nonce is unique by construction: every derived key is used exactly once.
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .expect("AES-GCM sealing cannot fail for inputs below 64 GiB");
    buf
}

/// Opens `ciphertext || tag` made by [`gcm_seal`].
pub(crate) fn gcm_open(key: &[u8], nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Result<SecretBytes, OpenError> {
    let mut buf = Zeroizing::new(sealed.to_vec());
    let len = gcm_key(key)
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
        .map_err(|_| OpenError)?
        .len();
    buf.truncate(len);
    Ok(SecretBytes::new(std::mem::take(&mut *buf)))
}

fn gcm_key(key: &[u8]) -> LessSafeKey {
    let alg = if key.len() == 16 { &AES_128_GCM } else { &AES_256_GCM };
    LessSafeKey::new(UnboundKey::new(alg, key).expect("callers pass 16- or 32-byte keys"))
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869): extract with `salt`, expand with `info` into `out`. Fails only when
/// `out` is longer than 255 hash lengths (8160 bytes).
pub(crate) fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), ()> {
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(info, Len(out.len()))
        .and_then(|o| o.fill(out))
        .map_err(|_| ())
}

/// HKDF-SHA256 with a fixed salt: derives subkeys from a root or version key.
pub(crate) fn derive_subkey(ikm: &[u8], salt: &[u8], info: &[&[u8]], out: &mut [u8]) {
    hkdf_sha256(ikm, salt, info, out).expect("subkeys are far below HKDF-SHA256's output limit");
}

/// Appends a length-prefixed field (u16 big-endian length). Callers bound lengths first.
pub(crate) fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    let len = u16::try_from(field.len()).expect("AAD fields are bounded below 64 KiB by callers");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(field);
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABEL: &[u8] = b"custody/test";

    #[test]
    fn round_trip_and_every_tamper_fails() {
        let master = [7u8; 32];
        let sealed = seal(&master, LABEL, b"aad", b"attack at dawn");
        assert_eq!(sealed.len(), OVERHEAD + 14);
        let opened = open(&master, LABEL, b"aad", &sealed).unwrap();
        assert_eq!(opened.expose_secret(), b"attack at dawn");

        assert_eq!(open(&master, LABEL, b"aaD", &sealed).unwrap_err(), OpenError);
        assert!(open(&master, b"custody/other", b"aad", &sealed).is_err());
        assert!(open(&[8u8; 32], LABEL, b"aad", &sealed).is_err());
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(open(&master, LABEL, b"aad", &t).is_err(), "flip at {i} went unnoticed");
        }
        for cut in 0..sealed.len() {
            assert!(open(&master, LABEL, b"aad", &sealed[..cut]).is_err());
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(open(&master, LABEL, b"aad", &longer).is_err());
    }

    #[test]
    fn two_seals_of_the_same_plaintext_differ() {
        let master = [1u8; 32];
        assert_ne!(seal(&master, LABEL, b"", b"x"), seal(&master, LABEL, b"", b"x"));
    }
}
