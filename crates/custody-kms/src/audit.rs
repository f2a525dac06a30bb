//! The audit trail: one durable record per request (DESIGN.md §7, step 5 of the pipeline),
//! hash-chained, with signed checkpoints.
//!
//! - Every record carries the hash of its predecessor and its own hash
//!   (`custody_crypto::audit::chain_hash` over its canonical JSON), and is a sealed row keyed by
//!   a gap-free sequence number.
//! - Every `audit_checkpoint_every` records, and on a timer, a checkpoint signs (sequence, hash,
//!   time) with an Ed25519 key kept sealed in the store.
//! - [`verify_trail`] checks the whole chain and every checkpoint, from the store or from an
//!   export, and names the first broken link.
//! - Encryption-context values are replaced by HMAC tokens under a root-derived key; keys stay
//!   readable. `audit_hash` gives the token of a known value so it can be searched for.

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custody_crypto::audit::{self as crypto, AuditSigningKey, GENESIS};
use custody_crypto::SecretBytes;
use custody_store::{sequence_key, Expect, StoreError, Table, Write};
use serde::{Deserialize, Serialize};

use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::ids::KeyRef;
use crate::model::{now_ms, Millis};
use crate::{Kms, Unsealed};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Success,
    /// No valid credential.
    Unauthenticated,
    /// Authenticated but not allowed.
    Denied,
    /// Refused or failed for another reason (validation, key state, invalid ciphertext, integrity).
    Failed,
}

/// What the server knows about a finished request. Never plaintext, key material, data keys or
/// full ciphertexts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// When the request arrived.
    pub time: Millis,
    /// Request id (also returned to the caller as `x-amzn-RequestId`).
    pub request_id: String,
    /// The node that served the request.
    #[serde(default)]
    pub node: String,
    /// Peer address.
    pub source: String,
    /// TLS client identity (certificate URI SAN), if one was presented.
    pub tls_identity: Option<String>,
    /// ARN of the authenticated principal, if authentication succeeded.
    pub principal: Option<String>,
    /// SigV4 access key id presented (also when it was refused). Never the secret or signature.
    pub access_key_id: Option<String>,
    /// Action, e.g. `TrentService.Encrypt`.
    pub action: String,
    /// The key concerned, as named or resolved.
    pub key_id: Option<String>,
    /// The version of that key whose material the request used (the primary version when it
    /// encrypted, the ciphertext's when it decrypted), or that the ciphertext named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// Encryption context: keys as given, values as `hmac-sha256:<hex>` tokens (filled in by
    /// [`Kms::record_audit`]; whatever the caller puts here is replaced).
    #[serde(default)]
    pub encryption_context: Option<BTreeMap<String, String>>,
    /// ReEncrypt: the key the ciphertext was decrypted with, as named or resolved (`key_id` is
    /// the destination key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_key_id: Option<String>,
    /// ReEncrypt: the source key's version, as the ciphertext names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_key_version: Option<u32>,
    /// ReEncrypt: the source encryption context, hidden like `encryption_context`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_encryption_context: Option<BTreeMap<String, String>>,
    /// Outcome.
    pub outcome: Outcome,
    /// AWS error name returned, if any.
    pub error_code: Option<String>,
    /// Internal detail of a failure (e.g. which row failed its integrity check); never shown to
    /// the caller.
    pub detail: Option<String>,
    /// Time to answer, in milliseconds.
    pub duration_ms: u64,
    /// Worth a human's attention: use of a disabled key or one pending deletion, a denied
    /// decrypt, a failed authentication, an integrity failure.
    #[serde(default)]
    pub alert: bool,
}

/// A stored record: the event, its position and its links.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    /// When it was written.
    pub written_at: Millis,
    /// Hash of the previous record (hex; zeros before the first).
    pub prev_hash: String,
    /// This record's hash (hex).
    pub hash: String,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// A signed statement that the trail up to `seq` has hash `hash`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditCheckpoint {
    /// Last record covered.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// When signed.
    pub time: Millis,
    /// Ed25519 signature (hex) of `checkpoint_message(seq, hash, time)`.
    pub signature: String,
}

/// A record of another account, as an export shows it: only what links the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ElidedRecord {
    /// Position in the trail.
    pub seq: u64,
    /// Hash of the previous record (hex).
    pub prev_hash: String,
    /// This record's hash (hex): what the next record links to.
    pub hash: String,
}

/// A record as a verifier sees it: whole, or (in an export, for a record of another account)
/// only the hashes that link it, which a verifier checks for linkage but cannot recompute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrailRecord {
    /// Every field: its hash is recomputed.
    Whole(Box<AuditRecord>),
    /// Another account's record.
    Elided(ElidedRecord),
}

/// One line of `custody audit export` (JSON lines: `{"record": ...}`, `{"elided": ...}` or
/// `{"checkpoint": ...}`), in trail order, each checkpoint after the record it covers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportLine {
    /// A record of the caller's account (every account's, for a security officer).
    Record(Box<AuditRecord>),
    /// A record of another account.
    Elided(ElidedRecord),
    /// A signed checkpoint.
    Checkpoint(AuditCheckpoint),
}

/// Where an export page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFrom {
    /// The oldest record still stored.
    Start,
    /// Far enough back to hold every record of requests at or after this time, and verifiable:
    /// right after the newest signed checkpoint made before it (so a few older records come too).
    Since(Millis),
    /// Right after this record (the `next` of the previous page).
    After(u64),
}

/// One page of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPage {
    /// The audit signing key (hex), to verify the checkpoints.
    pub public_key: String,
    /// Records and checkpoints, in order.
    pub lines: Vec<ExportLine>,
    /// Ask for the page after this record next; `None`: this was the end of the trail.
    pub next: Option<u64>,
}

/// The first problem found in a trail.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditProblem {
    /// Sequence number where the trail breaks.
    pub seq: u64,
    /// What is wrong there.
    pub what: String,
}

/// Result of verifying a trail.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditVerification {
    /// Records checked.
    pub records: u64,
    /// Of those, records of other accounts that an export showed only as links (their content
    /// is not recomputed: only the trail's owner can).
    pub elided: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// First sequence number present (above 1 when retention pruned older records).
    pub first_seq: u64,
    /// Last sequence number seen.
    pub last_seq: u64,
    /// The first problem, if any.
    pub problem: Option<AuditProblem>,
}

/// Filters of an audit query.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records after this sequence number.
    pub after: u64,
    /// Most records returned.
    pub limit: usize,
    /// Key id or ARN contains this (ReEncrypt: its source or destination key); an alias
    /// (`alias/name` or its ARN) also matches the records of the key it names now.
    pub key: Option<String>,
    /// Principal ARN or TLS identity contains this.
    pub principal: Option<String>,
    /// Action ends with this (`Decrypt` matches `TrentService.Decrypt`).
    pub action: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Only records at or after this time.
    pub since: Option<Millis>,
}

/// Sequencer state: next sequence number and the last hash, learned from the store on first use;
/// plus the health of the trail and the alert count since start.
/// Told the result of one queued record: its sequence number, or why it could not be written.
pub type Completion = Box<dyn FnOnce(Result<u64, String>) + Send>;

