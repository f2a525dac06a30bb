//! Shared setup for the service's tests and benchmarks: an initialized store on disk.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use custody_crypto::RootKey;
use custody_kms::{Caller, InitOptions, InitOutput, InitSeal, Kms, KmsConfig, PrincipalName};
use custody_store::{Backend, SqliteBackend};

/// An initialized store with a key-file seal whose root key the test knows.
pub struct Store {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub backend: Arc<dyn Backend>,
    pub root: [u8; 32],
    pub identity: String,
}

/// Init options for the first administrator `admin`.
pub fn options(seal: InitSeal) -> InitOptions {
    InitOptions {
        seal,
        tenant: None,
        admin: PrincipalName::parse("admin").unwrap(),
        admin_roles: custody_kms::Role::ALL.to_vec(),
        server_names: vec!["localhost".into()],
    }
}

/// A fresh store in a temporary directory, initialized with `seal`.
pub fn init(seal: InitSeal) -> (tempfile::TempDir, Arc<dyn Backend>, InitOutput) {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&dir.path().join("custody.db")).unwrap());
    let out = Kms::init(&backend, options(seal)).unwrap();
    (dir, backend, out)
}

/// A fresh key-file store.
pub fn keyfile_store() -> Store {
    let root = RootKey::generate();
    let bytes = *root.expose_secret();
    let (dir, backend, out) = init(InitSeal::KeyFile { root, path: None });
    let path = dir.path().join("custody.db");
    Store { dir, path, backend, root: bytes, identity: format!("spiffe://custody/{}/admin", out.tenant) }
}

impl Store {
    /// The service over this store, unsealed, and its administrator.
    pub fn open(&self, config: KmsConfig) -> (Kms, Caller) {
        open_at(self.backend.clone(), &self.root, &self.identity, config)
    }
}

/// Opens, unseals and authenticates over any backend holding a store made by [`keyfile_store`].
pub fn open_at(backend: Arc<dyn Backend>, root: &[u8; 32], identity: &str, config: KmsConfig) -> (Kms, Caller) {
    let kms = Kms::open(backend, config).unwrap();
    kms.unseal_with_root(RootKey::from_bytes(root).unwrap()).unwrap();
    let caller = kms.authenticate_certificate(identity).unwrap();
    (kms, caller)
}

/// Audit event `i` of a varied stream: four actions, four outcomes, seven keys, every tenth an alert.
pub fn event(i: u64) -> custody_kms::AuditEvent {
    let outcomes = [
        custody_kms::Outcome::Success,
        custody_kms::Outcome::Failed,
        custody_kms::Outcome::Denied,
        custody_kms::Outcome::Unauthenticated,
    ];
    let actions =
        ["TrentService.Encrypt", "TrentService.Decrypt", "TrentService.GenerateDataKey", "TrentService.ListKeys"];
    custody_kms::AuditEvent {
        time: 1_700_000_000_000 + i as i64,
        request_id: format!("req-{i}"),
        source: "127.0.0.1:5000".into(),
        tls_identity: None,
        principal: Some("arn:aws:iam::111122223333:user/admin".into()),
        access_key_id: None,
        action: actions[(i % 4) as usize].into(),
        key_id: Some(format!("key-{}", i % 7)),
        key_version: None,
        encryption_context: None,
        source_key_id: None,
        source_key_version: None,
        source_encryption_context: None,
        outcome: outcomes[(i % 4) as usize],
        error_code: None,
        detail: None,
        duration_ms: i % 5,
        node: "node-a".into(),
        alert: i.is_multiple_of(10),
    }
}
