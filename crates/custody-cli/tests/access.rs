//! Access control over the wire, on a server configured as in production (separation of duties
//! enforced, new keys usable by nobody): each role's reach over mTLS and SigV4, key policies and
//! grants, tenant isolation, separation of duties, who-can and explain, and disabling a principal.

mod common;

use std::path::Path;

use custody_client::{Client, ClientError, Profile};
use serde_json::{json, Value};

use common::{code, send, Signer};

struct World {
    _dir: tempfile::TempDir,
    _server: custody_server::Server,
    addr: std::net::SocketAddr,
    ca: std::path::PathBuf,
    admin_profile: Profile,
    tenant: String,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let (layout, tenant) = common::init_store(dir.path(), custody_kms::InitOptions::FIRST_ADMIN_ROLES.to_vec(), None);
    // The production defaults: nothing relaxed.
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.separation_of_duties = "enforce".into();
        c.default_key_policy = "key-admins".into();
    })
    .await;
    let addr = server.local_addr();
    World { ca: layout.ca_cert(), _dir: dir, _server: server, addr, admin_profile: profile, tenant }
}

/// Writes an issued certificate (a Custody.IssueCertificate or CreateTenant answer) and returns
/// a profile using it.
fn profile_from(base: &Profile, dir: &Path, name: &str, cert: &Value) -> Profile {
    std::fs::create_dir_all(dir).unwrap();
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&crt, cert["Certificate"].as_str().unwrap()).unwrap();
    std::fs::write(&key, cert["PrivateKey"].as_str().unwrap()).unwrap();
    Profile {
        endpoint: base.endpoint.clone(),
        ca_file: base.ca_file.clone(),
        cert_file: Some(crt),
        key_file: Some(key),
    }
}

/// Creates a principal with `roles` in the tenant of `admin` and connects as it.
async fn principal(w: &World, admin: &mut Client, name: &str, roles: &[&str]) -> (Client, Signer) {
    admin.call("Custody.CreatePrincipal", json!({ "Name": name, "Roles": roles })).await.unwrap();
    let cert = admin.call("Custody.IssueCertificate", json!({ "Name": name, "TtlSeconds": 3600 })).await.unwrap();
    let dir = w._dir.path().join(format!("p-{name}"));
    let client = Client::connect(&profile_from(&w.admin_profile, &dir, name, &cert)).await.unwrap();
    let k = admin.call("Custody.CreateAccessKey", json!({ "Principal": name })).await.unwrap();
    let signer = Signer {
        id: k["AccessKey"]["AccessKeyId"].as_str().unwrap().into(),
        secret: k["AccessKey"]["SecretAccessKey"].as_str().unwrap().into(),
        region: "us-east-1".into(),
    };
    (client, signer)
}