/// The audit thread: commits whatever is queued, as one group, for as long as the service lives.
fn committer(kms: std::sync::Weak<Kms>) {
    loop {
        let Some(kms) = kms.upgrade() else { return };
        let seq = &kms.audit_seq;
        {
            let q = seq.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.is_empty() {
                // Submitters wake this thread only while it waits (a futex call per request
                // otherwise). Re-check the service is alive once a second while idle.
                seq.idle.store(true, std::sync::atomic::Ordering::Relaxed);
                let (_q, _) =
                    seq.work.wait_timeout(q, std::time::Duration::from_secs(1)).unwrap_or_else(|p| p.into_inner());
                seq.idle.store(false, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
        }
        seq.gather(kms.config.audit_group_wait);
        let u = match kms.unsealed() {
            Ok(u) => u,
            // Queued before the node sealed itself: they cannot be written now, so say so
            // (instead of waiting, and spinning here, until someone unseals).
            Err(e) => {
                let batch = std::mem::take(&mut *seq.queue.lock().unwrap_or_else(|p| p.into_inner()));
                for (_, done) in batch {
                    done(Err(e.to_string()));
                }
                continue;
            }
        };
        let mut state = seq.state.lock().unwrap_or_else(|p| p.into_inner());
        kms.commit_queued(&u, &mut state);
    }
}

/// A request being served whose audit record is not queued yet: from its arrival
/// ([`Kms::audit_arrival`]) until [`Kms::submit_audit`] queues its record, or it is dropped (a
/// request whose record committed with its state change, or that needs none).
pub struct AuditArrival {
    kms: Option<std::sync::Arc<Kms>>,
}

impl std::fmt::Debug for AuditArrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditArrival").finish_non_exhaustive()
    }
}

impl Drop for AuditArrival {
    fn drop(&mut self) {
        if let Some(kms) = self.kms.take() {
            let seq = &kms.audit_seq;
            let queue = seq.queue.lock().unwrap_or_else(|p| p.into_inner());
            if seq.arrived(queue.len()) {
                seq.work.notify_one();
            }
        }
    }
}

/// Row in [`Table::Meta`] whose revision orders appends to the trail across nodes.
const AUDIT_HEAD: &str = "audit-head";

/// Where the trail ends, as this node last saw it: the next sequence number, the last record's
/// hash, and the revision of the [`AUDIT_HEAD`] row (`None`: no such row yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TrailEnd {
    next: u64,
    hash: [u8; 32],
    head: Option<u64>,
}

/// Receives every committed batch of records, in order, after it is durable (for a file sink):
/// each record's JSON as stored (an [`AuditRecord`]), one per element.
pub type AuditSink = Box<dyn Fn(&[Vec<u8>]) + Send + Sync>;

/// Told of every group commit once it is durable (or failed): how long it took and how many
/// records it held (for the server's metrics).
pub type AuditObserver = Box<dyn Fn(std::time::Duration, usize) + Send + Sync>;

/// An event waiting for its sequence number, encoded once, by the request's own thread: its
/// JSON is both what the record's hash covers and (with the links spliced in front) what is
/// stored, so the audit thread only hashes and copies bytes.
pub(crate) struct PendingRecord {
    /// `serde_json` of the event, context values already hidden.
    json: Vec<u8>,
    /// Action and outcome of an event flagged `alert` (for the counter and the log).
    alert: Option<(String, Outcome)>,
}

impl PendingRecord {
    fn new(event: &AuditEvent) -> Self {
        Self {
            json: serde_json::to_vec(event).expect("events serialize"),
            alert: event.alert.then(|| (event.action.clone(), event.outcome)),
        }
    }
}

/// Appends the stored form of record `seq` (an [`AuditRecord`]: its links, then the event's
/// fields) to `out` and returns its hash, which covers the canonical `Hashed` form. Both are
/// assembled from the event's JSON without decoding it; they are byte for byte what serializing
/// the structs gives (a test holds them to it), so readers and `verify` see no difference.
fn encode_record(out: &mut Vec<u8>, seq: u64, written_at: Millis, prev: &[u8; 32], event: &[u8]) -> [u8; 32] {
    debug_assert!(event.len() > 2 && event[0] == b'{', "an event is a non-empty JSON object");
    let head = format!("{{\"seq\":{seq},\"written_at\":{written_at},");
    let hash = crypto::chain_hash_parts(prev, &[head.as_bytes(), b"\"event\":", event, b"}"]);
    let mut hex = [0u8; 64];
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(b"\"prev_hash\":\"");
    hex::encode_to_slice(prev, &mut hex).expect("64 hex digits");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",\"hash\":\"");
    hex::encode_to_slice(hash, &mut hex).expect("64 hex digits");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",");
    out.extend_from_slice(&event[1..]);
    hash
}

#[derive(Default)]
pub(crate) struct Sequencer {
    sink: std::sync::OnceLock<AuditSink>,
    observer: std::sync::OnceLock<AuditObserver>,
    state: Mutex<Option<TrailEnd>>,
    /// Records waiting for the next group commit, each with how to tell its request the result.
    queue: Mutex<Vec<(PendingRecord, Completion)>>,
    /// Wakes the audit thread (under `queue`).
    work: std::sync::Condvar,
    /// The audit thread, started by the first [`Kms::submit_audit`].
    committer: std::sync::OnceLock<std::thread::JoinHandle<()>>,
    failing: std::sync::atomic::AtomicBool,
    alerts: std::sync::atomic::AtomicU64,
    /// The audit thread is waiting for work (read and written under `queue`).
    idle: std::sync::atomic::AtomicBool,
    /// Requests being served whose record is not queued yet (changed under `queue`).
    arriving: std::sync::atomic::AtomicUsize,
    /// The audit thread waits for a group to fill (read and written under `queue`).
    gathering: std::sync::atomic::AtomicBool,
    /// The group size the audit thread waits for (written under `queue`).
    target: std::sync::atomic::AtomicUsize,
    /// Records in the last group commit.
    last_group: std::sync::atomic::AtomicUsize,
    /// Held shared while this node verifies the stored trail page by page, exclusively while it
    /// prunes: a verification does not see records vanish under it and report them missing.
    walking: std::sync::RwLock<()>,
}

impl Sequencer {
    /// Before a group commit: waits (at most `wait`) until the requests being served have
    /// queued their records and the group is as large as the previous one (under steady load
    /// the clients just answered are about to send again), so that one commit carries them all.
    /// A commit costs nearly the same for one record as for twenty (its flush dominates), so
    /// fewer, larger commits leave more CPU to the requests. A client sending one request at a
    /// time is never held up (the previous group held one record and nothing else is being
    /// served); when load falls, one commit waits out `wait` and the next expects less.
    /// PostgreSQL's `commit_delay` is the same idea.
    fn gather(&self, wait: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        if wait.is_zero() {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.target.store(self.last_group.load(Relaxed), Relaxed);
        if self.ready(queue.len()) {
            return;
        }
        let deadline = std::time::Instant::now() + wait;
        self.gathering.store(true, Relaxed);
        while !self.ready(queue.len()) {
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else { break };
            queue = self.work.wait_timeout(queue, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        self.gathering.store(false, Relaxed);
    }

    /// Whether the group is complete: nothing more is being served and at least the target is
    /// queued (the caller holds `queue`).
    fn ready(&self, queued: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.arriving.load(Relaxed) == 0 && queued >= self.target.load(Relaxed)
    }

    /// One arrival's record is queued or will never be (the caller holds `queue`): whether the
    /// audit thread must be woken, because the group it waits for is complete.
    fn arrived(&self, queued: usize) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.arriving.fetch_sub(1, Relaxed);
        self.gathering.load(Relaxed) && self.ready(queued)
    }
}

impl std::fmt::Debug for Sequencer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequencer").field("sink", &self.sink.get().is_some()).finish_non_exhaustive()
    }
}

