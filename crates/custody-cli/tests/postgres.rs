//! custody on PostgreSQL, end to end: `init` into a database, two servers (nodes) sharing it.
//! A key created on one node is usable on the other at once; a rotation or a disable on one
//! takes effect on the other at its next request; the audit trail stays one verifiable chain.
//!
//! Needs PostgreSQL: `CUSTODY_TEST_DATABASE_URL`, else 127.0.0.1:5432 database `test` (see
//! crates/custody-store/tests/conformance.rs); fails with instructions otherwise.

mod common;

use custody_client::{Client, ClientError};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_share_one_postgresql_store() {
    let pg = common::test_database();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let dir = tempfile::tempdir().unwrap();
    let (layout, _) = common::init_store(dir.path(), custody_kms::Role::ALL.to_vec(), Some(pg.clone()));
    assert!(!layout.database().exists(), "no SQLite file when the store is in PostgreSQL");
    let on_pg = |c: &mut custody_server::ServerConfig| {
        c.database_url = Some(url.clone());
        c.database_schema = schema.clone();
    };
    let (node_a, profile_a) = common::start(dir.path(), &layout, on_pg).await;
    let (node_b, profile_b) = common::start(dir.path(), &layout, on_pg).await;
    let mut a = Client::connect(&profile_a).await.unwrap();
    let mut b = Client::connect(&profile_b).await.unwrap();
    assert_ne!(profile_a.endpoint, profile_b.endpoint);

    // Create on A, encrypt on B.
    let key = common::create_key(&mut a, "KeyId").await;
    let pt = "c2VjcmV0";
    let old = b.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": pt })).await.unwrap();
    // Rotate on B; decrypt the old ciphertext on A; new ciphertexts use version 2.
    b.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": key })).await.unwrap();
    let back = a.call("TrentService.Decrypt", json!({ "CiphertextBlob": old["CiphertextBlob"] })).await.unwrap();
    assert_eq!(back["Plaintext"], pt);
    let rotations = a.call("TrentService.ListKeyRotations", json!({ "KeyId": key })).await.unwrap();
    assert_eq!(rotations["Rotations"].as_array().unwrap().len(), 1);
    // Disable on A: B refuses at its next request.
    a.call("TrentService.DisableKey", json!({ "KeyId": key })).await.unwrap();
    match b.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": pt })).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "DisabledException"),
        other => panic!("{other:?}"),
    }
    a.call("TrentService.EnableKey", json!({ "KeyId": key })).await.unwrap();
    b.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": pt })).await.unwrap();
    // A policy change on A: B enforces it at its next request.
    let me = a.call("Custody.WhoAmI", json!({})).await.unwrap()["Arn"].clone();
    let account = a.call("Custody.WhoAmI", json!({})).await.unwrap()["Account"].clone();
    let policy = json!({ "Statement": [
        { "Sid": "All", "Effect": "Allow", "Principal": { "AWS": account }, "Action": "kms:*", "Resource": "*" },
        { "Sid": "NoEncrypt", "Effect": "Deny", "Principal": { "AWS": me }, "Action": "kms:Encrypt", "Resource": "*" } ]})
    .to_string();
    a.call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": policy }))
        .await
        .unwrap();
    match b.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": pt })).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "AccessDeniedException"),
        other => panic!("{other:?}"),
    }
    let open = json!({ "Statement": { "Effect": "Allow", "Principal": { "AWS": account }, "Action": "kms:*", "Resource": "*" } });
    a.call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": open.to_string() }))
        .await
        .unwrap();
    // A principal disabled on A is refused by B on an open connection.
    a.call("Custody.CreatePrincipal", json!({ "Name": "app", "Roles": ["key-user"] })).await.unwrap();
    let cert = a.call("Custody.IssueCertificate", json!({ "Name": "app" })).await.unwrap();
    std::fs::write(dir.path().join("app.crt"), cert["Certificate"].as_str().unwrap()).unwrap();
    std::fs::write(dir.path().join("app.key"), cert["PrivateKey"].as_str().unwrap()).unwrap();
    let app_profile = custody_client::Profile {
        cert_file: Some(dir.path().join("app.crt")),
        key_file: Some(dir.path().join("app.key")),
        ..profile_b.clone()
    };
    let mut app = Client::connect(&app_profile).await.unwrap();
    app.call("TrentService.GenerateRandom", json!({ "NumberOfBytes": 8 })).await.unwrap();
    a.call("Custody.UpdatePrincipal", json!({ "Name": "app", "Enabled": false })).await.unwrap();
    match app.call("TrentService.GenerateRandom", json!({ "NumberOfBytes": 8 })).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "UnrecognizedClientException"),
        other => panic!("{other:?}"),
    }
    drop(app);

    // Concurrent requests on both nodes: one audit chain, verifiable from either node.
    let mut tasks = Vec::new();
    for p in [profile_a.clone(), profile_b.clone(), profile_a.clone(), profile_b.clone()] {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&p).await.unwrap();
            for _ in 0..25 {
                c.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": "eA==" })).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for c in [&mut a, &mut b] {
        let v = c.call("Custody.VerifyAudit", json!({})).await.unwrap();
        assert!(v["problem"].is_null(), "{v}");
        assert!(v["records"].as_u64().unwrap() >= 100, "{v}");
    }
    drop((a, b));
    node_a.shutdown().await;
    node_b.shutdown().await;
    custody_store::PostgresBackend::connect(&pg).unwrap().drop_schema().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_schedulers_never_rotate_twice() {
    let pg = common::test_database();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let dir = tempfile::tempdir().unwrap();
    let (layout, _) = common::init_store(dir.path(), custody_kms::Role::ALL.to_vec(), Some(pg.clone()));
    // A "day" of 11 ms: the shortest rotation period (90 days) is about one second. Both nodes'
    // schedulers look for due work every 50 ms.
    let node = |c: &mut custody_server::ServerConfig| {
        c.database_url = Some(url.clone());
        c.database_schema = schema.clone();
        c.danger_day_length_ms = 11;
        c.scheduler_interval_ms = 50;
    };
    let (node_a, profile) = common::start(dir.path(), &layout, node).await;
    let (node_b, _) = common::start(dir.path(), &layout, node).await;
    let mut a = Client::connect(&profile).await.unwrap();
    let key = common::create_key(&mut a, "KeyId").await;
    let started = std::time::Instant::now();
    a.call("TrentService.EnableKeyRotation", json!({ "KeyId": key, "RotationPeriodInDays": 90 })).await.unwrap();
    // The check: a 1-second rotation period, two nodes, 60 seconds.
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    // A state change that races the other node's scheduler (rotating this very key) is refused
    // with ConflictException and nothing changes; a client retries it.
    loop {
        match a.call("TrentService.DisableKeyRotation", json!({ "KeyId": key })).await {
            Ok(_) => break,
            Err(ClientError::Api { code, .. }) if code == "ConflictException" => continue,
            Err(e) => panic!("{e}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rotations = a.call("TrentService.ListKeyRotations", json!({ "KeyId": key })).await.unwrap();
    let dates: Vec<f64> =
        rotations["Rotations"].as_array().unwrap().iter().map(|r| r["RotationDate"].as_f64().unwrap()).collect();
    let period = 90.0 * 0.011;
    // A rotation is due one period after the previous one and happens at the next scheduler pass
    // (every 50 ms, on either node): between one rotation per period and one per period + 50 ms
    // (+ 20 ms for the work itself). Two nodes rotating the same period would double the count.
    let (most, least) = ((elapsed / period).floor() as usize, (elapsed / (period + 0.07)).floor() as usize);
    assert!(
        (least.saturating_sub(1)..=most).contains(&dates.len()),
        "{} rotations in {elapsed:.2} s with a {period:.2} s period (expected {least}..={most}): {dates:?}",
        dates.len()
    );
    for w in dates.windows(2) {
        assert!(w[1] - w[0] >= period * 0.9, "two rotations {:.3} s apart: {dates:?}", w[1] - w[0]);
    }
    // Every version exists once and encrypts (the newest is primary).
    let blob = a.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": "eA==" })).await.unwrap();
    a.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob["CiphertextBlob"] })).await.unwrap();
    drop(a);
    node_a.shutdown().await;
    node_b.shutdown().await;
    custody_store::PostgresBackend::connect(&pg).unwrap().drop_schema().unwrap();
}

