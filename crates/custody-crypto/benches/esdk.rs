//! Encryption SDK messages against the crypto library's own AES-256-GCM, in one run.
//!
//! `cargo bench -p custody-crypto --bench esdk -- [MIB] [FRAME_BYTES]`
//!
//! 1. Baseline: single-core, in-memory AES-256-GCM sealing of 64 KiB buffers with aws-lc-rs (the
//!    library the format uses), over MIB MiB.
//! 2. `esdk::encrypt` of a MIB MiB file in the page cache to a sink (suite 0x0478, raw AES
//!    keyring), and `esdk::decrypt` of its encryption (a file in the page cache) to a sink; then
//!    the same for the signed suite 0x0578. Each also through `encrypt_at` / `decrypt_at`
//!    (the file read at offsets by every core, as the CLI reads regular files). Files live in
//!    the system's temporary directory.
//!
//! Each line prints MiB/s (the median of five runs) and the ratio to the baseline (the issue
//! asks for at least 0.9).

use std::io::{self, BufReader, Write};
use std::time::Instant;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use custody_crypto::esdk::{
    decrypt, decrypt_at, encrypt, encrypt_at, DecryptOptions, EncryptOptions, EncryptionContext, RawAesKeyring, Suite,
};

/// Repetitions of every measurement; the median is printed (this VM's throughput moves by
/// tens of percent from one second to the next).
const REPEAT: usize = 5;

/// MiB/s of `bytes` processed by `f`, the median of [`REPEAT`] runs.
fn median_mib_s(bytes: u64, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..REPEAT)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64() / (1024.0 * 1024.0)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[REPEAT / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(256);
    let frame: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64 * 1024);
    let bytes = mib * 1024 * 1024;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{mib} MiB, frames of {frame} bytes, {cores} cores; medians of {REPEAT} runs");

    // Baseline.
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let mut buf = vec![1u8; 64 * 1024];
    let base = median_mib_s(bytes, || {
        let mut done = 0u64;
        let mut n = 0u64;
        while done < bytes {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&n.to_be_bytes());
            let tag =
                key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf).unwrap();
            let _ = std::hint::black_box(tag);
            done += buf.len() as u64;
            n += 1;
        }
    });
    println!("baseline  AES-256-GCM seal, 1 core, in memory   {base:>8.0} MiB/s");

    let dir = tempfile_dir();
    let plain_path = dir.join("plain");
    {
        let mut f = io::BufWriter::new(std::fs::File::create(&plain_path).unwrap());
        let block: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..mib {
            f.write_all(&block).unwrap();
        }
    }
    let warm = |p: &std::path::Path| io::copy(&mut std::fs::File::open(p).unwrap(), &mut io::sink()).unwrap();
    warm(&plain_path);
    let read = median_mib_s(bytes, || {
        warm(&plain_path);
    });
    println!("ceiling   reading the file (page cache) -> sink {read:>8.0} MiB/s  {:.2}x baseline", read / base);
    let keyring = RawAesKeyring::new("bench", "k", &[3u8; 32]).unwrap();
    let context = EncryptionContext::from([("purpose".to_string(), "bench".to_string())]);
    let line = |what: &str, suite: Suite, how: &str, v: f64| {
        println!("{what:<9} 0x{:04x} {how:<38} {v:>8.0} MiB/s  {:.2}x baseline", suite.id(), v / base);
    };
    for suite in [Suite::Committed, Suite::CommittedSigned] {
        let options = EncryptOptions { suite, frame_length: frame, ..EncryptOptions::default() };
        // Frames are read straight into their buffers (no BufReader: it would add a copy).
        let enc = median_mib_s(bytes, || {
            let mut input = std::fs::File::open(&plain_path).unwrap();
            encrypt(&keyring, &context, options, &mut input, &mut io::sink()).unwrap();
        });
        let enc_at = median_mib_s(bytes, || {
            let input = std::fs::File::open(&plain_path).unwrap();
            encrypt_at(&keyring, &context, options, &input, bytes, &mut io::sink()).unwrap();
        });
        let enc_path = dir.join("enc");
        let mut out = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&enc_path).unwrap());
        encrypt(&keyring, &context, options, &mut std::fs::File::open(&plain_path).unwrap(), &mut out).unwrap();
        drop(out);
        warm(&enc_path);
        let dec = median_mib_s(bytes, || {
            let mut input = BufReader::with_capacity(1 << 20, std::fs::File::open(&enc_path).unwrap());
            let info = decrypt(&keyring, &DecryptOptions::default(), &mut input, &mut io::sink()).unwrap();
            assert_eq!(info.plaintext_len, bytes);
        });
        let dec_at = median_mib_s(bytes, || {
            let input = std::fs::File::open(&enc_path).unwrap();
            let len = input.metadata().unwrap().len();
            let info = decrypt_at(&keyring, &DecryptOptions::default(), &input, len, &mut io::sink()).unwrap();
            assert_eq!(info.plaintext_len, bytes);
        });
        line("encrypt", suite, "file (page cache) -> sink, stream", enc);
        line("encrypt", suite, "file (page cache) -> sink, at offsets", enc_at);
        line("decrypt", suite, "file (page cache) -> sink, stream", dec);
        line("decrypt", suite, "file (page cache) -> sink, at offsets", dec_at);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("custody-esdk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