/// Where a group commit leaves one record's result (sequence number, or why it failed), and
/// how the waiting request is woken.
#[derive(Debug, Default)]
struct Slot {
    result: Mutex<Option<Result<u64, String>>>,
    wake: std::sync::Condvar,
}

impl Slot {
    fn fill(&self, r: Result<u64, String>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.wake.notify_one();
    }

    fn take(&self) -> Option<Result<u64, String>> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Waits until filled or nudged (or a short timeout, as a safety net).
    fn wait(&self) {
        let g = self.result.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            let _ = self.wake.wait_timeout(g, std::time::Duration::from_millis(2));
        }
    }
}

/// A request's audit event, prepared before the service acts, so that a state change commits in
/// the same transaction as its record (then the server writes no second record).
pub struct AuditScope {
    event: AuditEvent,
    context: Option<BTreeMap<String, String>>,
    started: std::time::Instant,
    recorded: Mutex<Option<u64>>,
    /// Set by the service when the request deserves an alert (a relaxed separation of duties).
    alert: Mutex<Option<String>>,
    /// The version of the request's key whose material it used (ReEncrypt: the destination's).
    key_version: std::sync::OnceLock<u32>,
}

impl std::fmt::Debug for AuditScope {
    /// Context keys only: values reach the trail as HMAC tokens, never a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Option<Vec<&String>> = self.context.as_ref().map(|c| c.keys().collect());
        f.debug_struct("AuditScope")
            .field("action", &self.event.action)
            .field("request_id", &self.event.request_id)
            .field("context_keys", &keys)
            .finish_non_exhaustive()
    }
}

impl AuditScope {
    /// A scope for `event` (outcome and duration are filled in at commit).
    pub fn new(event: AuditEvent, context: Option<BTreeMap<String, String>>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            event,
            context,
            started: std::time::Instant::now(),
            recorded: Mutex::new(None),
            alert: Mutex::new(None),
            key_version: std::sync::OnceLock::new(),
        })
    }

    /// Notes the version of the request's key whose material is about to be used (the first
    /// one noted stays: a request uses one version of its key).
    pub(crate) fn use_version(&self, version: u32) {
        let _ = self.key_version.set(version);
    }

    /// The version of the request's key whose material it used, if it got that far.
    pub fn key_version(&self) -> Option<u32> {
        self.key_version.get().copied()
    }

    /// Marks the request's record as an alert, with why (kept in the record's detail).
    pub fn flag_alert(&self, why: String) {
        *self.alert.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the request was flagged, if it was.
    pub fn alert(&self) -> Option<String> {
        self.alert.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The sequence number of the record written with a state change, if one was.
    pub fn recorded(&self) -> Option<u64> {
        *self.recorded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Who makes a state change: a caller (whose request scope is recorded with it) or the
/// scheduler acting on its own (recorded as a system event).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Actor<'a> {
    Caller(&'a Caller),
    Scheduler { action: &'static str },
}

impl<'a> From<&'a Caller> for Actor<'a> {
    fn from(c: &'a Caller) -> Self {
        Actor::Caller(c)
    }
}

/// Health of the audit trail, for `/healthz` and status.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AuditHealth {
    /// The last attempt to write a record failed (requests are being refused).
    pub failing: bool,
    /// Records flagged `alert` since this process started.
    pub alerts: u64,
    /// `danger_disable_audit` is set: nothing is recorded.
    pub disabled: bool,
}

const SIGNING_KEY_ROW: &str = "audit-signing-key";

#[derive(Serialize, Deserialize)]
struct SigningKeyRecord {
    /// PKCS#8, base64; only ever inside a sealed row; wiped from memory when dropped.
    pkcs8: zeroize::Zeroizing<String>,
    public_key: String,
}

/// The part of a record its hash covers (canonical: fields in declaration order, maps sorted).
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    written_at: Millis,
    event: &'a AuditEvent,
}

/// The encryption contexts a request named, as the caller sent them. The trail keeps only HMAC
/// tokens of their values ([`Kms::submit_audit`] replaces them).
#[derive(Clone, Copy, Default)]
pub struct RequestContexts<'a> {
    /// `EncryptionContext` (ReEncrypt: `DestinationEncryptionContext`).
    pub context: Option<&'a BTreeMap<String, String>>,
    /// ReEncrypt's `SourceEncryptionContext`.
    pub source: Option<&'a BTreeMap<String, String>>,
}

impl std::fmt::Debug for RequestContexts<'_> {
    /// Keys only: values reach the trail as HMAC tokens, never a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn keys(c: Option<&BTreeMap<String, String>>) -> Option<Vec<&String>> {
            c.map(|c| c.keys().collect())
        }
        f.debug_struct("RequestContexts")
            .field("context_keys", &keys(self.context))
            .field("source_keys", &keys(self.source))
            .finish()
    }
}

/// An encryption context as the trail keeps it: keys as given, values as HMAC tokens.
fn hidden_context(u: &Unsealed, context: Option<&BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    context.map(|c| c.iter().map(|(k, v)| (k.clone(), u.audit_hmac.token(v))).collect())
}

/// The records of one stored row: a group (a JSON array; the row is keyed by its last record),
/// or a single record (an object: rows written before records were grouped).
fn open_records(u: &Unsealed, row: &custody_store::Row) -> Result<Vec<AuditRecord>, StoreError> {
    let plain = u.barrier.open_plain(Table::Audit, row)?;
    let decode =
        |e: serde_json::Error| StoreError::Decode { table: "audit", key: row.key.clone(), reason: e.to_string() };
    match plain.expose_secret().first() {
        Some(b'[') => serde_json::from_slice(plain.expose_secret()).map_err(decode),
        _ => serde_json::from_slice(plain.expose_secret()).map(|r| vec![r]).map_err(decode),
    }
}

/// The rows of `table` after record `after` (0: from the first), in key order, read a page at a
/// time as the iteration advances: every walk over the trail or its checkpoints (reading,
/// exporting, verifying, pruning) holds one page, however long the trail. A read error ends it.
fn rows_after(
    u: &Unsealed,
    table: Table,
    after: u64,
) -> impl Iterator<Item = Result<custody_store::Row, StoreError>> + '_ {
    const PAGE: usize = 128;
    let (mut buffer, mut from, mut exhausted) =
        (std::collections::VecDeque::new(), (after > 0).then(|| sequence_key(after)), false);
    std::iter::from_fn(move || loop {
        if let Some(row) = buffer.pop_front() {
            return Some(Ok(row));
        }
        if exhausted {
            return None;
        }
        match u.barrier.backend().scan(table, "", from.as_deref(), PAGE) {
            Ok(rows) => {
                exhausted = rows.len() < PAGE;
                from = rows.last().map(|r| r.key.clone());
                buffer.extend(rows);
            }
            Err(e) => {
                exhausted = true;
                return Some(Err(e));
            }
        }
    })
}

/// Records after sequence number `after`, oldest first, at most `limit`. Rows (each a group of
/// records, keyed by its last) are read a page at a time, so a call reads about the rows it returns.
fn records_after(u: &Unsealed, after: u64, limit: usize) -> Result<Vec<AuditRecord>, KmsError> {
    let mut out = Vec::new();
    for row in rows_after(u, Table::Audit, after) {
        out.extend(open_records(u, &row?)?.into_iter().filter(|r| r.seq > after));
        if out.len() >= limit {
            out.truncate(limit);
            break;
        }
    }
    Ok(out)
}

/// The sequence number of the first record still stored.
fn first_record(u: &Unsealed) -> Result<Option<u64>, KmsError> {
    let Some(row) = u.barrier.backend().scan(Table::Audit, "", None, 1)?.pop() else { return Ok(None) };
    Ok(open_records(u, &row)?.first().map(|r| r.seq))
}

