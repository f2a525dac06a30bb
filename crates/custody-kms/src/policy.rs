//! Key policies in AWS's JSON grammar: parsed strictly once, evaluated per request.
//!
//! Evaluation is AWS's: default deny, an explicit `Deny` wins over any `Allow`. A statement
//! applies when its principal, action, resource and every condition match. What custody adds is
//! documented in docs/ACCESS.md: principals are custody principals (`arn:aws:iam::<tenant>:user/<name>`
//! or `role/<name>`, the account root, or `"*"`), `"*"` covers only principals of the key's own
//! tenant (a foreign principal must be named, by ARN or account), and unknown operators or
//! condition keys are refused when the policy is stored rather than silently never matching.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::ids::{PrincipalName, TenantId};

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

type Result<T> = std::result::Result<T, PolicyError>;

fn bad<T>(why: impl Into<String>) -> Result<T> {
    Err(PolicyError(why.into()))
}

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// Who a statement (or a grant) is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrincipalPattern {
    /// `"*"`: every principal of the key's tenant.
    Any,
    /// A 12-digit account id or `arn:aws:iam::<account>:root`: every principal of that tenant.
    Account(TenantId),
    /// `arn:aws:iam::<account>:user/<name>` (or `role/<name>`): one principal.
    Named(TenantId, PrincipalName),
    /// A principal custody has no such thing as (`Service`, `Federated`): never matches.
    Foreign(String),
}

impl PrincipalPattern {
    /// Parses one `AWS` principal entry.
    pub fn parse(s: &str) -> Result<Self> {
        if s == "*" {
            return Ok(Self::Any);
        }
        if let Some(t) = TenantId::parse(s) {
            return Ok(Self::Account(t));
        }
        let invalid = || {
            PolicyError(format!("invalid principal {s:?}: use \"*\", an account id, arn:aws:iam::<account>:root or arn:aws:iam::<account>:user/<name>"))
        };
        let rest = s.strip_prefix("arn:aws:iam::").ok_or_else(invalid)?;
        let (account, what) = rest.split_once(':').ok_or_else(invalid)?;
        let account = TenantId::parse(account).ok_or_else(invalid)?;
        if what == "root" {
            return Ok(Self::Account(account));
        }
        let name = what.strip_prefix("user/").or_else(|| what.strip_prefix("role/")).ok_or_else(invalid)?;
        // IAM paths (`user/team/alice`): the name is the last segment.
        let name = name.rsplit('/').next().unwrap_or(name);
        Ok(Self::Named(account, PrincipalName::parse(name).ok_or_else(invalid)?))
    }

    /// Whether this pattern covers `who`, for a key of `key_tenant`.
    pub fn matches(&self, who: &Subject<'_>, key_tenant: &TenantId) -> bool {
        match self {
            Self::Any => who.tenant == key_tenant,
            Self::Account(a) => a == who.tenant,
            Self::Named(a, n) => a == who.tenant && n == who.name,
            Self::Foreign(_) => false,
        }
    }

    /// Whether it names one principal (rather than covering many, whose roles then decide).
    pub fn is_named(&self) -> bool {
        matches!(self, Self::Named(..))
    }
}

impl std::fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Account(a) => write!(f, "arn:aws:iam::{a}:root"),
            Self::Named(a, n) => write!(f, "arn:aws:iam::{a}:user/{n}"),
            Self::Foreign(s) => f.write_str(s),
        }
    }
}

/// A principal as the evaluator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// Its tenant.
    pub tenant: &'a TenantId,
    /// Its name.
    pub name: &'a PrincipalName,
}

/// What a request asks, for evaluation.
#[derive(Debug, Clone)]
pub struct RequestFacts<'a> {
    /// Who asks.
    pub subject: Subject<'a>,
    /// The action's AWS name without the prefix (`Decrypt`).
    pub action: &'a str,
    /// The key's ARN.
    pub resource: &'a str,
    /// The key's tenant.
    pub key_tenant: &'a TenantId,
    /// The request's encryption context, for actions that take one.
    pub context: Option<&'a BTreeMap<String, String>>,
    /// The caller's address, when known.
    pub source_ip: Option<IpAddr>,
}

/// The outcome of evaluating a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A statement allowed it (and none denied it).
    Allow(String),
    /// A statement denied it.
    Deny(String),
    /// No statement applies: denied by default.
    NoMatch,
}

/// A parsed key policy.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
}

