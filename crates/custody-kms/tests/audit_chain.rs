//! The audit trail's tamper evidence: 1,000 mixed records verify; every kind of tampering is
//! found and located.

use std::collections::BTreeMap;
use std::sync::Arc;

use common::event;
use custody_crypto::RootKey;
use custody_kms::{ExportFrom, ExportLine, Kms, KmsConfig, Outcome, TrailRecord};
use custody_store::SqliteBackend;

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

    let edited = verify_after(&t, &format!("UPDATE audit_rows SET value = CAST(substr(value, 1, 60) || CASE WHEN substr(value, 61, 1) = X'00' THEN X'01' ELSE X'00' END || substr(value, 62) AS BLOB) WHERE seq = {}", 500));
    let p = edited.problem.unwrap();
    assert_eq!(p.seq, 500, "{p:?}");
    assert!(p.what.contains("changed"), "{p:?}");

    let deleted = verify_after(&t, &format!("DELETE FROM audit_rows WHERE seq = {}", 321));
    let p = deleted.problem.unwrap();
    assert_eq!(p.seq, 321, "{p:?}");
    assert!(p.what.contains("missing"), "{p:?}");

    let swapped = verify_after(
        &t,
        &format!(
            "UPDATE audit_rows SET seq = -1 WHERE seq = {a};
             UPDATE audit_rows SET seq = {a} WHERE seq = {b};
             UPDATE audit_rows SET seq = {b} WHERE seq = -1;",
            a = 700,
            b = 701
        ),
    );
    assert_eq!(swapped.problem.unwrap().seq, 700);

    let truncated = verify_after(&t, &format!("DELETE FROM audit_rows WHERE seq > {}", 850));
    let p = truncated.problem.unwrap();
    assert_eq!(p.seq, 851, "{p:?}");
    assert!(p.what.contains("truncated"), "{p:?}");

    let inserted = verify_after(
        &t,
        &format!(
            "INSERT INTO audit_rows (seq, rev, value) SELECT {}, rev, value FROM audit_rows WHERE seq = {}",
            1001, 10
        ),
    );
    assert_eq!(inserted.problem.unwrap().seq, 1001);

    let forged_checkpoint = verify_after(
        &t,
        &format!("UPDATE rows SET value = (SELECT value FROM rows WHERE tbl='audit_checkpoints' AND key={}) WHERE tbl='audit_checkpoints' AND key={}", key(100), key(200)),
    );
    assert_eq!(forged_checkpoint.problem.unwrap().seq, 200);
}

/// Every page of an export from `from`, `limit` records at a time, concatenated; and the key.
fn export(kms: &Kms, caller: &custody_kms::Caller, from: ExportFrom, limit: usize) -> (Vec<u8>, Vec<ExportLine>) {
    let mut page = kms.export_audit(caller, from, limit).unwrap();
    let public_key = hex::decode(&page.public_key).unwrap();
    let mut lines = std::mem::take(&mut page.lines);
    while let Some(next) = page.next {
        page = kms.export_audit(caller, ExportFrom::After(next), limit).unwrap();
        lines.append(&mut page.lines);
    }
    (public_key, lines)
}

/// Verifies export lines as `custody audit verify --from-export` does.
fn verify_lines(public_key: &[u8], lines: &[ExportLine]) -> custody_kms::AuditVerification {
    let mut records = Vec::new();
    let mut checkpoints = Vec::new();
    for line in lines.iter().cloned() {
        match line {
            ExportLine::Record(r) => records.push(Ok(TrailRecord::Whole(r))),
            ExportLine::Elided(e) => records.push(Ok(TrailRecord::Elided(e))),
            ExportLine::Checkpoint(c) => checkpoints.push(Ok(c)),
        }
    }
    custody_kms::audit::verify_trail(public_key, records, checkpoints)
}

fn whole(lines: &[ExportLine]) -> Vec<custody_kms::AuditRecord> {
    lines.iter().filter_map(|l| if let ExportLine::Record(r) = l { Some((**r).clone()) } else { None }).collect()
}

