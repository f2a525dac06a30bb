//! Root rotation at the library level: every row and key version re-sealed under the new root,
//! a restart half-way resumes with the old shares, a second node follows, a node that missed the
//! rotation seals itself, and afterwards nothing in the store opens under the old root.

use std::sync::Arc;
use std::time::Duration;

use custody_crypto::shamir::{self, UnsealShare};
use custody_crypto::{EncryptionContext, SecretBytes};
use custody_kms::{Backup, Caller, CreateKeyRequest, InitSeal, KeyRef, Kms, KmsConfig, KmsError};
use custody_store::{generation_of, Backend, Barrier, Table};

mod common;

fn unseal(backend: &Arc<dyn Backend>, shares: &[UnsealShare], identity: &str) -> (Kms, Caller) {
    let kms = Kms::open(backend.clone(), KmsConfig::development()).unwrap();
    for s in shares {
        kms.submit_share(&s.to_text()).unwrap();
    }
    assert!(!kms.status().unwrap().sealed);
    let caller = kms.authenticate_certificate(identity).unwrap();
    (kms, caller)
}

fn ctx() -> EncryptionContext {
    EncryptionContext::new([("purpose".to_string(), "root-rotation".to_string())].into()).unwrap()
}

/// Runs the rotation to its end, as the server's task does (through both grace periods).
fn run_to_end(kms: &Kms) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if kms.continue_root_rotation(Duration::from_millis(50)).unwrap().is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the rotation did not finish");
}