/// Whether a record is of a request from `tenant`: its principal, or else its client
/// certificate, is of that account. Unauthenticated requests belong to no account: their records
/// are shown whole only to a security officer (and kept whole in the store and the audit file).
fn of_account(e: &AuditEvent, tenant: &crate::ids::TenantId) -> bool {
    let of = |text: &Option<String>, prefix: &str, suffix: char| {
        text.as_deref()
            .and_then(|t| t.strip_prefix(prefix))
            .and_then(|t| t.strip_prefix(tenant.as_str()))
            .is_some_and(|t| t.starts_with(suffix))
    };
    of(&e.principal, "arn:aws:iam::", ':') || of(&e.tls_identity, "spiffe://custody/", '/')
}

/// The sequence number of the newest signed checkpoint made before `since`, if any: every record
/// up to it was written before `since` (a checkpoint is signed after the records it covers).
fn checkpoint_before(u: &Unsealed, since: Millis) -> Result<Option<u64>, KmsError> {
    newest_checkpoint(u, |cp| cp.time < since)
}

/// The newest signed checkpoint for which `early` holds, where `early` holds for every checkpoint
/// older than one for which it holds (checkpoints are made in order: sequence numbers and times
/// grow together). A bisection over sequence numbers, one one-row read each, so it costs the same
/// in a trail of any length.
fn newest_checkpoint(u: &Unsealed, early: impl Fn(&AuditCheckpoint) -> bool) -> Result<Option<u64>, KmsError> {
    // The first checkpoint after record `seq`, if `early` holds for it.
    let early_after = |seq: u64| -> Result<Option<u64>, KmsError> {
        let from = (seq > 0).then(|| sequence_key(seq));
        Ok(match u.barrier.scan::<AuditCheckpoint>(Table::AuditCheckpoints, "", from.as_deref(), 1)?.pop() {
            Some(cp) if early(&cp.value) => Some(cp.value.seq),
            _ => None,
        })
    };
    if early_after(0)?.is_none() {
        return Ok(None);
    }
    let Some(last) = u.barrier.backend().last(Table::AuditCheckpoints)? else { return Ok(None) };
    let last: u64 = last.key.parse().map_err(|_| KmsError::Integrity(format!("audit-checkpoints/{}", last.key)))?;
    // early_after(lo) holds and early_after(hi) does not (nothing comes after the last).
    let (mut lo, mut hi) = (0, last);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if early_after(mid)?.is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    early_after(lo)
}

fn record_hash(prev: &[u8; 32], seq: u64, written_at: Millis, event: &AuditEvent) -> [u8; 32] {
    let canonical = serde_json::to_vec(&Hashed { seq, written_at, event }).expect("events serialize");
    crypto::chain_hash(prev, &canonical)
}

