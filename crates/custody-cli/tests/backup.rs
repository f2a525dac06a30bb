//! Backups proven to restore: backup, then destroy one key and create another, then restore into
//! a new directory: the destroyed key is not brought back without --resurrect-destroyed, every
//! other version decrypts its canary, and old ciphertexts decrypt on the restored store.

mod common;

use std::path::Path;

use custody_client::{Client, ClientError};
use serde_json::{json, Value};

fn cli(profile: &Path, args: &[&str]) -> std::process::Output {
    common::custody().arg("--profile").arg(profile).args(args).output().unwrap()
}

fn ok_json(out: std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_destroy_restore_verify() {
    let (dir, layout) = common::keyfile_dir();
    // Days of 10 ms: a 7-day deletion window passes in 70 ms.
    let (_server, profile) = common::start(dir.path(), &layout, |c| {
        c.danger_day_length_ms = 10;
        c.scheduler_interval_ms = 50;
    })
    .await;
    let admin = layout.data_dir.join("admin/profile.toml");
    let mut c = Client::connect(&profile).await.unwrap();
    let id = |v: Value| v["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let kept = id(c.call("TrentService.CreateKey", json!({})).await.unwrap());
    c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": kept })).await.unwrap();
    let doomed = id(c.call("TrentService.CreateKey", json!({})).await.unwrap());
    c.call("TrentService.CreateAlias", json!({ "AliasName": "alias/doomed", "TargetKeyId": doomed })).await.unwrap();
    let enc = |k: &str| json!({ "KeyId": k, "Plaintext": "c2VjcmV0" });
    let c_kept = c.call("TrentService.Encrypt", enc(&kept)).await.unwrap()["CiphertextBlob"].clone();
    let c_doomed = c.call("TrentService.Encrypt", enc(&doomed)).await.unwrap()["CiphertextBlob"].clone();

    let file = dir.path().join("kms.backup");
    let created = ok_json(cli(&admin, &["--json", "backup", "create", "--out", file.to_str().unwrap()]));
    assert_eq!(created["Header"]["Tables"]["keys"], 2, "{created}");
    let mode = std::fs::metadata(&file).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.windows(doomed.len()).any(|w| w == doomed.as_bytes()), "key ids are inside the sealed part only");

    // Verify: restores into a scratch store; every version (3) unwraps and decrypts its canary.
    let key_file = dir.path().join("root.key");
    let verified = ok_json(cli(
        &admin,
        &["--json", "backup", "verify", file.to_str().unwrap(), "--root-key-file", key_file.to_str().unwrap()],
    ));
    assert_eq!(
        (verified["Check"]["Versions"].as_u64(), verified["Check"]["Canaries"].as_u64()),
        (Some(3), Some(3)),
        "{verified}"
    );
    // The wrong root key does not open it; a damaged file is refused.
    let other_key = dir.path().join("other.key");
    custody_server::keyfile::write(&other_key, &custody_crypto::RootKey::generate()).unwrap();
    let wrong =
        cli(&admin, &["backup", "verify", file.to_str().unwrap(), "--root-key-file", other_key.to_str().unwrap()]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("does not open with this root key"));
    let damaged = dir.path().join("damaged.backup");
    let mut d = bytes.clone();
    let last = d.len() - 1;
    d[last] ^= 1;
    std::fs::write(&damaged, d).unwrap();
    assert!(!cli(
        &admin,
        &["backup", "verify", damaged.to_str().unwrap(), "--root-key-file", key_file.to_str().unwrap()]
    )
    .status
    .success());

    // After the backup: one key destroyed, another created.
    c.call("TrentService.ScheduleKeyDeletion", json!({ "KeyId": doomed, "PendingWindowInDays": 7 })).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let state = c.call("TrentService.DescribeKey", json!({ "KeyId": doomed })).await.unwrap()["KeyMetadata"]
            ["KeyState"]
            .clone();
        if state == "Destroyed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the scheduler destroys the key");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let newer = id(c.call("TrentService.CreateKey", json!({})).await.unwrap());

    // Restore into a new directory: the live store's ledger keeps the destroyed key destroyed.
    let restored_dir = dir.path().join("restored");
    let restore = |into: &Path, extra: &[&str]| {
        let mut args = vec!["--json", "backup", "restore", file.to_str().unwrap(), "--data", into.to_str().unwrap()];
        args.extend(["--root-key-file", key_file.to_str().unwrap()]);
        args.extend(extra);
        cli(&admin, &args)
    };
    let restored = ok_json(restore(&restored_dir, &[]));
    assert_eq!(restored["KeptDestroyed"][0]["KeyId"], doomed.as_str(), "{restored}");
    // Not twice into the same place.
    let again = restore(&restored_dir, &[]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds a store"));

    let layout2 = custody_cli::bootstrap::Layout { data_dir: restored_dir.clone() };
    let (_restored_server, profile2) = common::start(dir.path(), &layout2, |_| {}).await;
    let mut r = Client::connect(&profile2).await.unwrap();
    let state = |v: Value| v["KeyMetadata"]["KeyState"].as_str().unwrap().to_string();
    assert_eq!(state(r.call("TrentService.DescribeKey", json!({ "KeyId": doomed })).await.unwrap()), "Destroyed");
    assert!(matches!(
        r.call("TrentService.Decrypt", json!({ "CiphertextBlob": c_doomed })).await,
        Err(ClientError::Api { .. })
    ));
    assert!(matches!(
        r.call("TrentService.DescribeKey", json!({ "KeyId": "alias/doomed" })).await,
        Err(ClientError::Api { .. })
    ));
    let back = r.call("TrentService.Decrypt", json!({ "CiphertextBlob": c_kept })).await.unwrap();
    assert_eq!(back["Plaintext"], "c2VjcmV0");
    match r.call("TrentService.DescribeKey", json!({ "KeyId": newer })).await {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "NotFoundException", "created after the backup"),
        other => panic!("{other:?}"),
    }
    let check = r.call("Custody.CheckStore", json!({})).await.unwrap();
    assert!(check["Problems"].as_array().unwrap().is_empty(), "{check}");

    // With --resurrect-destroyed the key comes back whole.
    let resurrected_dir = dir.path().join("resurrected");
    let out = ok_json(restore(&resurrected_dir, &["--resurrect-destroyed"]));
    assert_eq!(out["Resurrected"][0]["KeyId"], doomed.as_str(), "{out}");
    let layout3 = custody_cli::bootstrap::Layout { data_dir: resurrected_dir };
    let (_s3, profile3) = common::start(dir.path(), &layout3, |_| {}).await;
    let mut r3 = Client::connect(&profile3).await.unwrap();
    let back = r3.call("TrentService.Decrypt", json!({ "CiphertextBlob": c_doomed })).await.unwrap();
    assert_eq!(back["Plaintext"], "c2VjcmV0");
}
