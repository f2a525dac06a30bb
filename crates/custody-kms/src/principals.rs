//! Tenants and principals: who exists, which roles they hold, and their client certificates.
//!
//! A principal's record is read on every request that authenticates as it, so disabling or
//! deleting one takes effect on its next request, on open connections too.

use custody_crypto::pki;
use custody_store::{Expect, Table, Write};
use serde::Serialize;

use crate::authz::{act, authorize, Caller};
use crate::certs::CertKind;
use crate::error::KmsError;
use crate::ids::{PrincipalName, TenantId};
use crate::model::{aws_time, now_ms, CaRecord, PrincipalRecord, Role, TenantRecord};
use crate::Kms;

/// Default and longest lifetime of a principal's client certificate.
pub const CLIENT_CERT_TTL: (std::time::Duration, std::time::Duration) =
    (std::time::Duration::from_secs(24 * 3600), std::time::Duration::from_secs(90 * 24 * 3600));

/// A principal as listed and described.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PrincipalInfo {
    /// Its ARN.
    pub arn: String,
    /// Tenant.
    pub tenant: String,
    /// Name.
    pub name: String,
    /// Roles.
    pub roles: Vec<&'static str>,
    /// Whether it may authenticate.
    pub enabled: bool,
    /// Seconds since epoch.
    pub creation_date: f64,
    /// Its certificate identity (`spiffe://custody/<tenant>/<name>`).
    pub identity: String,
}

/// A tenant as listed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TenantInfo {
    /// Account id.
    pub tenant_id: String,
    /// Display name.
    pub name: String,
    /// Seconds since epoch.
    pub creation_date: f64,
}

/// A client certificate and its private key; the key exists nowhere else (custody keeps only
/// the certificate's serial).
pub struct IssuedClientCert {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: custody_crypto::SecretBytes,
    /// CA certificate (PEM), to trust the server with.
    pub ca_pem: String,
    /// Serial (hex).
    pub serial: String,
    /// Seconds since epoch.
    pub not_after: i64,
}

impl std::fmt::Debug for IssuedClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedClientCert").field("serial", &self.serial).finish_non_exhaustive()
    }
}

fn info(p: &PrincipalRecord) -> PrincipalInfo {
    PrincipalInfo {
        arn: format!("arn:aws:iam::{}:user/{}", p.tenant, p.name),
        tenant: p.tenant.to_string(),
        name: p.name.to_string(),
        roles: p.roles.iter().map(|r| r.as_str()).collect(),
        enabled: p.enabled,
        creation_date: aws_time(p.created_at),
        identity: crate::seal::identity_uri(&p.tenant, &p.name),
    }
}

impl Kms {
    /// Separation of duties between roles: administering keys and using them are held by
    /// different principals (refused under `enforce`, an audit alert under `warn`).
    fn check_role_duties(&self, caller: &Caller, name: &PrincipalName, roles: &[Role]) -> Result<(), KmsError> {
        if roles.contains(&Role::KeyAdmin) && roles.contains(&Role::KeyUser) {
            let conflict = vec![format!("{name} (roles key-admin and key-user)")];
            return self.enforce_duties(caller, "these roles", conflict);
        }
        Ok(())
    }