fn err_code(r: Result<Value, ClientError>) -> String {
    match r {
        Ok(v) => format!("OK {v}"),
        Err(ClientError::Api { code, .. }) => code,
        Err(e) => format!("other error {e}"),
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Runs `action` as both identities of a principal (its certificate and its access key) and
/// returns the two outcomes ("OK" or the error code).
async fn both(w: &World, who: &mut (Client, Signer), action: &str, body: Value) -> (String, String) {
    let target = if action.contains('.') { action.to_string() } else { format!("TrentService.{action}") };
    let mtls = match who.0.call(&target, body.clone()).await {
        Ok(_) => "OK".to_string(),
        Err(e) => err_code(Err(e)),
    };
    let (status, v) = send(w.addr, &w.ca, &who.1, action, body, time::OffsetDateTime::now_utc(), |_| {}).await;
    let sigv4 = if status == 200 { "OK".to_string() } else { code(&v).to_string() };
    (mtls, sigv4)
}

#[tokio::test]
async fn each_role_over_mtls_and_sigv4() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut keyadmin = principal(&w, &mut admin, "keyadmin", &["key-admin"]).await;
    let mut app = principal(&w, &mut admin, "app", &["key-user"]).await;
    let mut auditor = principal(&w, &mut admin, "auditor", &["auditor"]).await;
    let mut tadmin = principal(&w, &mut admin, "tadmin", &["tenant-admin"]).await;
    let mut officer = principal(&w, &mut admin, "officer", &["security-officer"]).await;
    let mut first = Client::connect(&w.admin_profile).await.unwrap();

    // The first administrator is a security officer and tenant admin, not a key admin or user.
    assert_eq!(err_code(first.call("TrentService.CreateKey", json!({})).await), "AccessDeniedException");
    assert_eq!(err_code(first.call("Custody.ListAuditRecords", json!({})).await), "AccessDeniedException");

    let key = common::create_key(&mut keyadmin.0, "Arn").await;
    let encrypt = json!({ "KeyId": key, "Plaintext": b64(b"hello"), "EncryptionContext": { "app": "billing" } });

    // What each role can and cannot do, identically over both identities. The key has the
    // default policy: its tenant's key admins administer it; nobody may use it.
    let matrix: Vec<(&str, &str, Value, &str)> = vec![
        ("key-admin", "DescribeKey", json!({ "KeyId": key }), "OK"),
        ("key-admin", "ListKeys", json!({}), "OK"),
        ("key-admin", "EnableKeyRotation", json!({ "KeyId": key }), "OK"),
        ("key-admin", "TagResource", json!({ "KeyId": key, "Tags": [{"TagKey": "a", "TagValue": "b"}] }), "OK"),
        ("key-admin", "GetKeyPolicy", json!({ "KeyId": key, "PolicyName": "default" }), "OK"),
        ("key-admin", "Encrypt", encrypt.clone(), "AccessDeniedException"),
        ("key-admin", "GenerateDataKey", json!({ "KeyId": key, "NumberOfBytes": 32 }), "AccessDeniedException"),
        ("key-admin", "GenerateRandom", json!({ "NumberOfBytes": 8 }), "AccessDeniedException"),
        ("key-user", "Encrypt", encrypt.clone(), "AccessDeniedException"),
        ("key-user", "DescribeKey", json!({ "KeyId": key }), "OK"),
        ("key-user", "GenerateRandom", json!({ "NumberOfBytes": 8 }), "OK"),
        ("key-user", "CreateKey", json!({}), "AccessDeniedException"),
        ("key-user", "DisableKey", json!({ "KeyId": key }), "AccessDeniedException"),
        (
            "key-user",
            "PutKeyPolicy",
            json!({ "KeyId": key, "PolicyName": "default", "Policy": r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}}"# }),
            "AccessDeniedException",
        ),
        ("auditor", "ListKeys", json!({}), "OK"),
        ("auditor", "DescribeKey", json!({ "KeyId": key }), "OK"),
        ("auditor", "Encrypt", encrypt.clone(), "AccessDeniedException"),
        ("auditor", "CreateKey", json!({}), "AccessDeniedException"),
        ("auditor", "ScheduleKeyDeletion", json!({ "KeyId": key }), "AccessDeniedException"),
        ("auditor", "Custody.ListAuditRecords", json!({}), "OK"),
        ("auditor", "Custody.WhoCan", json!({ "KeyId": key, "Action": "Decrypt" }), "OK"),
        ("auditor", "Custody.CreatePrincipal", json!({ "Name": "x1", "Roles": [] }), "AccessDeniedException"),
        ("key-user", "Custody.ListAuditRecords", json!({}), "AccessDeniedException"),
        ("key-user", "Custody.WhoCan", json!({ "KeyId": key, "Action": "Decrypt" }), "AccessDeniedException"),
        ("key-admin", "Custody.WhoCan", json!({ "KeyId": key, "Action": "Decrypt" }), "OK"),
        ("key-admin", "Custody.ListPrincipals", json!({}), "AccessDeniedException"),
        ("tenant-admin", "Custody.ListPrincipals", json!({}), "OK"),
        ("tenant-admin", "Custody.IssueCertificate", json!({ "Name": "app", "TtlSeconds": 600 }), "OK"),
        ("tenant-admin", "Custody.DescribePrincipal", json!({ "Name": "app" }), "OK"),
        ("tenant-admin", "CreateKey", json!({}), "AccessDeniedException"),
        ("tenant-admin", "ListKeys", json!({}), "AccessDeniedException"),
        ("tenant-admin", "Encrypt", encrypt.clone(), "AccessDeniedException"),
        ("tenant-admin", "Custody.ListAuditRecords", json!({}), "AccessDeniedException"),
        ("tenant-admin", "Custody.CreateTenant", json!({ "Name": "t", "AdminName": "a" }), "AccessDeniedException"),
        (
            "tenant-admin",
            "Custody.CreatePrincipal",
            json!({ "Name": "so2", "Roles": ["security-officer"] }),
            "AccessDeniedException",
        ),
        ("security-officer", "Custody.ListTenants", json!({}), "OK"),
        ("security-officer", "Custody.CreateBackup", json!({}), "OK"),
        ("security-officer", "Custody.CheckStore", json!({}), "OK"),
        ("key-admin", "Custody.CreateBackup", json!({}), "AccessDeniedException"),
        ("auditor", "Custody.CreateBackup", json!({}), "AccessDeniedException"),
        ("auditor", "Custody.CheckStore", json!({}), "OK"),
        ("tenant-admin", "Custody.GetDestructionLedger", json!({}), "AccessDeniedException"),
        ("security-officer", "Custody.CreatePrincipal", json!({ "Name": "x2", "Roles": [] }), "AccessDeniedException"),
        ("security-officer", "CreateKey", json!({}), "AccessDeniedException"),
        ("security-officer", "Encrypt", encrypt.clone(), "AccessDeniedException"),
        ("security-officer", "DescribeKey", json!({ "KeyId": key }), "AccessDeniedException"),
    ];
    let mut failures = Vec::new();
    for (role, action, body, want) in matrix {
        let who = match role {
            "key-admin" => &mut keyadmin,
            "key-user" => &mut app,
            "tenant-admin" => &mut tadmin,
            "security-officer" => &mut officer,
            _ => &mut auditor,
        };
        let (mtls, sigv4) = both(&w, who, action, body).await;
        if mtls != want || sigv4 != want {
            failures.push(format!("{role} {action}: want {want}, mTLS {mtls}, SigV4 {sigv4}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A policy that opens use to the key user, under a condition on the encryption context.
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Sid": "Admins", "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{}:root", w.tenant) },
              "Action": ["kms:Describe*", "kms:Put*", "kms:Get*", "kms:List*", "kms:Enable*", "kms:Disable*", "kms:CreateGrant", "kms:RevokeGrant", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion", "kms:TagResource"], "Resource": "*" },
            { "Sid": "AppUse", "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{}:user/app", w.tenant) },
              "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
              "Condition": { "StringEquals": { "kms:EncryptionContext:app": "billing" } } }
        ]
    })
    .to_string();
    keyadmin
        .0
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": policy }))
        .await
        .unwrap();
    let (mtls, sigv4) = both(&w, &mut app, "Encrypt", encrypt.clone()).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("OK", "OK"));
    let wrong = json!({ "KeyId": key, "Plaintext": b64(b"hello"), "EncryptionContext": { "app": "hr" } });
    let (mtls, sigv4) = both(&w, &mut app, "Encrypt", wrong).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("AccessDeniedException", "AccessDeniedException"));
    // The key admin still cannot use it.
    let (mtls, sigv4) = both(&w, &mut keyadmin, "Encrypt", encrypt.clone()).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("AccessDeniedException", "AccessDeniedException"));

    // aws:SourceIp is the TCP peer's address (here 127.0.0.1): a deny on its range applies, a
    // deny on another range does not.
    for (range, want) in [("127.0.0.0/8", "AccessDeniedException"), ("10.0.0.0/8", "OK")] {
        let mut with_deny: Value = serde_json::from_str(&policy).unwrap();
        with_deny["Statement"].as_array_mut().unwrap().push(json!({
            "Sid": "NotFromHere", "Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*",
            "Condition": { "IpAddress": { "aws:SourceIp": range } }
        }));
        let put = json!({ "KeyId": key, "PolicyName": "default", "Policy": with_deny.to_string() });
        keyadmin.0.call("TrentService.PutKeyPolicy", put).await.unwrap();
        let (mtls, sigv4) = both(&w, &mut app, "Encrypt", encrypt.clone()).await;
        assert_eq!((mtls.as_str(), sigv4.as_str()), (want, want), "a deny on {range}");
    }
    let put = json!({ "KeyId": key, "PolicyName": "default", "Policy": policy });
    keyadmin.0.call("TrentService.PutKeyPolicy", put).await.unwrap();

    // Denied requests are in the trail, readable by the auditor.
    let denied =
        auditor.0.call("Custody.ListAuditRecords", json!({ "Outcome": "denied", "Limit": 1000 })).await.unwrap();
    let records = denied["Records"].as_array().unwrap();
    assert!(records.iter().any(|r| r["principal"].as_str().is_some_and(|p| p.ends_with(":user/keyadmin"))
        && r["action"] == "TrentService.Encrypt"));
}

