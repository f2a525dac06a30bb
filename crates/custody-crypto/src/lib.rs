//! custody's cryptographic core.
//!
//! Everything here is pure: bytes in, bytes out, no files, no network, no clock except where a
//! certificate's validity is chosen by the caller. Only this crate touches raw key bytes; every
//! other crate handles keys through the newtypes defined here, which zeroize on drop and never
//! print their contents.
//!
//! One construction protects everything custody encrypts (see [`seal`]): a fresh 256-bit salt per
//! call, HKDF-SHA256 from a long-lived key to a one-time AES-256-GCM key and nonce, and the caller's
//! associated data bound as AAD. The KMS ciphertext blob ([`blob`]), the wrapping of key versions
//! under the root key ([`keys::RootKey::wrap_key_material`]) and the storage barrier's row sealing
//! ([`keys::BarrierKey`]) are all this one construction with different, versioned labels.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod blob;
pub mod context;
pub mod esdk;
pub mod keys;
pub mod mac;
pub mod pki;
pub mod random;
pub mod seal;
pub mod secret;
pub mod secret_json;
pub mod shamir;
pub mod sigv4;

pub use blob::{BlobError, BlobHeader};
pub use context::{ContextError, EncryptionContext};
pub use keys::{BarrierKey, KeyMaterial, RootKey, RootKeyCheck};
pub use seal::OpenError;
pub use secret::SecretBytes;

#[cfg(test)]
mod wycheproof;