#[derive(Debug, Clone)]
struct Statement {
    /// Sid, or `statement N` (from 1) when it has none.
    label: String,
    effect: Effect,
    principals: Vec<PrincipalPattern>,
    actions: Patterns,
    resources: Patterns,
    conditions: Vec<Condition>,
}

/// `Action` or `NotAction` (or the resource twins): patterns, and whether they are negated.
#[derive(Debug, Clone)]
struct Patterns {
    not: bool,
    patterns: Vec<Pattern>,
}

impl Patterns {
    /// Action patterns compare case-insensitively: they are kept in lower case, and the value is
    /// lowered by the caller.
    fn matches(&self, value: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(value)) != self.not
    }
}

/// One `Action` or `Resource` pattern, with its shape found once, when the policy is parsed
/// (Encrypt compares ~25 of them: the default policy lists every action).
#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    shape: Shape,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// No wildcard.
    Exact,
    /// One `*`, at the end.
    Prefix,
    /// Anything else.
    Glob,
}

impl Pattern {
    fn new(text: String) -> Self {
        Self { shape: Shape::of(&text), text }
    }

    fn matches(&self, value: &str) -> bool {
        self.shape.matches(&self.text, value)
    }
}

impl Shape {
    /// Both wildcards are ASCII, so a byte search finds them in any UTF-8 text
    /// (`str::contains([char; 2])` decoded every character).
    fn of(pattern: &str) -> Self {
        match pattern.bytes().position(|b| b == b'*' || b == b'?') {
            None => Self::Exact,
            Some(i) if i + 1 == pattern.len() && pattern.ends_with('*') => Self::Prefix,
            Some(_) => Self::Glob,
        }
    }

    /// Whether `pattern`, of this shape, matches `value`.
    fn matches(self, pattern: &str, value: &str) -> bool {
        match self {
            Self::Exact => pattern == value,
            // `*`, `kms:*`, `kms:GenerateDataKey*`, `arn:…:key/*`: IAM's usual wildcard.
            Self::Prefix => value.starts_with(&pattern[..pattern.len() - 1]),
            // Every pattern matches itself (`*` the run "*", `?` the character "?").
            Self::Glob if pattern == value => true,
            Self::Glob if pattern.is_ascii() && value.is_ascii() => glob_in(pattern.as_bytes(), value.as_bytes()),
            Self::Glob => {
                let (p, v): (Vec<char>, Vec<char>) = (pattern.chars().collect(), value.chars().collect());
                glob_in(&p, &v)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOp {
    Single,
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Bool,
    Null,
    IpAddress,
    NotIpAddress,
}

impl Op {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "StringEquals" => Self::StringEquals,
            "StringNotEquals" => Self::StringNotEquals,
            "StringEqualsIgnoreCase" => Self::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Self::StringNotEqualsIgnoreCase,
            "StringLike" => Self::StringLike,
            "StringNotLike" => Self::StringNotLike,
            "Bool" => Self::Bool,
            "Null" => Self::Null,
            "IpAddress" => Self::IpAddress,
            "NotIpAddress" => Self::NotIpAddress,
            _ => return None,
        })
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Self::StringNotEquals | Self::StringNotEqualsIgnoreCase | Self::StringNotLike | Self::NotIpAddress
        )
    }

    /// Whether `value` matches `pattern` under the positive form of the operator.
    fn hit(self, pattern: &str, value: &str) -> bool {
        match self {
            Self::StringEquals | Self::StringNotEquals => pattern == value,
            Self::StringEqualsIgnoreCase | Self::StringNotEqualsIgnoreCase => pattern.eq_ignore_ascii_case(value),
            Self::StringLike | Self::StringNotLike => glob(pattern, value),
            Self::Bool => pattern.eq_ignore_ascii_case(value),
            Self::IpAddress | Self::NotIpAddress => ip_in(pattern, value),
            Self::Null => false,
        }
    }
}

/// The condition keys custody evaluates (lower case; the encryption-context key's own name
/// follows `kms:encryptioncontext:`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConditionKey {
    EncryptionContext(String),
    EncryptionContextKeys,
    CallerAccount,
    GrantIsForAwsResource,
    PrincipalArn,
    SourceIp,
}

