//! The AWS Encryption SDK message format, version 2 (the committing algorithm suites), so that
//! files custody encrypts open with the AWS Encryption SDKs and the other way round.
//!
//! Public specification: awslabs/aws-encryption-sdk-specification, `data-format/` and
//! `framework/algorithm-suites.md`. A message is a header (suite, a 256-bit message id, the
//! encryption context, the encrypted data keys, the frame length, the key commitment and an
//! authentication tag), a framed body, and for the signed suite a footer with an ECDSA P-384
//! signature over everything before it.
//!
//! - Two suites: [`Suite::Committed`] (0x0478: AES-256-GCM, HKDF-SHA512, key commitment) and
//!   [`Suite::CommittedSigned`] (0x0578: the same plus ECDSA P-384). Both encrypt and decrypt;
//!   message format version 1, the non-committing suites and non-framed bodies are refused with
//!   an error that says so.
//! - Strict parsing: every length is checked against [`DecryptOptions`] before anything is
//!   allocated for it; the commitment is compared in constant time before the header tag is
//!   checked; frame sequence numbers and IVs must be exactly what the format prescribes; bytes
//!   after the end of the message are an error.
//! - Streaming with bounded memory: [`encrypt`] and [`decrypt`] read and write one frame at a
//!   time (a frame is at most [`DecryptOptions::max_frame_length`] bytes).
//! - For an input that can be read at any offset (a regular file), [`encrypt_at`] and
//!   [`decrypt_at`] make and read the same messages with every core reading and sealing (or
//!   opening) runs of frames of its own, written in order by the caller's thread: one thread
//!   reading for all is what bounds the streaming functions on a fast machine.
//!
//! Data keys come from a [`Keyring`]; [`RawAesKeyring`] is the SDKs' raw AES keyring (so messages
//! interoperate with a shared 256-bit wrapping key), and [`MultiKeyring`] combines keyrings.
//!
//! Caution: a decrypting stream releases a frame's plaintext once that frame's tag checks, before
//! the signature of a signed message (at its end) is verified; a caller that must not act on
//! unverified plaintext keeps the output aside until [`decrypt`] returns `Ok` (the CLI writes to
//! a temporary file and renames it only then).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::digest;
use aws_lc_rs::error::Unspecified;
use aws_lc_rs::hkdf;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

/// An encryption context as the message carries it: UTF-8 keys and values, sorted by key bytes.
pub type EncryptionContext = BTreeMap<String, String>;

/// The encryption-context key under which a signed message carries its verification key.
pub const PUBLIC_KEY_CONTEXT_KEY: &str = "aws-crypto-public-key";

/// Default frame length: 64 KiB of plaintext per frame.
pub const DEFAULT_FRAME_LENGTH: u32 = 64 * 1024;

const VERSION_2: u8 = 0x02;
const CONTENT_TYPE_FRAMED: u8 = 0x02;
const MESSAGE_ID_LEN: usize = 32;
const COMMITMENT_LEN: usize = 32;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const FINAL_FRAME_MARKER: u32 = 0xFFFF_FFFF;
const FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Frame";
const FINAL_FRAME_AAD: &[u8] = b"AWSKMSEncryptionClient Final Frame";

/// An algorithm suite of message format version 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    /// 0x0478: AES-256-GCM, HKDF-SHA512 key derivation, key commitment. The SDKs' default.
    Committed,
    /// 0x0578: as [`Suite::Committed`], and an ECDSA P-384 (SHA-384) signature over the message.
    CommittedSigned,
}

impl Suite {
    /// The suite's identifier in the header.
    pub fn id(self) -> u16 {
        match self {
            Suite::Committed => 0x0478,
            Suite::CommittedSigned => 0x0578,
        }
    }

    /// The suite with identifier `id`, if custody supports it.
    pub fn from_id(id: u16) -> Result<Self, EsdkError> {
        match id {
            0x0478 => Ok(Suite::Committed),
            0x0578 => Ok(Suite::CommittedSigned),
            other => Err(EsdkError::Unsupported(format!(
                "algorithm suite 0x{other:04x}; custody reads and writes the committing suites 0x0478 and 0x0578 only"
            ))),
        }
    }

    /// Whether messages of this suite end with a signature.
    pub fn is_signed(self) -> bool {
        self == Suite::CommittedSigned
    }
}

/// Why a message could not be made or read. The classes are stable; the texts say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EsdkError {
    /// The bytes are not a well-formed message (truncated, a length out of bounds, trailing bytes).
    #[error("not a valid encrypted message: {0}")]
    Malformed(String),
    /// A well-formed message custody does not read (format version 1, another suite, unframed).
    #[error("unsupported message: {0}")]
    Unsupported(String),
    /// A check of authenticity failed: key commitment, header or frame tag, or signature. The
    /// message was changed, or belongs with another key.
    #[error("the message failed its integrity check ({0}); it was modified or is not what was expected")]
    Integrity(&'static str),
    /// No keyring could decrypt any of the message's data keys.
    #[error("no keyring could decrypt a data key of this message (its keys: {0})")]
    NoDataKey(String),
    /// The message's encryption context lacks a pair the caller required.
    #[error("the message's encryption context does not hold {0}")]
    ContextMismatch(String),
    /// A keyring failed (the KMS could not be reached, refused the call...).
    #[error("keyring: {0}")]
    Keyring(String),
    /// The caller's input was refused (context with a reserved key, a frame length of 0...).
    #[error("{0}")]
    Invalid(String),
    /// Reading the input or writing the output failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// A plaintext data key (32 bytes): zeroized on drop, never printed.
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    /// A fresh random data key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        crate::random::fill(&mut k[..]);
        Self(k)
    }

    /// From 32 bytes (from a keyring that unwrapped it). Other lengths are refused.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut k = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return None;
        }
        k.copy_from_slice(bytes);
        Some(Self(k))
    }

    /// The key bytes, for a keyring to wrap.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// A data key encrypted by one wrapping key, as the header stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedDataKey {
    /// Who can decrypt it: `aws-kms` for a KMS key, or the raw keyring's provider id.
    pub provider_id: String,
    /// Which key: the KMS key ARN, or the raw keyring's key name and IV.
    pub provider_info: Vec<u8>,
    /// The wrapped data key.
    pub ciphertext: Vec<u8>,
}

/// What an encryption needs from its keyrings: a data key, and that key wrapped by each
/// wrapping key. A keyring generates the data key if none is there yet, and adds its wrapping.
#[derive(Debug)]
pub struct EncryptionMaterials {
    /// The suite of the message.
    pub suite: Suite,
    /// The encryption context (with the signing suite's public key already in it).
    pub context: EncryptionContext,
    /// The plaintext data key, once generated.
    pub data_key: Option<DataKey>,
    /// The data key wrapped by each wrapping key so far.
    pub encrypted_data_keys: Vec<EncryptedDataKey>,
    /// How many bytes the message will encrypt, when known in advance (a data-key cache needs
    /// it to count bytes per key; see [`EncryptOptions::plaintext_length`]).
    pub plaintext_length: Option<u64>,
}

/// Wraps and unwraps data keys (the SDKs' keyring interface).
pub trait Keyring: Send + Sync {
    /// Generates the data key if `materials` has none, and appends its wrapping of it.
    fn on_encrypt(&self, materials: &mut EncryptionMaterials) -> Result<(), EsdkError>;