#[test]
fn exports_verify_and_expose_edits() {
    let t = trail();
    let kms =
        Kms::open(Arc::new(SqliteBackend::open(&t.dir.path().join("custody.db")).unwrap()), KmsConfig::development())
            .unwrap();
    kms.unseal_with_root(RootKey::from_bytes(&t.root).unwrap()).unwrap();
    let caller = kms.authenticate_certificate(&t.identity).unwrap();
    // Pages of any size make the same export: records in order, each checkpoint after its record.
    let (pk, lines) = export(&kms, &caller, ExportFrom::Start, 1000);
    assert_eq!(lines.len(), 1010);
    assert_eq!(export(&kms, &caller, ExportFrom::Start, 37).1, lines);
    assert!(matches!(&lines[100], ExportLine::Checkpoint(c) if c.seq == 100), "{:?}", lines[100]);
    assert!(kms.export_audit(&caller, ExportFrom::Start, 10_001).is_err(), "pages are bounded");
    let v = verify_lines(&pk, &lines);
    assert_eq!((v.records, v.elided, v.checkpoints, v.problem), (1000, 0, 10, None));

    let records = whole(&lines);
    let cps =
        || lines.iter().filter_map(|l| if let ExportLine::Checkpoint(c) = l { Some(Ok(c.clone())) } else { None });
    let check = |recs: Vec<custody_kms::AuditRecord>, key: &[u8]| {
        custody_kms::audit::verify_trail(
            key,
            recs.into_iter().map(|r| Ok(TrailRecord::Whole(Box::new(r)))),
            cps().collect(),
        )
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

/// A page covering more checkpoints than are read at a time still carries every one of them.
#[test]
fn an_export_page_carries_every_checkpoint_it_covers() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig { audit_checkpoint_every: 3, ..KmsConfig::development() });
    for i in 1..=400 {
        kms.record_audit(event(i), None).unwrap();
    }
    for limit in [1000, 150] {
        let (pk, lines) = export(&kms, &caller, ExportFrom::Start, limit);
        let v = verify_lines(&pk, &lines);
        assert_eq!((v.records, v.checkpoints, v.problem.clone()), (400, 133, None), "{v:?}");
    }
}

/// `--since`: the export starts right after the newest checkpoint signed before that time, with
/// that checkpoint first as its anchor, so it verifies on its own.
#[test]
fn an_export_since_a_time_starts_at_the_checkpoint_before_it_and_verifies_alone() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig { audit_checkpoint_every: 100, ..KmsConfig::development() });
    // Requests of the caller's account, at the time they are recorded.
    let principal = format!("arn:aws:iam::{}:user/app", caller.tenant());
    let now = |i| custody_kms::AuditEvent {
        time: custody_kms::model::now_ms(),
        principal: Some(principal.clone()),
        ..event(i)
    };
    for i in 1..=1000 {
        kms.record_audit(now(i), None).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    let since = custody_kms::model::now_ms();
    for i in 1001..=1250 {
        kms.record_audit(now(i), None).unwrap();
    }
    // A query since that time finds exactly the newer records (it starts reading at checkpoint
    // 1000: everything before is older).
    let q = custody_kms::AuditQuery { since: Some(since), limit: 10_000, ..Default::default() };
    let found: Vec<u64> = kms.query_audit(&caller, &q).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(found, (1001..=1250).collect::<Vec<_>>());
    for limit in [1000, 64] {
        let (pk, lines) = export(&kms, &caller, ExportFrom::Since(since), limit);
        assert!(matches!(&lines[0], ExportLine::Checkpoint(c) if c.seq == 1000), "{:?}", lines[0]);
        let v = verify_lines(&pk, &lines);
        assert_eq!((v.first_seq, v.last_seq, v.records, v.problem.clone()), (1001, 1250, 250, None), "{v:?}");
        // Without its anchor the same lines do not verify: nothing vouches for their start.
        let p = verify_lines(&pk, &lines[1..]).problem.unwrap();
        assert!(p.seq == 1001 && p.what.contains("without a signed checkpoint"), "{p:?}");
    }
    // Before every checkpoint: from the first record; after the last one: from that checkpoint.
    let (_, from_start) = export(&kms, &caller, ExportFrom::Since(0), 1000);
    assert_eq!(from_start, export(&kms, &caller, ExportFrom::Start, 1000).1);
    let (_, latest) = export(&kms, &caller, ExportFrom::Since(i64::MAX), 1000);
    assert!(matches!(&latest[0], ExportLine::Checkpoint(c) if c.seq == 1200), "{:?}", latest[0]);
    assert_eq!(whole(&latest).len(), 50);
}

