//! What the audit trail costs on Encrypt, measured against Encrypt without it in the same run.
//!
//! `cargo bench -p custody-kms --bench audit_overhead -- [SECONDS] [THREADS]`
//!
//! Each thread loops Encrypt (64-byte plaintext) for the given time, first without writing an
//! audit record, then writing one per request exactly as the server does (durable before the
//! answer, SQLite with synchronous=FULL). Prints requests per second for both and the ratio.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_crypto::{EncryptionContext, SecretBytes};
use custody_kms::{AuditEvent, CreateKeyRequest, KeyRef, KmsConfig, Outcome};

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig::development());
    let kms = Arc::new(kms);
    let key = KeyRef::parse(&kms.create_key(&caller, CreateKeyRequest::default()).unwrap().key_id, "KeyId").unwrap();

    let run = |audit: bool| -> f64 {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        std::thread::scope(|s| {
            for _ in 0..threads {
                let (kms, caller, key, done) = (kms.clone(), caller.clone(), key.clone(), done.clone());
                s.spawn(move || {
                    let pt = SecretBytes::new(vec![7u8; 64]);
                    let ctx = EncryptionContext::empty();
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        kms.encrypt(&caller, &key, &pt, &ctx).unwrap();
                        if audit {
                            kms.record_audit(event(started), None).unwrap();
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        done.load(Ordering::Relaxed) as f64 / seconds as f64
    };
    let without = run(false);
    let with = run(true);
    println!("threads: {threads}, seconds per run: {seconds}");
    println!("encrypt without audit: {without:>10.0} req/s");
    println!("encrypt with audit:    {with:>10.0} req/s");
    println!("audit cost:            {:>9.1} %", (1.0 - with / without) * 100.0);
}

fn event(started: Instant) -> AuditEvent {
    AuditEvent {
        time: 0,
        request_id: "bench".into(),
        node: "bench".into(),
        source: "127.0.0.1:1".into(),
        tls_identity: None,
        principal: Some("arn:aws:iam::111122223333:user/admin".into()),
        access_key_id: None,
        action: "TrentService.Encrypt".into(),
        key_id: Some("bench".into()),
        key_version: None,
        encryption_context: None,
        source_key_id: None,
        source_key_version: None,
        source_encryption_context: None,
        outcome: Outcome::Success,
        error_code: None,
        detail: None,
        duration_ms: started.elapsed().as_millis() as u64,
        alert: false,
    }
}
