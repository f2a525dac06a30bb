//! Transport security with a real server on a free port: TLS 1.3 only, post-quantum key exchange
//! preferred, client certificates from this CA only.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use custody_client::{ClientError, Profile};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

#[tokio::test]
async fn custody_client_negotiates_x25519mlkem768() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let mut client = common::admin_client(&profile).await;
    assert_eq!(client.key_exchange_group(), Some("X25519MLKEM768"));
    let who = client.call("Custody.WhoAmI", json!({})).await.unwrap();
    assert_eq!(who["Principal"], "admin");
    server.shutdown().await;
}

#[tokio::test]
async fn a_classical_x25519_client_still_connects() {
    let (dir, layout) = common::keyfile_dir();
    let (server, _) = common::start(dir.path(), &layout, |_| {}).await;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(layout.ca_cert()).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.local_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let group = tls.get_ref().1.negotiated_key_exchange_group().unwrap().name();
    assert_eq!(group, rustls::NamedGroup::X25519);
    server.shutdown().await;
}

#[tokio::test]
async fn tls12_is_refused() {
    let (dir, layout) = common::keyfile_dir();
    let (server, _) = common::start(dir.path(), &layout, |_| {}).await;
    let addr = server.local_addr();
    // rustls here has no TLS 1.2 at all, so ask OpenSSL (a Debian base package) for a 1.2-only
    // handshake, exactly as an operator would check.
    let out = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-tls1_2", "-connect", &addr.to_string(), "-servername", "localhost"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl must be installed (scripts/test installs it)");
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a TLS 1.2 handshake must fail:\n{text}");
    assert!(text.contains("protocol version") || text.contains("alert number 70"), "{text}");
    server.shutdown().await;
}