#[tokio::test]
async fn separation_of_duties_is_enforced() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut keyadmin = principal(&w, &mut admin, "keyadmin", &["key-admin"]).await;
    let _app = principal(&w, &mut admin, "app", &["key-user"]).await;

    // A principal holding both key-admin and key-user is refused.
    let both_roles =
        admin.call("Custody.CreatePrincipal", json!({ "Name": "both", "Roles": ["key-admin", "key-user"] })).await;
    assert_eq!(err_code(both_roles), "SeparationOfDutiesException");
    let update =
        admin.call("Custody.UpdatePrincipal", json!({ "Name": "keyadmin", "Roles": ["key-admin", "key-user"] })).await;
    assert_eq!(err_code(update), "SeparationOfDutiesException");

    let key = common::create_key(&mut keyadmin.0, "KeyId").await;
    let before =
        keyadmin.0.call("TrentService.GetKeyPolicy", json!({ "KeyId": key, "PolicyName": "default" })).await.unwrap();

    // A policy that gives one named principal administration and Decrypt is refused, and
    // nothing changes.
    let user = |n: &str| format!("arn:aws:iam::{}:user/{n}", w.tenant);
    let both = json!({ "Statement": [
        { "Sid": "All", "Effect": "Allow", "Principal": { "AWS": user("keyadmin") }, "Action": ["kms:PutKeyPolicy", "kms:Decrypt"], "Resource": "*" }
    ]})
    .to_string();
    let r = keyadmin
        .0
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": both }))
        .await;
    match r {
        Err(ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "SeparationOfDutiesException");
            assert!(message.contains(&user("keyadmin")), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let after =
        keyadmin.0.call("TrentService.GetKeyPolicy", json!({ "KeyId": key, "PolicyName": "default" })).await.unwrap();
    assert_eq!(before, after);

    // Split across two statements, and through kms:*: the same.
    for policy in [
        json!({ "Statement": [
            { "Effect": "Allow", "Principal": { "AWS": user("keyadmin") }, "Action": "kms:DisableKey", "Resource": "*" },
            { "Effect": "Allow", "Principal": { "AWS": user("keyadmin") }, "Action": "kms:Decrypt", "Resource": "*" } ]}),
        json!({ "Statement": { "Effect": "Allow", "Principal": { "AWS": user("newcomer") }, "Action": "kms:*", "Resource": "*" } }),
    ] {
        let r = keyadmin
            .0
            .call(
                "TrentService.PutKeyPolicy",
                json!({ "KeyId": key, "PolicyName": "default", "Policy": policy.to_string() }),
            )
            .await;
        assert_eq!(err_code(r), "SeparationOfDutiesException", "{policy}");
    }

    // A Decrypt grant to the key's administrator is refused; to the key user it is fine.
    let grant = |grantee: String| json!({ "KeyId": key, "GranteePrincipal": grantee, "Operations": ["Decrypt"] });
    assert_eq!(
        err_code(keyadmin.0.call("TrentService.CreateGrant", grant(user("keyadmin"))).await),
        "SeparationOfDutiesException"
    );
    keyadmin.0.call("TrentService.CreateGrant", grant(user("app"))).await.unwrap();
    // A key admin can never decrypt, whatever a policy says: it lacks the key-user role.
    let open = json!({ "Statement": [
        { "Sid": "Admins", "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{}:root", w.tenant) }, "Action": ["kms:PutKeyPolicy", "kms:Describe*"], "Resource": "*" },
        { "Sid": "Use", "Effect": "Allow", "Principal": "*", "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*" } ]})
    .to_string();
    keyadmin
        .0
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": open }))
        .await
        .unwrap();
    let r = keyadmin.0.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": b64(b"x") })).await;
    assert_eq!(err_code(r), "AccessDeniedException");
}

