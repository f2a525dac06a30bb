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
use custody_crypto::secret_json::SecretJson;
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

    /// The answer's strings (a data key, in GenerateDataKey's and Decrypt's) are wiped when it
    /// is dropped.
    fn call(&self, target: &str, body: Value) -> Result<SecretJson, EsdkError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let answer = self.runtime.block_on(client.call(target, body));
        answer.map(SecretJson::new).map_err(|e| EsdkError::Keyring(format!("{target}: {e}")))
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
                    let r = r.value();
                    let plain = Zeroizing::new(blob(r, "Plaintext")?);
                    m.data_key = Some(DataKey::from_slice(&plain).ok_or_else(|| {
                        EsdkError::Keyring("GenerateDataKey returned a key that is not 32 bytes".into())
                    })?);
                    (arn_of(r)?, blob(r, "CiphertextBlob")?)
                }
                None => return Err(EsdkError::Keyring("no data key to wrap".into())),
                Some(dk) => {
                    let plain = Zeroizing::new(B64.encode(dk.expose_secret()));
                    let r = self.call(
                        "TrentService.Encrypt",
                        json!({ "KeyId": key, "Plaintext": &*plain, "EncryptionContext": m.context }),
                    )?;
                    (arn_of(r.value())?, blob(r.value(), "CiphertextBlob")?)
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
                    let r = r.value();
                    // The SDKs check that the key that decrypted is the one the message names.
                    if r["KeyId"].as_str() != Some(arn) {
                        errors.push(format!("{arn}: decrypted by another key"));
                        continue;
                    }
                    let plain = Zeroizing::new(blob(r, "Plaintext")?);
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

/// Limits of a [`CachingKeyring`]: the AWS Encryption SDKs' caching semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// An entry is used for at most this long after its data key was made or unwrapped.
    pub max_age: std::time::Duration,
    /// A data key encrypts at most this many messages.
    pub max_messages: u64,
    /// A data key encrypts at most this many bytes (over all its messages).
    pub max_bytes: u64,
    /// Entries kept at most (the oldest goes first).
    pub capacity: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { max_age: std::time::Duration::from_secs(60), max_messages: 1 << 32, max_bytes: u64::MAX, capacity: 100 }
    }
}

struct Cached {
    data_key: DataKey,
    encrypted_data_keys: Vec<EncryptedDataKey>,
    made: std::time::Instant,
    messages: u64,
    bytes: u64,
}

/// A data-key cache in front of another keyring (off unless asked for): encryptions with the
/// same suite and encryption context reuse a data key (and its wrapped forms) within the limits,
/// and decryptions of the same wrapped keys reuse the unwrapped key within `max_age`. Fewer KMS
/// calls, at the price of data keys that protect more than one message. Evicted entries are
/// zeroized (a [`DataKey`] zeroizes itself when dropped).
///
/// Encryption uses the cache only when the message's length is known in advance (so the byte
/// limit can be kept) and the keyring is the one making the data key (not a later keyring of a
/// multi-keyring). Signed-suite messages carry a fresh public key in their context, so they never
/// share an entry.
pub struct CachingKeyring<K> {
    inner: K,
    limits: CacheLimits,
    encrypt: Mutex<std::collections::HashMap<Vec<u8>, Cached>>,
    decrypt: Mutex<std::collections::HashMap<Vec<u8>, (DataKey, std::time::Instant)>>,
}

impl<K> std::fmt::Debug for CachingKeyring<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachingKeyring").field("limits", &self.limits).finish_non_exhaustive()
    }
}

fn copy_key(k: &DataKey) -> DataKey {
    DataKey::from_slice(k.expose_secret()).expect("32 bytes")
}

fn cache_id(
    suite: Suite,
    context: &EncryptionContext,
    keys: Option<&[EncryptedDataKey]>,
) -> Result<Vec<u8>, EsdkError> {
    let mut id = suite.id().to_be_bytes().to_vec();
    let pairs = custody_crypto::esdk::serialize_pairs(context)?;
    id.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
    id.extend_from_slice(&pairs);
    for k in keys.unwrap_or_default() {
        for field in [k.provider_id.as_bytes(), &k.provider_info, &k.ciphertext] {
            id.extend_from_slice(&(field.len() as u32).to_be_bytes());
            id.extend_from_slice(field);
        }
    }
    Ok(id)
}

impl<K: Keyring> CachingKeyring<K> {
    /// Caches what `inner` makes and unwraps, within `limits`.
    pub fn new(inner: K, limits: CacheLimits) -> Self {
        Self { inner, limits, encrypt: Default::default(), decrypt: Default::default() }
    }

