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