#[tokio::test]
async fn tenants_are_isolated_until_a_policy_names_the_foreign_principal() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut keyadmin = principal(&w, &mut admin, "keyadmin", &["key-admin"]).await;

    // Tenant B, created by the security officer, with its own tenant admin and key user.
    let b = admin
        .call("Custody.CreateTenant", json!({ "Name": "beta", "AdminName": "badmin", "TenantId": "222233334444" }))
        .await
        .unwrap();
    let dir = w._dir.path().join("badmin");
    let mut badmin =
        Client::connect(&profile_from(&w.admin_profile, &dir, "badmin", &b["AdminCertificate"])).await.unwrap();
    let mut bapp = principal(&w, &mut badmin, "bapp", &["key-user"]).await;
    // Tenant B's admin cannot create tenants (not a security officer).
    assert_eq!(
        err_code(badmin.call("Custody.CreateTenant", json!({ "Name": "x", "AdminName": "y" })).await),
        "AccessDeniedException"
    );

    let meta = keyadmin.0.call("TrentService.CreateKey", json!({})).await.unwrap();
    let arn = meta["KeyMetadata"]["Arn"].as_str().unwrap().to_string();
    keyadmin
        .0
        .call("TrentService.CreateAlias", json!({ "AliasName": "alias/a-key", "TargetKeyId": arn }))
        .await
        .unwrap();
    let missing = format!("arn:aws:kms:us-east-1:{}:key/00000000-0000-4000-8000-000000000000", w.tenant);

    // B cannot encrypt, decrypt, describe, list or alias A's key, and learns nothing: the error
    // is the one for a key that does not exist.
    for (action, body) in [
        ("Encrypt", json!({ "KeyId": arn, "Plaintext": b64(b"x") })),
        ("DescribeKey", json!({ "KeyId": arn })),
        ("CreateAlias", json!({ "AliasName": "alias/stolen", "TargetKeyId": arn })),
        ("GenerateDataKey", json!({ "KeyId": arn, "NumberOfBytes": 32 })),
    ] {
        let (real, _) = both(&w, &mut bapp, action, body.clone()).await;
        let body_missing: Value = serde_json::from_str(&body.to_string().replace(&arn, &missing)).unwrap();
        let (none, _) = both(&w, &mut bapp, action, body_missing).await;
        assert_eq!(real, none, "{action}");
        assert_ne!(real, "OK", "{action}");
    }
    assert_eq!(
        err_code(bapp.0.call("TrentService.DescribeKey", json!({ "KeyId": "alias/a-key" })).await),
        "NotFoundException"
    );
    let listed = bapp.0.call("TrentService.ListKeys", json!({})).await.unwrap();
    assert!(!listed.to_string().contains(&arn));
    let aliases = bapp.0.call("TrentService.ListAliases", json!({})).await.unwrap();
    assert!(!aliases.to_string().contains("a-key"));
    // A ciphertext of A's key is just invalid to B.
    let app_a = json!({ "Statement": [
        { "Sid": "Admins", "Effect": "Allow", "Principal": { "AWS": w.tenant.clone() }, "Action": ["kms:PutKeyPolicy", "kms:Describe*", "kms:GetKeyPolicy"], "Resource": "*" },
        { "Sid": "B", "Effect": "Allow", "Principal": { "AWS": "arn:aws:iam::222233334444:user/bapp" }, "Action": ["kms:Encrypt", "kms:Decrypt", "kms:DescribeKey"], "Resource": "*" } ]})
    .to_string();

    // A key policy naming B's principal opens exactly what it lists.
    keyadmin
        .0
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": arn, "PolicyName": "default", "Policy": app_a }))
        .await
        .unwrap();
    let (mtls, sigv4) = both(&w, &mut bapp, "Encrypt", json!({ "KeyId": arn, "Plaintext": b64(b"cross") })).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("OK", "OK"));
    let blob = bapp.0.call("TrentService.Encrypt", json!({ "KeyId": arn, "Plaintext": b64(b"cross") })).await.unwrap();
    let back = bapp.0.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob["CiphertextBlob"] })).await.unwrap();
    assert_eq!(back["Plaintext"], b64(b"cross"));
    assert_eq!(both(&w, &mut bapp, "DescribeKey", json!({ "KeyId": arn })).await.0, "OK");
    // Not listed: DisableKey, GenerateDataKey; still reported as not found. Nor by alias or id.
    assert_eq!(both(&w, &mut bapp, "DisableKey", json!({ "KeyId": arn })).await.0, "NotFoundException");
    assert_eq!(
        both(&w, &mut bapp, "GenerateDataKey", json!({ "KeyId": arn, "NumberOfBytes": 32 })).await.0,
        "NotFoundException"
    );
    let id = meta["KeyMetadata"]["KeyId"].as_str().unwrap();
    assert_eq!(both(&w, &mut bapp, "DescribeKey", json!({ "KeyId": id })).await.0, "NotFoundException");
    // ListKeys still shows only B's own keys.
    assert!(!bapp.0.call("TrentService.ListKeys", json!({})).await.unwrap().to_string().contains(&arn));
}

