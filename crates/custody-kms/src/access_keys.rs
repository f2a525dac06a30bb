//! SigV4 access keys: an id and a secret, held by a principal.
//!
//! The secret is shown once, at creation, and stored only inside a sealed row (SigV4 needs the
//! secret itself to recompute signatures, so it cannot be stored as a hash).

use std::fmt;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use custody_crypto::{random, sigv4, SecretBytes};
use custody_store::{Expect, Table};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::ids::PrincipalName;
use crate::model::{now_ms, Millis, PrincipalRecord};
use crate::Kms;

/// Base32 alphabet of access key ids (as AWS uses: upper-case letters and 2–7).
const ID_ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

#[derive(Serialize, Deserialize)]
struct AccessKeyRecord {
    id: String,
    tenant: crate::TenantId,
    principal: PrincipalName,
    /// Only ever stored inside a sealed row; wiped from memory when the record is dropped.
    secret: Zeroizing<String>,
    active: bool,
    created_at: Millis,
}

/// Which credential scope a SigV4 signature claims: `date/region/service/aws4_request`.
#[derive(Debug, Clone, Copy)]
pub struct SigV4Scope<'a> {
    /// `YYYYMMDD`.
    pub date: &'a str,
    /// Region.
    pub region: &'a str,
    /// Service.
    pub service: &'a str,
}

/// An access key as SigV4 verification uses it, derived once per sealed row (the barrier's memo
/// drops it when the row changes: deactivated, deleted): its secret, and the signing key of the
/// scope it was last used with. A signing key is valid for one day, region and service, and
/// deriving it costs four HMACs, so AWS's own SDKs keep it for the day too.
struct AccessKeyVerifier {
    tenant: crate::TenantId,
    principal: PrincipalName,
    active: bool,
    secret: SecretBytes,
    signing: Mutex<Option<KeptSigningKey>>,
}

/// A signing key and the scope it was derived for.
struct KeptSigningKey {
    date: String,
    region: String,
    service: String,
    key: Arc<sigv4::SigningKey>,
}

impl KeptSigningKey {
    fn is_for(&self, scope: SigV4Scope<'_>) -> bool {
        self.date == scope.date && self.region == scope.region && self.service == scope.service
    }
}

impl AccessKeyVerifier {
    fn of(record: &AccessKeyRecord) -> Result<Self, KmsError> {
        Ok(Self {
            tenant: record.tenant.clone(),
            principal: record.principal.clone(),
            active: record.active,
            secret: SecretBytes::copy_from(record.secret.as_bytes()),
            signing: Mutex::new(None),
        })
    }

    /// The signing key of `scope`: the one kept if it is that scope's, else derived and kept.
    fn signing_key(&self, scope: SigV4Scope<'_>) -> Arc<sigv4::SigningKey> {
        let mut kept = self.signing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = kept.as_ref().filter(|k| k.is_for(scope)) {
            return k.key.clone();
        }
        let key = Arc::new(sigv4::signing_key(&self.secret, scope.date, scope.region, scope.service));
        *kept = Some(KeptSigningKey {
            date: scope.date.into(),
            region: scope.region.into(),
            service: scope.service.into(),
            key: key.clone(),
        });
        key
    }
}

/// A new access key: the only time the secret is available.
pub struct NewAccessKey {
    /// Access key id (not secret).
    pub id: String,
    /// Secret access key.
    pub secret: SecretBytes,
    /// Owning principal.
    pub principal: PrincipalName,
}

impl fmt::Debug for NewAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewAccessKey").field("id", &self.id).field("principal", &self.principal).finish_non_exhaustive()
    }
}

/// What listing shows of an access key.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AccessKeyInfo {
    /// Access key id.
    pub access_key_id: String,
    /// Owning principal.
    pub principal: String,
    /// `Active` or `Inactive`.
    pub status: &'static str,
    /// Seconds since epoch.
    pub create_date: f64,
}

/// Why a SigV4 credential was refused (all look the same to the caller).
fn unrecognized() -> KmsError {
    KmsError::Unauthenticated("The security token included in the request is invalid.".into())
}

