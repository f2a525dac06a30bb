//! The audit trail's tamper evidence: 1,000 mixed records verify; every kind of tampering is
//! found and located.

use std::collections::BTreeMap;
use std::sync::Arc;

use custody_crypto::RootKey;
use custody_kms::{AuditEvent, Kms, KmsConfig, Outcome};
use custody_store::SqliteBackend;

fn event(i: u64) -> AuditEvent {
    let outcomes = [Outcome::Success, Outcome::Failed, Outcome::Denied, Outcome::Unauthenticated];
    let actions =
        ["TrentService.Encrypt", "TrentService.Decrypt", "TrentService.GenerateDataKey", "TrentService.ListKeys"];
    AuditEvent {
        time: 1_700_000_000_000 + i as i64,
        request_id: format!("req-{i}"),
        source: "127.0.0.1:5000".into(),
        tls_identity: None,
        principal: Some("arn:aws:iam::111122223333:user/admin".into()),
        access_key_id: None,
        action: actions[(i % 4) as usize].into(),
        key_id: Some(format!("key-{}", i % 7)),
        encryption_context: None,
        outcome: outcomes[(i % 4) as usize],
        error_code: None,
        detail: None,
        duration_ms: i % 5,
        node: "node-a".into(),
        alert: i.is_multiple_of(10),
    }
}

mod common;

/// A store with 1,000 records (checkpoints every 100), flushed to the main database file.
fn trail() -> common::Store {
    let store = common::keyfile_store();
    let (kms, _) = store.open(KmsConfig::development());
    let ctx = BTreeMap::from([("tenant".to_string(), "acme-corp".to_string())]);
    for i in 1..=1000 {
        let seq = kms.record_audit(event(i), (i % 3 == 0).then_some(&ctx)).unwrap();
        assert_eq!(seq, i);
    }
    store.backend.erase_freed().unwrap();
    store
}

/// Opens a copy of the trail's database, lets `tamper` edit it with SQL, and verifies.
fn verify_after(t: &common::Store, tamper: &str) -> custody_kms::AuditVerification {
    let copy = tempfile::tempdir().unwrap();
    let path = copy.path().join("custody.db");
    std::fs::copy(t.dir.path().join("custody.db"), &path).unwrap();
    if !tamper.is_empty() {
        rusqlite::Connection::open(&path).unwrap().execute_batch(tamper).unwrap();
    }
    let (kms, caller) =
        common::open_at(Arc::new(SqliteBackend::open(&path).unwrap()), &t.root, &t.identity, KmsConfig::development());
    kms.verify_audit(&caller).unwrap()
}

fn key(seq: u64) -> String {
    format!("'{seq:020}'")
}

#[test]
fn tampering_is_found_and_located() {
    let t = trail();
    let ok = verify_after(&t, "");
    assert_eq!(
        (ok.records, ok.checkpoints, ok.first_seq, ok.last_seq, ok.problem.clone()),
        (1000, 10, 1, 1000, None),
        "{ok:?}"
    );

    let edited = verify_after(&t, &format!("UPDATE rows SET value = CAST(substr(value, 1, 60) || X'00' || substr(value, 62) AS BLOB) WHERE tbl='audit' AND key={}", key(500)));
    let p = edited.problem.unwrap();
    assert_eq!(p.seq, 500, "{p:?}");
    assert!(p.what.contains("changed"), "{p:?}");

    let deleted = verify_after(&t, &format!("DELETE FROM rows WHERE tbl='audit' AND key={}", key(321)));
    let p = deleted.problem.unwrap();
    assert_eq!(p.seq, 321, "{p:?}");
    assert!(p.what.contains("missing"), "{p:?}");

    let swapped = verify_after(
        &t,
        &format!(
            "UPDATE rows SET key='tmp' WHERE tbl='audit' AND key={a};
             UPDATE rows SET key={a} WHERE tbl='audit' AND key={b};
             UPDATE rows SET key={b} WHERE tbl='audit' AND key='tmp';",
            a = key(700),
            b = key(701)
        ),
    );
    assert_eq!(swapped.problem.unwrap().seq, 700);

    let truncated = verify_after(&t, &format!("DELETE FROM rows WHERE tbl='audit' AND key > {}", key(850)));
    let p = truncated.problem.unwrap();
    assert_eq!(p.seq, 851, "{p:?}");
    assert!(p.what.contains("truncated"), "{p:?}");

    let inserted = verify_after(
        &t,
        &format!(
            "INSERT INTO rows (tbl, key, rev, value) SELECT tbl, {}, rev, value FROM rows WHERE tbl='audit' AND key={}",
            key(1001),
            key(10)
        ),
    );
    assert_eq!(inserted.problem.unwrap().seq, 1001);

    let forged_checkpoint = verify_after(
        &t,
        &format!("UPDATE rows SET value = (SELECT value FROM rows WHERE tbl='audit_checkpoints' AND key={}) WHERE tbl='audit_checkpoints' AND key={}", key(100), key(200)),
    );
    assert_eq!(forged_checkpoint.problem.unwrap().seq, 200);
}