/// A tenant's auditor sees its own account's records whole and everyone else's as links only
/// (sequence number and hashes): the export still verifies end to end, tampering with either
/// kind is found, and nothing of another account's requests is in it. A security officer sees
/// every record.
#[test]
fn an_auditor_exports_other_accounts_records_as_links_only() {
    let store = common::keyfile_store();
    let (kms, admin) = store.open(KmsConfig { audit_checkpoint_every: 50, ..KmsConfig::development() });
    let tenant = admin.tenant().clone();
    let reader = custody_kms::PrincipalName::parse("reader").unwrap();
    kms.create_principal(&admin, &reader, vec![custody_kms::Role::Auditor]).unwrap();
    let auditor = kms.authenticate_certificate(&store.identity.replace("/admin", "/reader")).unwrap();
    // Odd records: a request of this account; even ones: of another account (event's default).
    for i in 1..=200 {
        let mine = custody_kms::AuditEvent {
            principal: Some(format!("arn:aws:iam::{tenant}:user/app")),
            request_id: format!("mine-{i}"),
            ..event(i)
        };
        kms.record_audit(if i % 2 == 1 { mine } else { event(i) }, None).unwrap();
    }
    let (pk, lines) = export(&kms, &auditor, ExportFrom::Start, 1000);
    let v = verify_lines(&pk, &lines);
    assert_eq!(v.problem, None, "{v:?}");
    let shown = whole(&lines);
    assert!(shown.iter().all(|r| r.event.principal.as_deref().is_some_and(|p| p.contains(tenant.as_str()))));
    assert_eq!(v.records - v.elided, shown.len() as u64);
    assert!(v.elided >= 100, "{v:?}");
    let text = serde_json::to_string(&lines).unwrap();
    assert!(!text.contains("111122223333") && !text.contains("req-"), "another account's requests leak");

    // Tampering with an elided record is found by its links.
    let at = lines.iter().position(|l| matches!(l, ExportLine::Elided(e) if e.seq == 120)).unwrap();
    let mut forged = lines.clone();
    if let ExportLine::Elided(e) = &mut forged[at] {
        e.hash = "00".repeat(32);
    }
    let p = verify_lines(&pk, &forged).problem.unwrap();
    assert_eq!(p.seq, 121, "{p:?}");
    let mut dropped = lines.clone();
    dropped.remove(at);
    assert_eq!(verify_lines(&pk, &dropped).problem.unwrap().seq, 120);
    // ...and with a whole one by its content.
    let at = lines.iter().position(|l| matches!(l, ExportLine::Record(r) if r.seq == 121)).unwrap();
    let mut edited = lines.clone();
    if let ExportLine::Record(r) = &mut edited[at] {
        r.event.outcome = Outcome::Success;
    }
    assert_eq!(verify_lines(&pk, &edited).problem.unwrap().seq, 121);

    // The security officer (the administrator here) sees every record whole.
    let (_, all) = export(&kms, &admin, ExportFrom::Start, 1000);
    assert_eq!(verify_lines(&pk, &all).elided, 0);
    assert!(whole(&all).len() > shown.len());
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
    conn.execute_batch(&format!("DELETE FROM audit_rows WHERE seq <= {}", 610)).unwrap();
    let (kms, caller) =
        common::open_at(Arc::new(SqliteBackend::open(&path).unwrap()), &t.root, &t.identity, KmsConfig::development());
    let p = kms.verify_audit(&caller).unwrap().problem.unwrap();
    assert_eq!(p.seq, 611, "{p:?}");
}

/// Retention by age: records go up to the newest checkpoint signed before the cutoff, which
/// stays as the anchor; the rest verifies, and later pruning moves on from there.
#[test]
fn retention_by_age_prunes_up_to_the_checkpoint_signed_before_the_cutoff() {
    let store = common::keyfile_store();
    // A "day" of 1.5 s, so that one day of retention can pass within the test (and writing 300
    // records takes far less).
    let config = KmsConfig { audit_retain_days: 1, day_ms: 1_500, ..KmsConfig::development() };
    let (kms, caller) = store.open(config);
    for i in 1..=300 {
        kms.record_audit(event(i), None).unwrap();
    }
    assert_eq!(kms.prune_audit().unwrap(), 0, "nothing is a day old yet");
    std::thread::sleep(std::time::Duration::from_millis(1_600));
    for i in 301..=550 {
        kms.record_audit(event(i), None).unwrap();
    }
    // Checkpoints 100..300 are older than a day, 400 and 500 (and the records after 300) are not.
    assert_eq!(kms.prune_audit().unwrap(), 300);
    let v = kms.verify_audit(&caller).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.problem.clone()), (301, 550, None), "{v:?}");
    assert_eq!(kms.prune_audit().unwrap(), 0);
    std::thread::sleep(std::time::Duration::from_millis(1_600));
    // Now everything is old; the last record's checkpoint cannot go (the newest records stay
    // anchored), so pruning stops at 500.
    assert_eq!(kms.prune_audit().unwrap(), 200);
    let v = kms.verify_audit(&caller).unwrap();
    assert_eq!((v.first_seq, v.last_seq, v.records, v.problem.clone()), (501, 550, 50, None), "{v:?}");
}

/// A large backlog is pruned in several transactions, each ending at a checkpoint, and what
/// remains verifies.
#[test]
fn retention_prunes_a_large_backlog_in_checkpoint_sized_steps() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig { audit_retain_records: 100, ..KmsConfig::development() });
    for i in 1..=2_550 {
        kms.record_audit(event(i), None).unwrap();
    }
    let rows = store.backend.scan(custody_store::Table::Audit, "", None, usize::MAX).unwrap().len();
    assert!(rows > 2_048, "one row per record here ({rows}), so more than two transactions' worth");
    assert_eq!(kms.prune_audit().unwrap(), 2_400);
    let v = kms.verify_audit(&caller).unwrap();
    assert_eq!(
        (v.first_seq, v.last_seq, v.records, v.checkpoints, v.problem.clone()),
        (2_401, 2_550, 150, 2, None),
        "{v:?}"
    );
}

