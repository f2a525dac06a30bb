//! Key policies and grants: stored, validated, listed with AWS semantics, and enforced by
//! `access.rs` (a policy statement or a grant must open every action on a key).

use custody_crypto::random;
use custody_store::{Expect, Table, Versioned};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::authz::{act, Caller};
use crate::error::KmsError;
use crate::ids::{KeyId, KeyRef};
use crate::model::{aws_time, now_ms, Millis};
use crate::ops::Page;
use crate::Kms;

/// The only policy name AWS KMS has.
pub const POLICY_NAME: &str = "default";
/// Largest key policy document (AWS: 32 KiB).
pub const MAX_POLICY_BYTES: usize = 32 * 1024;
/// Operations a grant may allow (AWS's list).
pub const GRANT_OPERATIONS: &[&str] = &[
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GetPublicKey",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// Checks a policy document: at most 32 KiB, and everything in it is something custody
/// evaluates as written (see [`crate::policy::Policy::parse`]).
pub fn validate_policy(policy: &str) -> Result<crate::policy::Policy, KmsError> {
    if policy.len() > MAX_POLICY_BYTES {
        return Err(KmsError::validation(
            "policy",
            format!("Member must have length less than or equal to {MAX_POLICY_BYTES}"),
        ));
    }
    crate::policy::Policy::parse(policy)
        .map_err(|e| KmsError::MalformedPolicy(format!("The key policy is malformed: {}", e.0)))
}

/// Stored grant. No `Debug`: the token is a bearer credential.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct GrantRecord {
    pub(crate) id: String,
    pub(crate) key_id: KeyId,
    /// Only ever stored inside a sealed row.
    token: String,
    name: Option<String>,
    pub(crate) grantee: String,
    retiring: Option<String>,
    pub(crate) operations: Vec<String>,
    pub(crate) constraints: Option<Value>,
    issuing_account: String,
    created_at: Millis,
}

/// What CreateGrant takes.
#[derive(Debug, Clone, Default)]
pub struct CreateGrantRequest {
    /// Principal the grant is for.
    pub grantee: String,
    /// Principal that may retire it.
    pub retiring: Option<String>,
    /// Allowed operations.
    pub operations: Vec<String>,
    /// Encryption-context constraints (kept as given).
    pub constraints: Option<Value>,
    /// Name (makes CreateGrant idempotent).
    pub name: Option<String>,
}

impl Kms {
    /// GetKeyPolicy.
    pub fn get_key_policy(&self, caller: &Caller, r: &KeyRef, name: Option<&str>) -> Result<String, KmsError> {
        check_policy_name(name)?;
        let (_, key, _) = self.prepare::<act::GetKeyPolicy>(caller, r)?;
        Ok(key.value.policy.clone().unwrap_or_else(|| {
            crate::access::default_policy(key.value.tenant.as_str(), self.config.default_key_policy)
        }))
    }

    /// PutKeyPolicy.
    pub fn put_key_policy(
        &self,
        caller: &Caller,
        r: &KeyRef,
        name: Option<&str>,
        policy: String,
    ) -> Result<(), KmsError> {
        check_policy_name(name)?;
        let parsed = validate_policy(&policy)?;
        let (u, mut key, _proof) = self.prepare::<act::PutKeyPolicy>(caller, r)?;
        key.value.policy = Some(policy);
        let grants = self.grants_of(&u, key.value.id)?;
        let conflicts = self.duty_conflicts(&u, &key.value, &parsed, &grants)?;
        self.enforce_duties(caller, "this key policy", conflicts)?;
        self.save_key(&u, caller, &key, vec![])
    }

