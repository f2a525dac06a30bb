//! The encryption context: non-secret key/value pairs bound to a ciphertext as AAD.

use std::collections::BTreeMap;

/// Most pairs an encryption context may hold.
pub const MAX_PAIRS: usize = 64;
/// Most bytes of the canonical serialization (keys, values and length prefixes together).
pub const MAX_SERIALIZED_LEN: usize = 8192;

/// An encryption context, kept sorted so its serialization is canonical.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

/// Why an encryption context was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// More than [`MAX_PAIRS`] pairs.
    #[error("the encryption context has more than {MAX_PAIRS} pairs")]
    TooManyPairs,
    /// A key was empty.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// The serialized context exceeds [`MAX_SERIALIZED_LEN`] bytes.
    #[error("the encryption context is larger than {MAX_SERIALIZED_LEN} bytes")]
    TooLarge,
}

impl EncryptionContext {
    /// An empty context.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Validates and takes `pairs`.
    pub fn new(pairs: BTreeMap<String, String>) -> Result<Self, ContextError> {
        if pairs.len() > MAX_PAIRS {
            return Err(ContextError::TooManyPairs);
        }
        if pairs.keys().any(String::is_empty) {
            return Err(ContextError::EmptyKey);
        }
        let size: usize = 2 + pairs.iter().map(|(k, v)| 4 + k.len() + v.len()).sum::<usize>();
        if size > MAX_SERIALIZED_LEN {
            return Err(ContextError::TooLarge);
        }
        Ok(Self(pairs))
    }

    /// The pairs, sorted by key.
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Canonical bytes: pair count (u16), then for each pair in key order the key and the value,
    /// each as a u16 big-endian length and UTF-8 bytes (the AWS Encryption SDK's serialization).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let count = u16::try_from(self.0.len()).expect("bounded by MAX_PAIRS");
        out.extend_from_slice(&count.to_be_bytes());
        for (k, v) in &self.0 {
            crate::seal::put_field(&mut out, k.as_bytes());
            crate::seal::put_field(&mut out, v.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> Result<EncryptionContext, ContextError> {
        EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn canonical_form_is_independent_of_insertion_order() {
        let a = ctx(&[("b", "2"), ("a", "1")]).unwrap();
        let b = ctx(&[("a", "1"), ("b", "2")]).unwrap();
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(a.canonical_bytes(), b"\x00\x02\x00\x01a\x00\x011\x00\x01b\x00\x012");
    }

    #[test]
    fn limits() {
        assert_eq!(ctx(&[("", "x")]).unwrap_err(), ContextError::EmptyKey);
        let many: Vec<(String, String)> = (0..65).map(|i| (i.to_string(), String::new())).collect();
        assert_eq!(EncryptionContext::new(many.into_iter().collect()).unwrap_err(), ContextError::TooManyPairs);
        let big = "v".repeat(MAX_SERIALIZED_LEN);
        assert_eq!(ctx(&[("k", &big)]).unwrap_err(), ContextError::TooLarge);
        assert!(ctx(&[("k", "")]).is_ok(), "empty values are allowed, as in AWS KMS");
    }
}