fn parse_hash(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

impl Kms {
    /// Writes one audit record durably, chained to the previous one (and a signed checkpoint
    /// every `audit_checkpoint_every` records). `context` is the request's encryption context;
    /// only HMAC tokens of its values are stored. Fails (and the caller must not report success)
    /// if the record cannot be written; fails with [`KmsError::Sealed`] while sealed, when only
    /// the server log can record the request.
    pub fn record_audit(&self, event: AuditEvent, context: Option<&BTreeMap<String, String>>) -> Result<u64, KmsError> {
        let u = self.unsealed()?;
        if self.config.danger_disable_audit {
            return Ok(0);
        }
        // Group commit: queue the record; whoever can take the sequencer commits everything
        // queued in one transaction (one fsync for many requests) while the others wait for
        // their slot to be filled.
        let slot = std::sync::Arc::new(Slot::default());
        let filled = slot.clone();
        let contexts = RequestContexts { context, source: None };
        self.enqueue_audit(&u, event, contexts, Box::new(move |r| filled.fill(r)), false);
        loop {
            if let Some(done) = slot.take() {
                return done.map_err(KmsError::Internal);
            }
            let state = match self.audit_seq.state.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            match state {
                Some(mut state) => self.commit_queued(&u, &mut state),
                None => slot.wait(),
            }
        }
    }

    /// Counts a request as being served until its record is submitted (or the returned value
    /// is dropped), so that the audit thread can wait for its record to share a group commit.
    /// Without `audit_group_wait` nothing waits for arrivals, and nothing is counted.
    pub fn audit_arrival(self: &std::sync::Arc<Self>) -> AuditArrival {
        if self.config.audit_group_wait.is_zero() {
            return AuditArrival { kms: None };
        }
        // No lock: only the last arrival's end can have to wake the audit thread.
        self.audit_seq.arriving.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AuditArrival { kms: Some(self.clone()) }
    }

    /// Like [`Kms::record_audit`], without blocking: the record is committed by the audit
    /// thread with whatever else is queued, and `done` is called once it is durable (or cannot
    /// be written). The server awaits `done` instead of holding a thread per request.
    /// `arrival` is the request's, taken when it arrived.
    pub fn submit_audit(
        self: &std::sync::Arc<Self>,
        mut arrival: AuditArrival,
        event: AuditEvent,
        contexts: RequestContexts<'_>,
        done: Completion,
    ) {
        let u = match self.unsealed() {
            Ok(u) => u,
            Err(e) => return done(Err(e.to_string())),
        };
        if self.config.danger_disable_audit {
            return done(Ok(0));
        }
        self.audit_seq.committer.get_or_init(|| {
            let kms = std::sync::Arc::downgrade(self);
            std::thread::Builder::new()
                .name("custody-audit".into())
                .spawn(move || committer(kms))
                .expect("the audit thread can be spawned")
        });
        let counted = arrival.kms.take().is_some();
        if self.enqueue_audit(&u, event, contexts, done, counted) {
            self.audit_seq.work.notify_one();
        }
    }

    fn enqueue_audit(
        &self,
        u: &Unsealed,
        mut event: AuditEvent,
        contexts: RequestContexts<'_>,
        done: Completion,
        counted: bool,
    ) -> bool {
        event.encryption_context = hidden_context(u, contexts.context);
        event.source_encryption_context = hidden_context(u, contexts.source);
        let pending = PendingRecord::new(&event);
        drop(event);
        let mut queue = self.audit_seq.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.push((pending, done));
        // Whether the audit thread waits for work, or for the group this record completes.
        let last = counted && self.audit_seq.arrived(queue.len());
        last || self.audit_seq.idle.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Commits everything queued, in one transaction, and completes each request. The caller
    /// holds the sequencer lock.
    fn commit_queued(&self, u: &Unsealed, state: &mut Option<TrailEnd>) {
        let batch = std::mem::take(&mut *self.audit_seq.queue.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return;
        }
        self.audit_seq.last_group.store(batch.len(), std::sync::atomic::Ordering::Relaxed);
        let (events, completions): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let started = std::time::Instant::now();
        let result = self.append_records(u, state, events, Vec::new());
        if let Some(observe) = self.audit_seq.observer.get() {
            observe(started.elapsed(), completions.len());
        }
        self.audit_seq.failing.store(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        let outcome: Vec<Result<u64, String>> = match result {
            Ok(seqs) => seqs.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e.internal_detail().unwrap_or_else(|| e.to_string())); completions.len()],
        };
        for (done, r) in completions.into_iter().zip(outcome) {
            done(r);
        }
    }

    /// Sends every record, once durable, to `sink` too (set once, at start).
    pub fn set_audit_sink(&self, sink: AuditSink) {
        let _ = self.audit_seq.sink.set(sink);
    }

    /// Tells `observer` of every group commit (set once, at start).
    pub fn set_audit_observer(&self, observer: AuditObserver) {
        let _ = self.audit_seq.observer.set(observer);
    }

    /// Records waiting for the next group commit.
    pub fn audit_queue_depth(&self) -> usize {
        self.audit_seq.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The newest record's sequence number (0 when the trail is empty).
    pub fn audit_last_seq(&self) -> Result<u64, KmsError> {
        let u = self.unsealed()?;
        Ok(u.barrier.backend().last(Table::Audit)?.and_then(|r| r.key.parse().ok()).unwrap_or(0))
    }

    /// Health of the trail: whether writes are failing, and alerts since start.
    pub fn audit_health(&self) -> AuditHealth {
        use std::sync::atomic::Ordering::Relaxed;
        AuditHealth {
            failing: self.audit_seq.failing.load(Relaxed),
            alerts: self.audit_seq.alerts.load(Relaxed),
            disabled: self.config.danger_disable_audit,
        }
    }

    /// Applies a state change together with its audit record, in one transaction.
    pub(crate) fn commit(
        &self,
        u: &Unsealed,
        actor: Actor<'_>,
        key_id: Option<String>,
        writes: Vec<Write>,
    ) -> Result<(), KmsError> {
        if self.config.danger_disable_audit {
            return Ok(u.barrier.apply(&writes)?);
        }
        let (event, context, scope) = match actor {
            Actor::Caller(c) => match &c.audit {
                // Library use without a request scope (tests, tools): the caller records.
                None => return Ok(u.barrier.apply(&writes)?),
                Some(scope) => {
                    let mut event = scope.event.clone();
                    event.outcome = Outcome::Success;
                    event.principal = Some(c.arn());
                    event.duration_ms = scope.started.elapsed().as_millis() as u64;
                    if key_id.is_some() {
                        event.key_id = key_id;
                    }
                    event.key_version = event.key_version.or(scope.key_version());
                    if let Some(why) = scope.alert() {
                        event.alert = true;
                        event.detail = Some(why);
                    }
                    (event, scope.context.clone(), Some(scope))
                }
            },
            Actor::Scheduler { action } => {
                let event = AuditEvent {
                    time: now_ms(),
                    request_id: String::new(),
                    node: String::new(),
                    source: "custody scheduler".into(),
                    tls_identity: None,
                    principal: Some("custody:scheduler".into()),
                    access_key_id: None,
                    action: action.into(),
                    key_id,
                    key_version: None,
                    encryption_context: None,
                    source_key_id: None,
                    source_key_version: None,
                    source_encryption_context: None,
                    outcome: Outcome::Success,
                    error_code: None,
                    detail: None,
                    duration_ms: 0,
                    alert: false,
                };
                (event, None, None)
            }
        };
        let event = AuditEvent { encryption_context: hidden_context(u, context.as_ref()), ..event };
        let pending = PendingRecord::new(&event);
        let mut state = self.audit_seq.state.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.append_records(u, &mut state, vec![pending], writes);
        drop(state);
        let failing = matches!(result, Err(KmsError::Internal(_)));
        self.audit_seq.failing.store(failing, std::sync::atomic::Ordering::Relaxed);
        let seq = result?[0];
        if let Some(scope) = scope {
            *scope.recorded.lock().unwrap_or_else(|p| p.into_inner()) = Some(seq);
        }
        Ok(())
    }

    /// Appends `events` (chained, in order) and `state_writes` in one transaction. The caller
    /// holds the sequencer lock (`state`).
    fn append_records(
        &self,
        u: &Unsealed,
        state: &mut Option<TrailEnd>,
        events: Vec<PendingRecord>,
        state_writes: Vec<Write>,
    ) -> Result<Vec<u64>, KmsError> {
        // Several nodes append to one trail: a node that loses the race for a sequence number
        // learns the new end and tries again. Every loss means another node's group committed,
        // so the trail always progresses; the time budget only bounds one request's wait.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut attempt = 0u32;
        while std::time::Instant::now() < deadline {
            attempt += 1;
            if attempt > 1 {
                // Desynchronize nodes that keep colliding.
                let jitter = u64::from(custody_crypto::random::array::<1>()[0]) * u64::from(attempt.min(20));
                std::thread::sleep(std::time::Duration::from_micros(jitter));
            }
            let end = match *state {
                Some(s) => s,
                None => self.trail_end(u)?,
            };
            let (first, mut prev) = (end.next, end.hash);
            let mut writes = Vec::with_capacity(state_writes.len() + 3);
            // Every append moves the head row, conditionally: a node whose view of the trail's
            // end is stale conflicts here (group rows are keyed by their last record, so rows of
            // two nodes claiming overlapping numbers would not collide by key).
            writes.push(Write::Put {
                table: Table::Meta,
                key: AUDIT_HEAD.into(),
                value: (first + events.len() as u64 - 1).to_string().into_bytes(),
                expect: end.head.map_or(Expect::Absent, Expect::Rev),
            });
            let mut seqs = Vec::with_capacity(events.len());
            // Each record's JSON, for the sink (if there is one).
            let sink = self.audit_seq.sink.get();
            let mut records = Vec::with_capacity(if sink.is_some() { events.len() } else { 0 });
            // One sealed row holds the group's records (a JSON array), keyed by its last one; a
            // row also ends at every checkpoint, so that each checkpoint is a row boundary
            // (retention deletes whole rows).
            let mut row = zeroize::Zeroizing::new(Vec::new());
            let written_at = now_ms();
            for (i, event) in events.iter().enumerate() {
                let seq = first + i as u64;
                let sep = if row.is_empty() { b'[' } else { b',' };
                row.push(sep);
                let start = row.len();
                let hash = encode_record(&mut row, seq, written_at, &prev, &event.json);
                if sink.is_some() {
                    records.push(row[start..].to_vec());
                }
                let checkpoint = seq.is_multiple_of(self.config.audit_checkpoint_every.max(1));
                if checkpoint || i + 1 == events.len() {
                    row.push(b']');
                    writes.push(u.barrier.put_plain(Table::Audit, &sequence_key(seq), &row, Expect::Absent));
                    row.clear();
                }
                if checkpoint {
                    writes.push(self.checkpoint_write(u, seq, &hash)?);
                }
                prev = hash;
                seqs.push(seq);
            }
            writes.extend(state_writes.iter().cloned());
            match u.barrier.apply(&writes) {
                Ok(()) => {
                    let head = Some(end.head.map_or(1, |r| r + 1));
                    *state = Some(TrailEnd { next: first + events.len() as u64, hash: prev, head });
                    if let Some(sink) = sink {
                        sink(&records);
                    }
                    for (action, outcome) in events.iter().filter_map(|e| e.alert.as_ref()) {
                        self.audit_seq.alerts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(%action, ?outcome, "audit alert");
                    }
                    return Ok(seqs);
                }
                // Either another writer took these sequence numbers (learn the new end and
                // retry), or the state change itself lost a race (then it is the caller's conflict).
                Err(StoreError::Conflict { .. }) => {
                    let now = self.trail_end(u)?;
                    let taken = now != end;
                    *state = Some(now);
                    if !taken {
                        return Err(KmsError::Conflict);
                    }
                }
                Err(e) => {
                    *state = None;
                    return Err(e.into());
                }
            }
        }
        Err(KmsError::Internal("could not allocate audit sequence numbers".into()))
    }

    /// Signs a checkpoint for the newest record if it has none yet (the timer calls this, so the
    /// unsigned tail is never older than the checkpoint interval).
    pub fn audit_checkpoint(&self) -> Result<Option<u64>, KmsError> {
        let u = self.unsealed()?;
        // Never make requests wait for the timer: if a commit is under way, try next tick.
        let state = match self.audit_seq.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        let TrailEnd { next, hash: last_hash, .. } = match *state {
            Some(s) => s,
            None => self.trail_end(&u)?,
        };
        let last = next - 1;
        if last == 0 {
            return Ok(None);
        }
        if let Some(cp) = u.barrier.backend().last(Table::AuditCheckpoints)? {
            if cp.key == sequence_key(last) {
                return Ok(None);
            }
        }
        u.barrier.apply(&[self.checkpoint_write(&u, last, &last_hash)?])?;
        Ok(Some(last))
    }

    fn checkpoint_write(&self, u: &Unsealed, seq: u64, hash: &[u8; 32]) -> Result<Write, KmsError> {
        let key = self.audit_signing_key(u)?;
        let time = now_ms();
        let signature = hex::encode(key.sign(&crypto::checkpoint_message(seq, hash, time)));
        let cp = AuditCheckpoint { seq, hash: hex::encode(hash), time, signature };
        Ok(u.barrier.put(Table::AuditCheckpoints, &sequence_key(seq), &cp, Expect::Any))
    }

    /// Next sequence number and last hash, from the newest record in the store.
    fn trail_end(&self, u: &Unsealed) -> Result<TrailEnd, KmsError> {
        // The head first: a node appending between the two reads then makes this node's next
        // append conflict (and read again), never succeed on a stale end.
        let head = u.barrier.backend().get(Table::Meta, AUDIT_HEAD)?.map(|r| r.rev);
        match u.barrier.backend().last(Table::Audit)? {
            None => Ok(TrailEnd { next: 1, hash: GENESIS, head }),
            Some(row) => {
                let key = row.key.clone();
                let rec = open_records(u, &row)?.pop().ok_or_else(|| KmsError::Integrity(format!("audit/{key}")))?;
                let hash = parse_hash(&rec.hash).ok_or_else(|| KmsError::Integrity(format!("audit/{key}")))?;
                Ok(TrailEnd { next: rec.seq + 1, hash, head })
            }
        }
    }

    /// The checkpoint signing key, created on first use and kept sealed.
    fn audit_signing_key(&self, u: &Unsealed) -> Result<AuditSigningKey, KmsError> {
        if let Some(row) = u.barrier.get::<SigningKeyRecord>(Table::Pki, SIGNING_KEY_ROW)? {
            let pkcs8 = SecretBytes::new(
                STANDARD
                    .decode(row.value.pkcs8.as_bytes())
                    .map_err(|_| KmsError::Integrity("pki/audit-signing-key".into()))?,
            );
            return AuditSigningKey::from_pkcs8(&pkcs8)
                .ok_or_else(|| KmsError::Integrity("pki/audit-signing-key".into()));
        }
        let (key, pkcs8) = AuditSigningKey::generate();
        let record = SigningKeyRecord {
            pkcs8: zeroize::Zeroizing::new(STANDARD.encode(pkcs8.expose_secret())),
            public_key: hex::encode(key.public_key()),
        };
        match u.barrier.apply(&[u.barrier.put(Table::Pki, SIGNING_KEY_ROW, &record, Expect::Absent)]) {
            Ok(()) => Ok(key),
            // Someone else created it first: use theirs.
            Err(StoreError::Conflict { .. }) => self.audit_signing_key(u),
            Err(e) => Err(e.into()),
        }
    }

    /// The public key that verifies checkpoints (hex).
    pub fn audit_public_key(&self) -> Result<String, KmsError> {
        let u = self.unsealed()?;
        Ok(hex::encode(self.audit_signing_key(&u)?.public_key()))
    }

    /// The HMAC token of a value, as it appears in encryption contexts in the trail.
    pub fn audit_hash(&self, caller: &Caller, value: &str) -> Result<String, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ReadAudit>(caller)?;
        Ok(u.audit_hmac.token(value))
    }

    /// Records of the caller's account matching `q`, oldest first.
    pub fn query_audit(&self, caller: &Caller, q: &AuditQuery) -> Result<Vec<AuditRecord>, KmsError> {
        let _proof = authorize::<act::ReadAudit>(caller)?;
        if !(1..=10_000).contains(&q.limit) {
            return Err(KmsError::validation("limit", "Member must have value between 1 and 10000"));
        }
        let u = self.unsealed()?;
        let contains = |field: &Option<String>, needle: &Option<String>| match needle {
            None => true,
            Some(n) => field.as_deref().is_some_and(|f| f.contains(n.as_str())),
        };
        // Records name the key a request resolved to (its ARN; a Decrypt that failed, the key id
        // in the blob), not the alias the caller typed; only a request that failed before
        // resolving names the alias itself. So an alias matches its own text, and the ARN or id
        // of the key it names now (if it still exists); a key's ARN also matches the records that
        // name only its id.
        let aliased = match q.key.as_deref().map(|k| KeyRef::parse(k, "keyId")) {
            Some(Ok(r @ (KeyRef::Alias(_) | KeyRef::AliasArn { .. }))) => {
                self.resolve(&u, caller, &r).ok().map(|k| (self.key_arn(&k.value), k.value.id.to_string()))
            }
            Some(Ok(KeyRef::KeyArn { id, .. })) => q.key.clone().map(|arn| (arn, id.to_string())),
            _ => None,
        };
        let named = |field: &Option<String>| {
            contains(field, &q.key)
                || aliased.as_ref().is_some_and(|(arn, id)| field.as_deref().is_some_and(|f| f == arn || f == id))
        };
        // A ReEncrypt used two keys: its record is a use of either.
        let key_matches = |e: &AuditEvent| q.key.is_none() || named(&e.key_id) || named(&e.source_key_id);
        let mut out = Vec::new();
        // Every record up to the newest checkpoint signed before `since` is older than it: start
        // there instead of reading the whole trail.
        let skip = match q.since {
            Some(since) => checkpoint_before(&u, since)?.unwrap_or(0),
            None => 0,
        };
        let mut after = q.after.max(skip);
        loop {
            let chunk = records_after(&u, after, 1000)?;
            let done = chunk.len() < 1000;
            for r in chunk {
                after = r.seq;
                let e = &r.event;
                let matches = of_account(e, caller.tenant())
                    && key_matches(e)
                    && (contains(&e.principal, &q.principal) || contains(&e.tls_identity, &q.principal))
                    && q.action.as_deref().is_none_or(|a| e.action.ends_with(a))
                    && q.outcome.is_none_or(|o| o == e.outcome)
                    && q.since.is_none_or(|s| e.time >= s);
                if matches {
                    out.push(r);
                    if out.len() == q.limit {
                        return Ok(out);
                    }
                }
            }
            if done {
                return Ok(out);
            }
        }
    }

    /// Applies the retention settings: deletes the oldest records that are past both limits that
    /// are set, but only up to a signed checkpoint, which stays as the anchor of what remains (the
    /// first remaining record links to it, so the trail still verifies). Returns how many records
    /// were deleted.
    pub fn prune_audit(&self) -> Result<u64, KmsError> {
        let (days, count) = (self.config.audit_retain_days, self.config.audit_retain_records);
        if days == 0 && count == 0 {
            return Ok(0);
        }
        let u = self.unsealed()?;
        let backend = u.barrier.backend();
        let Some(last) = backend.last(Table::Audit)? else { return Ok(0) };
        let last_seq: u64 = last.key.parse().map_err(|_| KmsError::Integrity(format!("audit/{}", last.key)))?;
        // The newest record each limit allows deleting; by age, the newest checkpoint signed before
        // the cutoff (every record it covers is older), found without reading the records.
        let by_count = if count == 0 { u64::MAX } else { last_seq.saturating_sub(count) };
        let by_age = if days == 0 {
            u64::MAX
        } else {
            checkpoint_before(&u, now_ms() - days as i64 * self.config.day_ms)?.unwrap_or(0)
        };
        let limit = by_count.min(by_age).min(last_seq - 1);
        // Prune up to the newest checkpoint within the limit; keep that checkpoint as the anchor.
        let Some(anchor) = newest_checkpoint(&u, |cp| cp.seq <= limit)? else { return Ok(0) };
        let _walking = self.audit_seq.walking.write().unwrap_or_else(|p| p.into_inner());
        let Some(first) = first_record(&u)? else { return Ok(0) };
        if first > anchor {
            return Ok(0);
        }
        // Rows are read a page at a time and deleted in transactions of about PRUNE_ROWS rows,
        // each ending at a checkpoint (rows never straddle one): however much is due, memory
        // stays bounded, and after every transaction the trail again starts at an anchor.
        const PRUNE_ROWS: usize = 1024;
        let (mut writes, mut pruned_to) = (Vec::new(), first - 1);
        for row in rows_after(&u, Table::Audit, first - 1) {
            let row = row?;
            let seq: u64 = row.key.parse().map_err(|_| KmsError::Integrity(format!("audit/{}", row.key)))?;
            if seq > anchor {
                break;
            }
            writes.push(u.barrier.delete(Table::Audit, &row.key, Expect::Rev(row.rev)));
            let at_checkpoint = || backend.get(Table::AuditCheckpoints, &sequence_key(seq)).map(|r| r.is_some());
            if seq == anchor || (writes.len() >= PRUNE_ROWS && at_checkpoint()?) {
                self.prune_to(&u, seq, std::mem::take(&mut writes))?;
                pruned_to = seq;
            }
            if seq == anchor {
                break;
            }
        }
        let pruned = pruned_to + 1 - first;
        if pruned > 0 {
            tracing::info!(pruned, anchor = pruned_to, "audit records pruned by retention");
        }
        Ok(pruned)
    }

    /// One pruning transaction: `writes` delete the rows up to checkpoint `anchor`; the
    /// checkpoints before it go too, and it stays as the anchor of what remains.
    fn prune_to(&self, u: &Unsealed, anchor: u64, mut writes: Vec<Write>) -> Result<(), KmsError> {
        for cp in rows_after(u, Table::AuditCheckpoints, 0) {
            let cp = cp?;
            if cp.key >= sequence_key(anchor) {
                break;
            }
            writes.push(u.barrier.delete(Table::AuditCheckpoints, &cp.key, Expect::Rev(cp.rev)));
        }
        let _state = self.audit_seq.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(u.barrier.apply(&writes)?)
    }

    /// Audit records after sequence number `after`, oldest first, at most `limit`.
    pub fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, KmsError> {
        records_after(&*self.unsealed()?, after, limit)
    }

    /// One page of the trail for export: up to `limit` records after `from`, each checkpoint
    /// after the record it covers (and first, on a page that starts after a checkpoint, that
    /// checkpoint: the anchor a verifier starts from). Records of the caller's account are whole;
    /// those of other accounts are [`ElidedRecord`]s, unless the caller is also a security
    /// officer (the operator's view: every record whole). Requires the right to read the trail.
    pub fn export_audit(&self, caller: &Caller, from: ExportFrom, limit: usize) -> Result<ExportPage, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ReadAudit>(caller)?;
        if !(1..=10_000).contains(&limit) {
            return Err(KmsError::validation("limit", "Member must have value between 1 and 10000"));
        }
        let everyone = caller.roles().contains(&crate::model::Role::SecurityOfficer);
        let after = match from {
            ExportFrom::After(after) => after,
            ExportFrom::Since(since) if let Some(anchor) = checkpoint_before(&u, since)? => anchor,
            ExportFrom::Start | ExportFrom::Since(_) => first_record(&u)?.map_or(0, |first| first - 1),
        };
        let records = records_after(&u, after, limit)?;
        let last = records.last().map_or(after, |r| r.seq);
        // The anchor (a checkpoint at `after`) opens the first page; later pages start after it.
        let cp_after = match from {
            ExportFrom::After(_) => after,
            _ => after.saturating_sub(1),
        };
        let mut covered = Vec::new();
        for row in rows_after(&u, Table::AuditCheckpoints, cp_after) {
            let cp = u.barrier.open_row::<AuditCheckpoint>(Table::AuditCheckpoints, row?)?.value;
            if cp.seq > last {
                break;
            }
            covered.push(cp);
        }
        let mut checkpoints = covered.into_iter().peekable();
        let mut lines = Vec::with_capacity(records.len() + 1);
        while let Some(cp) = checkpoints.next_if(|cp| cp.seq <= after) {
            lines.push(ExportLine::Checkpoint(cp));
        }
        let next = (records.len() == limit).then_some(last);
        for r in records {
            let seq = r.seq;
            lines.push(if everyone || of_account(&r.event, caller.tenant()) {
                ExportLine::Record(Box::new(r))
            } else {
                ExportLine::Elided(ElidedRecord { seq: r.seq, prev_hash: r.prev_hash, hash: r.hash })
            });
            while let Some(cp) = checkpoints.next_if(|cp| cp.seq <= seq) {
                lines.push(ExportLine::Checkpoint(cp));
            }
        }
        Ok(ExportPage { public_key: hex::encode(self.audit_signing_key(&u)?.public_key()), lines, next })
    }

    /// Verifies the stored trail end to end (authorized like reading it).
    pub fn verify_audit(&self, caller: &Caller) -> Result<AuditVerification, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ReadAudit>(caller)?;
        self.verify_trail_unchecked(&u)
    }

    /// Verifies the stored trail; the caller has been authorized.
    pub(crate) fn verify_trail_unchecked(&self, u: &Unsealed) -> Result<AuditVerification, KmsError> {
        let key = self.audit_signing_key(u)?;
        let _walking = self.audit_seq.walking.read().unwrap_or_else(|p| p.into_inner());
        // Rows are read a page at a time as the verification walks them (memory stays bounded
        // however long the trail), and opened one by one so that a row that fails its seal is
        // reported (as its first record: one after the previous row's last), not fatal.
        let failed = std::cell::RefCell::new(None);
        let mut previous_last = None;
        let records = rows_after(u, Table::Audit, 0)
            .map_while(|row| row.map_err(|e| *failed.borrow_mut() = Some(e)).ok())
            .flat_map(|row| {
                let last = row.key.parse::<u64>().unwrap_or(0);
                let group = match open_records(u, &row) {
                    Ok(group) => group.into_iter().map(|r| Ok(TrailRecord::Whole(Box::new(r)))).collect(),
                    Err(_) => vec![Err(previous_last.map_or(last, |p: u64| p + 1))],
                };
                previous_last = Some(last);
                group
            });
        let cps = u.barrier.backend().scan(Table::AuditCheckpoints, "", None, usize::MAX)?;
        let checkpoints = cps
            .into_iter()
            .map(|row| {
                let seq = row.key.parse::<u64>().unwrap_or(0);
                u.barrier.open_row::<AuditCheckpoint>(Table::AuditCheckpoints, row).map(|v| v.value).map_err(|_| seq)
            })
            .collect::<Vec<_>>();
        let verification = verify_trail(key.public_key(), records, checkpoints);
        match failed.into_inner() {
            Some(e) => Err(e.into()),
            None => Ok(verification),
        }
    }
}

