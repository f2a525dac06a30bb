//! Crashes lose nothing: under a load of creates, rotations and encrypts, `custody server` is
//! killed with SIGKILL twenty times at random moments and restarted. Afterwards every key a client
//! was told exists, every ciphertext a client received decrypts, `custody check` is clean and the
//! audit trail verifies. On SQLite and on PostgreSQL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use custody_client::{Client, Profile};
use serde_json::json;

const KILLS: usize = 20;

/// What clients were told: keys created, and (key, ciphertext, plaintext) encrypted.
#[derive(Default)]
struct Told {
    keys: Vec<String>,
    ciphertexts: Vec<(String, String, String)>,
}

fn profile_for(data: &Path, addr: &str) -> Profile {
    let mut p = Profile::load(&data.join("admin/profile.toml")).unwrap();
    p.endpoint = Some(format!("https://localhost:{}", addr.rsplit(':').next().unwrap()));
    p
}

fn random_below(n: u64) -> u64 {
    u64::from_le_bytes(custody_crypto::random::array::<8>()) % n
}

/// Runs the load until the server disappears (or `until`); records only what the server
/// confirmed.
async fn load(profile: Profile, mut told: Told, until: Option<Instant>) -> Told {
    let Ok(mut c) = Client::connect(&profile).await else { return told };
    while until.is_none_or(|t| Instant::now() < t) {
        let r = match random_below(10) {
            0 => c.call("TrentService.CreateKey", json!({})).await.map(|v| {
                told.keys.push(v["KeyMetadata"]["KeyId"].as_str().unwrap().to_string());
            }),
            1 if !told.keys.is_empty() => {
                let k = told.keys[random_below(told.keys.len() as u64) as usize].clone();
                c.call("TrentService.RotateKeyOnDemand", json!({ "KeyId": k })).await.map(|_| ())
            }
            _ if !told.keys.is_empty() => {
                let k = told.keys[random_below(told.keys.len() as u64) as usize].clone();
                let pt = base64::engine::general_purpose::STANDARD.encode(custody_crypto::random::array::<24>());
                c.call("TrentService.Encrypt", json!({ "KeyId": k, "Plaintext": pt })).await.map(|v| {
                    told.ciphertexts.push((k, v["CiphertextBlob"].as_str().unwrap().to_string(), pt));
                })
            }
            _ => c.call("TrentService.CreateKey", json!({})).await.map(|v| {
                told.keys.push(v["KeyMetadata"]["KeyId"].as_str().unwrap().to_string());
            }),
        };
        if r.is_err() {
            return told;
        }
    }
    told
}

/// Every key a client was told about exists, every ciphertext decrypts to its plaintext, and
/// `custody check` finds nothing wrong.
async fn assert_intact(c: &mut Client, told: &Told) {
    for k in &told.keys {
        c.call("TrentService.DescribeKey", json!({ "KeyId": k })).await.unwrap_or_else(|e| panic!("key {k} lost: {e}"));
    }
    for (k, blob, pt) in &told.ciphertexts {
        let r = c.call("TrentService.Decrypt", json!({ "CiphertextBlob": blob })).await;
        let r = r.unwrap_or_else(|e| panic!("a ciphertext of {k} no longer decrypts: {e}"));
        assert_eq!(r["Plaintext"].as_str(), Some(pt.as_str()));
    }
    let check = c.call("Custody.CheckStore", json!({})).await.unwrap();
    assert!(check["Problems"].as_array().unwrap().is_empty(), "{check}");
}

