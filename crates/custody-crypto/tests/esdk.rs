//! The AWS Encryption SDK message format: the vectors made by the official SDK for Python
//! (shared/testvectors/esdk-python, read in place), round trips of both suites, and tampering.

use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custody_crypto::esdk::{
    decrypt, decrypt_at, encrypt, encrypt_at, read_header, rewrap, DecryptOptions, EncryptOptions, EncryptionContext,
    EsdkError, Keyring, MultiKeyring, RawAesKeyring, Suite,
};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    std::env::var("CUSTODY_TESTVECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testvectors"))
        .join("esdk-python")
}

fn manifest() -> Value {
    let path = vectors_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {} ({e}); set CUSTODY_TESTVECTORS to the shared test vectors", path.display())
    });
    serde_json::from_str(&text).unwrap()
}

fn vector_keyring(m: &Value, name: &str) -> RawAesKeyring {
    let k = &m["raw_aes_keyring"];
    let key = STANDARD.decode(k["keys"][name].as_str().unwrap()).unwrap();
    RawAesKeyring::new(k["provider_id"].as_str().unwrap(), name, &key).unwrap()
}

/// Decrypts `message` as a stream ([`decrypt`]) and read at offsets ([`decrypt_at`]): both must
/// give the same plaintext, or fail with the same class of error.
fn open(keyring: &dyn Keyring, message: &[u8]) -> Result<(Vec<u8>, custody_crypto::esdk::MessageInfo), EsdkError> {
    let mut out = Vec::new();
    let streamed = decrypt(keyring, &DecryptOptions::default(), &mut &message[..], &mut out);
    let mut at = Vec::new();
    let positional = decrypt_at(keyring, &DecryptOptions::default(), message, message.len() as u64, &mut at);
    match (&streamed, &positional) {
        (Ok(a), Ok(b)) => {
            assert!(out == at, "decrypt_at gave another plaintext");
            assert_eq!(a.plaintext_len, b.plaintext_len);
        }
        (Err(a), Err(b)) => {
            assert_eq!(std::mem::discriminant(a), std::mem::discriminant(b), "stream: {a:?}; at offsets: {b:?}")
        }
        (a, b) => panic!("decrypt and decrypt_at disagree: {:?} / {:?}", a.as_ref().err(), b.as_ref().err()),
    }
    Ok((out, streamed?))
}

/// Encrypts `plain` as a stream ([`encrypt`]) and read at offsets ([`encrypt_at`]); both messages
/// must decrypt to it. Returns the first.
fn seal(keyring: &dyn Keyring, context: &EncryptionContext, options: EncryptOptions, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = encrypt(keyring, context, options, &mut &plain[..], &mut out).unwrap();
    assert_eq!(n, plain.len() as u64);
    let mut at = Vec::new();
    let n = encrypt_at(keyring, context, options, plain, plain.len() as u64, &mut at).unwrap();
    assert_eq!(n, plain.len() as u64);
    if !options.suite.is_signed() {
        // (A signature's DER encoding varies in length.)
        assert_eq!(at.len(), out.len(), "the same message layout");
    }
    let mut back = Vec::new();
    let any = DecryptOptions { max_encrypted_data_keys: u16::MAX, max_frame_length: u32::MAX, ..Default::default() };
    decrypt(keyring, &any, &mut &at[..], &mut back).unwrap();
    assert!(back == plain, "encrypt_at's message decrypts to the plaintext");
    out
}

