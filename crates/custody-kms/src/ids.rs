//! Parsed identifiers: tenants, keys, aliases, principals, and the ARNs that name them.
//!
//! Parse, don't validate: once a value has one of these types it is well-formed.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::KmsError;

/// A tenant: an AWS account id, 12 decimal digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    /// Parses 12 ASCII digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())).then(|| Self(s.to_string()))
    }

    /// A random tenant id (never starting with 0, so it reads as a number too).
    pub fn random() -> Self {
        let bytes: [u8; 8] = custody_crypto::random::array();
        let n = 100_000_000_000 + u64::from_le_bytes(bytes) % 900_000_000_000;
        Self(n.to_string())
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("not a 12-digit account id: {s:?}"))
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A KMS key id (a UUID, as AWS uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(Uuid);

impl KeyId {
    /// A fresh random key id.
    pub fn random() -> Self {
        Self(uuid::Builder::from_random_bytes(custody_crypto::random::array()).into_uuid())
    }

    /// Parses the hyphenated UUID form.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 36).then(|| Uuid::try_parse(s).ok().map(Self)).flatten()
    }

    /// From the 16 bytes stored in a ciphertext blob.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// The 16 bytes stored in a ciphertext blob.
    pub fn to_bytes(self) -> [u8; 16] {
        *self.0.as_bytes()
    }
}

impl KeyId {
    /// The id's text (lower-case hyphenated UUID) in `buf`, without `fmt`'s machinery.
    pub fn hyphenated<'b>(&self, buf: &'b mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// An alias name, `alias/` followed by 1–250 of `[A-Za-z0-9/_-]`; `alias/aws/` is reserved.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AliasName(String);

impl AliasName {
    /// Parses and validates an alias name (AWS rules).
    pub fn parse(s: &str) -> Result<Self, KmsError> {
        let invalid = |why: &str| KmsError::InvalidAliasName(format!("alias name {s:?} is invalid: {why}"));
        let rest = s.strip_prefix("alias/").ok_or_else(|| invalid("it must start with alias/"))?;
        if rest.is_empty() || s.len() > 256 {
            return Err(invalid("it must have 1 to 250 characters after alias/"));
        }
        if !rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-')) {
            return Err(invalid("only letters, digits, '/', '_' and '-' are allowed"));
        }
        if rest.starts_with("aws/") {
            return Err(invalid("the alias/aws/ prefix is reserved"));
        }
        Ok(Self(s.to_string()))
    }

