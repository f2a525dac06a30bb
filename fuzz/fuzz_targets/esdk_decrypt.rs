//! The Encryption SDK message parser and decryptor on arbitrary bytes: it must return an error
//! or a plaintext, never panic, hang or allocate beyond its limits.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run esdk_decrypt` (scripts/test runs it briefly, seeded with
//! valid messages under the key below so that mutations reach the frames and the footer).
#![no_main]

use custody_crypto::esdk::{decrypt, read_header, DecryptOptions, RawAesKeyring};
use libfuzzer_sys::fuzz_target;

/// The seed messages' key: provider `fuzz`, name `k`, 32 bytes of 0x07.
const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let keyring = RawAesKeyring::new("fuzz", "k", &KEY).expect("a valid keyring");
    let options = DecryptOptions { max_frame_length: 1 << 16, ..DecryptOptions::default() };
    let _ = read_header(&mut &data[..], &options);
    let mut out = Vec::new();
    if decrypt(&keyring, &options, &mut &data[..], &mut out).is_err() {
        // A failed decryption may have written earlier frames (streaming), never the last one.
    }
});