    /// ListKeyPolicies: always `["default"]`.
    pub fn list_key_policies(&self, caller: &Caller, r: &KeyRef) -> Result<Vec<&'static str>, KmsError> {
        let _proof = self.prepare::<act::ListKeyPolicies>(caller, r)?;
        Ok(vec![POLICY_NAME])
    }

    /// CreateGrant: returns (grant token, grant id).
    pub fn create_grant(
        &self,
        caller: &Caller,
        r: &KeyRef,
        req: CreateGrantRequest,
    ) -> Result<(String, String), KmsError> {
        if req.grantee.is_empty() || req.grantee.len() > 256 {
            return Err(KmsError::validation("granteePrincipal", "Member must have length between 1 and 256"));
        }
        if req.retiring.as_ref().is_some_and(|p| p.is_empty() || p.len() > 256) {
            return Err(KmsError::validation("retiringPrincipal", "Member must have length between 1 and 256"));
        }
        if req.operations.is_empty() || req.operations.iter().any(|o| !GRANT_OPERATIONS.contains(&o.as_str())) {
            return Err(KmsError::validation(
                "operations",
                format!("Member must be a non-empty list of {GRANT_OPERATIONS:?}"),
            ));
        }
        if let Some(n) = &req.name {
            let ok =
                !n.is_empty() && n.len() <= 256 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b":/_-".contains(&b));
            if !ok {
                return Err(KmsError::validation(
                    "name",
                    "Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$",
                ));
            }
        }
        if crate::policy::PrincipalPattern::parse(&req.grantee).map_or(true, |p| {
            matches!(p, crate::policy::PrincipalPattern::Any | crate::policy::PrincipalPattern::Foreign(_))
        }) {
            return Err(KmsError::validation(
                "granteePrincipal",
                "give a principal ARN (arn:aws:iam::<account>:user/<name>) or an account (arn:aws:iam::<account>:root)",
            ));
        }
        validate_constraints(req.constraints.as_ref(), &req.operations)?;
        let (u, key, _proof) = self.prepare::<act::CreateGrant>(caller, r)?;
        let prefix = format!("{}/", key.value.id);
        if req.name.is_some() {
            // Idempotent by name: the same grant again returns the existing one.
            for g in u.barrier.scan::<GrantRecord>(Table::Grants, &prefix, None, 10_000)? {
                let g = g.value;
                if g.name == req.name
                    && g.grantee == req.grantee
                    && g.retiring == req.retiring
                    && g.operations == req.operations
                {
                    return Ok((g.token, g.id));
                }
            }
        }
        let id = hex::encode(random::array::<32>());
        let token = base64_token();
        let record = GrantRecord {
            id: id.clone(),
            key_id: key.value.id,
            token: token.clone(),
            name: req.name,
            grantee: req.grantee,
            retiring: req.retiring,
            operations: req.operations,
            constraints: req.constraints,
            issuing_account: format!("arn:aws:iam::{}:root", key.value.tenant),
            created_at: now_ms(),
        };
        let mut grants = self.grants_of(&u, key.value.id)?;
        grants.push(record.clone());
        let policy = self.key_policy(&key.value)?;
        let conflicts = self.duty_conflicts(&u, &key.value, &policy, &grants)?;
        self.enforce_duties(caller, "this grant", conflicts)?;
        let write = u.barrier.put(Table::Grants, &format!("{prefix}{id}"), &record, Expect::Absent);
        self.commit(&u, caller.into(), Some(self.key_arn(&key.value)), vec![write])?;
        Ok((token, id))
    }

    /// ListGrants of one key, optionally filtered by grant id or grantee.
    pub fn list_grants(
        &self,
        caller: &Caller,
        r: &KeyRef,
        grant_id: Option<&str>,
        grantee: Option<&str>,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<Value>, KmsError> {
        let (u, key, _) = self.prepare::<act::ListGrants>(caller, r)?;
        let arn = self.key_arn(&key.value);
        let prefix = format!("{}/", key.value.id);
        let after = marker.map(|m| format!("{prefix}{m}"));
        let rows = u.barrier.scan::<GrantRecord>(Table::Grants, &prefix, after.as_deref(), 10_000)?;
        let matching = rows
            .into_iter()
            .map(|v| v.value)
            .filter(|g| grant_id.is_none_or(|id| id == g.id) && grantee.is_none_or(|p| p == g.grantee));
        page(matching.map(|g| (g.id.clone(), grant_json(&g, &arn))).collect(), limit)
    }

    /// ListRetirableGrants: grants of the caller's account that `retiring` may retire.
    pub fn list_retirable_grants(
        &self,
        caller: &Caller,
        retiring: &str,
        limit: Option<usize>,
        marker: Option<&str>,
    ) -> Result<Page<Value>, KmsError> {
        let u = self.unsealed()?;
        let _proof = crate::authz::authorize::<act::ListRetirableGrants>(caller)?;
        let mut out = Vec::new();
        for g in u.barrier.scan::<GrantRecord>(Table::Grants, "", marker, 100_000)? {
            let key = self.key_by_id(&u, g.value.key_id)?;
            let Some(key) = key.filter(|k| k.value.tenant == *caller.tenant()) else { continue };
            if g.value.retiring.as_deref() == Some(retiring) {
                out.push((g.key.clone(), grant_json(&g.value, &self.key_arn(&key.value))));
            }
        }
        page(out, limit)
    }

    /// RetireGrant by token, or by key and grant id.
    pub fn retire_grant(
        &self,
        caller: &Caller,
        token: Option<&str>,
        key: Option<&KeyRef>,
        grant_id: Option<&str>,
    ) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let grant = match (token, key, grant_id) {
            (Some(t), _, _) => {
                let found = u
                    .barrier
                    .scan::<GrantRecord>(Table::Grants, "", None, 100_000)?
                    .into_iter()
                    .find(|g| constant_time_eq(g.value.token.as_bytes(), t.as_bytes()));
                found.ok_or_else(|| KmsError::InvalidGrantToken("The grant token is not valid.".into()))?
            }
            (None, Some(r), Some(id)) => self.grant_by_id::<act::RetireGrant>(&u, caller, r, id)?,
            _ => return Err(KmsError::validation("grantToken", "specify GrantToken, or KeyId and GrantId")),
        };
        let key =
            self.key_by_id(&u, grant.value.key_id)?.ok_or_else(|| KmsError::NotFound("Grant not found.".into()))?;
        // AWS: the retiring principal, the grantee (when RetireGrant is among its operations), or
        // the account that owns the key.
        let me = caller.subject();
        let is = |p: Option<&str>| {
            p.and_then(|p| crate::policy::PrincipalPattern::parse(p).ok())
                .is_some_and(|p| p.matches(&me, &key.value.tenant))
        };
        let may = is(grant.value.retiring.as_deref())
            || (is(Some(&grant.value.grantee)) && grant.value.operations.iter().any(|o| o == "RetireGrant"))
            || (key.value.tenant == *caller.tenant()
                && crate::authz::role_permits(caller.roles(), crate::Action::RevokeGrant));
        if !may {
            return Err(crate::authz::denied(caller, crate::Action::RetireGrant, &self.key_arn(&key.value)));
        }
        let _proof = crate::authz::authorize::<act::RetireGrant>(caller)?;
        self.commit(&u, caller.into(), None, vec![u.barrier.delete(Table::Grants, &grant.key, Expect::Rev(grant.rev))])
    }

    /// RevokeGrant.
    pub fn revoke_grant(&self, caller: &Caller, r: &KeyRef, grant_id: &str) -> Result<(), KmsError> {
        let u = self.unsealed()?;
        let grant = self.grant_by_id::<act::RevokeGrant>(&u, caller, r, grant_id)?;
        self.commit(&u, caller.into(), None, vec![u.barrier.delete(Table::Grants, &grant.key, Expect::Rev(grant.rev))])
    }

    fn grant_by_id<A: crate::authz::ActionKind>(
        &self,
        u: &crate::Unsealed,
        caller: &Caller,
        r: &KeyRef,
        id: &str,
    ) -> Result<Versioned<GrantRecord>, KmsError> {
        let (_, key, _) = self.prepare::<A>(caller, r)?;
        if id.is_empty() || id.len() > 128 {
            return Err(KmsError::validation("grantId", "Member must have length between 1 and 128"));
        }
        u.barrier
            .get::<GrantRecord>(Table::Grants, &format!("{}/{id}", key.value.id))?
            .ok_or_else(|| KmsError::NotFound(format!("Grant ID {id} not found")))
    }

    /// Deletes of every grant of a key (for destruction).
    pub(crate) fn grant_deletes(&self, u: &crate::Unsealed, key: KeyId) -> Result<Vec<custody_store::Write>, KmsError> {
        let rows = u.barrier.backend().scan(Table::Grants, &format!("{key}/"), None, 100_000)?;
        Ok(rows.into_iter().map(|r| u.barrier.delete(Table::Grants, &r.key, Expect::Rev(r.rev))).collect())
    }
}