impl ConditionKey {
    fn parse(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        if let Some(k) = lower.strip_prefix("kms:encryptioncontext:") {
            if k.is_empty() {
                return bad("kms:EncryptionContext: needs a context key after the colon");
            }
            return Ok(Self::EncryptionContext(k.to_string()));
        }
        Ok(match lower.as_str() {
            "kms:encryptioncontextkeys" => Self::EncryptionContextKeys,
            "kms:calleraccount" => Self::CallerAccount,
            "kms:grantisforawsresource" => Self::GrantIsForAwsResource,
            "aws:principalarn" => Self::PrincipalArn,
            "aws:sourceip" => Self::SourceIp,
            _ => {
                return bad(format!(
                    "unsupported condition key {s:?}: custody evaluates kms:EncryptionContext:<key>, kms:EncryptionContextKeys, kms:CallerAccount, kms:GrantIsForAWSResource, aws:PrincipalArn and aws:SourceIp"
                ))
            }
        })
    }

    /// The request's values for this key (`None`: absent).
    fn values(&self, r: &RequestFacts<'_>) -> Option<Vec<String>> {
        match self {
            // Condition key names ignore case, context keys do not: a context may hold `App` and
            // `app`, and then both are this key's values (see `Condition::holds`).
            Self::EncryptionContext(k) => {
                let c = r.context?;
                let vs: Vec<String> =
                    c.iter().filter(|(name, _)| name.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone()).collect();
                (!vs.is_empty()).then_some(vs)
            }
            Self::EncryptionContextKeys => {
                let keys: Vec<String> = r.context.map(|c| c.keys().cloned().collect()).unwrap_or_default();
                (!keys.is_empty()).then_some(keys)
            }
            Self::CallerAccount => Some(vec![r.subject.tenant.to_string()]),
            Self::GrantIsForAwsResource => Some(vec!["false".into()]),
            Self::PrincipalArn => {
                Some(vec![PrincipalPattern::Named(r.subject.tenant.clone(), r.subject.name.clone()).to_string()])
            }
            Self::SourceIp => r.source_ip.map(|ip| vec![ip.to_string()]),
        }
    }
}

#[derive(Debug, Clone)]
struct Condition {
    set: SetOp,
    op: Op,
    if_exists: bool,
    key: ConditionKey,
    values: Vec<String>,
}

impl Condition {
    /// Whether the condition holds for a statement of `effect`.
    fn holds(&self, r: &RequestFacts<'_>, effect: Effect) -> bool {
        let request = self.key.values(r);
        if self.op == Op::Null {
            let want_absent = self.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
            return request.is_none() == want_absent;
        }
        let test = |v: &str| {
            let hit = self.values.iter().any(|p| self.op.hit(p, v));
            hit != self.op.negated()
        };
        match (self.set, request) {
            (SetOp::ForAllValues, None) => true,
            (SetOp::ForAllValues, Some(vs)) => vs.iter().all(|v| test(v)),
            (SetOp::ForAnyValue, None) => false,
            (SetOp::ForAnyValue, Some(vs)) => vs.iter().any(|v| test(v)),
            (SetOp::Single, None) => self.if_exists || self.op.negated(),
            // One context key under several spellings of case is ambiguous, and the ambiguity
            // goes against the caller: a Deny applies if any of them meets it, an Allow only if
            // all do (else `{"App": "x", "app": "secret"}` would escape a deny on app=secret).
            (SetOp::Single, Some(vs))
                if effect == Effect::Allow && matches!(self.key, ConditionKey::EncryptionContext(_)) =>
            {
                vs.iter().all(|v| test(v))
            }
            (SetOp::Single, Some(vs)) => vs.iter().any(|v| test(v)),
        }
    }
}

/// Admin actions: the ones separation of duties keeps apart from Decrypt.
pub const ADMIN_ACTIONS: &[&str] = &[
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "RotateKeyOnDemand",
    "PutKeyPolicy",
    "UpdateKeyDescription",
    "TagResource",
    "UntagResource",
    "CreateGrant",
    "RevokeGrant",
];

/// Read-only actions on a key.
pub const READ_ACTIONS: &[&str] = &[
    "DescribeKey",
    "GetKeyPolicy",
    "ListKeyPolicies",
    "GetKeyRotationStatus",
    "ListKeyRotations",
    "ListResourceTags",
    "ListGrants",
];

/// Cryptographic actions on a key.
pub const USE_ACTIONS: &[&str] = &[
    "Encrypt",
    "Decrypt",
    "ReEncryptFrom",
    "ReEncryptTo",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
];

fn strings(v: &Value, what: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                _ => bad(format!("{what} must be a string or a list of strings")),
            })
            .collect(),
        _ => bad(format!("{what} must be a string or a non-empty list of strings")),
    }
}

