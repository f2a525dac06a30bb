//! `GET /metrics` on the loopback metrics listener of a real server: what a Prometheus scrape
//! reads after real requests, and that no client can add series of its own.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

/// One scrape, as Prometheus does it: plain HTTP GET, whole body.
async fn scrape(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
    .unwrap()
}

/// The value of the series `name{labels}` exactly as written (`None`: no such series).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scrape_shows_requests_latency_audit_keys_certificates_and_caches() {
    let (dir, layout) = common::keyfile_dir();
    let (server, profile) = common::start(dir.path(), &layout, |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.scheduler_interval_ms = 100;
    })
    .await;
    let addr = server.metrics_addr().expect("metrics_listen was set");
    let mut client = common::admin_client(&profile).await;
    let key = common::create_key(&mut client, "KeyId").await;
    let plaintext = base64::engine::general_purpose::STANDARD.encode(b"metrics");
    for _ in 0..3 {
        client.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": plaintext })).await.unwrap();
    }
    // A failure, an unknown action from an authenticated caller, and an anonymous caller with an
    // action of its own invention: counted, but never under a label the client chose.
    let bad = json!({ "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode([1u8; 80]) });
    assert!(client.call("TrentService.Decrypt", bad).await.is_err());
    assert!(client.call("TrentService.InventedAction", json!({})).await.is_err());
    let anonymous = custody_client::Profile { cert_file: None, key_file: None, ..profile.clone() };
    let mut stranger = custody_client::Client::connect(&anonymous).await.unwrap();
    assert!(stranger.call("Evil.CardinalityBomb", json!({})).await.is_err());
    assert!(stranger.call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": plaintext })).await.is_err());

    // The key counts arrive with the first scheduler pass after the key was created.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = scrape(addr, "/metrics").await;
        assert_eq!(status, 200);
        if value(&text, "custody_keys{state=\"Enabled\"}").unwrap_or(0.0) >= 1.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let v = |series: &str| value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    assert_eq!(v("custody_requests_total{action=\"TrentService.Encrypt\",outcome=\"success\"}"), 3.0);
    assert_eq!(v("custody_request_duration_seconds_count{action=\"TrentService.Encrypt\"}"), 3.0);
    assert!(v("custody_request_duration_seconds_sum{action=\"TrentService.Encrypt\"}") > 0.0);
    assert_eq!(v("custody_requests_total{action=\"TrentService.Decrypt\",outcome=\"failed\"}"), 1.0);
    assert_eq!(v("custody_requests_total{action=\"other\",outcome=\"failed\"}"), 2.0, "unknown actions");
    assert_eq!(v("custody_requests_total{action=\"other\",outcome=\"unauthenticated\"}"), 1.0);
    assert!(!text.contains("InventedAction") && !text.contains("Cardinality"), "{text}");
    // Every request above waited for its audit record.
    assert!(v("custody_audit_commit_duration_seconds_count") >= 1.0);
    assert!(v("custody_audit_commit_records_sum") >= 7.0);
    assert_eq!(v("custody_audit_queue_depth"), 0.0);
    assert_eq!(v("custody_audit_failing"), 0.0);
    assert!(v("custody_audit_alerts_total") >= 1.0, "the unauthenticated request is an alert");
    assert_eq!(v("custody_sealed"), 0.0);
    assert_eq!(v("custody_root_generation"), 1.0);
    assert_eq!(v("custody_keys{state=\"Enabled\"}"), 1.0);
    assert_eq!(v("custody_keys{state=\"PendingDeletion\"}"), 0.0);
    assert!(v("custody_scheduler_runs_total{task=\"scheduler\",result=\"ok\"}") >= 1.0);
    let server_left = v("custody_tls_cert_expiry_seconds{cert=\"server\"}");
    assert!(server_left > 29.0 * 86400.0 && server_left <= 30.0 * 86400.0, "{server_left}");
    assert!(v("custody_tls_cert_expiry_seconds{cert=\"ca\"}") > server_left);
    assert!(v("custody_cache_lookups_total{cache=\"store\",result=\"hit\"}") > 0.0);
    assert!(v("custody_cache_lookups_total{cache=\"policy\",result=\"hit\"}") > 0.0);
    assert!(v("custody_connections_open") >= 2.0, "the two clients' connections");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");

    let (status, _) = scrape(addr, "/").await;
    assert_eq!(status, 404);
    drop((client, stranger));
    server.shutdown().await;
}

#[tokio::test]
async fn metrics_are_served_on_loopback_only() {
    let (dir, layout) = common::keyfile_dir();
    let mut config = common::config(dir.path(), &layout);
    config.metrics_listen = Some("0.0.0.0:0".parse().unwrap());
    let err = custody_server::Server::start(config).await.unwrap_err().to_string();
    assert!(err.contains("metrics_listen must be a loopback address"), "{err}");

    let file = dir.path().join("custody.toml");
    std::fs::write(&file, "metrics_listen = \"192.0.2.1:9464\"\n").unwrap();
    let err = custody_server::ServerConfig::load(Some(&file)).unwrap_err().to_string();
    assert!(err.contains("metrics_listen must be a loopback address"), "{err}");
    std::fs::write(&file, "metrics_listen = \"[::1]:9464\"\n").unwrap();
    assert!(custody_server::ServerConfig::load(Some(&file)).is_ok());
}