/// Advances the rotation until it has switched to writing under the next root and the grace
/// after that is over (the next call re-seals).
fn switch(kms: &Kms, caller: &Caller) {
    while kms.root_status(caller).unwrap().phase != Some("re-sealing") {
        assert!(kms.continue_root_rotation(Duration::ZERO).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_rotation_reseals_every_row_and_retires_the_old_root() {
    let (_dir, backend, out) = common::init(InitSeal::Shamir { threshold: 3, shares: 5 });
    let identity = format!("spiffe://custody/{}/admin", out.tenant);
    let old_shares = &out.shares[..3];
    let old_root = shamir::combine(old_shares).unwrap();
    let (kms, caller) = unseal(&backend, old_shares, &identity);

    // Keys, one rotated, ciphertexts, an alias, a backup, an audit token.
    let mut blobs = Vec::new();
    let mut keys = Vec::new();
    for i in 0..3 {
        let key =
            kms.create_key(&caller, CreateKeyRequest { description: format!("k{i}"), ..Default::default() }).unwrap();
        let k = KeyRef::parse(&key.key_id, "KeyId").unwrap();
        if i == 0 {
            kms.rotate_key_on_demand(&caller, &k).unwrap();
        }
        let text = SecretBytes::copy_from(format!("secret {i}").as_bytes());
        blobs.push((kms.encrypt(&caller, &k, &text, &ctx()).unwrap().ciphertext_blob, format!("secret {i}")));
        keys.push(k);
    }
    kms.create_alias(&caller, &custody_kms::AliasName::parse("alias/app").unwrap(), &keys[1]).unwrap();
    let token = kms.audit_hash(&caller, "billing").unwrap();
    let (header, backup) = kms.create_backup(&caller).unwrap();
    assert_eq!(header.root_generation, 1);
    // A second node, and one that will miss the whole rotation.
    let (node_b, caller_b) = unseal(&backend, old_shares, &identity);
    let (node_c, _) = unseal(&backend, old_shares, &identity);

    // Start. The new shares do not unseal anything yet.
    let started = kms.rotate_root(&caller).unwrap();
    assert_eq!((started.generation, started.threshold, started.shares.len()), (2, 3, 5));
    let status = kms.root_status(&caller).unwrap();
    assert_eq!(
        (status.generation, status.rotating, status.next_generation, status.phase),
        (1, true, Some(2), Some("preparing"))
    );
    assert!(matches!(kms.rotate_root(&caller), Err(KmsError::AlreadyExists(_))), "one rotation at a time");
    let fresh = Kms::open(backend.clone(), KmsConfig::development()).unwrap();
    assert!(matches!(fresh.submit_share(&started.shares[0].to_text()), Err(KmsError::InvalidShare(_))));
    // The seal cannot change under a rotation (the new root's seal is already decided).
    let err = Kms::migrate_seal(&backend, &old_root, custody_kms::SealTarget::Shamir).unwrap_err();
    assert!(err.to_string().contains("root rotation"), "{err}");

    // Node B follows: it can open rows under generation 2 but still writes under 1, until the
    // switch; then it writes under 2.
    node_b.follow_root().unwrap();
    let version_generation = |key_id: &str| {
        let raw = backend.get(Table::Versions, &format!("{key_id}/{:010}", 1)).unwrap().unwrap();
        generation_of(&raw.value)
    };
    let early = node_b.create_key(&caller_b, CreateKeyRequest::default()).unwrap();
    assert_eq!(version_generation(&early.key_id), 1);
    switch(&kms, &caller);
    node_b.follow_root().unwrap();
    let late = node_b.create_key(&caller_b, CreateKeyRequest::default()).unwrap();
    assert_eq!(version_generation(&late.key_id), 2);
    let late_ref = KeyRef::parse(&late.key_id, "KeyId").unwrap();
    let late_blob = node_b.encrypt(&caller_b, &late_ref, &SecretBytes::copy_from(b"late"), &ctx()).unwrap();
    let early_ref = KeyRef::parse(&early.key_id, "KeyId").unwrap();
    let early_blob = node_b.encrypt(&caller_b, &early_ref, &SecretBytes::copy_from(b"early"), &ctx()).unwrap();

    // One batch, then a "crash": a new process unseals with the OLD shares and resumes.
    let mid = kms.continue_root_rotation(Duration::ZERO).unwrap().expect("still rotating");
    assert!(mid.resealed.unwrap() > 0, "{mid:?}");
    // A backup taken now holds the rotation too: restored, it opens with the old shares, the
    // rotation finishes there, and then the new shares unseal it.
    let (mid_header, mid_backup) = kms.create_backup(&caller).unwrap();
    assert_eq!(mid_header.root_generation, 1);
    let restored_dir = tempfile::tempdir().unwrap();
    let restored: Arc<dyn Backend> =
        Arc::new(custody_store::SqliteBackend::open(&restored_dir.path().join("custody.db")).unwrap());
    Backup::open(&mid_backup, &old_root).unwrap().restore_into(restored.as_ref(), &Default::default()).unwrap();
    {
        let (copy, copy_caller) = unseal(&restored, old_shares, &identity);
        run_to_end(&copy);
        assert_eq!(copy.root_status(&copy_caller).unwrap().generation, 2);
    }
    let (copy, copy_caller) = unseal(&restored, &started.shares[..3], &identity);
    for (blob, text) in &blobs {
        let out = copy.decrypt(&copy_caller, blob, &ctx(), None).unwrap();
        assert_eq!(out.plaintext.expose_secret(), text.as_bytes());
    }
    drop(copy);
    drop(kms);
    let (kms, caller) = unseal(&backend, old_shares, &identity);
    assert_eq!(kms.root_status(&caller).unwrap().next_generation, Some(2));
    run_to_end(&kms);

    let status = kms.root_status(&caller).unwrap();
    assert_eq!((status.generation, status.rotating), (2, false));
    // Every row is sealed under generation 2, every version wrapped under it, and the old root
    // opens nothing.
    let old_barrier = Barrier::new(backend.clone(), old_root.barrier_key());
    let mut rows = 0;
    for table in Table::ALL.into_iter().filter(|t| *t != Table::Meta) {
        for row in backend.scan(table, "", None, usize::MAX).unwrap() {
            assert_eq!(generation_of(&row.value), 2, "{}/{}", table.name(), row.key);
            assert!(
                old_barrier.open_row::<serde_json::Value>(table, row.clone()).is_err(),
                "{}/{}",
                table.name(),
                row.key
            );
            if table == Table::Versions {
                let key = Arc::new(shamir::combine(&started.shares[..3]).unwrap().barrier_key());
                let barrier = Barrier::with_generations(backend.clone(), (2, key), Vec::new());
                let v = barrier.open_row::<serde_json::Value>(table, row).unwrap().value;
                assert_eq!(v["root_generation"], 2, "{v}");
            }
            rows += 1;
        }
    }
    assert!(rows > 10, "{rows} rows checked");
    let meta = String::from_utf8(backend.get(Table::Meta, "store").unwrap().unwrap().value).unwrap();
    assert!(!meta.contains("rotation"), "the sealed next root is gone from the metadata: {meta}");

    // Everything still decrypts, on both nodes; tokens are unchanged.
    node_b.follow_root().unwrap();
    for (blob, text) in &blobs {
        assert_eq!(kms.decrypt(&caller, blob, &ctx(), None).unwrap().plaintext.expose_secret(), text.as_bytes());
        assert_eq!(node_b.decrypt(&caller_b, blob, &ctx(), None).unwrap().plaintext.expose_secret(), text.as_bytes());
    }
    assert_eq!(
        kms.decrypt(&caller, &late_blob.ciphertext_blob, &ctx(), None).unwrap().plaintext.expose_secret(),
        b"late"
    );
    let early = kms.decrypt(&caller, &early_blob.ciphertext_blob, &ctx(), None).unwrap();
    assert_eq!(early.plaintext.expose_secret(), b"early");
    assert_eq!(kms.audit_hash(&caller, "billing").unwrap(), token);

    // Node C never saw the rotation: it cannot open the new rows, so it seals itself.
    assert!(matches!(node_c.follow_root(), Err(KmsError::Sealed)));
    assert!(node_c.status().unwrap().sealed);

    // After a restart only the new shares unseal.
    drop(kms);
    let fresh = Kms::open(backend.clone(), KmsConfig::development()).unwrap();
    assert!(matches!(fresh.submit_share(&old_shares[0].to_text()), Err(KmsError::InvalidShare(_))));
    let (kms, caller) = unseal(&backend, &started.shares[2..], &identity);
    for (blob, text) in &blobs {
        assert_eq!(kms.decrypt(&caller, blob, &ctx(), None).unwrap().plaintext.expose_secret(), text.as_bytes());
    }
    assert_eq!(kms.audit_hash(&caller, "billing").unwrap(), token);
    assert_eq!(kms.check_store(&caller).map(|r| r.problems).unwrap(), Vec::<String>::new());

    // The backup from generation 1 opens with the old root only, and says which it needs.
    let new_root = shamir::combine(&started.shares[..3]).unwrap();
    let err = Backup::open(&backup, &new_root).unwrap_err().to_string();
    assert!(err.contains("generation 1"), "{err}");
    assert!(Backup::open(&backup, &old_root).is_ok());
    assert_eq!(kms.create_backup(&caller).unwrap().0.root_generation, 2);

    // A second rotation works the same way (the stored audit key is re-sealed, not re-made).
    let again = kms.rotate_root(&caller).unwrap();
    assert_eq!(again.generation, 3);
    run_to_end(&kms);
    assert_eq!(kms.audit_hash(&caller, "billing").unwrap(), token);
    assert_eq!(kms.decrypt(&caller, &blobs[0].0, &ctx(), None).unwrap().plaintext.expose_secret(), b"secret 0");
}

#[test]
fn only_a_security_officer_rotates_and_a_key_file_store_has_no_root_rotation() {
    let store = common::keyfile_store();
    let (kms, caller) = store.open(KmsConfig::development());
    for role in [custody_kms::Role::KeyAdmin, custody_kms::Role::TenantAdmin, custody_kms::Role::Auditor] {
        let name = custody_kms::PrincipalName::parse(&format!("p-{}", role.as_str())).unwrap();
        kms.create_principal(&caller, &name, vec![role]).unwrap();
        let who = kms.authenticate_certificate(&store.identity.replace("/admin", &format!("/{name}"))).unwrap();
        assert!(matches!(kms.rotate_root(&who), Err(KmsError::AccessDenied(_))), "{role:?}");
        // An auditor may read the status; the others may not.
        assert_eq!(kms.root_status(&who).is_ok(), role == custody_kms::Role::Auditor, "{role:?}");
    }
    let err = kms.rotate_root(&caller).unwrap_err();
    assert!(matches!(err, KmsError::Validation { .. }), "{err:?}");
    assert!(err.to_string().contains("key-file store"), "{err}");
}

#[test]
fn records_queued_when_a_node_seals_itself_fail_instead_of_waiting_for_an_unseal() {
    let (_dir, backend, out) = common::init(InitSeal::Shamir { threshold: 3, shares: 5 });
    let identity = format!("spiffe://custody/{}/admin", out.tenant);
    let shares = &out.shares[..3];
    let (kms, caller) = unseal(&backend, shares, &identity);
    // A node whose audit thread waits (up to a minute) for the records of requests still being
    // served, so that a record is queued when the node seals itself.
    let config = KmsConfig { audit_group_wait: Duration::from_secs(60), ..KmsConfig::development() };
    let node = Arc::new(Kms::open(backend.clone(), config).unwrap());
    for s in shares {
        node.submit_share(&s.to_text()).unwrap();
    }
    let (queued, still_served) = (node.audit_arrival(), node.audit_arrival());
    let (tx, rx) = std::sync::mpsc::channel();
    node.submit_audit(queued, common::event(1), Default::default(), Box::new(move |r| drop(tx.send(r))));
    std::thread::sleep(Duration::from_millis(100));
    assert!(rx.try_recv().is_err(), "the record waits for its group");

    // The root rotates while the node looks away: it cannot follow, so it seals itself.
    kms.rotate_root(&caller).unwrap();
    run_to_end(&kms);
    assert!(matches!(node.follow_root(), Err(KmsError::Sealed)));
    // The last request being served ends: the group is complete, but the node is sealed. The
    // queued record's request is told at once (the server then refuses it), rather than
    // waiting for an unseal with the audit thread spinning.
    drop(still_served);
    let result = rx.recv_timeout(Duration::from_secs(20)).expect("a queued record is answered when the node seals");
    let why = result.expect_err("nothing can be written while sealed");
    assert!(why.contains("sealed"), "{why}");
}