fn condition_values(v: &Value) -> Result<Vec<String>> {
    let one = |x: &Value| match x {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => bad("condition values must be strings, booleans or numbers"),
    };
    match v {
        Value::Array(a) if !a.is_empty() => a.iter().map(one).collect(),
        Value::Array(_) => bad("a condition needs at least one value"),
        other => Ok(vec![one(other)?]),
    }
}

impl Policy {
    /// Parses a key policy document. Everything custody would not evaluate as written is
    /// refused here, with the reason.
    pub fn parse(text: &str) -> Result<Self> {
        let doc: Value = serde_json::from_str(text).map_err(|e| PolicyError(format!("not JSON ({e})")))?;
        let obj = doc.as_object().ok_or_else(|| PolicyError("a policy is a JSON object".into()))?;
        for k in obj.keys() {
            if !matches!(k.as_str(), "Version" | "Id" | "Statement") {
                return bad(format!("unknown policy element {k:?} (expected Version, Id, Statement)"));
            }
        }
        match obj.get("Version") {
            None => {}
            Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
            Some(_) => return bad("Version must be \"2012-10-17\""),
        }
        let list = match obj.get("Statement") {
            Some(Value::Array(s)) if !s.is_empty() => s.clone(),
            Some(s @ Value::Object(_)) => vec![s.clone()],
            _ => return bad("it needs a Statement (an object or a non-empty list)"),
        };
        let statements =
            list.iter().enumerate().map(|(i, s)| Statement::parse(s, i + 1)).collect::<Result<Vec<_>>>()?;
        Ok(Self { statements })
    }

    /// Evaluates the policy for one request.
    pub fn evaluate(&self, r: &RequestFacts<'_>) -> Decision {
        let mut action = String::with_capacity(4 + r.action.len());
        action.push_str("kms:");
        action.push_str(r.action);
        action.make_ascii_lowercase();
        let mut allow = None;
        for s in &self.statements {
            if !s.applies(r, &action) {
                continue;
            }
            match s.effect {
                Effect::Deny => return Decision::Deny(s.label.clone()),
                Effect::Allow => {
                    allow.get_or_insert_with(|| s.label.clone());
                }
            }
        }
        allow.map_or(Decision::NoMatch, Decision::Allow)
    }

    /// Every principal pattern an `Allow` statement names, with its statement's label.
    pub fn allowed_patterns(&self) -> Vec<(&PrincipalPattern, &str)> {
        self.statements
            .iter()
            .filter(|s| s.effect == Effect::Allow)
            .flat_map(|s| s.principals.iter().map(move |p| (p, s.label.as_str())))
            .collect()
    }

    /// Whether an `Allow` statement naming `pattern` could allow `action` on `resource` (its
    /// conditions set aside: a conditional allow still counts), and no unconditional `Deny`
    /// covering the same principal takes it away. Used by separation of duties, which must
    /// refuse what a request could ever be allowed.
    pub fn may_allow(&self, pattern: &PrincipalPattern, action: &str, resource: &str) -> bool {
        let covers = |s: &Statement| s.principals.iter().any(|p| p == pattern || p == &PrincipalPattern::Any);
        let allowed = self.statements.iter().any(|s| {
            s.effect == Effect::Allow
                && s.principals.contains(pattern)
                && s.actions.matches(&format!("kms:{action}").to_ascii_lowercase())
                && s.resources.matches(resource)
        });
        let denied = self.statements.iter().any(|s| {
            s.effect == Effect::Deny
                && s.conditions.is_empty()
                && covers(s)
                && s.actions.matches(&format!("kms:{action}").to_ascii_lowercase())
                && s.resources.matches(resource)
        });
        allowed && !denied
    }
}

