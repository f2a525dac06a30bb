//! The AWS KMS JSON protocol (`POST /`, `X-Amz-Target: TrentService.<Action>`,
//! `application/x-amz-json-1.1`), and custody's own actions under the `Custody.` prefix.
//!
//! Thin by design: parse AWS shapes into the service's typed calls, and map the service's typed
//! errors to AWS error names in exactly one place ([`ApiError::from`]).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use custody_crypto::secret_json::{wipe_strings, SecretJson};
use custody_crypto::{EncryptionContext, SecretBytes};
use custody_kms::model::KeySpec;
use custody_kms::{
    AliasName, AuditQuery, Caller, CreateGrantRequest, CreateKeyRequest, KeyRef, Kms, KmsError, Outcome, Page,
    PrincipalName,
};
use custody_kms::{AuditEvent, AuditScope, ExportFrom, RequestContexts};

use crate::sigv4::{self, RequestParts};
use serde_json::{json, Map, Value};

/// An answer's JSON body. Answers carry secrets in their strings (Decrypt's plaintext, a data
/// key, random bytes, an issued certificate's private key, a new secret access key, unseal
/// shares): every string is wiped when the answer is dropped, answered or not, and
/// [`SecretJson::into_bytes`] serializes it into memory wiped when hyper drops the body after
/// sending it. No copy is left in freed memory by custody (hyper queues a body's bytes without
/// copying them over a TLS stream, and rustls encrypts them in place).
pub type Answer = SecretJson;

/// An error as the client sees it: HTTP status, AWS `__type`, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// AWS error name (`__type`).
    pub code: &'static str,
    /// Message shown to the caller.
    pub message: String,
    /// Internal detail for the server log and audit trail, never sent to the caller.
    pub detail: Option<String>,
}

impl ApiError {
    pub(crate) fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), detail: None }
    }

    fn serialization(message: impl Into<String>) -> Self {
        Self::new(400, "SerializationException", message)
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({ "__type": self.code, "message": self.message })
    }
}

impl From<KmsError> for ApiError {
    /// The one mapping from service errors to AWS errors.
    fn from(e: KmsError) -> Self {
        let message = e.to_string();
        let detail = e.internal_detail();
        let api = match e {
            KmsError::Sealed | KmsError::NotInitialized => ApiError::new(503, "ServiceUnavailableException", message),
            KmsError::Unauthenticated(_) => ApiError::new(400, "UnrecognizedClientException", message),
            KmsError::AccessDenied(_) => ApiError::new(400, "AccessDeniedException", message),
            KmsError::NotFound(_) => ApiError::new(400, "NotFoundException", message),
            KmsError::AlreadyExists(_) => ApiError::new(400, "AlreadyExistsException", message),
            KmsError::Validation { .. } => ApiError::new(400, "ValidationException", message),
            KmsError::InvalidAliasName(_) => ApiError::new(400, "InvalidAliasNameException", message),
            KmsError::Disabled(_) => ApiError::new(400, "DisabledException", message),
            KmsError::InvalidState(_) => ApiError::new(400, "KMSInvalidStateException", message),
            KmsError::InvalidCiphertext => ApiError::new(400, "InvalidCiphertextException", message),
            KmsError::InvalidKeyUsage(_) => ApiError::new(400, "InvalidKeyUsageException", message),
            KmsError::InvalidMac => ApiError::new(400, "KMSInvalidMacException", message),
            KmsError::MalformedPolicy(_) => ApiError::new(400, "MalformedPolicyDocumentException", message),
            KmsError::SeparationOfDuties(_) => ApiError::new(400, "SeparationOfDutiesException", message),
            KmsError::InvalidGrantToken(_) => ApiError::new(400, "InvalidGrantTokenException", message),
            KmsError::IncorrectKey => ApiError::new(400, "IncorrectKeyException", message),
            KmsError::InvalidShare(_) => ApiError::new(400, "InvalidShareException", message),
            KmsError::UnsupportedOperation(_) => ApiError::new(400, "UnsupportedOperationException", message),
            KmsError::Conflict => ApiError::new(409, "ConflictException", message),
            // Generic on purpose: details are in the server log, not for the caller.
            KmsError::Integrity(_) | KmsError::Internal(_) => ApiError::new(
                500,
                "KMSInternalException",
                "The request could not be completed because of an internal error.",
            ),
            _ => ApiError::new(
                500,
                "KMSInternalException",
                "The request could not be completed because of an internal error.",
            ),
        };
        ApiError { detail, ..api }
    }
}

/// What the audit record says about a request's body: the keys it names, with the version a
/// ciphertext names, and its encryption contexts (values are turned into HMAC tokens before they
/// are stored). What the service resolved replaces them where it got that far.
#[derive(Default)]
pub struct AuditHints {
    /// The key named (ReEncrypt: the destination key).
    pub key: Option<String>,
    /// Its version: the one the service used, else the one the ciphertext names.
    pub key_version: Option<u32>,
    /// ReEncrypt: the source key (`SourceKeyId`, else the one the ciphertext names).
    pub source_key: Option<String>,
    /// ReEncrypt: the version the ciphertext names.
    pub source_key_version: Option<u32>,
    /// The encryption context (Encrypt, Decrypt, GenerateDataKey*, ReEncrypt's destination).
    pub context: Option<BTreeMap<String, String>>,
    /// ReEncrypt's source encryption context.
    pub source_context: Option<BTreeMap<String, String>>,
}

impl AuditHints {
    /// `event` naming the keys and versions these hints hold.
    pub fn name_keys(&self, event: AuditEvent) -> AuditEvent {
        AuditEvent {
            key_id: self.key.clone(),
            key_version: self.key_version,
            source_key_id: self.source_key.clone(),
            source_key_version: self.source_key_version,
            ..event
        }
    }

    /// The contexts, for [`Kms::submit_audit`].
    pub fn contexts(&self) -> RequestContexts<'_> {
        RequestContexts { context: self.context.as_ref(), source: self.source_context.as_ref() }
    }
}

impl std::fmt::Debug for AuditHints {
    /// Context keys only: their values end up in the audit trail as HMAC tokens, not in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHints")
            .field("key", &self.key)
            .field("key_version", &self.key_version)
            .field("source_key", &self.source_key)
            .field("source_key_version", &self.source_key_version)
            .field("contexts", &self.contexts())
            .finish()
    }
}

/// At most the first `max` characters of `s` (bounded fields of audit records and logs). Copies
/// `s` whole when its bytes already fit, without walking its characters.
pub fn first_chars(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    match s.char_indices().nth(max) {
        Some((end, _)) => s[..end].to_string(),
        None => s.to_string(),
    }
}

/// The first of `fields` that is a string, bounded.
fn named_key(m: &Map<String, Value>, fields: &[&str]) -> Option<String> {
    fields.iter().find_map(|f| match m.get(*f) {
        Some(Value::String(s)) => Some(first_chars(s, 2048)),
        _ => None,
    })
}

