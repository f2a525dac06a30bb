//! The service end to end, without the network: seal, keys, lifecycle, crypto, scheduler.

use std::collections::BTreeMap;

use custody_crypto::{EncryptionContext, SecretBytes};
use custody_kms::{CreateKeyRequest, InitSeal, KeyRef, Kms, KmsConfig, KmsError};

mod common;

struct Fixture {
    _store: common::Store,
    path: std::path::PathBuf,
    kms: Kms,
    caller: custody_kms::Caller,
    identity: String,
}

fn keyfile_fixture(day_ms: i64) -> Fixture {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig { day_ms, ..KmsConfig::development() });
    Fixture { path: store.path.clone(), identity: store.identity.clone(), _store: store, kms, caller }
}

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap()
}

fn id(s: &str) -> KeyRef {
    KeyRef::parse(s, "KeyId").unwrap()
}

#[test]
fn rotation_keeps_old_ciphertexts_decryptable() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let key = f.kms.create_key(&f.caller, CreateKeyRequest { description: "t".into(), ..Default::default() }).unwrap();
    let k = id(&key.key_id);
    let c = ctx(&[("purpose", "test")]);
    let secret = SecretBytes::copy_from(b"the first secret");
    let first = f.kms.encrypt(&f.caller, &k, &secret, &c).unwrap();
    f.kms.rotate_key_on_demand(&f.caller, &k).unwrap();
    f.kms.rotate_key_on_demand(&f.caller, &k).unwrap();
    let third = f.kms.encrypt(&f.caller, &k, &secret, &c).unwrap();
    assert_ne!(first.ciphertext_blob[17..21], third.ciphertext_blob[17..21], "new version encrypts");
    for blob in [&first.ciphertext_blob, &third.ciphertext_blob] {
        let out = f.kms.decrypt(&f.caller, blob, &c, None).unwrap();
        assert_eq!(out.plaintext.expose_secret(), b"the first secret");
        assert_eq!(out.key_arn, key.arn);
    }
    let rotations = f.kms.list_key_rotations(&f.caller, &k, None, None).unwrap();
    assert_eq!(rotations.items.len(), 2);
    assert!(rotations.items.iter().all(|r| r.rotation_type == "ON_DEMAND"));
    let page = f.kms.list_key_rotations(&f.caller, &k, Some(1), None).unwrap();
    assert_eq!(page.items.len(), 1);
    let rest = f.kms.list_key_rotations(&f.caller, &k, Some(1), page.next_marker.as_deref()).unwrap();
    assert_eq!((rest.items.len(), rest.next_marker), (1, None));
}

#[test]
fn remembered_key_material_never_outlives_a_changed_version_row() {
    use custody_store::{Expect, Table, Write};
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig::development());
    let key = kms.create_key(&caller, CreateKeyRequest::default()).unwrap();
    let k = id(&key.key_id);
    let c = ctx(&[("purpose", "memo")]);
    let secret = SecretBytes::copy_from(b"remembered");
    let first = kms.encrypt(&caller, &k, &secret, &c).unwrap().ciphertext_blob;
    kms.rotate_key_on_demand(&caller, &k).unwrap();
    let second = kms.encrypt(&caller, &k, &secret, &c).unwrap().ciphertext_blob;
    // Both versions' material is in use (and remembered) on this node.
    for blob in [&first, &second] {
        assert_eq!(kms.decrypt(&caller, blob, &c, None).unwrap().plaintext.expose_secret(), b"remembered");
    }
    // Version 1's row replaced, behind the service, by version 2's (as another node or an
    // attacker with the database could): the node opens the row afresh and refuses it, instead
    // of answering from the material it remembers for the old bytes.
    let row = |v: u32| format!("{}/{v:010}", key.key_id);
    let v2 = store.backend.get(Table::Versions, &row(2)).unwrap().unwrap().value;
    let v1 = store.backend.get(Table::Versions, &row(1)).unwrap().unwrap().value;
    let put = |value: Vec<u8>| Write::Put { table: Table::Versions, key: row(1), value, expect: Expect::Any };
    store.backend.apply(&[put(v2)]).unwrap();
    assert!(matches!(kms.decrypt(&caller, &first, &c, None), Err(KmsError::Integrity(_))));
    assert_eq!(kms.decrypt(&caller, &second, &c, None).unwrap().plaintext.expose_secret(), b"remembered");
    // The row restored: its bytes are checked and unwrapped again, and decrypt again.
    store.backend.apply(&[put(v1)]).unwrap();
    assert_eq!(kms.decrypt(&caller, &first, &c, None).unwrap().plaintext.expose_secret(), b"remembered");
    // Deleted behind the service: the ciphertext no longer opens, whatever was remembered.
    store.backend.apply(&[Write::Delete { table: Table::Versions, key: row(1), expect: Expect::Any }]).unwrap();
    assert!(matches!(kms.decrypt(&caller, &first, &c, None), Err(KmsError::InvalidCiphertext)));
}

