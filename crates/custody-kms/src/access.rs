//! Who may do what to a key: roles, then the key policy, then grants (docs/ACCESS.md), and the
//! two questions built on the same decision: "who can?" and "why (not)?".
//!
//! One function decides ([`Kms::decide`]); the request path, `who-can` and `explain` all call it,
//! so what they say is what is enforced.

use std::collections::BTreeMap;

use custody_store::Table;
use serde::Serialize;
use serde_json::{json, Value};

use crate::authz::{self, role_permits, Action, ActionKind, Authorized, Caller};
use crate::error::KmsError;
use crate::grants::GrantRecord;
use crate::ids::{KeyId, PrincipalName, TenantId};
use crate::model::{KeyRecord, PrincipalRecord, Role};
use crate::policy::{Decision, Policy, PrincipalPattern, RequestFacts, Subject, ADMIN_ACTIONS};
use crate::{Kms, SeparationOfDuties, Unsealed};

/// How a new key's policy reads when CreateKey is given none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultKeyPolicy {
    /// The tenant's key admins administer it; nobody may use it until a policy or grant says so.
    #[default]
    KeyAdminsOnly,
    /// As above, and every key user of the tenant may use it (development: `custody dev`).
    Tenant,
}

/// The default key policy of a key in `account`.
pub fn default_policy(account: &str, flavor: DefaultKeyPolicy) -> String {
    let root = format!("arn:aws:iam::{account}:root");
    let admin: Vec<String> =
        ADMIN_ACTIONS.iter().chain(crate::policy::READ_ACTIONS).map(|a| format!("kms:{a}")).collect();
    let mut statements = vec![json!({
        "Sid": "Allow key administration by the tenant's key admins",
        "Effect": "Allow",
        "Principal": { "AWS": root },
        "Action": admin,
        "Resource": "*"
    })];
    if flavor == DefaultKeyPolicy::Tenant {
        let usage: Vec<String> = crate::policy::USE_ACTIONS.iter().map(|a| format!("kms:{a}")).collect();
        statements.push(json!({
            "Sid": "Allow use of the key by the tenant's key users",
            "Effect": "Allow",
            "Principal": { "AWS": root },
            "Action": usage,
            "Resource": "*"
        }));
    }
    json!({ "Version": "2012-10-17", "Id": "custody-default", "Statement": statements }).to_string()
}

/// The answer to "may this principal do this to this key, and why?".
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Explanation {
    /// Allowed or not.
    pub allowed: bool,
    /// One sentence.
    pub reason: String,
    /// The statement (Sid, or `statement N`) that allowed or denied it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// The grant that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
}

/// How [`Kms::decide`] decided, before it is put in words.
pub(crate) enum Verdict {
    PolicyDenies(String),
    RoleMissing,
    PolicyAllows(String),
    GrantAllows(String),
    NothingAllows,
}

impl Verdict {
    fn allows(&self) -> bool {
        matches!(self, Self::PolicyAllows(_) | Self::GrantAllows(_))
    }

    pub(crate) fn explain(self, roles: &[Role], action: Action) -> Explanation {
        let (allowed, reason, statement, grant_id) = match self {
            Self::PolicyDenies(sid) => {
                (false, format!("the key policy denies it explicitly (statement {sid:?})"), Some(sid), None)
            }
            Self::RoleMissing => {
                let needed: Vec<&str> = authz::roles_for(action).iter().map(|r| r.as_str()).collect();
                let held: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                let why =
                    format!("kms:{} needs one of the roles {needed:?}; the principal has {held:?}", action.name());
                (false, why, None, None)
            }
            Self::PolicyAllows(sid) => (true, format!("the key policy allows it (statement {sid:?})"), Some(sid), None),
            Self::GrantAllows(id) => (true, format!("grant {id} allows it"), None, Some(id)),
            Self::NothingAllows => (false, "no statement of the key policy and no grant allows it".into(), None, None),
        };
        Explanation { allowed, reason, statement, grant_id }
    }
}

