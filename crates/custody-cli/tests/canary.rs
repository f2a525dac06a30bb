//! No plaintext anywhere: a full workflow with canary plaintexts and data keys, then every byte
//! custody wrote (server and CLI logs at trace level, the database and its WAL, the audit
//! export, backup file) is searched for every canary in raw, hex and base64 form.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::json;

fn forms(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut v = vec![
        ("raw".to_string(), secret.to_vec()),
        ("hex".to_string(), hex::encode(secret).into_bytes()),
        ("HEX".to_string(), hex::encode_upper(secret).into_bytes()),
        ("base64".to_string(), STANDARD.encode(secret).into_bytes()),
        ("base64url".to_string(), URL_SAFE_NO_PAD.encode(secret).into_bytes()),
    ];
    // Base64 of the same bytes at another alignment inside a longer string starts differently:
    // the first 12 bytes' encoding is searched too (any 3-byte-aligned prefix would match).
    v.push(("base64-prefix".to_string(), STANDARD.encode(&secret[..12]).trim_end_matches('=').as_bytes().to_vec()));
    v
}

#[test]
fn canaries_appear_nowhere() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = common::custody()
        .args(["init", "--data"])
        .arg(&data)
        .arg("--seal")
        .arg(format!("keyfile:{}", dir.path().join("root.key").display()))
        .output()
        .unwrap();
    assert!(init.status.success());

    let server_log = dir.path().join("server.log");
    let mut server = common::custody()
        .args(["server", "--data"])
        .arg(&data)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "trace")
        .env("CUSTODY_DANGER_ALLOW_SWAP", "true") // see common::spawn_server_with
        .env("CUSTODY_SEPARATION_OF_DUTIES", "warn")
        .env("CUSTODY_DEFAULT_KEY_POLICY", "tenant")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(server.stderr.take().unwrap());
    let mut log = std::fs::File::create(&server_log).unwrap();
    let addr = loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "server exited");
        log.write_all(line.as_bytes()).unwrap();
        if let Some(rest) = line.trim().strip_prefix("custody listening on https://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let copier = std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            writeln!(log, "{line}").unwrap();
        }
    });
    let port = addr.rsplit(':').next().unwrap();
    let profile = dir.path().join("profile.toml");
    let text = std::fs::read_to_string(data.join("admin/profile.toml")).unwrap();
    std::fs::write(&profile, text.replace("https://localhost:8443", &format!("https://localhost:{port}"))).unwrap();

    common::all_roles(&profile);
    let mut canaries: Vec<Vec<u8>> =
        (0..4).map(|i| format!("CANARY-{i}-7d1f3e9a-plaintext-value").into_bytes()).collect();
    let cli_log = dir.path().join("cli.log");
    let cli = |args: &[&str], stdin: Option<&[u8]>| {
        let mut child = common::custody()
            .arg("--profile")
            .arg(&profile)
            .args(args)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input).unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        std::fs::OpenOptions::new().append(true).create(true).open(&cli_log).unwrap().write_all(&out.stderr).unwrap();
        out
    };

    // The workflow: keys, encrypt, decrypt, data keys, re-encrypt, rotation, errors on purpose.
    let key: serde_json::Value =
        serde_json::from_slice(&cli(&["--json", "key", "create", "--alias", "alias/canary"], None).stdout).unwrap();
    let key_id = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let other: serde_json::Value = serde_json::from_slice(&cli(&["--json", "key", "create"], None).stdout).unwrap();
    let other_id = other["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    let blob = cli(&["encrypt-blob", "-k", "alias/canary", "-c", "tenant=canary-ctx"], Some(&canaries[0])).stdout;
    let blob_file = dir.path().join("blob.b64");
    std::fs::write(&blob_file, &blob).unwrap();
    let plain = cli(&["decrypt-blob", "-c", "tenant=canary-ctx", blob_file.to_str().unwrap()], None);
    assert_eq!(plain.stdout, canaries[0]);
    assert!(!cli(&["decrypt-blob", "-c", "tenant=wrong", blob_file.to_str().unwrap()], None).status.success());
    cli(&["key", "rotate", "alias/canary"], None);
    for _ in 0..3 {
        let dk: serde_json::Value =
            serde_json::from_slice(&cli(&["--json", "data-key", "-k", &key_id], None).stdout).unwrap();
        canaries.push(STANDARD.decode(dk["Plaintext"].as_str().unwrap()).unwrap());
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut c = custody_client::Client::connect(&custody_client::Profile::load(&profile).unwrap()).await.unwrap();
        let enc = c
            .call("TrentService.Encrypt", json!({ "KeyId": key_id, "Plaintext": STANDARD.encode(&canaries[1]) }))
            .await
            .unwrap();
        c.call(
            "TrentService.ReEncrypt",
            json!({ "CiphertextBlob": enc["CiphertextBlob"], "DestinationKeyId": other_id }),
        )
        .await
        .unwrap();
        let r = c.call("TrentService.GenerateRandom", json!({ "NumberOfBytes": 32 })).await.unwrap();
        canaries.push(STANDARD.decode(r["Plaintext"].as_str().unwrap()).unwrap());
        // Errors on purpose, with canaries in the failing requests.
        c.call("TrentService.DisableKey", json!({ "KeyId": other_id })).await.unwrap();
        assert!(c
            .call("TrentService.Encrypt", json!({ "KeyId": other_id, "Plaintext": STANDARD.encode(&canaries[2]) }))
            .await
            .is_err());
        assert!(c
            .call("TrentService.Encrypt", json!({ "KeyId": "alias/none", "Plaintext": STANDARD.encode(&canaries[3]) }))
            .await
            .is_err());
        assert!(c
            .call_bytes(
                "TrentService.Encrypt",
                format!("{{\"KeyId\": \"{key_id}\", \"Plaintext\": \"{}\"", STANDARD.encode(&canaries[3])).into_bytes()
            )
            .await
            .is_err());
    });
    let export = dir.path().join("export.jsonl");
    assert!(cli(&["audit", "export", "--out", export.to_str().unwrap()], None).status.success());
    let backup = dir.path().join("canary.backup");
    assert!(cli(&["backup", "create", "--out", backup.to_str().unwrap()], None).status.success());

    let _ = std::process::Command::new("kill").args(["-TERM", &server.id().to_string()]).status();
    server.wait().unwrap();
    copier.join().unwrap();

    let mut files = vec![server_log.clone(), cli_log.clone(), export.clone(), backup.clone()];
    for entry in std::fs::read_dir(&data).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("custody.db") {
            files.push(p);
        }
    }
    let server_text = std::fs::read_to_string(&server_log).unwrap();
    assert!(server_text.contains("TRACE"), "the server really logged at trace level");
    assert!(server_text.contains("TrentService.Encrypt"), "and logged the requests");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for (i, canary) in canaries.iter().enumerate() {
            for (form, needle) in forms(canary) {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "canary {i} found in {form} form in {}",
                    f.display()
                );
            }
        }
    }
}
