//! SigV4 over the wire: a request signed by hand (AWS's algorithm, from first principles) and the
//! ways a signature can be wrong, plus the access-key lifecycle through the CLI.

mod common;

use serde_json::{json, Value};

use common::{code, send, Signer};

#[tokio::test]
async fn signatures_right_and_wrong() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut admin = common::admin_client(&profile).await;
    let created = admin.call("Custody.CreateAccessKey", json!({})).await.unwrap();
    let signer = Signer {
        id: created["AccessKey"]["AccessKeyId"].as_str().unwrap().to_string(),
        secret: created["AccessKey"]["SecretAccessKey"].as_str().unwrap().to_string(),
        region: "us-east-1".into(),
    };
    assert!(signer.id.starts_with("AKIA") && signer.id.len() == 20);
    assert_eq!(signer.secret.len(), 40);
    let addr = server.local_addr();
    let ca = layout.ca_cert();
    let now = time::OffsetDateTime::now_utc();

    let (status, body) = send(addr, &ca, &signer, "ListKeys", json!({}), now, |_| {}).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["Keys"].is_array());

    // Within the ±15-minute window is fine; outside it is an expired signature.
    assert_eq!(send(addr, &ca, &signer, "ListKeys", json!({}), now - time::Duration::minutes(14), |_| {}).await.0, 200);
    for skew in [time::Duration::minutes(-16), time::Duration::minutes(16)] {
        let (status, body) = send(addr, &ca, &signer, "ListKeys", json!({}), now + skew, |_| {}).await;
        assert_eq!((status, code(&body)), (400, "InvalidSignatureException"), "{body}");
        assert!(body["message"].as_str().unwrap().contains("Signature expired"), "{body}");
    }
    // A body changed after signing.
    let (_, body) = send(addr, &ca, &signer, "ListKeys", json!({}), now, |h| {
        h.insert("x-amz-target", "TrentService.CreateKey".parse().unwrap());
    })
    .await;
    assert_eq!(code(&body), "InvalidSignatureException");
    // Wrong secret, wrong region, unknown key.
    let wrong = Signer {
        secret: "x".repeat(40),
        ..Signer { id: signer.id.clone(), secret: String::new(), region: "us-east-1".into() }
    };
    assert_eq!(code(&send(addr, &ca, &wrong, "ListKeys", json!({}), now, |_| {}).await.1), "InvalidSignatureException");
    let elsewhere = Signer { region: "eu-west-1".into(), id: signer.id.clone(), secret: signer.secret.clone() };
    assert_eq!(
        code(&send(addr, &ca, &elsewhere, "ListKeys", json!({}), now, |_| {}).await.1),
        "InvalidSignatureException"
    );
    let unknown =
        Signer { id: "AKIAUNKNOWNUNKNOWN00".into(), secret: signer.secret.clone(), region: "us-east-1".into() };
    assert_eq!(
        code(&send(addr, &ca, &unknown, "ListKeys", json!({}), now, |_| {}).await.1),
        "UnrecognizedClientException"
    );
    // Malformed or incomplete headers.
    let (_, body) = send(addr, &ca, &signer, "ListKeys", json!({}), now, |h| {
        h.remove("x-amz-date");
    })
    .await;
    assert_eq!(code(&body), "IncompleteSignatureException");
    let (_, body) = send(addr, &ca, &signer, "ListKeys", json!({}), now, |h| {
        h.insert("authorization", "AWS4-HMAC-SHA256 Credential=nope".parse().unwrap());
    })
    .await;
    assert_eq!(code(&body), "IncompleteSignatureException");

    // Disabled, then deleted: refused like an unknown key.
    admin.call("Custody.UpdateAccessKey", json!({ "AccessKeyId": signer.id, "Status": "Inactive" })).await.unwrap();
    assert_eq!(
        code(&send(addr, &ca, &signer, "ListKeys", json!({}), now, |_| {}).await.1),
        "UnrecognizedClientException"
    );
    admin.call("Custody.UpdateAccessKey", json!({ "AccessKeyId": signer.id, "Status": "Active" })).await.unwrap();
    assert_eq!(send(addr, &ca, &signer, "ListKeys", json!({}), now, |_| {}).await.0, 200);
    admin.call("Custody.DeleteAccessKey", json!({ "AccessKeyId": signer.id })).await.unwrap();
    assert_eq!(
        code(&send(addr, &ca, &signer, "ListKeys", json!({}), now, |_| {}).await.1),
        "UnrecognizedClientException"
    );

    // Every attempt is audited as what it was, naming the key id and never the secret.
    let records = server.kms().audit_records(0, 1000).unwrap();
    let signed: Vec<_> =
        records.iter().filter(|r| r.event.access_key_id.as_deref() == Some(signer.id.as_str())).collect();
    assert!(signed.iter().any(|r| r.event.outcome == custody_kms::Outcome::Success && r.event.principal.is_some()));
    assert!(signed.iter().filter(|r| r.event.error_code.as_deref() == Some("InvalidSignatureException")).count() >= 4);
    assert!(signed.iter().any(|r| r.event.outcome == custody_kms::Outcome::Unauthenticated));
    let text = serde_json::to_string(&records).unwrap();
    assert!(!text.contains(&signer.secret), "the secret reached the audit trail");
    server.shutdown().await;
}

#[test]
fn access_keys_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = common::custody()
        .args(["init", "--data"])
        .arg(&data)
        .args(["--seal"])
        .arg(format!("keyfile:{}", dir.path().join("k").display()))
        .output()
        .unwrap();
    assert!(init.status.success());
    let server = common::spawn_server(&data);
    let profile = dir.path().join("p.toml");
    let text = std::fs::read_to_string(data.join("admin/profile.toml")).unwrap();
    std::fs::write(
        &profile,
        text.replace(
            "https://localhost:8443",
            &format!("https://localhost:{}", server.addr.rsplit(':').next().unwrap()),
        ),
    )
    .unwrap();
    common::all_roles(&profile);
    let run = |args: &[&str]| {
        let out = common::custody().arg("--profile").arg(&profile).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let created: Value = serde_json::from_str(&run(&["--json", "access-key", "create"])).unwrap();
    let id = created["AccessKey"]["AccessKeyId"].as_str().unwrap().to_string();
    let secret = created["AccessKey"]["SecretAccessKey"].as_str().unwrap().to_string();
    let listed = run(&["access-key", "list"]);
    assert!(listed.contains(&id) && listed.contains("Active") && !listed.contains(&secret), "{listed}");
    run(&["access-key", "disable", &id]);
    assert!(run(&["access-key", "list"]).contains("Inactive"));
    run(&["access-key", "delete", &id]);
    assert!(!run(&["access-key", "list"]).contains(&id));
    let missing =
        common::custody().arg("--profile").arg(&profile).args(["access-key", "delete", &id]).output().unwrap();
    assert_eq!(missing.status.code(), Some(5));
    server.terminate();
}