#[test]
fn exports_verify_and_expose_edits() {
    let t = trail();
    let kms =
        Kms::open(Arc::new(SqliteBackend::open(&t.dir.path().join("custody.db")).unwrap()), KmsConfig::development())
            .unwrap();
    kms.unseal_with_root(RootKey::from_bytes(&t.root).unwrap()).unwrap();
    let caller = kms.authenticate_certificate(&t.identity).unwrap();
    let (public_key, records, checkpoints) = kms.export_audit(&caller).unwrap();
    let pk = hex::decode(&public_key).unwrap();
    let cps = || checkpoints.iter().cloned().map(Ok).collect::<Vec<_>>();
    let check = |recs: Vec<custody_kms::AuditRecord>, key: &[u8]| {
        custody_kms::audit::verify_trail(key, recs.into_iter().map(Ok), cps())
    };
    assert_eq!(check(records.clone(), &pk).problem, None);

    let mut edited = records.clone();
    edited[41].event.outcome = Outcome::Success;
    edited[41].event.action = "TrentService.ListKeys".into();
    let p = check(edited, &pk).problem.unwrap();
    assert_eq!(p.seq, 42);
    assert!(p.what.contains("altered"), "{p:?}");

    let mut dropped = records.clone();
    dropped.remove(99);
    assert_eq!(check(dropped, &pk).problem.unwrap().seq, 100);

    let other_key = custody_crypto::audit::AuditSigningKey::generate().0;
    let p = check(records.clone(), other_key.public_key()).problem.unwrap();
    assert!(p.what.contains("invalid signature"), "{p:?}");

    // Context values are tokens; the value itself is nowhere in the trail.
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains("acme-corp"));
    let token = kms.audit_hash(&caller, "acme-corp").unwrap();
    assert_eq!(records[2].event.encryption_context.as_ref().unwrap()["tenant"], token);
}

#[test]
fn retention_prunes_at_a_checkpoint_and_the_rest_still_verifies() {
    let t = trail();
    let copy = tempfile::tempdir().unwrap();
    let path = copy.path().join("custody.db");
    std::fs::copy(t.dir.path().join("custody.db"), &path).unwrap();
    let config = KmsConfig { audit_retain_records: 350, ..KmsConfig::development() };
    let (kms, caller) = common::open_at(Arc::new(SqliteBackend::open(&path).unwrap()), &t.root, &t.identity, config);
    // Keep the newest 350 (651..1000): records up to the newest checkpoint before them (600) go.
    assert_eq!(kms.prune_audit().unwrap(), 600);
    assert_eq!(kms.prune_audit().unwrap(), 0, "nothing more until another checkpoint is old enough");
    let v = kms.verify_audit(&caller).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.records, v.problem), (601, 1000, 400, None));
    // New records continue the chain after pruning.
    kms.record_audit(event(1001), None).unwrap();
    assert_eq!(kms.verify_audit(&caller).unwrap().problem, None);
    // Removing more than retention did, without an anchor, is detected.
    drop(kms);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!("DELETE FROM rows WHERE tbl='audit' AND key <= {}", key(610))).unwrap();
    let (kms, caller) =
        common::open_at(Arc::new(SqliteBackend::open(&path).unwrap()), &t.root, &t.identity, KmsConfig::development());
    let p = kms.verify_audit(&caller).unwrap().problem.unwrap();
    assert_eq!(p.seq, 611, "{p:?}");
}