    /// Decrypts one of `keys` it can, or returns `Ok(None)` when none of them is for it.
    /// Errors are for failures worth reporting (a key of its own that does not open).
    fn on_decrypt(
        &self,
        suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError>;
}

impl<K: Keyring + ?Sized> Keyring for Box<K> {
    fn on_encrypt(&self, materials: &mut EncryptionMaterials) -> Result<(), EsdkError> {
        (**self).on_encrypt(materials)
    }

    fn on_decrypt(
        &self,
        suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError> {
        (**self).on_decrypt(suite, context, keys)
    }
}

/// The SDKs' raw AES keyring: data keys wrapped with AES-256-GCM under a 256-bit key the user
/// holds, named by a provider id and a key name (both recorded in the message). The wrapping's
/// associated data is the serialized encryption context, so a changed context fails to unwrap.
pub struct RawAesKeyring {
    provider_id: String,
    key_name: String,
    key: LessSafeKey,
}

impl fmt::Debug for RawAesKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawAesKeyring")
            .field("provider_id", &self.provider_id)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl RawAesKeyring {
    /// A keyring for `key` (32 bytes), recorded as `provider_id` / `key_name`.
    pub fn new(provider_id: &str, key_name: &str, key: &[u8]) -> Result<Self, EsdkError> {
        if provider_id.is_empty() || key_name.is_empty() {
            return Err(EsdkError::Invalid("a raw AES keyring needs a provider id and a key name".into()));
        }
        if provider_id == "aws-kms" || provider_id.starts_with("aws-kms") {
            return Err(EsdkError::Invalid("the provider id \"aws-kms\" is reserved for KMS keys".into()));
        }
        if key.len() != 32 {
            return Err(EsdkError::Invalid(format!(
                "a raw AES wrapping key is 32 bytes (AES-256); this one is {} bytes",
                key.len()
            )));
        }
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"));
        Ok(Self { provider_id: provider_id.into(), key_name: key_name.into(), key })
    }

    /// Provider info: key name, tag length in bits (u32), IV length in bytes (u32), IV.
    fn provider_info(&self, iv: &[u8; IV_LEN]) -> Vec<u8> {
        let mut info = Vec::with_capacity(self.key_name.len() + 8 + IV_LEN);
        info.extend_from_slice(self.key_name.as_bytes());
        info.extend_from_slice(&((TAG_LEN * 8) as u32).to_be_bytes());
        info.extend_from_slice(&(IV_LEN as u32).to_be_bytes());
        info.extend_from_slice(iv);
        info
    }

    /// The IV of an encrypted data key of this keyring, if its provider info is one of ours.
    fn iv_of(&self, edk: &EncryptedDataKey) -> Option<[u8; IV_LEN]> {
        if edk.provider_id != self.provider_id {
            return None;
        }
        let rest = edk.provider_info.strip_prefix(self.key_name.as_bytes())?;
        if rest.len() != 8 + IV_LEN
            || rest[..4] != ((TAG_LEN * 8) as u32).to_be_bytes()
            || rest[4..8] != (IV_LEN as u32).to_be_bytes()
        {
            return None;
        }
        rest[8..].try_into().ok()
    }
}

impl Keyring for RawAesKeyring {
    fn on_encrypt(&self, materials: &mut EncryptionMaterials) -> Result<(), EsdkError> {
        let data_key = materials.data_key.get_or_insert_with(DataKey::generate);
        let iv: [u8; IV_LEN] = crate::random::array();
        let mut wrapped = data_key.expose_secret().to_vec();
        let aad = serialize_pairs(&materials.context)?;
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(iv), Aad::from(&aad), &mut wrapped)
            .expect("AES-GCM sealing of 32 bytes cannot fail");
        materials.encrypted_data_keys.push(EncryptedDataKey {
            provider_id: self.provider_id.clone(),
            provider_info: self.provider_info(&iv),
            ciphertext: wrapped,
        });
        Ok(())
    }

    fn on_decrypt(
        &self,
        _suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError> {
        let aad = serialize_pairs(context)?;
        for edk in keys {
            let Some(iv) = self.iv_of(edk) else { continue };
            let mut buf = Zeroizing::new(edk.ciphertext.clone());
            if let Ok(plain) = self.key.open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(&aad), &mut buf[..]) {
                if let Some(key) = DataKey::from_slice(plain) {
                    return Ok(Some(key));
                }
            }
        }
        Ok(None)
    }
}

/// Several keyrings as one: on encryption the first (the generator) makes the data key and every
/// keyring wraps it; on decryption the first that can unwrap a key wins.
pub struct MultiKeyring {
    keyrings: Vec<Box<dyn Keyring>>,
}

impl fmt::Debug for MultiKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiKeyring").field("keyrings", &self.keyrings.len()).finish()
    }
}

impl MultiKeyring {
    /// The keyrings, the generator first. At least one.
    pub fn new(keyrings: Vec<Box<dyn Keyring>>) -> Result<Self, EsdkError> {
        if keyrings.is_empty() {
            return Err(EsdkError::Invalid("a multi-keyring needs at least one keyring".into()));
        }
        Ok(Self { keyrings })
    }
}

impl Keyring for MultiKeyring {
    fn on_encrypt(&self, materials: &mut EncryptionMaterials) -> Result<(), EsdkError> {
        for k in &self.keyrings {
            k.on_encrypt(materials)?;
        }
        Ok(())
    }

    fn on_decrypt(
        &self,
        suite: Suite,
        context: &EncryptionContext,
        keys: &[EncryptedDataKey],
    ) -> Result<Option<DataKey>, EsdkError> {
        first_data_key(self.keyrings.iter().map(|k| k.as_ref()), suite, context, keys)
    }
}

/// The first data key one of `keyrings` unwraps (tried in order); if none does, the first error
/// one of them reported, else `Ok(None)`.
pub fn first_data_key<'a>(
    keyrings: impl IntoIterator<Item = &'a dyn Keyring>,
    suite: Suite,
    context: &EncryptionContext,
    keys: &[EncryptedDataKey],
) -> Result<Option<DataKey>, EsdkError> {
    let mut first_error = None;
    for k in keyrings {
        match k.on_decrypt(suite, context, keys) {
            Ok(Some(key)) => return Ok(Some(key)),
            Ok(None) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(None), Err)
}

/// How to decrypt: bounds applied while reading a message (before anything is allocated for
/// it), and what its encryption context must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecryptOptions {
    /// Most encrypted data keys a header may hold (the SDKs' `max_encrypted_data_keys`).
    pub max_encrypted_data_keys: u16,
    /// Largest frame length accepted, in bytes (memory used per frame).
    pub max_frame_length: u32,
    /// Pairs the message's encryption context must contain (checked before any key is unwrapped).
    pub required_context: EncryptionContext,
}

impl Default for DecryptOptions {
    fn default() -> Self {
        Self {
            max_encrypted_data_keys: 16,
            max_frame_length: 16 * 1024 * 1024,
            required_context: EncryptionContext::new(),
        }
    }
}

/// How to encrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptOptions {
    /// The algorithm suite.
    pub suite: Suite,
    /// Plaintext bytes per frame (1 to 2^32 - 1; default [`DEFAULT_FRAME_LENGTH`]).
    pub frame_length: u32,
    /// The input's length, when known (a file's size): told to the keyring, and enforced (an
    /// input of another length is an error).
    pub plaintext_length: Option<u64>,
}

impl Default for EncryptOptions {
    fn default() -> Self {
        Self { suite: Suite::Committed, frame_length: DEFAULT_FRAME_LENGTH, plaintext_length: None }
    }
}

