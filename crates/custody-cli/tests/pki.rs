//! Certificates that renew themselves: the server renews its own under load, revocation reaches
//! open connections and other nodes within seconds, clients renew their own (by hand or with the
//! agent) and the Rust client picks the new one up, operator files are reloaded (and bad ones
//! refused), expired and not-yet-valid certificates are refused with a clear log line, and
//! `custody pki status` says what expires inside the window. Real servers on free ports.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_cli::bootstrap::Layout;
use custody_client::{Client, ClientError, Profile};
use custody_crypto::pki;
use custody_store::{Backend, Barrier, SqliteBackend, Table};
use serde_json::{json, Value};

/// The store's CA, read with the root key (the test holds the key-file seal), to make
/// certificates no API would issue: expired, not yet valid, due for renewal.
fn store_ca(dir: &Path, layout: &Layout) -> pki::IssuedCert {
    let root = custody_server::keyfile::read(&dir.join("root.key")).unwrap();
    let backend: Arc<dyn Backend> = Arc::new(SqliteBackend::open(&layout.database()).unwrap());
    let ca = Barrier::new(backend, root.barrier_key()).get::<Value>(Table::Pki, "ca").unwrap().unwrap().value;
    pki::IssuedCert {
        cert_pem: ca["cert_pem"].as_str().unwrap().to_string(),
        key_pem: custody_crypto::SecretBytes::new(ca["key_pem"].as_str().unwrap().as_bytes().to_vec()),
        serial: ca["serial"].as_str().unwrap().to_string(),
        not_after: time::OffsetDateTime::now_utc() + time::Duration::days(365),
    }
}

fn admin_identity(layout: &Layout) -> String {
    let cert = layout.data_dir.join("admin/admin.crt");
    custody_server::tls::describe_pem_file(&cert).unwrap().identity.unwrap()
}