/// Every "ok" vector decrypts to its plaintext with the context and frame length the SDK used;
/// every "error" vector fails, and with the class of error its damage calls for.
#[test]
fn the_python_sdk_vectors() {
    let m = manifest();
    let dir = vectors_dir();
    let (mut ok, mut errors) = (0, 0);
    for t in m["tests"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let message = std::fs::read(dir.join(t["ciphertext"].as_str().unwrap())).unwrap();
        let keyring = vector_keyring(&m, t["wrapping_key"].as_str().unwrap());
        let result = open(&keyring, &message);
        match t["result"].as_str().unwrap() {
            "ok" => {
                let (plain, info) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                let expected = std::fs::read(dir.join(t["plaintext"].as_str().unwrap())).unwrap();
                assert!(plain == expected, "{name}: plaintext differs");
                let suite = u16::from_str_radix(t["suite"].as_str().unwrap(), 16).unwrap();
                assert_eq!(info.header.suite.id(), suite, "{name}");
                assert_eq!(info.header.frame_length as u64, t["frame_length"].as_u64().unwrap(), "{name}");
                let mut context = info.header.context.clone();
                if info.header.suite.is_signed() {
                    assert!(context.remove("aws-crypto-public-key").is_some(), "{name}");
                }
                let want: EncryptionContext = serde_json::from_value(t["encryption_context"].clone()).unwrap();
                assert_eq!(context, want, "{name}");
                ok += 1;
            }
            _ => {
                let e = result.err().unwrap_or_else(|| panic!("{name}: a damaged message decrypted"));
                let damage = t["damage"].as_str().unwrap();
                let fitting = match damage {
                    "flip-header-byte" => {
                        matches!(e, EsdkError::Integrity(_) | EsdkError::NoDataKey(_) | EsdkError::Malformed(_))
                    }
                    "flip-last-byte" | "flip-middle-byte" => matches!(e, EsdkError::Integrity(_)),
                    "truncate-final-frame" | "truncate-to-header" | "append-garbage" => {
                        matches!(e, EsdkError::Malformed(_))
                    }
                    "wrong-wrapping-key" => matches!(e, EsdkError::NoDataKey(_)),
                    other => panic!("{name}: unknown damage {other}"),
                };
                assert!(fitting, "{name} ({damage}): {e:?}");
                errors += 1;
            }
        }
    }
    assert_eq!((ok, errors), (52, 37), "every vector ran");
}

fn keyring(name: &str, byte: u8) -> RawAesKeyring {
    RawAesKeyring::new("custody-test", name, &[byte; 32]).unwrap()
}

fn context() -> EncryptionContext {
    [("tenant".to_string(), "acme".to_string()), ("purpose".to_string(), "invoice".to_string())].into()
}

/// Both suites round-trip at sizes around frame boundaries, and the output is a v2 message
/// whose header names the suite and frame length.
#[test]
fn both_suites_round_trip_at_frame_boundaries() {
    let k = keyring("k", 1);
    for suite in [Suite::Committed, Suite::CommittedSigned] {
        for frame in [1u32, 7, 4096] {
            for len in [0usize, 1, 6, 7, 8, 13, 14, 15, 4095, 4096, 4097, 3 * 4096] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let message = seal(
                    &k,
                    &context(),
                    EncryptOptions { suite, frame_length: frame, ..EncryptOptions::default() },
                    &plain,
                );
                assert_eq!(message[0], 0x02);
                assert_eq!(u16::from_be_bytes([message[1], message[2]]), suite.id());
                let (back, info) = open(&k, &message).unwrap_or_else(|e| panic!("{suite:?} {frame} {len}: {e}"));
                assert_eq!(back, plain, "{suite:?} frame {frame} len {len}");
                assert_eq!((info.header.frame_length, info.plaintext_len), (frame, len as u64));
                assert_eq!(info.header.context.contains_key("aws-crypto-public-key"), suite.is_signed());
            }
        }
    }
}

