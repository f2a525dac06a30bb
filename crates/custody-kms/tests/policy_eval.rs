//! The key-policy evaluator, table-driven: one row per behaviour of AWS's grammar that custody
//! evaluates (wildcards, NotAction, every condition operator, deny-wins, missing context keys,
//! ForAnyValue vs ForAllValues on empty sets), plus the documents it refuses.

use std::collections::BTreeMap;

use custody_kms::policy::{Decision, Policy, RequestFacts, Subject};
use custody_kms::{PrincipalName, TenantId};
use serde_json::{json, Value};

const A: &str = "111111111111";
const B: &str = "222222222222";
const KEY: &str = "arn:aws:kms:us-east-1:111111111111:key/0b6b2b0e-58c7-4e6c-9d2c-3c1b2f7c1a11";

/// A request: who (tenant, name), action, context, source address. The key is always KEY (tenant A).
struct Req {
    tenant: &'static str,
    name: &'static str,
    action: &'static str,
    context: Option<Vec<(&'static str, &'static str)>>,
    ip: Option<&'static str>,
}

fn req(action: &'static str) -> Req {
    Req { tenant: A, name: "alice", action, context: None, ip: None }
}

impl Req {
    fn by(mut self, tenant: &'static str, name: &'static str) -> Self {
        self.tenant = tenant;
        self.name = name;
        self
    }
    fn ctx(mut self, pairs: &[(&'static str, &'static str)]) -> Self {
        self.context = Some(pairs.to_vec());
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.ip = Some(ip);
        self
    }
}

