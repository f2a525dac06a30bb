//! `custody-bench`: custody's load generator and the bare TLS 1.3 baseline it is measured
//! against (docs/BENCHMARKS.md, "The request path against a bare TLS server").
#![forbid(unsafe_code)]

mod baseline;
mod disk;
mod load;
mod suite;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Load generator for custody, and the bare TLS server it is compared with in the same run.
#[derive(Debug, Parser)]
#[command(
    name = "custody-bench",
    version,
    after_help = "\
Examples:
  cargo build --release --bins
  target/release/custody-bench suite                      every target of docs/BENCHMARKS.md, ~2 min
  target/release/custody-bench suite --soak 1000000       and a million mixed requests, memory sampled
  target/release/custody-bench run --profile .custody-dev/admin/profile.toml \\
      --mix encrypt=2,decrypt=1 --connections 16 --seconds 10
  target/release/custody-bench run --rate 5000 --seconds 30 --json
  source .custody-dev/env && target/release/custody-bench run --sigv4 --seconds 10"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start custody (`custody dev`), the same custody without audit, the same custody with its
    /// store in /dev/shm (the audit's cost without the disk), and the baseline, each in its own
    /// process, run every phase against them with the same connections, and check the targets.
    Suite {
        /// The custody binary (default: `custody` beside this program).
        #[arg(long, value_name = "PATH")]
        custody: Option<PathBuf>,
        /// Kept-alive connections.
        #[arg(long, short = 'c', default_value_t = 16)]
        connections: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds: baseline then each action, again and again (the median round is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Cold `custody encrypt` runs.
        #[arg(long, default_value_t = 30)]
        cold_runs: usize,
        /// Then this many mixed requests (all five actions), sampling the server's memory.
        #[arg(long, default_value_t = 0, value_name = "REQUESTS")]
        soak: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drive a running custody with a mix of requests.
    Run {
        /// Profile of the principal to send as (endpoint, CA, client certificate).
        #[arg(long, env = "CUSTODY_PROFILE", value_name = "FILE")]
        profile: PathBuf,
        /// Key to use (default: a new key, which needs the key-admin role).
        #[arg(long, short = 'k')]
        key: Option<String>,
        /// ReEncrypt's destination key (default: the same key).
        #[arg(long, value_name = "KEY")]
        destination_key: Option<String>,
        /// Actions and weights: encrypt, decrypt, generate-data-key, re-encrypt, describe-key.
        #[arg(long, default_value = "encrypt")]
        mix: String,
        /// Kept-alive connections.
        #[arg(long, short = 'c', default_value_t = 16)]
        connections: usize,
        /// Run this many seconds...
        #[arg(long, default_value_t = 10, conflicts_with = "requests")]
        seconds: u64,
        /// ...or this many requests.
        #[arg(long)]
        requests: Option<u64>,
        /// Total requests per second (open loop; latency counted from when each was due).
        #[arg(long, value_name = "PER_SECOND")]
        rate: Option<f64>,
        /// Sign every request with AWS Signature Version 4 (the access key in AWS_ACCESS_KEY_ID
        /// and AWS_SECRET_ACCESS_KEY, the region in AWS_REGION or AWS_DEFAULT_REGION) over TLS
        /// without the client certificate, as the AWS SDKs do. The profile still gives the
        /// endpoint and CA, and creates the key and the ciphertexts before the run.
        #[arg(long)]
        sigv4: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the baseline: every POST answered 200 with a fixed JSON body, over TLS 1.3 with a
    /// client certificate from CLIENT_CA. Prints `{"Endpoint": ...}` and serves until killed.
    Baseline {
        /// CA whose client certificates are accepted.
        #[arg(long, value_name = "FILE")]
        client_ca: PathBuf,
        /// The answer's body.
        #[arg(long, value_name = "FILE")]
        body_file: Option<PathBuf>,
        /// Where to write the server's self-signed certificate (PEM).
        #[arg(long, value_name = "FILE")]
        cert_out: PathBuf,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> Result<ExitCode, String> {
    match cmd {
        Cmd::Suite { custody, connections, seconds, rounds, cold_runs, soak, json } => {
            let custody = match custody {
                Some(p) => p,
                None => std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("custody"),
            };
            if connections == 0 || seconds == 0 || rounds == 0 {
                return Err("--connections, --seconds and --rounds must be at least 1".into());
            }
            let settings = suite::Settings { custody, connections, seconds, rounds, cold_runs, soak, progress: true };
            let report = suite::run(&settings).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("reports serialize"));
            } else {
                suite::print(&report);
            }
            // Exit 2 when a target is not met, so a script can tell.
            Ok(if report.checks.iter().all(|c| c.met) { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Run { profile, key, destination_key, mix, connections, seconds, requests, rate, sigv4, json } => {
            let order = load::parse_mix(&mix)?;
            if connections == 0 {
                return Err("--connections must be at least 1".into());
            }
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                return Err("--rate must be a positive number of requests per second".into());
            }
            let profile = custody_client::Profile::load(&profile).map_err(|e| e.to_string())?;
            let mut client = custody_client::Client::connect(&profile).await.map_err(|e| e.to_string())?;
            let key = match key {
                Some(k) => k,
                None => suite::create_key(&mut client).await?,
            };
            let destination = destination_key.unwrap_or_else(|| key.clone());
            let (prepared, _) = suite::prepare(&mut client, &key, &destination).await?;
            let mix = order
                .iter()
                .map(|op| prepared.iter().find(|p| p.op == *op).expect("every action prepared").clone())
                .collect();
            let stop = match requests {
                Some(n) => load::Stop::Requests(n),
                None => load::Stop::After(Duration::from_secs(seconds)),
            };
            let target = if sigv4 {
                let credentials = load::SigV4Credentials::from_vars(|name| std::env::var(name).ok())?;
                load::Target::signed(&profile, credentials)
            } else {
                load::Target::from_profile(&profile)
            }
            .map_err(|e| e.to_string())?;
            let outcome = load::run(&target, &load::Plan { connections, stop, rate, mix }).await?;
            let mut lines: Vec<load::Summary> = load::Op::ALL
                .iter()
                .filter(|op| outcome.ops.contains_key(op))
                .map(|op| outcome.summary(Some(*op)))
                .collect();
            let all = outcome.summary(None);
            if json {
                let v = serde_json::json!({
                    "connections": connections, "rate": rate, "sigv4": sigv4, "seconds": outcome.elapsed.as_secs_f64(),
                    "all": all, "actions": lines,
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("JSON serializes"));
            } else {
                println!(
                    "{connections} connections ({}), {:.1} s{}",
                    if sigv4 { "SigV4" } else { "client certificate" },
                    outcome.elapsed.as_secs_f64(),
                    rate.map(|r| format!(", at {r:.0} requests/s (latency from when each was due)"))
                        .unwrap_or_default()
                );
                if lines.len() > 1 {
                    lines.push(all.clone());
                }
                for l in &lines {
                    println!("{}", l.line());
                }
            }
            Ok(if all.errors == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Baseline { client_ca, body_file, cert_out, listen } => {
            let body = match body_file {
                Some(f) => std::fs::read(&f).map_err(|e| format!("{}: {e}", f.display()))?,
                None => {
                    br#"{"KeyId":"baseline","CiphertextBlob":"","EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}"#.to_vec()
                }
            };
            let (config, cert) = baseline::server_config(&client_ca)?;
            std::fs::write(&cert_out, cert).map_err(|e| format!("{}: {e}", cert_out.display()))?;
            let listener =
                tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            println!("{}", serde_json::json!({ "Endpoint": format!("https://{addr}") }));
            baseline::serve(listener, config, body.into()).await;
            Ok(ExitCode::SUCCESS)
        }
    }
}