/// The key id and version a `CiphertextBlob`'s header names (read, not checked: the record
/// says what the caller sent).
fn blob_key(m: &Map<String, Value>) -> Option<(String, u32)> {
    // 28 base64 characters decode to 21 bytes: exactly the blob header.
    let bytes = B64.decode(m.get("CiphertextBlob")?.as_str()?.get(..28)?).ok()?;
    let header = custody_crypto::blob::BlobHeader::peek(&bytes).ok()?;
    Some((custody_kms::KeyId::from_bytes(header.key_id).to_string(), header.version))
}

/// An encryption context field, bounded (64 pairs, keys of 256 characters; values that are not
/// strings left out).
fn context_hint(m: &Map<String, Value>, field: &str) -> Option<BTreeMap<String, String>> {
    let Value::Object(c) = m.get(field)? else { return None };
    Some(c.iter().take(64).filter_map(|(k, v)| Some((first_chars(k, 256), v.as_str()?.to_string()))).collect())
}

/// Who is calling, as far as the transport could tell.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A verified client certificate with this URI SAN and serial (lowercase hex).
    Certificate {
        /// URI SAN.
        uri: String,
        /// Serial number.
        serial: String,
    },
    /// A verified client certificate without a URI SAN.
    CertificateWithoutIdentity,
    /// No credential.
    Anonymous,
}

/// AWS KMS actions that custody does not implement (yet). They answer
/// `UnsupportedOperationException`, never a crash or an empty success.
const UNSUPPORTED_AWS_ACTIONS: &[&str] = &[
    "ConnectCustomKeyStore",
    "CreateCustomKeyStore",
    "DeleteCustomKeyStore",
    "DeleteImportedKeyMaterial",
    "DeriveSharedSecret",
    "DescribeCustomKeyStores",
    "DisconnectCustomKeyStore",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GetParametersForImport",
    "GetPublicKey",
    "ImportKeyMaterial",
    "ReplicateKey",
    "Sign",
    "UpdateCustomKeyStore",
    "UpdatePrimaryRegion",
    "Verify",
];

/// What a dispatched request produced, and who it turned out to be from (for the audit record).
pub struct Dispatched {
    /// The answer.
    pub result: Result<Answer, ApiError>,
    /// ARN of the authenticated principal.
    pub principal: Option<String>,
    /// SigV4 access key id presented (even if it was refused).
    pub access_key_id: Option<String>,
    /// The audit record written together with a state change, if the action made one.
    pub recorded: Option<u64>,
    /// What the body named, for the audit record.
    pub hints: AuditHints,
}

impl Dispatched {
    /// An answer made without the service's dispatch (health, refusals before it).
    pub fn answered(result: Result<Value, ApiError>) -> Self {
        let result = result.map(Answer::new);
        Self { result, principal: None, access_key_id: None, recorded: None, hints: AuditHints::default() }
    }

    /// A request refused before it reached the service.
    pub fn refused(e: ApiError) -> Self {
        Self::answered(Err(e))
    }
}

impl std::fmt::Debug for Dispatched {
    /// Never the result body: it may hold plaintext or a data key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatched")
            .field("ok", &self.result.is_ok())
            .field("principal", &self.principal)
            .field("access_key_id", &self.access_key_id)
            .field("recorded", &self.recorded)
            .finish_non_exhaustive()
    }
}

/// Who sent a request and how, as far as one request can tell; and the request's audit scope,
/// attached to the caller once authenticated.
#[derive(Debug, Default)]
struct Auth {
    principal: Option<String>,
    access_key_id: Option<String>,
    scope: Option<std::sync::Arc<custody_kms::AuditScope>>,
    /// The peer's address (for `aws:SourceIp`).
    source_ip: Option<std::net::IpAddr>,
}

/// Whether a request may be answered with only a log line when its audit record cannot be
/// written because the node is sealed: one that failed (it did nothing), or one of the two
/// actions served while sealed (they touch no key). A result computed before the node sealed
/// itself is never returned without its record.
pub fn unrecorded_while_sealed(target: &str, succeeded: bool) -> bool {
    !succeeded || matches!(target, "Custody.GetStatus" | "Custody.Unseal")
}

/// Actions that only read the store and compute: they never wait for a commit, so the server runs
/// them on its async workers instead of handing each to a blocking thread (their audit record is
/// awaited separately). Anything that may commit a state change is not listed.
pub fn runs_inline(target: &str) -> bool {
    matches!(
        target,
        "TrentService.Encrypt"
            | "TrentService.Decrypt"
            | "TrentService.ReEncrypt"
            | "TrentService.GenerateDataKey"
            | "TrentService.GenerateDataKeyWithoutPlaintext"
            | "TrentService.GenerateMac"
            | "TrentService.VerifyMac"
            | "TrentService.GenerateRandom"
            | "TrentService.DescribeKey"
    )
}

/// Runs one action. May block on a commit unless [`runs_inline`] says the action never commits. `audit` is the request's
/// audit event so far; a state change the action makes commits together with it.
/// `source_ip` is the TCP peer's (also in `audit.source`, with its port).
pub fn dispatch(
    kms: &Kms,
    identity: &Identity,
    req: &RequestParts<'_>,
    target: &str,
    audit: AuditEvent,
    source_ip: std::net::IpAddr,
) -> Dispatched {
    let mut auth = Auth { source_ip: Some(source_ip), ..Auth::default() };
    let mut hints = AuditHints::default();
    let result = Fields::parse(req.body).and_then(|fields| {
        hints = fields.audit_hints(target);
        auth.scope = Some(AuditScope::new(hints.name_keys(audit), hints.context.clone()));
        run(kms, identity, req, target, &fields, &mut auth).map(Answer::new)
    });
    let recorded = auth.scope.as_ref().and_then(|s| s.recorded());
    // The version the service used wins over what a ciphertext claimed.
    if let Some(v) = auth.scope.as_ref().and_then(|s| s.key_version()) {
        hints.key_version = Some(v);
    }
    Dispatched { result, principal: auth.principal, access_key_id: auth.access_key_id, recorded, hints }
}

fn run(
    kms: &Kms,
    identity: &Identity,
    req: &RequestParts<'_>,
    target: &str,
    fields: &Fields,
    auth: &mut Auth,
) -> Result<Value, ApiError> {
    let (service, action) = target
        .split_once('.')
        .ok_or_else(|| ApiError::new(400, "UnknownOperationException", format!("unknown operation {target:?}")))?;
    match service {
        "Custody" => custody_action(kms, identity, req, action, fields, auth),
        "TrentService" => {
            let caller = authenticate(kms, identity, req, auth)?;
            kms_action(kms, &caller, action, fields)
        }
        _ => Err(ApiError::new(400, "UnknownOperationException", format!("unknown service {service:?}"))),
    }
}

