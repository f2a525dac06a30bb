//! The audit trail: one durable record per request (DESIGN.md §7, step 5 of the pipeline).
//!
//! Records are sealed rows in [`Table::Audit`], keyed by a gap-free sequence number. This is the
//! foundation: the audit issue adds the hash chain, signed checkpoints, HMAC'd encryption context
//! values, group commit and query/export on top of the same records.

use std::sync::Mutex;

use custody_store::{Expect, StoreError, Table};
use serde::{Deserialize, Serialize};

use crate::authz::{act, authorize, Caller};
use crate::error::KmsError;
use crate::model::{now_ms, Millis};
use crate::Kms;

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
    /// Outcome.
    pub outcome: Outcome,
    /// AWS error name returned, if any.
    pub error_code: Option<String>,
    /// Internal detail of a failure (e.g. which row failed its integrity check); never shown to
    /// the caller.
    pub detail: Option<String>,
    /// Time to answer, in milliseconds.
    pub duration_ms: u64,
}

/// A stored record: the event and its sequence number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the trail, from 1, without gaps.
    pub seq: u64,
    /// When it was written.
    pub written_at: Millis,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Next sequence number, learned from the store on first use.
#[derive(Debug, Default)]
pub(crate) struct Sequencer(Mutex<Option<u64>>);

fn row_key(seq: u64) -> String {
    format!("{seq:020}")
}

impl Kms {
    /// Writes one audit record durably. Fails (and the caller must not report success) if it
    /// cannot be written; fails with [`KmsError::Sealed`] while sealed, when only the server log
    /// can record the request.
    pub fn record_audit(&self, event: AuditEvent) -> Result<u64, KmsError> {
        let u = self.unsealed()?;
        let mut next = self.audit_seq.0.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..8 {
            let seq = match *next {
                Some(n) => n,
                None => match u.barrier.backend().last(Table::Audit)? {
                    Some(row) => {
                        row.key.parse::<u64>().map_err(|_| KmsError::Integrity(format!("audit/{}", row.key)))? + 1
                    }
                    None => 1,
                },
            };
            let record = AuditRecord { seq, written_at: now_ms(), event: event.clone() };
            match u.barrier.apply(&[u.barrier.put(Table::Audit, &row_key(seq), &record, Expect::Absent)]) {
                Ok(()) => {
                    *next = Some(seq + 1);
                    return Ok(seq);
                }
                // Another writer took this number: learn the new end and try again.
                Err(StoreError::Conflict { .. }) => *next = None,
                Err(e) => {
                    *next = None;
                    return Err(e.into());
                }
            }
        }
        Err(KmsError::Internal("could not allocate an audit sequence number".into()))
    }

    /// Audit records of the caller's account after sequence number `after`, oldest first, at most
    /// `limit` (1–1000) records examined.
    pub fn query_audit(&self, caller: &Caller, after: u64, limit: usize) -> Result<Vec<AuditRecord>, KmsError> {
        let _proof = authorize::<act::ReadAudit>(caller, None)?;
        if !(1..=1000).contains(&limit) {
            return Err(KmsError::validation("limit", "Member must have value between 1 and 1000"));
        }
        let arn_prefix = format!("arn:aws:iam::{}:", caller.tenant());
        let identity_prefix = format!("spiffe://custody/{}/", caller.tenant());
        // Records of requests from this account; unauthenticated ones belong to no account and
        // are visible only through the server's own tooling for now.
        Ok(self
            .audit_records(after, limit)?
            .into_iter()
            .filter(|r| {
                r.event.principal.as_deref().is_some_and(|p| p.starts_with(&arn_prefix))
                    || r.event.tls_identity.as_deref().is_some_and(|t| t.starts_with(&identity_prefix))
            })
            .collect())
    }

    /// Audit records after sequence number `after`, oldest first, at most `limit`.
    pub fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>, KmsError> {
        let u = self.unsealed()?;
        let from = (after > 0).then(|| row_key(after));
        Ok(u.barrier
            .scan::<AuditRecord>(Table::Audit, "", from.as_deref(), limit)?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }
}