/// Tampering anywhere is found: every single-byte change of a small message of each suite fails
/// to decrypt; truncation at every length fails; extra bytes fail; frames swapped fail; a header
/// moved onto another message's body fails.
#[test]
fn every_change_is_detected() {
    let k = keyring("k", 2);
    for suite in [Suite::Committed, Suite::CommittedSigned] {
        let plain = b"attack at dawn, bring the ladders".to_vec();
        let message =
            seal(&k, &context(), EncryptOptions { suite, frame_length: 8, ..EncryptOptions::default() }, &plain);
        for i in 0..message.len() {
            let mut m = message.clone();
            m[i] ^= 0x01;
            assert!(open(&k, &m).is_err(), "{suite:?}: flipping byte {i} went unnoticed");
        }
        for cut in 0..message.len() {
            let e = open(&k, &message[..cut]).unwrap_err();
            assert!(matches!(e, EsdkError::Malformed(_) | EsdkError::Integrity(_)), "{suite:?} cut at {cut}: {e:?}");
        }
        let mut longer = message.clone();
        longer.push(0);
        assert!(matches!(open(&k, &longer).unwrap_err(), EsdkError::Malformed(_)));
    }
    // Swap frames 1 and 2 (unsigned suite, 8-byte frames: 40 bytes are four regular frames of
    // 4+12+8+16 bytes, then a final frame holding the last 8).
    let message = seal(
        &k,
        &context(),
        EncryptOptions { suite: Suite::Committed, frame_length: 8, ..EncryptOptions::default() },
        &[9u8; 40],
    );
    let frame = 4 + 12 + 8 + 16;
    let body = message.len() - (4 * frame + 4 + 4 + 12 + 4 + 8 + 16);
    let mut swapped = message.clone();
    swapped[body..body + frame].copy_from_slice(&message[body + frame..body + 2 * frame]);
    swapped[body + frame..body + 2 * frame].copy_from_slice(&message[body..body + frame]);
    assert!(matches!(open(&k, &swapped).unwrap_err(), EsdkError::Malformed(_)));
    // The header of one message on the body of another (same key, same sizes).
    let other = seal(
        &k,
        &context(),
        EncryptOptions { suite: Suite::Committed, frame_length: 8, ..EncryptOptions::default() },
        &[9u8; 40],
    );
    let mut spliced = message[..body].to_vec();
    spliced.extend_from_slice(&other[body..]);
    assert!(matches!(open(&k, &spliced).unwrap_err(), EsdkError::Integrity(_)));
}

/// The raw AES keyring binds the encryption context, refuses other keys, and a multi-keyring
/// wraps under each of its keys so that any one of them decrypts.
#[test]
fn keyrings() {
    let (a, b, c) = (keyring("a", 3), keyring("b", 4), keyring("c", 5));
    let multi = MultiKeyring::new(vec![Box::new(keyring("a", 3)), Box::new(keyring("b", 4))]).unwrap();
    let message = seal(&multi, &context(), EncryptOptions::default(), b"hello");
    assert_eq!(open(&a, &message).unwrap().0, b"hello");
    assert_eq!(open(&b, &message).unwrap().0, b"hello");
    assert!(matches!(open(&c, &message).unwrap_err(), EsdkError::NoDataKey(_)));
    // Same name, other key bytes: no data key.
    assert!(matches!(open(&keyring("a", 9), &message).unwrap_err(), EsdkError::NoDataKey(_)));
    // The context is reserved for the public key of signed messages.
    let mut reserved = context();
    reserved.insert("aws-crypto-public-key".into(), "x".into());
    let mut out = Vec::new();
    assert!(matches!(
        encrypt(&a, &reserved, EncryptOptions::default(), &mut &b"x"[..], &mut out).unwrap_err(),
        EsdkError::Invalid(_)
    ));
    // A required context pair that the message lacks, or holds with another value.
    for (k, v) in [("tenant", "other"), ("missing", "x")] {
        let options =
            DecryptOptions { required_context: [(k.to_string(), v.to_string())].into(), ..Default::default() };
        let e = decrypt(&a, &options, &mut &message[..], &mut Vec::new()).unwrap_err();
        assert!(matches!(e, EsdkError::ContextMismatch(_)), "{e:?}");
    }
    let options = DecryptOptions { required_context: [("tenant".into(), "acme".into())].into(), ..Default::default() };
    decrypt(&a, &options, &mut &message[..], &mut Vec::new()).unwrap();
    assert!(RawAesKeyring::new("p", "n", &[0u8; 16]).is_err());
    assert!(RawAesKeyring::new("aws-kms", "n", &[0u8; 32]).is_err());
}

