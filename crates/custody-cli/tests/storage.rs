//! What is on disk: no key material in the clear, sealed rows that refuse tampering, and
//! destroyed material gone from the files.

mod common;

use std::sync::Arc;

use custody_crypto::keys::WrapAad;
use custody_kms::model::{KeyRecord, VersionRecord};
use custody_store::{Backend, Barrier, SqliteBackend, Table};
use serde_json::json;

/// Every file of the database: main file, WAL, shared memory.
fn database_files(data: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let p = data.join(format!("custody.db{suffix}"));
        if let Ok(bytes) = std::fs::read(&p) {
            all.extend_from_slice(&bytes);
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn no_key_material_in_the_database_files() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    let mut key_ids = Vec::new();
    for _ in 0..3 {
        let k = c.call("TrentService.CreateKey", json!({})).await.unwrap();
        let id = k["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
        c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": id })).await.unwrap();
        key_ids.push(id);
    }
    // A data key and an encrypted secret: neither plaintext may reach the disk either.
    let dk =
        c.call("TrentService.GenerateDataKey", json!({ "KeyId": key_ids[0], "KeySpec": "AES_256" })).await.unwrap();
    use base64::Engine;
    let data_key = base64::engine::general_purpose::STANDARD.decode(dk["Plaintext"].as_str().unwrap()).unwrap();
    let canary = b"plaintext-canary-7f3a9c";
    c.call(
        "TrentService.Encrypt",
        json!({ "KeyId": key_ids[1], "Plaintext": base64::engine::general_purpose::STANDARD.encode(canary) }),
    )
    .await
    .unwrap();
    server.shutdown().await;

    // The test knows the root key (key-file seal) and unwraps every stored version itself.
    let root = custody_server::keyfile::read(&dir.path().join("root.key")).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&layout.database()).unwrap());
    let barrier = Barrier::new(backend, root.barrier_key());
    let mut materials = Vec::new();
    for id in &key_ids {
        let key = barrier.get::<KeyRecord>(Table::Keys, id).unwrap().unwrap().value;
        for v in 1..=key.primary_version {
            let row = barrier.get::<VersionRecord>(Table::Versions, &format!("{id}/{v:010}")).unwrap().unwrap().value;
            let m = root
                .unwrap_key_material(&row.wrapped, &WrapAad { tenant: key.tenant.as_str(), key_id: id, version: v })
                .unwrap();
            assert_eq!(m.len(), 32);
            materials.push(m.expose_secret().to_vec());
        }
    }
    assert_eq!(materials.len(), 6);
    drop(barrier);
    let files = database_files(&layout.data_dir);
    assert!(files.len() > 4096, "the database files were read");
    for m in &materials {
        assert!(!contains(&files, m), "key material found in the clear in the database files");
        assert!(!contains(&files, &m[..16]), "half of a key's material found in the database files");
    }
    assert!(!contains(&files, root.expose_secret()), "the root key is in the database");
    assert!(!contains(&files, &data_key), "a data key reached the database");
    assert!(!contains(&files, canary), "plaintext reached the database");
    assert!(!contains(&files, b"Enabled"), "key state is sealed, not readable");
}

#[tokio::test]
async fn a_key_row_edited_in_sqlite_is_refused_with_a_generic_error() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    let a = common::create_key(&mut c, "KeyId").await;
    let b = common::create_key(&mut c, "KeyId").await;
    c.call("TrentService.DisableKey", json!({ "KeyId": b })).await.unwrap();

    // Someone with write access to the database "edits the state" of key a: they can only
    // replace its sealed value, here with b's (Disabled), or change bytes.
    let conn = rusqlite::Connection::open(layout.database()).unwrap();
    conn.execute(
        "UPDATE rows SET value = (SELECT value FROM rows WHERE tbl='keys' AND key=?1) WHERE tbl='keys' AND key=?2",
        [&b, &a],
    )
    .unwrap();
    for action in ["DescribeKey", "Encrypt"] {
        let body = json!({ "KeyId": a, "Plaintext": "AAAA" });
        match c.call(&format!("TrentService.{action}"), body).await {
            Err(custody_client::ClientError::Api { status, code, message }) => {
                assert_eq!((status, code.as_str()), (500, "KMSInternalException"));
                assert!(
                    !message.contains(&a) && !message.contains("integrity"),
                    "no detail leaks to the caller: {message}"
                );
            }
            other => panic!("{action} on a tampered row must fail, got {other:?}"),
        }
    }
    // The refusal is audited, with the row that failed (detail the caller never sees).
    let records = server.kms().audit_records(0, 1000).unwrap();
    let refused: Vec<_> =
        records.iter().filter(|r| r.event.error_code.as_deref() == Some("KMSInternalException")).collect();
    assert_eq!(refused.len(), 2, "{records:#?}");
    for r in refused {
        assert_eq!(r.event.outcome, custody_kms::Outcome::Failed);
        assert_eq!(r.event.key_id.as_deref(), Some(a.as_str()));
        let detail = r.event.detail.as_deref().unwrap();
        assert!(detail.contains("integrity") && detail.contains(&format!("keys/{a}")), "{detail}");
    }
    // Flip one byte of b's sealed value in place: also refused.
    conn.execute("UPDATE rows SET value = CAST(substr(value, 1, 40) || CASE WHEN substr(value, 41, 1) = X'00' THEN X'01' ELSE X'00' END || substr(value, 42) AS BLOB) WHERE tbl='keys' AND key=?1", [&b])
        .unwrap();
    assert!(c.call("TrentService.DescribeKey", json!({ "KeyId": b })).await.is_err());
    // Other keys are unaffected.
    let fresh = c.call("TrentService.CreateKey", json!({})).await.unwrap();
    assert_eq!(fresh["KeyMetadata"]["KeyState"], "Enabled");
    server.shutdown().await;
}