#[tokio::test]
async fn plaintext_http_gets_no_http_answer() {
    let (dir, layout) = common::keyfile_dir();
    let (server, _) = common::start(dir.path(), &layout, |_| {}).await;
    let addr = server.local_addr();
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    })
    .await
    .unwrap();
    assert!(!reply.starts_with(b"HTTP/"), "plaintext HTTP must not be served");
    assert!(!String::from_utf8_lossy(&reply).contains("sealed"), "no health data over plaintext");
    // Whatever came back is a TLS alert record (content type 21) or nothing.
    assert!(reply.is_empty() || reply[0] == 21, "{reply:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    // Another CA issues a certificate with the administrator's exact identity.
    let mut real = common::admin_client(&profile).await;
    let who = real.call("Custody.WhoAmI", json!({})).await.unwrap();
    let uri = format!("spiffe://custody/{}/admin", who["Account"].as_str().unwrap());
    let now = time::OffsetDateTime::now_utc();
    let evil_ca = custody_crypto::pki::new_ca("evil", now, time::Duration::days(1)).unwrap();
    let forged = custody_crypto::pki::issue_client(&evil_ca, &uri, "admin", now, time::Duration::days(1)).unwrap();
    let cert = dir.path().join("forged.crt");
    let key = dir.path().join("forged.key");
    std::fs::write(&cert, &forged.cert_pem).unwrap();
    std::fs::write(&key, forged.key_pem.expose_secret()).unwrap();
    let forged_profile = Profile { cert_file: Some(cert), key_file: Some(key), ..profile.clone() };
    // TLS 1.3 clients learn of the rejection on their first read.
    let result = match custody_client::Client::connect(&forged_profile).await {
        Ok(mut c) => c.call("TrentService.ListKeys", json!({})).await,
        Err(e) => Err(e),
    };
    match result {
        Err(ClientError::Connect { reason, .. }) => assert!(reason.contains("UnknownCA"), "{reason}"),
        other => panic!("a foreign certificate must fail the handshake, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn requests_without_a_certificate_are_unauthenticated_but_health_and_status_answer() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
    let anonymous = Profile { cert_file: None, key_file: None, ..profile };
    let mut c = custody_client::Client::connect(&anonymous).await.unwrap();
    let status = c.call("Custody.GetStatus", json!({})).await.unwrap();
    assert_eq!(status["Sealed"], false);
    match c.call("TrentService.ListKeys", json!({})).await {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (400, "MissingAuthenticationTokenException"))
        }
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_sealed_server_answers_only_health_status_and_unseal() {
    let dir = tempfile::tempdir().unwrap();
    let (layout, init) = custody_cli::bootstrap::init(custody_cli::bootstrap::Bootstrap {
        database: None,
        data_dir: dir.path().join("data"),
        admin_roles: custody_kms::Role::ALL.to_vec(),
        seal: custody_cli::bootstrap::SealChoice::Shamir { threshold: 2, shares: 3 },
        tenant: None,
        admin: custody_kms::PrincipalName::parse("admin").unwrap(),
        server_names: vec!["localhost".into()],
        endpoint: "https://localhost:1".into(),
    })
    .unwrap();
    let config = custody_server::ServerConfig {
        data_dir: layout.data_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..custody_server::ServerConfig::default()
    };
    let server = custody_server::Server::start(config).await.unwrap();
    let endpoint = format!("https://localhost:{}", server.local_addr().port());
    let profile = Profile::load(&custody_cli::bootstrap::write_profile(&layout, "admin", &endpoint).unwrap()).unwrap();
    let mut admin = common::admin_client(&profile).await;
    let mut anonymous =
        custody_client::Client::connect(&Profile { cert_file: None, key_file: None, ..profile.clone() }).await.unwrap();

    let health = anonymous.health().await.unwrap();
    assert_eq!((health["status"].as_str(), health["sealed"].as_bool()), (Some("ok"), Some(true)));
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    match admin.call("TrentService.ListKeys", json!({})).await {
        Err(ClientError::Api { status, code, message }) => {
            assert_eq!((status, code.as_str()), (503, "ServiceUnavailableException"));
            assert!(message.contains("sealed"), "{message}");
        }
        other => panic!("a sealed server must refuse key operations: {other:?}"),
    }
    let wrong = anonymous.call("Custody.Unseal", json!({ "Share": "custody-share-AQIBAAAA" })).await;
    assert!(matches!(wrong, Err(ClientError::Api { ref code, .. }) if code == "InvalidShareException"), "{wrong:?}");
    let s1 = anonymous.call("Custody.Unseal", json!({ "Share": init.shares[2].to_text().as_str() })).await.unwrap();
    assert_eq!((s1["Sealed"].as_bool(), s1["Progress"].as_u64()), (Some(true), Some(1)));
    let s2 = anonymous.call("Custody.Unseal", json!({ "Share": init.shares[0].to_text().as_str() })).await.unwrap();
    assert_eq!(s2["Sealed"], false);
    assert_eq!(anonymous.health().await.unwrap()["sealed"], false);
    admin.call("TrentService.ListKeys", json!({})).await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn the_seal_setting_follows_the_store_and_contradictions_are_refused() {
    // A key-file store starts unsealed with no setting at all (the path was recorded at init)...
    let (dir, layout) = common::keyfile_dir();
    let as_initialized = custody_server::ServerConfig { seal: None, ..common::config(dir.path(), &layout) };
    let server = custody_server::Server::start(as_initialized).await.unwrap();
    assert!(!server.kms().status().unwrap().sealed);
    server.shutdown().await;
    // ...and refuses to pretend it is Shamir-sealed.
    let contradict =
        custody_server::ServerConfig { seal: Some("shamir".into()), ..common::config(dir.path(), &layout) };
    let err = custody_server::Server::start(contradict).await.unwrap_err().to_string();
    assert!(err.contains("sealed with a key file"), "{err}");
    // A Shamir store refuses a key file.
    let dir2 = tempfile::tempdir().unwrap();
    let (layout2, _) = custody_cli::bootstrap::init(custody_cli::bootstrap::Bootstrap {
        database: None,
        data_dir: dir2.path().join("d"),
        admin_roles: custody_kms::Role::ALL.to_vec(),
        seal: custody_cli::bootstrap::SealChoice::Shamir { threshold: 2, shares: 2 },
        tenant: None,
        admin: custody_kms::PrincipalName::parse("admin").unwrap(),
        server_names: vec!["localhost".into()],
        endpoint: "https://localhost:1".into(),
    })
    .unwrap();
    let wrong = custody_server::ServerConfig {
        data_dir: layout2.data_dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        seal: Some(format!("keyfile:{}", dir.path().join("root.key").display())),
        ..custody_server::ServerConfig::default()
    };
    let err = custody_server::Server::start(wrong).await.unwrap_err().to_string();
    assert!(err.contains("Shamir shares, not a key file"), "{err}");
}

/// A TLS 1.3 connection without a client certificate, as anyone on the network can open.
async fn anonymous_tls(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    common::anonymous_connector(ca).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
}

/// A counter of the server's metrics listener, now.
async fn counter(server: &custody_server::Server, name: &str) -> f64 {
    let url = format!("http://{}/metrics", server.metrics_addr().expect("metrics_listen is set")).parse().unwrap();
    let scrape = custody_client::metrics::Scrape::fetch(&url, std::time::Duration::from_secs(5)).await.unwrap();
    scrape.value(name, &[]).unwrap_or_else(|| panic!("no {name} in the scrape"))
}

/// Reads until the server closes the connection (within 10 s); what it sent, and when it closed.
async fn until_closed(mut r: impl tokio::io::AsyncRead + Unpin) -> (String, std::time::Instant) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), std::time::Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after 10 s; the server sent {:?}", String::from_utf8_lossy(&got)),
        }
    }
}