/// Bounds are applied before allocation: too many data keys, too large a frame, a v1 message,
/// an unknown suite.
#[test]
fn limits_and_unsupported_messages() {
    let k = keyring("k", 6);
    let many: Vec<Box<dyn Keyring>> =
        (0..17).map(|i| Box::new(keyring(&format!("k{i}"), 6)) as Box<dyn Keyring>).collect();
    let message = seal(&MultiKeyring::new(many).unwrap(), &EncryptionContext::new(), EncryptOptions::default(), b"x");
    let mut out = Vec::new();
    let e = decrypt(&k, &DecryptOptions::default(), &mut &message[..], &mut out).unwrap_err();
    assert!(e.to_string().contains("17 encrypted data keys"), "{e}");
    let big = seal(
        &k,
        &EncryptionContext::new(),
        EncryptOptions { suite: Suite::Committed, frame_length: 1 << 20, ..EncryptOptions::default() },
        b"x",
    );
    let limits = DecryptOptions { max_frame_length: 1 << 16, ..DecryptOptions::default() };
    let e = decrypt(&k, &limits, &mut &big[..], &mut out).unwrap_err();
    assert!(e.to_string().contains("above the limit"), "{e}");
    let mut v1 = big.clone();
    v1[0] = 0x01;
    assert!(matches!(open(&k, &v1).unwrap_err(), EsdkError::Unsupported(_)));
    let mut suite = big.clone();
    suite[1..3].copy_from_slice(&0x0178u16.to_be_bytes());
    let e = open(&k, &suite).unwrap_err();
    assert!(matches!(e, EsdkError::Unsupported(_)) && e.to_string().contains("0x0178"), "{e}");
}

/// Re-wrapping replaces the header's data keys and tag and leaves every body byte as it was; the
/// result decrypts with the new key only (when only the new key wraps it). A signed message is
/// refused; a header that was changed, or an old keyring that cannot unwrap, fails and writes
/// nothing usable.
#[test]
fn rewrap_changes_the_header_only() {
    let (old, new) = (keyring("old", 7), keyring("new", 8));
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let message = seal(
        &old,
        &context(),
        EncryptOptions { suite: Suite::Committed, frame_length: 4096, ..EncryptOptions::default() },
        &plain,
    );
    let before = read_header(&mut &message[..], &DecryptOptions::default()).unwrap();
    let mut out = Vec::new();
    let done = rewrap_message(&old, &new, &message, &mut out).unwrap();
    let after = read_header(&mut &out[..], &DecryptOptions::default()).unwrap();
    assert_eq!((after.message_id, &after.context, after.frame_length), (before.message_id, &before.context, 4096));
    assert_eq!(after.encrypted_data_keys, done.encrypted_data_keys);
    assert_eq!(after.encrypted_data_keys.len(), 1);
    assert_eq!(after.encrypted_data_keys[0].provider_info[..3], *b"new");
    // The body: the same bytes at the end of both messages.
    let body = done.body_bytes as usize;
    assert_eq!(out[out.len() - body..], message[message.len() - body..]);
    assert!(body > plain.len());
    assert_eq!(open(&new, &out).unwrap().0, plain);
    assert!(matches!(open(&old, &out).unwrap_err(), EsdkError::NoDataKey(_)));
    // Both keys wrap it after a re-wrap through a multi-keyring.
    let both = MultiKeyring::new(vec![Box::new(keyring("new", 8)), Box::new(keyring("old", 7))]).unwrap();
    let mut twice = Vec::new();
    rewrap_message(&new, &both, &out, &mut twice).unwrap();
    assert_eq!(open(&old, &twice).unwrap().0, plain);
    assert_eq!(open(&new, &twice).unwrap().0, plain);

    // Refused: a signed message, a wrong old key, a changed header.
    let signed = seal(
        &old,
        &context(),
        EncryptOptions { suite: Suite::CommittedSigned, frame_length: 4096, ..EncryptOptions::default() },
        b"x",
    );
    let e = rewrap_message(&old, &new, &signed, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, EsdkError::Unsupported(_)) && e.to_string().contains("signed"), "{e}");
    let e = rewrap_message(&new, &new, &message, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, EsdkError::NoDataKey(_)), "{e:?}");
    // The context's value "acme" sits in the header body; the tag (or the wrapped key's AAD) must catch it.
    let at = message.windows(4).position(|w| w == b"acme").unwrap();
    let mut changed = message.clone();
    changed[at] ^= 0x20;
    let e = rewrap_message(&old, &new, &changed, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, EsdkError::NoDataKey(_) | EsdkError::Integrity(_)), "{e:?}");
}

