//! custody's root of trust in hardware (PKCS#11, through the `cryptoki` crate).
//!
//! The root key is encrypted (AES-256-GCM, `CKM_AES_GCM`) by an AES key that lives in the token,
//! is created there, and can never leave it (`CKA_SENSITIVE`, not `CKA_EXTRACTABLE`). custody
//! stores only the wrapped root; a server unwraps it at start (auto-unseal) and never writes the
//! unwrapped root anywhere. Tested against SoftHSM2.
//!
//! ```no_run
//! # use custody_hsm::{Hsm, HsmConfig};
//! let hsm = Hsm::open(&HsmConfig {
//!     module: "/usr/lib/softhsm/libsofthsm2.so".into(),
//!     token_label: "custody".into(),
//!     key_label: "custody-root-wrap".into(),
//!     pin: custody_crypto::SecretBytes::copy_from(b"1234"),
//! }, true)?;
//! let wrapped = hsm.wrap(b"32 bytes of root key ............", b"store id")?;
//! assert_eq!(hsm.unwrap(&wrapped, b"store id")?.expose_secret(), b"32 bytes of root key ............");
//! # Ok::<(), custody_hsm::HsmError>(())
//! ```

use std::fmt;
use std::path::PathBuf;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use custody_crypto::SecretBytes;

/// GCM nonce length; the nonce is stored before the ciphertext.
const NONCE: usize = 12;

/// Where the wrapping key lives and how to reach it.
pub struct HsmConfig {
    /// The token vendor's PKCS#11 module (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// Label of the token (slot) to use.
    pub token_label: String,
    /// Label of the AES wrapping key in the token.
    pub key_label: String,
    /// The user PIN (read from a file; never logged).
    pub pin: SecretBytes,
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("key_label", &self.key_label)
            .finish_non_exhaustive()
    }
}

/// What went wrong, said so that an operator knows what to check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// The module could not be loaded or initialized.
    #[error("cannot load the PKCS#11 module {module}: {reason}")]
    Module {
        /// module path
        module: PathBuf,
        /// why
        reason: String,
    },
    /// No token with this label is present.
    #[error("no PKCS#11 token labelled {0:?} is present (is the HSM connected, and the label right?)")]
    TokenNotFound(String),
    /// The token refused the PIN.
    #[error("the token refused the PIN (check the PIN file; repeated failures may lock the token)")]
    WrongPin,
    /// No wrapping key with this label, and creating one was not asked for.
    #[error("the token has no key labelled {0:?} (it is created by `custody init --seal pkcs11`)")]
    KeyNotFound(String),
    /// More than one key has the label.
    #[error("the token has several keys labelled {0:?}; labels must be unique")]
    AmbiguousKey(String),
    /// The wrapped root did not decrypt: another token or key, or the stored value was changed.
    #[error("the wrapped root key does not open with this token's key (another token or key label?)")]
    Unwrap,
    /// Any other device error.
    #[error("PKCS#11 error: {0}")]
    Device(String),
}

fn device(e: CkError) -> HsmError {
    HsmError::Device(e.to_string())
}

/// An open, logged-in session with the wrapping key found (or created).
pub struct Hsm {
    // Declared before `_ctx`: the session closes before the library is finalized.
    session: Session,
    key: ObjectHandle,
    _ctx: Pkcs11,
}

impl fmt::Debug for Hsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hsm").finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads the module, finds the token, logs in, and finds the wrapping key (creating it, as a
    /// non-extractable AES-256 key, if `create_key` and it is absent).
    pub fn open(config: &HsmConfig, create_key: bool) -> Result<Self, HsmError> {
        let module_err = |reason: String| HsmError::Module { module: config.module.clone(), reason };
        let ctx = Pkcs11::new(&config.module).map_err(|e| module_err(e.to_string()))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(module_err(e.to_string())),
        }
        let mut found = None;
        for slot in ctx.get_slots_with_initialized_token().map_err(device)? {
            let info = ctx.get_token_info(slot).map_err(device)?;
            if info.label().trim_end() == config.token_label {
                found = Some(slot);
                break;
            }
        }
        let slot = found.ok_or_else(|| HsmError::TokenNotFound(config.token_label.clone()))?;
        let session = ctx.open_rw_session(slot).map_err(device)?;
        let pin = std::str::from_utf8(config.pin.expose_secret())
            .map_err(|_| HsmError::Device("the PIN is not UTF-8 text".into()))?;
        match session.login(UserType::User, Some(&AuthPin::new(pin.trim_end_matches(['\n', '\r']).into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange, _)) => {
                return Err(HsmError::WrongPin)
            }
            Err(e) => return Err(device(e)),
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(config.key_label.as_bytes().to_vec()),
        ];
        let keys = session.find_objects(&template).map_err(device)?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] if create_key => {
                let template = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(config.key_label.as_bytes().to_vec()),
                ];
                let key = session.generate_key(&Mechanism::AesKeyGen, &template).map_err(device)?;
                tracing::info!(token = %config.token_label, key = %config.key_label, "created the root wrapping key in the token");
                key
            }
            [] => return Err(HsmError::KeyNotFound(config.key_label.clone())),
            _ => return Err(HsmError::AmbiguousKey(config.key_label.clone())),
        };
        Ok(Self { session, key, _ctx: ctx })
    }

    /// Encrypts `plaintext` with the token's key (AES-GCM, `aad` authenticated):
    /// nonce ‖ ciphertext ‖ tag.
    pub fn wrap(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, HsmError> {
        let mut nonce: [u8; NONCE] = custody_crypto::random::array();
        let params = GcmParams::new(&mut nonce, aad, 128.into()).map_err(device)?;
        let ct = self.session.encrypt(&Mechanism::AesGcm(params), self.key, plaintext).map_err(device)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts what [`Hsm::wrap`] produced with the same `aad`.
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<SecretBytes, HsmError> {
        if wrapped.len() < NONCE + 16 {
            return Err(HsmError::Unwrap);
        }
        let mut nonce: [u8; NONCE] = wrapped[..NONCE].try_into().expect("length checked");
        let params = GcmParams::new(&mut nonce, aad, 128.into()).map_err(device)?;
        match self.session.decrypt(&Mechanism::AesGcm(params), self.key, &wrapped[NONCE..]) {
            Ok(plain) => Ok(SecretBytes::new(plain)),
            // A failed GCM tag check: most tokens say the data is invalid; SoftHSM2 says
            // CKR_GENERAL_ERROR.
            Err(CkError::Pkcs11(
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange | RvError::GeneralError,
                _,
            )) => Err(HsmError::Unwrap),
            Err(e) => Err(device(e)),
        }
    }
}

/// SoftHSM2 (Debian package `softhsm2`), for local development and tests: a token in a
/// directory of its own, without touching the system's tokens.
pub mod softhsm {
    use std::path::{Path, PathBuf};

    /// Where Debian installs the module.
    pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

    /// Writes a SoftHSM2 configuration whose tokens live under `dir`, initializes a token
    /// `label` with the user `pin` in it, and returns the configuration file. Set
    /// `SOFTHSM2_CONF` to it before the module is loaded.
    pub fn init_token(dir: &Path, label: &str, pin: &str) -> Result<PathBuf, String> {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|e| format!("cannot create {}: {e}", tokens.display()))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", "so-pin-0000"])
            .output()
            .map_err(|e| format!("softhsm2-util does not run ({e}): install the Debian package softhsm2"))?;
        if !out.status.success() {
            return Err(format!("softhsm2-util --init-token failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(conf)
    }
}