#[derive(Debug, PartialEq)]
enum Want {
    Allow(&'static str),
    Deny(&'static str),
    None,
}

fn statement(principal: Value, action: Value, condition: Option<Value>) -> Value {
    let mut s = json!({ "Sid": "S", "Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*" });
    if let Some(c) = condition {
        s["Condition"] = c;
    }
    s
}

fn doc(statements: Vec<Value>) -> String {
    json!({ "Version": "2012-10-17", "Statement": statements }).to_string()
}

fn alice() -> Value {
    json!({ "AWS": format!("arn:aws:iam::{A}:user/alice") })
}

/// A policy allowing alice Decrypt under one condition.
fn cond(c: Value) -> String {
    doc(vec![statement(alice(), json!("kms:Decrypt"), Some(c))])
}

fn run(policy: &str, r: &Req) -> Decision {
    let p = Policy::parse(policy).unwrap_or_else(|e| panic!("policy refused: {e:?}\n{policy}"));
    let tenant = TenantId::parse(r.tenant).unwrap();
    let name = PrincipalName::parse(r.name).unwrap();
    let key_tenant = TenantId::parse(A).unwrap();
    let context: Option<BTreeMap<String, String>> =
        r.context.as_ref().map(|c| c.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    let facts = RequestFacts {
        subject: Subject { tenant: &tenant, name: &name },
        action: r.action,
        resource: KEY,
        key_tenant: &key_tenant,
        context: context.as_ref(),
        source_ip: r.ip.map(|i| i.parse().unwrap()),
    };
    p.evaluate(&facts)
}

fn check(cases: Vec<(&str, String, Req, Want)>) {
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for (name, policy, r, want) in cases {
        let got = match run(&policy, &r) {
            Decision::Allow(s) => format!("Allow({s})"),
            Decision::Deny(s) => format!("Deny({s})"),
            Decision::NoMatch => "None".into(),
        };
        let expected = match want {
            Want::Allow(s) => format!("Allow({s})"),
            Want::Deny(s) => format!("Deny({s})"),
            Want::None => "None".into(),
        };
        if got != expected {
            failures.push(format!("{name}: expected {expected}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

use Want::{Allow, Deny, None as NoMatch};

#[test]
fn principals_actions_and_resources() {
    let kms_all = |p: Value| doc(vec![statement(p, json!("kms:*"), None)]);
    let cases = vec![
        ("named user matches", kms_all(alice()), req("Decrypt"), Allow("S")),
        ("named user, other name", kms_all(alice()), req("Decrypt").by(A, "bob"), NoMatch),
        ("role/ ARN names the principal", kms_all(json!({"AWS": format!("arn:aws:iam::{A}:role/alice")})), req("Decrypt"), Allow("S")),
        ("IAM path: last segment is the name", kms_all(json!({"AWS": format!("arn:aws:iam::{A}:user/team/alice")})), req("Decrypt"), Allow("S")),
        ("account root covers every principal of it", kms_all(json!({"AWS": format!("arn:aws:iam::{A}:root")})), req("Decrypt").by(A, "bob"), Allow("S")),
        ("bare account id is the account root", kms_all(json!({"AWS": A})), req("Decrypt").by(A, "carol"), Allow("S")),
        ("account root of another tenant", kms_all(json!({"AWS": B})), req("Decrypt"), NoMatch),
        ("foreign principal named by account", kms_all(json!({"AWS": B})), req("Decrypt").by(B, "bob"), Allow("S")),
        ("foreign principal named by ARN", kms_all(json!({"AWS": format!("arn:aws:iam::{B}:user/bob")})), req("Decrypt").by(B, "bob"), Allow("S")),
        ("\"*\" covers the key's tenant", kms_all(json!("*")), req("Decrypt").by(A, "zed"), Allow("S")),
        ("\"*\" does not reach another tenant", kms_all(json!("*")), req("Decrypt").by(B, "bob"), NoMatch),
        ("{\"AWS\": \"*\"} is \"*\"", kms_all(json!({"AWS": "*"})), req("Decrypt").by(B, "bob"), NoMatch),
        ("list of principals", kms_all(json!({"AWS": [format!("arn:aws:iam::{A}:user/bob"), format!("arn:aws:iam::{A}:user/alice")]})), req("Encrypt"), Allow("S")),
        ("service principals never match", kms_all(json!({"Service": "logs.amazonaws.com"})), req("Decrypt"), NoMatch),
        ("exact action", doc(vec![statement(alice(), json!("kms:Encrypt"), None)]), req("Encrypt"), Allow("S")),
        ("exact action, other action", doc(vec![statement(alice(), json!("kms:Encrypt"), None)]), req("Decrypt"), NoMatch),
        ("action names are case-insensitive", doc(vec![statement(alice(), json!("KMS:decrypt"), None)]), req("Decrypt"), Allow("S")),
        ("prefix wildcard", doc(vec![statement(alice(), json!("kms:GenerateDataKey*"), None)]), req("GenerateDataKeyWithoutPlaintext"), Allow("S")),
        ("prefix wildcard, no match", doc(vec![statement(alice(), json!("kms:GenerateDataKey*"), None)]), req("Decrypt"), NoMatch),
        ("? matches one character", doc(vec![statement(alice(), json!("kms:?ncrypt"), None)]), req("Encrypt"), Allow("S")),
        ("? does not match two", doc(vec![statement(alice(), json!("kms:?ecrypt"), None)]), req("Encrypt"), NoMatch),
        ("ReEncrypt* covers both halves", doc(vec![statement(alice(), json!("kms:ReEncrypt*"), None)]), req("ReEncryptTo"), Allow("S")),
        ("bare * action", doc(vec![statement(alice(), json!("*"), None)]), req("PutKeyPolicy"), Allow("S")),
        ("other service's action", doc(vec![statement(alice(), json!("s3:*"), None)]), req("Decrypt"), NoMatch),
        ("list of actions", doc(vec![statement(alice(), json!(["kms:Encrypt", "kms:Decrypt"]), None)]), req("Decrypt"), Allow("S")),
        (
            "NotAction: everything but",
            doc(vec![json!({"Sid": "N", "Effect": "Allow", "Principal": alice(), "NotAction": "kms:Decrypt", "Resource": "*"})]),
            req("Encrypt"),
            Allow("N"),
        ),
        (
            "NotAction: not the excluded one",
            doc(vec![json!({"Sid": "N", "Effect": "Allow", "Principal": alice(), "NotAction": "kms:Decrypt", "Resource": "*"})]),
            req("Decrypt"),
            NoMatch,
        ),
        (
            "NotAction with a wildcard",
            doc(vec![json!({"Sid": "N", "Effect": "Allow", "Principal": alice(), "NotAction": ["kms:Put*", "kms:Schedule*"], "Resource": "*"})]),
            req("PutKeyPolicy"),
            NoMatch,
        ),
        (
            "Resource: the key's ARN",
            doc(vec![json!({"Sid": "R", "Effect": "Allow", "Principal": alice(), "Action": "kms:*", "Resource": KEY})]),
            req("Decrypt"),
            Allow("R"),
        ),
        (
            "Resource: another key",
            doc(vec![json!({"Sid": "R", "Effect": "Allow", "Principal": alice(), "Action": "kms:*", "Resource": "arn:aws:kms:us-east-1:111111111111:key/other"})]),
            req("Decrypt"),
            NoMatch,
        ),
        (
            "Resource with a wildcard",
            doc(vec![json!({"Sid": "R", "Effect": "Allow", "Principal": alice(), "Action": "kms:*", "Resource": "arn:aws:kms:*:111111111111:key/*"})]),
            req("Decrypt"),
            Allow("R"),
        ),
        (
            "a statement without Sid is named by position",
            doc(vec![json!({"Effect": "Allow", "Principal": alice(), "Action": "kms:*", "Resource": "*"})]),
            req("Decrypt"),
            Allow("statement 1"),
        ),
        (
            "a single statement object (not a list)",
            json!({"Statement": {"Sid": "One", "Effect": "Allow", "Principal": alice(), "Action": "kms:*", "Resource": "*"}}).to_string(),
            req("Decrypt"),
            Allow("One"),
        ),
    ];
    check(cases);
}

#[test]
fn deny_wins_and_default_deny() {
    let allow_all = statement(json!({"AWS": A}), json!("kms:*"), None);
    let deny =
        |action: &str| json!({"Sid": "D", "Effect": "Deny", "Principal": alice(), "Action": action, "Resource": "*"});
    let cases = vec![
        (
            "empty of matches: default deny",
            doc(vec![statement(alice(), json!("kms:Encrypt"), None)]),
            req("Decrypt"),
            NoMatch,
        ),
        ("explicit deny beats an allow", doc(vec![allow_all.clone(), deny("kms:Decrypt")]), req("Decrypt"), Deny("D")),
        ("deny first or last: same", doc(vec![deny("kms:Decrypt"), allow_all.clone()]), req("Decrypt"), Deny("D")),
        (
            "deny of another action leaves the allow",
            doc(vec![allow_all.clone(), deny("kms:Decrypt")]),
            req("Encrypt"),
            Allow("S"),
        ),
        (
            "deny of another principal leaves the allow",
            doc(vec![allow_all.clone(), deny("kms:Decrypt")]),
            req("Decrypt").by(A, "bob"),
            Allow("S"),
        ),
        (
            "conditional deny applies only when its condition holds",
            doc(vec![
                allow_all.clone(),
                json!({"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:env": "prod"}}}),
            ]),
            req("Decrypt").ctx(&[("env", "dev")]),
            Allow("S"),
        ),
        (
            "conditional deny when it holds",
            doc(vec![
                allow_all.clone(),
                json!({"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:env": "prod"}}}),
            ]),
            req("Decrypt").ctx(&[("env", "prod")]),
            Deny("D"),
        ),
        ("deny alone: deny", doc(vec![deny("kms:*")]), req("Encrypt"), Deny("D")),
        (
            // Context keys are case-sensitive, condition key names are not: both spellings count,
            // and the ambiguity goes against the caller.
            "a deny on a context key holds when any spelling of the key meets it",
            doc(vec![
                allow_all.clone(),
                json!({"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:app": "secret"}}}),
            ]),
            req("Decrypt").ctx(&[("App", "x"), ("app", "secret")]),
            Deny("D"),
        ),
        (
            "an allow on a context key needs every spelling of the key to meet it",
            doc(vec![
                json!({"Sid": "S", "Effect": "Allow", "Principal": alice(), "Action": "kms:Decrypt", "Resource": "*", "Condition": {"StringEquals": {"kms:EncryptionContext:app": "billing"}}}),
            ]),
            req("Decrypt").ctx(&[("App", "billing"), ("app", "other")]),
            NoMatch,
        ),
        (
            // A `*` in the value is a character like any other: the pattern's `*` still matches
            // across it (it used to be taken as a literal match there, and the deny was escaped).
            "a StringLike deny holds for a value with a * in it",
            doc(vec![
                allow_all.clone(),
                json!({"Sid": "D", "Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*", "Condition": {"StringLike": {"kms:EncryptionContext:path": "secret/*"}}}),
            ]),
            req("Encrypt").ctx(&[("path", "secret/*x")]),
            Deny("D"),
        ),
    ];
    check(cases);
}

#[test]
fn string_conditions() {
    let ec = |op: &str, v: Value| cond(json!({ op: { "kms:EncryptionContext:app": v } }));
    let cases = vec![
        (
            "StringEquals hit",
            ec("StringEquals", json!("billing")),
            req("Decrypt").ctx(&[("app", "billing")]),
            Allow("S"),
        ),
        ("StringEquals miss", ec("StringEquals", json!("billing")), req("Decrypt").ctx(&[("app", "hr")]), NoMatch),
        (
            "StringEquals is case-sensitive in values",
            ec("StringEquals", json!("billing")),
            req("Decrypt").ctx(&[("app", "Billing")]),
            NoMatch,
        ),
        (
            "StringEquals: any of several values",
            ec("StringEquals", json!(["hr", "billing"])),
            req("Decrypt").ctx(&[("app", "billing")]),
            Allow("S"),
        ),
        (
            "StringEquals: missing key is false",
            ec("StringEquals", json!("billing")),
            req("Decrypt").ctx(&[("other", "x")]),
            NoMatch,
        ),
        ("StringEquals: no context at all is false", ec("StringEquals", json!("billing")), req("Decrypt"), NoMatch),
        (
            "context key names are case-insensitive",
            ec("StringEquals", json!("billing")),
            req("Decrypt").ctx(&[("App", "billing")]),
            Allow("S"),
        ),
        (
            "StringNotEquals hit",
            ec("StringNotEquals", json!("billing")),
            req("Decrypt").ctx(&[("app", "hr")]),
            Allow("S"),
        ),
        (
            "StringNotEquals miss",
            ec("StringNotEquals", json!("billing")),
            req("Decrypt").ctx(&[("app", "billing")]),
            NoMatch,
        ),
        ("StringNotEquals: missing key is true", ec("StringNotEquals", json!("billing")), req("Decrypt"), Allow("S")),
        (
            "StringEqualsIgnoreCase",
            ec("StringEqualsIgnoreCase", json!("billing")),
            req("Decrypt").ctx(&[("app", "BILLING")]),
            Allow("S"),
        ),
        (
            "StringNotEqualsIgnoreCase",
            ec("StringNotEqualsIgnoreCase", json!("billing")),
            req("Decrypt").ctx(&[("app", "BILLING")]),
            NoMatch,
        ),
        (
            "StringLike with *",
            ec("StringLike", json!("bill*")),
            req("Decrypt").ctx(&[("app", "billing-eu")]),
            Allow("S"),
        ),
        ("StringLike with ?", ec("StringLike", json!("h?")), req("Decrypt").ctx(&[("app", "hr")]), Allow("S")),
        ("StringLike miss", ec("StringLike", json!("bill*")), req("Decrypt").ctx(&[("app", "hr")]), NoMatch),
        ("StringLike: missing key is false", ec("StringLike", json!("*")), req("Decrypt"), NoMatch),
        ("StringNotLike hit", ec("StringNotLike", json!("bill*")), req("Decrypt").ctx(&[("app", "hr")]), Allow("S")),
        ("StringNotLike miss", ec("StringNotLike", json!("bill*")), req("Decrypt").ctx(&[("app", "billing")]), NoMatch),
        ("StringNotLike: missing key is true", ec("StringNotLike", json!("bill*")), req("Decrypt"), Allow("S")),
        ("IfExists: missing key is true", ec("StringEqualsIfExists", json!("billing")), req("Decrypt"), Allow("S")),
        (
            "IfExists: present key is tested",
            ec("StringEqualsIfExists", json!("billing")),
            req("Decrypt").ctx(&[("app", "hr")]),
            NoMatch,
        ),
        (
            "all conditions must hold (AND across keys)",
            cond(
                json!({"StringEquals": {"kms:EncryptionContext:app": "billing", "kms:EncryptionContext:env": "prod"}}),
            ),
            req("Decrypt").ctx(&[("app", "billing"), ("env", "dev")]),
            NoMatch,
        ),
        (
            "all conditions hold",
            cond(
                json!({"StringEquals": {"kms:EncryptionContext:app": "billing"}, "StringLike": {"kms:EncryptionContext:env": "pr*"}}),
            ),
            req("Decrypt").ctx(&[("app", "billing"), ("env", "prod")]),
            Allow("S"),
        ),
        ("kms:CallerAccount", cond(json!({"StringEquals": {"kms:CallerAccount": A}})), req("Decrypt"), Allow("S")),
        ("kms:CallerAccount other", cond(json!({"StringEquals": {"kms:CallerAccount": B}})), req("Decrypt"), NoMatch),
        (
            "aws:PrincipalArn",
            cond(json!({"StringEquals": {"aws:PrincipalArn": format!("arn:aws:iam::{A}:user/alice")}})),
            req("Decrypt"),
            Allow("S"),
        ),
        (
            "aws:PrincipalArn like",
            cond(json!({"StringLike": {"aws:PrincipalArn": "arn:aws:iam::*:user/al*"}})),
            req("Decrypt"),
            Allow("S"),
        ),
    ];
    check(cases);
}

#[test]
fn set_operators_bool_null_and_ip() {
    let keys = |op: &str, v: Value| cond(json!({ op: { "kms:EncryptionContextKeys": v } }));
    let cases = vec![
        (
            "ForAnyValue: one key matches",
            keys("ForAnyValue:StringEquals", json!(["app"])),
            req("Decrypt").ctx(&[("app", "x"), ("zz", "y")]),
            Allow("S"),
        ),
        (
            "ForAnyValue: none matches",
            keys("ForAnyValue:StringEquals", json!(["app"])),
            req("Decrypt").ctx(&[("zz", "y")]),
            NoMatch,
        ),
        ("ForAnyValue: empty set is false", keys("ForAnyValue:StringEquals", json!(["app"])), req("Decrypt"), NoMatch),
        (
            "ForAnyValue: empty context map is false",
            keys("ForAnyValue:StringEquals", json!(["app"])),
            req("Decrypt").ctx(&[]),
            NoMatch,
        ),
        (
            "ForAllValues: every key allowed",
            keys("ForAllValues:StringEquals", json!(["app", "env"])),
            req("Decrypt").ctx(&[("app", "x"), ("env", "y")]),
            Allow("S"),
        ),
        (
            "ForAllValues: one key not allowed",
            keys("ForAllValues:StringEquals", json!(["app", "env"])),
            req("Decrypt").ctx(&[("app", "x"), ("zz", "y")]),
            NoMatch,
        ),
        (
            "ForAllValues: empty set is true",
            keys("ForAllValues:StringEquals", json!(["app"])),
            req("Decrypt"),
            Allow("S"),
        ),
        (
            "ForAllValues:StringLike",
            keys("ForAllValues:StringLike", json!(["app*"])),
            req("Decrypt").ctx(&[("app1", "x"), ("app2", "y")]),
            Allow("S"),
        ),
        (
            "ForAnyValue:StringNotEquals",
            keys("ForAnyValue:StringNotEquals", json!(["app"])),
            req("Decrypt").ctx(&[("app", "x"), ("env", "y")]),
            Allow("S"),
        ),
        (
            "ForAllValues:StringNotEquals",
            keys("ForAllValues:StringNotEquals", json!(["secret"])),
            req("Decrypt").ctx(&[("secret", "x")]),
            NoMatch,
        ),
        (
            "ForAnyValue on a single-valued key",
            cond(json!({"ForAnyValue:StringEquals": {"kms:EncryptionContext:app": ["a", "b"]}})),
            req("Decrypt").ctx(&[("app", "b")]),
            Allow("S"),
        ),
        (
            "Bool false on GrantIsForAWSResource",
            cond(json!({"Bool": {"kms:GrantIsForAWSResource": "false"}})),
            req("Decrypt"),
            Allow("S"),
        ),
        (
            "Bool true on GrantIsForAWSResource never holds",
            cond(json!({"Bool": {"kms:GrantIsForAWSResource": true}})),
            req("Decrypt"),
            NoMatch,
        ),
        (
            "Null true: key absent",
            cond(json!({"Null": {"kms:EncryptionContext:app": "true"}})),
            req("Decrypt"),
            Allow("S"),
        ),
        (
            "Null true: key present",
            cond(json!({"Null": {"kms:EncryptionContext:app": "true"}})),
            req("Decrypt").ctx(&[("app", "x")]),
            NoMatch,
        ),
        (
            "Null false: key present",
            cond(json!({"Null": {"kms:EncryptionContext:app": "false"}})),
            req("Decrypt").ctx(&[("app", "x")]),
            Allow("S"),
        ),
        (
            "Null false: key absent",
            cond(json!({"Null": {"kms:EncryptionContext:app": false}})),
            req("Decrypt"),
            NoMatch,
        ),
        (
            "Null false on context keys: some context",
            cond(json!({"Null": {"kms:EncryptionContextKeys": "false"}})),
            req("Decrypt").ctx(&[("a", "b")]),
            Allow("S"),
        ),
        (
            "Null false on context keys: none",
            cond(json!({"Null": {"kms:EncryptionContextKeys": "false"}})),
            req("Decrypt"),
            NoMatch,
        ),
        (
            "IpAddress in CIDR",
            cond(json!({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
            req("Decrypt").ip("10.1.2.3"),
            Allow("S"),
        ),
        (
            "IpAddress outside CIDR",
            cond(json!({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
            req("Decrypt").ip("192.168.1.1"),
            NoMatch,
        ),
        (
            "IpAddress single address",
            cond(json!({"IpAddress": {"aws:SourceIp": "127.0.0.1"}})),
            req("Decrypt").ip("127.0.0.1"),
            Allow("S"),
        ),
        (
            "IpAddress IPv6",
            cond(json!({"IpAddress": {"aws:SourceIp": "2001:db8::/32"}})),
            req("Decrypt").ip("2001:db8::1"),
            Allow("S"),
        ),
        (
            "NotIpAddress",
            cond(json!({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
            req("Decrypt").ip("192.168.1.1"),
            Allow("S"),
        ),
        (
            // A dual-stack listener ([::]:PORT) sees IPv4 clients as IPv4-mapped IPv6 addresses:
            // they are the IPv4 address, for IpAddress and NotIpAddress alike.
            "IpAddress: an IPv4-mapped IPv6 source is its IPv4 address",
            cond(json!({"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
            req("Decrypt").ip("::ffff:10.1.2.3"),
            Allow("S"),
        ),
        (
            "NotIpAddress: an IPv4-mapped IPv6 source is its IPv4 address",
            cond(json!({"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}})),
            req("Decrypt").ip("::ffff:10.1.2.3"),
            NoMatch,
        ),
        (
            "IpAddress: an IPv4-mapped CIDR matches IPv4 sources",
            cond(json!({"IpAddress": {"aws:SourceIp": "::ffff:10.0.0.0/104"}})),
            req("Decrypt").ip("10.1.2.3"),
            Allow("S"),
        ),
        (
            "IpAddress: unknown source is false",
            cond(json!({"IpAddress": {"aws:SourceIp": "0.0.0.0/0"}})),
            req("Decrypt"),
            NoMatch,
        ),
    ];
    check(cases);
}

#[test]
fn documents_custody_refuses_and_why() {
    let refused = [
        ("not JSON", "{", "not JSON"),
        ("not an object", "[]", "JSON object"),
        ("no statement", r#"{"Version":"2012-10-17"}"#, "Statement"),
        ("empty statement list", r#"{"Statement":[]}"#, "Statement"),
        ("unknown top-level element", r#"{"Statement":[],"Extra":1}"#, "unknown policy element"),
        ("bad version", r#"{"Version":"2020-01-01","Statement":{}}"#, "Version"),
        ("bad effect", r#"{"Statement":{"Effect":"Maybe","Principal":"*","Action":"kms:*","Resource":"*"}}"#, "Effect"),
        ("no principal", r#"{"Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}"#, "Principal"),
        (
            "NotPrincipal",
            r#"{"Statement":{"Effect":"Allow","NotPrincipal":{"AWS":"*"},"Action":"kms:*","Resource":"*"}}"#,
            "NotPrincipal",
        ),
        (
            "bad principal ARN",
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::12:user/x"},"Action":"kms:*","Resource":"*"}}"#,
            "invalid principal",
        ),
        (
            "Action and NotAction",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","NotAction":"kms:Decrypt","Resource":"*"}}"#,
            "not both",
        ),
        ("no action", r#"{"Statement":{"Effect":"Allow","Principal":"*","Resource":"*"}}"#, "Action"),
        (
            "action without prefix",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"Decrypt","Resource":"*"}}"#,
            "service prefix",
        ),
        ("no resource", r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*"}}"#, "Resource"),
        (
            "unknown operator",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericEquals":{"kms:CallerAccount":"1"}}}}"#,
            "unsupported condition operator",
        ),
        (
            "unknown condition key",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"kms:ViaService":"s3"}}}}"#,
            "unsupported condition key",
        ),
        (
            "IpAddress on a non-IP key",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"IpAddress":{"kms:CallerAccount":"1"}}}}"#,
            "aws:SourceIp",
        ),
        (
            "bad CIDR",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"IpAddress":{"aws:SourceIp":"10.0.0.0/33"}}}}"#,
            "CIDR",
        ),
        (
            "Null with IfExists",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NullIfExists":{"kms:CallerAccount":"true"}}}}"#,
            "Null",
        ),
        (
            "empty condition value list",
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"StringEquals":{"kms:CallerAccount":[]}}}}"#,
            "at least one value",
        ),
    ];
    for (name, text, why) in refused {
        match Policy::parse(text) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => assert!(e.0.contains(why), "{name}: message {:?} does not mention {why:?}", e.0),
        }
    }
}
