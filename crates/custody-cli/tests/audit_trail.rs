//! Every request leaves one durable audit record, including failures and unauthenticated ones;
//! records carry no secrets.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use custody_client::Profile;
use custody_kms::Outcome;
use serde_json::json;

#[tokio::test]
async fn one_record_per_request_and_nothing_secret_in_it() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    let canary = "audit-plaintext-canary-51d2";
    let k = common::create_key(&mut c, "Arn").await;
    let enc = c
        .call(
            "TrentService.Encrypt",
            json!({ "KeyId": k, "Plaintext": B64.encode(canary), "EncryptionContext": { "tenant": "acme" } }),
        )
        .await
        .unwrap();
    let blob = enc["CiphertextBlob"].as_str().unwrap().to_string();
    c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob, "EncryptionContext": { "tenant": "acme" } }))
        .await
        .unwrap();
    let dk = c.call("TrentService.GenerateDataKey", json!({ "KeyId": k, "KeySpec": "AES_256" })).await.unwrap();
    assert!(c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await.is_err(), "wrong context");
    let mut anonymous =
        custody_client::Client::connect(&Profile { cert_file: None, key_file: None, ..profile.clone() }).await.unwrap();
    assert!(anonymous.call("TrentService.ListKeys", json!({})).await.is_err());

    let records = server.kms().audit_records(0, 100).unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.event.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "TrentService.CreateKey",
            "TrentService.Encrypt",
            "TrentService.Decrypt",
            "TrentService.GenerateDataKey",
            "TrentService.Decrypt",
            "TrentService.ListKeys"
        ]
    );
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=6).collect::<Vec<u64>>(), "gap-free sequence");
    assert!(records[..4]
        .iter()
        .all(|r| r.event.outcome == Outcome::Success && r.event.key_id.as_deref() == Some(k.as_str())));
    assert_eq!(records[4].event.outcome, Outcome::Failed);
    assert_eq!(records[4].event.error_code.as_deref(), Some("InvalidCiphertextException"));
    assert!(
        k.ends_with(records[4].event.key_id.as_deref().unwrap()),
        "a failed Decrypt names the key from the blob header"
    );
    assert_eq!(records[5].event.outcome, Outcome::Unauthenticated);
    assert!(records[5].event.alert, "failed authentications are alerts");
    assert!(!records[4].event.alert, "a wrong encryption context is not an alert by itself");
    assert!(records.iter().all(|r| !r.event.node.is_empty()), "every record names its node");
    assert_eq!(records[5].event.tls_identity, None);
    assert!(records[0].event.tls_identity.as_deref().unwrap().starts_with("spiffe://custody/"));
    let ids: std::collections::HashSet<_> = records.iter().map(|r| r.event.request_id.clone()).collect();
    assert_eq!(ids.len(), records.len(), "request ids are unique");

    let text = serde_json::to_string(&records).unwrap();
    for secret in [canary.to_string(), B64.encode(canary), dk["Plaintext"].as_str().unwrap().to_string(), blob.clone()]
    {
        assert!(!text.contains(&secret), "a secret or a full ciphertext reached the audit trail");
    }
    server.shutdown().await;

    // Records survive a restart and numbering continues.
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    c.call("TrentService.ListKeys", json!({})).await.unwrap();
    let records = server.kms().audit_records(6, 100).unwrap();
    assert_eq!((records.len(), records[0].seq), (1, 7));
    server.shutdown().await;
}