    /// Entries in the encryption and decryption caches (for tests and `-v`).
    pub fn len(&self) -> (usize, usize) {
        let e = self.encrypt.lock().unwrap_or_else(|p| p.into_inner()).len();
        let d = self.decrypt.lock().unwrap_or_else(|p| p.into_inner()).len();
        (e, d)
    }

    /// Whether both caches are empty.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

/// Keeps at most `capacity` entries, dropping the oldest (and zeroizing its key).
fn evict<V>(map: &mut std::collections::HashMap<Vec<u8>, V>, capacity: usize, made: impl Fn(&V) -> std::time::Instant) {
    while map.len() >= capacity.max(1) {
        let oldest = map.iter().min_by_key(|(_, v)| made(v)).map(|(k, _)| k.clone());
        match oldest {
            Some(k) => drop(map.remove(&k)),
            None => return,
        }
    }
}

impl<K: Keyring> Keyring for CachingKeyring<K> {
    fn on_encrypt(&self, m: &mut EncryptionMaterials) -> Result<(), EsdkError> {
        let Some(len) = m.plaintext_length.filter(|n| m.data_key.is_none() && *n <= self.limits.max_bytes) else {
            return self.inner.on_encrypt(m);
        };
        let id = cache_id(m.suite, &m.context, None)?;
        let mut cache = self.encrypt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = cache.get_mut(&id) {
            let fits = entry.made.elapsed() < self.limits.max_age
                && entry.messages < self.limits.max_messages
                && entry.bytes.saturating_add(len) <= self.limits.max_bytes;
            if fits {
                entry.messages += 1;
                entry.bytes += len;
                m.data_key = Some(copy_key(&entry.data_key));
                m.encrypted_data_keys.extend(entry.encrypted_data_keys.iter().cloned());
                return Ok(());
            }
            cache.remove(&id);
        }
        drop(cache);
        let before = m.encrypted_data_keys.len();
        self.inner.on_encrypt(m)?;
        let Some(data_key) = &m.data_key else { return Ok(()) };
        let entry = Cached {
            data_key: copy_key(data_key),
            encrypted_data_keys: m.encrypted_data_keys[before..].to_vec(),
            made: std::time::Instant::now(),
            messages: 1,
            bytes: len,
        };
        let mut cache = self.encrypt.lock().unwrap_or_else(|p| p.into_inner());
        evict(&mut cache, self.limits.capacity, |c| c.made);
        cache.insert(id, entry);
        Ok(())
    }