impl Statement {
    fn parse(v: &Value, n: usize) -> Result<Self> {
        let o = v.as_object().ok_or_else(|| PolicyError(format!("statement {n} is not an object")))?;
        for k in o.keys() {
            match k.as_str() {
                "Sid" | "Effect" | "Principal" | "Action" | "NotAction" | "Resource" | "NotResource" | "Condition" => {}
                "NotPrincipal" => return bad(format!("statement {n}: NotPrincipal is not supported; use a Deny statement with a condition on aws:PrincipalArn")),
                other => return bad(format!("statement {n}: unknown element {other:?}")),
            }
        }
        let label = match o.get("Sid") {
            None => format!("statement {n}"),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return bad(format!("statement {n}: Sid must be a string")),
        };
        let effect = match o.get("Effect").and_then(Value::as_str) {
            Some("Allow") => Effect::Allow,
            Some("Deny") => Effect::Deny,
            _ => return bad(format!("{label}: Effect must be Allow or Deny")),
        };
        let principals = match o.get("Principal") {
            Some(Value::String(s)) if s == "*" => vec![PrincipalPattern::Any],
            Some(Value::Object(m)) if !m.is_empty() => {
                let mut out = Vec::new();
                for (kind, v) in m {
                    let entries = strings(v, &format!("{label}: Principal.{kind}"))?;
                    match kind.as_str() {
                        "AWS" => {
                            for e in entries {
                                out.push(
                                    PrincipalPattern::parse(&e)
                                        .map_err(|e| PolicyError(format!("{label}: {}", e.0)))?,
                                );
                            }
                        }
                        "Service" | "Federated" | "CanonicalUser" => {
                            out.extend(entries.into_iter().map(PrincipalPattern::Foreign))
                        }
                        other => return bad(format!("{label}: unknown principal type {other:?}")),
                    }
                }
                out
            }
            _ => return bad(format!("{label}: a key policy statement needs a Principal (\"*\" or {{\"AWS\": ...}})")),
        };
        let pair = |yes: &str, no: &str| -> Result<(bool, Vec<String>)> {
            match (o.get(yes), o.get(no)) {
                (Some(v), None) => Ok((false, strings(v, &format!("{label}: {yes}"))?)),
                (None, Some(v)) => Ok((true, strings(v, &format!("{label}: {no}"))?)),
                (Some(_), Some(_)) => bad(format!("{label}: give {yes} or {no}, not both")),
                (None, None) => bad(format!("{label}: needs {yes} (or {no})")),
            }
        };
        let (not, mut names) = pair("Action", "NotAction")?;
        names.iter_mut().for_each(|a| a.make_ascii_lowercase());
        for a in &names {
            if a != "*" && !a.contains(':') {
                return bad(format!("{label}: action {a:?} needs a service prefix, as in kms:Decrypt"));
            }
        }
        let actions = Patterns { not, patterns: names.into_iter().map(Pattern::new).collect() };
        let (not, names) = pair("Resource", "NotResource")?;
        let resources = Patterns { not, patterns: names.into_iter().map(Pattern::new).collect() };
        let mut conditions = Vec::new();
        match o.get("Condition") {
            None => {}
            Some(Value::Object(ops)) => {
                for (op_name, keys) in ops {
                    let (set, rest) = if let Some(r) = op_name.strip_prefix("ForAnyValue:") {
                        (SetOp::ForAnyValue, r)
                    } else if let Some(r) = op_name.strip_prefix("ForAllValues:") {
                        (SetOp::ForAllValues, r)
                    } else {
                        (SetOp::Single, op_name.as_str())
                    };
                    let (base, if_exists) = match rest.strip_suffix("IfExists") {
                        Some(b) => (b, true),
                        None => (rest, false),
                    };
                    let op = Op::parse(base)
                        .ok_or_else(|| PolicyError(format!("{label}: unsupported condition operator {op_name:?}")))?;
                    if op == Op::Null && (if_exists || set != SetOp::Single) {
                        return bad(format!("{label}: Null takes no ForAnyValue/ForAllValues/IfExists"));
                    }
                    let keys = keys
                        .as_object()
                        .ok_or_else(|| PolicyError(format!("{label}: {op_name} must map keys to values")))?;
                    for (key, values) in keys {
                        let key = ConditionKey::parse(key).map_err(|e| PolicyError(format!("{label}: {}", e.0)))?;
                        let values = condition_values(values).map_err(|e| PolicyError(format!("{label}: {}", e.0)))?;
                        if matches!(op, Op::IpAddress | Op::NotIpAddress) {
                            if key != ConditionKey::SourceIp {
                                return bad(format!("{label}: {op_name} applies to aws:SourceIp only"));
                            }
                            if let Some(v) = values.iter().find(|v| parse_cidr(v).is_none()) {
                                return bad(format!("{label}: {v:?} is not an IP address or CIDR block"));
                            }
                        }
                        conditions.push(Condition { set, op, if_exists, key, values });
                    }
                }
            }
            Some(_) => return bad(format!("{label}: Condition must be an object")),
        }
        Ok(Self { label, effect, principals, actions, resources, conditions })
    }

    /// `action` is `kms:<action>` in lower case.
    fn applies(&self, r: &RequestFacts<'_>, action: &str) -> bool {
        self.principals.iter().any(|p| p.matches(&r.subject, r.key_tenant))
            && self.actions.matches(action)
            && self.resources.matches(r.resource)
            && self.conditions.iter().all(|c| c.holds(r, self.effect))
    }
}