/// Grant constraints: `EncryptionContextEquals` and/or `EncryptionContextSubset`, each a map of
/// strings, and only on grants whose operations all take an encryption context.
fn validate_constraints(c: Option<&Value>, operations: &[String]) -> Result<(), KmsError> {
    let Some(c) = c else { return Ok(()) };
    let bad = |why: &str| KmsError::validation("constraints", why.to_string());
    let o = c.as_object().ok_or_else(|| bad("must be an object"))?;
    for (k, v) in o {
        if k != "EncryptionContextEquals" && k != "EncryptionContextSubset" {
            return Err(bad("only EncryptionContextEquals and EncryptionContextSubset are supported"));
        }
        let m = v.as_object().ok_or_else(|| bad("a constraint is a map of strings"))?;
        if m.values().any(|x| !x.is_string()) {
            return Err(bad("a constraint is a map of strings"));
        }
    }
    const TAKES_CONTEXT: &[&str] = &[
        "Encrypt",
        "Decrypt",
        "ReEncryptFrom",
        "ReEncryptTo",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "RetireGrant",
    ];
    if let Some(op) = operations.iter().find(|o| !TAKES_CONTEXT.contains(&o.as_str())) {
        return Err(bad(&format!("operation {op} does not take an encryption context, so it cannot be constrained")));
    }
    Ok(())
}