#[test]
fn a_key_version_rotates_itself_at_its_usage_limit_and_counts_survive() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig { key_usage_limit: 10, ..KmsConfig::development() });
    let key = kms.create_key(&caller, CreateKeyRequest::default()).unwrap();
    let k = id(&key.key_id);
    let c = ctx(&[]);
    let secret = SecretBytes::copy_from(b"counted");
    let mut blobs = Vec::new();
    for _ in 0..6 {
        blobs.push(kms.encrypt(&caller, &k, &secret, &c).unwrap().ciphertext_blob);
    }
    // Below the limit: counted, not rotated.
    assert_eq!(kms.flush_usage().unwrap().rotated, 0);
    for _ in 0..3 {
        blobs.push(kms.encrypt(&caller, &k, &secret, &c).unwrap().ciphertext_blob);
    }
    kms.generate_data_key(&caller, &k, 32, &c, true).unwrap();
    // 6 + 3 encryptions + 1 data key = 10: the limit. The next flush rotates.
    assert_eq!(kms.flush_usage().unwrap().rotated, 1);
    assert_eq!(kms.flush_usage().unwrap().rotated, 0, "once");
    let after = kms.encrypt(&caller, &k, &secret, &c).unwrap().ciphertext_blob;
    assert_eq!(u32::from_be_bytes(after[17..21].try_into().unwrap()), 2, "the new version encrypts");
    for b in &blobs {
        assert_eq!(kms.decrypt(&caller, b, &c, None).unwrap().plaintext.expose_secret(), b"counted");
    }
    let rotations = kms.list_key_rotations(&caller, &k, None, None).unwrap();
    assert_eq!(rotations.items.len(), 1);
    let records = kms.audit_records(0, 1000).unwrap();
    let r = records.iter().find(|r| r.event.action == "Custody.RotateOnUsageLimit").expect("audited");
    assert_eq!(r.event.key_id.as_deref(), Some(key.arn.as_str()), "{r:?}");
    // The count is stored with the version: a restarted service starts from it (the server
    // flushes every second and at shutdown).
    assert_eq!(kms.flush_usage().unwrap().rotated, 0);
    drop(kms);
    let (kms, caller) = store.open(KmsConfig { key_usage_limit: 12, ..KmsConfig::development() });
    for _ in 0..11 {
        kms.encrypt(&caller, &k, &secret, &c).unwrap();
    }
    // Version 2 has 1 + 11 = 12 now.
    assert_eq!(kms.flush_usage().unwrap().rotated, 1);
}