    /// CreateTenant (security officer): a new tenant and its first tenant admin, with a client
    /// certificate for that admin.
    pub fn create_tenant(
        &self,
        caller: &Caller,
        id: Option<TenantId>,
        name: &str,
        admin: &PrincipalName,
    ) -> Result<(TenantInfo, IssuedClientCert), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::CreateTenant>(caller)?;
        if name.is_empty() || name.len() > 256 {
            return Err(KmsError::validation("name", "Member must have length between 1 and 256"));
        }
        let id = id.unwrap_or_else(TenantId::random);
        let now = now_ms();
        let tenant = TenantRecord { id: id.clone(), name: name.to_string(), created_at: now };
        let principal = PrincipalRecord {
            tenant: id.clone(),
            name: admin.clone(),
            roles: vec![Role::TenantAdmin],
            enabled: true,
            created_at: now,
        };
        let (cert, cert_write) = self.issue_for(&u, &principal, CLIENT_CERT_TTL.0, None)?;
        let writes = vec![
            u.barrier.put(Table::Tenants, id.as_str(), &tenant, Expect::Absent),
            u.barrier.put(Table::Principals, &format!("{id}/{admin}"), &principal, Expect::Absent),
            cert_write,
        ];
        self.commit(&u, caller.into(), None, writes).map_err(|e| match e {
            KmsError::Conflict => KmsError::AlreadyExists(format!("Tenant {id} already exists.")),
            other => other,
        })?;
        tracing::info!(tenant = %id, admin = %admin, "tenant created");
        Ok((TenantInfo { tenant_id: id.to_string(), name: name.to_string(), creation_date: aws_time(now) }, cert))
    }

    /// ListTenants (security officer).
    pub fn list_tenants(&self, caller: &Caller) -> Result<Vec<TenantInfo>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ListTenants>(caller)?;
        let rows = u.barrier.scan::<TenantRecord>(Table::Tenants, "", None, 100_000)?;
        Ok(rows
            .into_iter()
            .map(|t| TenantInfo {
                tenant_id: t.value.id.to_string(),
                name: t.value.name,
                creation_date: aws_time(t.value.created_at),
            })
            .collect())
    }

    /// CreatePrincipal (tenant admin, in its own tenant).
    pub fn create_principal(
        &self,
        caller: &Caller,
        name: &PrincipalName,
        roles: Vec<Role>,
    ) -> Result<PrincipalInfo, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::CreatePrincipal>(caller)?;
        self.check_grantable(caller, &roles)?;
        self.check_role_duties(caller, name, &roles)?;
        let mut roles = roles;
        roles.sort();
        roles.dedup();
        let record = PrincipalRecord {
            tenant: caller.tenant.clone(),
            name: name.clone(),
            roles,
            enabled: true,
            created_at: now_ms(),
        };
        let row = format!("{}/{}", caller.tenant, name);
        self.commit(&u, caller.into(), None, vec![u.barrier.put(Table::Principals, &row, &record, Expect::Absent)])
            .map_err(|e| match e {
                KmsError::Conflict => KmsError::AlreadyExists(format!("Principal {name} already exists.")),
                other => other,
            })?;
        tracing::info!(tenant = %caller.tenant, principal = %name, "principal created");
        Ok(info(&record))
    }

    /// Only a security officer hands out the security-officer role.
    fn check_grantable(&self, caller: &Caller, roles: &[Role]) -> Result<(), KmsError> {
        if roles.contains(&Role::SecurityOfficer) && !caller.roles.contains(&Role::SecurityOfficer) {
            return Err(KmsError::AccessDenied("Only a security officer may give the security-officer role.".into()));
        }
        Ok(())
    }

    /// ListPrincipals of the caller's tenant.
    pub fn list_principals(&self, caller: &Caller) -> Result<Vec<PrincipalInfo>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ListPrincipals>(caller)?;
        let rows =
            u.barrier.scan::<PrincipalRecord>(Table::Principals, &format!("{}/", caller.tenant), None, 100_000)?;
        Ok(rows.iter().map(|r| info(&r.value)).collect())
    }

    /// DescribePrincipal in the caller's tenant.
    pub fn describe_principal(&self, caller: &Caller, name: &PrincipalName) -> Result<PrincipalInfo, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::DescribePrincipal>(caller)?;
        Ok(info(&self.principal_in_tenant(&u, caller, name)?.value))
    }

    fn principal_in_tenant(
        &self,
        u: &crate::Unsealed,
        caller: &Caller,
        name: &PrincipalName,
    ) -> Result<custody_store::Versioned<PrincipalRecord>, KmsError> {
        u.barrier
            .get::<PrincipalRecord>(Table::Principals, &format!("{}/{}", caller.tenant, name))?
            .ok_or_else(|| KmsError::NotFound(format!("Principal {name} is not found.")))
    }

    /// UpdatePrincipal: enable or disable it, or set its roles.
    pub fn update_principal(
        &self,
        caller: &Caller,
        name: &PrincipalName,
        enabled: Option<bool>,
        roles: Option<Vec<Role>>,
    ) -> Result<PrincipalInfo, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::UpdatePrincipal>(caller)?;
        if *name == caller.name && enabled == Some(false) {
            return Err(KmsError::validation("enabled", "a principal cannot disable itself"));
        }
        let mut p = self.principal_in_tenant(&u, caller, name)?;
        if let Some(mut roles) = roles {
            self.check_grantable(caller, &roles)?;
            self.check_role_duties(caller, name, &roles)?;
            roles.sort();
            roles.dedup();
            p.value.roles = roles;
        }
        if let Some(e) = enabled {
            p.value.enabled = e;
        }
        let write = u.barrier.put(Table::Principals, &p.key, &p.value, Expect::Rev(p.rev));
        self.commit(&u, caller.into(), None, vec![write])?;
        tracing::info!(principal = %name, enabled = p.value.enabled, "principal updated");
        Ok(info(&p.value))
    }

    /// DeletePrincipal, with its access keys.
    pub fn delete_principal(&self, caller: &Caller, name: &PrincipalName) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::DeletePrincipal>(caller)?;
        if *name == caller.name {
            return Err(KmsError::validation("name", "a principal cannot delete itself"));
        }
        let p = self.principal_in_tenant(&u, caller, name)?;
        let mut writes: Vec<Write> = vec![u.barrier.delete(Table::Principals, &p.key, Expect::Rev(p.rev))];
        writes.extend(self.access_key_deletes(&u, &caller.tenant, name)?);
        self.commit(&u, caller.into(), None, writes)
    }

    /// IssueCertificate: a client certificate for a principal of the caller's tenant.
    pub fn issue_certificate(
        &self,
        caller: &Caller,
        name: &PrincipalName,
        ttl: Option<std::time::Duration>,
    ) -> Result<IssuedClientCert, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::IssueCertificate>(caller)?;
        let ttl = ttl.unwrap_or(CLIENT_CERT_TTL.0);
        if ttl.as_secs() < 60 || ttl > CLIENT_CERT_TTL.1 {
            return Err(KmsError::validation("ttl", "a certificate lives between 1 minute and 90 days"));
        }
        let p = self.principal_in_tenant(&u, caller, name)?;
        let (cert, write) = self.issue_for(&u, &p.value, ttl, None)?;
        self.commit(&u, caller.into(), None, vec![write])?;
        tracing::info!(principal = %name, serial = %cert.serial, "client certificate issued");
        Ok(cert)
    }

    /// The store's CA, ready to issue certificates (its key only ever leaves the sealed row here).
    pub(crate) fn ca_issuer(&self, u: &crate::Unsealed) -> Result<pki::IssuedCert, KmsError> {
        let ca = u.barrier.get::<CaRecord>(Table::Pki, "ca")?.ok_or_else(|| KmsError::Internal("no CA".into()))?.value;
        Ok(pki::IssuedCert {
            cert_pem: ca.cert_pem,
            key_pem: custody_crypto::SecretBytes::copy_from(ca.key_pem.as_bytes()),
            serial: ca.serial,
            not_after: time::OffsetDateTime::from_unix_timestamp(ca.not_after / 1000)
                .map_err(|e| KmsError::Internal(e.to_string()))?,
        })
    }

    /// A client certificate for `p`, and the write that records it (the caller commits it).
    pub(crate) fn issue_for(
        &self,
        u: &crate::Unsealed,
        p: &PrincipalRecord,
        ttl: std::time::Duration,
        renewed_from: Option<String>,
    ) -> Result<(IssuedClientCert, Write), KmsError> {
        let issuer = self.ca_issuer(u)?;
        let lifetime = time::Duration::try_from(ttl).map_err(|e| KmsError::Internal(e.to_string()))?;
        let uri = crate::seal::identity_uri(&p.tenant, &p.name);
        let cert = pki::issue_client(&issuer, &uri, p.name.as_str(), time::OffsetDateTime::now_utc(), lifetime)
            .map_err(|e| KmsError::Internal(e.to_string()))?;
        let write = crate::certs::record_issued(
            &u.barrier,
            &issuer,
            &cert,
            CertKind::Client,
            uri,
            Some(p.tenant.clone()),
            renewed_from,
        );
        Ok((
            IssuedClientCert {
                cert_pem: cert.cert_pem,
                key_pem: cert.key_pem,
                ca_pem: self.trust_bundle_in(u)?,
                serial: cert.serial,
                not_after: cert.not_after.unix_timestamp(),
            },
            write,
        ))
    }
}