/// What a decrypted message said about itself.
#[derive(Debug, Clone)]
pub struct MessageInfo {
    /// Its header (suite, message id, context — for a signed message including the public key —,
    /// encrypted data keys, frame length).
    pub header: Header,
    /// Plaintext bytes.
    pub plaintext_len: u64,
}

/// The serialized encryption context (pair count, then each key and value with a u16 length):
/// the header's key-value pairs, and the raw AES keyring's associated data. Empty for an empty
/// context.
pub fn serialize_pairs(context: &EncryptionContext) -> Result<Vec<u8>, EsdkError> {
    if context.is_empty() {
        return Ok(Vec::new());
    }
    let too_large = || EsdkError::Invalid("the encryption context does not fit a message header (64 KiB)".into());
    let mut out = Vec::new();
    out.extend_from_slice(&u16::try_from(context.len()).map_err(|_| too_large())?.to_be_bytes());
    for (k, v) in context {
        for field in [k.as_bytes(), v.as_bytes()] {
            put_field(&mut out, field).ok_or_else(too_large)?;
        }
    }
    if out.len() > usize::from(u16::MAX) {
        return Err(too_large());
    }
    Ok(out)
}

/// Appends `field` with its u16 length (the format's one kind of length prefix), or `None` if it
/// does not fit one.
fn put_field(out: &mut Vec<u8>, field: &[u8]) -> Option<()> {
    (field.len() <= usize::from(u16::MAX)).then(|| crate::seal::put_field(out, field))
}

/// The message's derived keys: the frame key (AES-256-GCM) and the commitment.
struct MessageKeys {
    key: LessSafeKey,
    commitment: Zeroizing<[u8; COMMITMENT_LEN]>,
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA512 (RFC 5869) of `ikm` with `salt` and the concatenation of `info` into `out`; fails
/// only for outputs longer than 255 hashes. (Checked against Wycheproof's vectors.)
pub(crate) fn hkdf_sha512(ikm: &[u8], salt: &[u8], info: &[&[u8]], out: &mut [u8]) -> Result<(), Unspecified> {
    hkdf::Salt::new(hkdf::HKDF_SHA512, salt).extract(ikm).expand(info, Len(out.len()))?.fill(out)
}

/// Verifies an ECDSA P-384 signature (DER) over a SHA-384 digest with a public key given as an
/// X9.62 point, compressed or not. (Checked against Wycheproof's vectors.)
pub(crate) fn verify_p384(point: &[u8], digest: &digest::Digest, signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_ASN1, point).verify_digest(digest, signature).is_ok()
}

fn derive_keys(suite: Suite, data_key: &DataKey, message_id: &[u8; MESSAGE_ID_LEN]) -> MessageKeys {
    let expand = |info: &[&[u8]], out: &mut [u8]| {
        hkdf_sha512(data_key.expose_secret(), message_id, info, out)
            .expect("32 bytes is within HKDF-SHA512's output limit")
    };
    let mut key = Zeroizing::new([0u8; 32]);
    expand(&[&suite.id().to_be_bytes(), b"DERIVEKEY"], &mut key[..]);
    let mut commitment = Zeroizing::new([0u8; COMMITMENT_LEN]);
    expand(&[b"COMMITKEY"], &mut commitment[..]);
    MessageKeys { key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key[..]).expect("32-byte key")), commitment }
}

fn frame_iv(seq: u32) -> [u8; IV_LEN] {
    let mut iv = [0u8; IV_LEN];
    iv[IV_LEN - 4..].copy_from_slice(&seq.to_be_bytes());
    iv
}

fn body_aad(message_id: &[u8; MESSAGE_ID_LEN], final_frame: bool, seq: u32, len: u64) -> Vec<u8> {
    let content = if final_frame { FINAL_FRAME_AAD } else { FRAME_AAD };
    let mut aad = Vec::with_capacity(MESSAGE_ID_LEN + content.len() + 12);
    aad.extend_from_slice(message_id);
    aad.extend_from_slice(content);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(&len.to_be_bytes());
    aad
}

/// Writes everything it is given, and feeds the signature digest (signed suite).
struct Out<'a, W: Write> {
    w: &'a mut W,
    digest: Option<digest::Context>,
}

impl<W: Write> Out<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), EsdkError> {
        if let Some(d) = &mut self.digest {
            d.update(bytes);
        }
        self.w.write_all(bytes)?;
        Ok(())
    }
}

/// Encrypts everything `input` yields into one message written to `output`, with a data key from
/// `keyring`, bound to `context`. Returns the number of plaintext bytes.
pub fn encrypt<R: Read, W: Write>(
    keyring: &dyn Keyring,
    context: &EncryptionContext,
    options: EncryptOptions,
    input: &mut R,
    output: &mut W,
) -> Result<u64, EsdkError> {
    let (message, mut out) = Sealer::begin(keyring, context, options, output)?;
    // Body: frames are read in batches and sealed in parallel, the next batch being read while
    // the current one is sealed; batches are written in order.
    let mut frames = PlainFrames::new(input, options)?;
    let seal = |f: &mut Frame| {
        message.seal(f);
        Ok(())
    };
    let mut batch = frames.batch()?;
    loop {
        let (sealed, next) = std::thread::scope(|s| {
            let sealing = s.spawn(|| in_parallel(&mut batch, seal).map(|()| batch));
            let next = if frames.done { Ok(Vec::new()) } else { frames.batch() };
            (sealing.join().unwrap_or_else(|_| Err(EsdkError::Invalid("a frame worker panicked".into()))), next)
        });
        for f in sealed? {
            put_frame(&mut out, &f)?;
            frames.pool.push(f);
        }
        batch = next?;
        if batch.is_empty() {
            break;
        }
    }
    message.finish(out)?;
    Ok(frames.total)
}