/// A request carries one identity: a client certificate from this custody's CA, or else a SigV4
/// signature by an access key.
fn authenticate(kms: &Kms, identity: &Identity, req: &RequestParts<'_>, auth: &mut Auth) -> Result<Caller, ApiError> {
    let caller = match identity {
        // Revoked since the connection opened: refused from the next request on.
        Identity::Certificate { serial, .. } if kms.is_revoked(serial) => {
            tracing::warn!(%serial, "request on a connection whose client certificate is revoked: refused");
            return Err(KmsError::Unauthenticated("The security token included in the request is invalid.".into()).into());
        }
        Identity::Certificate { uri, .. } => kms.authenticate_certificate(uri)?,
        Identity::CertificateWithoutIdentity => {
            return Err(ApiError::new(
                400,
                "UnrecognizedClientException",
                "The client certificate carries no custody identity (URI SAN spiffe://custody/<account>/<principal>).",
            ))
        }
        Identity::Anonymous => match req.headers.get("authorization").map(|v| v.to_str()) {
            Some(Ok(header)) => {
                sigv4::authenticate(kms, req, header, time::OffsetDateTime::now_utc(), &mut auth.access_key_id)?
            }
            Some(Err(_)) => return Err(ApiError::new(400, "IncompleteSignatureException", "the Authorization header is not ASCII")),
            None => {
                return Err(ApiError::new(
                    400,
                    "MissingAuthenticationTokenException",
                    "Request is missing authentication: sign it with SigV4 or present a client certificate issued by this custody.",
                ))
            }
        },
    };
    auth.principal = Some(caller.arn());
    let caller = match auth.source_ip {
        Some(ip) => caller.with_source_ip(ip),
        None => caller,
    };
    Ok(match auth.scope.clone() {
        Some(scope) => caller.with_audit(scope),
        None => caller,
    })
}

fn custody_action(
    kms: &Kms,
    identity: &Identity,
    req: &RequestParts<'_>,
    action: &str,
    f: &Fields,
    auth: &mut Auth,
) -> Result<Value, ApiError> {
    match action {
        // Unauthenticated: the seal status is not secret, and a share is its own credential.
        "GetStatus" => Ok(status_json(kms)?),
        "Unseal" => {
            let share = f.required_str("Share")?;
            kms.submit_share(share)?;
            Ok(status_json(kms)?)
        }
        "WhoAmI" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(json!({ "Account": caller.tenant().as_str(), "Principal": caller.name().as_str(), "Arn": caller.arn() }))
        }
        "ListAuditRecords" => {
            let caller = authenticate(kms, identity, req, auth)?;
            let outcome = match f.optional_str("Outcome")? {
                None => None,
                Some(o) => Some(match o.to_ascii_lowercase().as_str() {
                    "success" => Outcome::Success,
                    "denied" => Outcome::Denied,
                    "failed" => Outcome::Failed,
                    "unauthenticated" => Outcome::Unauthenticated,
                    _ => {
                        return Err(KmsError::validation(
                            "outcome",
                            "must be success, denied, failed or unauthenticated",
                        )
                        .into())
                    }
                }),
            };
            let q = AuditQuery {
                after: f.get("After").and_then(Value::as_u64).unwrap_or(0),
                limit: f.limit()?.unwrap_or(100),
                key: f.optional_str("KeyId")?.map(str::to_string),
                principal: f.optional_str("Principal")?.map(str::to_string),
                action: f.optional_str("Action")?.map(str::to_string),
                outcome,
                since: f.get("Since").and_then(Value::as_i64),
            };
            // The end of the trail first: every record up to it has been looked at, so a reader
            // may continue after it (one committed during the query would otherwise be skipped).
            let last_seq = kms.audit_last_seq()?;
            Ok(json!({ "Records": kms.query_audit(&caller, &q)?, "LastSeq": last_seq }))
        }
        "VerifyAudit" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(serde_json::to_value(kms.verify_audit(&caller)?).expect("serializable"))
        }
        "ExportAudit" => {
            let caller = authenticate(kms, identity, req, auth)?;
            // One page: `After` (the previous page's `Next`), else `Since` (milliseconds since
            // the epoch), else the oldest record.
            let from = match (f.optional_u64("After")?, f.optional_u64("Since")?) {
                (Some(_), Some(_)) => {
                    return Err(
                        KmsError::validation("after", "give After (to continue) or Since (to start), not both").into()
                    )
                }
                (Some(after), None) => ExportFrom::After(after),
                (None, Some(since)) => ExportFrom::Since(i64::try_from(since).unwrap_or(i64::MAX)),
                (None, None) => ExportFrom::Start,
            };
            let page = kms.export_audit(&caller, from, f.limit()?.unwrap_or(1000))?;
            Ok(json!({ "PublicKey": page.public_key, "Lines": page.lines, "Next": page.next }))
        }
        "GetAuditPublicKey" => Ok(json!({ "PublicKey": kms.audit_public_key()? })),
        "CreateBackup" => {
            let caller = authenticate(kms, identity, req, auth)?;
            let (header, bytes) = kms.create_backup(&caller)?;
            use base64::Engine;
            Ok(json!({ "Header": header, "Backup": base64::engine::general_purpose::STANDARD.encode(bytes) }))
        }
        "GetDestructionLedger" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(json!({ "Destroyed": kms.destruction_ledger(&caller)? }))
        }
        "CheckStore" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(serde_json::to_value(kms.check_store(&caller)?).expect("serializable"))
        }
        "AuditHash" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(json!({ "Hash": kms.audit_hash(&caller, f.required_str("Value")?)? }))
        }
        "CreateAccessKey" | "ListAccessKeys" | "UpdateAccessKey" | "DeleteAccessKey" => {
            let caller = authenticate(kms, identity, req, auth)?;
            access_key_action(kms, &caller, action, f)
        }
        "CreateTenant" | "ListTenants" | "CreatePrincipal" | "ListPrincipals" | "DescribePrincipal"
        | "UpdatePrincipal" | "DeletePrincipal" | "IssueCertificate" | "WhoCan" | "ExplainAccess" => {
            let caller = authenticate(kms, identity, req, auth)?;
            access_action(kms, &caller, action, f)
        }
        "RevokeCertificate" | "ListCertificates" | "IssueServerCertificate" | "RotateCa" => {
            let caller = authenticate(kms, identity, req, auth)?;
            certificate_action(kms, &caller, action, f)
        }
        "RotateRoot" => {
            let caller = authenticate(kms, identity, req, auth)?;
            let started = kms.rotate_root(&caller)?;
            let shares: Vec<zeroize::Zeroizing<String>> = started.shares.iter().map(|s| s.to_text()).collect();
            Ok(json!({
                "Generation": started.generation,
                "Threshold": started.threshold,
                "Shares": shares.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                "Status": kms.root_status(&caller)?,
            }))
        }
        "DescribeRoot" => {
            let caller = authenticate(kms, identity, req, auth)?;
            Ok(serde_json::to_value(kms.root_status(&caller)?).expect("status serializes"))
        }
        "RenewCertificate" => {
            let caller = authenticate(kms, identity, req, auth)?;
            let Identity::Certificate { serial, .. } = identity else {
                return Err(ApiError::new(
                    400,
                    "UnrecognizedClientException",
                    "A certificate is renewed over a connection authenticated with it (mutual TLS), not with SigV4.",
                ));
            };
            let ttl = f.get("TtlSeconds").and_then(Value::as_u64).map(std::time::Duration::from_secs);
            Ok(issued_cert_json(&kms.renew_certificate(&caller, serial, ttl)?))
        }
        other => Err(ApiError::new(400, "UnknownOperationException", format!("unknown custody operation {other:?}"))),
    }
}