/// Root rotation with two nodes on one PostgreSQL store, both under load: the other node loads
/// the next root before anyone writes under it, so no request on either node fails; afterwards
/// both serve under the new root, the old shares are refused and the new ones unseal.
#[tokio::test(flavor = "multi_thread")]
async fn the_root_rotates_while_two_nodes_serve() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let pg = common::test_database();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let dir = tempfile::tempdir().unwrap();
    let (layout, shares) = common::init_shamir(dir.path(), Some(pg.clone()));
    let old_shares: Vec<String> = shares.iter().map(|s| s.to_text().to_string()).collect();
    let on_pg = |c: &mut custody_server::ServerConfig| {
        c.database_url = Some(url.clone());
        c.database_schema = schema.clone();
        c.seal = None;
    };
    let (node_a, profile_a) = common::start(dir.path(), &layout, on_pg).await;
    let (node_b, profile_b) = common::start(dir.path(), &layout, on_pg).await;
    for p in [&profile_a, &profile_b] {
        common::unseal(p, &old_shares[..3]).await.unwrap();
    }
    let mut a = Client::connect(&profile_a).await.unwrap();
    let key = common::create_key(&mut a, "KeyId").await;
    let before = a.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": "YmVmb3Jl" })).await.unwrap();

    // Load on both nodes: encrypt and decrypt, and new keys (new versions, new rows) on each.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for (n, profile) in [&profile_a, &profile_b, &profile_a, &profile_b].into_iter().enumerate() {
        let mut c = Client::connect(profile).await.unwrap();
        let (ok, failed, stop, key) = (ok.clone(), failed.clone(), stop.clone(), key.clone());
        load.push(tokio::spawn(async move {
            let mut made = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let r = if n >= 2 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let r = c.call("TrentService.CreateKey", json!({})).await;
                    if let Ok(k) = &r {
                        made.push(k["KeyMetadata"]["KeyId"].as_str().unwrap().to_string());
                    }
                    r
                } else {
                    match c.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": "bG9hZA==" })).await {
                        Ok(e) => c.call("TrentService.Decrypt", json!({ "CiphertextBlob": e["CiphertextBlob"] })).await,
                        Err(e) => Err(e),
                    }
                };
                match r {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request on node {} failed: {e}", n % 2);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            made
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The CLI talks to the node the admin profile names (the last started: B).
    common::rotate_root(&layout.admin_profile(), &dir.path().join("new-shares")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut made = Vec::new();
    for t in load {
        made.extend(t.await.unwrap());
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail on either node");
    assert!(ok.load(Ordering::Relaxed) > 50, "the load ran: {}", ok.load(Ordering::Relaxed));
    // Both nodes serve under generation 2: each decrypts what was made before and keys made on
    // either node during the rotation; the audit chain is whole.
    let mut b = Client::connect(&profile_b).await.unwrap();
    for c in [&mut a, &mut b] {
        assert_eq!(c.call("Custody.GetStatus", json!({})).await.unwrap()["RootGeneration"], 2);
        let back = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": before["CiphertextBlob"] })).await.unwrap();
        assert_eq!(back["Plaintext"], "YmVmb3Jl");
        for k in &made {
            c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": "eA==" })).await.unwrap();
        }
        let v = c.call("Custody.VerifyAudit", json!({})).await.unwrap();
        assert!(v["problem"].is_null(), "{v}");
    }
    drop((a, b));
    node_a.shutdown().await;
    node_b.shutdown().await;

    // A restarted node: the old shares are refused, the new ones unseal.
    let (node, profile) = common::start(dir.path(), &layout, on_pg).await;
    let refused = common::unseal(&profile, &old_shares[..1]).await.unwrap_err().to_string();
    assert!(refused.contains("not issued for this store"), "{refused}");
    let new_shares: Vec<String> = (1..=3)
        .map(|i| {
            std::fs::read_to_string(dir.path().join(format!("new-shares/share-{i}.txt"))).unwrap().trim().to_string()
        })
        .collect();
    common::unseal(&profile, &new_shares).await.unwrap();
    let mut c = Client::connect(&profile).await.unwrap();
    let back = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": before["CiphertextBlob"] })).await.unwrap();
    assert_eq!(back["Plaintext"], "YmVmb3Jl");
    drop(c);
    node.shutdown().await;
    custody_store::PostgresBackend::connect(&pg).unwrap().drop_schema().unwrap();
}