/// Input that several threads can read at any offset at once: a regular file (`pread`), or bytes
/// in memory.
pub trait ReadAt: Sync {
    /// Reads into `buf` from `offset`; returns how many bytes were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

#[cfg(unix)]
impl ReadAt for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// Like [`encrypt`] (the same message), for an input of `len` bytes that can be read at any
/// offset, such as a regular file: every core reads and seals frames of its own, so reading is
/// spread over the cores too instead of one thread reading for all. The input must hold exactly
/// `len` bytes until this returns: one that turns out shorter or longer is an error.
pub fn encrypt_at<R: ReadAt + ?Sized, W: Write>(
    keyring: &dyn Keyring,
    context: &EncryptionContext,
    options: EncryptOptions,
    input: &R,
    len: u64,
    output: &mut W,
) -> Result<u64, EsdkError> {
    if let Some(n) = options.plaintext_length.filter(|n| *n != len) {
        return Err(EsdkError::Invalid(format!("the input is {len} bytes, not the {n} declared")));
    }
    if options.frame_length == 0 {
        return Err(EsdkError::Invalid("the frame length must be at least 1 byte".into()));
    }
    let frame_len = options.frame_length as usize;
    // Frame k (from 1) holds bytes [(k - 1) * frame, k * frame); the last holds the rest, which
    // may be a whole frame, or nothing for an empty input.
    let count = len.div_ceil(u64::from(options.frame_length)).max(1);
    if count >= u64::from(FINAL_FRAME_MARKER) {
        return Err(EsdkError::Invalid(
            "the input needs more frames than a message holds; use a larger frame length".into(),
        ));
    }
    let options = EncryptOptions { plaintext_length: Some(len), ..options };
    let (message, mut out) = Sealer::begin(keyring, context, options, output)?;
    // Runs of consecutive frames: one read of their plaintext, each frame sealed in place, its
    // tag kept beside.
    let per_run = (RUN_BYTES / frame_len).max(1) as u64;
    let new_run = || Run { buf: Zeroizing::new(Vec::new()), first: 0, frames: 0, tags: Vec::new() };
    let fill = |run: u64, r: &mut Run| -> Result<(), EsdkError> {
        r.first = run * per_run + 1;
        r.frames = per_run.min(count - run * per_run) as usize;
        let offset = run * per_run * frame_len as u64;
        let bytes = (len - offset).min((r.frames * frame_len) as u64) as usize;
        r.buf.resize(bytes, 0);
        read_exact_at(input, &mut r.buf, offset, len, "encryption")?;
        r.tags.clear();
        for (i, content) in r.buf.chunks_mut(frame_len).enumerate() {
            let seq = r.first + i as u64;
            r.tags.push(message.seal_detached(seq as u32, seq == count, content));
        }
        if r.tags.len() < r.frames {
            // An empty input: one final frame with nothing in it.
            r.tags.push(message.seal_detached(r.first as u32, true, &mut []));
        }
        Ok(())
    };
    let drain = |r: &Run| -> Result<(), EsdkError> {
        let mut contents = r.buf.chunks(frame_len);
        for (i, tag) in r.tags.iter().enumerate() {
            let seq = (r.first + i as u64) as u32;
            let content = contents.next().unwrap_or(&[]);
            put_frame_fields(&mut out, seq, u64::from(seq) == count, content.len())?;
            out.put(content)?;
            out.put(tag)?;
        }
        Ok(())
    };
    in_order(count.div_ceil(per_run), new_run, fill, drain)?;
    check_not_grown(input, len, "encryption")?;
    message.finish(out)?;
    Ok(len)
}

/// Consecutive frames of a message in [`encrypt_at`] or [`decrypt_at`], read together: their
/// bytes, the first one's number and how many there are (and, encrypting, their tags).
struct Run {
    buf: Zeroizing<Vec<u8>>,
    first: u64,
    frames: usize,
    tags: Vec<[u8; TAG_LEN]>,
}

/// Fills runs `0..runs` (`fill`: read and seal or open) on every core, run r on worker
/// r % workers, and hands each to `drain` (write) on this thread, in order; buffers go back to
/// their worker for reuse, and at most two filled runs wait per worker, so memory stays bounded
/// whatever the size. The first error in run order is returned; the workers then stop.
fn in_order<T: Send>(
    runs: u64,
    new: impl Fn() -> T + Sync,
    fill: impl Fn(u64, &mut T) -> Result<(), EsdkError> + Sync,
    mut drain: impl FnMut(&T) -> Result<(), EsdkError>,
) -> Result<(), EsdkError> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(runs as usize);
    if workers <= 1 {
        let mut run = new();
        for r in 0..runs {
            fill(r, &mut run)?;
            drain(&run)?;
        }
        return Ok(());
    }
    std::thread::scope(|s| {
        let mut filled = Vec::with_capacity(workers);
        let mut spare = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<T, EsdkError>>(2);
            let (back, pool) = std::sync::mpsc::channel::<T>();
            let (new, fill) = (&new, &fill);
            s.spawn(move || {
                for r in (w as u64..runs).step_by(workers) {
                    let mut run = pool.try_recv().unwrap_or_else(|_| new());
                    let result = fill(r, &mut run).map(|()| run);
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        return;
                    }
                }
            });
            filled.push(rx);
            spare.push(back);
        }
        for r in 0..runs as usize {
            let run =
                filled[r % workers].recv().map_err(|_| EsdkError::Invalid("a frame worker panicked".into()))??;
            drain(&run)?;
            let _ = spare[r % workers].send(run);
        }
        Ok(())
    })
}

/// Fills `buf` from `offset` of an input that held `len` bytes when `what` began.
fn read_exact_at<R: ReadAt + ?Sized>(
    input: &R,
    buf: &mut [u8],
    offset: u64,
    len: u64,
    what: &str,
) -> Result<(), EsdkError> {
    let mut n = 0;
    while n < buf.len() {
        match input.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => {
                return Err(EsdkError::Invalid(format!(
                    "the input ended at byte {} of the {len} it held when {what} began: it changed while it was read",
                    offset + n as u64
                )))
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A message being encrypted: what sealing its frames and finishing it need.
struct Sealer {
    message_id: [u8; MESSAGE_ID_LEN],
    keys: MessageKeys,
    signer: Option<EcdsaKeyPair>,
}

impl Sealer {
    /// Gets the data key from `keyring` and writes the header and its tag to `output`.
    fn begin<'w, W: Write>(
        keyring: &dyn Keyring,
        context: &EncryptionContext,
        options: EncryptOptions,
        output: &'w mut W,
    ) -> Result<(Self, Out<'w, W>), EsdkError> {
        let suite = options.suite;
        if options.frame_length == 0 {
            return Err(EsdkError::Invalid("the frame length must be at least 1 byte".into()));
        }
        if context.contains_key(PUBLIC_KEY_CONTEXT_KEY) {
            return Err(EsdkError::Invalid(format!(
                "the encryption context key {PUBLIC_KEY_CONTEXT_KEY:?} is reserved for the signing suite's public key"
            )));
        }
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut context = context.clone();
        let signer = if suite.is_signed() {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, &rng)
                .map_err(|_| EsdkError::Keyring("cannot generate the message's signing key".into()))?;
            let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, pkcs8.as_ref())
                .expect("a generated key parses");
            let compressed: aws_lc_rs::encoding::EcPublicKeyCompressedBin<'_> =
                aws_lc_rs::encoding::AsBigEndian::as_be_bytes(pair.public_key())
                    .map_err(|_| EsdkError::Keyring("cannot encode the message's public key".into()))?;
            context.insert(PUBLIC_KEY_CONTEXT_KEY.into(), STANDARD.encode(compressed.as_ref()));
            Some(pair)
        } else {
            None
        };
        let mut materials = EncryptionMaterials {
            suite,
            context,
            data_key: None,
            encrypted_data_keys: Vec::new(),
            plaintext_length: options.plaintext_length,
        };
        keyring.on_encrypt(&mut materials)?;
        let EncryptionMaterials { context, data_key, encrypted_data_keys, .. } = materials;
        let data_key = data_key.ok_or_else(|| EsdkError::Keyring("the keyring produced no data key".into()))?;
        if encrypted_data_keys.is_empty() {
            return Err(EsdkError::Keyring("the keyring wrapped the data key under no key".into()));
        }
        let message_id: [u8; MESSAGE_ID_LEN] = crate::random::array();
        let keys = derive_keys(suite, &data_key, &message_id);

        let commitment: [u8; COMMITMENT_LEN] = *keys.commitment;
        let header =
            header_body(suite, &message_id, &context, &encrypted_data_keys, options.frame_length, &commitment)?;
        let tag = keys
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0u8; IV_LEN]), Aad::from(&header), &mut [])
            .expect("sealing an empty plaintext cannot fail");

        let mut out = Out { w: output, digest: signer.as_ref().map(|_| digest::Context::new(&digest::SHA384)) };
        out.put(&header)?;
        out.put(tag.as_ref())?;
        Ok((Self { message_id, keys, signer }, out))
    }

    /// Seals frame `f` in place, its tag after its content.
    fn seal(&self, f: &mut Frame) {
        let tag = self.seal_detached(f.seq, f.last, &mut f.buf[..f.len]);
        f.buf[f.len..f.len + TAG_LEN].copy_from_slice(&tag);
    }

    /// Seals the content of frame `seq` in place and returns its tag.
    fn seal_detached(&self, seq: u32, last: bool, content: &mut [u8]) -> [u8; TAG_LEN] {
        let aad = body_aad(&self.message_id, last, seq, content.len() as u64);
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(frame_iv(seq)), Aad::from(&aad), content)
            .expect("frames are far below AES-GCM's limit");
        tag.as_ref().try_into().expect("a 16-byte tag")
    }

    /// Writes the signature (signed suite) and flushes.
    fn finish<W: Write>(self, mut out: Out<'_, W>) -> Result<(), EsdkError> {
        if let (Some(pair), Some(d)) = (self.signer, out.digest.take()) {
            let sig =
                pair.sign_digest(&d.finish()).map_err(|_| EsdkError::Keyring("signing the message failed".into()))?;
            let sig = sig.as_ref();
            out.put(&(sig.len() as u16).to_be_bytes())?;
            out.put(sig)?;
        }
        out.w.flush()?;
        Ok(())
    }
}

