//! Root key generations and root rotation (`custody root rotate`).
//!
//! The store's root key has a *generation*: 1 at init, one more after each rotation. Every
//! sealed row records the generation whose barrier key sealed it (see
//! [`custody_store::generation_of`]) and every key version the generation whose root wrapped
//! its material ([`VersionRecord::root_generation`]).
//!
//! A rotation, online:
//! 1. **Start** (security officer): a new root key; new shares (Shamir) or the token re-wraps it
//!    (PKCS#11, with new recovery shares). The new root is kept in the store metadata sealed
//!    under the current one, so whatever unseals the store (the old shares, the token) also
//!    recovers the rotation after a crash. Every node loads it (they read the metadata five
//!    times a second) and can open rows and versions under it, but still writes under the old.
//! 2. **Switch**, after [`GRACE_MS`] (every node can read the new root by then): every node seals
//!    new rows and wraps new versions under the new root. No node meets a row it cannot open.
//! 3. **Re-seal**, after another [`GRACE_MS`] (every node writes under the new root): every row of every
//!    table is read in key order in batches of [`BATCH`], and those still under the old
//!    generation are re-sealed (key versions are also re-wrapped), each batch written with its
//!    rows' revisions as preconditions and the cursor in the metadata, atomically. A conflict (a
//!    request changed a row meanwhile) just repeats the batch. Any node continues where another
//!    stopped.
//! 4. **Verify**: passes repeat until one full pass finds nothing left to re-seal.
//! 5. **Finish**: one conditional write makes the new root current (check value, seal, shares)
//!    and deletes the sealed copy; every node drops the old root from memory. Nothing in the
//!    store opens under the old root any more; the old shares are useless.
//!
//! The audit HMAC key was derived from the root key; the first rotation stores it (sealed) so
//! that tokens of encryption-context values stay the same and old records stay searchable.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_crypto::audit::AuditHmacKey;
use custody_crypto::keys::WrapAad;
use custody_crypto::shamir::UnsealShare;
use custody_crypto::{KeyMaterial, OpenError, RootKey, SecretBytes};
use custody_store::{generation_of, Backend, Barrier, Expect, Row, StoreError, Table, Write};
use serde::{Deserialize, Serialize};

use crate::audit::Actor;
use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::model::{now_ms, KeyRecord, Millis, VersionRecord};
use crate::seal::{hex_bytes, read_meta, split_root, SealMeta, SealState, StoreMeta};
use crate::{Kms, Unsealed};

/// How long each node has to follow a step of a rotation (load the next root, then write under
/// it) before the next step: nodes read the store metadata every 200 ms.
pub(crate) const GRACE_MS: Millis = 2_000;
/// Rows read (and at most re-sealed) per batch.
const BATCH: usize = 256;
/// The row in [`Table::Pki`] that keeps the audit HMAC key once a rotation stored it.
const AUDIT_HMAC_ROW: &str = "audit-hmac-key";
/// Every table whose rows are sealed, in the order a rotation visits them: all but the meta
/// table, which comes first in [`Table::ALL`].
fn sealed_tables() -> &'static [Table] {
    debug_assert_eq!(Table::ALL[0], Table::Meta);
    &Table::ALL[1..]
}

/// Serde default of generation fields: stores and versions from before root rotations.
pub(crate) fn first_generation() -> u32 {
    1
}

/// A rotation under way, in the store metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RootRotation {
    /// The next root's generation.
    pub(crate) generation: u32,
    /// The next root, sealed under the current one ([`RootKey::seal_next_root`]).
    #[serde(with = "hex_bytes")]
    sealed_next: Vec<u8>,
    /// The next root's check value.
    #[serde(with = "hex_bytes")]
    next_check: Vec<u8>,
    /// How the next root is sealed (new share fingerprints, or the token's wrapped root).
    next_seal: SealMeta,
    started_at: Millis,
    started_by: String,
    /// When nodes began writing under the next root (`None`: they only read under it yet).
    #[serde(default)]
    switched_at: Option<Millis>,
    /// Full passes over the tables completed.
    pass: u32,
    /// Index into [`sealed_tables`] of the table being visited.
    table: usize,
    /// The last row key visited in that table.
    after: Option<String>,
    /// Rows re-sealed so far.
    resealed: u64,
    /// Rows re-sealed in the current pass (a pass that re-seals nothing ends the rotation).
    resealed_in_pass: u64,
}