/// Sends `bytes` one at a time, `gap` apart, until the server closes the connection.
async fn trickle(mut w: impl tokio::io::AsyncWrite + Unpin, bytes: &[u8], gap: std::time::Duration) {
    use tokio::io::AsyncWriteExt;
    for b in bytes {
        if w.write_all(&[*b]).await.is_err() || w.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(gap).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_do_not_deliver_a_whole_request_in_time_are_closed() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let (dir, layout) = common::keyfile_dir();
    let (server, _) = common::start(dir.path(), &layout, |c| {
        c.request_read_timeout_ms = TIMEOUT.as_millis() as u64;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (addr, ca) = (server.local_addr(), layout.ca_cert());
    let timeouts = || counter(&server, "custody_request_read_timeouts_total");
    assert_eq!(timeouts().await, 0.0);
    let gap = Duration::from_millis(100);
    let body_follows = "POST / HTTP/1.1\r\nHost: localhost\r\nX-Amz-Target: TrentService.ListKeys\r\n\
                        Content-Type: application/x-amz-json-1.1\r\nContent-Length: 100\r\n\r\n";
    let cases: [(&str, Vec<u8>); 3] = [
        ("an idle connection", Vec::new()),
        ("headers a byte at a time", body_follows.as_bytes().to_vec()),
        ("a body a byte at a time", [body_follows.as_bytes(), &[b' '; 99]].concat()),
    ];
    for (case, bytes) in cases {
        let (r, w) = tokio::io::split(anonymous_tls(addr, &ca).await);
        let opened = Instant::now();
        // The head arrives whole at once in the body case, then the body a byte at a time.
        let (head, rest) = bytes.split_at(if case.contains("body") { body_follows.len() } else { 0 });
        let mut w = w;
        w.write_all(head).await.unwrap();
        w.flush().await.unwrap();
        let (sent, closed) = tokio::select! {
            closed = until_closed(r) => closed,
            () = trickle(w, rest, gap) => unreachable!("trickle waits 30 s after its last byte"),
        };
        assert_eq!(sent, "", "{case}: closed without an answer");
        let after = closed - opened;
        assert!(after >= TIMEOUT - Duration::from_millis(20) && after < TIMEOUT * 4, "{case}: closed after {after:?}");
    }
    assert_eq!(timeouts().await, 3.0);

    // A connection that keeps asking is kept however long it lives: each answer restarts its clock.
    let mut tls = anonymous_tls(addr, &ca).await;
    let opened = Instant::now();
    while opened.elapsed() < TIMEOUT * 3 {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"}") {
            let n = tls.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?} although it kept asking", opened.elapsed());
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        tokio::time::sleep(TIMEOUT * 2 / 5).await;
    }
    assert_eq!(timeouts().await, 3.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_max_connections_are_refused_until_one_closes() {
    use std::time::Duration;
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.max_connections = 2;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (addr, ca) = (server.local_addr(), layout.ca_cert());
    let refused = || counter(&server, "custody_connections_refused_total");
    let first = anonymous_tls(addr, &ca).await;
    let mut second = custody_client::Client::connect(&profile).await.unwrap();
    second.call("Custody.WhoAmI", json!({})).await.unwrap();
    // A third: accepted by the kernel, closed by custody before its handshake completes.
    let connector = common::anonymous_connector(&ca);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let third = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("refused at once, not left hanging");
    assert!(third.is_err(), "a third connection must be refused while two are open");
    assert_eq!(refused().await, 1.0);
    // The open ones keep working; when one closes, its place is free again.
    second.call("Custody.WhoAmI", json!({})).await.unwrap();
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        if connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed connection's place never came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}

/// One address may hold at most `max_connections_per_ip` connections; another address is not
/// affected, and a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_per_ip_are_refused_for_that_address_only() {
    use std::time::Duration;
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.max_connections_per_ip = 2;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let (addr, ca) = (server.local_addr(), layout.ca_cert());
    let connector = common::anonymous_connector(&ca);
    // A TLS connection from `source` (any 127/8 address reaches the loopback listener).
    let from = |source: &'static str| {
        let connector = connector.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            let tcp = socket.connect(addr).await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(10),
                connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
            )
            .await
            .expect("answered or refused at once, not left hanging")
        }
    };
    let refused = || counter(&server, "custody_connections_refused_per_ip_total");
    let first = from("127.0.0.1").await.expect("first connection");
    let mut second = custody_client::Client::connect(&profile).await.unwrap();
    second.call("Custody.WhoAmI", json!({})).await.unwrap();
    assert!(from("127.0.0.1").await.is_err(), "a third connection from 127.0.0.1 must be refused");
    assert_eq!(refused().await, 1.0);
    assert_eq!(counter(&server, "custody_connections_refused_total").await, 0.0, "not the global limit");
    // Another address is served, and the open ones keep working.
    let other = from("127.0.0.2").await.expect("another address is not limited by 127.0.0.1's connections");
    drop(other);
    second.call("Custody.WhoAmI", json!({})).await.unwrap();
    // When one of 127.0.0.1's connections closes, its place is free again.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while from("127.0.0.1").await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the closed connection's place never came free");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await;
}
