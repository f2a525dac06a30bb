//! Encrypt over the wire, with and without the audit trail, in one run.
//!
//! `cargo bench -p custody-cli --bench wire -- SECONDS CONNECTIONS [ROUNDS [GROUP_WAIT_US]]`
//!
//! Two real custody servers are started in-process on free ports from two data directories: one
//! as shipped (every request durably audited before it is answered) and one with
//! `danger_disable_audit` (the same server writing no records). C kept-alive TLS 1.3 mTLS
//! connections run Encrypt of 64 bytes against each in turn, ROUNDS times, SECONDS per round, and
//! the best round of each is compared, so both sides see the same machine at the same time.
//! Each line also gives the process's CPU time per request (clients and server: they share the
//! machine) and how busy it kept the cores, which tell a CPU cost from a wait. GROUP_WAIT_US sets
//! the audited server's `audit_group_wait_us` (default 0, as shipped).
//! (The bare-TLS baseline and the full load generator are the performance issue's.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;

struct Round {
    rps: f64,
    requests: usize,
    p50: Duration,
    p99: Duration,
    /// CPU time of the whole process (clients and server) per request.
    cpu_per_request: Duration,
    /// Share of the machine's cores the process kept busy.
    utilization: f64,
}

/// CPU time this process has used (user + system), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = rest.split(' ').skip(11).take(2).map(|f| f.parse().unwrap()).collect();
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

async fn round(profile: &Arc<custody_client::Profile>, key: &str, seconds: u64, connections: usize) -> Round {
    let body = json!({ "KeyId": key, "Plaintext": base64::engine::general_purpose::STANDARD.encode([7u8; 64]) });
    let mut clients = Vec::new();
    for _ in 0..connections {
        clients.push(custody_client::Client::connect(profile).await.unwrap());
    }
    let cpu_before = cpu_time();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut c in clients {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
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
    let cpu = cpu_time() - cpu_before;
    let cpu_per_request = cpu / all.len().max(1) as u32;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let utilization = cpu.as_secs_f64() / (seconds as f64 * cores);
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Round {
        rps: all.len() as f64 / seconds as f64,
        requests: all.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_per_request,
        utilization,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(16);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let group_wait_us: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let mut sides = Vec::new();
        // WIRE_SIDE=on|off runs one side only (for a profiler: valgrind --tool=callgrind).
        let side = std::env::var("WIRE_SIDE").ok();
        let sides_wanted: Vec<bool> = match side.as_deref() {
            Some("on") => vec![false],
            Some("off") => vec![true],
            _ => vec![false, true],
        };
        for disable_audit in sides_wanted {
            let (dir, layout) = common::keyfile_dir();
            let (server, profile) = common::start(dir.path(), &layout, |c| {
                c.danger_disable_audit = disable_audit;
                c.audit_group_wait_us = group_wait_us;
            })
            .await;
            let mut admin = custody_client::Client::connect(&profile).await.unwrap();
            let key = admin.call("TrentService.CreateKey", json!({})).await.unwrap()["KeyMetadata"]["KeyId"]
                .as_str()
                .unwrap()
                .to_string();
            sides.push((dir, server, Arc::new(profile), key, Vec::new()));
        }
        for _ in 0..rounds {
            for (_, _, profile, key, results) in sides.iter_mut() {
                results.push(round(profile, key, seconds, connections).await);
            }
        }
        println!(
            "connections: {connections}, {rounds} rounds of {seconds} s each, best round shown; audit_group_wait_us = {group_wait_us}"
        );
        let mut best = Vec::new();
        let names = match side.as_deref() {
            Some("off") => ["danger_disable_audit", ""],
            _ => ["audit on", "danger_disable_audit"],
        };
        for ((_, _, _, _, results), name) in sides.iter().zip(names) {
            let b = results.iter().max_by(|a, b| a.rps.total_cmp(&b.rps)).unwrap();
            let all: Vec<String> = results.iter().map(|r| format!("{:.0}", r.rps)).collect();
            println!(
                "encrypt 64 B, {name:<21} {:>8.0} req/s ({} requests)  p50 {:>9.3?}  p99 {:>9.3?}  CPU/request {:>7.1?}  busy {:>3.0} %  (rounds: {})",
                b.rps,
                b.requests,
                b.p50,
                b.p99,
                b.cpu_per_request,
                100.0 * b.utilization,
                all.join(", ")
            );
            best.push(b.rps);
        }
        if best.len() == 2 {
            // Rounds alternate between the two servers, so each round with audit has a round
            // without it next to it in time: the median of those pairs' ratios is robust to the
            // machine speeding up or slowing down during the run (shared machines do).
            let mut pairs: Vec<f64> =
                sides[0].4.iter().zip(&sides[1].4).map(|(on, off)| 1.0 - on.rps / off.rps).collect();
            pairs.sort_by(f64::total_cmp);
            let median = pairs[pairs.len() / 2];
            println!(
                "audit cost: {:.1} % of Encrypt throughput (median of {} paired rounds; best against best: {:.1} %)",
                100.0 * median,
                pairs.len(),
                100.0 * (1.0 - best[0] / best[1])
            );
        }
        for (_, server, ..) in sides {
            server.shutdown().await;
        }
    });
}
