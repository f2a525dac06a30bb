//! AWS Signature Version 4 primitives: the signing-key chain, the signature, and a constant-time
//! check. Building the canonical request from HTTP is the server's job; this module only touches
//! the secret.

use std::fmt;

use aws_lc_rs::{digest, hmac};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::SecretBytes;

/// The derived key for one (date, region, service): `kSigning` in AWS's documentation.
pub struct SigningKey(hmac::Key);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
pub fn signing_key(secret: &SecretBytes, date: &str, region: &str, service: &str) -> SigningKey {
    let mut k = Zeroizing::new(Vec::with_capacity(4 + secret.len()));
    k.extend_from_slice(b"AWS4");
    k.extend_from_slice(secret.expose_secret());
    let mut key = Zeroizing::new(k.to_vec());
    for part in [date.as_bytes(), region.as_bytes(), service.as_bytes(), b"aws4_request"] {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &key), part);
        key = Zeroizing::new(tag.as_ref().to_vec());
    }
    SigningKey(hmac::Key::new(hmac::HMAC_SHA256, &key))
}

/// The signature of `string_to_sign`.
pub fn sign(key: &SigningKey, string_to_sign: &[u8]) -> [u8; 32] {
    hmac::sign(&key.0, string_to_sign).as_ref().try_into().expect("HMAC-SHA256 is 32 bytes")
}

/// Whether `signature` (raw bytes) is the signature of `string_to_sign`, in constant time.
pub fn verify(key: &SigningKey, string_to_sign: &[u8], signature: &[u8]) -> bool {
    let expected = sign(key, string_to_sign);
    signature.len() == expected.len() && bool::from(expected.as_slice().ct_eq(signature))
}

/// Lowercase hex SHA-256 (payload hash, canonical request hash).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example ("Create a signed AWS API request", IAM ListUsers).
    #[test]
    fn aws_documentation_example() {
        let canonical = "GET\n/\nAction=ListUsers&Version=2010-05-08\ncontent-type:application/x-www-form-urlencoded; charset=utf-8\nhost:iam.amazonaws.com\nx-amz-date:20150830T123600Z\n\ncontent-type;host;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let hash = sha256_hex(canonical.as_bytes());
        assert_eq!(hash, "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59");
        let sts = format!("AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\n{hash}");
        let key = signing_key(
            &SecretBytes::copy_from(b"wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            "20150830",
            "us-east-1",
            "iam",
        );
        let sig = sign(&key, sts.as_bytes());
        assert_eq!(hex::encode(sig), "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7");
        assert!(verify(&key, sts.as_bytes(), &sig));
        let mut bad = sig;
        bad[31] ^= 1;
        assert!(!verify(&key, sts.as_bytes(), &bad));
        assert!(!verify(&key, sts.as_bytes(), &sig[..31]));
    }
}