fn crash_and_recover(data: &Path, env: &[(&str, &str)]) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let first = common::spawn_server_with(data, env);
    common::all_roles(&{
        let path = data.join("crash-profile.toml");
        profile_for(data, &first.addr).save(&path).unwrap();
        path
    });
    drop(first);
    let mut told = Told::default();
    let started = Instant::now();
    for _ in 0..KILLS {
        let server = common::spawn_server_with(data, env);
        let profile = profile_for(data, &server.addr);
        let task = rt.spawn(load(profile, std::mem::take(&mut told), None));
        std::thread::sleep(Duration::from_millis(50 + random_below(250)));
        drop(server); // SIGKILL, mid-request
        told = rt.block_on(task).unwrap();
    }
    assert!(
        told.keys.len() >= 3 && told.ciphertexts.len() >= 20,
        "the load ran: {} keys, {} ciphertexts",
        told.keys.len(),
        told.ciphertexts.len()
    );

    let server = common::spawn_server_with(data, env);
    let profile = profile_for(data, &server.addr);
    rt.block_on(async {
        let mut c = Client::connect(&profile).await.unwrap();
        assert_intact(&mut c, &told).await;
        let verify = c.call("Custody.VerifyAudit", json!({})).await.unwrap();
        assert!(verify["problem"].is_null(), "{verify}");
    });
    eprintln!(
        "{KILLS} kills in {:.1} s: {} keys and {} ciphertexts confirmed, all intact",
        started.elapsed().as_secs_f64(),
        told.keys.len(),
        told.ciphertexts.len()
    );
}

fn init(dir: &Path, database: Option<custody_store::PostgresOptions>) -> std::path::PathBuf {
    common::init_store(dir, custody_kms::InitOptions::FIRST_ADMIN_ROLES.to_vec(), database).0.data_dir
}

#[test]
fn sqlite_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = init(dir.path(), None);
    crash_and_recover(&data, &[]);
}

#[test]
fn postgresql_survives_sigkill() {
    let pg = common::test_database();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let dir = tempfile::tempdir().unwrap();
    let data = init(dir.path(), Some(pg.clone()));
    crash_and_recover(&data, &[("CUSTODY_DATABASE_URL", &url), ("CUSTODY_DATABASE_SCHEMA", &schema)]);
    custody_store::PostgresBackend::connect(&pg).unwrap().drop_schema().unwrap();
}

#[test]
fn one_of_two_nodes_dies_and_the_other_keeps_serving() {
    let pg = common::test_database();
    let (url, schema) = (pg.url.clone(), pg.schema.clone());
    let dir = tempfile::tempdir().unwrap();
    let data = init(dir.path(), Some(pg.clone()));
    let env = [("CUSTODY_DATABASE_URL", url.as_str()), ("CUSTODY_DATABASE_SCHEMA", schema.as_str())];
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let a = common::spawn_server_with(&data, &env);
    let b = common::spawn_server_with(&data, &env);
    let path = data.join("crash-profile.toml");
    profile_for(&data, &a.addr).save(&path).unwrap();
    common::all_roles(&path);

    // Load through both nodes; A is killed in the middle of it, B goes on.
    let through_a = rt.spawn(load(profile_for(&data, &a.addr), Told::default(), None));
    let until = Instant::now() + Duration::from_millis(1500);
    let through_b = rt.spawn(load(profile_for(&data, &b.addr), Told::default(), Some(until)));
    std::thread::sleep(Duration::from_millis(500));
    drop(a); // SIGKILL
    let told_a = rt.block_on(through_a).unwrap();
    let told_b = rt.block_on(through_b).unwrap();
    assert!(Instant::now() >= until, "B kept serving until the end of the load");
    assert!(
        told_a.ciphertexts.len() >= 3 && told_b.ciphertexts.len() >= 10,
        "{} / {}",
        told_a.ciphertexts.len(),
        told_b.ciphertexts.len()
    );

    // Everything either node confirmed is there, read through the survivor.
    rt.block_on(async {
        let mut c = Client::connect(&profile_for(&data, &b.addr)).await.unwrap();
        for told in [&told_a, &told_b] {
            assert_intact(&mut c, told).await;
        }
    });
    drop(b);
    custody_store::PostgresBackend::connect(&pg).unwrap().drop_schema().unwrap();
}