/// The root keys a node holds: the current one, and during a rotation the next one.
pub(crate) struct RootRing {
    current: (u32, RootKey),
    next: Option<(u32, RootKey)>,
    /// Whether new rows and versions are written under `next` (after the switch).
    write_next: bool,
}

impl fmt::Debug for RootRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootRing")
            .field("current", &self.current.0)
            .field("next", &self.next.as_ref().map(|n| n.0))
            .field("write_next", &self.write_next)
            .finish()
    }
}

fn copy_root(root: &RootKey) -> RootKey {
    RootKey::from_bytes(root.expose_secret()).expect("a root key is 32 bytes")
}

impl RootRing {
    /// The ring the store metadata calls for, given its current root `root` (checked by the
    /// caller): with the next root too if a rotation is under way, taken from `known` (the ring a
    /// node holds) if it has it, else opened from the metadata.
    pub(crate) fn for_meta(meta: &StoreMeta, root: RootKey, known: Option<&RootRing>) -> Result<Self, KmsError> {
        let next = match &meta.rotation {
            Some(r) => Some(match known.and_then(|k| k.get(r.generation)) {
                Some(k) => (r.generation, copy_root(k)),
                None => (r.generation, open_next(&root, r)?),
            }),
            None => None,
        };
        Ok(Self { current: (meta.root_generation, root), next, write_next: shape(meta).2 })
    }

    /// Current generation, next generation, whether writes use the next.
    fn shape(&self) -> (u32, Option<u32>, bool) {
        (self.current.0, self.next.as_ref().map(|n| n.0), self.write_next)
    }

    /// The root key the store's seal (shares, token, key file) unseals.
    pub(crate) fn current(&self) -> &RootKey {
        &self.current.1
    }

    /// Its generation.
    pub(crate) fn current_generation(&self) -> u32 {
        self.current.0
    }

    /// The root new versions are wrapped under, and its generation: the next one once a
    /// rotation has switched.
    pub(crate) fn write(&self) -> (u32, &RootKey) {
        match &self.next {
            Some((g, k)) if self.write_next => (*g, k),
            _ => (self.current.0, &self.current.1),
        }
    }

    fn get(&self, generation: u32) -> Option<&RootKey> {
        std::iter::once(&self.current).chain(&self.next).find(|(g, _)| *g == generation).map(|(_, k)| k)
    }

    /// Unwraps a version's material with the root of the generation that wrapped it.
    pub(crate) fn unwrap_version(&self, v: &VersionRecord, aad: &WrapAad<'_>) -> Result<KeyMaterial, OpenError> {
        self.get(v.root_generation).ok_or(OpenError)?.unwrap_key_material(&v.wrapped, aad)
    }

    fn barrier(&self, backend: &Arc<dyn Backend>) -> Barrier {
        let keys: Vec<_> =
            std::iter::once(&self.current).chain(&self.next).map(|(g, k)| (*g, Arc::new(k.barrier_key()))).collect();
        let write = if self.write_next { keys.last() } else { keys.first() }.expect("the current root").clone();
        Barrier::with_generations(backend.clone(), write, keys)
    }
}

/// The [`RootRing::shape`] the store metadata calls for.
fn shape(meta: &StoreMeta) -> (u32, Option<u32>, bool) {
    let r = meta.rotation.as_ref();
    (meta.root_generation, r.map(|r| r.generation), r.is_some_and(|r| r.switched_at.is_some()))
}

