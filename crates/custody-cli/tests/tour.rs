//! The `custody` binary end to end, as an operator uses it: init with 3-of-5 Shamir shares,
//! server, unseal, keys, rotation, restart, and the error exit codes.

mod common;

use std::path::Path;
use std::process::Output;

use common::custody;

fn run(profile: &Path, args: &[&str]) -> Output {
    custody().arg("--profile").arg(profile).args(args).output().unwrap()
}

fn ok(profile: &Path, args: &[&str]) -> String {
    let out = run(profile, args);
    assert!(out.status.success(), "custody {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn json(profile: &Path, args: &[&str]) -> serde_json::Value {
    let mut with_json = vec!["--json"];
    with_json.extend_from_slice(args);
    serde_json::from_str(&ok(profile, &with_json)).unwrap()
}

fn unseal(profile: &Path, shares: &[std::path::PathBuf]) {
    let mut cmd = custody();
    cmd.arg("--profile").arg(profile).arg("unseal");
    for s in shares {
        cmd.arg("--share-file").arg(s);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "unseal: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn shamir_rotation_restart_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shares_dir = dir.path().join("shares");
    let out =
        custody().args(["init", "--json", "--data"]).arg(&data).arg("--shares-dir").arg(&shares_dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let init: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shares: Vec<_> = (1..=5).map(|i| shares_dir.join(format!("share-{i}.txt"))).collect();
    for s in &shares {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(s).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "share files are private");
    }
    assert_eq!(init["Shares"].as_array().unwrap().len(), 0, "shares written to files are not also printed");

    // A second init changes nothing.
    let again = custody().args(["init", "--data"]).arg(&data).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already initialized"));

    let server = common::spawn_server(&data);
    let profile = dir.path().join("profile.toml");
    std::fs::write(
        &profile,
        std::fs::read_to_string(init["Profile"].as_str().unwrap()).unwrap().replace(
            "https://localhost:8443",
            &format!("https://localhost:{}", server.addr.rsplit(':').next().unwrap()),
        ),
    )
    .unwrap();

    // Sealed: status says so (exit 8); key operations are refused the same way.
    assert_eq!(run(&profile, &["status"]).status.code(), Some(8));
    let sealed = run(&profile, &["key", "list"]);
    assert_eq!(sealed.status.code(), Some(8), "{}", String::from_utf8_lossy(&sealed.stderr));
    assert!(String::from_utf8_lossy(&sealed.stderr).contains("custody unseal"));

    // A share of another store is refused with a clear message and does not count.
    let foreign = tempfile::tempdir().unwrap();
    let f = custody()
        .args(["init", "--data"])
        .arg(foreign.path().join("d"))
        .arg("--shares-dir")
        .arg(foreign.path().join("s"))
        .output()
        .unwrap();
    assert!(f.status.success());
    let mut cmd = custody();
    let bad = cmd
        .arg("--profile")
        .arg(&profile)
        .args(["unseal", "--share-file"])
        .arg(foreign.path().join("s/share-1.txt"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(9));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not issued for this store"));

    unseal(&profile, &shares[0..3]);
    common::all_roles(&profile);
    let status = json(&profile, &["status"]);
    assert_eq!(status["Status"]["Sealed"], false);
    assert_eq!(status["KeyExchange"], "X25519MLKEM768");

    let key = json(&profile, &["key", "create", "--description", "tour"]);
    let key_id = key["KeyMetadata"]["KeyId"].as_str().unwrap().to_string();
    ok(&profile, &["key", "alias", "create", "alias/tour", &key_id]);
    let secret_file = dir.path().join("secret.txt");
    std::fs::write(&secret_file, b"correct horse battery staple").unwrap();
    let blob = ok(&profile, &["encrypt-blob", "-k", "alias/tour", "-c", "purpose=tour", secret_file.to_str().unwrap()]);
    let blob_file = dir.path().join("secret.b64");
    std::fs::write(&blob_file, &blob).unwrap();
    ok(&profile, &["key", "rotate", "alias/tour"]);
    ok(&profile, &["key", "rotate", &key_id]);
    let rotations = json(&profile, &["key", "rotations", "alias/tour"]);
    assert_eq!(rotations["Rotations"].as_array().unwrap().len(), 2);
    let plain = ok(&profile, &["decrypt-blob", "-c", "purpose=tour", blob_file.to_str().unwrap()]);
    assert_eq!(plain, "correct horse battery staple");

    // A backup opens with a quorum of the shares (any three), and not with two.
    let backup = dir.path().join("tour.backup");
    ok(&profile, &["backup", "create", "--out", backup.to_str().unwrap()]);
    let with = |s: &[std::path::PathBuf]| {
        let mut args = vec!["--json".to_string(), "backup".into(), "verify".into(), backup.display().to_string()];
        for f in s {
            args.extend(["--share-file".to_string(), f.display().to_string()]);
        }
        run(&profile, &args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let verified = with(&[shares[0].clone(), shares[2].clone(), shares[4].clone()]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
    let report: serde_json::Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["Check"]["Canaries"].as_u64(), Some(3), "{report}");
    assert!(!with(&shares[0..2]).status.success(), "two shares of a 3-of-5 split do not open a backup");

    // Restart: sealed again; a different three shares unseal; the old ciphertext still decrypts.
    server.terminate();
    let server = common::spawn_server(&data);
    std::fs::write(
        &profile,
        std::fs::read_to_string(&profile)
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("endpoint") {
                    format!("endpoint = \"https://localhost:{}\"", server.addr.rsplit(':').next().unwrap())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    assert_eq!(run(&profile, &["status"]).status.code(), Some(8));
    unseal(&profile, &[shares[4].clone(), shares[1].clone(), shares[3].clone()]);
    let plain = ok(&profile, &["decrypt-blob", "-c", "purpose=tour", blob_file.to_str().unwrap()]);
    assert_eq!(plain, "correct horse battery staple");

    // Wrong context and a flipped byte: InvalidCiphertextException, exit 7.
    let wrong = run(&profile, &["decrypt-blob", "-c", "purpose=other", blob_file.to_str().unwrap()]);
    assert_eq!(wrong.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("InvalidCiphertextException"));
    use base64::Engine;
    let mut raw = base64::engine::general_purpose::STANDARD.decode(blob.trim()).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    let flipped = dir.path().join("flipped.bin");
    std::fs::write(&flipped, &raw).unwrap();
    let out = run(&profile, &["decrypt-blob", "-c", "purpose=tour", flipped.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("InvalidCiphertextException"));

    // Unknown key (exit 5), disabled key (exit 6), validation (exit 9).
    assert_eq!(run(&profile, &["key", "describe", "alias/nope"]).status.code(), Some(5));
    ok(&profile, &["key", "disable", "alias/tour"]);
    let disabled = run(&profile, &["decrypt-blob", "-c", "purpose=tour", blob_file.to_str().unwrap()]);
    assert_eq!(disabled.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&disabled.stderr).contains("DisabledException"));
    assert_eq!(run(&profile, &["key", "schedule-deletion", "alias/tour", "--days", "3"]).status.code(), Some(9));
    let scheduled = json(&profile, &["key", "schedule-deletion", "alias/tour", "--days", "7"]);
    assert_eq!(scheduled["KeyState"], "PendingDeletion");
    let pending = run(&profile, &["decrypt-blob", "-c", "purpose=tour", blob_file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&pending.stderr).contains("KMSInvalidStateException"));
    ok(&profile, &["key", "cancel-deletion", "alias/tour"]);
    assert_eq!(json(&profile, &["key", "describe", "alias/tour"])["KeyMetadata"]["KeyState"], "Disabled");
    server.terminate();
}

#[test]
fn every_command_has_help_with_an_example() {
    let commands: &[&[&str]] = &[
        &["dev"],
        &["init"],
        &["server"],
        &["unseal"],
        &["status"],
        &["encrypt-blob"],
        &["decrypt-blob"],
        &["data-key"],
        &["pki", "issue"],
        &["pki", "list"],
        &["pki", "revoke"],
        &["pki", "renew"],
        &["pki", "status"],
        &["pki", "rotate-ca"],
        &["agent"],
        &["seal", "migrate"],
        &["key", "create"],
        &["key", "list"],
        &["key", "describe"],
        &["key", "enable"],
        &["key", "disable"],
        &["key", "rotate"],
        &["key", "rotations"],
        &["key", "schedule-deletion"],
        &["key", "cancel-deletion"],
        &["key", "alias", "create"],
        &["key", "alias", "update"],
        &["key", "alias", "delete"],
        &["key", "alias", "list"],
        &["key", "rotation", "enable"],
        &["key", "rotation", "disable"],
        &["key", "rotation", "status"],
        &["key", "tag"],
        &["key", "untag"],
        &["key", "tags"],
        &["access-key", "create"],
        &["access-key", "list"],
        &["access-key", "disable"],
        &["access-key", "enable"],
        &["access-key", "delete"],
        &["audit", "query"],
        &["audit", "verify"],
        &["audit", "export"],
        &["audit", "hash"],
        &["audit", "tail"],
        &["key", "policy", "get"],
        &["key", "policy", "put"],
        &["tenant", "create"],
        &["tenant", "list"],
        &["principal", "create"],
        &["principal", "list"],
        &["principal", "describe"],
        &["principal", "disable"],
        &["principal", "enable"],
        &["principal", "roles"],
        &["principal", "delete"],
        &["principal", "cert", "issue"],
        &["access", "who-can"],
        &["access", "explain"],
        &["check"],
        &["backup", "create"],
        &["backup", "verify"],
        &["backup", "restore"],
    ];
    for c in commands {
        let out = custody().args(*c).arg("--help").output().unwrap();
        assert!(out.status.success(), "{c:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("Example"), "custody {} --help has no example", c.join(" "));
        assert!(text.contains("--json"), "custody {} --help does not offer --json", c.join(" "));
    }
}

#[test]
fn without_a_server_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = custody().current_dir(dir.path()).args(["key", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUSTODY_ENDPOINT"), "{err}");
}

#[test]
fn unseal_reads_shares_from_standard_input() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = custody()
        .args(["--json", "init", "--data"])
        .arg(&data)
        .args(["--shares", "3", "--threshold", "2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let init: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shares: Vec<String> =
        init["Shares"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    assert_eq!(shares.len(), 3, "without --shares-dir the shares are printed (once)");
    let server = common::spawn_server(&data);
    let profile = dir.path().join("p.toml");
    let text = std::fs::read_to_string(init["Profile"].as_str().unwrap()).unwrap();
    std::fs::write(
        &profile,
        text.replace(
            "https://localhost:8443",
            &format!("https://localhost:{}", server.addr.rsplit(':').next().unwrap()),
        ),
    )
    .unwrap();
    // A wrong line is refused and does not count; two good shares unseal.
    let mut child = custody()
        .arg("--profile")
        .arg(&profile)
        .arg("unseal")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("custody-share-not-a-share\n{}\n{}\n", shares[2], shares[0]);
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("share refused"), "{stderr}");
    assert!(stdout.contains("Unsealed."), "{stdout}");
    server.terminate();
}