#[test]
fn wrong_context_tampering_and_wrong_key_are_invalid_ciphertext() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let a = id(&f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap().key_id);
    let b = id(&f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap().key_id);
    let c = ctx(&[("tenant", "acme")]);
    let blob = f.kms.encrypt(&f.caller, &a, &SecretBytes::copy_from(b"x"), &c).unwrap().ciphertext_blob;
    assert!(matches!(
        f.kms.decrypt(&f.caller, &blob, &ctx(&[("tenant", "evil")]), None),
        Err(KmsError::InvalidCiphertext)
    ));
    assert!(matches!(
        f.kms.decrypt(&f.caller, &blob, &EncryptionContext::empty(), None),
        Err(KmsError::InvalidCiphertext)
    ));
    for i in 0..blob.len() {
        let mut t = blob.clone();
        t[i] ^= 1;
        assert!(matches!(f.kms.decrypt(&f.caller, &t, &c, None), Err(KmsError::InvalidCiphertext)), "flip at byte {i}");
    }
    assert!(matches!(f.kms.decrypt(&f.caller, &blob[..blob.len() - 1], &c, None), Err(KmsError::InvalidCiphertext)));
    assert!(matches!(f.kms.decrypt(&f.caller, &blob, &c, Some(&b)), Err(KmsError::IncorrectKey)));
    assert!(f.kms.decrypt(&f.caller, &blob, &c, Some(&a)).is_ok());
}

#[test]
fn disabled_and_pending_deletion_keys_refuse_use() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let k = id(&f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap().key_id);
    let c = EncryptionContext::empty();
    let pt = SecretBytes::copy_from(b"x");
    let blob = f.kms.encrypt(&f.caller, &k, &pt, &c).unwrap().ciphertext_blob;

    f.kms.disable_key(&f.caller, &k).unwrap();
    assert!(matches!(f.kms.encrypt(&f.caller, &k, &pt, &c), Err(KmsError::Disabled(_))));
    assert!(matches!(f.kms.decrypt(&f.caller, &blob, &c, None), Err(KmsError::Disabled(_))));
    assert!(matches!(f.kms.generate_data_key(&f.caller, &k, 32, &c, true), Err(KmsError::Disabled(_))));
    assert_eq!(f.kms.describe_key(&f.caller, &k).unwrap().key_state, "Disabled");

    f.kms.enable_key(&f.caller, &k).unwrap();
    assert!(f.kms.decrypt(&f.caller, &blob, &c, None).is_ok());

    let sched = f.kms.schedule_key_deletion(&f.caller, &k, Some(7)).unwrap();
    assert_eq!(sched.key_state, "PendingDeletion");
    assert!(matches!(f.kms.decrypt(&f.caller, &blob, &c, None), Err(KmsError::InvalidState(_))));
    assert!(matches!(f.kms.enable_key(&f.caller, &k), Err(KmsError::InvalidState(_))));
    assert!(matches!(f.kms.schedule_key_deletion(&f.caller, &k, Some(7)), Err(KmsError::InvalidState(_))));
    f.kms.cancel_key_deletion(&f.caller, &k).unwrap();
    assert_eq!(f.kms.describe_key(&f.caller, &k).unwrap().key_state, "Disabled", "cancel returns to Disabled");
    assert!(matches!(f.kms.cancel_key_deletion(&f.caller, &k), Err(KmsError::InvalidState(_))));
    for bad in [6, 31] {
        assert!(matches!(f.kms.schedule_key_deletion(&f.caller, &k, Some(bad)), Err(KmsError::Validation { .. })));
    }
}