/// One way a principal can take an action on a key.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AccessEntry {
    /// A principal ARN, an account root (`arn:aws:iam::<tenant>:root`: every principal of it that
    /// has the role), or `*` (every principal of the key's tenant that has the role).
    pub principal: String,
    /// `principal`, `account` or `any`.
    pub kind: &'static str,
    /// The statement that opens it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    /// The grant that opens it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// For whole-account and `*` entries: who it reaches, and any condition left to the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The grant operation an action needs.
fn grant_operation(action: Action) -> Option<&'static str> {
    use Action::*;
    Some(match action {
        Encrypt => "Encrypt",
        Decrypt => "Decrypt",
        ReEncryptFrom => "ReEncryptFrom",
        ReEncryptTo => "ReEncryptTo",
        GenerateDataKey => "GenerateDataKey",
        GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
        GenerateMac => "GenerateMac",
        VerifyMac => "VerifyMac",
        DescribeKey => "DescribeKey",
        CreateGrant => "CreateGrant",
        RetireGrant => "RetireGrant",
        _ => return None,
    })
}

/// Whether a grant's constraints hold for a request's encryption context.
pub(crate) fn constraints_hold(constraints: Option<&Value>, context: Option<&BTreeMap<String, String>>) -> bool {
    let Some(c) = constraints else { return true };
    let empty = BTreeMap::new();
    let ctx = context.unwrap_or(&empty);
    let map = |v: &Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|o| o.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
            .unwrap_or_default()
    };
    if let Some(eq) = c.get("EncryptionContextEquals") {
        if map(eq) != *ctx {
            return false;
        }
    }
    if let Some(sub) = c.get("EncryptionContextSubset") {
        if !map(sub).iter().all(|(k, v)| ctx.get(k) == Some(v)) {
            return false;
        }
    }
    true
}

impl Kms {
    /// The key's policy, parsed (the default one if it has none). Parsed policies are kept by
    /// their text, so a request parses nothing (the cache is emptied when it reaches 10,000).
    pub(crate) fn key_policy(&self, key: &KeyRecord) -> Result<std::sync::Arc<Policy>, KmsError> {
        let text = match &key.policy {
            Some(p) => std::borrow::Cow::Borrowed(p.as_str()),
            // The default policy depends only on the tenant (and the server's setting), so it is
            // kept under the tenant id: twelve digits, which no stored policy can be (a policy
            // is a JSON object).
            None => std::borrow::Cow::Borrowed(key.tenant.as_str()),
        };
        if let Some(p) = self.policies.lock().unwrap_or_else(|p| p.into_inner()).get(text.as_ref()) {
            self.policy_cache.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(p.clone());
        }
        self.policy_cache.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let parsed = match &key.policy {
            Some(p) => Policy::parse(p),
            None => Policy::parse(&default_policy(key.tenant.as_str(), self.config.default_key_policy)),
        }
        .map_err(|e| KmsError::Integrity(format!("keys/{}: stored policy: {}", key.id, e.0)))?;
        let parsed = std::sync::Arc::new(parsed);
        let mut cache = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(text.into_owned(), parsed.clone());
        Ok(parsed)
    }

    pub(crate) fn grants_of(&self, u: &Unsealed, key: KeyId) -> Result<Vec<GrantRecord>, KmsError> {
        let rows = u.barrier.scan::<GrantRecord>(Table::Grants, &format!("{key}/"), None, 100_000)?;
        Ok(rows.into_iter().map(|r| r.value).collect())
    }