/// IAM wildcards: `*` any run of characters, `?` one character.
pub fn glob(pattern: &str, value: &str) -> bool {
    Shape::of(pattern).matches(pattern, value)
}

fn glob_in<T: Copy + PartialEq + From<u8>>(p: &[T], v: &[T]) -> bool {
    let (star, any) = (T::from(b'*'), T::from(b'?'));
    let (mut pi, mut vi) = (0, 0);
    let (mut star_at, mut mark) = (None, 0);
    while vi < v.len() {
        // A `*` in the pattern is a wildcard even where the value has a `*` too.
        if pi < p.len() && p[pi] == star {
            star_at = Some(pi);
            mark = vi;
            pi += 1;
        } else if pi < p.len() && (p[pi] == any || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if let Some(s) = star_at {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == star)
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip.parse::<IpAddr>().ok()?, bits.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

/// An IPv4-mapped IPv6 network (`::ffff:a.b.c.d/n`, n >= 96) as the IPv4 network it is.
fn canonical_net(net: IpAddr, bits: u8) -> (IpAddr, u8) {
    match net {
        IpAddr::V6(v6) if bits >= 96 => v6.to_ipv4_mapped().map_or((net, bits), |v4| (IpAddr::V4(v4), bits - 96)),
        _ => (net, bits),
    }
}

fn ip_in(cidr: &str, value: &str) -> bool {
    let (Some((net, bits)), Ok(ip)) = (parse_cidr(cidr), value.parse::<IpAddr>()) else { return false };
    // A dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d: it is that IPv4 address (as
    // an IPv6 CIDR does not cover IPv4 addresses, nor an IPv4 one IPv6 addresses, as in AWS).
    let ((net, bits), ip) = (canonical_net(net, bits), ip.to_canonical());
    let mask = |len: u32, total: u32| if len == 0 { 0u128 } else { u128::MAX << (total - len) };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let m = mask(u32::from(bits), 32) as u32;
            u32::from(n) & m == u32::from(i) & m
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let m = mask(u32::from(bits), 128);
            u128::from(n) & m == u128::from(i) & m
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    /// IAM's wildcards, written as their definition: `*` any run, `?` any one character.
    fn reference(p: &[char], v: &[char]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some(('*', rest)) => (0..=v.len()).any(|i| reference(rest, &v[i..])),
            Some(('?', rest)) => !v.is_empty() && reference(rest, &v[1..]),
            Some((c, rest)) => v.first() == Some(c) && reference(rest, &v[1..]),
        }
    }

    /// Every string of up to `max` characters from `alphabet`.
    fn strings(alphabet: &[char], max: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last.iter().flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}"))).collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn glob_agrees_with_the_definition_on_every_short_string() {
        // Wildcards, literals, a non-ASCII character (the char path) and the wildcards as values.
        let patterns = strings(&['a', 'b', '*', '?', 'é'], 4);
        let values = strings(&['a', 'b', '*', '?', 'é'], 4);
        for p in &patterns {
            let pc: Vec<char> = p.chars().collect();
            for v in &values {
                let vc: Vec<char> = v.chars().collect();
                assert_eq!(glob(p, v), reference(&pc, &vc), "glob({p:?}, {v:?})");
            }
        }
    }

    #[test]
    fn a_parsed_pattern_matches_as_glob_does() {
        let all = strings(&['a', 'b', '*', '?', 'é'], 4);
        for p in &all {
            let parsed = super::Pattern::new(p.clone());
            for v in &all {
                assert_eq!(parsed.matches(v), glob(p, v), "Pattern({p:?}) against {v:?}");
            }
        }
    }

    #[test]
    fn glob_matches_iam_names() {
        assert!(glob("kms:Encrypt", "kms:Encrypt"));
        assert!(!glob("kms:Encrypt", "kms:EncryptX"));
        assert!(glob("kms:ReEncrypt*", "kms:ReEncryptFrom"));
        assert!(glob("kms:GenerateDataKey*", "kms:GenerateDataKey"));
        assert!(glob("arn:aws:iam::*:user/app-?", "arn:aws:iam::111122223333:user/app-1"));
        assert!(!glob("arn:aws:iam::*:user/app-?", "arn:aws:iam::111122223333:user/app-10"));
        assert!(glob("*", ""));
        assert!(!glob("?", ""));
    }
}