#[test]
fn scheduler_rotates_due_keys_and_destroys_after_the_window() {
    // A "day" of 20 ms: a 7-day window is 140 ms, a 90-day period 1.8 s.
    let f = keyfile_fixture(20);
    let k = id(&f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap().key_id);
    let doomed_meta = f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap();
    let doomed = id(&doomed_meta.key_id);
    f.kms.create_alias(&f.caller, &custody_kms::AliasName::parse("alias/doomed").unwrap(), &doomed).unwrap();
    let secret = b"material-canary";
    let blob = f.kms.encrypt(&f.caller, &doomed, &SecretBytes::copy_from(secret), &EncryptionContext::empty()).unwrap();
    f.kms.enable_key_rotation(&f.caller, &k, Some(90)).unwrap();
    f.kms.schedule_key_deletion(&f.caller, &doomed, Some(7)).unwrap();

    let report = f.kms.run_due_work().unwrap();
    assert_eq!((report.rotated, report.destroyed), (0, 0), "nothing due yet");
    // Enabled, Disabled, PendingDeletion, Destroyed (KeyState::ALL), as the metrics show them.
    assert_eq!(report.keys_by_state, [1, 0, 1, 0]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let report = f.kms.run_due_work().unwrap();
    assert_eq!(report.destroyed, 1);
    assert_eq!(report.keys_by_state, [1, 0, 0, 1], "counted after the pass's own changes");
    let meta = f.kms.describe_key(&f.caller, &doomed).unwrap();
    assert_eq!(meta.key_state, "Destroyed", "the tombstone still answers DescribeKey");
    assert!(matches!(
        f.kms.decrypt(&f.caller, &blob.ciphertext_blob, &EncryptionContext::empty(), None),
        Err(KmsError::InvalidState(_))
    ));
    assert!(f.kms.list_aliases(&f.caller, None, None, None).unwrap().items.is_empty(), "aliases go with the key");

    std::thread::sleep(std::time::Duration::from_millis(1700));
    let report = f.kms.run_due_work().unwrap();
    assert_eq!(report.rotated, 1);
    let rotations = f.kms.list_key_rotations(&f.caller, &k, None, None).unwrap();
    assert_eq!(rotations.items[0].rotation_type, "AUTOMATIC");
    assert_eq!(f.kms.run_due_work().unwrap().rotated, 0, "not again until the next period");
    drop(f.kms);
    let _ = &f.path;
}

#[test]
fn aliases_resolve_everywhere_a_key_id_is_accepted() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let k1 = f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap();
    let k2 = f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap();
    let alias = custody_kms::AliasName::parse("alias/app").unwrap();
    f.kms.create_alias(&f.caller, &alias, &id(&k1.key_id)).unwrap();
    assert!(matches!(f.kms.create_alias(&f.caller, &alias, &id(&k2.key_id)), Err(KmsError::AlreadyExists(_))));
    let by_alias = f.kms.describe_key(&f.caller, &id("alias/app")).unwrap();
    assert_eq!(by_alias.key_id, k1.key_id);
    let alias_arn = format!("arn:aws:kms:us-east-1:{}:alias/app", f.caller.tenant());
    assert_eq!(f.kms.describe_key(&f.caller, &id(&alias_arn)).unwrap().key_id, k1.key_id);
    assert_eq!(f.kms.describe_key(&f.caller, &id(&k1.arn)).unwrap().key_id, k1.key_id);
    f.kms.update_alias(&f.caller, &alias, &id(&k2.key_id)).unwrap();
    assert_eq!(f.kms.describe_key(&f.caller, &id("alias/app")).unwrap().key_id, k2.key_id);
    f.kms.delete_alias(&f.caller, &alias).unwrap();
    assert!(matches!(f.kms.describe_key(&f.caller, &id("alias/app")), Err(KmsError::NotFound(_))));
    // An ARN in another account or region is not found, not "forbidden".
    let foreign = k1.arn.replace(f.caller.tenant().as_str(), "999999999999");
    assert!(matches!(f.kms.describe_key(&f.caller, &id(&foreign)), Err(KmsError::NotFound(_))));
    let other_region = k1.arn.replace("us-east-1", "eu-west-1");
    assert!(matches!(f.kms.describe_key(&f.caller, &id(&other_region)), Err(KmsError::NotFound(_))));
}

