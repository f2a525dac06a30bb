//! The root of trust in a PKCS#11 token, end to end against SoftHSM2 (scripts/test installs the
//! Debian package): init, auto-unseal at every start, a wrong PIN or a missing token (clear
//! error, the server stays sealed), recovery with the shares, and migration between Shamir
//! shares and the token both ways, with every ciphertext still decrypting.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use custody_cli::bootstrap::{self, Layout};
use custody_client::{Client, Profile};
use custody_hsm::softhsm;
use serde_json::{json, Value};

struct Token {
    conf: PathBuf,
    pin: PathBuf,
    bad_pin: PathBuf,
    empty_conf: PathBuf,
}

fn token(dir: &Path) -> Token {
    let conf = softhsm::init_token(&dir.join("hsm"), "custody", "1234").expect("SoftHSM2 (Debian package softhsm2)");
    let empty_conf = softhsm::init_token(&dir.join("other-hsm"), "not-custody", "1234").unwrap();
    let pin = dir.join("pin");
    let bad_pin = dir.join("bad-pin");
    bootstrap::write_file(&pin, b"1234\n", 0o600).unwrap();
    bootstrap::write_file(&bad_pin, b"9999\n", 0o600).unwrap();
    Token { conf, pin, bad_pin, empty_conf }
}

