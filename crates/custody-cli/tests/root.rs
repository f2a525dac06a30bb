//! Root rotation end to end: `custody root rotate` on a Shamir store while eight connections
//! keep encrypting, decrypting and creating keys. No request fails; every ciphertext made before
//! decrypts after; the old root key opens no row; only the new shares unseal after a restart;
//! the audit trail still verifies.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custody_client::Client;
use custody_crypto::shamir::{self, UnsealShare};
use custody_store::{generation_of, Backend, Barrier, SqliteBackend, Table};
use serde_json::{json, Value};

async fn encrypt(c: &mut Client, key: &str, text: &str) -> Result<String, custody_client::ClientError> {
    let r = c.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": STANDARD.encode(text) })).await?;
    Ok(r["CiphertextBlob"].as_str().unwrap().to_string())
}

async fn decrypt(c: &mut Client, blob: &str) -> Result<String, custody_client::ClientError> {
    let r = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await?;
    Ok(String::from_utf8(STANDARD.decode(r["Plaintext"].as_str().unwrap()).unwrap()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_key_rotates_under_load_without_failing_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, shares) = common::init_shamir(dir.path(), None);
    let old_shares: Vec<String> = shares.iter().map(|s| s.to_text().to_string()).collect();
    let old_root = shamir::combine(&shares[..3]).unwrap();
    let (server, profile) = common::start(dir.path(), &layout, |c| c.seal = None).await;
    common::unseal(&profile, &old_shares[..3]).await.unwrap();

    // Keys and ciphertexts from before.
    let mut admin = common::admin_client(&profile).await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        let r = admin.call("TrentService.CreateKey", json!({})).await.unwrap();
        keys.push(r["KeyMetadata"]["KeyId"].as_str().unwrap().to_string());
    }
    let mut before = Vec::new();
    for i in 0..30 {
        let text = format!("before the rotation {i}");
        before.push((encrypt(&mut admin, &keys[i % 3], &text).await.unwrap(), text));
    }

    // Load: encrypt and decrypt on seven connections, create keys on an eighth.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for n in 0..8 {
        let mut c = Client::connect(&profile).await.unwrap();
        let (ok, failed, stop, key) = (ok.clone(), failed.clone(), stop.clone(), keys[n % 3].clone());
        load.push(tokio::spawn(async move {
            let mut made = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let result = if n == 7 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    c.call("TrentService.CreateKey", json!({})).await.map(|r| {
                        made.push(r["KeyMetadata"]["KeyId"].as_str().unwrap().to_string());
                    })
                } else {
                    match encrypt(&mut c, &key, "under load").await {
                        Ok(blob) => decrypt(&mut c, &blob).await.map(|t| assert_eq!(t, "under load")),
                        Err(e) => Err(e),
                    }
                };
                match result {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            made
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Rotate, waiting for the end (the CLI polls with a progress bar, hidden here).
    let started = Instant::now();
    let r = common::rotate_root(&layout.admin_profile(), &dir.path().join("new-shares")).await;
    assert_eq!((r["Generation"].clone(), r["Status"]["Generation"].clone()), (json!(2), json!(2)), "{r}");
    assert_eq!(r["Shares"], json!([]), "written to files, not printed: {r}");
    assert_eq!(r["ShareFiles"].as_array().unwrap().len(), 5);
    eprintln!("rotation took {:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut made = Vec::new();
    for t in load {
        made.extend(t.await.unwrap());
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail during a root rotation");
    assert!(ok.load(Ordering::Relaxed) > 200, "the load ran: {}", ok.load(Ordering::Relaxed));
    assert!(made.len() > 10, "keys were created during the rotation: {}", made.len());
    let finished = server.kms().audit_records(0, 1_000_000).unwrap();
    assert!(finished.iter().any(|r| r.event.action == "Custody.RotateRoot"));
    assert!(finished.iter().any(|r| r.event.action == "Custody.RootRotationFinished"));
    assert!(finished.len() > 256, "several batches of audit records were re-sealed: {}", finished.len());
    for (blob, text) in &before {
        assert_eq!(&decrypt(&mut admin, blob).await.unwrap(), text);
    }
    server.shutdown().await;

    // Nothing in the store opens under the old root; every row records generation 2.
    {
        let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&layout.data_dir.join("custody.db")).unwrap());
        let old = Barrier::new(backend.clone(), old_root.barrier_key());
        let mut rows = 0;
        for table in Table::ALL.into_iter().filter(|t| *t != Table::Meta) {
            for row in backend.scan(table, "", None, usize::MAX).unwrap() {
                assert_eq!(generation_of(&row.value), 2, "{}/{}", table.name(), row.key);
                assert!(old.open_row::<Value>(table, row).is_err());
                rows += 1;
            }
        }
        assert!(rows > 300, "{rows}");
        eprintln!("{rows} rows re-sealed");
    }

    // Restart: the old shares are refused, the new ones unseal, everything decrypts.
    let (server, profile) = common::start(dir.path(), &layout, |c| c.seal = None).await;
    let refused = common::unseal(&profile, &old_shares[..1]).await.unwrap_err().to_string();
    assert!(refused.contains("not issued for this store"), "{refused}");
    let new_shares: Vec<String> = (1..=3)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("new-shares/share-{i}.txt"))).unwrap())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(new_shares.iter().all(|s| UnsealShare::parse(s).is_ok()));
    assert_eq!(common::unseal(&profile, &new_shares).await.unwrap()["Sealed"], false);
    let mut admin = common::admin_client(&profile).await;
    for (blob, text) in &before {
        assert_eq!(&decrypt(&mut admin, blob).await.unwrap(), text);
    }
    for key in made.iter().take(3) {
        let blob = encrypt(&mut admin, key, "made during").await.unwrap();
        assert_eq!(decrypt(&mut admin, &blob).await.unwrap(), "made during");
    }
    let status = admin.call("Custody.GetStatus", json!({})).await.unwrap();
    assert_eq!((status["RootGeneration"].clone(), status["RootRotating"].clone()), (json!(2), json!(false)));
    let profile_path = layout.admin_profile();
    let status_path = profile_path.clone();
    let (human, json_out) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| common::custody().arg("--profile").arg(&status_path).args(args).output().unwrap();
        (run(&["root", "status"]), run(&["root", "status", "--json"]))
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("Root key generation 2 (no rotation under way)"));
    let s: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    assert_eq!((s["Generation"].clone(), s["Rotating"].clone()), (json!(2), json!(false)), "{s}");
    let check = tokio::task::spawn_blocking(move || {
        let check = common::custody().arg("--profile").arg(&profile_path).args(["check", "--json"]).output().unwrap();
        let verify =
            common::custody().arg("--profile").arg(&profile_path).args(["audit", "verify", "--json"]).output().unwrap();
        (check, verify)
    })
    .await
    .unwrap();
    assert!(
        check.0.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.0.stdout),
        String::from_utf8_lossy(&check.0.stderr)
    );
    assert!(
        check.1.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.1.stdout),
        String::from_utf8_lossy(&check.1.stderr)
    );
    server.shutdown().await;
}
