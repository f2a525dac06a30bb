//! Against a real SoftHSM2 token: the wrapping key is created non-extractable, wraps and unwraps
//! the root, and every way of getting it wrong says what is wrong.

use cryptoki::object::{Attribute, AttributeType};
use custody_crypto::SecretBytes;
use custody_hsm::{softhsm, Hsm, HsmConfig, HsmError};

fn config(token: &str, pin: &str) -> HsmConfig {
    HsmConfig {
        module: softhsm::MODULE.into(),
        token_label: token.into(),
        key_label: "custody-root-wrap".into(),
        pin: SecretBytes::copy_from(pin.as_bytes()),
    }
}

// One test: SoftHSM2 reads SOFTHSM2_CONF once per process.
#[test]
fn the_root_is_wrapped_by_a_key_that_never_leaves_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let conf = softhsm::init_token(dir.path(), "custody", "1234").unwrap();
    std::env::set_var("SOFTHSM2_CONF", &conf);

    // No key yet, and not asked to create one.
    assert!(matches!(Hsm::open(&config("custody", "1234"), false), Err(HsmError::KeyNotFound(_))));
    let hsm = Hsm::open(&config("custody", "1234"), true).unwrap();
    let root = [7u8; 32];
    let wrapped = hsm.wrap(&root, b"store-1").unwrap();
    assert_eq!(wrapped.len(), 12 + 32 + 16);
    assert!(!wrapped.windows(32).any(|w| w == root));
    assert_eq!(hsm.unwrap(&wrapped, b"store-1").unwrap().expose_secret(), &root);
    // Bound to the store: another store id, or a changed byte, does not open.
    let r = hsm.unwrap(&wrapped, b"store-2");
    assert!(matches!(r, Err(HsmError::Unwrap)), "{r:?}");
    let mut bad = wrapped.clone();
    bad[20] ^= 1;
    assert!(matches!(hsm.unwrap(&bad, b"store-1"), Err(HsmError::Unwrap)));
    assert!(matches!(hsm.unwrap(&wrapped[..20], b"store-1"), Err(HsmError::Unwrap)));
    drop(hsm);

    // Opening again finds the same key (it was created once, on the token).
    let again = Hsm::open(&config("custody", "1234"), true).unwrap();
    assert_eq!(again.unwrap(&wrapped, b"store-1").unwrap().expose_secret(), &root);
    drop(again);

    // The key is sensitive and not extractable: its value cannot be read out.
    let ctx = cryptoki::context::Pkcs11::new(softhsm::MODULE).unwrap();
    ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx.get_slots_with_initialized_token().unwrap()[0];
    let session = ctx.open_ro_session(slot).unwrap();
    session.login(cryptoki::session::UserType::User, Some(&cryptoki::types::AuthPin::new("1234".into()))).unwrap();
    let key = session.find_objects(&[Attribute::Label(b"custody-root-wrap".to_vec())]).unwrap()[0];
    let attrs = session.get_attributes(key, &[AttributeType::Sensitive, AttributeType::Extractable]).unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)) && attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
    assert!(session.get_attributes(key, &[AttributeType::Value]).map(|a| a.is_empty()).unwrap_or(true));
    drop(session);
    drop(ctx);

    // Wrong PIN, missing token, missing module: each says so.
    assert!(matches!(Hsm::open(&config("custody", "9999"), false), Err(HsmError::WrongPin)));
    assert!(matches!(Hsm::open(&config("elsewhere", "1234"), false), Err(HsmError::TokenNotFound(_))));
    let missing = HsmConfig { module: "/nonexistent/libpkcs11.so".into(), ..config("custody", "1234") };
    let e = Hsm::open(&missing, false).unwrap_err();
    assert!(matches!(e, HsmError::Module { .. }) && e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
}