#[test]
fn list_keys_paginates() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let mut ids: Vec<String> =
        (0..5).map(|_| f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap().key_id).collect();
    ids.sort();
    let mut seen = Vec::new();
    let mut marker = None;
    loop {
        let page = f.kms.list_keys(&f.caller, Some(2), marker.as_deref()).unwrap();
        seen.extend(page.items.into_iter().map(|e| e.key_id));
        match page.next_marker {
            Some(m) => marker = Some(m),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    assert!(matches!(f.kms.list_keys(&f.caller, Some(0), None), Err(KmsError::Validation { .. })));
}

#[test]
fn tags_and_limits() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let tags = BTreeMap::from([("team".to_string(), "payments".to_string())]);
    let k = id(&f.kms.create_key(&f.caller, CreateKeyRequest { tags, ..Default::default() }).unwrap().key_id);
    f.kms.tag_resource(&f.caller, &k, BTreeMap::from([("env".into(), "prod".into())])).unwrap();
    f.kms.untag_resource(&f.caller, &k, &["team".into()]).unwrap();
    let tags = f.kms.list_resource_tags(&f.caller, &k, None, None).unwrap();
    assert_eq!(tags.items, vec![("env".to_string(), "prod".to_string())]);
    let too_many: BTreeMap<String, String> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
    assert!(matches!(f.kms.tag_resource(&f.caller, &k, too_many), Err(KmsError::Validation { .. })));
    assert_eq!(
        f.kms.list_resource_tags(&f.caller, &k, None, None).unwrap().items.len(),
        1,
        "a refused change changes nothing"
    );
    let big = SecretBytes::new(vec![0; 4097]);
    assert!(matches!(
        f.kms.encrypt(&f.caller, &k, &big, &EncryptionContext::empty()),
        Err(KmsError::Validation { .. })
    ));
    assert!(matches!(f.kms.generate_random(&f.caller, 1025), Err(KmsError::Validation { .. })));
    assert_eq!(f.kms.generate_random(&f.caller, 1024).unwrap().len(), 1024);
}

#[test]
fn shamir_unseal_three_of_five_and_wrong_shares() {
    let (_dir, backend, out) = common::init(InitSeal::Shamir { threshold: 3, shares: 5 });
    assert_eq!(out.shares.len(), 5);
    let texts: Vec<String> = out.shares.iter().map(|s| s.to_text().to_string()).collect();
    let kms = Kms::open(backend.clone(), KmsConfig::development()).unwrap();
    let identity = format!("spiffe://custody/{}/admin", out.tenant);
    assert!(matches!(kms.authenticate_certificate(&identity), Err(KmsError::Sealed)));

    // A share of another store is refused and does not count.
    let (_dir2, _other, foreign) = common::init(InitSeal::Shamir { threshold: 3, shares: 5 });
    assert!(matches!(kms.submit_share(&foreign.shares[0].to_text()), Err(KmsError::InvalidShare(_))));
    assert!(matches!(kms.submit_share("not a share"), Err(KmsError::InvalidShare(_))));
    assert_eq!(kms.status().unwrap().progress, 0);

    assert_eq!(kms.submit_share(&texts[4]).unwrap().progress, 1);
    assert_eq!(kms.submit_share(&texts[4]).unwrap().progress, 1, "the same share counts once");
    assert!(kms.submit_share(&texts[1]).unwrap().sealed);
    let status = kms.submit_share(&texts[2]).unwrap();
    assert!(!status.sealed);
    let caller = kms.authenticate_certificate(&identity).unwrap();
    let key = kms.create_key(&caller, CreateKeyRequest::default()).unwrap();

    // A restart is sealed again; any other three shares unseal.
    drop(kms);
    let kms = Kms::open(backend, KmsConfig::development()).unwrap();
    assert!(kms.status().unwrap().sealed);
    for t in [&texts[0], &texts[3], &texts[1]] {
        kms.submit_share(t).unwrap();
    }
    let caller = kms.authenticate_certificate(&identity).unwrap();
    assert_eq!(kms.describe_key(&caller, &id(&key.key_id)).unwrap().key_id, key.key_id);
}

#[test]
fn unknown_and_malformed_identities_are_unauthenticated() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    for bad in [
        "spiffe://custody/111122223333/admin".to_string(),
        f.identity.replace("/admin", "/nobody"),
        "spiffe://other/x/y".into(),
        "".into(),
    ] {
        assert!(matches!(f.kms.authenticate_certificate(&bad), Err(KmsError::Unauthenticated(_))), "{bad}");
    }
}