    /// The full name, including `alias/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AliasName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A principal's name within its tenant: 1–64 of `[A-Za-z0-9._@+=,-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PrincipalName(String);

impl PrincipalName {
    /// Parses a principal name (IAM user-name characters).
    pub fn parse(s: &str) -> Option<Self> {
        let ok =
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@+=,-".contains(&b));
        ok.then(|| Self(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PrincipalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a request names a key: what AWS accepts in `KeyId` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRef {
    /// `1234abcd-...`
    Id(KeyId),
    /// `arn:aws:kms:<region>:<account>:key/<id>`
    KeyArn {
        /// region in the ARN
        region: String,
        /// account in the ARN
        tenant: TenantId,
        /// key id
        id: KeyId,
    },
    /// `alias/name`
    Alias(AliasName),
    /// `arn:aws:kms:<region>:<account>:alias/name`
    AliasArn {
        /// region in the ARN
        region: String,
        /// account in the ARN
        tenant: TenantId,
        /// alias
        alias: AliasName,
    },
}

impl KeyRef {
    /// Parses any of the four forms. `field` names the request field for the error.
    pub fn parse(s: &str, field: &str) -> Result<Self, KmsError> {
        if s.is_empty() || s.len() > 2048 {
            return Err(KmsError::validation(field, "must have length between 1 and 2048"));
        }
        if let Some(id) = KeyId::parse(s) {
            return Ok(KeyRef::Id(id));
        }
        if s.starts_with("alias/") {
            return Ok(KeyRef::Alias(
                AliasName::parse(s).map_err(|_| KmsError::NotFound(format!("Alias {s} is not found.")))?,
            ));
        }
        if let Some(rest) = s.strip_prefix("arn:aws:kms:") {
            let mut parts = rest.splitn(3, ':');
            let (region, account, resource) = (parts.next(), parts.next(), parts.next());
            if let (Some(region), Some(tenant), Some(resource)) = (region, account.and_then(TenantId::parse), resource)
            {
                if let Some(id) = resource.strip_prefix("key/").and_then(KeyId::parse) {
                    return Ok(KeyRef::KeyArn { region: region.to_string(), tenant, id });
                }
                if resource.starts_with("alias/") {
                    if let Ok(alias) = AliasName::parse(resource) {
                        return Ok(KeyRef::AliasArn { region: region.to_string(), tenant, alias });
                    }
                }
            }
        }
        Err(KmsError::NotFound(format!("Invalid keyId '{s}'")))
    }
}

/// `arn:aws:kms:<region>:<account>:key/<id>`
pub fn key_arn(region: &str, tenant: &TenantId, id: KeyId) -> String {
    // Built by hand: every key operation makes it (for the policy and the answer), and
    // `format!` through `Display` cost ~1.5 % of an Encrypt's instructions.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = id.hyphenated(&mut buf);
    let parts = ["arn:aws:kms:", region, ":", tenant.as_str(), ":key/", id];
    let mut arn = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|p| arn.push_str(p));
    arn
}

/// `arn:aws:kms:<region>:<account>:alias/name`
pub fn alias_arn(region: &str, tenant: &TenantId, alias: &AliasName) -> String {
    format!("arn:aws:kms:{region}:{tenant}:{alias}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_refs_in_every_form() {
        let id = KeyId::random();
        let t = TenantId::parse("111122223333").unwrap();
        assert_eq!(KeyRef::parse(&id.to_string(), "KeyId").unwrap(), KeyRef::Id(id));
        assert!(
            matches!(KeyRef::parse(&key_arn("us-east-1", &t, id), "KeyId").unwrap(), KeyRef::KeyArn { id: i, .. } if i == id)
        );
        assert!(matches!(KeyRef::parse("alias/app", "KeyId").unwrap(), KeyRef::Alias(_)));
        assert!(matches!(
            KeyRef::parse("arn:aws:kms:us-east-1:111122223333:alias/app", "KeyId").unwrap(),
            KeyRef::AliasArn { .. }
        ));
        for bad in ["nope", "arn:aws:kms:us-east-1:1:key/x", "arn:aws:kms:us-east-1:111122223333:key/x"] {
            assert!(matches!(KeyRef::parse(bad, "KeyId"), Err(KmsError::NotFound(_))), "{bad}");
        }
        assert!(matches!(KeyRef::parse("", "KeyId"), Err(KmsError::Validation { .. })));
    }

    #[test]
    fn arns_and_version_rows_are_the_text_they_always_were() {
        // Built by hand for speed; stored rows and clients depend on the exact text.
        let t = TenantId::parse("111122223333").unwrap();
        for _ in 0..100 {
            let id = KeyId::random();
            assert_eq!(key_arn("eu-west-3", &t, id), format!("arn:aws:kms:eu-west-3:{t}:key/{id}"));
            for v in [0, 1, 7, 42, 1_000_000, 999_999_999, u32::MAX] {
                assert_eq!(crate::model::version_row(id, v), format!("{id}/{v:010}"));
            }
        }
    }

    #[test]
    fn alias_rules() {
        assert!(AliasName::parse("alias/my-app/prod_1").is_ok());
        for bad in ["my-app", "alias/", "alias/aws/x", "alias/sp ace", "alias/é"] {
            assert!(AliasName::parse(bad).is_err(), "{bad}");
        }
        assert!(AliasName::parse(&format!("alias/{}", "a".repeat(251))).is_err());
    }

    #[test]
    fn tenant_ids() {
        assert!(TenantId::parse("012345678901").is_some());
        assert!(TenantId::parse("12345678901").is_none());
        assert!(TenantId::parse("12345678901a").is_none());
        for _ in 0..100 {
            assert!(TenantId::parse(TenantId::random().as_str()).is_some());
        }
    }
}
