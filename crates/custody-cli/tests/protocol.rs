//! The AWS KMS JSON protocol as clients see it: shapes, error names, and bad input that changes
//! nothing.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use custody_client::{Client, ClientError};
use serde_json::{json, Value};

async fn error(c: &mut Client, target: &str, body: Value) -> (u16, String, String) {
    match c.call(target, body).await {
        Err(ClientError::Api { status, code, message }) => (status, code, message),
        other => panic!("{target} should fail, got {other:?}"),
    }
}

#[tokio::test]
async fn aws_shapes_and_errors() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut c = common::admin_client(&profile).await;

    let created = c
        .call("TrentService.CreateKey", json!({ "Description": "p", "Tags": [{ "TagKey": "a", "TagValue": "1" }] }))
        .await
        .unwrap();
    let m = &created["KeyMetadata"];
    for field in [
        "AWSAccountId",
        "KeyId",
        "Arn",
        "CreationDate",
        "Enabled",
        "KeyUsage",
        "KeyState",
        "Origin",
        "KeyManager",
        "KeySpec",
        "EncryptionAlgorithms",
    ] {
        assert!(m.get(field).is_some(), "KeyMetadata.{field} missing");
    }
    assert!(m["CreationDate"].is_number(), "AWS timestamps are epoch seconds");
    let arn = m["Arn"].as_str().unwrap().to_string();
    let key_id = m["KeyId"].as_str().unwrap().to_string();
    assert_eq!(arn, format!("arn:aws:kms:us-east-1:{}:key/{key_id}", m["AWSAccountId"].as_str().unwrap()));
    let other = common::create_key(&mut c, "KeyId").await;

    // Encrypt / Decrypt / ReEncrypt / GenerateDataKey* / GenerateRandom.
    let ctx = json!({ "app": "billing" });
    let enc = c
        .call("TrentService.Encrypt", json!({ "KeyId": arn, "Plaintext": B64.encode("hi"), "EncryptionContext": ctx }))
        .await
        .unwrap();
    assert_eq!(enc["KeyId"], arn.as_str());
    assert_eq!(enc["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT");
    let blob = enc["CiphertextBlob"].clone();
    let dec =
        c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob, "EncryptionContext": ctx })).await.unwrap();
    assert_eq!(dec["Plaintext"], B64.encode("hi"));
    assert_eq!(dec["KeyId"], arn.as_str());
    let re = c
        .call("TrentService.ReEncrypt", json!({ "CiphertextBlob": blob, "SourceEncryptionContext": ctx, "DestinationKeyId": other, "DestinationEncryptionContext": { "b": "2" } }))
        .await
        .unwrap();
    assert_eq!(re["SourceKeyId"], arn.as_str());
    let dec2 = c
        .call(
            "TrentService.Decrypt",
            json!({ "CiphertextBlob": re["CiphertextBlob"], "EncryptionContext": { "b": "2" } }),
        )
        .await
        .unwrap();
    assert_eq!(dec2["Plaintext"], B64.encode("hi"));
    assert!(dec2["KeyId"].as_str().unwrap().ends_with(&other));
    let (_, code, _) = error(
        &mut c,
        "TrentService.Decrypt",
        json!({ "CiphertextBlob": blob, "EncryptionContext": ctx, "KeyId": other }),
    )
    .await;
    assert_eq!(code, "IncorrectKeyException");

    let dk = c.call("TrentService.GenerateDataKey", json!({ "KeyId": key_id, "KeySpec": "AES_128" })).await.unwrap();
    assert_eq!(B64.decode(dk["Plaintext"].as_str().unwrap()).unwrap().len(), 16);
    let back = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": dk["CiphertextBlob"] })).await.unwrap();
    assert_eq!(back["Plaintext"], dk["Plaintext"]);
    let dk = c
        .call("TrentService.GenerateDataKeyWithoutPlaintext", json!({ "KeyId": key_id, "NumberOfBytes": 64 }))
        .await
        .unwrap();
    assert!(dk.get("Plaintext").is_none());
    let back = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": dk["CiphertextBlob"] })).await.unwrap();
    assert_eq!(B64.decode(back["Plaintext"].as_str().unwrap()).unwrap().len(), 64);
    let r = c.call("TrentService.GenerateRandom", json!({ "NumberOfBytes": 32 })).await.unwrap();
    assert_eq!(B64.decode(r["Plaintext"].as_str().unwrap()).unwrap().len(), 32);

    // Rotation settings, tags, aliases with pagination.
    c.call("TrentService.EnableKeyRotation", json!({ "KeyId": key_id, "RotationPeriodInDays": 90 })).await.unwrap();
    let st = c.call("TrentService.GetKeyRotationStatus", json!({ "KeyId": key_id })).await.unwrap();
    assert_eq!((st["KeyRotationEnabled"].clone(), st["RotationPeriodInDays"].clone()), (json!(true), json!(90)));
    assert!(st["NextRotationDate"].is_number());
    let (_, code, msg) =
        error(&mut c, "TrentService.EnableKeyRotation", json!({ "KeyId": key_id, "RotationPeriodInDays": 89 })).await;
    assert_eq!(code, "ValidationException");
    assert!(msg.contains("rotationPeriodInDays"), "{msg}");
    for i in 0..3 {
        c.call("TrentService.CreateAlias", json!({ "AliasName": format!("alias/a{i}"), "TargetKeyId": key_id }))
            .await
            .unwrap();
    }
    let p1 = c.call("TrentService.ListAliases", json!({ "Limit": 2 })).await.unwrap();
    assert_eq!((p1["Aliases"].as_array().unwrap().len(), p1["Truncated"].clone()), (2, json!(true)));
    let p2 = c.call("TrentService.ListAliases", json!({ "Limit": 2, "Marker": p1["NextMarker"] })).await.unwrap();
    assert_eq!((p2["Aliases"].as_array().unwrap().len(), p2["Truncated"].clone()), (1, json!(false)));
    assert!(p2.get("NextMarker").is_none());
    let tags = c.call("TrentService.ListResourceTags", json!({ "KeyId": key_id })).await.unwrap();
    assert_eq!(tags["Tags"], json!([{ "TagKey": "a", "TagValue": "1" }]));
    let (_, code, _) =
        error(&mut c, "TrentService.CreateAlias", json!({ "AliasName": "alias/aws/x", "TargetKeyId": key_id })).await;
    assert_eq!(code, "InvalidAliasNameException");
    let (_, code, _) =
        error(&mut c, "TrentService.CreateAlias", json!({ "AliasName": "alias/a0", "TargetKeyId": other })).await;
    assert_eq!(code, "AlreadyExistsException");

    // Validation names the field; unknown keys are NotFound; bad JSON is a SerializationException.
    let (status, code, msg) = error(&mut c, "TrentService.Encrypt", json!({ "Plaintext": "aGk=" })).await;
    assert_eq!((status, code.as_str()), (400, "ValidationException"));
    assert!(msg.contains("'keyId'"), "{msg}");
    let (_, code, msg) =
        error(&mut c, "TrentService.Encrypt", json!({ "KeyId": key_id, "Plaintext": B64.encode(vec![0u8; 4097]) }))
            .await;
    assert_eq!(code, "ValidationException");
    assert!(msg.contains("plaintext"), "{msg}");
    let (_, code, _) = error(
        &mut c,
        "TrentService.GenerateDataKey",
        json!({ "KeyId": key_id, "KeySpec": "AES_256", "NumberOfBytes": 32 }),
    )
    .await;
    assert_eq!(code, "ValidationException");
    let (_, code, _) =
        error(&mut c, "TrentService.DescribeKey", json!({ "KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab" })).await;
    assert_eq!(code, "NotFoundException");
    let (_, code, _) = error(&mut c, "TrentService.Decrypt", json!({ "CiphertextBlob": B64.encode([1u8; 80]) })).await;
    assert_eq!(code, "InvalidCiphertextException", "a blob naming an unknown key is just invalid");
    let (_, code, _) = error(&mut c, "TrentService.Decrypt", json!({ "CiphertextBlob": "%%%" })).await;
    assert_eq!(code, "SerializationException");
    match c.call_bytes("TrentService.ListKeys", b"{\"Limit\": ".to_vec()).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "SerializationException"),
        other => panic!("{other:?}"),
    }
    // An export page starts at one place and is bounded.
    let (_, code, msg) = error(&mut c, "Custody.ExportAudit", json!({ "After": 3, "Since": 1 })).await;
    assert_eq!(code, "ValidationException");
    assert!(msg.contains("not both"), "{msg}");
    let (_, code, _) = error(&mut c, "Custody.ExportAudit", json!({ "After": "3" })).await;
    assert_eq!(code, "SerializationException");
    let (_, code, _) = error(&mut c, "Custody.ExportAudit", json!({ "Since": -5 })).await;
    assert_eq!(code, "ValidationException");
    let (_, code, _) = error(&mut c, "Custody.ExportAudit", json!({ "Limit": 10_001 })).await;
    assert_eq!(code, "ValidationException");
    let (_, code, msg) = error(&mut c, "TrentService.Sign", json!({})).await;
    assert_eq!(code, "UnsupportedOperationException");
    assert!(msg.contains("Sign"), "{msg}");
    let (_, code, _) = error(&mut c, "TrentService.Frobnicate", json!({})).await;
    assert_eq!(code, "UnknownOperationException");
    let (_, code, _) = error(&mut c, "TrentService.CreateKey", json!({ "KeySpec": "RSA_2048" })).await;
    assert_eq!(code, "UnsupportedOperationException");
    match c.call_bytes("TrentService.ListKeys", vec![b' '; 70_000]).await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 413),
        other => panic!("an oversized body must be refused, got {other:?}"),
    }

    // None of the refused requests changed anything.
    let keys = c.call("TrentService.ListKeys", json!({})).await.unwrap();
    assert_eq!(keys["Keys"].as_array().unwrap().len(), 2);
    let aliases = c.call("TrentService.ListAliases", json!({})).await.unwrap();
    assert_eq!(aliases["Aliases"].as_array().unwrap().len(), 3);
    server.shutdown().await;
}