fn check_policy_name(name: Option<&str>) -> Result<(), KmsError> {
    match name {
        None | Some(POLICY_NAME) => Ok(()),
        Some(other) => {
            Err(KmsError::NotFound(format!("Policy {other} is not found; the only key policy is named default.")))
        }
    }
}

fn base64_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random::array::<48>())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn grant_json(g: &GrantRecord, key_arn: &str) -> Value {
    let mut v = serde_json::json!({
        "KeyId": key_arn,
        "GrantId": g.id,
        "CreationDate": aws_time(g.created_at),
        "GranteePrincipal": g.grantee,
        "IssuingAccount": g.issuing_account,
        "Operations": g.operations,
    });
    if let Some(n) = &g.name {
        v["Name"] = Value::String(n.clone());
    }
    if let Some(p) = &g.retiring {
        v["RetiringPrincipal"] = Value::String(p.clone());
    }
    if let Some(c) = &g.constraints {
        v["Constraints"] = c.clone();
    }
    v
}

/// Pages a sorted list of (marker, item).
fn page(items: Vec<(String, Value)>, limit: Option<usize>) -> Result<Page<Value>, KmsError> {
    let limit = match limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(_) => return Err(KmsError::validation("limit", "Member must have value between 1 and 1000")),
    };
    let more = items.len() > limit;
    let mut items: Vec<_> = items.into_iter().take(limit).collect();
    let next_marker = if more { items.last().map(|(m, _)| m.clone()) } else { None };
    Ok(Page { items: items.drain(..).map(|(_, v)| v).collect(), next_marker })
}
