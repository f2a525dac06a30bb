//! The service's errors. The server maps each variant to exactly one AWS error name, in one
//! place (`custody-server`'s protocol module); nothing matches on messages.

use custody_store::StoreError;

/// Why a request failed.
///
/// Messages are safe to show the caller: they never contain key material, plaintext, or whether
/// a key exists in another tenant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The server is sealed; only status and unseal are answered.
    #[error("custody is sealed: submit unseal shares first (custody unseal)")]
    Sealed,
    /// The store has not been initialized.
    #[error("this data directory has not been initialized (custody init)")]
    NotInitialized,
    /// The request could not be authenticated (no or unknown identity, disabled principal).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    AccessDenied(String),
    /// The named resource does not exist (or is not visible to the caller: same answer).
    #[error("{0}")]
    NotFound(String),
    /// The resource already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A field failed validation.
    #[error("1 validation error detected: Value at '{field}' failed to satisfy constraint: {message}")]
    Validation {
        /// AWS field name, e.g. `plaintext`
        field: String,
        /// the constraint
        message: String,
    },
    /// An alias name is malformed or reserved.
    #[error("{0}")]
    InvalidAliasName(String),
    /// The key is disabled.
    #[error("{0}")]
    Disabled(String),
    /// The key's state does not allow the operation.
    #[error("{0}")]
    InvalidState(String),
    /// The key's usage does not allow the operation (e.g. Encrypt with an HMAC key).
    #[error("{0}")]
    InvalidKeyUsage(String),
    /// A MAC did not verify.
    #[error("The MAC is not valid for this key, message and algorithm.")]
    InvalidMac,
    /// A key policy document is not acceptable.
    #[error("{0}")]
    MalformedPolicy(String),
    /// A policy, grant or role assignment would let one principal both administer a key and
    /// decrypt with it (separation of duties is enforced).
    #[error("{0}")]
    SeparationOfDuties(String),
    /// A grant token is not valid.
    #[error("{0}")]
    InvalidGrantToken(String),
    /// The ciphertext is not valid for this request. Deliberately carries no detail.
    #[error("The ciphertext is invalid or was not made with this key and encryption context.")]
    InvalidCiphertext,
    /// Decrypt named a KeyId other than the one that made the ciphertext.
    #[error("The key ID in the request does not identify the key that encrypted the ciphertext.")]
    IncorrectKey,
    /// A share was rejected while unsealing.
    #[error("{0}")]
    InvalidShare(String),
    /// The operation is not supported (or not for this key type).
    #[error("{0}")]
    UnsupportedOperation(String),
    /// A concurrent change won; retry.
    #[error("the resource was changed concurrently; retry the request")]
    Conflict,
    /// Stored security metadata failed its integrity check. The detail (which row) is for the
    /// server log and the audit trail; the caller sees a generic internal error.
    #[error("stored data failed its integrity check")]
    Integrity(String),
    /// Anything else internal (database down, bug). Details go to the server log only.
    #[error("internal error")]
    Internal(String),
}

impl KmsError {
    /// Detail for the server log and the audit trail, never for the caller.
    pub fn internal_detail(&self) -> Option<String> {
        match self {
            KmsError::Integrity(row) => Some(format!("integrity check failed: {row} was changed outside custody")),
            KmsError::Internal(detail) => Some(detail.clone()),
            _ => None,
        }
    }

    /// A validation error on `field`.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        Self::Validation { field: field.to_string(), message: message.into() }
    }
}

impl From<StoreError> for KmsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => KmsError::Conflict,
            StoreError::Integrity { table, key } => {
                tracing::error!(table, key = %key, "refusing to use a row that failed its integrity check");
                KmsError::Integrity(format!("{table}/{key}"))
            }
            other => {
                tracing::error!(error = %other, "store error");
                KmsError::Internal(other.to_string())
            }
        }
    }
}