/// Writes a certificate and key into `dir` and returns a profile using them against `base`.
fn profile_with(base: &Profile, dir: &Path, cert_pem: &str, key_pem: &[u8]) -> Profile {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("client.crt"), dir.join("client.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    Profile { cert_file: Some(cert), key_file: Some(key), ..base.clone() }
}

/// Issues a certificate for a new principal through the API and returns its profile and serial.
async fn principal_profile(admin: &mut Client, base: &Profile, dir: &Path, name: &str) -> (Profile, PathBuf, String) {
    admin.call("Custody.CreatePrincipal", json!({ "Name": name, "Roles": ["key-user"] })).await.unwrap();
    let r = admin.call("Custody.IssueCertificate", json!({ "Name": name, "TtlSeconds": 3600 })).await.unwrap();
    let p = profile_with(
        base,
        &dir.join(name),
        r["Certificate"].as_str().unwrap(),
        r["PrivateKey"].as_str().unwrap().as_bytes(),
    );
    let path = dir.join(name).join("profile.toml");
    p.save(&path).unwrap();
    (p, path, r["Serial"].as_str().unwrap().to_string())
}

/// The serial of the certificate a new connection is served.
async fn served_serial(profile: &Profile) -> String {
    let c = Client::connect(profile).await.unwrap();
    custody_server::tls::describe_der(c.server_certificate().unwrap()).unwrap().serial
}

fn is_refused(r: &Result<Value, ClientError>) -> bool {
    matches!(r, Err(ClientError::Api { status: 400, code, .. }) if code == "UnrecognizedClientException")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_renews_its_certificate_under_load_without_failing_a_request() {
    let (dir, layout) = common::keyfile_dir();
    // The issue's check: a 60-second lifetime, so a renewal every 40 s (and one at once, because
    // the certificate from init outlives it); the load runs across three more.
    let (server, profile) = common::start(dir.path(), &layout, |c| c.danger_server_cert_lifetime_seconds = 60).await;
    let initial = std::fs::read_to_string(layout.data_dir.join("tls/server.crt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(130);
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for _ in 0..8 {
        let mut c = Client::connect(&profile).await.unwrap();
        let (ok, failed) = (ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match c.call("TrentService.ListKeys", json!({})).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Meanwhile, new connections see (and verify, host name included) each new certificate.
    let mut serials: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        let s = served_serial(&profile).await;
        if serials.last() != Some(&s) {
            serials.push(s);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail across renewals");
    assert!(ok.load(Ordering::Relaxed) > 100, "the load ran: {}", ok.load(Ordering::Relaxed));
    assert!(serials.len() >= 4, "three renewals or more seen by new connections under load: {serials:?}");
    // The newest certificate is on disk for the next start, and is the one served.
    let on_disk = custody_server::tls::describe_pem_file(&layout.data_dir.join("tls/server.crt")).unwrap();
    assert_ne!(std::fs::read_to_string(layout.data_dir.join("tls/server.crt")).unwrap(), initial);
    assert!(on_disk.not_after - on_disk.not_before <= 60 + 300 + 1, "{on_disk:?}");
    // Each renewal is audited as the server's own act and listed.
    let (mut renewals, mut after) = (0, 0);
    loop {
        let page = server.kms().audit_records(after, 10_000).unwrap();
        renewals += page.iter().filter(|r| r.event.action == "Custody.RenewServerCertificate").count();
        match page.last() {
            Some(r) if page.len() == 10_000 => after = r.seq,
            _ => break,
        }
    }
    assert!(renewals >= 4, "{renewals} renewals audited");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_certificate_fails_on_open_connections_on_every_node_and_at_the_handshake() {
    let (dir, layout) = common::keyfile_dir();
    let (node_a, profile_a) = common::start(dir.path(), &layout, |_| {}).await;
    // A second node on the same store (in this process, so it may share the SQLite file).
    let (node_b, profile_b) = common::start(dir.path(), &layout, |_| {}).await;
    let mut admin = common::admin_client(&profile_a).await;
    let (app_a, _, serial) = principal_profile(&mut admin, &profile_a, dir.path(), "app").await;
    let app_b = Profile { endpoint: profile_b.endpoint.clone(), ..app_a.clone() };
    let mut on_a = Client::connect(&app_a).await.unwrap();
    let mut on_b = Client::connect(&app_b).await.unwrap();
    on_a.call("TrentService.ListKeys", json!({})).await.unwrap();
    on_b.call("TrentService.ListKeys", json!({})).await.unwrap();

    let r = admin.call("Custody.RevokeCertificate", json!({ "Serial": serial })).await.unwrap();
    assert_eq!(r["Revoked"], json!([serial]));
    // The revoking node refuses at once, on the connection opened before the revocation.
    assert!(is_refused(&on_a.call("TrentService.ListKeys", json!({})).await));
    // The other node within about a second (it reloads revocations from the store).
    let started = Instant::now();
    loop {
        let r = on_b.call("TrentService.ListKeys", json!({})).await;
        if is_refused(&r) {
            break;
        }
        r.unwrap();
        assert!(started.elapsed() < Duration::from_secs(5), "node B still accepts a revoked certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New connections with it fail the handshake, on both nodes.
    for p in [&app_a, &app_b] {
        let r = match Client::connect(p).await {
            Ok(mut c) => c.call("TrentService.ListKeys", json!({})).await,
            Err(e) => Err(e),
        };
        match r {
            Err(ClientError::Connect { reason, .. }) => assert!(reason.contains("Revoked"), "{reason}"),
            other => panic!("a revoked certificate must fail the handshake: {other:?}"),
        }
    }
    // Listed as revoked; revoking again changes nothing; by principal revokes all of theirs.
    let list = admin.call("Custody.ListCertificates", json!({})).await.unwrap();
    let row = list["Certificates"].as_array().unwrap().iter().find(|c| c["Serial"] == serial).unwrap().clone();
    assert_eq!(row["Status"], "revoked");
    let again = admin.call("Custody.RevokeCertificate", json!({ "Serial": serial })).await.unwrap();
    assert_eq!(again["Revoked"], json!([]));
    let (_, _, s1) = principal_profile(&mut admin, &profile_a, dir.path(), "ops").await;
    let s2 = admin.call("Custody.IssueCertificate", json!({ "Name": "ops" })).await.unwrap()["Serial"].clone();
    let r = admin.call("Custody.RevokeCertificate", json!({ "Principal": "ops" })).await.unwrap();
    let mut revoked: Vec<Value> = r["Revoked"].as_array().unwrap().clone();
    revoked.sort_by_key(|v| v.as_str().unwrap().to_string());
    let mut expected = vec![json!(s1), s2];
    expected.sort_by_key(|v| v.as_str().unwrap().to_string());
    assert_eq!(revoked, expected);
    // A serial custody has no record of (issued before certificates were recorded): a security
    // officer may revoke it, in any notation; a tenant admin who is not one gets NotFound.
    let r = admin.call("Custody.RevokeCertificate", json!({ "Serial": "00:AB:CD:EF" })).await.unwrap();
    assert_eq!(r["Revoked"], json!(["abcdef"]));
    let r = admin.call("Custody.RevokeCertificate", json!({ "Serial": "not hex" })).await;
    assert!(matches!(r, Err(ClientError::Api { ref code, .. }) if code == "ValidationException"), "{r:?}");
    admin.call("Custody.CreatePrincipal", json!({ "Name": "tadmin", "Roles": ["tenant-admin"] })).await.unwrap();
    let t = admin.call("Custody.IssueCertificate", json!({ "Name": "tadmin" })).await.unwrap();
    let tadmin = profile_with(
        &profile_a,
        &dir.path().join("tadmin"),
        t["Certificate"].as_str().unwrap(),
        t["PrivateKey"].as_str().unwrap().as_bytes(),
    );
    let r =
        Client::connect(&tadmin).await.unwrap().call("Custody.RevokeCertificate", json!({ "Serial": "0123" })).await;
    assert!(matches!(r, Err(ClientError::Api { ref code, .. }) if code == "NotFoundException"), "{r:?}");
    let (user, _, _) = principal_profile(&mut admin, &profile_a, dir.path(), "user").await;
    let r =
        Client::connect(&user).await.unwrap().call("Custody.RevokeCertificate", json!({ "Principal": "admin" })).await;
    assert!(matches!(r, Err(ClientError::Api { ref code, .. }) if code == "AccessDeniedException"), "{r:?}");
    node_a.shutdown().await;
    node_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_renews_its_own_certificate_and_the_client_library_picks_it_up() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut admin = common::admin_client(&profile).await;
    let (app, app_path, old_serial) = principal_profile(&mut admin, &profile, dir.path(), "app").await;
    let mut client = Client::connect(&app).await.unwrap();
    client.call("TrentService.ListKeys", json!({})).await.unwrap();

    // `custody pki renew` with the app's own profile: no administrator involved.
    let out = tokio::task::spawn_blocking(move || {
        common::custody().args(["pki", "renew", "--json", "--profile"]).arg(&app_path).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let renewed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_serial = renewed["Serial"].as_str().unwrap().to_string();
    assert_ne!(new_serial, old_serial);
    let on_disk = custody_server::tls::describe_pem_file(app.cert_file.as_ref().unwrap()).unwrap();
    assert_eq!(on_disk.serial, new_serial);
    assert!((on_disk.not_after - on_disk.not_before - 300 - 3600).abs() <= 5, "same lifetime as before: {on_disk:?}");

    // The old certificate stays valid until revoked; once it is, the open connection is refused
    // and closed, and the same client object reconnects with the renewed files by itself.
    client.call("TrentService.ListKeys", json!({})).await.unwrap();
    admin.call("Custody.RevokeCertificate", json!({ "Serial": old_serial })).await.unwrap();
    assert!(is_refused(&client.call("TrentService.ListKeys", json!({})).await));
    client.call("TrentService.ListKeys", json!({})).await.unwrap();
    let who = client.call("Custody.WhoAmI", json!({})).await.unwrap();
    assert!(who.to_string().contains("app"), "{who}");

    // Renewal is for mutual TLS only: a SigV4 caller cannot mint itself a certificate.
    let anonymous = Profile { cert_file: None, key_file: None, ..profile.clone() };
    let mut anon = Client::connect(&anonymous).await.unwrap();
    assert!(anon.call("Custody.RenewCertificate", json!({})).await.is_err());

    // The agent renews a certificate that is due (two thirds of its life gone) and leaves a
    // fresh one alone.
    let ca = store_ca(dir.path(), &layout);
    let uri = admin_identity(&layout).replace("/admin", "/app");
    let due = pki::issue_client(
        &ca,
        &uri,
        "app",
        time::OffsetDateTime::now_utc() - time::Duration::seconds(50),
        time::Duration::seconds(60),
    )
    .unwrap();
    let agent_dir = dir.path().join("agent");
    let p = profile_with(&profile, &agent_dir, &due.cert_pem, due.key_pem.expose_secret());
    p.save(&agent_dir.join("profile.toml")).unwrap();
    let run_agent =
        |path: PathBuf| common::custody().args(["agent", "--once", "--json", "--profile"]).arg(path).output().unwrap();
    let path = agent_dir.join("profile.toml");
    let out = tokio::task::spawn_blocking(move || run_agent(path)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fresh = custody_server::tls::describe_pem_file(&agent_dir.join("client.crt")).unwrap();
    assert_ne!(fresh.serial, due.serial);
    assert!(fresh.not_after - fresh.not_before >= 23 * 3600, "the default lifetime: {fresh:?}");
    let path = agent_dir.join("profile.toml");
    let out = tokio::task::spawn_blocking(move || run_agent(path)).await.unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["Renewed"], false, "{report}");
    assert_eq!(custody_server::tls::describe_pem_file(&agent_dir.join("client.crt")).unwrap().serial, fresh.serial);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operator_certificate_files_are_reloaded_and_a_bad_change_is_refused() {
    let (dir, layout) = common::keyfile_dir();
    let tls_dir = dir.path().join("operator-tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let (cert_file, key_file) = (tls_dir.join("server.crt"), tls_dir.join("server.key"));
    std::fs::copy(layout.data_dir.join("tls/server.crt"), &cert_file).unwrap();
    std::fs::copy(layout.data_dir.join("tls/server.key"), &key_file).unwrap();
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.tls.cert_file = Some(cert_file.clone());
        c.tls.key_file = Some(key_file.clone());
    })
    .await;
    let mut admin = common::admin_client(&profile).await;
    let first = served_serial(&profile).await;

    // A new certificate from the CA (issued through the API, as an operator would).
    let r = admin
        .call("Custody.IssueServerCertificate", json!({ "Names": ["localhost", "127.0.0.1"], "TtlSeconds": 86400 }))
        .await
        .unwrap();
    custody_cli::bootstrap::write_file(&key_file, r["PrivateKey"].as_str().unwrap().as_bytes(), 0o600).unwrap();
    custody_cli::bootstrap::write_file(&cert_file, r["Certificate"].as_str().unwrap().as_bytes(), 0o644).unwrap();
    let new = r["Serial"].as_str().unwrap().to_string();
    let started = Instant::now();
    while served_serial(&profile).await != new {
        assert!(started.elapsed() < Duration::from_secs(10), "the new files were not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(first, new);

    // A broken file: refused, alerted, and the last good certificate stays in service.
    std::fs::write(&cert_file, "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n").unwrap();
    let started = Instant::now();
    loop {
        let records = server.kms().audit_records(0, 10_000).unwrap();
        if let Some(r) = records.iter().find(|r| r.event.action == "Custody.ReloadServerCertificate") {
            assert!(r.event.alert, "{r:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the bad file was not reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served_serial(&profile).await, new);
    admin.call("TrentService.ListKeys", json!({})).await.unwrap();
    server.shutdown().await;
}

#[test]
fn expired_not_yet_valid_and_foreign_certificates_are_refused_with_a_clear_log_line() {
    let (dir, layout) = common::keyfile_dir();
    let ca = store_ca(dir.path(), &layout);
    let uri = admin_identity(&layout);
    let now = time::OffsetDateTime::now_utc();
    let expired =
        pki::issue_client(&ca, &uri, "admin", now - time::Duration::days(2), time::Duration::days(1)).unwrap();
    let early = pki::issue_client(&ca, &uri, "admin", now + time::Duration::days(1), time::Duration::days(1)).unwrap();
    let other_ca = pki::new_ca("another CA", now, time::Duration::days(1)).unwrap();
    let foreign = pki::issue_client(&other_ca, &uri, "admin", now, time::Duration::days(1)).unwrap();
    let server = common::spawn_server(&layout.data_dir);
    let admin = Profile::load(&layout.admin_profile()).unwrap();
    let base = Profile { endpoint: Some(format!("https://{}", server.addr)), ..admin };
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, cert, why) in
        [("expired", &expired, "xpired"), ("early", &early, "not valid yet"), ("foreign", &foreign, "unknownissuer")]
    {
        let p = profile_with(&base, &dir.path().join(name), &cert.cert_pem, cert.key_pem.expose_secret());
        let r = rt.block_on(async {
            match Client::connect(&p).await {
                Ok(mut c) => c.call("TrentService.ListKeys", json!({})).await,
                Err(e) => Err(e),
            }
        });
        assert!(matches!(r, Err(ClientError::Connect { .. })), "{name}: {r:?}");
        let started = Instant::now();
        loop {
            let log = server.log.lock().unwrap().clone();
            let line = log.iter().find(|l| l.contains("client certificate refused") && l.contains(&cert.serial));
            if let Some(line) = line {
                assert!(line.to_lowercase().contains(why) || line.contains("NotValidYet"), "{name}: {line}");
                assert!(line.contains(&uri), "the log line names the identity: {line}");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{name}: no log line in {log:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // The real certificate still works.
    rt.block_on(async {
        Client::connect(&base).await.unwrap().call("TrentService.ListKeys", json!({})).await.unwrap()
    });
    server.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn pki_status_names_what_expires_inside_the_window() {
    let (dir, layout) = common::keyfile_dir();
    // The server's own daily warning, with a window wide enough to include its certificate.
    let (server, _) = common::start(dir.path(), &layout, |c| c.tls.expiry_warn_days = 400).await;
    let started = Instant::now();
    loop {
        let records = server.kms().audit_records(0, 10_000).unwrap();
        if let Some(r) = records.iter().find(|r| r.event.action == "Custody.CertificateExpiryWarning") {
            assert!(r.event.alert && r.event.detail.as_deref().unwrap_or("").contains("server certificate"), "{r:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no expiry warning in the audit trail");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let profile = layout.admin_profile();
    let status = |warn: &'static str| {
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || {
            common::custody()
                .args(["pki", "status", "--json", "--warn", warn, "--profile"])
                .arg(profile)
                .output()
                .unwrap()
        })
    };
    // The server's certificate lives 30 days and the administrator's 90: inside 400 days.
    let out = status("400d").await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let inside: Vec<&str> = report["Certificates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["InsideWarningWindow"] == true)
        .map(|c| c["Kind"].as_str().unwrap())
        .collect();
    assert!(inside.contains(&"server (served)") && inside.contains(&"client (yours)"), "{report}");
    assert!(!inside.contains(&"ca"), "the CA lives ten years: {report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning window"));
    // Nothing inside one day.
    let out = status("1d").await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    // The rest of `custody pki`, as an operator types it.
    let cli = |args: Vec<String>| {
        let profile = profile.clone();
        tokio::task::spawn_blocking(move || {
            let out = common::custody().arg("--profile").arg(profile).arg("--json").args(&args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut admin = common::admin_client(&Profile::load(&profile).unwrap()).await;
    admin.call("Custody.CreatePrincipal", json!({ "Name": "app", "Roles": ["key-user"] })).await.unwrap();
    let out_dir = dir.path().join("app-cert").display().to_string();
    let issued = cli(s(&["pki", "issue", "--principal", "app", "--ttl", "2h", "--out", &out_dir])).await.unwrap();
    let serial = issued["Serial"].as_str().unwrap().to_string();
    let app_cert = custody_server::tls::describe_pem_file(&Path::new(&out_dir).join("app.crt")).unwrap();
    assert_eq!(app_cert.serial, serial);
    assert!(app_cert.identity.unwrap().ends_with("/app"));
    assert!((app_cert.not_after - app_cert.not_before - 300 - 7200).abs() <= 5);
    let server_dir = dir.path().join("kms2").display().to_string();
    let issued = cli(s(&["pki", "issue", "--server", "--name", "kms2.internal", "--out", &server_dir])).await.unwrap();
    let kms2 = custody_server::tls::describe_pem_file(&Path::new(&server_dir).join("server.crt")).unwrap();
    assert_eq!(
        (kms2.serial.as_str(), kms2.names.clone()),
        (issued["Serial"].as_str().unwrap(), vec!["kms2.internal".to_string()])
    );
    assert!(kms2.not_after - kms2.not_before >= 30 * 86_400, "30 days by default");
    let list = cli(s(&["pki", "list"])).await.unwrap();
    let row =
        |l: &Value, serial: &str| l["Certificates"].as_array().unwrap().iter().find(|c| c["Serial"] == serial).cloned();
    assert_eq!(row(&list, &serial).unwrap()["Status"], "valid");
    assert_eq!(row(&list, &kms2.serial).unwrap()["Kind"], "server");
    let revoked = cli(s(&["pki", "revoke", &serial])).await.unwrap();
    assert_eq!(revoked["Revoked"], json!([serial]));
    assert_eq!(row(&cli(s(&["pki", "list"])).await.unwrap(), &serial).unwrap()["Status"], "revoked");
    server.shutdown().await;
}

/// A client with its own copy of the CA file (the one its profile trusts the server with).
async fn principal_with_own_ca(admin: &mut Client, base: &Profile, dir: &Path, name: &str) -> (Profile, PathBuf) {
    let (p, path, _) = principal_profile(admin, base, dir, name).await;
    let ca = dir.join(name).join("ca.crt");
    std::fs::copy(base.ca_file.as_ref().unwrap(), &ca).unwrap();
    let p = Profile { ca_file: Some(ca), ..p };
    p.save(&path).unwrap();
    (p, path)
}

fn issuer_of_pem_file(path: &Path) -> String {
    custody_server::tls::describe_pem_file(path).unwrap().issuer
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ca_rolls_over_in_three_steps_without_an_outage_for_clients_that_took_the_new_bundle() {
    let (dir, layout) = common::keyfile_dir();
    // A short server lifetime only so that the renewal task looks every two seconds.
    let (server, profile) = common::start(dir.path(), &layout, |c| c.danger_server_cert_lifetime_seconds = 60).await;
    let mut admin = common::admin_client(&profile).await;
    let (app, app_path) = principal_with_own_ca(&mut admin, &profile, dir.path(), "app").await;
    let (late, _) = principal_with_own_ca(&mut admin, &profile, dir.path(), "late").await;
    let (stale, _) = principal_with_own_ca(&mut admin, &profile, dir.path(), "stale").await;
    let old_ca = issuer_of_pem_file(app.cert_file.as_ref().unwrap());
    let admin_profile = layout.admin_profile();
    let cli = |args: Vec<String>, profile: PathBuf| {
        tokio::task::spawn_blocking(move || {
            let out = common::custody().args(&args).arg("--profile").arg(profile).output().unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
            )
        })
    };
    let rotate = |step: &str| cli(vec!["pki".into(), "rotate-ca".into(), step.into()], admin_profile.clone());
    let renew = |p: PathBuf| cli(vec!["pki".into(), "renew".into()], p);
    let cas = |r: &Value| r["Certificates"].as_array().unwrap().iter().filter(|c| c["Kind"] == "ca").count();

    let (ok, out) = rotate("finish").await.unwrap();
    assert!(!ok && out.contains("no CA rotation is under way"), "{out}");

    // 1. start: the next CA is trusted, not issuing. The app renews and so takes the bundle.
    let (ok, out) = rotate("start").await.unwrap();
    assert!(ok, "{out}");
    assert_eq!(cas(&admin.call("Custody.ListCertificates", json!({})).await.unwrap()), 2);
    let (ok, out) = renew(app_path.clone()).await.unwrap();
    assert!(ok, "{out}");
    let bundle = std::fs::read_to_string(app.ca_file.as_ref().unwrap()).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "the app now trusts both CAs");
    assert_eq!(issuer_of_pem_file(app.cert_file.as_ref().unwrap()), old_ca, "still issued by the current CA");
    std::fs::write(late.ca_file.as_ref().unwrap(), &bundle).unwrap();

    // 2. finish: servers switch to a certificate from the new CA at once.
    let (ok, out) = rotate("finish").await.unwrap();
    assert!(ok, "{out}");
    let started = Instant::now();
    loop {
        let c = Client::connect(&app).await.unwrap();
        let served = custody_server::tls::describe_der(c.server_certificate().unwrap()).unwrap();
        if served.issuer != old_ca {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the server did not switch to the new CA");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Clients with the bundle work, with certificates from either CA; one that never took the
    // bundle cannot verify the server any more (which is why `start` comes first).
    Client::connect(&app).await.unwrap().call("TrentService.ListKeys", json!({})).await.unwrap();
    Client::connect(&late).await.unwrap().call("TrentService.ListKeys", json!({})).await.unwrap();
    match Client::connect(&stale).await {
        Err(ClientError::Connect { reason, .. }) => assert!(reason.contains("UnknownIssuer"), "{reason}"),
        other => panic!("a client without the new CA cannot verify the server: {other:?}"),
    }
    // The list says which certificates still come from the previous CA.
    let list = admin.call("Custody.ListCertificates", json!({})).await.unwrap();
    let issuing = list["Certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["Kind"] == "ca" && c["Subject"].as_str().unwrap().contains("issuing"))
        .unwrap()["Serial"]
        .clone();
    let late_serial = custody_server::tls::describe_pem_file(late.cert_file.as_ref().unwrap()).unwrap().serial;
    let late_row = list["Certificates"].as_array().unwrap().iter().find(|c| c["Serial"] == late_serial).unwrap();
    assert!(late_row["Issuer"].is_string() && late_row["Issuer"] != issuing, "{late_row}");
    let (ok, out) = renew(app_path.clone()).await.unwrap();
    assert!(ok, "{out}");
    assert_ne!(issuer_of_pem_file(app.cert_file.as_ref().unwrap()), old_ca, "renewed from the new CA");
    let list = admin.call("Custody.ListCertificates", json!({})).await.unwrap();
    let app_serial = custody_server::tls::describe_pem_file(app.cert_file.as_ref().unwrap()).unwrap().serial;
    let app_row = list["Certificates"].as_array().unwrap().iter().find(|c| c["Serial"] == app_serial).unwrap();
    assert_eq!(app_row["Issuer"], issuing, "{app_row}");

    // 3. retire: certificates of the old CA stop working on every node within seconds; renewed
    // ones go on. (The administrator renews first, or it would lock itself out.)
    let (ok, out) = renew(admin_profile.clone()).await.unwrap();
    assert!(ok, "{out}");
    let (ok, out) = rotate("retire").await.unwrap();
    assert!(ok, "{out}");
    let started = Instant::now();
    loop {
        let r = match Client::connect(&late).await {
            Ok(mut c) => c.call("TrentService.ListKeys", json!({})).await,
            Err(e) => Err(e),
        };
        match r {
            Err(ClientError::Connect { reason, .. }) => {
                assert!(reason.contains("UnknownCA") || reason.contains("BadCertificate"), "{reason}");
                break;
            }
            r => {
                r.unwrap();
                assert!(started.elapsed() < Duration::from_secs(5), "the retired CA is still trusted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Client::connect(&app).await.unwrap().call("TrentService.ListKeys", json!({})).await.unwrap();
    let mut admin = common::admin_client(&profile).await;
    assert_eq!(cas(&admin.call("Custody.ListCertificates", json!({})).await.unwrap()), 1);
    // The server's CA file now holds exactly the new CA, so a restart trusts what the store does.
    let on_disk = std::fs::read_to_string(layout.data_dir.join("tls/ca.crt")).unwrap();
    assert_eq!(on_disk.matches("BEGIN CERTIFICATE").count(), 1);
    assert_ne!(custody_server::tls::describe_pem(on_disk.as_bytes()).unwrap().common_name, old_ca);
    server.shutdown().await;
}
