//! Encrypt over the wire: C kept-alive TLS 1.3 connections (mTLS) against a real custody server
//! started in-process on a free port, audit on, for T seconds.
//!
//! `cargo bench -p custody-cli --bench wire -- SECONDS CONNECTIONS`
//!
//! Prints requests per second and latency percentiles. (The bare-TLS baseline and the full load
//! generator are the performance issue's; this is the absolute figure to start from.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let (dir, layout) = common::keyfile_dir();
        let (server, profile) = common::start(dir.path(), &layout, |_| {}).await;
        let mut admin = custody_client::Client::connect(&profile).await.unwrap();
        let key = admin.call("TrentService.CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
            .as_str()
            .unwrap()
            .to_string();
        let body = json!({ "KeyId": key, "Plaintext": base64::engine::general_purpose::STANDARD.encode([7u8; 64]) });
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let profile = Arc::new(profile);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (profile, body) = (profile.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = custody_client::Client::connect(&profile).await.unwrap();
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    c.call("TrentService.Encrypt", body.clone()).await.unwrap();
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        println!("connections: {connections}, seconds: {seconds}");
        println!("encrypt (64 B, audit on): {:>8.0} req/s", all.len() as f64 / seconds as f64);
        println!("latency p50 {:?}  p99 {:?}  p99.9 {:?}", pct(0.50), pct(0.99), pct(0.999));
        server.shutdown().await;
    });
}