    /// The key's grants, read on first use into `cache`.
    fn grants_cached<'c>(
        &self,
        u: &Unsealed,
        key: KeyId,
        cache: &'c std::cell::OnceCell<Vec<GrantRecord>>,
    ) -> Result<&'c Vec<GrantRecord>, KmsError> {
        if let Some(g) = cache.get() {
            return Ok(g);
        }
        let read = self.grants_of(u, key)?;
        Ok(cache.get_or_init(|| read))
    }

    /// The decision for `who` (holding `roles`) taking `action` on `key`: roles, then the key
    /// policy (an explicit deny wins), then grants. `grants` holds the key's grants once read
    /// (only when the policy alone does not decide), so deciding for many principals reads them
    /// once. The verdict is put into words ([`Verdict::explain`]) only when someone asks: every request
    /// is decided, few are explained.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decide(
        &self,
        u: &Unsealed,
        who: Subject<'_>,
        roles: &[Role],
        action: Action,
        key: &KeyRecord,
        context: Option<&BTreeMap<String, String>>,
        source_ip: Option<std::net::IpAddr>,
        grants: &std::cell::OnceCell<Vec<GrantRecord>>,
    ) -> Result<Verdict, KmsError> {
        let arn = self.key_arn(key);
        let facts = RequestFacts {
            subject: who,
            action: action.name(),
            resource: &arn,
            key_tenant: &key.tenant,
            context,
            source_ip,
        };
        let decision = self.key_policy(key)?.evaluate(&facts);
        if let Decision::Deny(sid) = decision {
            return Ok(Verdict::PolicyDenies(sid));
        }
        if !role_permits(roles, action) {
            return Ok(Verdict::RoleMissing);
        }
        if let Decision::Allow(sid) = decision {
            return Ok(Verdict::PolicyAllows(sid));
        }
        if let Some(op) = grant_operation(action) {
            for g in self.grants_cached(u, key.id, grants)? {
                let grantee = PrincipalPattern::parse(&g.grantee).ok();
                let matches = grantee.is_some_and(|p| p.matches(&who, &key.tenant));
                if matches && g.operations.iter().any(|o| o == op) && constraints_hold(g.constraints.as_ref(), context)
                {
                    return Ok(Verdict::GrantAllows(g.id.clone()));
                }
            }
        }
        Ok(Verdict::NothingAllows)
    }

    /// Authorizes `caller` for `A` on `key`. A key of another tenant that the caller may not use
    /// is reported exactly like a key that does not exist.
    pub(crate) fn authorize_key<A: ActionKind>(
        &self,
        u: &Unsealed,
        caller: &Caller,
        key: &KeyRecord,
        context: Option<&BTreeMap<String, String>>,
    ) -> Result<Authorized<A>, KmsError> {
        let grants = std::cell::OnceCell::new();
        let v = self.decide(u, caller.subject(), &caller.roles, A::ACTION, key, context, caller.source_ip, &grants)?;
        if v.allows() {
            return Ok(authz::allowed());
        }
        let e = v.explain(&caller.roles, A::ACTION);
        if key.tenant != caller.tenant {
            return Err(KmsError::NotFound(format!("{} is not found.", self.key_arn(key))));
        }
        tracing::debug!(key_id = %key.id, action = A::ACTION.name(), reason = %e.reason, "access denied");
        Err(authz::denied(caller, A::ACTION, &self.key_arn(key)))
    }

    /// `custody access explain`: may `principal` take `action` on the key, and why.
    pub fn explain(
        &self,
        caller: &Caller,
        principal: &str,
        action: &str,
        key: &crate::KeyRef,
        context: Option<&BTreeMap<String, String>>,
    ) -> Result<Explanation, KmsError> {
        let (u, key) = self.key_for_explaining(caller, key)?;
        let action = parse_action(action)?;
        let (tenant, name) = match PrincipalPattern::parse(principal) {
            Ok(PrincipalPattern::Named(t, n)) => (t, n),
            _ => match PrincipalName::parse(principal) {
                Some(n) => (caller.tenant.clone(), n),
                None => return Err(KmsError::validation("principal", "give a principal name or its ARN")),
            },
        };
        let record = u.barrier.get::<PrincipalRecord>(Table::Principals, &format!("{tenant}/{name}"))?;
        let Some(record) = record else {
            return Ok(Explanation {
                allowed: false,
                reason: format!("there is no principal {name} in tenant {tenant}"),
                statement: None,
                grant_id: None,
            });
        };
        if !record.value.enabled {
            return Ok(Explanation {
                allowed: false,
                reason: "the principal is disabled".into(),
                statement: None,
                grant_id: None,
            });
        }
        let who = Subject { tenant: &tenant, name: &name };
        let roles = &record.value.roles;
        Ok(self
            .decide(&u, who, roles, action, &key, context, None, &std::cell::OnceCell::new())?
            .explain(roles, action))
    }

    /// `custody access who-can`: every principal that can take `action` on the key (given the
    /// context), with the statement or grant that lets it; and the whole-account and `*`
    /// statements as such.
    pub fn who_can(
        &self,
        caller: &Caller,
        key: &crate::KeyRef,
        action: &str,
        context: Option<&BTreeMap<String, String>>,
    ) -> Result<Vec<AccessEntry>, KmsError> {
        let (u, key) = self.key_for_explaining(caller, key)?;
        let action = parse_action(action)?;
        let mut out = Vec::new();
        let policy = self.key_policy(&key)?;
        let arn = self.key_arn(&key);
        let role_names: Vec<&str> = authz::roles_for(action).iter().map(|r| r.as_str()).collect();
        for (pattern, sid) in policy.allowed_patterns() {
            let (kind, note) = match pattern {
                PrincipalPattern::Any => {
                    ("any", format!("every principal of tenant {} with a role in {role_names:?}", key.tenant))
                }
                PrincipalPattern::Account(t) => {
                    ("account", format!("every principal of tenant {t} with a role in {role_names:?}"))
                }
                _ => continue,
            };
            if policy.may_allow(pattern, action.name(), &arn) {
                out.push(AccessEntry {
                    principal: pattern.to_string(),
                    kind,
                    statement: Some(sid.to_string()),
                    grant_id: None,
                    note: Some(note),
                });
            }
        }
        let grants = std::cell::OnceCell::new();
        for g in self.grants_cached(&u, key.id, &grants)? {
            if let Ok(p @ PrincipalPattern::Account(_)) = PrincipalPattern::parse(&g.grantee) {
                if grant_operation(action).is_some_and(|op| g.operations.iter().any(|o| o == op))
                    && constraints_hold(g.constraints.as_ref(), context)
                {
                    out.push(AccessEntry {
                        principal: p.to_string(),
                        kind: "account",
                        statement: None,
                        grant_id: Some(g.id.clone()),
                        note: Some(format!("every principal of the account with a role in {role_names:?}")),
                    });
                }
            }
        }
        // Every principal, in every tenant: a foreign principal can be named by the policy.
        u.barrier.for_each::<PrincipalRecord, KmsError>(Table::Principals, "", None, |p| {
            let p = p.value;
            if p.enabled {
                let who = Subject { tenant: &p.tenant, name: &p.name };
                let e = self.decide(&u, who, &p.roles, action, &key, context, None, &grants)?.explain(&p.roles, action);
                if e.allowed {
                    out.push(AccessEntry {
                        principal: PrincipalPattern::Named(p.tenant.clone(), p.name.clone()).to_string(),
                        kind: "principal",
                        statement: e.statement,
                        grant_id: e.grant_id,
                        note: None,
                    });
                }
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(out)
    }

    fn key_for_explaining(
        &self,
        caller: &Caller,
        r: &crate::KeyRef,
    ) -> Result<(std::sync::Arc<Unsealed>, KeyRecord), KmsError> {
        let u = self.unsealed()?;
        let _proof = authz::authorize::<authz::act::ExplainAccess>(caller)?;
        let key = self.resolve(&u, caller, r)?;
        if key.value.tenant != caller.tenant {
            return Err(KmsError::NotFound(format!("{} is not found.", self.key_arn(&key.value))));
        }
        Ok((u, key.value))
    }

    /// Separation of duties for `key` with `policy` and `grants`: the principals that could
    /// both administer the key and decrypt with it. A principal counts as reached by a statement
    /// (or grant) that names it, or by one covering its whole tenant (or `*`) when its roles
    /// allow the action; a named principal that does not exist yet is assumed to get every role.
    pub(crate) fn duty_conflicts(
        &self,
        u: &Unsealed,
        key: &KeyRecord,
        policy: &Policy,
        grants: &[GrantRecord],
    ) -> Result<Vec<String>, KmsError> {
        let arn = self.key_arn(key);
        let allowed: Vec<&PrincipalPattern> = policy.allowed_patterns().into_iter().map(|(p, _)| p).collect();
        let grantees: Vec<(Option<PrincipalPattern>, &GrantRecord)> =
            grants.iter().map(|g| (PrincipalPattern::parse(&g.grantee).ok(), g)).collect();
        let mut candidates: BTreeMap<(TenantId, PrincipalName), Option<Vec<Role>>> = BTreeMap::new();
        for p in allowed.iter().copied().chain(grantees.iter().filter_map(|(p, _)| p.as_ref())) {
            if let PrincipalPattern::Named(t, n) = p {
                candidates.insert((t.clone(), n.clone()), None);
            }
        }
        let covered: Vec<&PrincipalPattern> = allowed
            .iter()
            .copied()
            .filter(|p| matches!(p, PrincipalPattern::Any | PrincipalPattern::Account(_)))
            .collect();
        u.barrier.for_each::<PrincipalRecord, KmsError>(Table::Principals, "", None, |p| {
            let p = p.value;
            let subject = Subject { tenant: &p.tenant, name: &p.name };
            let key_ = (p.tenant.clone(), p.name.clone());
            if candidates.contains_key(&key_) || covered.iter().any(|c| c.matches(&subject, &key.tenant)) {
                candidates.insert(key_, Some(p.roles));
            }
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        let mut conflicts = Vec::new();
        for ((tenant, name), roles) in candidates {
            let subject = Subject { tenant: &tenant, name: &name };
            let me = PrincipalPattern::Named(tenant.clone(), name.clone());
            let reaches = |action: &str, role_action: Action| {
                let role_ok = roles.as_ref().is_none_or(|r| role_permits(r, role_action));
                let by_policy = allowed.iter().any(|p| {
                    p.matches(&subject, &key.tenant) && (p.is_named() || role_ok) && policy.may_allow(p, action, &arn)
                });
                let by_grant = grantees.iter().any(|(p, g)| {
                    p.as_ref().is_some_and(|p| {
                        p.matches(&subject, &key.tenant)
                            && (*p == me || role_ok)
                            && g.operations.iter().any(|o| o == action)
                    })
                });
                by_policy || by_grant
            };
            let administers = ADMIN_ACTIONS.iter().any(|a| {
                let action = parse_action(a).expect("admin actions are actions");
                reaches(a, action)
            });
            if administers && reaches("Decrypt", Action::Decrypt) {
                conflicts.push(me.to_string());
            }
        }
        Ok(conflicts)
    }

    /// Applies the separation-of-duties setting to `conflicts`: refused (`enforce`), or allowed
    /// with an audit alert on the request (`warn`).
    pub(crate) fn enforce_duties(&self, caller: &Caller, what: &str, conflicts: Vec<String>) -> Result<(), KmsError> {
        if conflicts.is_empty() {
            return Ok(());
        }
        let message = format!(
            "separation of duties: {what} would let {} both administer the key and Decrypt with it; give administration and use to different principals",
            conflicts.join(", ")
        );
        match self.config.separation_of_duties {
            SeparationOfDuties::Enforce => Err(KmsError::SeparationOfDuties(message)),
            SeparationOfDuties::Warn => {
                tracing::warn!(%message, "separation of duties relaxed (warn)");
                if let Some(scope) = &caller.audit {
                    scope.flag_alert(format!("{message} (allowed: separation_of_duties = warn)"));
                }
                Ok(())
            }
        }
    }
}

/// Parses an action name (`Decrypt` or `kms:Decrypt`).
pub fn parse_action(s: &str) -> Result<Action, KmsError> {
    let name = s.strip_prefix("kms:").unwrap_or(s);
    Action::from_name(name).ok_or_else(|| KmsError::validation("action", format!("{s:?} is not a KMS action")))
}