/// `custody init --seal pkcs11` into `data` with the token of `t`, recovery shares in `shares`.
fn init_pkcs11(t: &Token, data: &Path, shares: &Path) {
    let args = [
        "init",
        "--json",
        "--data",
        data.to_str().unwrap(),
        "--seal",
        "pkcs11",
        "--token-label",
        "custody",
        "--pin-file",
        t.pin.to_str().unwrap(),
        "--shares-dir",
        shares.to_str().unwrap(),
    ];
    let out = custody(&t.conf, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn custody(conf: &Path, args: &[&str]) -> std::process::Output {
    common::custody().env("SOFTHSM2_CONF", conf).args(args).output().unwrap()
}

fn start(data: &Path, conf: &Path, pin: Option<&Path>) -> (common::Running, Profile) {
    let conf = conf.display().to_string();
    let pin = pin.map(|p| p.display().to_string());
    let mut env = vec![("SOFTHSM2_CONF", conf.as_str())];
    if let Some(p) = &pin {
        env.push(("CUSTODY_PKCS11_PIN_FILE", p.as_str()));
    }
    let server = common::spawn_server_with(data, &env);
    let layout = Layout { data_dir: data.to_path_buf() };
    let path = bootstrap::write_profile(&layout, "admin", &format!("https://{}", server.addr)).unwrap();
    (server, Profile::load(&path).unwrap())
}

async fn status(profile: &Profile) -> Value {
    Client::connect(profile).await.unwrap().call("Custody.GetStatus", json!({})).await.unwrap()
}

/// Waits for a log line containing `needle` (logged before or after the "listening" line).
fn logged(server: &common::Running, needle: &str) -> String {
    let started = Instant::now();
    loop {
        let log = server.log.lock().unwrap();
        if let Some(l) = server.stderr_lines.iter().chain(log.iter()).find(|l| l.contains(needle)) {
            return l.clone();
        }
        drop(log);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no log line with {needle:?}: {:#?}",
            server.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `args` followed by `--share-file` for three shares written by `init --shares-dir dir`.
fn with_shares(args: &[&str], dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    for i in 1..=3 {
        out.extend(["--share-file".into(), dir.join(format!("share-{i}.txt")).display().to_string()]);
    }
    out
}

async fn encrypt(profile: &Profile, text: &[u8]) -> String {
    let mut c = Client::connect(profile).await.unwrap();
    let key = common::create_key(&mut c, "KeyId").await;
    let body = json!({ "KeyId": key, "Plaintext": base64::engine::general_purpose::STANDARD.encode(text) });
    c.call("TrentService.Encrypt", body).await.unwrap()["CiphertextBlob"].as_str().unwrap().to_string()
}

async fn decrypt(profile: &Profile, blob: &str) -> Vec<u8> {
    let mut c = Client::connect(profile).await.unwrap();
    let r = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await.unwrap();
    base64::engine::general_purpose::STANDARD.decode(r["Plaintext"].as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pkcs11_store_unseals_itself_and_recovers_with_its_shares() {
    let dir = tempfile::tempdir().unwrap();
    let t = token(dir.path());
    let data = dir.path().join("data");
    let shares = dir.path().join("shares");
    init_pkcs11(&t, &data, &shares);
    assert_eq!(std::fs::read_dir(&shares).unwrap().count(), 5, "5 recovery shares");
    // Use it, restart, decrypt: no share was typed.
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    let s = status(&profile).await;
    assert_eq!((s["Sealed"].clone(), s["SealType"].clone()), (json!(false), json!("pkcs11")), "{s}");
    common::all_roles(&bootstrap::Layout { data_dir: data.clone() }.admin_profile());
    let blob = encrypt(&profile, b"sealed in hardware").await;
    server.terminate();
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    assert_eq!(decrypt(&profile, &blob).await, b"sealed in hardware");
    server.terminate();

    // A wrong PIN: the server says so and stays sealed; the recovery shares unseal it.
    let (server, profile) = start(&data, &t.conf, Some(&t.bad_pin));
    let line = logged(&server, "PKCS#11 auto-unseal failed");
    assert!(line.contains("refused the PIN") && line.contains("custody unseal --recovery"), "{line}");
    assert_eq!(status(&profile).await["Sealed"], true);
    let admin = bootstrap::Layout { data_dir: data.clone() }.admin_profile();
    let args = with_shares(&["--profile", admin.to_str().unwrap(), "unseal", "--recovery"], &shares);
    let out = common::custody().args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(decrypt(&profile, &blob).await, b"sealed in hardware");
    server.terminate();

    // The token missing (another token present): named, sealed.
    let (server, profile) = start(&data, &t.empty_conf, Some(&t.pin));
    let line = logged(&server, "PKCS#11 auto-unseal failed");
    assert!(line.contains("no PKCS#11 token labelled"), "{line}");
    assert_eq!(status(&profile).await["Sealed"], true);
    server.terminate();

    // No PIN configured at all: said so, sealed.
    let (server, profile) = start(&data, &t.conf, None);
    let line = logged(&server, "PKCS#11 auto-unseal failed");
    assert!(line.contains("pkcs11.pin_file"), "{line}");
    assert_eq!(status(&profile).await["Sealed"], true);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn seal_migrate_moves_a_store_to_the_token_and_back_without_touching_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let t = token(dir.path());
    let data = dir.path().join("data");
    let shares = dir.path().join("shares");
    let out = custody(&t.conf, &["init", "--data", data.to_str().unwrap(), "--shares-dir", shares.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let admin = bootstrap::Layout { data_dir: data.clone() }.admin_profile();
    let unseal = |profile: &Path| {
        let args = with_shares(&["--profile", profile.to_str().unwrap(), "unseal"], &shares);
        let out = common::custody().args(&args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };

    // A Shamir store with a ciphertext.
    let (server, profile) = start(&data, &t.conf, None);
    unseal(&admin);
    common::all_roles(&admin);
    let blob = encrypt(&profile, b"before the move").await;
    // Migration is offline: refused while the server holds the store.
    let pin = t.pin.display().to_string();
    let migrate = ["seal", "migrate", "--data", data.to_str().unwrap(), "--to", "pkcs11", "--token-label", "custody"];
    let to_pkcs11 = with_shares(&[&migrate[..], &["--pin-file", &pin]].concat(), &shares);
    let args: Vec<&str> = to_pkcs11.iter().map(String::as_str).collect();
    let out = custody(&t.conf, &args);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use by another process"));
    server.terminate();

    // To the token: the server unseals itself, and the old ciphertext decrypts.
    let out = custody(&t.conf, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    let s = status(&profile).await;
    assert_eq!((s["Sealed"].clone(), s["SealType"].clone()), (json!(false), json!("pkcs11")), "{s}");
    assert_eq!(decrypt(&profile, &blob).await, b"before the move");
    server.terminate();

    // And back: the same shares unseal it again.
    let out =
        custody(&t.conf, &["seal", "migrate", "--data", data.to_str().unwrap(), "--to", "shamir", "--pin-file", &pin]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    let s = status(&profile).await;
    assert_eq!((s["Sealed"].clone(), s["SealType"].clone()), (json!(true), json!("shamir")), "{s}");
    unseal(&admin);
    assert_eq!(decrypt(&profile, &blob).await, b"before the move");
    server.terminate();

    // Shares that are not this store's move nothing.
    let other = dir.path().join("other");
    let other_shares = dir.path().join("other-shares");
    let out =
        custody(&t.conf, &["init", "--data", other.to_str().unwrap(), "--shares-dir", other_shares.to_str().unwrap()]);
    assert!(out.status.success());
    let wrong = with_shares(
        &["seal", "migrate", "--data", data.to_str().unwrap(), "--to", "pkcs11", "--pin-file", &pin],
        &other_shares,
    );
    let args: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let out = custody(&t.conf, &args);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not issued for this store"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pkcs11_store_rotates_its_root_and_the_token_wraps_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let t = token(dir.path());
    let data = dir.path().join("data");
    let (shares, new_shares) = (dir.path().join("shares"), dir.path().join("new-shares"));
    init_pkcs11(&t, &data, &shares);
    let admin = bootstrap::Layout { data_dir: data.clone() }.admin_profile();
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    common::all_roles(&admin);
    let blob = encrypt(&profile, b"before the rotation").await;
    let r = common::rotate_root(&admin, &new_shares).await;
    assert_eq!(r["Status"]["Generation"], 2, "{r}");
    assert_eq!(std::fs::read_dir(&new_shares).unwrap().count(), 5, "new recovery shares");
    server.terminate();

    // The token unwraps the new root at the next start: nothing typed, everything decrypts.
    let (server, profile) = start(&data, &t.conf, Some(&t.pin));
    let s = status(&profile).await;
    assert_eq!((s["Sealed"].clone(), s["RootGeneration"].clone()), (json!(false), json!(2)), "{s}");
    assert_eq!(decrypt(&profile, &blob).await, b"before the rotation");
    server.terminate();

    // Without the token: the old recovery shares are refused, the new ones recover.
    let (server, profile) = start(&data, &t.conf, None);
    let recover = |dir: &Path| {
        let args = with_shares(&["--profile", admin.to_str().unwrap(), "unseal", "--recovery"], dir);
        common::custody().args(&args).output().unwrap()
    };
    let old = recover(&shares);
    assert!(!old.status.success());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("not issued for this store"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let new = recover(&new_shares);
    assert!(new.status.success(), "{}", String::from_utf8_lossy(&new.stderr));
    assert_eq!(decrypt(&profile, &blob).await, b"before the rotation");
    server.terminate();
}