#[tokio::test]
async fn who_can_and_explain() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut keyadmin = principal(&w, &mut admin, "keyadmin", &["key-admin"]).await;
    let mut alice_p = principal(&w, &mut admin, "alice", &["key-user"]).await;
    let _bob = principal(&w, &mut admin, "bob", &["key-user"]).await;
    let _carol = principal(&w, &mut admin, "carol", &["key-user"]).await;
    let _dave = principal(&w, &mut admin, "dave", &["key-user"]).await;
    let mut auditor = principal(&w, &mut admin, "auditor", &["auditor"]).await;
    let user = |n: &str| format!("arn:aws:iam::{}:user/{n}", w.tenant);

    let key = common::create_key(&mut keyadmin.0, "KeyId").await;
    // Three statements: administration for the tenant's key admins, Decrypt for alice, Decrypt
    // for bob only with app=billing; and a deny for carol. Two grants: carol (denied by the
    // policy anyway) and dave.
    let policy = json!({ "Statement": [
        { "Sid": "Admins", "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{}:root", w.tenant) },
          "Action": ["kms:PutKeyPolicy", "kms:GetKeyPolicy", "kms:DescribeKey", "kms:CreateGrant", "kms:ListGrants"], "Resource": "*" },
        { "Sid": "Alice", "Effect": "Allow", "Principal": { "AWS": user("alice") }, "Action": "kms:Decrypt", "Resource": "*" },
        { "Sid": "BobBilling", "Effect": "Allow", "Principal": { "AWS": user("bob") }, "Action": "kms:Decrypt", "Resource": "*",
          "Condition": { "StringEquals": { "kms:EncryptionContext:app": "billing" } } },
        { "Sid": "NotCarol", "Effect": "Deny", "Principal": { "AWS": user("carol") }, "Action": "kms:*", "Resource": "*" } ]})
    .to_string();
    keyadmin
        .0
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": policy }))
        .await
        .unwrap();
    for g in ["carol", "dave"] {
        keyadmin
            .0
            .call(
                "TrentService.CreateGrant",
                json!({ "KeyId": key, "GranteePrincipal": user(g), "Operations": ["Decrypt"] }),
            )
            .await
            .unwrap();
    }
    let who = |ctx: Option<Value>| {
        let mut body = json!({ "KeyId": key, "Action": "Decrypt" });
        if let Some(c) = ctx {
            body["EncryptionContext"] = c;
        }
        body
    };
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v["Principals"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["Kind"] == "principal")
            .map(|e| e["Principal"].as_str().unwrap().rsplit('/').next().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let r = auditor.0.call("Custody.WhoCan", who(None)).await.unwrap();
    assert_eq!(names(&r), ["alice", "dave"], "{r}");
    let dave = r["Principals"].as_array().unwrap().iter().find(|e| e["Principal"] == user("dave")).unwrap();
    assert!(dave["GrantId"].is_string());
    let alice = r["Principals"].as_array().unwrap().iter().find(|e| e["Principal"] == user("alice")).unwrap();
    assert_eq!(alice["Statement"], "Alice");
    let r = auditor.0.call("Custody.WhoCan", who(Some(json!({ "app": "billing" })))).await.unwrap();
    assert_eq!(names(&r), ["alice", "bob", "dave"], "{r}");
    // The key admin can ask too; a key user cannot.
    keyadmin.0.call("Custody.WhoCan", who(None)).await.unwrap();
    assert_eq!(err_code(alice_p.0.call("Custody.WhoCan", who(None)).await), "AccessDeniedException");

    // Whole-account statements are listed as such.
    let r = auditor.0.call("Custody.WhoCan", json!({ "KeyId": key, "Action": "DescribeKey" })).await.unwrap();
    let account = r["Principals"].as_array().unwrap().iter().find(|e| e["Kind"] == "account").unwrap();
    assert_eq!(account["Principal"], format!("arn:aws:iam::{}:root", w.tenant));
    assert_eq!(account["Statement"], "Admins");

    let explain =
        |p: &str, ctx: Value| json!({ "Principal": p, "Action": "Decrypt", "KeyId": key, "EncryptionContext": ctx });
    let r = auditor.0.call("Custody.ExplainAccess", explain("bob", json!({ "app": "billing" }))).await.unwrap();
    assert_eq!((r["Allowed"].as_bool(), r["Statement"].as_str()), (Some(true), Some("BobBilling")));
    let r = auditor.0.call("Custody.ExplainAccess", explain("bob", json!({ "app": "hr" }))).await.unwrap();
    assert_eq!(r["Allowed"], false);
    assert!(r["Reason"].as_str().unwrap().contains("no statement"), "{r}");
    let r = auditor.0.call("Custody.ExplainAccess", explain("carol", json!({}))).await.unwrap();
    assert_eq!((r["Allowed"].as_bool(), r["Statement"].as_str()), (Some(false), Some("NotCarol")));
    let r = auditor.0.call("Custody.ExplainAccess", explain(&user("keyadmin"), json!({}))).await.unwrap();
    assert_eq!(r["Allowed"], false);
    assert!(r["Reason"].as_str().unwrap().contains("key-user"), "{r}");
}