impl Kms {
    /// Creates an access key for `principal` (default: the caller) in the caller's account.
    pub fn create_access_key(
        &self,
        caller: &Caller,
        principal: Option<PrincipalName>,
    ) -> Result<NewAccessKey, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::CreateAccessKey>(caller)?;
        let principal = principal.unwrap_or_else(|| caller.name.clone());
        caller.may_manage(&principal, crate::Action::CreateAccessKey)?;
        let row = format!("{}/{}", caller.tenant, principal);
        if u.barrier.get::<PrincipalRecord>(Table::Principals, &row)?.is_none() {
            return Err(KmsError::NotFound(format!("Principal {principal} is not found.")));
        }
        let id_bytes: [u8; 16] = random::array();
        let id: String =
            "AKIA".chars().chain(id_bytes.iter().map(|b| ID_ALPHABET[usize::from(b % 32)] as char)).collect();
        // 30 random bytes: 40 base64 characters, the shape of an AWS secret access key.
        let raw = random::secret(30);
        let secret = SecretBytes::new(STANDARD.encode(raw.expose_secret()).into_bytes());
        let record = AccessKeyRecord {
            id: id.clone(),
            tenant: caller.tenant.clone(),
            principal: principal.clone(),
            secret: Zeroizing::new(String::from_utf8(secret.expose_secret().to_vec()).expect("base64 is ASCII")),
            active: true,
            created_at: now_ms(),
        };
        self.commit(&u, caller.into(), None, vec![u.barrier.put(Table::AccessKeys, &id, &record, Expect::Absent)])?;
        tracing::info!(access_key_id = %id, principal = %principal, "access key created");
        Ok(NewAccessKey { id, secret, principal })
    }

    /// Access keys of the caller's account (optionally of one principal).
    pub fn list_access_keys(
        &self,
        caller: &Caller,
        principal: Option<&PrincipalName>,
    ) -> Result<Vec<AccessKeyInfo>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ListAccessKeys>(caller)?;
        // Everyone's for a tenant admin; one's own otherwise.
        let own = caller.name.clone();
        let principal = match principal {
            Some(p) => {
                caller.may_manage(p, crate::Action::ListAccessKeys)?;
                Some(p)
            }
            None if caller.roles.contains(&crate::model::Role::TenantAdmin) => None,
            None => Some(&own),
        };
        let mut out = Vec::new();
        u.barrier.for_each::<AccessKeyRecord, KmsError>(Table::AccessKeys, "", None, |k| {
            let k = k.value;
            if k.tenant == caller.tenant && principal.is_none_or(|p| *p == k.principal) {
                out.push(AccessKeyInfo {
                    access_key_id: k.id,
                    principal: k.principal.to_string(),
                    status: if k.active { "Active" } else { "Inactive" },
                    create_date: crate::model::aws_time(k.created_at),
                });
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    /// Activates or deactivates an access key of the caller's account.
    pub fn update_access_key(&self, caller: &Caller, id: &str, active: bool) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::UpdateAccessKey>(caller)?;
        let mut key = self.access_key_in_tenant(&u, caller, id)?;
        caller.may_manage(&key.value.principal, crate::Action::UpdateAccessKey)?;
        key.value.active = active;
        self.commit(
            &u,
            caller.into(),
            None,
            vec![u.barrier.put(Table::AccessKeys, id, &key.value, Expect::Rev(key.rev))],
        )?;
        Ok(())
    }

    /// Deletes an access key of the caller's account.
    pub fn delete_access_key(&self, caller: &Caller, id: &str) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::DeleteAccessKey>(caller)?;
        let key = self.access_key_in_tenant(&u, caller, id)?;
        caller.may_manage(&key.value.principal, crate::Action::DeleteAccessKey)?;
        self.commit(&u, caller.into(), None, vec![u.barrier.delete(Table::AccessKeys, id, Expect::Rev(key.rev))])?;
        Ok(())
    }

    fn access_key_in_tenant(
        &self,
        u: &crate::Unsealed,
        caller: &Caller,
        id: &str,
    ) -> Result<custody_store::Versioned<AccessKeyRecord>, KmsError> {
        match u.barrier.get::<AccessKeyRecord>(Table::AccessKeys, id)? {
            Some(k) if k.value.tenant == caller.tenant => Ok(k),
            _ => Err(KmsError::NotFound(format!("Access key {id} is not found."))),
        }
    }

    /// Deletes of every access key of one principal (when it is deleted).
    pub(crate) fn access_key_deletes(
        &self,
        u: &crate::Unsealed,
        tenant: &crate::TenantId,
        principal: &PrincipalName,
    ) -> Result<Vec<custody_store::Write>, KmsError> {
        let mut out = Vec::new();
        u.barrier.for_each::<AccessKeyRecord, KmsError>(Table::AccessKeys, "", None, |k| {
            if k.value.tenant == *tenant && k.value.principal == *principal {
                out.push(u.barrier.delete(Table::AccessKeys, &k.key, Expect::Rev(k.rev)));
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    /// Verifies a SigV4 signature made with access key `id`: `Ok(Some(caller))` when `signature`
    /// is the signature of `string_to_sign` under the key's secret for `scope`, `Ok(None)` when
    /// it is not. Unknown and inactive keys, and keys of a disabled principal, are refused alike.
    /// The secret never leaves this crate.
    pub fn verify_access_key_signature(
        &self,
        id: &str,
        scope: SigV4Scope<'_>,
        string_to_sign: &[u8],
        signature: &[u8],
    ) -> Result<Option<Caller>, KmsError> {
        let u = self.unsealed()?;
        if id.is_empty() || id.len() > 128 {
            return Err(unrecognized());
        }
        let key = u
            .barrier
            .get_derived::<AccessKeyRecord, AccessKeyVerifier, KmsError>(Table::AccessKeys, id, AccessKeyVerifier::of)?
            .ok_or_else(unrecognized)?;
        if !key.active {
            return Err(unrecognized());
        }
        let principal = u
            .barrier
            .get_decoded::<PrincipalRecord>(Table::Principals, &format!("{}/{}", key.tenant, key.principal))?
            .ok_or_else(unrecognized)?
            .value;
        if !principal.enabled {
            return Err(unrecognized());
        }
        if !sigv4::verify(&key.signing_key(scope), string_to_sign, signature) {
            return Ok(None);
        }
        Ok(Some(Caller {
            tenant: key.tenant.clone(),
            name: key.principal.clone(),
            roles: principal.roles,
            audit: None,
            source_ip: None,
        }))
    }
}