/// A record names the key version the request used, and a ReEncrypt's record both of its keys,
/// versions and contexts; a query for either key finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_name_the_key_version_used_and_both_keys_of_a_reencrypt() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;
    let a = common::create_key(&mut c, "Arn").await;
    let b = common::create_key(&mut c, "Arn").await;
    let encrypt = |key: &str, ctx: serde_json::Value| json!({ "KeyId": key, "Plaintext": B64.encode("versioned"), "EncryptionContext": ctx });
    let v1 = c.call("TrentService.Encrypt", encrypt(&a, json!({ "app": "one" }))).await.unwrap();
    c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": a })).await.unwrap();
    let v2 = c.call("TrentService.Encrypt", encrypt(&a, json!({ "app": "two" }))).await.unwrap();
    let v1_blob = v1["CiphertextBlob"].as_str().unwrap();
    c.call("TrentService.Decrypt", json!({ "CiphertextBlob": v1_blob, "EncryptionContext": { "app": "one" } }))
        .await
        .unwrap();
    let dk = c.call("TrentService.GenerateDataKey", json!({ "KeyId": a, "KeySpec": "AES_256" })).await.unwrap();
    let moved = c
        .call(
            "TrentService.ReEncrypt",
            json!({
                "CiphertextBlob": v1_blob,
                "SourceEncryptionContext": { "app": "one" },
                "DestinationKeyId": b,
                "DestinationEncryptionContext": { "app": "moved" },
            }),
        )
        .await
        .unwrap();
    // Failures: the record still says which version the ciphertext named.
    let wrong = json!({ "CiphertextBlob": v2["CiphertextBlob"], "EncryptionContext": { "app": "one" } });
    assert!(c.call("TrentService.Decrypt", wrong).await.is_err());
    let wrong_source = json!({
        "CiphertextBlob": v2["CiphertextBlob"],
        "SourceEncryptionContext": { "app": "wrong" },
        "DestinationKeyId": b,
    });
    assert!(c.call("TrentService.ReEncrypt", wrong_source).await.is_err());

    let records = server.kms().audit_records(0, 100).unwrap();
    let by_action = |action: &str| -> Vec<&custody_kms::AuditEvent> {
        records.iter().map(|r| &r.event).filter(|e| e.action == format!("TrentService.{action}")).collect()
    };
    let versions = |es: &[&custody_kms::AuditEvent]| es.iter().map(|e| e.key_version).collect::<Vec<_>>();
    assert_eq!(versions(&by_action("Encrypt")), [Some(1), Some(2)], "the primary version at the time");
    assert_eq!(versions(&by_action("Decrypt")), [Some(1), Some(2)], "the version the ciphertext names");
    assert_eq!(versions(&by_action("GenerateDataKey")), [Some(2)]);
    let decrypts = by_action("Decrypt");
    assert_eq!(
        (decrypts[1].outcome, decrypts[1].key_id.as_deref().is_some_and(|k| a.ends_with(k))),
        (Outcome::Failed, true)
    );
    let mut tokens = std::collections::HashMap::new();
    for v in ["moved", "one", "wrong"] {
        let r = c.call("Custody.AuditHash", json!({ "Value": v })).await.unwrap();
        tokens.insert(v, r["Hash"].as_str().unwrap().to_string());
    }
    let token = |v: &str| tokens[v].clone();
    let reencrypts = by_action("ReEncrypt");
    let ok = reencrypts[0];
    assert_eq!(ok.outcome, Outcome::Success);
    assert_eq!((ok.key_id.as_deref(), ok.key_version), (Some(b.as_str()), Some(1)), "the destination");
    assert_eq!((ok.source_key_id.as_deref(), ok.source_key_version), (Some(a.as_str()), Some(1)), "the source");
    assert_eq!(ok.encryption_context.as_ref().unwrap()["app"], token("moved"));
    assert_eq!(ok.source_encryption_context.as_ref().unwrap()["app"], token("one"));
    let failed = reencrypts[1];
    assert_eq!(failed.error_code.as_deref(), Some("InvalidCiphertextException"));
    assert!(failed.source_key_id.as_deref().is_some_and(|k| a.ends_with(k)), "{failed:?}");
    assert_eq!(failed.source_key_version, Some(2));
    assert_eq!(failed.source_encryption_context.as_ref().unwrap()["app"], token("wrong"));
    assert_eq!(failed.key_id.as_deref(), Some(b.as_str()));
    // Nothing of the values in the clear.
    let text = serde_json::to_string(&records).unwrap();
    for secret in
        ["moved", "\"one\"", "wrong", dk["Plaintext"].as_str().unwrap(), moved["CiphertextBlob"].as_str().unwrap()]
    {
        assert!(!text.contains(secret), "{secret} reached the trail");
    }

    // A query for the source key finds the ReEncrypts too; the table shows versions and both keys.
    let q = c.call("Custody.ListAuditRecords", json!({ "KeyId": a, "Action": "ReEncrypt" })).await.unwrap();
    assert_eq!(q["Records"].as_array().unwrap().len(), 2, "{q}");
    let q = c.call("Custody.ListAuditRecords", json!({ "KeyId": b, "Action": "ReEncrypt" })).await.unwrap();
    assert_eq!(q["Records"].as_array().unwrap().len(), 2, "{q}");
    let out = common::custody()
        .arg("--profile")
        .arg(layout.admin_profile())
        .args(["audit", "query", "--action", "ReEncrypt"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&format!("{a} v1 -> {b} v1")), "{table}");
    server.shutdown().await;
}

