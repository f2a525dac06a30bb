//! Initialization, seal and unseal, and authentication of certificate identities.

use std::sync::{Arc, RwLock};

use custody_crypto::pki::{self, IssuedCert};
use custody_crypto::shamir::{self, UnsealShare};
use custody_crypto::{RootKey, RootKeyCheck};
use custody_store::{Backend, Barrier, Expect, Table, Write};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::authz::Caller;
use crate::certs::CertKind;
use crate::error::KmsError;
use crate::ids::{PrincipalName, TenantId};
use crate::model::{now_ms, CaRecord, PrincipalRecord, Role, TenantRecord};
use crate::{Kms, KmsConfig, Unsealed};

/// Row key of the store metadata in [`Table::Meta`].
pub(crate) const STORE_META: &str = "store";
/// Lifetime of the internal CA.
pub(crate) const CA_LIFETIME: Duration = Duration::days(3650);
/// Lifetime of the first administrator's client certificate: the longest a client certificate
/// may have, because it is the credential that issues all the others (`custody pki renew` or
/// `custody agent` keep it fresh; `custody pki status` warns before it expires).
const ADMIN_CERT_LIFETIME: Duration = Duration::days(90);
/// Lifetime of the server certificates init and restores issue: [`crate::SERVER_CERT_LIFETIME`].
fn server_lifetime() -> Duration {
    Duration::try_from(crate::SERVER_CERT_LIFETIME).expect("30 days fits")
}
/// URI SAN scheme of principal certificates: `spiffe://custody/<tenant>/<principal>`.
pub const IDENTITY_PREFIX: &str = "spiffe://custody/";

/// How the root key is protected.
#[derive(Debug)]
pub enum InitSeal {
    /// Split into `shares` Shamir shares, `threshold` of which unseal.
    Shamir {
        /// shares needed
        threshold: usize,
        /// shares made
        shares: usize,
    },
    /// The caller keeps the root key in a file (development only); `path` is remembered so the
    /// server finds it without being told.
    KeyFile {
        /// the root key
        root: RootKey,
        /// where the caller keeps it
        path: Option<String>,
    },
    /// The root key wrapped by a key inside a PKCS#11 token (the caller wrapped it, see
    /// `custody-hsm`), plus Shamir recovery shares of it in case the token is lost.
    Pkcs11 {
        /// the root key (the caller generated it and wrapped it with the token's key)
        root: RootKey,
        /// how the token and key are found; the wrapped root
        seal: Pkcs11Seal,
        /// recovery shares needed
        threshold: usize,
        /// recovery shares made
        shares: usize,
    },
}

/// Where a PKCS#11-sealed store's root key is: the token, the wrapping key, and the root key as
/// that key encrypted it (with [`PKCS11_WRAP_AAD`]). Nothing here is secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Seal {
    /// Path of the PKCS#11 module recorded at init (the server's setting may override it).
    pub module: String,
    /// Token label.
    pub token_label: String,
    /// Label of the AES wrapping key.
    pub key_label: String,
    /// The root key as the token's key encrypted it.
    #[serde(with = "hex_bytes")]
    pub wrapped_root: Vec<u8>,
}

/// Additional data authenticated with the root key when the token wraps it.
pub const PKCS11_WRAP_AAD: &[u8] = b"custody/v1/pkcs11-root-key";

/// A change of how a store is sealed (`custody seal migrate`); the root key stays the same, so
/// no key version is touched.
#[derive(Debug, Clone)]
pub enum SealTarget {
    /// Shamir shares: the PKCS#11 seal's recovery shares become the unseal shares.
    Shamir,
    /// A PKCS#11 token: the Shamir shares become its recovery shares.
    Pkcs11(Pkcs11Seal),
}

/// What `init` needs.
#[derive(Debug)]
pub struct InitOptions {
    /// Seal method.
    pub seal: InitSeal,
    /// The first tenant (random if not given).
    pub tenant: Option<TenantId>,
    /// The first administrator's name.
    pub admin: PrincipalName,
    /// The first administrator's roles ([`InitOptions::FIRST_ADMIN_ROLES`] in production).
    pub admin_roles: Vec<Role>,
    /// DNS names and IP addresses for the server certificate.
    pub server_names: Vec<String>,
}