fn principal_name(f: &Fields, field: &str) -> Result<PrincipalName, ApiError> {
    let name = f.required_str(field)?;
    PrincipalName::parse(name).ok_or_else(|| {
        KmsError::validation(field, "a principal name is 1-64 letters, digits and . _ - (not starting with a dot)")
            .into()
    })
}

fn roles(f: &Fields) -> Result<Option<Vec<custody_kms::Role>>, ApiError> {
    if f.get("Roles").is_none() {
        return Ok(None);
    }
    f.string_list("Roles")?
        .iter()
        .map(|r| {
            custody_kms::Role::parse(r).ok_or_else(|| {
                KmsError::validation(
                    "roles",
                    format!("{r:?} is not a role: tenant-admin, key-admin, key-user, auditor, security-officer"),
                )
                .into()
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()
        .map(Some)
}

fn certificate_action(kms: &Kms, caller: &Caller, action: &str, f: &Fields) -> Result<Value, ApiError> {
    Ok(match action {
        "ListCertificates" => json!({ "Certificates": kms.list_certificates(caller)? }),
        "RotateCa" => {
            let step = match f.required_str("Step")? {
                "start" => custody_kms::CaRotation::Start,
                "finish" => custody_kms::CaRotation::Finish,
                "retire" => custody_kms::CaRotation::RetirePrevious,
                _ => return Err(KmsError::validation("step", "Member must be one of: start, finish, retire").into()),
            };
            json!({ "CertificateAuthorities": kms.rotate_ca(caller, step)?, "TrustBundle": kms.trust_bundle()? })
        }
        "RevokeCertificate" => {
            let target = match (f.get("Serial").and_then(Value::as_str), f.get("Principal")) {
                (Some(serial), None) => custody_kms::RevokeTarget::Serial(serial.to_string()),
                (None, Some(_)) => custody_kms::RevokeTarget::Principal(principal_name(f, "Principal")?),
                _ => return Err(KmsError::validation("Serial", "give exactly one of Serial and Principal").into()),
            };
            json!({ "Revoked": kms.revoke_certificates(caller, &target)? })
        }
        "IssueServerCertificate" => {
            let ttl = f.get("TtlSeconds").and_then(Value::as_u64).map(std::time::Duration::from_secs);
            let (ca_pem, cert) = kms.issue_server_certificate(caller, &f.string_list("Names")?, ttl)?;
            let key = std::str::from_utf8(cert.key_pem.expose_secret()).expect("PEM is text");
            json!({
                "Certificate": cert.cert_pem,
                "PrivateKey": key,
                "CaCertificate": ca_pem,
                "Serial": cert.serial,
                "NotAfter": cert.not_after.unix_timestamp(),
            })
        }
        other => {
            return Err(ApiError::new(400, "UnknownOperationException", format!("unknown custody operation {other:?}")))
        }
    })
}

fn issued_cert_json(c: &custody_kms::IssuedClientCert) -> Value {
    let key = std::str::from_utf8(c.key_pem.expose_secret()).expect("PEM is text");
    json!({ "Certificate": c.cert_pem, "PrivateKey": key, "CaCertificate": c.ca_pem, "Serial": c.serial, "NotAfter": c.not_after })
}

fn access_action(kms: &Kms, caller: &Caller, action: &str, f: &Fields) -> Result<Value, ApiError> {
    let context = |f: &Fields| -> Result<Option<BTreeMap<String, String>>, ApiError> {
        Ok(match f.get("EncryptionContext") {
            None => None,
            Some(_) => Some(f.context("EncryptionContext")?.pairs().clone()),
        })
    };
    Ok(match action {
        "CreateTenant" => {
            let id = f
                .optional_str("TenantId")?
                .map(|t| {
                    custody_kms::TenantId::parse(t)
                        .ok_or_else(|| KmsError::validation("tenantId", "a tenant id is 12 digits"))
                })
                .transpose()?;
            let admin = principal_name(f, "AdminName")?;
            let (tenant, cert) = kms.create_tenant(caller, id, f.optional_str("Name")?.unwrap_or("tenant"), &admin)?;
            let mut v = json!({ "Tenant": tenant, "Admin": admin.as_str() });
            // Moved in: `json!` would clone the certificate's private key and drop it unwiped.
            v["AdminCertificate"] = issued_cert_json(&cert);
            v
        }
        "ListTenants" => json!({ "Tenants": kms.list_tenants(caller)? }),
        "CreatePrincipal" => {
            let name = principal_name(f, "Name")?;
            json!({ "Principal": kms.create_principal(caller, &name, roles(f)?.unwrap_or_default())? })
        }
        "ListPrincipals" => json!({ "Principals": kms.list_principals(caller)? }),
        "DescribePrincipal" => json!({ "Principal": kms.describe_principal(caller, &principal_name(f, "Name")?)? }),
        "UpdatePrincipal" => {
            let name = principal_name(f, "Name")?;
            json!({ "Principal": kms.update_principal(caller, &name, f.optional_bool("Enabled")?, roles(f)?)? })
        }
        "DeletePrincipal" => {
            kms.delete_principal(caller, &principal_name(f, "Name")?)?;
            json!({})
        }
        "IssueCertificate" => {
            let ttl = f.get("TtlSeconds").and_then(Value::as_u64).map(std::time::Duration::from_secs);
            issued_cert_json(&kms.issue_certificate(caller, &principal_name(f, "Name")?, ttl)?)
        }
        "WhoCan" => {
            let entries = kms.who_can(caller, &f.key_ref("KeyId")?, f.required_str("Action")?, context(f)?.as_ref())?;
            json!({ "Principals": entries })
        }
        "ExplainAccess" => {
            let e = kms.explain(
                caller,
                f.required_str("Principal")?,
                f.required_str("Action")?,
                &f.key_ref("KeyId")?,
                context(f)?.as_ref(),
            )?;
            serde_json::to_value(e).expect("serializable")
        }
        other => {
            return Err(ApiError::new(400, "UnknownOperationException", format!("unknown custody operation {other:?}")))
        }
    })
}

fn access_key_action(kms: &Kms, caller: &Caller, action: &str, f: &Fields) -> Result<Value, ApiError> {
    let principal = f
        .optional_str("Principal")?
        .map(|p| PrincipalName::parse(p).ok_or_else(|| KmsError::validation("principal", "not a valid principal name")))
        .transpose()?;
    Ok(match action {
        "CreateAccessKey" => {
            let key = kms.create_access_key(caller, principal)?;
            let secret = std::str::from_utf8(key.secret.expose_secret()).expect("secrets are base64 text");
            json!({ "AccessKey": { "AccessKeyId": key.id, "SecretAccessKey": secret, "Principal": key.principal.as_str(), "Status": "Active" } })
        }
        "ListAccessKeys" => json!({ "AccessKeys": kms.list_access_keys(caller, principal.as_ref())? }),
        "UpdateAccessKey" => {
            let active = match f.required_str("Status")? {
                "Active" => true,
                "Inactive" => false,
                other => {
                    return Err(
                        KmsError::validation("status", format!("must be Active or Inactive, got {other}")).into()
                    )
                }
            };
            kms.update_access_key(caller, f.required_str("AccessKeyId")?, active)?;
            json!({})
        }
        "DeleteAccessKey" => {
            kms.delete_access_key(caller, f.required_str("AccessKeyId")?)?;
            json!({})
        }
        other => {
            return Err(ApiError::new(400, "UnknownOperationException", format!("unknown custody operation {other:?}")))
        }
    })
}

fn status_json(kms: &Kms) -> Result<Value, KmsError> {
    let s = kms.status()?;
    Ok(json!({
        "Sealed": s.sealed,
        "SealType": s.seal_type,
        "Threshold": s.threshold,
        "Shares": s.shares,
        "Progress": s.progress,
        "StoreId": s.store_id,
        "RootGeneration": s.root_generation,
        "RootRotating": s.root_rotating,
        "AuditFailing": kms.audit_health().failing,
        "Alerts": kms.audit_health().alerts,
        "AuditDisabled": kms.audit_health().disabled,
        "Version": env!("CARGO_PKG_VERSION"),
    }))
}

fn kms_action(kms: &Kms, caller: &Caller, action: &str, f: &Fields) -> Result<Value, ApiError> {
    let v = match action {
        "CreateKey" => {
            let spec_name =
                f.optional_str("KeySpec")?.or(f.optional_str("CustomerMasterKeySpec")?).unwrap_or("SYMMETRIC_DEFAULT");
            let spec = KeySpec::parse(spec_name).ok_or_else(|| {
                ApiError::new(
                    400,
                    "UnsupportedOperationException",
                    format!("KeySpec {spec_name} is not supported by custody yet; use SYMMETRIC_DEFAULT or HMAC_224/256/384/512"),
                )
            })?;
            match (f.optional_str("KeyUsage")?, spec.usage()) {
                (None, "ENCRYPT_DECRYPT") => {}
                (Some(given), expected) if given == expected => {}
                (given, expected) => {
                    let got = given.unwrap_or("none");
                    return Err(KmsError::validation(
                        "keyUsage",
                        format!("a {spec_name} key needs KeyUsage {expected}, got {got}"),
                    )
                    .into());
                }
            }
            if let Some(origin) = f.optional_str("Origin")? {
                if origin != "AWS_KMS" {
                    return Err(ApiError::new(
                        400,
                        "UnsupportedOperationException",
                        format!("Origin {origin} is not supported; only AWS_KMS"),
                    ));
                }
            }
            if f.optional_bool("MultiRegion")? == Some(true) {
                return Err(ApiError::new(400, "UnsupportedOperationException", "multi-Region keys are not supported"));
            }
            if f.0.contains_key("CustomKeyStoreId") || f.0.contains_key("XksKeyId") {
                return Err(ApiError::new(400, "UnsupportedOperationException", "custom key stores are not supported"));
            }
            let req = CreateKeyRequest {
                description: f.optional_str("Description")?.unwrap_or_default().to_string(),
                tags: f.tags("Tags")?,
                spec: Some(spec),
                policy: f.optional_str("Policy")?.map(str::to_string),
            };
            json!({ "KeyMetadata": kms.create_key(caller, req)? })
        }
        "DescribeKey" => json!({ "KeyMetadata": kms.describe_key(caller, &f.key_ref("KeyId")?)? }),
        "ListKeys" => {
            let page = kms.list_keys(caller, f.limit()?, f.optional_str("Marker")?)?;
            page_json("Keys", page, |e| serde_json::to_value(e).expect("serializable"))
        }
        "EnableKey" => empty(kms.enable_key(caller, &f.key_ref("KeyId")?)?),
        "DisableKey" => empty(kms.disable_key(caller, &f.key_ref("KeyId")?)?),
        "ScheduleKeyDeletion" => {
            let days = f.optional_u32("PendingWindowInDays")?;
            serde_json::to_value(kms.schedule_key_deletion(caller, &f.key_ref("KeyId")?, days)?).expect("serializable")
        }
        "CancelKeyDeletion" => json!({ "KeyId": kms.cancel_key_deletion(caller, &f.key_ref("KeyId")?)? }),
        "UpdateKeyDescription" => {
            let description = f.required_str("Description")?.to_string();
            empty(kms.update_key_description(caller, &f.key_ref("KeyId")?, description)?)
        }
        "EnableKeyRotation" => {
            let period = f.optional_u32("RotationPeriodInDays")?;
            empty(kms.enable_key_rotation(caller, &f.key_ref("KeyId")?, period)?)
        }
        "DisableKeyRotation" => empty(kms.disable_key_rotation(caller, &f.key_ref("KeyId")?)?),
        "GetKeyRotationStatus" => {
            serde_json::to_value(kms.get_key_rotation_status(caller, &f.key_ref("KeyId")?)?).expect("serializable")
        }
        "RotateKeyOnDemand" => json!({ "KeyId": kms.rotate_key_on_demand(caller, &f.key_ref("KeyId")?)? }),
        "ListKeyRotations" => {
            let page = kms.list_key_rotations(caller, &f.key_ref("KeyId")?, f.limit()?, f.optional_str("Marker")?)?;
            page_json("Rotations", page, |e| serde_json::to_value(e).expect("serializable"))
        }
        "TagResource" => empty(kms.tag_resource(caller, &f.key_ref("KeyId")?, f.tags("Tags")?)?),
        "UntagResource" => {
            let keys = f.string_list("TagKeys")?;
            empty(kms.untag_resource(caller, &f.key_ref("KeyId")?, &keys)?)
        }
        "ListResourceTags" => {
            let page = kms.list_resource_tags(caller, &f.key_ref("KeyId")?, f.limit()?, f.optional_str("Marker")?)?;
            page_json("Tags", page, |(k, v)| json!({ "TagKey": k, "TagValue": v }))
        }
        "CreateAlias" => empty(kms.create_alias(caller, &f.alias("AliasName")?, &f.key_ref("TargetKeyId")?)?),
        "UpdateAlias" => empty(kms.update_alias(caller, &f.alias("AliasName")?, &f.key_ref("TargetKeyId")?)?),
        "DeleteAlias" => empty(kms.delete_alias(caller, &f.alias("AliasName")?)?),
        "ListAliases" => {
            let key = f.optional_str("KeyId")?.map(|s| KeyRef::parse(s, "keyId")).transpose()?;
            let page = kms.list_aliases(caller, key.as_ref(), f.limit()?, f.optional_str("Marker")?)?;
            page_json("Aliases", page, |e| serde_json::to_value(e).expect("serializable"))
        }
        "Encrypt" => {
            f.symmetric_only("EncryptionAlgorithm")?;
            f.no_recipient()?;
            let plaintext = f.secret_blob("Plaintext")?;
            let out = kms.encrypt(caller, &f.key_ref("KeyId")?, &plaintext, &f.context("EncryptionContext")?)?;
            json!({ "CiphertextBlob": B64.encode(&out.ciphertext_blob), "KeyId": out.key_arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" })
        }
        "Decrypt" => {
            f.symmetric_only("EncryptionAlgorithm")?;
            f.no_recipient()?;
            let blob = f.blob("CiphertextBlob")?;
            let key = f.optional_str("KeyId")?.map(|s| KeyRef::parse(s, "keyId")).transpose()?;
            let out = kms.decrypt(caller, &blob, &f.context("EncryptionContext")?, key.as_ref())?;
            let mut v = json!({ "KeyId": out.key_arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT" });
            // Moved in, not copied: `json!` would clone a string and drop the original unwiped.
            v["Plaintext"] = Value::String(B64.encode(out.plaintext.expose_secret()));
            v
        }
        "ReEncrypt" => {
            f.symmetric_only("SourceEncryptionAlgorithm")?;
            f.symmetric_only("DestinationEncryptionAlgorithm")?;
            let blob = f.blob("CiphertextBlob")?;
            let source = f.optional_str("SourceKeyId")?.map(|s| KeyRef::parse(s, "sourceKeyId")).transpose()?;
            let out = kms.re_encrypt(
                caller,
                &blob,
                &f.context("SourceEncryptionContext")?,
                source.as_ref(),
                &f.key_ref("DestinationKeyId")?,
                &f.context("DestinationEncryptionContext")?,
            )?;
            json!({
                "CiphertextBlob": B64.encode(&out.ciphertext_blob),
                "SourceKeyId": out.source_key_arn,
                "KeyId": out.key_arn,
                "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            })
        }
        "GenerateDataKey" | "GenerateDataKeyWithoutPlaintext" => {
            let with_plaintext = action == "GenerateDataKey";
            if with_plaintext {
                f.no_recipient()?;
            }
            let len = f.data_key_len()?;
            let out = kms.generate_data_key(
                caller,
                &f.key_ref("KeyId")?,
                len,
                &f.context("EncryptionContext")?,
                with_plaintext,
            )?;
            let mut v = json!({ "CiphertextBlob": B64.encode(&out.ciphertext_blob), "KeyId": out.key_arn });
            if let Some(pt) = out.plaintext {
                v["Plaintext"] = Value::String(B64.encode(pt.expose_secret()));
            }
            v
        }
        "GenerateRandom" => {
            f.no_recipient()?;
            if f.0.contains_key("CustomKeyStoreId") {
                return Err(ApiError::new(400, "UnsupportedOperationException", "custom key stores are not supported"));
            }
            let n = f
                .optional_u32("NumberOfBytes")?
                .ok_or_else(|| KmsError::validation("numberOfBytes", "Member must not be null"))?;
            let mut v = json!({});
            v["Plaintext"] = Value::String(B64.encode(kms.generate_random(caller, n as usize)?.expose_secret()));
            v
        }
        "GenerateMac" => {
            let alg = f.required_str("MacAlgorithm")?;
            let (mac, arn) = kms.generate_mac(caller, &f.key_ref("KeyId")?, &f.blob("Message")?, alg)?;
            json!({ "Mac": B64.encode(mac), "MacAlgorithm": alg, "KeyId": arn })
        }
        "VerifyMac" => {
            let alg = f.required_str("MacAlgorithm")?;
            let arn = kms.verify_mac(caller, &f.key_ref("KeyId")?, &f.blob("Message")?, &f.blob("Mac")?, alg)?;
            json!({ "KeyId": arn, "MacValid": true, "MacAlgorithm": alg })
        }
        "GetKeyPolicy" => {
            let policy = kms.get_key_policy(caller, &f.key_ref("KeyId")?, f.optional_str("PolicyName")?)?;
            json!({ "Policy": policy, "PolicyName": "default" })
        }
        "PutKeyPolicy" => {
            let policy = f.required_str("Policy")?.to_string();
            empty(kms.put_key_policy(caller, &f.key_ref("KeyId")?, f.optional_str("PolicyName")?, policy)?)
        }
        "ListKeyPolicies" => {
            json!({ "PolicyNames": kms.list_key_policies(caller, &f.key_ref("KeyId")?)?, "Truncated": false })
        }
        "CreateGrant" => {
            let req = CreateGrantRequest {
                grantee: f.required_str("GranteePrincipal")?.to_string(),
                retiring: f.optional_str("RetiringPrincipal")?.map(str::to_string),
                operations: f.string_list("Operations")?,
                constraints: f.get("Constraints").cloned(),
                name: f.optional_str("Name")?.map(str::to_string),
            };
            let (token, id) = kms.create_grant(caller, &f.key_ref("KeyId")?, req)?;
            json!({ "GrantToken": token, "GrantId": id })
        }
        "ListGrants" => {
            let page = kms.list_grants(
                caller,
                &f.key_ref("KeyId")?,
                f.optional_str("GrantId")?,
                f.optional_str("GranteePrincipal")?,
                f.limit()?,
                f.optional_str("Marker")?,
            )?;
            page_json("Grants", page, |g| g)
        }
        "ListRetirableGrants" => {
            let retiring = f.required_str("RetiringPrincipal")?;
            let page = kms.list_retirable_grants(caller, retiring, f.limit()?, f.optional_str("Marker")?)?;
            page_json("Grants", page, |g| g)
        }
        "RetireGrant" => {
            let key = f.optional_str("KeyId")?.map(|s| KeyRef::parse(s, "keyId")).transpose()?;
            empty(kms.retire_grant(caller, f.optional_str("GrantToken")?, key.as_ref(), f.optional_str("GrantId")?)?)
        }
        "RevokeGrant" => empty(kms.revoke_grant(caller, &f.key_ref("KeyId")?, f.required_str("GrantId")?)?),
        other if UNSUPPORTED_AWS_ACTIONS.contains(&other) => {
            return Err(ApiError::new(
                400,
                "UnsupportedOperationException",
                format!("custody does not support {other} yet"),
            ))
        }
        other => return Err(ApiError::new(400, "UnknownOperationException", format!("unknown operation {other:?}"))),
    };
    Ok(v)
}

fn empty(_: ()) -> Value {
    json!({})
}

fn page_json<T>(name: &str, page: Page<T>, item: impl Fn(T) -> Value) -> Value {
    let mut v =
        json!({ name: page.items.into_iter().map(item).collect::<Vec<_>>(), "Truncated": page.next_marker.is_some() });
    if let Some(m) = page.next_marker {
        v["NextMarker"] = Value::String(m);
    }
    v
}

/// A request body's fields, with typed accessors whose errors name the field as AWS does.
pub struct Fields(Map<String, Value>);

impl Drop for Fields {
    /// A request's strings hold plaintext (Encrypt), unseal shares and other secrets.
    fn drop(&mut self) {
        self.0.values_mut().for_each(wipe_strings);
    }
}

impl std::fmt::Debug for Fields {
    /// Field names only: a body may carry plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Fields {
    /// Parses a request body: empty, or one JSON object. Anything else is a
    /// `SerializationException`.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(Map::new()));
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(Self(m)),
            Ok(mut other) => {
                wipe_strings(&mut other);
                Err(ApiError::serialization("the request body must be a JSON object"))
            }
            Err(e) => Err(ApiError::serialization(format!("the request body is not valid JSON: {e}"))),
        }
    }

    /// What the audit record says about this body, sent to `target`: the keys it names, the
    /// version a ciphertext names and the encryption contexts (bounded; never the plaintext or
    /// the blob itself).
    pub fn audit_hints(&self, target: &str) -> AuditHints {
        let m = &self.0;
        let reencrypt = target == "TrentService.ReEncrypt";
        // The key the body names, else the ciphertext's (a ReEncrypt's source); the version the
        // ciphertext names, if it is that key's (the service notes the version it uses, which
        // replaces this).
        let named = if reencrypt { named_key(m, &["SourceKeyId"]) } else { named_key(m, &["KeyId", "TargetKeyId"]) };
        let (key, version) = match (named, blob_key(m)) {
            (Some(named), Some((id, v)))
                if named == id || named.strip_suffix(&id).is_some_and(|n| n.ends_with(":key/")) =>
            {
                (Some(named), Some(v))
            }
            (Some(named), _) => (Some(named), None),
            (None, Some((id, v))) => (Some(id), Some(v)),
            (None, None) => (None, None),
        };
        if reencrypt {
            AuditHints {
                key: named_key(m, &["DestinationKeyId"]),
                key_version: None,
                source_key: key,
                source_key_version: version,
                context: context_hint(m, "DestinationEncryptionContext"),
                source_context: context_hint(m, "SourceEncryptionContext"),
            }
        } else {
            AuditHints {
                key,
                key_version: version,
                source_key: None,
                source_key_version: None,
                context: context_hint(m, "EncryptionContext"),
                source_context: None,
            }
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn optional_str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::serialization(format!("{name} must be a string"))),
        }
    }

    fn required_str(&self, name: &str) -> Result<&str, ApiError> {
        self.optional_str(name)?
            .ok_or_else(|| KmsError::validation(&lower_first(name), "Member must not be null").into())
    }

    fn optional_u32(&self, name: &str) -> Result<Option<u32>, ApiError> {
        self.optional_u64(name)?
            .map(|n| {
                u32::try_from(n).map_err(|_| {
                    KmsError::validation(&lower_first(name), "Member must be a non-negative integer").into()
                })
            })
            .transpose()
    }

    fn optional_u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                KmsError::validation(&lower_first(name), "Member must be a non-negative integer").into()
            }),
            Some(_) => Err(ApiError::serialization(format!("{name} must be a number"))),
        }
    }

    fn optional_bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::serialization(format!("{name} must be a boolean"))),
        }
    }

    fn limit(&self) -> Result<Option<usize>, ApiError> {
        Ok(self.optional_u32("Limit")?.map(|n| n as usize))
    }

    fn key_ref(&self, name: &str) -> Result<KeyRef, ApiError> {
        Ok(KeyRef::parse(self.required_str(name)?, &lower_first(name))?)
    }

    fn alias(&self, name: &str) -> Result<AliasName, ApiError> {
        Ok(AliasName::parse(self.required_str(name)?)?)
    }

    fn blob(&self, name: &str) -> Result<Vec<u8>, ApiError> {
        let s = self.required_str(name)?;
        if s.len() > 16 * 1024 {
            return Err(
                KmsError::validation(&lower_first(name), "Member must have length less than or equal to 6144").into()
            );
        }
        B64.decode(s).map_err(|_| ApiError::serialization(format!("{name} is not valid base64")))
    }

    fn secret_blob(&self, name: &str) -> Result<SecretBytes, ApiError> {
        Ok(SecretBytes::new(self.blob(name)?))
    }

    fn context(&self, name: &str) -> Result<EncryptionContext, ApiError> {
        let Some(v) = self.get(name) else { return Ok(EncryptionContext::empty()) };
        let Value::Object(m) = v else {
            return Err(ApiError::serialization(format!("{name} must be a map of strings")));
        };
        let mut pairs = BTreeMap::new();
        for (k, v) in m {
            let Value::String(s) = v else {
                return Err(ApiError::serialization(format!("{name} values must be strings")));
            };
            pairs.insert(k.clone(), s.clone());
        }
        EncryptionContext::new(pairs).map_err(|e| KmsError::validation(&lower_first(name), e.to_string()).into())
    }

    fn tags(&self, name: &str) -> Result<BTreeMap<String, String>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(BTreeMap::new()) };
        let Value::Array(items) = v else { return Err(ApiError::serialization(format!("{name} must be a list"))) };
        let mut tags = BTreeMap::new();
        for item in items {
            let key = item.get("TagKey").and_then(Value::as_str);
            let value = item.get("TagValue").and_then(Value::as_str);
            match (key, value) {
                (Some(k), Some(v)) => {
                    tags.insert(k.to_string(), v.to_string());
                }
                _ => return Err(KmsError::validation("tags", "every tag needs a TagKey and a TagValue string").into()),
            }
        }
        Ok(tags)
    }

    fn string_list(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let Some(Value::Array(items)) = self.get(name) else {
            return Err(KmsError::validation(&lower_first(name), "Member must not be null").into());
        };
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::serialization(format!("{name} must be a list of strings")))
            })
            .collect()
    }

    fn data_key_len(&self) -> Result<usize, ApiError> {
        match (self.optional_str("KeySpec")?, self.optional_u32("NumberOfBytes")?) {
            (Some(_), Some(_)) => {
                Err(KmsError::validation("keySpec", "specify either KeySpec or NumberOfBytes, not both").into())
            }
            (Some("AES_256"), None) => Ok(32),
            (Some("AES_128"), None) => Ok(16),
            (Some(other), None) => Err(KmsError::validation(
                "keySpec",
                format!("Member must satisfy enum value set: [AES_256, AES_128]; got {other}"),
            )
            .into()),
            (None, Some(n)) => Ok(n as usize),
            (None, None) => Err(KmsError::validation("keySpec", "specify either KeySpec or NumberOfBytes").into()),
        }
    }

    fn symmetric_only(&self, name: &str) -> Result<(), ApiError> {
        match self.optional_str(name)? {
            None | Some("SYMMETRIC_DEFAULT") => Ok(()),
            Some(other) => Err(KmsError::validation(
                &lower_first(name),
                format!("{other} is not valid for a symmetric key; use SYMMETRIC_DEFAULT"),
            )
            .into()),
        }
    }

    fn no_recipient(&self) -> Result<(), ApiError> {
        if self.0.contains_key("Recipient") {
            return Err(ApiError::new(
                400,
                "UnsupportedOperationException",
                "Recipient (Nitro Enclaves attestation) is not supported",
            ));
        }
        if self.optional_bool("DryRun")? == Some(true) {
            return Err(ApiError::new(400, "UnsupportedOperationException", "DryRun is not supported"));
        }
        Ok(())
    }
}