/// Writes one sealed frame: its header fields, content and tag.
fn put_frame<W: Write>(out: &mut Out<'_, W>, f: &Frame) -> Result<(), EsdkError> {
    put_frame_fields(out, f.seq, f.last, f.len)?;
    out.put(&f.buf[..f.len + TAG_LEN])
}

/// Writes the fields before frame `seq`'s content: its number and IV, and for the final frame the
/// final-frame marker before them and the content's length after.
fn put_frame_fields<W: Write>(out: &mut Out<'_, W>, seq: u32, last: bool, len: usize) -> Result<(), EsdkError> {
    if last {
        out.put(&FINAL_FRAME_MARKER.to_be_bytes())?;
    }
    out.put(&seq.to_be_bytes())?;
    out.put(&frame_iv(seq))?;
    if last {
        out.put(&(len as u32).to_be_bytes())?;
    }
    Ok(())
}

/// Plaintext bytes of the consecutive frames one worker reads and seals at a time in
/// [`encrypt_at`] (fewer hand-overs between threads than frame by frame).
const RUN_BYTES: usize = 1024 * 1024;

/// Plaintext bytes of the frames processed together (per batch, in memory at once).
const BATCH_BYTES: usize = 4 * 1024 * 1024;

fn frames_per_batch(frame_len: usize) -> usize {
    (BATCH_BYTES / frame_len.max(1)).clamp(1, 4096)
}

/// One frame in flight: its buffer (content and room for the tag), content length, number, and
/// whether it is the final frame.
struct Frame {
    buf: Zeroizing<Vec<u8>>,
    len: usize,
    seq: u32,
    last: bool,
}

impl Frame {
    fn new(frame_len: usize) -> Self {
        Self { buf: Zeroizing::new(vec![0u8; frame_len + TAG_LEN]), len: 0, seq: 0, last: false }
    }
}

/// Cuts the plaintext into frames, a batch at a time. A frame is the final one when the input ends
/// inside it, or right after it (then it is full).
struct PlainFrames<'a, R: Read> {
    input: &'a mut R,
    frame_len: usize,
    per_batch: usize,
    declared: Option<u64>,
    /// The frame read ahead (to tell whether the one before it is the last).
    next: Frame,
    seq: u32,
    total: u64,
    /// The final frame has been handed out.
    done: bool,
    /// Buffers to reuse.
    pool: Vec<Frame>,
}

impl<'a, R: Read> PlainFrames<'a, R> {
    fn new(input: &'a mut R, options: EncryptOptions) -> Result<Self, EsdkError> {
        let frame_len = options.frame_length as usize;
        let mut next = Frame::new(frame_len);
        next.len = read_full(input, &mut next.buf[..frame_len])?;
        Ok(Self {
            input,
            frame_len,
            per_batch: frames_per_batch(frame_len),
            declared: options.plaintext_length,
            next,
            seq: 1,
            total: 0,
            done: false,
            pool: Vec::new(),
        })
    }

    fn batch(&mut self) -> Result<Vec<Frame>, EsdkError> {
        let mut batch = Vec::with_capacity(self.per_batch);
        while batch.len() < self.per_batch && !self.done {
            let spare = self.pool.pop().unwrap_or_else(|| Frame::new(self.frame_len));
            let mut frame = std::mem::replace(&mut self.next, spare);
            frame.seq = self.seq;
            self.total += frame.len as u64;
            if self.declared.is_some_and(|n| self.total > n) {
                return Err(EsdkError::Invalid("the input is longer than its declared length".into()));
            }
            if frame.len == self.frame_len {
                self.next.len = read_full(self.input, &mut self.next.buf[..self.frame_len])?;
            } else {
                self.next.len = 0;
            }
            frame.last = frame.len < self.frame_len || self.next.len == 0;
            if frame.last {
                if let Some(n) = self.declared.filter(|n| *n != self.total) {
                    return Err(EsdkError::Invalid(format!(
                        "the input was {} bytes, not the {n} declared",
                        self.total
                    )));
                }
                self.done = true;
            } else {
                self.seq = self.seq.checked_add(1).filter(|s| *s != FINAL_FRAME_MARKER).ok_or_else(|| {
                    EsdkError::Invalid(
                        "the input needs more frames than a message holds; use a larger frame length".into(),
                    )
                })?;
            }
            batch.push(frame);
        }
        Ok(batch)
    }
}

/// Reads the body's frames a batch at a time, checking their numbers, IVs and lengths.
struct CipherFrames {
    frame_length: u32,
    per_batch: usize,
    expected: u32,
    total: u64,
    /// The final frame has been read.
    done: bool,
    pool: Vec<Frame>,
}

impl CipherFrames {
    fn batch<R: Read>(&mut self, r: &mut In<'_, R>) -> Result<Vec<Frame>, EsdkError> {
        let mut batch = Vec::with_capacity(self.per_batch);
        while batch.len() < self.per_batch && !self.done {
            let first = r.u32("a frame")?;
            let final_frame = first == FINAL_FRAME_MARKER;
            let seq = if final_frame { r.u32("the final frame")? } else { first };
            if seq != self.expected {
                return Err(EsdkError::Malformed(format!("frame {seq} where frame {} belongs", self.expected)));
            }
            let iv: [u8; IV_LEN] = r.array("a frame")?;
            if iv != frame_iv(seq) {
                return Err(EsdkError::Malformed(format!("frame {seq} has an IV other than its sequence number")));
            }
            let len = if final_frame {
                let len = r.u32("the final frame")?;
                if len > self.frame_length {
                    return Err(EsdkError::Malformed(format!(
                        "the final frame holds {len} bytes, more than the frame length {}",
                        self.frame_length
                    )));
                }
                len as usize
            } else {
                self.frame_length as usize
            };
            let mut frame = self.pool.pop().unwrap_or_else(|| Frame::new(self.frame_length as usize));
            r.exact(&mut frame.buf[..len + TAG_LEN], if final_frame { "the final frame" } else { "a frame" })?;
            (frame.len, frame.seq, frame.last) = (len, seq, final_frame);
            self.total += len as u64;
            batch.push(frame);
            if final_frame {
                self.done = true;
            } else {
                self.expected = self
                    .expected
                    .checked_add(1)
                    .filter(|s| *s != FINAL_FRAME_MARKER)
                    .ok_or_else(|| EsdkError::Malformed("more frames than a message can hold".into()))?;
            }
        }
        Ok(batch)
    }
}

