//! The certificates the internal CA issued: a record of each (never its private key), revocation,
//! renewal by the holder, and the server's own certificate.
//!
//! Rows in [`Table::Pki`]: `cert/<serial>` for every certificate issued (client and server), and
//! `revoked/<serial>` for every revoked one. The revoked rows are what servers load (every second
//! and at once on the node that revokes) to refuse a certificate at the handshake and on
//! connections already open; they stay small because they hold serials only.

use std::collections::HashSet;

use custody_crypto::pki;
use custody_store::{Barrier, Expect, Table, Write};
use serde::{Deserialize, Serialize};

use crate::audit::Actor;
use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::ids::{PrincipalName, TenantId};
use crate::model::{now_ms, CaRecord, Millis, PrincipalRecord, Role};
use crate::{Kms, Unsealed};

/// Default lifetime of a server certificate the CA issues (the server renews it at two thirds).
pub const SERVER_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertKind {
    /// A principal's client certificate.
    Client,
    /// A server's certificate.
    Server,
}

/// What custody keeps about an issued certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CertRecord {
    pub serial: String,
    pub kind: CertKind,
    /// The principal's identity URI, or the server's names joined by commas.
    pub subject: String,
    /// The principal's tenant (client certificates).
    pub tenant: Option<TenantId>,
    pub issued_at: Millis,
    pub not_after: Millis,
    /// Set when the certificate was issued by renewing another.
    #[serde(default)]
    pub renewed_from: Option<String>,
    /// Serial of the CA that issued it (absent for certificates recorded before this was kept).
    #[serde(default)]
    pub issuer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevokedRecord {
    serial: String,
    revoked_at: Millis,
    by: String,
}

/// An issued certificate as listed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CertificateInfo {
    /// Serial number (lowercase hex).
    pub serial: String,
    /// `client`, `server` or `ca`.
    pub kind: String,
    /// Identity URI of a client certificate; names of a server certificate; the CA's name.
    pub subject: String,
    /// Tenant of a client certificate.
    pub tenant: Option<String>,
    /// Issued, seconds since the epoch.
    pub issued_at: i64,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
    /// `valid`, `expired` or `revoked`.
    pub status: &'static str,
    /// Serial of the issuing CA (for a CA: its own), when known. During a CA rollover, what still
    /// comes from the previous CA must be renewed before it is retired.
    pub issuer: Option<String>,
}

/// Rows of the CA that issues, the one that will, and the one that did.
const CA_ACTIVE: &str = "ca";
const CA_NEXT: &str = "ca-next";
const CA_PREVIOUS: &str = "ca-previous";

/// The CAs the store has, with their role: the issuing one, and during a rollover the next or
/// the previous one.
fn cas(u: &Unsealed) -> Result<Vec<(&'static str, CaRecord)>, KmsError> {
    let mut out = Vec::new();
    for (row, role) in [(CA_ACTIVE, "issuing"), (CA_NEXT, "next, trusted"), (CA_PREVIOUS, "previous, trusted")] {
        if let Some(ca) = u.barrier.get::<CaRecord>(Table::Pki, row)? {
            out.push((role, ca.value));
        }
    }
    Ok(out)
}

/// One step of a CA rollover (see [`Kms::rotate_ca`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaRotation {
    /// Create the next CA and trust it.
    Start,
    /// Issue with it; keep trusting the old one.
    Finish,
    /// Stop trusting the old one.
    RetirePrevious,
}

/// Which certificates to revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// One, by serial.
    Serial(String),
    /// Every certificate of a principal of the caller's tenant.
    Principal(PrincipalName),
}

fn cert_row(serial: &str) -> String {
    format!("cert/{serial}")
}

fn revoked_row(serial: &str) -> String {
    format!("revoked/{serial}")
}

/// The write that records `cert` as issued.
pub(crate) fn record_issued(
    barrier: &Barrier,
    issuer: &pki::IssuedCert,
    cert: &pki::IssuedCert,
    kind: CertKind,
    subject: String,
    tenant: Option<TenantId>,
    renewed_from: Option<String>,
) -> Write {
    let record = CertRecord {
        serial: cert.serial.clone(),
        kind,
        subject,
        tenant,
        issued_at: now_ms(),
        not_after: cert.not_after.unix_timestamp() * 1000,
        renewed_from,
        issuer: Some(issuer.serial.clone()),
    };
    barrier.put(Table::Pki, &cert_row(&cert.serial), &record, Expect::Absent)
}

/// All rows under `prefix`, in pages.
fn scan_all<T: serde::de::DeserializeOwned>(barrier: &Barrier, prefix: &str) -> Result<Vec<T>, KmsError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = barrier.scan::<T>(Table::Pki, prefix, after.as_deref(), 1000)?;
        let done = page.len() < 1000;
        after = page.last().map(|r| r.key.clone());
        out.extend(page.into_iter().map(|r| r.value));
        if done {
            return Ok(out);
        }
    }
}

