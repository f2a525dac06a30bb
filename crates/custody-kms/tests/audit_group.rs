//! Group commits of the audit trail wait (at most `audit_group_wait`) for the records of the
//! requests being served and for a group as large as the last one: a client sending one request
//! at a time is never held up, a request that ends without a record releases the wait, and the
//! wait never exceeds its bound.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::event;
use custody_kms::{Kms, KmsConfig};

mod common;

/// Long enough that a test finishing in time proves the audit thread did not sit out the wait.
const LONG: Duration = Duration::from_secs(60);

/// Plenty for a commit on a loaded CI machine, far below [`LONG`].
const PROMPT: Duration = Duration::from_secs(20);

/// The service with `wait`, and the sizes of its group commits as they happen.
fn service(store: &common::Store, wait: Duration) -> (Arc<Kms>, Arc<Mutex<Vec<usize>>>) {
    let (kms, _) = store.open(KmsConfig { audit_group_wait: wait, ..KmsConfig::development() });
    let kms = Arc::new(kms);
    let groups = Arc::new(Mutex::new(Vec::new()));
    let seen = groups.clone();
    kms.set_audit_observer(Box::new(move |_, records| seen.lock().unwrap().push(records)));
    (kms, groups)
}

/// Submits request `i`'s record; the receiver gets its sequence number once it is durable.
fn submit(kms: &Arc<Kms>, arrival: custody_kms::AuditArrival, i: u64) -> mpsc::Receiver<Result<u64, String>> {
    let (tx, rx) = mpsc::channel();
    kms.submit_audit(arrival, event(i), Default::default(), Box::new(move |r| drop(tx.send(r))));
    rx
}

#[test]
fn a_lone_request_is_committed_at_once() {
    let store = common::keyfile_store();
    let (kms, groups) = service(&store, LONG);
    for i in 0..3 {
        let rx = submit(&kms, kms.audit_arrival(), i);
        let seq = rx.recv_timeout(PROMPT).expect("a lone request's record does not wait for others").unwrap();
        assert!(seq > 0);
    }
    assert_eq!(*groups.lock().unwrap(), vec![1, 1, 1]);
}

#[test]
fn records_of_requests_being_served_share_one_commit() {
    let store = common::keyfile_store();
    let (kms, groups) = service(&store, LONG);
    let (a, b, c) = (kms.audit_arrival(), kms.audit_arrival(), kms.audit_arrival());
    let ra = submit(&kms, a, 1);
    // Two more requests are still being served: their records are waited for.
    std::thread::sleep(Duration::from_millis(100));
    assert!(ra.try_recv().is_err(), "a record is not committed while the group it belongs to is still being served");
    let rb = submit(&kms, b, 2);
    let rc = submit(&kms, c, 3);
    let seqs: Vec<u64> = [ra, rb, rc].iter().map(|rx| rx.recv_timeout(PROMPT).unwrap().unwrap()).collect();
    assert_eq!(seqs[1], seqs[0] + 1);
    assert_eq!(seqs[2], seqs[0] + 2);
    assert_eq!(*groups.lock().unwrap(), vec![3], "one commit for the three records");
}

#[test]
fn a_request_that_ends_without_a_record_releases_the_wait() {
    let store = common::keyfile_store();
    let (kms, groups) = service(&store, LONG);
    let (a, b) = (kms.audit_arrival(), kms.audit_arrival());
    let ra = submit(&kms, a, 1);
    std::thread::sleep(Duration::from_millis(50));
    // B's record was written with its state change (or it needed none).
    drop(b);
    ra.recv_timeout(PROMPT).expect("the wait ends when no other request is being served").unwrap();
    assert_eq!(*groups.lock().unwrap(), vec![1]);
}

#[test]
fn the_wait_is_bounded() {
    let store = common::keyfile_store();
    let (kms, groups) = service(&store, Duration::from_millis(20));
    // A request that is still being served (a slow client, say) holds nobody up for long.
    let _slow = kms.audit_arrival();
    let ra = submit(&kms, kms.audit_arrival(), 1);
    ra.recv_timeout(PROMPT).expect("committed once the wait is over").unwrap();
    assert_eq!(*groups.lock().unwrap(), vec![1]);
}

#[test]
fn after_a_group_the_next_commit_waits_for_as_many_records() {
    let store = common::keyfile_store();
    let (kms, groups) = service(&store, LONG);
    let (a, b) = (kms.audit_arrival(), kms.audit_arrival());
    let (ra, rb) = (submit(&kms, a, 1), submit(&kms, b, 2));
    for rx in [ra, rb] {
        rx.recv_timeout(PROMPT).unwrap().unwrap();
    }
    // The last group held two records: under steady load the next one will too (the clients
    // just answered are about to send again), so a lone record waits for a second one.
    let rc = submit(&kms, kms.audit_arrival(), 3);
    std::thread::sleep(Duration::from_millis(100));
    assert!(rc.try_recv().is_err(), "the commit waits for a group as large as the last");
    let rd = submit(&kms, kms.audit_arrival(), 4);
    for rx in [rc, rd] {
        rx.recv_timeout(PROMPT).unwrap().unwrap();
    }
    assert_eq!(*groups.lock().unwrap(), vec![2, 2]);
}
