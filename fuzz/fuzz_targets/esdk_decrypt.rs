//! The Encryption SDK message parser and decryptor on arbitrary bytes: it must return an error
//! or a plaintext, never panic, hang or allocate beyond its limits; and the stream (`decrypt`)
//! and the reader at offsets (`decrypt_at`) must accept exactly the same messages, with the same
//! plaintext. (Which error a message with several faults reports first may differ.)
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run esdk_decrypt` (scripts/test runs it briefly, seeded with
//! valid messages under the key below so that mutations reach the frames and the footer).
#![no_main]

use custody_crypto::esdk::{decrypt, decrypt_at, read_header, DecryptOptions, RawAesKeyring};
use libfuzzer_sys::fuzz_target;

/// The seed messages' key: provider `fuzz`, name `k`, 32 bytes of 0x07.
const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let keyring = RawAesKeyring::new("fuzz", "k", &KEY).expect("a valid keyring");
    let options = DecryptOptions { max_frame_length: 1 << 16, ..DecryptOptions::default() };
    let _ = read_header(&mut &data[..], &options);
    let mut out = Vec::new();
    let streamed = decrypt(&keyring, &options, &mut &data[..], &mut out);
    let mut at = Vec::new();
    let positional = decrypt_at(&keyring, &options, data, data.len() as u64, &mut at);
    match (&streamed, &positional) {
        (Ok(a), Ok(b)) => assert!(out == at && a.plaintext_len == b.plaintext_len, "different plaintexts"),
        // A failed decryption may have written earlier frames, never the last one.
        (Err(_), Err(_)) => {}
        (a, b) => panic!("decrypt and decrypt_at disagree: {:?} / {:?}", a.as_ref().err(), b.as_ref().err()),
    }
});