fn open_next(current: &RootKey, r: &RootRotation) -> Result<RootKey, KmsError> {
    let next = current
        .open_next_root(&r.sealed_next, r.generation)
        .map_err(|_| KmsError::Integrity("meta/store (the next root key of the rotation)".into()))?;
    let check = custody_crypto::RootKeyCheck::from_bytes(&r.next_check)
        .ok_or_else(|| KmsError::Integrity("meta/store".into()))?;
    if !check.matches(&next) {
        return Err(KmsError::Integrity("meta/store (the next root key does not match its check value)".into()));
    }
    Ok(next)
}

impl Unsealed {
    /// Everything an unsealed node holds, for `roots`. The audit HMAC key is the stored one if a
    /// rotation stored it, else derived from the current root; `audit_hmac` reuses a loaded one.
    pub(crate) fn new(
        backend: &Arc<dyn Backend>,
        roots: RootRing,
        audit_hmac: Option<Arc<AuditHmacKey>>,
    ) -> Result<Self, KmsError> {
        let barrier = roots.barrier(backend);
        let audit_hmac = match audit_hmac {
            Some(k) => k,
            None => Arc::new(match barrier.get::<StoredSecret>(Table::Pki, AUDIT_HMAC_ROW)? {
                Some(row) => AuditHmacKey::from_secret(&row.value.decode()?),
                None => roots.current().audit_hmac_key(),
            }),
        };
        Ok(Self { roots, barrier, audit_hmac })
    }
}

/// A secret kept in a sealed row (base64 inside the sealed JSON), wiped from memory when dropped.
#[derive(Serialize, Deserialize)]
struct StoredSecret {
    key: zeroize::Zeroizing<String>,
}

impl StoredSecret {
    fn decode(&self) -> Result<SecretBytes, KmsError> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(self.key.as_bytes())
            .map(SecretBytes::new)
            .map_err(|_| KmsError::Integrity(format!("pki/{AUDIT_HMAC_ROW}")))
    }
}

/// What `custody root rotate` returns: the only time the new shares exist.
#[derive(Debug)]
pub struct RootRotationStarted {
    /// The new root key's generation.
    pub generation: u32,
    /// Shares needed to unseal with the new root (recovery shares for a PKCS#11 store).
    pub threshold: usize,
    /// The new shares. They unseal the store once the rotation has finished; until then the
    /// old shares (or the token) do.
    pub shares: Vec<UnsealShare>,
}

/// The root key's generation and any rotation under way (`custody root status`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RootStatus {
    /// Generation of the current root key.
    pub generation: u32,
    /// Whether a rotation is under way.
    pub rotating: bool,
    /// The next root's generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_generation: Option<u32>,
    /// `preparing` (every node loads the next root), `switching` (every node writes under it),
    /// `re-sealing` (the first pass), `verifying` (passes until one finds nothing left).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<&'static str>,
    /// The table being visited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<&'static str>,
    /// Tables fully visited in this pass, of [`RootStatus::tables`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tables_done: Option<usize>,
    /// Tables a pass visits.
    pub tables: usize,
    /// Rows re-sealed so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resealed: Option<u64>,
    /// When the rotation started (ms since the epoch) and by whom.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Millis>,
    /// Who started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
}

fn status_of(meta: &StoreMeta) -> RootStatus {
    let r = meta.rotation.as_ref();
    RootStatus {
        generation: meta.root_generation,
        rotating: r.is_some(),
        next_generation: r.map(|r| r.generation),
        phase: r.map(|r| match (r.switched_at, r.pass) {
            (None, _) => "preparing",
            (Some(at), _) if now_ms() < at + GRACE_MS => "switching",
            (_, 0) => "re-sealing",
            _ => "verifying",
        }),
        table: r.and_then(|r| sealed_tables().get(r.table)).map(|t| t.name()),
        tables_done: r.map(|r| r.table.min(sealed_tables().len())),
        tables: sealed_tables().len(),
        resealed: r.map(|r| r.resealed),
        started_at: r.map(|r| r.started_at),
        started_by: r.map(|r| r.started_by.clone()),
    }
}