#[tokio::test]
async fn disabling_a_principal_stops_its_next_request_on_an_open_connection() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut app = principal(&w, &mut admin, "app", &["key-user"]).await;
    app.0.call("TrentService.GenerateRandom", json!({ "NumberOfBytes": 8 })).await.unwrap();
    admin.call("Custody.UpdatePrincipal", json!({ "Name": "app", "Enabled": false })).await.unwrap();
    let (mtls, sigv4) = both(&w, &mut app, "GenerateRandom", json!({ "NumberOfBytes": 8 })).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("UnrecognizedClientException", "UnrecognizedClientException"));
    admin.call("Custody.UpdatePrincipal", json!({ "Name": "app", "Enabled": true })).await.unwrap();
    assert_eq!(both(&w, &mut app, "GenerateRandom", json!({ "NumberOfBytes": 8 })).await.0, "OK");
    // Deleted: its certificate and access key stop working.
    admin.call("Custody.DeletePrincipal", json!({ "Name": "app" })).await.unwrap();
    let (mtls, sigv4) = both(&w, &mut app, "GenerateRandom", json!({ "NumberOfBytes": 8 })).await;
    assert_eq!((mtls.as_str(), sigv4.as_str()), ("UnrecognizedClientException", "UnrecognizedClientException"));
    // A tenant admin cannot lock itself out.
    assert_eq!(
        err_code(admin.call("Custody.UpdatePrincipal", json!({ "Name": "admin", "Enabled": false })).await),
        "ValidationException"
    );
}