#[tokio::test]
async fn when_the_audit_cannot_be_written_nothing_is_answered() {
    let (dir, layout) = common::keyfile_dir();
    // No checkpoint timer in the way: each refused request waits out SQLite's 10 s busy timeout.
    let (server, profile) = common::start(dir.path(), &layout, |c| c.audit_checkpoint_interval_ms = 3_600_000).await;
    let mut c = common::admin_client(&profile).await;
    let k = common::create_key(&mut c, "KeyId").await;

    // Another process holds the database's write lock longer than the server waits (10 s).
    let db = layout.database();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    let r = c.call("TrentService.GenerateDataKey", json!({ "KeyId": k, "KeySpec": "AES_256" })).await;
    match r {
        Err(custody_client::ClientError::Api { status, code, message }) => {
            assert_eq!((status, code.as_str()), (503, "ServiceUnavailableException"));
            assert!(message.contains("audit"), "{message}");
        }
        other => panic!("a data key must not be returned without its audit record: {other:?}"),
    }
    // A state change cannot happen without its record: they commit in one transaction.
    match c.call("TrentService.DisableKey", json!({ "KeyId": k })).await {
        Err(custody_client::ClientError::Api { status, .. }) => assert_eq!(status, 503),
        other => panic!("DisableKey must fail while the audit cannot be written: {other:?}"),
    }
    // Health says so, with a 503 that load balancers understand.
    match c.health().await {
        Err(custody_client::ClientError::Api { status, .. }) => assert_eq!(status, 503),
        other => panic!("healthz must report the failing audit trail: {other:?}"),
    }
    release_tx.send(()).unwrap();
    holder.join().unwrap();

    // It recovers by itself.
    let ok = c.call("TrentService.GenerateDataKey", json!({ "KeyId": k, "KeySpec": "AES_256" })).await.unwrap();
    assert!(ok.get("Plaintext").is_some());
    assert_eq!(c.health().await.unwrap()["audit"], "ok");
    let state = c.call("TrentService.DescribeKey", json!({ "KeyId": k })).await.unwrap();
    assert_eq!(state["KeyMetadata"]["KeyState"], "Enabled", "the refused DisableKey changed nothing");
    // Using a disabled key is an alert.
    c.call("TrentService.DisableKey", json!({ "KeyId": k })).await.unwrap();
    assert!(c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": "eA==" })).await.is_err());
    let last = server.kms().audit_records(0, 100).unwrap().pop().unwrap();
    assert!(last.event.alert && last.event.error_code.as_deref() == Some("DisabledException"));
    assert!(c.call("Custody.GetStatus", json!({})).await.unwrap()["Alerts"].as_u64().unwrap() >= 1);
    server.shutdown().await;
}

// Multi-threaded: the test runs the CLI (blocking) while the in-process server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_export_and_hash_through_the_cli() {
    let (dir, layout) = common::keyfile_dir();
    let sink = dir.path().join("audit.jsonl");
    let sink_path = sink.clone();
    let (server, profile) = common::start(dir.path(), &layout, move |c| {
        c.audit_checkpoint_every = 5;
        c.audit_file = Some(sink_path);
    })
    .await;
    let mut c = common::admin_client(&profile).await;
    let k = common::create_key(&mut c, "KeyId").await;
    for i in 0..12 {
        let ctx = json!({ "customer": format!("customer-{i}") });
        c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": B64.encode("x"), "EncryptionContext": ctx }))
            .await
            .unwrap();
    }
    let profile_path = layout.admin_profile();
    let run = move |args: &[&str]| {
        let out = common::custody().arg("--profile").arg(&profile_path).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["audit", "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("OK:"), "{out}");

    let export = dir.path().join("trail.jsonl");
    let (code, _, err) = run(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(!text.contains("customer-3"), "context values are not exported in the clear");
    let (code, out, _) = run(&["--json", "audit", "verify", "--from-export", export.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["checkpoints"].as_u64().unwrap() >= 2, "{v}");
    // To a pipe: written into it as a stream, the pipe left in place (renaming a staged file
    // onto it would replace it).
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let (code, _, err) = run(&["audit", "export", "--out", fifo.to_str().unwrap()]);
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    assert_eq!(code, Some(0), "{err}");
    let piped = reader.join().unwrap();
    assert!(
        piped.lines().count() >= text.lines().count() && piped.starts_with(text.lines().next().unwrap()),
        "{piped}"
    );

    // --since: from the checkpoint before that time (anchor first), to stdout; verifies alone.
    let (code, out, _) = run(&["--json", "audit", "export", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(out.lines().nth(1).unwrap().contains("\"record\""), "every checkpoint is newer: from the start");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let since = time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap();
    for _ in 0..3 {
        c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": B64.encode("y") })).await.unwrap();
    }
    let (code, exported, err) = run(&["audit", "export", "--since", &since]);
    assert_eq!(code, Some(0), "{err}");
    assert!(exported.lines().nth(1).unwrap().starts_with("{\"checkpoint\""), "the anchor comes first: {exported}");
    let recent = dir.path().join("recent.jsonl");
    std::fs::write(&recent, &exported).unwrap();
    let (code, out, _) = run(&["--json", "audit", "verify", "--from-export", recent.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["first_seq"].as_u64().unwrap() > 1 && v["records"].as_u64().unwrap() >= 1, "{v}");
    let (code, _, err) = run(&["audit", "export", "--since", "yesterday"]);
    assert!(code != Some(0) && err.contains("--since"), "{err}");

    // A line that is not part of an export is refused, naming the line.
    std::fs::write(&recent, format!("{exported}{{\"recrod\": 1}}\n")).unwrap();
    let (code, _, err) = run(&["audit", "verify", "--from-export", recent.to_str().unwrap()]);
    assert!(code != Some(0) && err.contains("not a custody audit export line"), "{err}");

    // An edited export is caught and the place is named.
    std::fs::write(&export, text.replacen("TrentService.Encrypt", "TrentService.ListKeys", 1)).unwrap();
    let (code, out, _) = run(&["audit", "verify", "--from-export", export.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("BROKEN at record") && out.contains("altered"), "{out}");

    // A known value can be found by its token.
    let (_, token, _) = run(&["audit", "hash", "customer-3"]);
    let records = server.kms().audit_records(0, 100).unwrap();
    let hits = records
        .iter()
        .filter(|r| r.event.encryption_context.as_ref().is_some_and(|c| c["customer"] == token.trim()))
        .count();
    assert_eq!(hits, 1);
    let (_, out, _) = run(&["--json", "audit", "query", "--action", "Encrypt", "--since", "1h"]);
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(q["Records"].as_array().unwrap().len(), 15);
    // Records carry the key's ARN; an alias finds the records of the key it names now.
    c.call("TrentService.CreateAlias", json!({ "AliasName": "alias/audited", "TargetKeyId": k })).await.unwrap();
    for key in ["alias/audited", k.as_str()] {
        let (_, out, _) = run(&["--json", "audit", "query", "--key", key, "--action", "Encrypt"]);
        let q: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(q["Records"].as_array().unwrap().len(), 15, "--key {key}: {q}");
    }
    // A full page says how to see more; an empty result says so (stderr: stdout stays the table).
    let (code, out, err) = run(&["audit", "query", "--action", "Encrypt", "--limit", "4"]);
    assert_eq!((code, out.lines().count()), (Some(0), 4), "{out}");
    let fourth = out.lines().nth(3).unwrap().split_whitespace().next().unwrap().to_string();
    assert!(err.contains(&format!("--after {fourth}")), "{err}");
    let (_, out, err) = run(&["audit", "query", "--action", "Frobnicate"]);
    assert!(out.is_empty() && err.contains("no records match"), "{out}{err}");
    // A Decrypt that failed names the key by the id in its blob: the alias finds it too, and the
    // table says why it failed.
    let blob = c
        .call(
            "TrentService.Encrypt",
            json!({ "KeyId": k, "Plaintext": B64.encode("w"), "EncryptionContext": { "a": "b" } }),
        )
        .await
        .unwrap()["CiphertextBlob"]
        .clone();
    assert!(c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await.is_err());
    let (code, out, _) = run(&["audit", "query", "--key", "alias/audited", "--outcome", "failed"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines().count() == 1 && out.contains("TrentService.Decrypt") && out.contains("InvalidCiphertextException"),
        "{out}"
    );
    let (code, out, _) = run(&["--json", "audit", "query", "--key", "alias/never-created"]);
    let q: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, q["Records"].as_array().unwrap().len()), (Some(0), 0), "{q}");
    let (code, out, _) = run(&["audit", "tail", "-n", "5"]);
    assert_eq!((code, out.lines().count()), (Some(0), 5), "{out}");
    // The newest records of this account, however many of others' (here: unauthenticated
    // requests, which belong to no account) came after them.
    let mut anonymous =
        custody_client::Client::connect(&Profile { cert_file: None, key_file: None, ..profile.clone() }).await.unwrap();
    for _ in 0..12 {
        assert!(anonymous.call("TrentService.ListKeys", json!({})).await.is_err());
    }
    let (code, out, _) = run(&["audit", "tail", "-n", "3"]);
    assert_eq!((code, out.lines().count()), (Some(0), 3), "{out}");
    assert!(!out.contains("TrentService.ListKeys"), "{out}");
    // Following shows new records as they come, and not the command's own polling.
    let before = server.kms().audit_last_seq().unwrap();
    let follower = common::custody()
        .arg("--profile")
        .arg(layout.admin_profile())
        .args(["audit", "tail", "-f", "-n", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once its first two reads are recorded, it knows where the trail ended when it started.
    for _ in 0..300 {
        let reads = server.kms().audit_records(before, 100).unwrap();
        if reads.iter().filter(|r| r.event.action == "Custody.ListAuditRecords").count() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": B64.encode("z") })).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let mut follower = follower;
    follower.kill().unwrap();
    let out = String::from_utf8(follower.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("TrentService.Encrypt"), "{out}");

    // The file sink has every record the database has, in order, as JSON lines.
    let in_db: Vec<u64> = server.kms().audit_records(0, 1000).unwrap().iter().map(|r| r.seq).collect();
    let in_file: Vec<u64> = std::fs::read_to_string(&sink)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<custody_kms::AuditRecord>(l).unwrap().seq)
        .collect();
    assert_eq!(in_file, in_db);
    server.shutdown().await;
}