    fn on_decrypt(
        &self,
        suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError> {
        let id = cache_id(suite, context, Some(keys))?;
        let mut cache = self.decrypt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, made)) = cache.get(&id) {
            if made.elapsed() < self.limits.max_age {
                return Ok(Some(copy_key(key)));
            }
            cache.remove(&id);
        }
        drop(cache);
        let key = self.inner.on_decrypt(suite, context, keys)?;
        if let Some(k) = &key {
            let mut cache = self.decrypt.lock().unwrap_or_else(|p| p.into_inner());
            evict(&mut cache, self.limits.capacity, |(_, made)| *made);
            cache.insert(id, (copy_key(k), std::time::Instant::now()));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use custody_crypto::esdk::{decrypt, encrypt, DecryptOptions, EncryptOptions, RawAesKeyring};

    use super::*;

    /// A raw AES keyring that counts how often it is asked (the calls a cache saves).
    struct Counting {
        inner: RawAesKeyring,
        encrypts: AtomicUsize,
        decrypts: AtomicUsize,
    }

    impl Keyring for Counting {
        fn on_encrypt(&self, m: &mut EncryptionMaterials) -> Result<(), EsdkError> {
            self.encrypts.fetch_add(1, Ordering::Relaxed);
            self.inner.on_encrypt(m)
        }
        fn on_decrypt(
            &self,
            s: Suite,
            c: &EncryptionContext,
            k: &[EncryptedDataKey],
        ) -> Result<Option<DataKey>, EsdkError> {
            self.decrypts.fetch_add(1, Ordering::Relaxed);
            self.inner.on_decrypt(s, c, k)
        }
    }

    fn counting() -> Counting {
        Counting {
            inner: RawAesKeyring::new("p", "k", &[1u8; 32]).unwrap(),
            encrypts: AtomicUsize::new(0),
            decrypts: AtomicUsize::new(0),
        }
    }

    fn seal(k: &dyn Keyring, ctx: &EncryptionContext, suite: Suite, data: &[u8], known: bool) -> Vec<u8> {
        let options =
            EncryptOptions { suite, plaintext_length: known.then_some(data.len() as u64), ..EncryptOptions::default() };
        let mut out = Vec::new();
        encrypt(k, ctx, options, &mut &data[..], &mut out).unwrap();
        out
    }

    fn open(k: &dyn Keyring, m: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decrypt(k, &DecryptOptions::default(), &mut &m[..], &mut out).unwrap();
        out
    }

    /// Within its limits an entry serves further messages; the message, byte and age limits each
    /// end it; other contexts, unknown lengths and the signed suite get their own data keys; the
    /// decryption cache serves repeated unwraps until its entries age out.
    #[test]
    fn the_cache_keeps_the_sdks_limits() {
        let ctx: EncryptionContext = [("a".to_string(), "1".to_string())].into();
        let limits = CacheLimits {
            max_age: std::time::Duration::from_millis(300),
            max_messages: 3,
            max_bytes: 100,
            capacity: 10,
        };
        let cache = CachingKeyring::new(counting(), limits);
        let calls = |c: &CachingKeyring<Counting>| c.inner.encrypts.load(Ordering::Relaxed);
        // 3 messages per key.
        let m: Vec<Vec<u8>> = (0..4).map(|_| seal(&cache, &ctx, Suite::Committed, b"0123456789", true)).collect();
        assert_eq!(calls(&cache), 2, "a new data key for the 4th message");
        // The same data key: the same wrapped key in the first three headers.
        let edk = |m: &[u8]| {
            custody_crypto::esdk::read_header(&mut &m[..], &DecryptOptions::default()).unwrap().encrypted_data_keys
        };
        assert_eq!(edk(&m[0]), edk(&m[2]));
        assert_ne!(edk(&m[2]), edk(&m[3]));
        // Bytes: the 4th message's key has encrypted 10; 40 more fit (50), 70 more would not
        // (120 > 100): a new key.
        let before = calls(&cache);
        seal(&cache, &ctx, Suite::Committed, &[0u8; 40], true);
        assert_eq!(calls(&cache), before);
        seal(&cache, &ctx, Suite::Committed, &[0u8; 70], true);
        assert_eq!(calls(&cache), before + 1);
        // Larger than max_bytes, unknown length, another context, the signed suite: not cached.
        let before = calls(&cache);
        seal(&cache, &ctx, Suite::Committed, &[0u8; 101], true);
        seal(&cache, &ctx, Suite::Committed, b"x", false);
        seal(&cache, &ctx, Suite::Committed, b"x", false);
        seal(&cache, &ctx, Suite::CommittedSigned, b"x", true);
        seal(&cache, &ctx, Suite::CommittedSigned, b"x", true);
        assert_eq!(calls(&cache), before + 5);
        let other: EncryptionContext = [("a".to_string(), "2".to_string())].into();
        let before = calls(&cache);
        seal(&cache, &other, Suite::Committed, b"x", true);
        seal(&cache, &other, Suite::Committed, b"x", true);
        assert_eq!(calls(&cache), before + 1);
        // Age.
        let before = calls(&cache);
        std::thread::sleep(std::time::Duration::from_millis(350));
        seal(&cache, &other, Suite::Committed, b"x", true);
        assert_eq!(calls(&cache), before + 1);
        // Every message decrypts; repeated decryptions of one message unwrap once.
        let decrypts = |c: &CachingKeyring<Counting>| c.inner.decrypts.load(Ordering::Relaxed);
        let before = decrypts(&cache);
        for _ in 0..3 {
            assert_eq!(open(&cache, &m[0]), b"0123456789");
        }
        assert_eq!(decrypts(&cache), before + 1);
        std::thread::sleep(std::time::Duration::from_millis(350));
        open(&cache, &m[0]);
        assert_eq!(decrypts(&cache), before + 2, "an aged entry is not used");
    }

    /// The cache never holds more than its capacity.
    #[test]
    fn capacity_is_kept() {
        let limits = CacheLimits { capacity: 3, ..CacheLimits::default() };
        let cache = CachingKeyring::new(counting(), limits);
        for i in 0..10 {
            let ctx: EncryptionContext = [("i".to_string(), i.to_string())].into();
            seal(&cache, &ctx, Suite::Committed, b"x", true);
        }
        assert_eq!(cache.len().0, 3);
    }
}