/// AWS names fields in validation messages with a lowercase first letter.
fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_lowercase().chain(c).collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_chars_keeps_at_most_max_characters() {
        for (s, max) in [("", 3), ("abc", 3), ("abcd", 3), ("ééé", 2), ("ééé", 3), ("aé", 5), ("日本語テキスト", 4)]
        {
            assert_eq!(first_chars(s, max), s.chars().take(max).collect::<String>(), "{s:?} {max}");
        }
    }

    #[test]
    fn only_failures_and_the_sealed_actions_go_unrecorded_while_sealed() {
        use super::unrecorded_while_sealed;
        assert!(unrecorded_while_sealed("Custody.GetStatus", true));
        assert!(unrecorded_while_sealed("Custody.Unseal", true));
        assert!(unrecorded_while_sealed("TrentService.Decrypt", false));
        for action in ["TrentService.Decrypt", "TrentService.Encrypt", "TrentService.GenerateDataKey", "-"] {
            assert!(!unrecorded_while_sealed(action, true), "{action}");
        }
    }

    use super::*;

    /// A blob's header as base64 (the hints read only its first 21 bytes), with a tail.
    fn blob(id: [u8; 16], version: u32) -> String {
        let mut b = vec![custody_crypto::blob::FORMAT_V1];
        b.extend_from_slice(&id);
        b.extend_from_slice(&version.to_be_bytes());
        b.extend_from_slice(&[0u8; 48]);
        B64.encode(b)
    }

    #[test]
    fn audit_hints_name_the_keys_and_the_version_a_ciphertext_names() {
        let (id, other) = ([7u8; 16], [9u8; 16]);
        let (text, other_text) =
            (custody_kms::KeyId::from_bytes(id).to_string(), custody_kms::KeyId::from_bytes(other).to_string());
        let arn = format!("arn:aws:kms:us-east-1:111122223333:key/{text}");
        let hints = |target: &str, body: Value| Fields::parse(body.to_string().as_bytes()).unwrap().audit_hints(target);

        // Decrypt: the blob's key and version; a KeyId naming that key (id or ARN) keeps the
        // version; one naming another key or an alias does not claim it.
        let h =
            hints("TrentService.Decrypt", json!({ "CiphertextBlob": blob(id, 3), "EncryptionContext": { "a": "b" } }));
        assert_eq!((h.key.as_deref(), h.key_version), (Some(text.as_str()), Some(3)));
        assert_eq!(h.context.unwrap()["a"], "b");
        for (named, version) in
            [(text.as_str(), Some(3)), (arn.as_str(), Some(3)), (other_text.as_str(), None), ("alias/x", None)]
        {
            let h = hints("TrentService.Decrypt", json!({ "CiphertextBlob": blob(id, 3), "KeyId": named }));
            assert_eq!((h.key.as_deref(), h.key_version), (Some(named), version), "{named}");
        }
        // Encrypt: the key named; the version is the one the service uses (not in the body).
        let h = hints("TrentService.Encrypt", json!({ "KeyId": "alias/x", "Plaintext": "eA==" }));
        assert_eq!((h.key.as_deref(), h.key_version, h.source_key), (Some("alias/x"), None, None));

        // ReEncrypt: the destination is the key; the source is the blob's, with its version and
        // context, or the SourceKeyId named.
        let body = json!({
            "CiphertextBlob": blob(other, 2),
            "SourceEncryptionContext": { "s": "1" },
            "DestinationKeyId": arn,
            "DestinationEncryptionContext": { "d": "2" },
        });
        let h = hints("TrentService.ReEncrypt", body.clone());
        assert_eq!((h.key.as_deref(), h.key_version), (Some(arn.as_str()), None));
        assert_eq!((h.source_key.as_deref(), h.source_key_version), (Some(other_text.as_str()), Some(2)));
        assert_eq!((h.context.unwrap()["d"].as_str(), h.source_context.unwrap()["s"].as_str()), ("2", "1"));
        let mut named = body;
        named["SourceKeyId"] = json!("alias/source");
        let h = hints("TrentService.ReEncrypt", named);
        assert_eq!((h.source_key.as_deref(), h.source_key_version), (Some("alias/source"), None));
        // Another action's body with ReEncrypt's fields does not pass for one.
        let h = hints(
            "TrentService.Encrypt",
            json!({ "KeyId": "k", "DestinationKeyId": "d", "SourceEncryptionContext": {} }),
        );
        assert_eq!((h.key.as_deref(), h.source_key, h.source_context), (Some("k"), None, None));
    }

    #[test]
    fn every_service_error_has_one_aws_name() {
        let cases: Vec<(KmsError, u16, &str)> = vec![
            (KmsError::Sealed, 503, "ServiceUnavailableException"),
            (KmsError::Disabled("k".into()), 400, "DisabledException"),
            (KmsError::InvalidState("k".into()), 400, "KMSInvalidStateException"),
            (KmsError::InvalidCiphertext, 400, "InvalidCiphertextException"),
            (KmsError::NotFound("k".into()), 400, "NotFoundException"),
            (KmsError::validation("plaintext", "x"), 400, "ValidationException"),
            (KmsError::Integrity("keys/x".into()), 500, "KMSInternalException"),
        ];
        for (e, status, code) in cases {
            let api = ApiError::from(e);
            assert_eq!((api.status, api.code), (status, code));
        }
        let internal = ApiError::from(KmsError::Internal("disk /var/secret failed".into()));
        assert!(!internal.message.contains("secret"), "5xx bodies are generic");
    }

    #[test]
    fn malformed_bodies_are_serialization_errors() {
        for body in [&b"{"[..], b"[1]", b"\"x\""] {
            assert_eq!(Fields::parse(body).err().unwrap().code, "SerializationException");
        }
        assert!(Fields::parse(b"").is_ok());
        let f = Fields::parse(br#"{"KeyId": 5, "Limit": -1, "EncryptionContext": {"a": 1}}"#).unwrap();
        assert_eq!(f.key_ref("KeyId").unwrap_err().code, "SerializationException");
        assert_eq!(f.limit().unwrap_err().code, "ValidationException");
        assert_eq!(f.context("EncryptionContext").unwrap_err().code, "SerializationException");
        let e = f.required_str("Missing").unwrap_err();
        assert!(e.message.contains("'missing'"), "{}", e.message);
    }
}
