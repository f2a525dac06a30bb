//! Wycheproof vectors (shared/testvectors/wycheproof, Apache-2.0) through the exact AES-GCM and
//! HKDF functions every seal uses. Read in place from the shared folder, never copied.

use serde_json::Value;

use crate::esdk::{hkdf_sha512, verify_p384};
use crate::seal::{gcm_open, gcm_seal, hkdf_sha256};

fn vectors(name: &str) -> Value {
    let dir = std::env::var("CUSTODY_TESTVECTORS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/testvectors"));
    let path = dir.join("wycheproof").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); the shared test vectors live beside the repository, or set CUSTODY_TESTVECTORS",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn h(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

#[test]
fn aes_gcm() {
    let file = vectors("aes_gcm_test.json");
    let (mut passed, mut unsupported) = (0, 0);
    for group in file["testGroups"].as_array().unwrap() {
        let (key_size, iv_size, tag_size) =
            (group["keySize"].as_u64().unwrap(), group["ivSize"].as_u64().unwrap(), group["tagSize"].as_u64().unwrap());
        for t in group["tests"].as_array().unwrap() {
            // Explicitly unsupported: custody derives 96-bit nonces and uses 128-bit tags; AES-192
            // is not used. (AES-128 is tested because the primitive supports it.)
            if iv_size != 96 || tag_size != 128 || key_size == 192 {
                unsupported += 1;
                continue;
            }
            let (key, iv, aad, msg, ct, tag) =
                (h(&t["key"]), h(&t["iv"]), h(&t["aad"]), h(&t["msg"]), h(&t["ct"]), h(&t["tag"]));
            let nonce: [u8; 12] = iv.try_into().unwrap();
            let expected = [ct, tag].concat();
            let id = t["tcId"].as_u64().unwrap();
            match t["result"].as_str().unwrap() {
                "valid" => {
                    assert_eq!(gcm_seal(&key, nonce, &aad, &msg), expected, "tcId {id}: encryption");
                    assert_eq!(
                        gcm_open(&key, nonce, &aad, &expected).unwrap().expose_secret(),
                        msg,
                        "tcId {id}: decryption"
                    );
                }
                "invalid" => {
                    assert!(gcm_open(&key, nonce, &aad, &expected).is_err(), "tcId {id}: invalid vector accepted")
                }
                other => panic!("tcId {id}: unexpected result {other}"),
            }
            passed += 1;
        }
    }
    assert!(passed > 100, "only {passed} vectors ran");
    assert_eq!(passed + unsupported, file["numberOfTests"].as_u64().unwrap() as usize);
}

#[test]
fn hkdf_sha256_vectors() {
    let file = vectors("hkdf_sha256_test.json");
    let mut ran = 0;
    for group in file["testGroups"].as_array().unwrap() {
        for t in group["tests"].as_array().unwrap() {
            let (ikm, salt, info) = (h(&t["ikm"]), h(&t["salt"]), h(&t["info"]));
            let size = t["size"].as_u64().unwrap() as usize;
            let mut out = vec![0u8; size];
            let id = t["tcId"].as_u64().unwrap();
            // An empty salt means HashLen zero bytes (RFC 5869 §2.2); aws-lc treats it so.
            let result = hkdf_sha256(&ikm, &salt, &[&info], &mut out);
            match t["result"].as_str().unwrap() {
                "valid" => {
                    result.unwrap_or_else(|_| panic!("tcId {id}: refused a valid size"));
                    assert_eq!(out, h(&t["okm"]), "tcId {id}");
                }
                "invalid" => assert!(result.is_err(), "tcId {id}: accepted an invalid size {size}"),
                other => panic!("tcId {id}: unexpected result {other}"),
            }
            ran += 1;
        }
    }
    assert_eq!(ran, file["numberOfTests"].as_u64().unwrap() as usize);
}

/// HKDF-SHA512 as the Encryption SDK's key derivation calls it.
#[test]
fn hkdf_sha512_vectors() {
    let file = vectors("hkdf_sha512_test.json");
    let mut ran = 0;
    for group in file["testGroups"].as_array().unwrap() {
        for t in group["tests"].as_array().unwrap() {
            let (ikm, salt, info) = (h(&t["ikm"]), h(&t["salt"]), h(&t["info"]));
            let mut out = vec![0u8; t["size"].as_u64().unwrap() as usize];
            let id = t["tcId"].as_u64().unwrap();
            let result = hkdf_sha512(&ikm, &salt, &[&info], &mut out);
            match t["result"].as_str().unwrap() {
                "valid" => {
                    result.unwrap_or_else(|_| panic!("tcId {id}: refused a valid size"));
                    assert_eq!(out, h(&t["okm"]), "tcId {id}");
                }
                "invalid" => assert!(result.is_err(), "tcId {id}: accepted an invalid size"),
                other => panic!("tcId {id}: unexpected result {other}"),
            }
            ran += 1;
        }
    }
    assert_eq!(ran, file["numberOfTests"].as_u64().unwrap() as usize);
}

/// ECDSA P-384 / SHA-384 verification as the Encryption SDK's signed suite calls it, with each
/// public key both uncompressed (as given) and compressed (as messages carry it). "acceptable"
/// vectors (legacy encodings) may go either way and are counted.
#[test]
fn ecdsa_p384_sha384_vectors() {
    let file = vectors("ecdsa_secp384r1_sha384_test.json");
    let (mut ran, mut acceptable) = (0, 0);
    for group in file["testGroups"].as_array().unwrap() {
        let uncompressed = h(&group["publicKey"]["uncompressed"]);
        let mut compressed = vec![0x02 | (uncompressed[uncompressed.len() - 1] & 1)];
        compressed.extend_from_slice(&uncompressed[1..49]);
        for t in group["tests"].as_array().unwrap() {
            let id = t["tcId"].as_u64().unwrap();
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, &h(&t["msg"]));
            let sig = h(&t["sig"]);
            let (a, b) = (verify_p384(&uncompressed, &digest, &sig), verify_p384(&compressed, &digest, &sig));
            assert_eq!(a, b, "tcId {id}: compressed and uncompressed keys disagree");
            match t["result"].as_str().unwrap() {
                "valid" => assert!(a, "tcId {id}: a valid signature was refused"),
                "invalid" => assert!(!a, "tcId {id}: an invalid signature was accepted"),
                "acceptable" => acceptable += 1,
                other => panic!("tcId {id}: unexpected result {other}"),
            }
            ran += 1;
        }
    }
    assert_eq!(ran, file["numberOfTests"].as_u64().unwrap() as usize);
    eprintln!("ECDSA P-384: {ran} vectors, {acceptable} 'acceptable' ones either way");
}