fn to_duration(d: std::time::Duration) -> Result<time::Duration, KmsError> {
    time::Duration::try_from(d).map_err(|e| KmsError::Internal(e.to_string()))
}

impl Kms {
    /// Serials of every revoked certificate, from the store.
    pub fn revoked_serials(&self) -> Result<HashSet<String>, KmsError> {
        let u = self.unsealed()?;
        Ok(scan_all::<RevokedRecord>(&u.barrier, "revoked/")?.into_iter().map(|r| r.serial).collect())
    }

    /// Reloads the revoked serials from the store (the server does every second, so a revocation
    /// on any node reaches every node within about a second). Returns how many there are.
    pub fn refresh_revocations(&self) -> Result<usize, KmsError> {
        let set = self.revoked_serials()?;
        let n = set.len();
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(n)
    }

    /// Whether the certificate with this serial (lowercase hex, as [`custody_crypto::pki`]
    /// writes it) is revoked, as of the last refresh or local revocation.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }

    /// RevokeCertificate. A tenant admin revokes certificates of its own tenant's principals; a
    /// security officer any, server certificates included. Returns the serials revoked now
    /// (already revoked ones are not repeated).
    pub fn revoke_certificates(&self, caller: &Caller, target: &RevokeTarget) -> Result<Vec<String>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::RevokeCertificate>(caller)?;
        let officer = caller.roles.contains(&Role::SecurityOfficer);
        let visible = |c: &CertRecord| officer || c.tenant.as_ref() == Some(&caller.tenant);
        let targets: Vec<String> = match target {
            RevokeTarget::Serial(serial) => {
                let hex = serial.trim().to_ascii_lowercase().replace(':', "");
                let hex = hex.trim_start_matches("0x");
                let bytes = hex::decode(if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_string() })
                    .map_err(|_| KmsError::validation("serial", "a serial number is hexadecimal"))?;
                let serial = pki::serial_hex(&bytes);
                match u.barrier.get::<CertRecord>(Table::Pki, &cert_row(&serial))? {
                    Some(c) if visible(&c.value) => vec![serial],
                    // Certificates issued before custody recorded them: a security officer may
                    // revoke any serial (a tenant admin only what it can see is its tenant's).
                    None if officer => vec![serial],
                    _ => return Err(KmsError::NotFound(format!("Certificate {serial} is not found."))),
                }
            }
            RevokeTarget::Principal(name) => {
                let uri = crate::seal::identity_uri(&caller.tenant, name);
                let found: Vec<String> = scan_all::<CertRecord>(&u.barrier, "cert/")?
                    .into_iter()
                    .filter(|c| c.kind == CertKind::Client && c.subject == uri)
                    .map(|c| c.serial)
                    .collect();
                if found.is_empty() {
                    return Err(KmsError::NotFound(format!("No certificate of {name} is found.")));
                }
                found
            }
        };
        let already = self.revoked_serials()?;
        let now = now_ms();
        let mut serials = Vec::new();
        let mut writes = Vec::new();
        for serial in targets.into_iter().filter(|s| !already.contains(s)) {
            let record = RevokedRecord { serial: serial.clone(), revoked_at: now, by: caller.arn() };
            writes.push(u.barrier.put(Table::Pki, &revoked_row(&serial), &record, Expect::Any));
            serials.push(serial);
        }
        if !writes.is_empty() {
            self.commit(&u, caller.into(), None, writes)?;
            self.revoked.write().unwrap_or_else(|p| p.into_inner()).extend(serials.iter().cloned());
            tracing::warn!(serials = ?serials, "certificates revoked");
        }
        Ok(serials)
    }

    /// ListCertificates: the CA, and the certificates the caller may revoke (its tenant's, or all
    /// for a security officer), newest first.
    pub fn list_certificates(&self, caller: &Caller) -> Result<Vec<CertificateInfo>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::ListCertificates>(caller)?;
        let officer = caller.roles.contains(&Role::SecurityOfficer);
        let revoked = self.revoked_serials()?;
        let now = now_ms();
        let mut out = Vec::new();
        for (role, ca) in cas(&u)? {
            out.push(CertificateInfo {
                serial: ca.serial.clone(),
                kind: "ca".into(),
                subject: format!("custody CA ({role})"),
                tenant: None,
                issued_at: 0,
                not_after: ca.not_after / 1000,
                status: if ca.not_after <= now { "expired" } else { "valid" },
                issuer: Some(ca.serial),
            });
        }
        let mut certs: Vec<CertRecord> = scan_all::<CertRecord>(&u.barrier, "cert/")?
            .into_iter()
            .filter(|c| officer || c.tenant.as_ref() == Some(&caller.tenant))
            .collect();
        certs.sort_by_key(|c| std::cmp::Reverse(c.issued_at));
        out.extend(certs.into_iter().map(|c| CertificateInfo {
            status: if revoked.contains(&c.serial) {
                "revoked"
            } else if c.not_after <= now {
                "expired"
            } else {
                "valid"
            },
            kind: match c.kind {
                CertKind::Client => "client".into(),
                CertKind::Server => "server".into(),
            },
            serial: c.serial,
            subject: c.subject,
            tenant: c.tenant.map(|t| t.to_string()),
            issued_at: c.issued_at / 1000,
            not_after: c.not_after / 1000,
            issuer: c.issuer,
        }));
        Ok(out)
    }

    /// RenewCertificate: the caller, authenticated by its client certificate `presented`
    /// (serial; the handshake proved it is this CA's, valid and not revoked, and names the
    /// caller), gets a new one for itself with the same lifetime as the presented one had, or the
    /// default. The old one stays valid until it expires or is revoked.
    pub fn renew_certificate(
        &self,
        caller: &Caller,
        presented: &str,
        ttl: Option<std::time::Duration>,
    ) -> Result<crate::IssuedClientCert, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::RenewCertificate>(caller)?;
        let uri = crate::seal::identity_uri(&caller.tenant, &caller.name);
        let old = u
            .barrier
            .get::<CertRecord>(Table::Pki, &cert_row(presented))?
            .map(|r| r.value)
            .filter(|c| c.kind == CertKind::Client && c.subject == uri);
        let ttl = match (ttl, old) {
            (Some(t), _) => t,
            (None, Some(old)) => {
                std::time::Duration::from_millis(u64::try_from(old.not_after - old.issued_at).unwrap_or(0).max(60_000))
            }
            (None, None) => crate::CLIENT_CERT_TTL.0,
        };
        if ttl.as_secs() < 60 || ttl > crate::CLIENT_CERT_TTL.1 {
            return Err(KmsError::validation("ttl", "a certificate lives between 1 minute and 90 days"));
        }
        let principal = u
            .barrier
            .get::<PrincipalRecord>(Table::Principals, &format!("{}/{}", caller.tenant, caller.name))?
            .ok_or_else(|| KmsError::Unauthenticated("The security token included in the request is invalid.".into()))?
            .value;
        let (cert, write) = self.issue_for(&u, &principal, ttl, Some(presented.to_string()))?;
        self.commit(&u, caller.into(), None, vec![write])?;
        tracing::info!(principal = %caller.name, serial = %cert.serial, renewed = %presented, "client certificate renewed");
        Ok(cert)
    }

    /// IssueServerCertificate (security officer): a server certificate for `names` from the CA,
    /// e.g. for another node. Its private key is returned once and kept nowhere.
    pub fn issue_server_certificate(
        &self,
        caller: &Caller,
        names: &[String],
        ttl: Option<std::time::Duration>,
    ) -> Result<(String, pki::IssuedCert), KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::IssueServerCertificate>(caller)?;
        if names.is_empty() || names.iter().any(|n| n.is_empty() || n.len() > 253) {
            return Err(KmsError::validation("names", "give one or more host names or IP addresses"));
        }
        let ttl = ttl.unwrap_or(SERVER_CERT_LIFETIME);
        if ttl.as_secs() < 60 || ttl > std::time::Duration::from_secs(397 * 24 * 3600) {
            return Err(KmsError::validation("ttl", "a server certificate lives between 1 minute and 397 days"));
        }
        let (ca_pem, cert, write) = self.issue_server_in(&u, names, ttl)?;
        self.commit(&u, caller.into(), None, vec![write])?;
        Ok((ca_pem, cert))
    }

    /// A new certificate for this server (names and lifetime as before), recorded and audited as
    /// the server's own act. The server calls it at two thirds of its certificate's life.
    pub fn renew_server_certificate(
        &self,
        names: &[String],
        lifetime: std::time::Duration,
    ) -> Result<(String, pki::IssuedCert), KmsError> {
        let u = self.unsealed()?;
        let (ca_pem, cert, write) = self.issue_server_in(&u, names, lifetime)?;
        self.commit(&u, Actor::Scheduler { action: "Custody.RenewServerCertificate" }, None, vec![write])?;
        tracing::info!(serial = %cert.serial, not_after = %cert.not_after, "server certificate renewed");
        Ok((ca_pem, cert))
    }

    fn issue_server_in(
        &self,
        u: &Unsealed,
        names: &[String],
        lifetime: std::time::Duration,
    ) -> Result<(String, pki::IssuedCert, Write), KmsError> {
        let issuer = self.ca_issuer(u)?;
        let cert = pki::issue_server(&issuer, names, time::OffsetDateTime::now_utc(), to_duration(lifetime)?)
            .map_err(|e| KmsError::validation("names", e.to_string()))?;
        let write = record_issued(&u.barrier, &issuer, &cert, CertKind::Server, names.join(","), None, None);
        Ok((self.trust_bundle_in(u)?, cert, write))
    }

    /// Every CA certificate peers should trust now (PEM, concatenated): the issuing CA, and
    /// during a rollover the next one (already trusted, not yet issuing) or the previous one
    /// (still trusted, no longer issuing).
    pub fn trust_bundle(&self) -> Result<String, KmsError> {
        let u = self.unsealed()?;
        self.trust_bundle_in(&u)
    }

    pub(crate) fn trust_bundle_in(&self, u: &Unsealed) -> Result<String, KmsError> {
        let mut pem = String::new();
        for (_, ca) in cas(u)? {
            pem.push_str(ca.cert_pem.trim_end());
            pem.push('\n');
        }
        Ok(pem)
    }

    /// The issuing CA's certificate (PEM).
    pub fn ca_certificate(&self) -> Result<String, KmsError> {
        let u = self.unsealed()?;
        Ok(self.ca_issuer(&u)?.cert_pem)
    }

    /// RotateCa (security officer), one step at a time:
    /// - `Start`: a new CA is created and trusted, but does not issue yet. Give every client the
    ///   new trust bundle now (`custody pki renew`, `custody agent`, or copy `ca.crt`).
    /// - `Finish`: the new CA issues from now on (servers renew their own certificates from it at
    ///   once); the old one stays trusted, so certificates it issued keep working.
    /// - `RetirePrevious`: the old CA is no longer trusted; certificates it issued stop working.
    pub fn rotate_ca(&self, caller: &Caller, step: CaRotation) -> Result<Vec<CertificateInfo>, KmsError> {
        let u = self.unsealed()?;
        let _proof = authorize::<act::RotateCa>(caller)?;
        let get = |row: &str| u.barrier.get::<CaRecord>(Table::Pki, row);
        let writes = match step {
            CaRotation::Start => {
                if get(CA_NEXT)?.is_some() {
                    return Err(KmsError::AlreadyExists(
                        "A CA rotation is already under way: finish it (custody pki rotate-ca finish).".into(),
                    ));
                }
                let store = &self.store_id()?[..8];
                let name = format!("custody CA {store} {}", hex::encode(custody_crypto::random::array::<4>()));
                let ca = pki::new_ca(&name, time::OffsetDateTime::now_utc(), crate::seal::CA_LIFETIME)
                    .map_err(|e| KmsError::Internal(e.to_string()))?;
                let record = CaRecord {
                    cert_pem: ca.cert_pem.clone(),
                    key_pem: zeroize::Zeroizing::new(
                        String::from_utf8(ca.key_pem.expose_secret().to_vec())
                            .map_err(|_| KmsError::Internal("CA key is not UTF-8".into()))?,
                    ),
                    serial: ca.serial.clone(),
                    not_after: ca.not_after.unix_timestamp() * 1000,
                };
                vec![u.barrier.put(Table::Pki, CA_NEXT, &record, Expect::Absent)]
            }
            CaRotation::Finish => {
                let next = get(CA_NEXT)?.ok_or_else(|| {
                    KmsError::validation("step", "no CA rotation is under way: start one (custody pki rotate-ca start)")
                })?;
                if get(CA_PREVIOUS)?.is_some() {
                    return Err(KmsError::validation(
                        "step",
                        "the CA before the current one is still trusted: retire it first (custody pki rotate-ca retire)",
                    ));
                }
                let active = get(CA_ACTIVE)?.ok_or_else(|| KmsError::Internal("no CA".into()))?;
                vec![
                    u.barrier.put(Table::Pki, CA_PREVIOUS, &active.value, Expect::Absent),
                    u.barrier.put(Table::Pki, CA_ACTIVE, &next.value, Expect::Rev(active.rev)),
                    u.barrier.delete(Table::Pki, CA_NEXT, Expect::Rev(next.rev)),
                ]
            }
            CaRotation::RetirePrevious => {
                let previous = get(CA_PREVIOUS)?
                    .ok_or_else(|| KmsError::validation("step", "there is no previous CA to retire"))?;
                vec![u.barrier.delete(Table::Pki, CA_PREVIOUS, Expect::Rev(previous.rev))]
            }
        };
        self.commit(&u, caller.into(), None, writes)?;
        tracing::warn!(step = ?step, "CA rotation step");
        self.list_certificates(caller).map(|all| all.into_iter().filter(|c| c.kind == "ca").collect())
    }

    /// When the CA's certificate expires, seconds since the epoch.
    pub fn ca_not_after(&self) -> Result<i64, KmsError> {
        let u = self.unsealed()?;
        Ok(self.ca_issuer(&u)?.not_after.unix_timestamp())
    }
}