/// Runs the `custody` binary with `profile`, expecting success; returns stdout.
fn cli(profile: &Path, args: &[&str]) -> String {
    let out = common::custody().arg("--profile").arg(profile).args(args).output().unwrap();
    assert!(out.status.success(), "custody {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_principals_and_access_through_the_cli() {
    let w = world().await;
    let dir = w._dir.path();
    let admin = dir.join("data/admin/profile.toml");
    // Tenant admin: principals and their certificates, which work at once.
    cli(&admin, &["principal", "create", "ops", "--role", "key-admin", "--role", "auditor"]);
    cli(&admin, &["principal", "create", "app", "--role", "key-user"]);
    let ops_dir = dir.join("ops");
    let out = common::custody()
        .arg("--profile")
        .arg(&admin)
        .args(["--json", "principal", "cert", "issue", "ops", "--ttl", "2h", "--out"])
        .arg(&ops_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let issued: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ops = std::path::PathBuf::from(issued["Profile"].as_str().unwrap());
    let key_mode = std::fs::metadata(ops_dir.join("ops.key")).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777, 0o600);
    // The certificate lives about 2 hours.
    let not_after = issued["NotAfter"].as_i64().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((now + 7000..=now + 7300).contains(&not_after), "{not_after} vs {now}");
    let listed = cli(&admin, &["principal", "list"]);
    assert!(listed.contains("ops") && listed.contains("key-admin,auditor"), "{listed}");

    // The new key admin creates a key; who-can and explain answer from its identity.
    let key: Value = serde_json::from_str(&cli(&ops, &["--json", "key", "create", "--alias", "alias/cli"])).unwrap();
    let arn = key["KeyMetadata"]["Arn"].as_str().unwrap();
    let who: Value =
        serde_json::from_str(&cli(&ops, &["--json", "access", "who-can", arn, "--action", "Decrypt"])).unwrap();
    assert_eq!(who["Principals"].as_array().unwrap().len(), 0, "nobody may decrypt under the default policy: {who}");
    let why = cli(&ops, &["access", "explain", "app", "Decrypt", "alias/cli"]);
    assert!(why.starts_with("DENIED: no statement"), "{why}");
    // A policy from a file opens Decrypt to app; the CLI shows it.
    let policy = dir.join("policy.json");
    let fetched = cli(&ops, &["key", "policy", "get", "alias/cli"]);
    let mut doc: Value = serde_json::from_str(&fetched).unwrap();
    doc["Statement"].as_array_mut().unwrap().push(json!({
        "Sid": "App", "Effect": "Allow", "Principal": { "AWS": format!("arn:aws:iam::{}:user/app", w.tenant) },
        "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"
    }));
    std::fs::write(&policy, doc.to_string()).unwrap();
    cli(&ops, &["key", "policy", "put", "alias/cli", policy.to_str().unwrap()]);
    let why = cli(&ops, &["access", "explain", "app", "Decrypt", "alias/cli"]);
    assert!(why.starts_with("ALLOWED") && why.contains("\"App\""), "{why}");
    let who = cli(&ops, &["access", "who-can", "alias/cli"]);
    assert!(who.contains(":user/app") && who.contains("statement \"App\""), "{who}");
    // A malformed policy is refused with the reason, and changes nothing.
    std::fs::write(&policy, r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericLessThan":{"kms:CallerAccount":"1"}}}}"#).unwrap();
    let out = common::custody()
        .arg("--profile")
        .arg(&ops)
        .args(["key", "policy", "put", "alias/cli"])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unsupported condition operator"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unchanged: Value = serde_json::from_str(&cli(&ops, &["key", "policy", "get", "alias/cli"])).unwrap();
    assert!(unchanged.to_string().contains("\"App\""), "the previous policy stays: {unchanged}");

    // Security officer: a second tenant, whose admin's profile works right away.
    let beta = dir.join("beta");
    let out = common::custody()
        .arg("--profile")
        .arg(&admin)
        .args(["--json", "tenant", "create", "--name", "beta", "--admin", "badmin", "--out"])
        .arg(&beta)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b_profile = std::path::PathBuf::from(created["AdminCertificate"]["Profile"].as_str().unwrap());
    let b_list = cli(&b_profile, &["principal", "list"]);
    assert!(b_list.contains("badmin") && !b_list.contains("ops"), "{b_list}");
    assert!(cli(&admin, &["tenant", "list"]).contains("beta"));
}

#[tokio::test]
async fn relaxed_separation_of_duties_is_allowed_with_an_audit_alert() {
    // `custody dev`'s settings: one principal holds every role.
    let (dir, layout) = common::keyfile_dir();
    let (_server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut admin = Client::connect(&profile).await.unwrap();
    let key = common::create_key(&mut admin, "Arn").await;
    let both = json!({ "Statement": { "Sid": "All", "Effect": "Allow", "Principal": { "AWS": admin.call("Custody.WhoAmI", json!({})).await.unwrap()["Arn"] }, "Action": "kms:*", "Resource": "*" } }).to_string();
    admin
        .call("TrentService.PutKeyPolicy", json!({ "KeyId": key, "PolicyName": "default", "Policy": both }))
        .await
        .unwrap();
    let records = admin.call("Custody.ListAuditRecords", json!({ "Action": "PutKeyPolicy" })).await.unwrap();
    let r = &records["Records"][0];
    assert_eq!(r["alert"], true, "{r}");
    assert!(r["detail"].as_str().unwrap().contains("separation of duties"), "{r}");
    let status = admin.call("Custody.GetStatus", json!({})).await.unwrap();
    assert!(status["Alerts"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn grants_open_use_within_their_constraints_until_retired_or_revoked() {
    let w = world().await;
    let mut admin = Client::connect(&w.admin_profile).await.unwrap();
    let mut keyadmin = principal(&w, &mut admin, "keyadmin", &["key-admin"]).await;
    let mut app = principal(&w, &mut admin, "app", &["key-user"]).await;
    let mut other = principal(&w, &mut admin, "other", &["key-user"]).await;
    let user = |n: &str| format!("arn:aws:iam::{}:user/{n}", w.tenant);
    // The default policy opens use to nobody; a grant opens it to app, for app=billing only.
    let key = common::create_key(&mut keyadmin.0, "Arn").await;
    let grant = keyadmin
        .0
        .call(
            "TrentService.CreateGrant",
            json!({ "KeyId": key, "GranteePrincipal": user("app"), "RetiringPrincipal": user("app"),
                    "Operations": ["Encrypt", "Decrypt"], "Constraints": { "EncryptionContextSubset": { "app": "billing" } } }),
        )
        .await
        .unwrap();
    let enc = |ctx: Value| json!({ "KeyId": key, "Plaintext": b64(b"granted"), "EncryptionContext": ctx });
    assert_eq!(
        both(&w, &mut app, "Encrypt", enc(json!({ "app": "billing", "more": "x" }))).await,
        ("OK".into(), "OK".into())
    );
    let denied = ("AccessDeniedException".to_string(), "AccessDeniedException".to_string());
    assert_eq!(both(&w, &mut app, "Encrypt", enc(json!({ "app": "hr" }))).await, denied);
    assert_eq!(both(&w, &mut app, "Encrypt", enc(json!({}))).await, denied);
    assert_eq!(both(&w, &mut other, "Encrypt", enc(json!({ "app": "billing" }))).await, denied);
    // Not an operation of the grant.
    assert_eq!(
        both(
            &w,
            &mut app,
            "GenerateDataKey",
            json!({ "KeyId": key, "NumberOfBytes": 32, "EncryptionContext": { "app": "billing" } })
        )
        .await,
        denied
    );
    let blob = app.0.call("TrentService.Encrypt", enc(json!({ "app": "billing" }))).await.unwrap();
    let back = app
        .0
        .call("TrentService.Decrypt", json!({ "CiphertextBlob": blob["CiphertextBlob"], "EncryptionContext": { "app": "billing" }, "GrantTokens": [grant["GrantToken"]] }))
        .await
        .unwrap();
    assert_eq!(back["Plaintext"], b64(b"granted"));
    // Constraints only on operations that take a context; unknown constraint kinds refused.
    let r = keyadmin
        .0
        .call("TrentService.CreateGrant", json!({ "KeyId": key, "GranteePrincipal": user("app"), "Operations": ["DescribeKey"], "Constraints": { "EncryptionContextEquals": { "a": "b" } } }))
        .await;
    assert_eq!(err_code(r), "ValidationException");
    // Another principal cannot retire it; the retiring principal can, and use stops at once.
    let retire = json!({ "GrantToken": grant["GrantToken"] });
    assert_eq!(err_code(other.0.call("TrentService.RetireGrant", retire.clone()).await), "AccessDeniedException");
    app.0.call("TrentService.RetireGrant", retire).await.unwrap();
    assert_eq!(both(&w, &mut app, "Encrypt", enc(json!({ "app": "billing" }))).await, denied);
    // A whole-account grant reaches every key user of the tenant; revoking it ends that.
    let g = keyadmin
        .0
        .call("TrentService.CreateGrant", json!({ "KeyId": key, "GranteePrincipal": format!("arn:aws:iam::{}:root", w.tenant), "Operations": ["Encrypt"] }))
        .await
        .unwrap();
    assert_eq!(both(&w, &mut other, "Encrypt", enc(json!({}))).await, ("OK".into(), "OK".into()));
    keyadmin.0.call("TrentService.RevokeGrant", json!({ "KeyId": key, "GrantId": g["GrantId"] })).await.unwrap();
    assert_eq!(both(&w, &mut other, "Encrypt", enc(json!({}))).await, denied);
}