/// Runs `work` on every frame, spread over all cores but one (the reader of the next batch runs
/// on that one); the first error (in frame order) is returned.
fn in_parallel(
    frames: &mut [Frame],
    work: impl Fn(&mut Frame) -> Result<(), EsdkError> + Sync,
) -> Result<(), EsdkError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.saturating_sub(1).max(1).min(frames.len());
    if workers <= 1 {
        return frames.iter_mut().try_for_each(&work);
    }
    let chunk = frames.len().div_ceil(workers);
    let work = &work;
    std::thread::scope(|s| {
        let handles: Vec<_> =
            frames.chunks_mut(chunk).map(|part| s.spawn(move || part.iter_mut().try_for_each(work))).collect();
        let mut result = Ok(());
        for h in handles {
            let r = h.join().unwrap_or_else(|_| Err(EsdkError::Invalid("a frame worker panicked".into())));
            if result.is_ok() {
                result = r;
            }
        }
        result
    })
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the message, keeping what it read for the header tag and the signature.
struct In<'a, R: Read> {
    r: &'a mut R,
    /// Bytes of the header body so far (while reading the header).
    header: Option<Vec<u8>>,
    digest: Option<digest::Context>,
    /// Digest what is read if the message turns out to be signed (not when only looking).
    sign: bool,
}

impl<R: Read> In<'_, R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), EsdkError> {
        if read_full(self.r, buf)? != buf.len() {
            return Err(EsdkError::Malformed(format!("the message ends inside {what}")));
        }
        if let Some(h) = &mut self.header {
            h.extend_from_slice(buf);
        }
        if let Some(d) = &mut self.digest {
            d.update(buf);
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], EsdkError> {
        let mut b = [0u8; N];
        self.exact(&mut b, what)?;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8, EsdkError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, EsdkError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, EsdkError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    /// A field with a u16 length prefix (so at most 64 KiB is allocated for it).
    fn field(&mut self, what: &str) -> Result<Vec<u8>, EsdkError> {
        let mut v = vec![0u8; usize::from(self.u16(what)?)];
        self.exact(&mut v, what)?;
        Ok(v)
    }
}

/// Parses the key-value pairs of a header's AAD (exactly `bytes`).
fn parse_pairs(bytes: &[u8]) -> Result<EncryptionContext, EsdkError> {
    let bad = |why: &str| EsdkError::Malformed(format!("encryption context: {why}"));
    let mut context = EncryptionContext::new();
    if bytes.is_empty() {
        return Ok(context);
    }
    let mut rest = bytes;
    let mut take = |n: usize| -> Result<&[u8], EsdkError> {
        if rest.len() < n {
            return Err(bad("a length runs past its end"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes"));
    if count == 0 {
        return Err(bad("a non-empty context field with zero pairs"));
    }
    let mut previous: Option<String> = None;
    for _ in 0..count {
        let mut field = || -> Result<String, EsdkError> {
            let len = u16::from_be_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
            String::from_utf8(take(len)?.to_vec()).map_err(|_| bad("a key or value is not UTF-8"))
        };
        let (k, v) = (field()?, field()?);
        if previous.as_ref().is_some_and(|p| p.as_bytes() >= k.as_bytes()) {
            return Err(bad("keys are not sorted, or a key repeats"));
        }
        previous = Some(k.clone());
        context.insert(k, v);
    }
    if !rest.is_empty() {
        return Err(bad("bytes after the last pair"));
    }
    Ok(context)
}

/// A message's header: parsed, every length bounded, not yet authenticated (that needs the data
/// key: [`Header::authenticate`]).
#[derive(Debug, Clone)]
pub struct Header {
    /// The suite.
    pub suite: Suite,
    /// The message id.
    pub message_id: [u8; MESSAGE_ID_LEN],
    /// The encryption context.
    pub context: EncryptionContext,
    /// The encrypted data keys.
    pub encrypted_data_keys: Vec<EncryptedDataKey>,
    /// The frame length.
    pub frame_length: u32,
    commitment: [u8; COMMITMENT_LEN],
    /// The header body as read (what the tag covers).
    body: Vec<u8>,
    tag: [u8; TAG_LEN],
}

impl Header {
    fn read<R: Read>(r: &mut In<'_, R>, options: &DecryptOptions) -> Result<Self, EsdkError> {
        r.header = Some(Vec::with_capacity(512));
        let version = r.u8("the version")?;
        match version {
            VERSION_2 => {}
            0x01 => {
                return Err(EsdkError::Unsupported(
                    "message format version 1 (non-committing suites); custody reads version 2 only".into(),
                ))
            }
            v => return Err(EsdkError::Malformed(format!("unknown message format version 0x{v:02x}"))),
        }
        let suite = Suite::from_id(r.u16("the algorithm suite")?)?;
        if suite.is_signed() && r.sign {
            let mut d = digest::Context::new(&digest::SHA384);
            d.update(&[version]);
            d.update(&suite.id().to_be_bytes());
            r.digest = Some(d);
        }
        let message_id: [u8; MESSAGE_ID_LEN] = r.array("the message id")?;
        let context = parse_pairs(&r.field("the encryption context")?)?;
        let count = r.u16("the encrypted data key count")?;
        if count == 0 {
            return Err(EsdkError::Malformed("the header holds no encrypted data key".into()));
        }
        if count > options.max_encrypted_data_keys {
            return Err(EsdkError::Malformed(format!(
                "the header holds {count} encrypted data keys; the limit is {}",
                options.max_encrypted_data_keys
            )));
        }
        let mut keys = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let provider_id = String::from_utf8(r.field("an encrypted data key")?)
                .map_err(|_| EsdkError::Malformed("a key provider id is not UTF-8".into()))?;
            let provider_info = r.field("an encrypted data key")?;
            let ciphertext = r.field("an encrypted data key")?;
            keys.push(EncryptedDataKey { provider_id, provider_info, ciphertext });
        }
        match r.u8("the content type")? {
            CONTENT_TYPE_FRAMED => {}
            0x01 => {
                return Err(EsdkError::Unsupported("non-framed message bodies; custody reads framed bodies".into()))
            }
            t => return Err(EsdkError::Malformed(format!("unknown content type 0x{t:02x}"))),
        }
        let frame_length = r.u32("the frame length")?;
        if frame_length == 0 {
            return Err(EsdkError::Malformed("a framed message with frame length 0".into()));
        }
        if frame_length > options.max_frame_length {
            return Err(EsdkError::Malformed(format!(
                "frame length {frame_length} is above the limit of {} bytes",
                options.max_frame_length
            )));
        }
        let commitment: [u8; COMMITMENT_LEN] = r.array("the key commitment")?;
        let body = r.header.take().expect("reading the header");
        let tag: [u8; TAG_LEN] = r.array("the header authentication tag")?;
        if suite.is_signed() != context.contains_key(PUBLIC_KEY_CONTEXT_KEY) {
            return Err(EsdkError::Malformed(format!(
                "the {PUBLIC_KEY_CONTEXT_KEY} context key must be present exactly in signed messages"
            )));
        }
        for (k, v) in &options.required_context {
            if context.get(k) != Some(v) {
                return Err(EsdkError::ContextMismatch(format!("{k}={v}")));
            }
        }
        Ok(Self { suite, message_id, context, encrypted_data_keys: keys, frame_length, commitment, body, tag })
    }

    /// Unwraps the data key with `keyring`, then checks the key commitment (in constant time) and
    /// the header's tag. Returns the message's keys and the data key.
    fn authenticate(&self, keyring: &dyn Keyring) -> Result<(MessageKeys, DataKey), EsdkError> {
        let data_key = keyring.on_decrypt(self.suite, &self.context, &self.encrypted_data_keys)?.ok_or_else(|| {
            let names: Vec<String> = self
                .encrypted_data_keys
                .iter()
                .map(|k| format!("{}/{}", k.provider_id, String::from_utf8_lossy(key_name_hint(&k.provider_info))))
                .collect();
            EsdkError::NoDataKey(names.join(", "))
        })?;
        let keys = derive_keys(self.suite, &data_key, &self.message_id);
        if aws_lc_rs::constant_time::verify_slices_are_equal(&keys.commitment[..], &self.commitment).is_err() {
            return Err(EsdkError::Integrity("key commitment"));
        }
        let mut tag = self.tag;
        keys.key
            .open_in_place(Nonce::assume_unique_for_key([0u8; IV_LEN]), Aad::from(&self.body), &mut tag)
            .map_err(|_| EsdkError::Integrity("header authentication tag"))?;
        Ok((keys, data_key))
    }
}

/// Reads a message's header (for tools that only look: which keys wrap it, its context).
pub fn read_header<R: Read>(input: &mut R, options: &DecryptOptions) -> Result<Header, EsdkError> {
    Header::read(&mut In { r: input, header: None, digest: None, sign: false }, options)
}

/// What [`rewrap`] did.
#[derive(Debug, Clone)]
pub struct Rewrapped {
    /// The new header's encrypted data keys.
    pub encrypted_data_keys: Vec<EncryptedDataKey>,
    /// Bytes of the body (and footer) copied unchanged.
    pub body_bytes: u64,
}

/// Re-wraps a message's data key: given its `header` (from [`read_header`]) and the rest of the
/// message (`rest`, read on from where the header ended), the data key is unwrapped with `old`
/// (and the header authenticated with it), wrapped again by `new`, and the message written out
/// with the new encrypted data keys and a new header tag; message id, context, commitment and
/// every body byte stay as they were. Signed messages cannot be re-wrapped (their signature
/// covers the header and its key is gone): they are refused as [`EsdkError::Unsupported`].
pub fn rewrap<R: Read, W: Write>(
    header: &Header,
    old: &dyn Keyring,
    new: &dyn Keyring,
    rest: &mut R,
    output: &mut W,
) -> Result<Rewrapped, EsdkError> {
    if header.suite.is_signed() {
        return Err(EsdkError::Unsupported(
            "signed messages (suite 0x0578) cannot be re-wrapped: their signature covers the header; decrypt and encrypt them again".into(),
        ));
    }
    let (keys, data_key) = header.authenticate(old)?;
    let mut materials = EncryptionMaterials {
        suite: header.suite,
        context: header.context.clone(),
        data_key: Some(data_key),
        encrypted_data_keys: Vec::new(),
        plaintext_length: None,
    };
    new.on_encrypt(&mut materials)?;
    let body = header_body(
        header.suite,
        &header.message_id,
        &header.context,
        &materials.encrypted_data_keys,
        header.frame_length,
        &header.commitment,
    )?;
    let tag = keys
        .key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0u8; IV_LEN]), Aad::from(&body), &mut [])
        .expect("sealing an empty plaintext cannot fail");
    output.write_all(&body)?;
    output.write_all(tag.as_ref())?;
    let body_bytes = io::copy(rest, output)?;
    output.flush()?;
    Ok(Rewrapped { encrypted_data_keys: materials.encrypted_data_keys, body_bytes })
}