#[tokio::test]
async fn a_key_version_row_copied_to_another_key_does_not_open() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    let a = common::create_key(&mut c, "KeyId").await;
    let b = common::create_key(&mut c, "KeyId").await;
    // Give b a's (wrapped) version 1: if it opened, b would encrypt with a's material.
    let conn = rusqlite::Connection::open(layout.database()).unwrap();
    conn.execute(
        "UPDATE rows SET value = (SELECT value FROM rows WHERE tbl='versions' AND key=?1) WHERE tbl='versions' AND key=?2",
        [format!("{a}/{:010}", 1), format!("{b}/{:010}", 1)],
    )
    .unwrap();
    match c.call("TrentService.Encrypt", json!({ "KeyId": b, "Plaintext": "eA==" })).await {
        Err(custody_client::ClientError::Api { status, .. }) => assert_eq!(status, 500),
        other => panic!("a swapped version row must not be used: {other:?}"),
    }
    assert!(c.call("TrentService.Encrypt", json!({ "KeyId": a, "Plaintext": "eA==" })).await.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn the_scheduler_destroys_material_and_keeps_a_tombstone() {
    let (dir, layout) = common::keyfile_dir();
    // DANGER setting for this test only: a "day" lasts 30 ms, so the 7-day minimum is 210 ms.
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.danger_day_length_ms = 30;
        c.scheduler_interval_ms = 50;
    })
    .await;
    let mut c = common::admin_client(&profile).await;
    let k = common::create_key(&mut c, "KeyId").await;
    let blob = c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": "c2VjcmV0" })).await.unwrap()
        ["CiphertextBlob"]
        .clone();
    let sched =
        c.call("TrentService.ScheduleKeyDeletion", json!({ "KeyId": k, "PendingWindowInDays": 7 })).await.unwrap();
    assert_eq!(sched["PendingWindowInDays"], 7);
    let mut state = String::new();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let d = c.call("TrentService.DescribeKey", json!({ "KeyId": k })).await.unwrap();
        state = d["KeyMetadata"]["KeyState"].as_str().unwrap().to_string();
        if state == "Destroyed" {
            break;
        }
    }
    assert_eq!(state, "Destroyed", "DescribeKey still answers for a destroyed key");
    let records = server.kms().audit_records(0, 1000).unwrap();
    let destroyed: Vec<_> = records.iter().filter(|r| r.event.action == "Custody.ScheduledDestruction").collect();
    assert_eq!(destroyed.len(), 1, "the scheduler's destruction is in the audit trail");
    assert!(destroyed[0].event.key_id.as_deref().unwrap().ends_with(&k));
    let schedules = records.iter().filter(|r| r.event.action == "TrentService.ScheduleKeyDeletion").count();
    assert_eq!(schedules, 1, "a state change is recorded once, with the change");
    match c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await {
        Err(custody_client::ClientError::Api { code, .. }) => assert_eq!(code, "KMSInvalidStateException"),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
    let conn = rusqlite::Connection::open(layout.database()).unwrap();
    let versions: i64 = conn
        .query_row("SELECT count(*) FROM rows WHERE tbl='versions' AND key LIKE ?1", [format!("{k}/%")], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 0, "destroyed material rows are gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_finds_what_was_changed_outside_custody() {
    let (dir, layout) = common::keyfile_dir();
    let (_server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let path = dir.path().join("data/admin/profile.toml");
    let mut c = common::admin_client(&profile).await;
    let a = common::create_key(&mut c, "KeyId").await;
    c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": a })).await.unwrap();
    c.call("TrentService.CreateAlias", json!({ "AliasName": "alias/a", "TargetKeyId": a })).await.unwrap();
    let run = || common::custody().arg("--profile").arg(&path).args(["--json", "check"]).output().unwrap();
    let clean = run();
    assert!(clean.status.success(), "{}", String::from_utf8_lossy(&clean.stderr));
    let report: serde_json::Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!((report["Keys"].as_u64(), report["Versions"].as_u64()), (Some(1), Some(2)), "{report}");
    assert_eq!(report["Canaries"].as_u64(), Some(2), "every version's canary decrypts: {report}");
    assert!(report["Problems"].as_array().unwrap().is_empty());

    // Version 1's row replaced by version 2's, and the key row deleted behind the alias.
    let conn = rusqlite::Connection::open(layout.database()).unwrap();
    conn.execute(
        "UPDATE rows SET value = (SELECT value FROM rows WHERE tbl='versions' AND key=?1) WHERE tbl='versions' AND key=?2",
        [format!("{a}/{:010}", 2), format!("{a}/{:010}", 1)],
    )
    .unwrap();
    let broken = run();
    assert_eq!(broken.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap();
    let problems = report["Problems"].to_string();
    assert!(problems.contains(&format!("versions/{a}/{:010}", 1)), "{problems}");
    conn.execute("DELETE FROM rows WHERE tbl='keys' AND key=?1", [&a]).unwrap();
    let report: serde_json::Value = serde_json::from_slice(&run().stdout).unwrap();
    assert!(report["Problems"].to_string().contains("alias"), "{report}");
}