/// A declared plaintext length is enforced: an input shorter or longer fails, and the message
/// made so far is not a valid one.
#[test]
fn a_declared_length_is_enforced() {
    let k = keyring("k", 1);
    for (declared, actual) in [(10u64, 9usize), (10, 11), (4096, 4097), (8192, 4096)] {
        let options =
            EncryptOptions { frame_length: 4096, plaintext_length: Some(declared), ..EncryptOptions::default() };
        let mut out = Vec::new();
        let e = encrypt(&k, &context(), options, &mut &vec![0u8; actual][..], &mut out).unwrap_err();
        assert!(matches!(e, EsdkError::Invalid(_)), "{declared} vs {actual}: {e:?}");
        assert!(open(&k, &out).is_err(), "{declared} vs {actual}: a partial message decrypted");
    }
    let options = EncryptOptions { plaintext_length: Some(5), ..EncryptOptions::default() };
    let mut out = Vec::new();
    encrypt(&k, &context(), options, &mut &b"12345"[..], &mut out).unwrap();
    assert_eq!(open(&k, &out).unwrap().0, b"12345");
}

/// `rewrap` of a whole message in memory: the header read first, then the rest.
fn rewrap_message(
    old: &dyn Keyring,
    new: &dyn Keyring,
    message: &[u8],
    out: &mut Vec<u8>,
) -> Result<custody_crypto::esdk::Rewrapped, EsdkError> {
    let mut input = message;
    let header = read_header(&mut input, &DecryptOptions::default())?;
    rewrap(&header, old, new, &mut input, out)
}

/// Reading at offsets: many frames over several workers give the same message as the stream,
/// and an input that changes while it is read is an error, never a message of other bytes.
#[test]
fn reading_at_offsets_matches_the_stream_and_notices_changes() {
    let k = keyring("k", 7);
    // Enough frames for every worker to take several runs (runs are about 1 MiB).
    let plain: Vec<u8> = (0..5 * 1024 * 1024 + 123).map(|i| (i * 7 % 253) as u8).collect();
    for frame in [4096u32, 65536, 1 << 20] {
        let options = EncryptOptions { frame_length: frame, ..EncryptOptions::default() };
        let message = seal(&k, &context(), options, &plain);
        let (back, info) = open(&k, &message).unwrap();
        assert!(back == plain && info.plaintext_len == plain.len() as u64, "frame {frame}");
    }
    let options = EncryptOptions { frame_length: 4096, ..EncryptOptions::default() };
    // Shorter than it said (it shrank while read), and longer (it grew).
    for (data, len) in [(&plain[..100_000], 100_001u64), (&plain[..100_000], 99_999)] {
        let e = encrypt_at(&k, &context(), options, data, len, &mut Vec::new()).unwrap_err();
        assert!(matches!(e, EsdkError::Invalid(_)) && e.to_string().contains("changed while it was read"), "{e}");
    }
    let message = seal(&k, &context(), options, &plain[..100_000]);
    let mut grown = message.clone();
    grown.extend_from_slice(b"appended while decrypting");
    let e = decrypt_at(&k, &DecryptOptions::default(), &grown[..], message.len() as u64, &mut Vec::new()).unwrap_err();
    assert!(matches!(e, EsdkError::Invalid(_)) && e.to_string().contains("changed while it was read"), "{e}");
    let e =
        encrypt_at(&k, &context(), EncryptOptions { frame_length: 0, ..options }, &plain[..10], 10, &mut Vec::new())
            .unwrap_err();
    assert!(e.to_string().contains("frame length must be at least 1"), "{e}");
    // A declared length other than the input's is refused before anything is written.
    let declared = EncryptOptions { plaintext_length: Some(5), ..options };
    let mut out = Vec::new();
    let e = encrypt_at(&k, &context(), declared, &b"123456"[..], 6, &mut out).unwrap_err();
    assert!(matches!(e, EsdkError::Invalid(_)) && out.is_empty(), "{e}");
}