impl InitOptions {
    /// The first administrator is a security officer and the tenant admin of the first tenant,
    /// not a key user (ACCESS.md).
    pub const FIRST_ADMIN_ROLES: [Role; 2] = [Role::SecurityOfficer, Role::TenantAdmin];
}

/// What `init` produced: everything the operator must keep. The shares exist nowhere else.
#[derive(Debug)]
pub struct InitOutput {
    /// Store id.
    pub store_id: String,
    /// First tenant.
    pub tenant: TenantId,
    /// First administrator.
    pub admin: PrincipalName,
    /// Unseal shares (empty for a key-file seal).
    pub shares: Vec<UnsealShare>,
    /// The internal CA certificate (PEM), the trust anchor for clients and the server.
    pub ca_cert_pem: String,
    /// The server's certificate and key.
    pub server_cert: IssuedCert,
    /// The administrator's client certificate and key.
    pub admin_cert: IssuedCert,
}

/// Seal status, as `custody status` and the unseal endpoint report it.
#[derive(Debug, Clone, Serialize)]
pub struct SealStatus {
    /// Whether custody is sealed.
    pub sealed: bool,
    /// `shamir` or `keyfile`.
    pub seal_type: &'static str,
    /// Shares needed (Shamir).
    pub threshold: usize,
    /// Shares issued (Shamir).
    pub shares: usize,
    /// Distinct valid shares submitted so far.
    pub progress: usize,
    /// Store id.
    pub store_id: String,
    /// Generation of the root key the seal unseals (1 until the first root rotation).
    pub root_generation: u32,
    /// Whether a root rotation is under way.
    pub root_rotating: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoreMeta {
    pub(crate) store_id: String,
    created_at: i64,
    pub(crate) seal: SealMeta,
    /// Check value of the current root key (the one `seal` unseals).
    #[serde(with = "hex_bytes")]
    pub(crate) root_check: Vec<u8>,
    /// Generation of the current root key: 1 at init, one more after each root rotation.
    #[serde(default = "crate::root::first_generation")]
    pub(crate) root_generation: u32,
    /// A root rotation under way (`custody root rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) rotation: Option<crate::root::RootRotation>,
}

impl StoreMeta {
    /// Whether `root` is this store's root key (by its check value).
    pub(crate) fn check_root(&self, root: &RootKey) -> Result<(), KmsError> {
        let check =
            RootKeyCheck::from_bytes(&self.root_check).ok_or_else(|| KmsError::Integrity("meta/store".into()))?;
        if !check.matches(root) {
            return Err(KmsError::InvalidShare("the key does not unseal this store".into()));
        }
        Ok(())
    }
}

/// `root` split into `shares` Shamir shares, `threshold` of which recombine it, and the
/// fingerprints the store keeps to recognize them.
pub(crate) fn split_root(
    root: &RootKey,
    threshold: usize,
    shares: usize,
) -> Result<(Vec<UnsealShare>, Vec<String>), KmsError> {
    let split = shamir::split(root, threshold, shares).map_err(|e| KmsError::validation("shares", e.to_string()))?;
    let fingerprints = split.iter().map(|s| hex::encode(s.fingerprint())).collect();
    Ok((split, fingerprints))
}

/// The store metadata and its revision.
pub(crate) fn read_meta(backend: &Arc<dyn Backend>) -> Result<(StoreMeta, u64), KmsError> {
    let row = backend.get(Table::Meta, STORE_META)?.ok_or(KmsError::NotInitialized)?;
    let meta = serde_json::from_slice(&row.value)
        .map_err(|e| KmsError::Internal(format!("store metadata unreadable: {e}")))?;
    Ok((meta, row.rev))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum SealMeta {
    Shamir {
        threshold: usize,
        shares: usize,
        fingerprints: Vec<String>,
    },
    Keyfile {
        #[serde(default)]
        path: Option<String>,
    },
    Pkcs11 {
        #[serde(flatten)]
        seal: Pkcs11Seal,
        /// Recovery shares.
        threshold: usize,
        shares: usize,
        fingerprints: Vec<String>,
    },
}

#[derive(Debug)]
pub(crate) enum SealState {
    Sealed { submitted: Vec<UnsealShare> },
    Unsealed(Arc<Unsealed>),
}

impl Kms {
    /// Initializes an empty store: root key, first tenant and administrator, internal CA and
    /// server certificate, all in one atomic batch.
    pub fn init(backend: &Arc<dyn Backend>, opts: InitOptions) -> Result<InitOutput, KmsError> {
        if backend.get(Table::Meta, STORE_META)?.is_some() {
            return Err(KmsError::AlreadyExists("this data directory is already initialized".into()));
        }
        let (root, shares, seal) = match opts.seal {
            InitSeal::Shamir { threshold, shares } => {
                let root = RootKey::generate();
                let (split, fingerprints) = split_root(&root, threshold, shares)?;
                (root, split, SealMeta::Shamir { threshold, shares, fingerprints })
            }
            InitSeal::KeyFile { root, path } => (root, Vec::new(), SealMeta::Keyfile { path }),
            InitSeal::Pkcs11 { root, seal, threshold, shares } => {
                let (split, fingerprints) = split_root(&root, threshold, shares)?;
                (root, split, SealMeta::Pkcs11 { seal, threshold, shares, fingerprints })
            }
        };
        let now = now_ms();
        let now_dt = OffsetDateTime::now_utc();
        let store_id = uuid::Uuid::from_bytes(custody_crypto::random::array()).simple().to_string();
        let tenant = opts.tenant.unwrap_or_else(TenantId::random);
        let pki_err = |e: pki::PkiError| KmsError::Internal(e.to_string());
        let ca = pki::new_ca(&format!("custody CA {}", &store_id[..8]), now_dt, CA_LIFETIME).map_err(pki_err)?;
        let server_cert = pki::issue_server(&ca, &opts.server_names, now_dt, server_lifetime()).map_err(pki_err)?;
        let admin_cert = pki::issue_client(
            &ca,
            &identity_uri(&tenant, &opts.admin),
            opts.admin.as_str(),
            now_dt,
            ADMIN_CERT_LIFETIME,
        )
        .map_err(pki_err)?;

        let meta = StoreMeta {
            store_id: store_id.clone(),
            created_at: now,
            seal,
            root_check: root.check_value().as_bytes().to_vec(),
            root_generation: 1,
            rotation: None,
        };
        let barrier = Barrier::new(backend.clone(), root.barrier_key());
        let ca_record = CaRecord {
            cert_pem: ca.cert_pem.clone(),
            key_pem: zeroize::Zeroizing::new(
                String::from_utf8(ca.key_pem.expose_secret().to_vec())
                    .map_err(|_| KmsError::Internal("CA key is not UTF-8".into()))?,
            ),
            serial: ca.serial.clone(),
            not_after: ca.not_after.unix_timestamp() * 1000,
        };
        let writes = vec![
            Write::Put {
                table: Table::Meta,
                key: STORE_META.into(),
                value: serde_json::to_vec(&meta).expect("meta serializes"),
                expect: Expect::Absent,
            },
            barrier.put(
                Table::Tenants,
                tenant.as_str(),
                &TenantRecord { id: tenant.clone(), name: "default".into(), created_at: now },
                Expect::Absent,
            ),
            barrier.put(
                Table::Principals,
                &format!("{tenant}/{}", opts.admin),
                &PrincipalRecord {
                    tenant: tenant.clone(),
                    name: opts.admin.clone(),
                    roles: opts.admin_roles.clone(),
                    enabled: true,
                    created_at: now,
                },
                Expect::Absent,
            ),
            barrier.put(Table::Pki, "ca", &ca_record, Expect::Absent),
            crate::certs::record_issued(
                &barrier,
                &ca,
                &server_cert,
                CertKind::Server,
                opts.server_names.join(","),
                None,
                None,
            ),
            crate::certs::record_issued(
                &barrier,
                &ca,
                &admin_cert,
                CertKind::Client,
                identity_uri(&tenant, &opts.admin),
                Some(tenant.clone()),
                None,
            ),
        ];
        barrier.apply(&writes).map_err(|e| match e {
            custody_store::StoreError::Conflict { .. } => {
                KmsError::AlreadyExists("this data directory is already initialized".into())
            }
            other => other.into(),
        })?;
        Ok(InitOutput {
            store_id,
            tenant,
            admin: opts.admin,
            shares,
            ca_cert_pem: ca.cert_pem,
            server_cert,
            admin_cert,
        })
    }

    /// Opens an initialized store, sealed.
    pub fn open(backend: Arc<dyn Backend>, config: KmsConfig) -> Result<Self, KmsError> {
        let kms = Self {
            backend,
            config,
            seal: RwLock::new(SealState::Sealed { submitted: Vec::new() }),
            audit_seq: Default::default(),
            policies: Default::default(),
            policy_cache: Default::default(),
            revoked: Default::default(),
            usage: Default::default(),
            root_wrapper: Default::default(),
        };
        kms.meta()?;
        Ok(kms)
    }

    /// The store's id.
    pub fn store_id(&self) -> Result<String, KmsError> {
        Ok(self.meta()?.store_id)
    }

    /// New server and administrator certificates from the store's CA, for a tool that holds
    /// the root key (`custody backup restore` writes them into the new data directory). The
    /// administrator must exist in the store.
    pub fn bootstrap_certificates(
        &self,
        server_names: &[String],
        tenant: &TenantId,
        admin: &PrincipalName,
    ) -> Result<(String, pki::IssuedCert, crate::IssuedClientCert), KmsError> {
        let u = self.unsealed()?;
        let issuer = self.ca_issuer(&u)?;
        let server = pki::issue_server(&issuer, server_names, OffsetDateTime::now_utc(), server_lifetime())
            .map_err(|e| KmsError::Internal(e.to_string()))?;
        let principal = u
            .barrier
            .get::<PrincipalRecord>(Table::Principals, &format!("{tenant}/{admin}"))?
            .ok_or_else(|| KmsError::NotFound(format!("Principal {admin} is not found in tenant {tenant}.")))?
            .value;
        let (client, client_write) = self.issue_for(
            &u,
            &principal,
            std::time::Duration::from_secs(ADMIN_CERT_LIFETIME.whole_seconds() as u64),
            None,
        )?;
        let server_write = crate::certs::record_issued(
            &u.barrier,
            &issuer,
            &server,
            CertKind::Server,
            server_names.join(","),
            None,
            None,
        );
        // A restore's bootstrap, not a request: its new trail starts after this.
        u.barrier.apply(&[server_write, client_write])?;
        Ok((issuer.cert_pem, server, client))
    }

    fn meta(&self) -> Result<StoreMeta, KmsError> {
        Ok(read_meta(&self.backend)?.0)
    }

    /// How this store is sealed: `None` for Shamir shares, `Some(path)` for a key file (the path
    /// recorded at init, if any).
    pub fn key_file_seal(&self) -> Result<Option<Option<String>>, KmsError> {
        Ok(match self.meta()?.seal {
            SealMeta::Shamir { .. } | SealMeta::Pkcs11 { .. } => None,
            SealMeta::Keyfile { path } => Some(path),
        })
    }

    /// The token and wrapped root key of a PKCS#11-sealed store (`None` for other seals).
    pub fn pkcs11_seal(&self) -> Result<Option<Pkcs11Seal>, KmsError> {
        Ok(match self.meta()?.seal {
            SealMeta::Pkcs11 { seal, .. } => Some(seal),
            _ => None,
        })
    }

    /// Reseals a store another way (`custody seal migrate`), given its root key. Offline: the
    /// caller holds the store (no server runs on it). Nothing but the seal metadata changes.
    pub fn migrate_seal(backend: &Arc<dyn Backend>, root: &RootKey, to: SealTarget) -> Result<(), KmsError> {
        let (mut meta, rev) = read_meta(backend)?;
        meta.check_root(root)?;
        if let Some(r) = &meta.rotation {
            return Err(KmsError::validation(
                "to",
                format!(
                    "a root rotation to generation {} is under way: start the server, let it finish \
                     (custody root status), then migrate with the new shares",
                    r.generation
                ),
            ));
        }
        meta.seal = match (meta.seal, to) {
            (SealMeta::Shamir { threshold, shares, fingerprints }, SealTarget::Pkcs11(seal)) => {
                SealMeta::Pkcs11 { seal, threshold, shares, fingerprints }
            }
            (SealMeta::Pkcs11 { threshold, shares, fingerprints, .. }, SealTarget::Shamir) => {
                SealMeta::Shamir { threshold, shares, fingerprints }
            }
            // A new token (or key) for a PKCS#11 store: same recovery shares.
            (SealMeta::Pkcs11 { threshold, shares, fingerprints, .. }, SealTarget::Pkcs11(seal)) => {
                SealMeta::Pkcs11 { seal, threshold, shares, fingerprints }
            }
            (SealMeta::Shamir { .. }, SealTarget::Shamir) => {
                return Err(KmsError::validation("to", "this store is already sealed with Shamir shares"))
            }
            (SealMeta::Keyfile { .. }, _) => {
                return Err(KmsError::validation(
                    "to",
                    "a key-file store (development) cannot be migrated; restore a backup into a new store instead",
                ))
            }
        };
        backend.apply(&[Write::Put {
            table: Table::Meta,
            key: STORE_META.into(),
            value: serde_json::to_vec(&meta).expect("meta serializes"),
            expect: Expect::Rev(rev),
        }])?;
        Ok(())
    }

    /// The root key from `threshold` shares of this store (for offline tools: `seal migrate`).
    pub fn root_from_shares(backend: &Arc<dyn Backend>, texts: &[String]) -> Result<RootKey, KmsError> {
        let (meta, _) = read_meta(backend)?;
        let (SealMeta::Shamir { fingerprints, .. } | SealMeta::Pkcs11 { fingerprints, .. }) = &meta.seal else {
            return Err(KmsError::InvalidShare("this store has no shares (key-file seal)".into()));
        };
        let mut shares = Vec::new();
        for t in texts {
            let share = UnsealShare::parse(t).map_err(|e| KmsError::InvalidShare(e.to_string()))?;
            if !fingerprints.contains(&hex::encode(share.fingerprint())) {
                return Err(KmsError::InvalidShare("a share was not issued for this store".into()));
            }
            shares.push(share);
        }
        let root = shamir::combine(&shares).map_err(|e| KmsError::InvalidShare(e.to_string()))?;
        meta.check_root(&root).map_err(|e| match e {
            KmsError::InvalidShare(_) => {
                KmsError::InvalidShare("the shares do not unseal this store (too few?)".into())
            }
            other => other,
        })?;
        Ok(root)
    }

    /// Seal status.
    pub fn status(&self) -> Result<SealStatus, KmsError> {
        let meta = self.meta()?;
        let (sealed, progress) = match &*self.seal.read().unwrap_or_else(|p| p.into_inner()) {
            SealState::Sealed { submitted } => (true, submitted.len()),
            SealState::Unsealed(_) => (false, 0),
        };
        let (seal_type, threshold, shares) = match meta.seal {
            SealMeta::Shamir { threshold, shares, .. } => ("shamir", threshold, shares),
            SealMeta::Keyfile { .. } => ("keyfile", 0, 0),
            SealMeta::Pkcs11 { threshold, shares, .. } => ("pkcs11", threshold, shares),
        };
        Ok(SealStatus {
            sealed,
            seal_type,
            threshold,
            shares,
            progress,
            store_id: meta.store_id,
            root_generation: meta.root_generation,
            root_rotating: meta.rotation.is_some(),
        })
    }

    /// Submits one unseal share. Once `threshold` distinct valid shares are in, custody unseals.
    ///
    /// A share this store did not issue is refused at once and changes nothing; submitting the
    /// same share twice counts once.
    pub fn submit_share(&self, text: &str) -> Result<SealStatus, KmsError> {
        let meta = self.meta()?;
        // A PKCS#11 store's recovery shares unseal it the same way when the token is lost.
        let (SealMeta::Shamir { threshold, fingerprints, .. } | SealMeta::Pkcs11 { threshold, fingerprints, .. }) =
            &meta.seal
        else {
            return Err(KmsError::InvalidShare("this store is sealed with a key file, not shares".into()));
        };
        let share = UnsealShare::parse(text).map_err(|e| KmsError::InvalidShare(e.to_string()))?;
        let fp = hex::encode(share.fingerprint());
        // Not secret-dependent timing worth hiding: fingerprints are public values.
        if !fingerprints.contains(&fp) {
            return Err(KmsError::InvalidShare("this share was not issued for this store (check for typos)".into()));
        }
        {
            let mut state = self.seal.write().unwrap_or_else(|p| p.into_inner());
            let SealState::Sealed { submitted } = &mut *state else {
                drop(state);
                return self.status();
            };
            if !submitted.iter().any(|s| s.index() == share.index()) {
                submitted.push(share);
            }
            if submitted.len() >= *threshold {
                let shares = std::mem::take(submitted);
                let root = shamir::combine(&shares).map_err(|e| KmsError::InvalidShare(e.to_string()))?;
                let unsealed = self.unsealed_with(&meta, root)?;
                *state = SealState::Unsealed(Arc::new(unsealed));
                tracing::info!("unsealed with {} shares", shares.len());
            }
        }
        self.status()
    }

    /// Unseals with the root key itself (key-file seal).
    pub fn unseal_with_root(&self, root: RootKey) -> Result<(), KmsError> {
        let meta = self.meta()?;
        let unsealed = self.unsealed_with(&meta, root)?;
        *self.seal.write().unwrap_or_else(|p| p.into_inner()) = SealState::Unsealed(Arc::new(unsealed));
        tracing::info!("unsealed with the root key");
        Ok(())
    }

    fn unsealed_with(&self, meta: &StoreMeta, root: RootKey) -> Result<Unsealed, KmsError> {
        meta.check_root(&root)?;
        let ring = crate::root::RootRing::for_meta(meta, root, None)?;
        Unsealed::new(&self.backend, ring, None)
    }

    /// Maps a verified client-certificate identity (`spiffe://custody/<tenant>/<principal>`) to a
    /// caller. Unknown, malformed and disabled identities all fail the same way.
    pub fn authenticate_certificate(&self, uri: &str) -> Result<Caller, KmsError> {
        let u = self.unsealed()?;
        let denied = || KmsError::Unauthenticated("The security token included in the request is invalid.".into());
        let (tenant, name) = parse_identity(uri).ok_or_else(denied)?;
        let record = u
            .barrier
            .get_decoded::<PrincipalRecord>(Table::Principals, &format!("{tenant}/{name}"))?
            .ok_or_else(denied)?
            .value;
        if !record.enabled || record.tenant != tenant {
            return Err(denied());
        }
        Ok(Caller { tenant, name, roles: record.roles, audit: None, source_ip: None })
    }
}

/// `spiffe://custody/<tenant>/<principal>`
pub fn identity_uri(tenant: &TenantId, name: &PrincipalName) -> String {
    format!("{IDENTITY_PREFIX}{tenant}/{name}")
}

fn parse_identity(uri: &str) -> Option<(TenantId, PrincipalName)> {
    let (tenant, name) = uri.strip_prefix(IDENTITY_PREFIX)?.split_once('/')?;
    Some((TenantId::parse(tenant)?, PrincipalName::parse(name)?))
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