/// Verifies a trail: records in sequence order (`Err(seq)` for a stored record that could not be
/// opened) and checkpoints. Used for the store and for exports alike.
pub fn verify_trail(
    public_key: &[u8],
    records: impl IntoIterator<Item = Result<TrailRecord, u64>>,
    checkpoints: Vec<Result<AuditCheckpoint, u64>>,
) -> AuditVerification {
    let mut problems: Vec<AuditProblem> = Vec::new();
    let mut problem = |seq: u64, what: String| problems.push(AuditProblem { seq, what });
    let mut checkpoint_hashes = BTreeMap::new();
    let mut checked_cps = 0;
    for cp in &checkpoints {
        match cp {
            Err(seq) => problem(*seq, format!("checkpoint {seq} was changed outside custody (its seal does not open)")),
            Ok(cp) => {
                checked_cps += 1;
                let valid = parse_hash(&cp.hash).is_some_and(|h| {
                    hex::decode(&cp.signature).is_ok_and(|sig| {
                        crypto::verify_checkpoint(public_key, &crypto::checkpoint_message(cp.seq, &h, cp.time), &sig)
                    })
                });
                if valid {
                    checkpoint_hashes.insert(cp.seq, cp.hash.clone());
                } else {
                    problem(cp.seq, format!("checkpoint {} has an invalid signature", cp.seq));
                }
            }
        }
    }
    let (mut count, mut elided, mut last_seq, mut first_seq) = (0u64, 0u64, 0u64, 0u64);
    let mut prev: Option<[u8; 32]> = None;
    for item in records {
        let rec = match item {
            Ok(r) => r,
            Err(seq) => {
                problem(seq, format!("record {seq} was changed outside custody (its seal does not open)"));
                last_seq = seq;
                prev = None;
                continue;
            }
        };
        count += 1;
        let (seq, prev_hash, hash, content) = match &rec {
            TrailRecord::Whole(r) => (r.seq, &r.prev_hash, &r.hash, Some((r.written_at, &r.event))),
            TrailRecord::Elided(e) => (e.seq, &e.prev_hash, &e.hash, None),
        };
        if last_seq != 0 && seq != last_seq + 1 {
            if seq > last_seq + 1 {
                problem(last_seq + 1, format!("records {} to {} are missing", last_seq + 1, seq - 1));
            } else {
                problem(seq, format!("record {seq} is out of order (after {last_seq})"));
            }
        }
        if last_seq == 0 {
            first_seq = seq;
            if seq == 1 {
                prev = Some(GENESIS);
            } else {
                // A pruned trail starts right after a signed checkpoint, its anchor.
                match checkpoint_hashes.get(&(seq - 1)) {
                    Some(h) => prev = parse_hash(h),
                    None => problem(seq, format!("the trail starts at {seq} without a signed checkpoint for {}: records before it were removed", seq - 1)),
                }
            }
        }
        match prev {
            Some(p) if hex::encode(p) != *prev_hash => {
                problem(seq, format!("record {seq} does not link to record {}: the chain is broken here", seq - 1))
            }
            _ => {}
        }
        let Some(rec_prev) = parse_hash(prev_hash) else {
            problem(seq, format!("record {seq} has a malformed previous hash"));
            last_seq = seq;
            prev = None;
            continue;
        };
        let computed = match content {
            Some((written_at, event)) => {
                let computed = record_hash(&rec_prev, seq, written_at, event);
                if hex::encode(computed) != *hash {
                    problem(seq, format!("record {seq} was altered: its content does not match its hash"));
                }
                computed
            }
            // Another account's record: its hash is taken as given, so what it links to and
            // what the next record and the checkpoints say of it are still checked.
            None => {
                elided += 1;
                let Some(given) = parse_hash(hash) else {
                    problem(seq, format!("record {seq} has a malformed hash"));
                    last_seq = seq;
                    prev = None;
                    continue;
                };
                given
            }
        };
        if let Some(h) = checkpoint_hashes.get(&seq) {
            if h != hash {
                problem(seq, format!("record {seq} differs from what checkpoint {seq} signed"));
            }
        }
        prev = Some(computed);
        last_seq = seq;
    }
    if let Some((&cp_seq, _)) = checkpoint_hashes.iter().next_back() {
        if cp_seq > last_seq {
            problem(last_seq + 1, format!("the trail ends at {last_seq} but checkpoint {cp_seq} covers records up to {cp_seq}: the tail was truncated"));
        }
    }
    let first = problems.into_iter().min_by_key(|p| p.seq);
    AuditVerification { records: count, elided, checkpoints: checked_cps, first_seq, last_seq, problem: first }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tricky: &str, context: Option<BTreeMap<String, String>>, alert: bool) -> AuditEvent {
        AuditEvent {
            time: 1_764_000_000_123,
            request_id: "6f1c1b3e-9d1a-4c55-8f0e-2a7f0a9c1d10".into(),
            node: format!("node-{tricky}"),
            source: "127.0.0.1:50412".into(),
            tls_identity: Some("spiffe://custody/111122223333/app".into()),
            principal: alert.then(|| "arn:aws:iam::111122223333:role/app".into()),
            access_key_id: None,
            action: "TrentService.Encrypt".into(),
            key_id: Some(tricky.into()),
            key_version: alert.then_some(7),
            encryption_context: context.clone(),
            source_key_id: alert.then(|| format!("source {tricky}")),
            source_key_version: alert.then_some(u32::MAX),
            source_encryption_context: context.filter(|_| alert),
            outcome: if alert { Outcome::Denied } else { Outcome::Success },
            error_code: alert.then(|| "AccessDeniedException".into()),
            detail: None,
            duration_ms: 3,
            alert,
        }
    }

    /// The stored form and the hash assembled from the event's JSON are exactly what
    /// serializing `AuditRecord` and `Hashed` gives, for events with escapes, non-ASCII text,
    /// contexts and every optional field present or absent.
    #[test]
    fn a_record_encoded_from_its_event_json_is_the_serialized_record() {
        let context: BTreeMap<String, String> =
            [("dept\"x".to_string(), "hmac-sha256:00ff".to_string()), ("é\n".to_string(), "t".to_string())].into();
        let prev = [0xa5; 32];
        for e in [
            event("plain", None, false),
            event("quote\" back\\slash \u{1} tab\t é ☃", Some(context.clone()), true),
            event("", Some(BTreeMap::new()), false),
        ] {
            let mut stored = Vec::new();
            let hash = encode_record(&mut stored, 42, 1_764_000_000_999, &prev, &PendingRecord::new(&e).json);
            assert_eq!(hash, record_hash(&prev, 42, 1_764_000_000_999, &e));
            let record = AuditRecord {
                seq: 42,
                written_at: 1_764_000_000_999,
                prev_hash: hex::encode(prev),
                hash: hex::encode(hash),
                event: e.clone(),
            };
            assert_eq!(String::from_utf8(stored.clone()).unwrap(), serde_json::to_string(&record).unwrap());
            assert_eq!(serde_json::from_slice::<AuditRecord>(&stored).unwrap(), record);
            // Fields added after the first records were written are left out when empty, so
            // those records serialize (and hash) as they were written.
            let text = String::from_utf8(stored).unwrap();
            assert_eq!(text.contains("key_version"), e.key_version.is_some(), "{text}");
            assert_eq!(text.contains("source_"), e.source_key_id.is_some(), "{text}");
        }
    }
}