/// Records committed together share one sealed row (keyed by the group's last record, split at
/// every checkpoint). A changed or deleted group is located at its first record; rows written
/// before grouping (one record each, a JSON object) still read and verify beside grouped ones.
#[test]
fn grouped_rows_verify_tampering_is_located_and_old_single_record_rows_still_read() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig::development());
    // Single-record rows as earlier versions wrote them: write 5 records, then store each as
    // an object instead of a one-element array.
    for i in 1..=5 {
        kms.record_audit(event(i), None).unwrap();
    }
    let barrier =
        custody_store::Barrier::new(store.backend.clone(), RootKey::from_bytes(&store.root).unwrap().barrier_key());
    for row in store.backend.scan(custody_store::Table::Audit, "", None, usize::MAX).unwrap() {
        let group: Vec<serde_json::Value> =
            barrier.open_row::<Vec<serde_json::Value>>(custody_store::Table::Audit, row.clone()).unwrap().value;
        assert_eq!(group.len(), 1);
        let put = barrier.put(custody_store::Table::Audit, &row.key, &group[0], custody_store::Expect::Rev(row.rev));
        barrier.apply(&[put]).unwrap();
    }
    // Then groups: 16 threads recording at once, 300 records, some across checkpoints.
    let kms = Arc::new(kms);
    std::thread::scope(|s| {
        for t in 0..16 {
            let kms = kms.clone();
            s.spawn(move || {
                for i in 0..((300 + 15 - t) / 16) {
                    kms.record_audit(event(100 + t as u64 * 1000 + i as u64), None).unwrap();
                }
            });
        }
    });
    let rows = store.backend.scan(custody_store::Table::Audit, "", None, usize::MAX).unwrap();
    let v = kms.verify_audit(&caller).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq, v.problem.clone()), (305, 1, 305, None), "{v:?}");
    assert!(rows.len() < 305, "records were grouped: {} rows for 305 records", rows.len());
    for cp in [100, 200, 300] {
        assert!(rows.iter().any(|r| r.key == format!("{cp:020}")), "a row ends at checkpoint {cp}");
    }
    // Every record reads back, in order, through the paged reader too.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = kms.audit_records(after, 7).unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = last.seq;
        seen.extend(page.iter().map(|r| r.seq));
    }
    assert_eq!(seen, (1..=305).collect::<Vec<_>>());
    store.backend.erase_freed().unwrap();

    // The first row holding more than one record: change a byte, or delete it.
    let (prev, group) = rows
        .windows(2)
        .map(|w| (w[0].key.parse::<u64>().unwrap(), w[1].key.parse::<u64>().unwrap()))
        .find(|(p, g)| g - p > 1)
        .expect("a group of several records");
    let t = common::Store { ..store };
    let edited = verify_after(&t, &format!("UPDATE audit_rows SET value = CAST(substr(value, 1, 60) || CASE WHEN substr(value, 61, 1) = X'00' THEN X'01' ELSE X'00' END || substr(value, 62) AS BLOB) WHERE seq = {}", group));
    let p = edited.problem.unwrap();
    assert_eq!(p.seq, prev + 1, "{p:?}");
    assert!(p.what.contains("changed"), "{p:?}");
    let deleted = verify_after(&t, &format!("DELETE FROM audit_rows WHERE seq = {}", group));
    let p = deleted.problem.unwrap();
    assert_eq!(p.seq, prev + 1, "{p:?}");
    assert!(p.what.contains(&format!("records {} to {group} are missing", prev + 1)), "{p:?}");
}

/// Two services (nodes) appending groups to one trail at once: every sequence number is used
/// once, and the chain verifies (a node with a stale view of the end retries).
#[test]
fn two_nodes_appending_groups_keep_one_chain() {
    let store = common::keyfile_store();
    let (a, caller) = store.open(KmsConfig::development());
    let (b, _) = store.open(KmsConfig::development());
    let (a, b) = (Arc::new(a), Arc::new(b));
    std::thread::scope(|s| {
        for t in 0..8 {
            let node = if t % 2 == 0 { a.clone() } else { b.clone() };
            s.spawn(move || {
                for i in 0..50 {
                    node.record_audit(event(t * 1000 + i), None).unwrap();
                }
            });
        }
    });
    let v = a.verify_audit(&caller).unwrap();
    assert_eq!((v.records, v.first_seq, v.last_seq, v.problem.clone()), (400, 1, 400, None), "{v:?}");
}
