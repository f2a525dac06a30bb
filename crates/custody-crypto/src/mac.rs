//! HMAC for KMS keys of spec HMAC_224/256/384/512 (GenerateMac / VerifyMac).
//!
//! Plain HMAC (RFC 2104) of the message with the key version's material, as AWS KMS computes
//! it, so a MAC verifies anywhere the same key material exists.

use aws_lc_rs::hmac;

use crate::keys::KeyMaterial;

/// The four HMAC algorithms, by AWS name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacAlgorithm {
    /// HMAC_SHA_224
    HmacSha224,
    /// HMAC_SHA_256
    HmacSha256,
    /// HMAC_SHA_384
    HmacSha384,
    /// HMAC_SHA_512
    HmacSha512,
}

impl MacAlgorithm {
    /// Parses the AWS name (`HMAC_SHA_256`).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "HMAC_SHA_224" => Self::HmacSha224,
            "HMAC_SHA_256" => Self::HmacSha256,
            "HMAC_SHA_384" => Self::HmacSha384,
            "HMAC_SHA_512" => Self::HmacSha512,
            _ => return None,
        })
    }

    /// The AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HmacSha224 => "HMAC_SHA_224",
            Self::HmacSha256 => "HMAC_SHA_256",
            Self::HmacSha384 => "HMAC_SHA_384",
            Self::HmacSha512 => "HMAC_SHA_512",
        }
    }

    /// Key material length for keys of this algorithm (the hash length, as AWS uses).
    pub fn key_len(self) -> usize {
        match self {
            Self::HmacSha224 => 28,
            Self::HmacSha256 => 32,
            Self::HmacSha384 => 48,
            Self::HmacSha512 => 64,
        }
    }

    fn aws_lc(self) -> hmac::Algorithm {
        match self {
            Self::HmacSha224 => hmac::HMAC_SHA224,
            Self::HmacSha256 => hmac::HMAC_SHA256,
            Self::HmacSha384 => hmac::HMAC_SHA384,
            Self::HmacSha512 => hmac::HMAC_SHA512,
        }
    }
}

/// The MAC of `message`.
pub fn sign(alg: MacAlgorithm, material: &KeyMaterial, message: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(alg.aws_lc(), material.0.expose_secret()), message).as_ref().to_vec()
}

/// Whether `mac` is the MAC of `message` (constant time).
pub fn verify(alg: MacAlgorithm, material: &KeyMaterial, message: &[u8], mac: &[u8]) -> bool {
    hmac::verify(&hmac::Key::new(alg.aws_lc(), material.0.expose_secret()), message, mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretBytes;

    /// RFC 4231 test case 2 ("Jefe").
    #[test]
    fn rfc4231_case_2() {
        let key = KeyMaterial(SecretBytes::copy_from(b"Jefe"));
        let msg = b"what do ya want for nothing?";
        assert_eq!(
            hex::encode(sign(MacAlgorithm::HmacSha256, &key, msg)),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(sign(MacAlgorithm::HmacSha224, &key, msg)),
            "a30e01098bc6dbbf45690f3a7e9e6d0f8bbea2a39e6148008fd05e44"
        );
        let mac = sign(MacAlgorithm::HmacSha512, &key, msg);
        assert!(verify(MacAlgorithm::HmacSha512, &key, msg, &mac));
        assert!(!verify(MacAlgorithm::HmacSha384, &key, msg, &mac));
        assert!(!verify(MacAlgorithm::HmacSha512, &key, b"other", &mac));
        assert!(!verify(MacAlgorithm::HmacSha512, &key, msg, &mac[..63]));
    }
}