#[test]
fn a_row_changed_in_the_database_is_refused() {
    let f = keyfile_fixture(custody_kms::DAY_MS);
    let enabled = f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap();
    let disabled = f.kms.create_key(&f.caller, CreateKeyRequest::default()).unwrap();
    f.kms.disable_key(&f.caller, &id(&disabled.key_id)).unwrap();
    // An attacker with write access to the database copies the disabled key's sealed row over the
    // enabled one (or edits it in any other way).
    let conn = rusqlite::Connection::open(&f.path).unwrap();
    conn.execute(
        "UPDATE rows SET value = (SELECT value FROM rows WHERE tbl = 'keys' AND key = ?1) WHERE tbl = 'keys' AND key = ?2",
        [&disabled.key_id, &enabled.key_id],
    )
    .unwrap();
    assert!(matches!(f.kms.describe_key(&f.caller, &id(&enabled.key_id)), Err(KmsError::Integrity(_))));
    assert!(matches!(
        f.kms.encrypt(&f.caller, &id(&enabled.key_id), &SecretBytes::copy_from(b"x"), &EncryptionContext::empty()),
        Err(KmsError::Integrity(_))
    ));
}

/// SigV4 verification keeps the access key's signing key for the scope it was last used with:
/// a signature of another day is checked with that day's key (never the kept one), and a row
/// changed by this node or behind it (deactivated elsewhere) is refused on the next request.
#[test]
fn sigv4_verification_follows_the_access_key_row_and_the_scope() {
    use custody_crypto::sigv4;
    use custody_kms::SigV4Scope;
    use custody_store::{Expect, Table, Write};
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig::development());
    let key = kms.create_access_key(&caller, None).unwrap();
    let scope = |date| SigV4Scope { date, region: "us-east-1", service: "kms" };
    let sign = |date: &str, text: &[u8]| sigv4::sign(&sigv4::signing_key(&key.secret, date, "us-east-1", "kms"), text);
    let verify = |date, signature: &[u8]| kms.verify_access_key_signature(&key.id, scope(date), b"to sign", signature);

    let today = sign("20261129", b"to sign");
    assert_eq!(verify("20261129", &today).unwrap().unwrap().arn(), caller.arn());
    // The day's key is kept now; another day's signature needs another day's key, both ways.
    assert!(verify("20261130", &today).unwrap().is_none(), "a signature checked with another day's key");
    let tomorrow = sign("20261130", b"to sign");
    assert!(verify("20261130", &tomorrow).unwrap().is_some());
    assert!(verify("20261129", &tomorrow).unwrap().is_none());
    assert!(verify("20261129", &today).unwrap().is_some());
    assert!(verify("20261129", &sign("20261129", b"something else")).unwrap().is_none());
    let other_region = SigV4Scope { date: "20261129", region: "eu-west-1", service: "kms" };
    assert!(kms.verify_access_key_signature(&key.id, other_region, b"to sign", &today).unwrap().is_none());

    // Deactivated through the service: refused at once, whatever was kept.
    kms.update_access_key(&caller, &key.id, false).unwrap();
    assert!(matches!(verify("20261129", &today), Err(KmsError::Unauthenticated(_))));
    kms.update_access_key(&caller, &key.id, true).unwrap();
    assert!(verify("20261129", &today).unwrap().is_some());
    // Deactivated behind this node (another node's write: here the row's inactive bytes put
    // back): the changed bytes are opened afresh and the key is refused.
    let active = store.backend.get(Table::AccessKeys, &key.id).unwrap().unwrap().value;
    kms.update_access_key(&caller, &key.id, false).unwrap();
    let inactive = store.backend.get(Table::AccessKeys, &key.id).unwrap().unwrap().value;
    let put = |value: Vec<u8>| Write::Put { table: Table::AccessKeys, key: key.id.clone(), value, expect: Expect::Any };
    store.backend.apply(&[put(active)]).unwrap();
    assert!(verify("20261129", &today).unwrap().is_some());
    store.backend.apply(&[put(inactive)]).unwrap();
    assert!(matches!(verify("20261129", &today), Err(KmsError::Unauthenticated(_))));
    // Deleted behind it: unknown.
    store
        .backend
        .apply(&[Write::Delete { table: Table::AccessKeys, key: key.id.clone(), expect: Expect::Any }])
        .unwrap();
    assert!(matches!(verify("20261129", &today), Err(KmsError::Unauthenticated(_))));
}