/// The header body: everything the header tag covers.
fn header_body(
    suite: Suite,
    message_id: &[u8; MESSAGE_ID_LEN],
    context: &EncryptionContext,
    encrypted_data_keys: &[EncryptedDataKey],
    frame_length: u32,
    commitment: &[u8; COMMITMENT_LEN],
) -> Result<Vec<u8>, EsdkError> {
    let mut header = Vec::with_capacity(256);
    header.push(VERSION_2);
    header.extend_from_slice(&suite.id().to_be_bytes());
    header.extend_from_slice(message_id);
    put_field(&mut header, &serialize_pairs(context)?).expect("serialize_pairs bounds the context");
    let count = u16::try_from(encrypted_data_keys.len())
        .map_err(|_| EsdkError::Invalid("more than 65535 encrypted data keys".into()))?;
    header.extend_from_slice(&count.to_be_bytes());
    for edk in encrypted_data_keys {
        for field in [edk.provider_id.as_bytes(), &edk.provider_info, &edk.ciphertext] {
            put_field(&mut header, field)
                .ok_or_else(|| EsdkError::Invalid("an encrypted data key field is larger than 64 KiB".into()))?;
        }
    }
    header.push(CONTENT_TYPE_FRAMED);
    header.extend_from_slice(&frame_length.to_be_bytes());
    header.extend_from_slice(commitment);
    Ok(header)
}

/// Decrypts one message from `input` to `output` with a data key from `keyring`. Every frame is
/// authenticated before its plaintext is written; the signature (signed suite) is verified at the
/// end, and any byte after the message is an error. See the module's caution on streaming.
pub fn decrypt<R: Read, W: Write>(
    keyring: &dyn Keyring,
    options: &DecryptOptions,
    input: &mut R,
    output: &mut W,
) -> Result<MessageInfo, EsdkError> {
    let mut r = In { r: input, header: None, digest: None, sign: true };
    let header = Header::read(&mut r, options)?;
    let verifier = if header.suite.is_signed() {
        let b64 = &header.context[PUBLIC_KEY_CONTEXT_KEY];
        let point =
            STANDARD.decode(b64).map_err(|_| EsdkError::Malformed("the message's public key is not base64".into()))?;
        Some(point)
    } else {
        None
    };
    let (message_keys, data_key) = header.authenticate(keyring)?;
    drop(data_key);
    let (message_id, frame_length) = (header.message_id, header.frame_length);

    // Body: frames are read (and their headers checked) in batches and opened in parallel, the
    // next batch being read while the current one is opened; batches are written in order, and
    // the final frame's plaintext waits for the signature check.
    let mut frames = CipherFrames {
        frame_length,
        per_batch: frames_per_batch(frame_length as usize),
        expected: 1,
        total: 0,
        done: false,
        pool: Vec::new(),
    };
    let open = |f: &mut Frame| open_frame(&message_keys, &message_id, f.seq, f.last, &mut f.buf[..f.len + TAG_LEN]);
    let mut batch = frames.batch(&mut r)?;
    let mut last_frame = None;
    while last_frame.is_none() {
        let (opened, next) = std::thread::scope(|s| {
            let opening = s.spawn(|| in_parallel(&mut batch, open).map(|()| batch));
            let next = if frames.done { Ok(Vec::new()) } else { frames.batch(&mut r) };
            (opening.join().unwrap_or_else(|_| Err(EsdkError::Invalid("a frame worker panicked".into()))), next)
        });
        for f in opened? {
            if f.last {
                // Held back until the signature is checked (below).
                last_frame = Some(f);
                break;
            }
            output.write_all(&f.buf[..f.len])?;
            frames.pool.push(f);
        }
        batch = next?;
    }
    let total = frames.total;
    let last_frame = last_frame.expect("the loop ends at the final frame");
    if let Some(point) = verifier {
        let digest = r.digest.take().expect("signed messages are digested").finish();
        let len = r.u16("the signature")? as usize;
        let mut sig = vec![0u8; len];
        if read_full(r.r, &mut sig)? != len {
            return Err(EsdkError::Malformed("the message ends inside the signature".into()));
        }
        if !verify_p384(&point, &digest, &sig) {
            return Err(EsdkError::Integrity("signature"));
        }
    }
    let mut extra = [0u8; 1];
    if read_full(r.r, &mut extra)? != 0 {
        return Err(EsdkError::Malformed("bytes after the end of the message".into()));
    }
    output.write_all(&last_frame.buf[..last_frame.len])?;
    output.flush()?;
    Ok(MessageInfo { header, plaintext_len: total })
}