fn meta_write(meta: &StoreMeta, rev: u64) -> Write {
    Write::Put {
        table: Table::Meta,
        key: crate::seal::STORE_META.into(),
        value: serde_json::to_vec(meta).expect("meta serializes"),
        expect: Expect::Rev(rev),
    }
}

/// Wraps a new root key with the PKCS#11 token (the server installs one; see
/// [`Kms::set_root_wrapper`]).
pub type RootWrapper = Box<dyn Fn(&crate::Pkcs11Seal, &RootKey) -> Result<Vec<u8>, String> + Send + Sync>;

/// Holds the [`RootWrapper`], once installed.
#[derive(Default)]
pub(crate) struct WrapperSlot(std::sync::OnceLock<RootWrapper>);

impl fmt::Debug for WrapperSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrapperSlot").field("installed", &self.0.get().is_some()).finish()
    }
}

impl Kms {
    /// Installs how a new root key is wrapped by the PKCS#11 token, for root rotations of a
    /// PKCS#11-sealed store (the server does this from its `pkcs11` settings).
    pub fn set_root_wrapper(&self, wrapper: RootWrapper) {
        let _ = self.root_wrapper.0.set(wrapper);
    }

    /// RotateRoot (security officer): starts a root rotation. Returns the new shares; the
    /// server's background task does the rest ([`Kms::continue_root_rotation`]).
    pub fn rotate_root(&self, caller: &Caller) -> Result<RootRotationStarted, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::RotateRoot>(caller)?;
        let (mut meta, rev) = read_meta(&self.backend)?;
        if let Some(r) = &meta.rotation {
            return Err(KmsError::AlreadyExists(format!(
                "A root rotation to generation {} is already under way: custody root status",
                r.generation
            )));
        }
        if u.roots.current_generation() != meta.root_generation {
            return Err(KmsError::Conflict);
        }
        let next = RootKey::generate();
        let generation = meta.root_generation + 1;
        let (shares, threshold, next_seal) = match &meta.seal {
            SealMeta::Shamir { threshold, shares, .. } => {
                let (split, fingerprints) = split_root(&next, *threshold, *shares)?;
                (split, *threshold, SealMeta::Shamir { threshold: *threshold, shares: *shares, fingerprints })
            }
            SealMeta::Pkcs11 { seal, threshold, shares, .. } => {
                let wrap = self.root_wrapper.0.get().ok_or_else(|| {
                    KmsError::validation(
                        "seal",
                        "this server cannot reach the PKCS#11 token (set pkcs11.pin_file) to wrap the new root key",
                    )
                })?;
                let wrapped_root = wrap(seal, &next)
                    .map_err(|e| KmsError::Internal(format!("the PKCS#11 token did not wrap: {e}")))?;
                let (split, fingerprints) = split_root(&next, *threshold, *shares)?;
                let seal = crate::Pkcs11Seal { wrapped_root, ..seal.clone() };
                (split, *threshold, SealMeta::Pkcs11 { seal, threshold: *threshold, shares: *shares, fingerprints })
            }
            SealMeta::Keyfile { .. } => {
                return Err(KmsError::validation(
                    "seal",
                    "a key-file store (development) has no root rotation: its root key sits in a file; \
                     use a Shamir or PKCS#11 store in production",
                ))
            }
        };
        meta.rotation = Some(RootRotation {
            generation,
            sealed_next: u.roots.current().seal_next_root(&next, generation),
            next_check: next.check_value().as_bytes().to_vec(),
            next_seal,
            started_at: now_ms(),
            started_by: caller.arn(),
            switched_at: None,
            pass: 0,
            table: 0,
            after: None,
            resealed: 0,
            resealed_in_pass: 0,
        });
        let mut writes = vec![meta_write(&meta, rev)];
        if u.barrier.get::<StoredSecret>(Table::Pki, AUDIT_HMAC_ROW)?.is_none() {
            use base64::Engine;
            let secret = u.roots.current().audit_hmac_secret();
            let record = StoredSecret {
                key: zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(secret.expose_secret())),
            };
            writes.push(u.barrier.put(Table::Pki, AUDIT_HMAC_ROW, &record, Expect::Absent));
        }
        self.commit(&u, caller.into(), None, writes)?;
        tracing::warn!(generation, "root rotation started: new rows are sealed under the next root key");
        self.follow_meta(&u, &meta)?;
        Ok(RootRotationStarted { generation, threshold, shares })
    }

    /// The root key's generation and the rotation under way, if any (security officer, auditor).
    pub fn root_status(&self, caller: &Caller) -> Result<RootStatus, KmsError> {
        let _proof = authorize::<act::DescribeRoot>(caller)?;
        Ok(status_of(&read_meta(&self.backend)?.0))
    }

    /// Makes this node hold the root keys the store metadata names (a rotation another node
    /// started or finished). A node that cannot (it missed a whole rotation) seals itself.
    pub fn follow_root(&self) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        self.follow_meta(&u, &read_meta(&self.backend)?.0)
    }

    fn follow_meta(&self, u: &Arc<Unsealed>, meta: &StoreMeta) -> Result<(), KmsError> {
        let want = shape(meta);
        if want == u.roots.shape() {
            return Ok(());
        }
        let Some(current) = u.roots.get(meta.root_generation).map(copy_root) else {
            let mut state = self.seal.write().unwrap_or_else(|p| p.into_inner());
            *state = SealState::Sealed { submitted: Vec::new() };
            tracing::error!(
                generation = meta.root_generation,
                "the root key was rotated while this node could not follow: sealed; unseal it with the new shares"
            );
            return Err(KmsError::Sealed);
        };
        meta.check_root(&current)?;
        let ring = RootRing::for_meta(meta, current, Some(&u.roots))?;
        let fresh = Arc::new(Unsealed::new(&self.backend, ring, Some(u.audit_hmac.clone()))?);
        let mut state = self.seal.write().unwrap_or_else(|p| p.into_inner());
        // Only over the state this was computed from (another thread may have moved on).
        if let SealState::Unsealed(now) = &*state {
            if Arc::ptr_eq(now, u) {
                tracing::info!(current = want.0, next = ?want.1, writes_next = want.2, "root keys updated from the store");
                *state = SealState::Unsealed(fresh);
            }
        }
        Ok(())
    }

    /// Advances a root rotation by batches of rows until `budget` is spent (at least one batch
    /// once the grace periods are over), and follows a rotation another node started or finished. Returns the status while one is under way. The server
    /// calls it several times a second; any node may, concurrently.
    pub fn continue_root_rotation(&self, budget: Duration) -> Result<Option<RootStatus>, KmsError> {
        let started = Instant::now();
        loop {
            let u = self.unsealed()?;
            let (mut meta, rev) = read_meta(&self.backend)?;
            self.follow_meta(&u, &meta)?;
            let u = self.unsealed()?;
            let Some(r) = meta.rotation.as_mut() else { return Ok(None) };
            let now = now_ms();
            match r.switched_at {
                None if now < r.started_at + GRACE_MS => return Ok(Some(status_of(&meta))),
                None => {
                    // Every node can read under the next root: now they write under it.
                    r.switched_at = Some(now);
                    match self.backend.apply(&[meta_write(&meta, rev)]) {
                        Ok(()) | Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(at) if now < at + GRACE_MS => return Ok(Some(status_of(&meta))),
                Some(_) => {}
            }
            if u.barrier.write_generation() != r.generation {
                return Err(KmsError::Internal("this node does not seal under the next root key yet".into()));
            }
            let generation = r.generation;
            let writes = match sealed_tables().get(r.table) {
                Some(&table) => {
                    let rows = self.backend.scan(table, "", r.after.as_deref(), BATCH)?;
                    let mut writes = Vec::new();
                    for row in &rows {
                        if let Some(w) = self.reseal(&u, table, row, generation)? {
                            writes.push(w);
                        }
                    }
                    r.resealed += writes.len() as u64;
                    r.resealed_in_pass += writes.len() as u64;
                    match rows.last() {
                        Some(last) if rows.len() == BATCH => r.after = Some(last.key.clone()),
                        _ => (r.table, r.after) = (r.table + 1, None),
                    }
                    writes.push(meta_write(&meta, rev));
                    writes
                }
                None if r.resealed_in_pass > 0 => {
                    // Another pass: rows written under the old root by a request that was
                    // already running when the rotation started are found there.
                    (r.pass, r.table, r.after, r.resealed_in_pass) = (r.pass + 1, 0, None, 0);
                    vec![meta_write(&meta, rev)]
                }
                None => return self.finish_root_rotation(&u, meta, rev).map(|()| None),
            };
            match self.backend.apply(&writes) {
                Ok(()) => {}
                // A request changed a row of the batch (or another node moved on): again.
                Err(StoreError::Conflict { .. }) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.into()),
            }
            if started.elapsed() >= budget {
                return Ok(Some(status_of(&read_meta(&self.backend)?.0)));
            }
        }
    }

    /// One row under the next root: `None` if it already is.
    fn reseal(&self, u: &Unsealed, table: Table, row: &Row, generation: u32) -> Result<Option<Write>, KmsError> {
        if table == Table::Versions {
            // Opened whatever its seal: a version row written under the new root by an update
            // (usage counts) may still hold material wrapped under the old one.
            let mut v = u.barrier.open_row::<VersionRecord>(table, row.clone())?.value;
            if v.root_generation == generation && generation_of(&row.value) == generation {
                return Ok(None);
            }
            if v.root_generation != generation {
                let key_id = row.key.split('/').next().unwrap_or_default();
                let key = u
                    .barrier
                    .get::<KeyRecord>(Table::Keys, key_id)?
                    .ok_or_else(|| KmsError::Integrity(format!("versions/{} (no key row)", row.key)))?
                    .value;
                let aad = WrapAad { tenant: key.tenant.as_str(), key_id, version: v.version };
                let material = u.roots.unwrap_version(&v, &aad).map_err(|_| {
                    KmsError::Integrity(format!("versions/{} (does not unwrap under its root key)", row.key))
                })?;
                let (g, root) = u.roots.write();
                (v.wrapped, v.root_generation) = (root.wrap_key_material(&material, &aad), g);
            }
            return Ok(Some(u.barrier.put(table, &row.key, &v, Expect::Rev(row.rev))));
        }
        if generation_of(&row.value) == generation {
            return Ok(None);
        }
        let plain = u.barrier.open_plain(table, row)?;
        Ok(Some(u.barrier.put_plain(table, &row.key, plain.expose_secret(), Expect::Rev(row.rev))))
    }

    fn finish_root_rotation(&self, u: &Arc<Unsealed>, mut meta: StoreMeta, rev: u64) -> Result<(), KmsError> {
        let r = meta.rotation.take().expect("a rotation");
        (meta.root_generation, meta.root_check, meta.seal) = (r.generation, r.next_check, r.next_seal);
        let actor = Actor::Scheduler { action: "Custody.RootRotationFinished" };
        match self.commit(u, actor, None, vec![meta_write(&meta, rev)]) {
            Ok(()) => {}
            Err(KmsError::Conflict) => return Ok(()),
            Err(e) => return Err(e),
        }
        tracing::warn!(
            generation = r.generation,
            resealed = r.resealed,
            "root rotation finished: the previous root key is destroyed; only the new shares (or the token) unseal this store"
        );
        self.follow_meta(u, &meta)
    }
}
