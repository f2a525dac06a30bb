//! The custody KMS keyring for the Encryption SDK message format (`custody_crypto::esdk`): data
//! keys generated and wrapped by custody, recorded exactly as the AWS Encryption SDKs' KMS
//! keyring records them (provider id `aws-kms`, provider info = the key's ARN, the KMS ciphertext
//! blob), so messages made by either open with the other.
//!
//! The message format is synchronous (it streams through `Read`/`Write`); the client is async. A
//! `KmsKeyring` therefore calls the client through a runtime handle and must be used from a
//! thread where blocking is allowed (`tokio::task::spawn_blocking`, or any non-runtime thread).

use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use custody_crypto::esdk::{
    DataKey, EncryptedDataKey, EncryptionContext, EncryptionMaterials, EsdkError, Keyring, Suite,
};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::Client;

/// The provider id of KMS-wrapped data keys.
pub const KMS_PROVIDER_ID: &str = "aws-kms";

/// Which encrypted data keys a decryption may try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Only keys whose ARN is one of these (strict mode: the SDKs' default).
    Strict(Vec<String>),
    /// Any `aws-kms` data key this endpoint and caller can decrypt (discovery mode), optionally
    /// only of keys whose ARN starts with one of these prefixes (e.g. an account's).
    Any {
        /// ARN prefixes allowed; empty allows every key.
        arn_prefixes: Vec<String>,
    },
}

/// Data keys wrapped by custody KMS keys.
pub struct KmsKeyring {
    client: Mutex<Client>,
    runtime: tokio::runtime::Handle,
    /// The key that generates the data key (and wraps it first), then the others that wrap it.
    encrypt_keys: Vec<String>,
    decrypt: Discovery,
}

impl std::fmt::Debug for KmsKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKeyring")
            .field("encrypt_keys", &self.encrypt_keys)
            .field("decrypt", &self.decrypt)
            .finish_non_exhaustive()
    }
}

impl KmsKeyring {
    /// A keyring calling custody through `client` on `runtime`. `encrypt_keys` (ids, ARNs or
    /// aliases; the first generates the data key) may be empty for a decrypt-only keyring.
    pub fn new(client: Client, runtime: tokio::runtime::Handle, encrypt_keys: Vec<String>, decrypt: Discovery) -> Self {
        Self { client: Mutex::new(client), runtime, encrypt_keys, decrypt }
    }

    /// The ARN of a key given by id, ARN or alias (for a strict decryption list).
    pub async fn resolve_arn(client: &mut Client, key: &str) -> Result<String, crate::ClientError> {
        let r = client.call("TrentService.DescribeKey", json!({ "KeyId": key })).await?;
        r["KeyMetadata"]["Arn"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| crate::ClientError::Protocol("DescribeKey returned no ARN".into()))
    }

    fn call(&self, target: &str, body: Value) -> Result<Value, EsdkError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime.block_on(client.call(target, body)).map_err(|e| EsdkError::Keyring(format!("{target}: {e}")))
    }

    fn allowed(&self, arn: &str) -> bool {
        match &self.decrypt {
            Discovery::Strict(arns) => arns.iter().any(|a| a == arn),
            Discovery::Any { arn_prefixes } => {
                arn.starts_with("arn:") && (arn_prefixes.is_empty() || arn_prefixes.iter().any(|p| arn.starts_with(p)))
            }
        }
    }
}

fn blob(v: &Value, field: &str) -> Result<Vec<u8>, EsdkError> {
    v[field]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or_else(|| EsdkError::Keyring(format!("the KMS answer has no valid {field}")))
}

fn arn_of(v: &Value) -> Result<String, EsdkError> {
    v["KeyId"].as_str().map(str::to_string).ok_or_else(|| EsdkError::Keyring("the KMS answer names no key".into()))
}

impl Keyring for KmsKeyring {
    fn on_encrypt(&self, m: &mut EncryptionMaterials) -> Result<(), EsdkError> {
        if self.encrypt_keys.is_empty() {
            return Err(EsdkError::Invalid("no KMS key to encrypt with (give one with -k)".into()));
        }
        for (i, key) in self.encrypt_keys.iter().enumerate() {
            let (arn, ciphertext) = match &m.data_key {
                None if i == 0 => {
                    let r = self.call(
                        "TrentService.GenerateDataKey",
                        json!({ "KeyId": key, "NumberOfBytes": 32, "EncryptionContext": m.context }),
                    )?;
                    let plain = Zeroizing::new(blob(&r, "Plaintext")?);
                    m.data_key = Some(DataKey::from_slice(&plain).ok_or_else(|| {
                        EsdkError::Keyring("GenerateDataKey returned a key that is not 32 bytes".into())
                    })?);
                    (arn_of(&r)?, blob(&r, "CiphertextBlob")?)
                }
                None => return Err(EsdkError::Keyring("no data key to wrap".into())),
                Some(dk) => {
                    let plain = Zeroizing::new(B64.encode(dk.expose_secret()));
                    let r = self.call(
                        "TrentService.Encrypt",
                        json!({ "KeyId": key, "Plaintext": &*plain, "EncryptionContext": m.context }),
                    )?;
                    (arn_of(&r)?, blob(&r, "CiphertextBlob")?)
                }
            };
            m.encrypted_data_keys.push(EncryptedDataKey {
                provider_id: KMS_PROVIDER_ID.into(),
                provider_info: arn.into_bytes(),
                ciphertext,
            });
        }
        Ok(())
    }

    fn on_decrypt(
        &self,
        _suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError> {
        let mut errors = Vec::new();
        for edk in keys.iter().filter(|k| k.provider_id == KMS_PROVIDER_ID) {
            let Ok(arn) = std::str::from_utf8(&edk.provider_info) else { continue };
            if !self.allowed(arn) {
                continue;
            }
            let body =
                json!({ "KeyId": arn, "CiphertextBlob": B64.encode(&edk.ciphertext), "EncryptionContext": context });
            match self.call("TrentService.Decrypt", body) {
                Ok(r) => {
                    // The SDKs check that the key that decrypted is the one the message names.
                    if r["KeyId"].as_str() != Some(arn) {
                        errors.push(format!("{arn}: decrypted by another key"));
                        continue;
                    }
                    let plain = Zeroizing::new(blob(&r, "Plaintext")?);
                    return DataKey::from_slice(&plain)
                        .map(Some)
                        .ok_or_else(|| EsdkError::Keyring("Decrypt returned a data key that is not 32 bytes".into()));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            Ok(None)
        } else {
            Err(EsdkError::Keyring(errors.join("; ")))
        }
    }
}