/// Opens frame `seq` in place: `sealed` is its content and then its tag; the plaintext replaces
/// the content.
fn open_frame(
    keys: &MessageKeys,
    message_id: &[u8; MESSAGE_ID_LEN],
    seq: u32,
    last: bool,
    sealed: &mut [u8],
) -> Result<(), EsdkError> {
    let aad = body_aad(message_id, last, seq, (sealed.len() - TAG_LEN) as u64);
    keys.key
        .open_in_place(Nonce::assume_unique_for_key(frame_iv(seq)), Aad::from(&aad), sealed)
        .map(|_| ())
        .map_err(|_| EsdkError::Integrity("frame authentication tag"))
}

/// After reading an input that held `len` bytes when `what` began: an error if it holds more now.
fn check_not_grown<R: ReadAt + ?Sized>(input: &R, len: u64, what: &str) -> Result<(), EsdkError> {
    let mut beyond = [0u8; 1];
    if input.read_at(&mut beyond, len)? != 0 {
        return Err(EsdkError::Invalid(format!(
            "the input grew beyond the {len} bytes it held when {what} began: it changed while it was read"
        )));
    }
    Ok(())
}

/// Reads a [`ReadAt`] from the start, as a stream (for the header).
struct Cursor<'a, R: ReadAt + ?Sized> {
    r: &'a R,
    pos: u64,
}

impl<R: ReadAt + ?Sized> Read for Cursor<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Like [`decrypt`] (the same checks, the same result), for a message of `len` bytes that can be
/// read at any offset, such as a regular file: the body's layout follows from the header and
/// `len`, so every core reads and opens frames of its own. A signed message is read as a stream
/// (its signature covers the whole message in order). The input must hold exactly `len` bytes
/// until this returns.
pub fn decrypt_at<R: ReadAt + ?Sized, W: Write>(
    keyring: &dyn Keyring,
    options: &DecryptOptions,
    input: &R,
    len: u64,
    output: &mut W,
) -> Result<MessageInfo, EsdkError> {
    let mut cursor = Cursor { r: input, pos: 0 };
    let header = read_header(&mut cursor, options)?;
    if header.suite.is_signed() {
        // (The stream reads the header again, digesting it this time: a few hundred bytes.)
        let mut stream = io::BufReader::with_capacity(1 << 20, Cursor { r: input, pos: 0 });
        return decrypt(keyring, options, &mut stream, output);
    }
    let body = cursor.pos;
    let (message_keys, data_key) = header.authenticate(keyring)?;
    drop(data_key);
    let (message_id, frame_length) = (header.message_id, header.frame_length as usize);
    // Every frame but the last: sequence number, IV, content, tag. The last: the final-frame
    // marker, sequence number, IV, content length, content, tag.
    let full = 4 + IV_LEN + frame_length + TAG_LEN;
    let final_fields = 4 + 4 + IV_LEN + 4;
    let rest = len.saturating_sub(body);
    let Some(frames) = rest.checked_sub((final_fields + TAG_LEN) as u64) else {
        return Err(EsdkError::Malformed("the message ends inside the final frame".into()));
    };
    let count = frames / full as u64;
    let last_len = (frames % full as u64) as usize;
    if last_len > frame_length {
        return Err(EsdkError::Malformed(format!(
            "the body's {rest} bytes are not whole frames of {frame_length} bytes and a final frame"
        )));
    }
    if count + 1 >= u64::from(FINAL_FRAME_MARKER) {
        return Err(EsdkError::Malformed("more frames than a message can hold".into()));
    }
    // Checks frame `seq`'s number and IV (`fields`: what precedes its content) and opens its
    // content in place (`sealed`: the content, then the tag).
    let open = |seq: u32, last: bool, fields: &[u8], sealed: &mut [u8]| -> Result<(), EsdkError> {
        let (number, iv) = if last {
            if fields[..4] != FINAL_FRAME_MARKER.to_be_bytes() {
                return Err(EsdkError::Malformed(format!("frame {seq} where the final frame belongs")));
            }
            (&fields[4..8], &fields[8..8 + IV_LEN])
        } else {
            (&fields[..4], &fields[4..4 + IV_LEN])
        };
        let number = u32::from_be_bytes(number.try_into().expect("four bytes"));
        if number != seq {
            return Err(EsdkError::Malformed(if number == FINAL_FRAME_MARKER {
                format!("the final frame where frame {seq} belongs")
            } else {
                format!("frame {number} where frame {seq} belongs")
            }));
        }
        if iv != frame_iv(seq) {
            return Err(EsdkError::Malformed(format!("frame {seq} has an IV other than its sequence number")));
        }
        open_frame(&message_keys, &message_id, seq, last, sealed)
    };
    // Every frame but the last, in runs of consecutive frames: one read, each opened in place.
    let head = 4 + IV_LEN;
    let per_run = (RUN_BYTES / full).max(1) as u64;
    let new_run = || Run { buf: Zeroizing::new(Vec::new()), first: 0, frames: 0, tags: Vec::new() };
    let fill = |run: u64, r: &mut Run| -> Result<(), EsdkError> {
        r.first = run * per_run + 1;
        r.frames = per_run.min(count - run * per_run) as usize;
        r.buf.resize(r.frames * full, 0);
        read_exact_at(input, &mut r.buf, body + run * per_run * full as u64, len, "decryption")?;
        for (i, frame) in r.buf.chunks_mut(full).enumerate() {
            let (fields, sealed) = frame.split_at_mut(head);
            open((r.first + i as u64) as u32, false, fields, sealed)?;
        }
        Ok(())
    };
    let drain = |r: &Run| -> Result<(), EsdkError> {
        for frame in r.buf.chunks(full) {
            output.write_all(&frame[head..head + frame_length])?;
        }
        Ok(())
    };
    in_order(count.div_ceil(per_run), new_run, fill, drain)?;
    // The final frame. One that declares fewer bytes than the message holds is opened as
    // declared (as a stream reads it), and the rest are bytes after the end of the message.
    let mut last = Zeroizing::new(vec![0u8; final_fields + last_len + TAG_LEN]);
    read_exact_at(input, &mut last, body + count * full as u64, len, "decryption")?;
    let declared = u32::from_be_bytes(last[final_fields - 4..final_fields].try_into().expect("four bytes")) as usize;
    if declared > frame_length {
        return Err(EsdkError::Malformed(format!(
            "the final frame holds {declared} bytes, more than the frame length {frame_length}"
        )));
    }
    if declared > last_len {
        return Err(EsdkError::Malformed("the message ends inside the final frame".into()));
    }
    let (fields, sealed) = last.split_at_mut(final_fields);
    open((count + 1) as u32, true, fields, &mut sealed[..declared + TAG_LEN])?;
    if declared < last_len {
        return Err(EsdkError::Malformed("bytes after the end of the message".into()));
    }
    check_not_grown(input, len, "decryption")?;
    output.write_all(&sealed[..declared])?;
    output.flush()?;
    Ok(MessageInfo { header, plaintext_len: count * frame_length as u64 + declared as u64 })
}

/// The printable start of a provider info (a raw key's name, a KMS key's ARN), for messages.
fn key_name_hint(info: &[u8]) -> &[u8] {
    let end = info.iter().position(|b| !(b.is_ascii_graphic())).unwrap_or(info.len());
    &info[..end.min(200)]
}
