//! `custody-bench suite`: custody as shipped and the bare TLS baseline, each in its own process,
//! driven by the same load generator with the same connections, in one run; every figure is
//! given beside the baseline's, and every target of the performance issue is checked, with the
//! audit's cost (the same custody with `danger_disable_audit`, in a process of its own).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use custody_client::metrics::{quantile, Scrape};
use serde::Serialize;
use serde_json::{json, Value};

use crate::disk::{self, Flushes};
use crate::load::{self, Op, Plan, Prepared, Stop, Summary, Target};

/// What the suite runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `custody` binary.
    pub custody: PathBuf,
    /// Connections, the same for every phase and the baseline.
    pub connections: usize,
    /// Seconds per phase.
    pub seconds: u64,
    /// Rounds of phases (baseline, then each action, then again).
    pub rounds: usize,
    /// Cold `custody encrypt` runs.
    pub cold_runs: usize,
    /// Mixed requests of the soak (0: none).
    pub soak: u64,
    /// Report progress on stderr.
    pub progress: bool,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first JSON value a child prints on stdout (how `custody dev --json` and
/// `custody-bench baseline` say where they listen).
fn first_json_line(child: &mut Child, what: &str) -> Result<Value, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut reader = std::io::BufReader::new(stdout);
    // The JSON may span lines (pretty-printed): read until what was read parses.
    let mut text = String::new();
    let value = loop {
        let before = text.len();
        reader.read_line(&mut text).map_err(|e| format!("{what}: {e}"))?;
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            break v;
        }
        if text.len() == before || text.len() > 64 << 10 {
            return Err(format!("{what} did not start; it printed {text:?} (see its log)"));
        }
    };
    // Keep reading (and dropping) whatever else it prints, so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok(value)
}

/// Resident and peak resident memory of a process, bytes (from /proc/PID/status).
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
    };
    Some((field("VmRSS:")? * 1024, field("VmHWM:")? * 1024))
}

/// The machine, as a reader of the results needs to know it.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores this process may use.
    pub cores: usize,
    /// CPU model.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
}

impl Machine {
    fn this() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string()).unwrap_or_default();
        Self { cores: std::thread::available_parallelism().map_or(1, |n| n.get()), cpu, kernel }
    }
}

/// One target of the issue and how this run did.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What is required.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether it is met.
    pub met: bool,
}

/// One action's figures over all rounds.
#[derive(Debug, Serialize)]
pub struct Phase {
    /// Latency and counts over all rounds.
    #[serde(flatten)]
    pub summary: Summary,
    /// Requests per second of each round.
    pub rounds_ops_per_second: Vec<f64>,
    /// Median over rounds of this action's requests per second divided by the baseline's in the
    /// same round.
    pub ratio_to_baseline: f64,
    /// Median over rounds of this action's requests per second divided by Encrypt's in the same
    /// round (1 for Encrypt and the baseline).
    pub ratio_to_encrypt: f64,
}

/// Everything the suite measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Connections used by every phase.
    pub connections: usize,
    /// Seconds per phase and round.
    pub seconds_per_phase: u64,
    /// Rounds.
    pub rounds: usize,
    /// The bare TLS server.
    pub baseline: Phase,
    /// custody, per action.
    pub actions: Vec<Phase>,
    /// Encrypt against the same custody with `danger_disable_audit` (its own process), each
    /// round right after the audited Encrypt.
    pub unaudited_encrypt: Phase,
    /// Encrypt with every request signed with AWS Signature Version 4 (no client certificate),
    /// the same custody and principal, each round right after the unaudited Encrypt.
    pub sigv4_encrypt: Phase,
    /// What the audit costs: 1 - the median over rounds of audited / unaudited Encrypt rates.
    pub audit_cost: f64,
    /// Encrypt against the same audited custody with its store in memory (`/dev/shm`, where a
    /// flush costs nothing; its own process), each round right after the unaudited Encrypt.
    /// `None` where there is no `/dev/shm`.
    pub in_memory_encrypt: Option<Phase>,
    /// What the audit costs without the disk: 1 - the median over rounds of in-memory audited /
    /// unaudited Encrypt rates. The rest of `audit_cost` is the disk's flushes.
    pub audit_cost_in_memory: Option<f64>,
    /// Encrypt at half its peak rate (open loop).
    pub half_rate: Summary,
    /// The rate of the half-rate run.
    pub half_rate_target_per_second: f64,
    /// The half-rate run's p99 as the server measured it (its request-duration histogram, whose
    /// buckets double from 100 µs: interpolated, so approximate).
    pub half_rate_server_p99_us: Option<u64>,
    /// The same rate against the custody without the audit, right after: how much of the
    /// half-rate tail is the audit's (the rest is TLS, HTTP, the request and the machine).
    pub half_rate_unaudited: Summary,
    /// The same rate against the audited custody with its store in memory, right after: how much
    /// of the half-rate tail is the disk's flushes (the rest is custody's own audit work).
    /// `None` where there is no `/dev/shm`.
    pub half_rate_in_memory: Option<Summary>,
    /// The disk under the stores, before the load: serial 4 KiB writes, each made durable (the
    /// floor under one audit group commit).
    pub disk_flush: Flushes,
    /// Cold `custody encrypt` of 1 KiB, wall milliseconds: median, 90th percentile, slowest.
    pub cold_encrypt_ms: [f64; 3],
    /// The soak, if run.
    pub soak: Option<Soak>,
    /// Server memory when the run ended: resident, peak resident (bytes).
    pub server_rss_bytes: u64,
    /// Peak resident memory of the server over the whole run (bytes).
    pub server_peak_rss_bytes: u64,
    /// Requests custody answered in the whole run.
    pub server_requests: u64,
    /// The targets.
    pub checks: Vec<Check>,
}

/// The long mixed run.
#[derive(Debug, Serialize)]
pub struct Soak {
    /// All actions together.
    pub summary: Summary,
    /// Per action.
    pub actions: Vec<Summary>,
    /// Server resident memory sampled every 2 s: (seconds since the soak began, bytes).
    pub rss_samples: Vec<(u64, u64)>,
}

fn say(settings: &Settings, line: &str) {
    if settings.progress {
        eprintln!("{line}");
    }
}

/// One phase's line of a round: its rate, against the round's baseline, and `note`.
fn say_round(settings: &Settings, round: usize, label: &str, rate: f64, baseline: f64, note: &str) {
    say(
        settings,
        &format!("round {round}/{}: {label:<18} {rate:.0} ops/s ({:.2}x{note})", settings.rounds, rate / baseline),
    );
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

/// Request bodies for every action against `key` (and `other`, ReEncrypt's destination), and the
/// answer of the Encrypt that made the ciphertext they decrypt.
pub async fn prepare(
    client: &mut custody_client::Client,
    key: &str,
    other: &str,
) -> Result<(Vec<Prepared>, Value), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let encrypted = client
        .call("TrentService.Encrypt", json!({ "KeyId": key, "Plaintext": b64.encode([7u8; 64]) }))
        .await
        .map_err(|e| format!("the first Encrypt failed: {e}"))?;
    let blob = encrypted["CiphertextBlob"].as_str().ok_or("Encrypt answered without a CiphertextBlob")?;
    let body = |v: Value| Bytes::from(serde_json::to_vec(&v).expect("JSON values serialize"));
    let bodies = vec![
        Prepared { op: Op::Encrypt, body: body(json!({ "KeyId": key, "Plaintext": b64.encode([7u8; 64]) })) },
        Prepared { op: Op::Decrypt, body: body(json!({ "KeyId": key, "CiphertextBlob": blob })) },
        Prepared { op: Op::GenerateDataKey, body: body(json!({ "KeyId": key, "KeySpec": "AES_256" })) },
        Prepared { op: Op::ReEncrypt, body: body(json!({ "CiphertextBlob": blob, "DestinationKeyId": other })) },
        Prepared { op: Op::DescribeKey, body: body(json!({ "KeyId": key })) },
    ];
    Ok((bodies, encrypted))
}

/// Creates a symmetric key for the benchmark and returns its id.
pub async fn create_key(client: &mut custody_client::Client) -> Result<String, String> {
    let created = client
        .call("TrentService.CreateKey", json!({ "Description": "custody-bench" }))
        .await
        .map_err(|e| format!("cannot create a key for the benchmark: {e}"))?;
    created["KeyMetadata"]["KeyId"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "CreateKey answered without a KeyId".into())
}

/// A `custody dev` the suite started.
struct Started {
    proc: Proc,
    /// Its admin profile (client certificate).
    profile: PathBuf,
    /// Its shell file of variables, with the admin's AWS access key.
    env_file: PathBuf,
    /// Its metrics URL, if it was started with a metrics listener.
    metrics: Option<hyper::Uri>,
}

/// Starts `custody dev` on a free port with its data in `dir/name` (log: `dir/name.log`), with
/// `env` set.
fn start_custody(settings: &Settings, dir: &Path, name: &str, env: &[(&str, &str)]) -> Result<Started, String> {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
    let mut child = Command::new(&settings.custody)
        .args(["dev", "--json", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.join(name))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", settings.custody.display()))?;
    let started = first_json_line(&mut child, "custody dev");
    let custody = Proc(child);
    let started = started?;
    let path = |field: &str| {
        started[field].as_str().map(PathBuf::from).ok_or_else(|| format!("custody dev did not print its {field}"))
    };
    let metrics = started["Metrics"].as_str().map(custody_client::metrics::parse_url).transpose()?;
    Ok(Started { proc: custody, profile: path("Profile")?, env_file: path("EnvFile")?, metrics })
}

/// Runs the suite.
pub async fn run(settings: &Settings) -> Result<Report, String> {
    if !settings.custody.is_file() {
        return Err(format!(
            "no custody binary at {}: build it first (cargo build --release --bins) or pass --custody PATH",
            settings.custody.display()
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The disk the stores are on, while nothing else of the run writes to it.
    say(settings, "the disk under the stores: 4 KiB writes, each made durable");
    let flushes = disk::probe(dir.path(), Duration::from_secs(settings.seconds.clamp(1, 3)))
        .map_err(|e| format!("cannot measure the disk under {}: {e}", dir.path().display()))?;
    // custody as `custody dev` runs it: TLS 1.3 with client certificates, every request
    // authorized against the key's policy and durably audited before it is answered.
    // Its metrics listener shows the latency the server itself measures (the half-rate check).
    let Started { proc: custody, profile: profile_path, env_file, metrics } =
        start_custody(settings, dir.path(), "data", &[("CUSTODY_METRICS_LISTEN", "127.0.0.1:0")])?;
    let pid = custody.0.id();
    let profile = custody_client::Profile::load(&profile_path).map_err(|e| e.to_string())?;
    let mut client = custody_client::Client::connect(&profile).await.map_err(|e| e.to_string())?;
    let key = create_key(&mut client).await?;
    let other = create_key(&mut client).await?;
    // The baseline answers with the bytes of a real Encrypt answer, so both send the same amount.
    let (prepared, answer) = prepare(&mut client, &key, &other).await?;
    // The same custody writing no audit records, for what the audit costs (its own process and
    // store; idle except for its Encrypt phases).
    let Started { proc: _unaudited_proc, profile: unaudited_profile_path, .. } =
        start_custody(settings, dir.path(), "data-unaudited", &[("CUSTODY_DANGER_DISABLE_AUDIT", "true")])?;
    let unaudited_profile = custody_client::Profile::load(&unaudited_profile_path).map_err(|e| e.to_string())?;
    let mut unaudited_client = custody_client::Client::connect(&unaudited_profile).await.map_err(|e| e.to_string())?;
    let u_key = create_key(&mut unaudited_client).await?;
    // Only its Encrypt phases run (ReEncrypt's destination is never used: the key itself).
    let (unaudited_prepared, _) = prepare(&mut unaudited_client, &u_key, &u_key).await?;
    // The same audited custody with its store in memory, where a flush costs nothing: how much
    // of the audit's cost is custody's own work rather than the disk's (where /dev/shm exists).
    let memory_dir = tempfile::Builder::new().prefix("custody-bench-").tempdir_in("/dev/shm").ok();
    let mut in_memory = None;
    if let Some(d) = &memory_dir {
        let Started { proc, profile: path, .. } = start_custody(settings, d.path(), "data-in-memory", &[])?;
        let profile = custody_client::Profile::load(&path).map_err(|e| e.to_string())?;
        let mut client = custody_client::Client::connect(&profile).await.map_err(|e| e.to_string())?;
        let key = create_key(&mut client).await?;
        let (prepared, _) = prepare(&mut client, &key, &key).await?;
        in_memory = Some((proc, Target::from_profile(&profile).map_err(|e| e.to_string())?, prepared));
    }
    let body_file = dir.path().join("baseline-body.json");
    std::fs::write(&body_file, serde_json::to_vec(&answer).expect("JSON serializes")).map_err(|e| e.to_string())?;
    let ca = profile.ca_file().map_err(|e| e.to_string())?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(me)
        .arg("baseline")
        .arg("--client-ca")
        .arg(&ca)
        .arg("--body-file")
        .arg(&body_file)
        .arg("--cert-out")
        .arg(dir.path().join("baseline.crt"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the baseline: {e}"))?;
    let listening = first_json_line(&mut child, "the baseline server");
    let _baseline_proc = Proc(child);
    let listening = listening?;
    let baseline_profile = custody_client::Profile {
        endpoint: listening["Endpoint"].as_str().map(str::to_string),
        ca_file: Some(dir.path().join("baseline.crt")),
        ..profile.clone()
    };
    let baseline = Target::from_profile(&baseline_profile).map_err(|e| e.to_string())?;
    let target = Target::from_profile(&profile).map_err(|e| e.to_string())?;
    // The same custody, the same principal, each request signed with its AWS access key (what
    // the AWS SDKs send) instead of a client certificate.
    let signed =
        Target::signed(&profile, load::SigV4Credentials::from_env_file(&env_file)?).map_err(|e| e.to_string())?;
    let unaudited = Target::from_profile(&unaudited_profile).map_err(|e| e.to_string())?;

    // `op` as fast as answers come, with the requests prepared for one server.
    let closed = |prepared: &[Prepared], op: Op, stop: Stop| Plan {
        connections: settings.connections,
        stop,
        rate: None,
        mix: prepared.iter().filter(|p| p.op == op).cloned().collect(),
    };
    // Two CreateKey and prepare's Encrypt.
    let mut served: u64 = 3;
    say(settings, "warming up (2 s each)");
    load::run(&baseline, &closed(&prepared, Op::Encrypt, Stop::After(Duration::from_secs(2)))).await?;
    served +=
        load::run(&target, &closed(&prepared, Op::Encrypt, Stop::After(Duration::from_secs(2)))).await?.answered();
    load::run(&unaudited, &closed(&unaudited_prepared, Op::Encrypt, Stop::After(Duration::from_secs(2)))).await?;
    if let Some((_, target, prepared)) = &in_memory {
        load::run(target, &closed(prepared, Op::Encrypt, Stop::After(Duration::from_secs(2)))).await?;
    }

    let phase = Duration::from_secs(settings.seconds);
    let mut base_rounds = Vec::new();
    let mut base_total = load::Outcome::default();
    let mut per_op: Vec<Rounds> = Op::ALL
        .iter()
        .map(|op| Rounds { op: *op, rates: Vec::new(), ratios: Vec::new(), total: Default::default() })
        .collect();
    // Encrypt phases run each round right after the audited Encrypt, against another server or
    // with another way to authenticate.
    let (mut unaudited_runs, mut in_memory_runs, mut signed_runs) =
        (Beside::default(), Beside::default(), Beside::default());
    for round in 1..=settings.rounds {
        // The machine's speed drifts within a round: each round starts its actions one later, so
        // no action always runs last, and actions are compared within their round (below).
        per_op.rotate_left(usize::from(round > 1));
        let b = load::run(&baseline, &closed(&prepared, Op::Encrypt, Stop::After(phase))).await?;
        let b_rate = b.ok_per_second();
        say(settings, &format!("round {round}/{}: baseline {b_rate:.0} ops/s", settings.rounds));
        base_rounds.push(b_rate);
        base_total.absorb(b);
        for Rounds { op, rates, ratios, total } in per_op.iter_mut() {
            let o = load::run(&target, &closed(&prepared, *op, Stop::After(phase))).await?;
            let rate = o.ok_per_second();
            served += o.answered() + o.failed();
            say_round(settings, round, op.name(), rate, b_rate, "");
            rates.push(rate);
            ratios.push(rate / b_rate);
            total.absorb(o);
            if *op == Op::Encrypt {
                let u = load::run(&unaudited, &closed(&unaudited_prepared, Op::Encrypt, Stop::After(phase))).await?;
                let u_rate = unaudited_runs.record(u);
                let note = format!("; the audit costs {:.1} %", 100.0 * (1.0 - rate / u_rate));
                say_round(settings, round, "encrypt, no audit", u_rate, b_rate, &note);
                if let Some((_, target, prepared)) = &in_memory {
                    let m = load::run(target, &closed(prepared, Op::Encrypt, Stop::After(phase))).await?;
                    let m_rate = in_memory_runs.record(m);
                    let note = format!("; the audit costs {:.1} % without the disk", 100.0 * (1.0 - m_rate / u_rate));
                    say_round(settings, round, "encrypt, in memory", m_rate, b_rate, &note);
                }
                let s = load::run(&signed, &closed(&prepared, Op::Encrypt, Stop::After(phase))).await?;
                served += s.answered() + s.failed();
                let s_rate = signed_runs.record(s);
                let note = format!("; {:.2}x with a client certificate", s_rate / rate);
                say_round(settings, round, "encrypt, SigV4", s_rate, b_rate, &note);
            }
        }
    }
    per_op.sort_by_key(|r| Op::ALL.iter().position(|op| *op == r.op));
    let encrypt_rates = per_op[0].rates.clone();
    let phase_of = |name: Option<Op>, rates: &[f64], ratios: &[f64], total: &load::Outcome| {
        let mut summary = total.summary(name);
        // The median round's rate, not the mean over all rounds (a slow round is the machine's).
        summary.ops_per_second = median(rates);
        let to_encrypt = per_round(rates, &encrypt_rates);
        Phase {
            summary,
            rounds_ops_per_second: rates.to_vec(),
            ratio_to_baseline: median(ratios),
            ratio_to_encrypt: median(&to_encrypt),
        }
    };
    let baseline_phase = {
        let mut p = phase_of(Some(Op::Encrypt), &base_rounds, &vec![1.0; base_rounds.len()], &base_total);
        p.summary.action = "baseline".into();
        p.ratio_to_encrypt = 1.0;
        p
    };
    let actions: Vec<Phase> = per_op.iter().map(|r| phase_of(Some(r.op), &r.rates, &r.ratios, &r.total)).collect();
    let encrypt_rate = actions[0].summary.ops_per_second;
    // An Encrypt phase beside the actions (another server, or another way to authenticate),
    // each round against that round's baseline.
    let encrypt_phase = |label: &str, runs: &Beside| {
        let mut p = phase_of(Some(Op::Encrypt), &runs.rates, &per_round(&runs.rates, &base_rounds), &runs.total);
        p.summary.action = label.into();
        p
    };
    let unaudited_phase = encrypt_phase("encrypt, no audit", &unaudited_runs);
    let signed_phase = encrypt_phase("encrypt, SigV4", &signed_runs);
    // Each round's audited rate against the unaudited one measured right after it.
    let audit_cost = 1.0 - median(&per_round(&encrypt_rates, &unaudited_runs.rates));
    let in_memory_phase = in_memory.as_ref().map(|_| encrypt_phase("encrypt, in memory", &in_memory_runs));
    let audit_cost_in_memory =
        in_memory.as_ref().map(|_| 1.0 - median(&per_round(&in_memory_runs.rates, &unaudited_runs.rates)));

    let half = encrypt_rate / 2.0;
    say(settings, &format!("encrypt at half its peak: {half:.0} ops/s for {} s", 2 * settings.seconds));
    // Open loop at `half` for twice a phase, the same plan for both servers.
    let at_half = |prepared: &[Prepared]| {
        let mut plan = closed(prepared, Op::Encrypt, Stop::After(2 * phase));
        plan.rate = Some(half);
        plan
    };
    let plan = at_half(&prepared);
    let scrape = || async {
        match &metrics {
            Some(url) => Scrape::fetch(url, Duration::from_secs(5)).await.map(Some),
            None => Ok(None),
        }
    };
    let before = scrape().await?;
    let half_run = load::run(&target, &plan).await?;
    let after = scrape().await?;
    served += half_run.answered() + half_run.failed();
    let half_rate = half_run.summary(Some(Op::Encrypt));
    // The same requests as the server timed them (arrival to answer, the audit record durable).
    // The load generator's figure is higher by what happens outside that span: requests not yet
    // read, or waiting behind a stalled commit, counted from when they were due (BENCHMARKS,
    // session 15: the checkpoint's flushes and the run's first ~200 ms).
    let half_rate_server_p99_us = before.zip(after).and_then(|(b, a)| {
        let of = |s: &Scrape| s.buckets("custody_request_duration_seconds", &[("action", Op::Encrypt.target())]);
        quantile(0.99, &of(&b), &of(&a)).map(|secs| (secs * 1e6).round() as u64)
    });
    say(settings, &format!("encrypt at {half:.0} ops/s for {} s without the audit", 2 * settings.seconds));
    let half_rate_unaudited = load::run(&unaudited, &at_half(&unaudited_prepared)).await?.summary(Some(Op::Encrypt));
    let half_rate_in_memory = match &in_memory {
        Some((_, target, prepared)) => {
            say(
                settings,
                &format!("encrypt at {half:.0} ops/s for {} s with the store in memory", 2 * settings.seconds),
            );
            Some(load::run(target, &at_half(prepared)).await?.summary(Some(Op::Encrypt)))
        }
        None => None,
    };

    say(settings, &format!("cold `custody encrypt` of 1 KiB, {} runs", settings.cold_runs));
    let cold = cold_encrypt(settings, dir.path(), &profile_path, &key)?;
    served += settings.cold_runs as u64;

    let soak = if settings.soak > 0 {
        say(settings, &format!("soak: {} mixed requests over {} connections", settings.soak, settings.connections));
        let s = soak(&target, &prepared, settings, pid).await?;
        served += s.summary.requests + s.summary.errors;
        Some(s)
    } else {
        None
    };
    let (rss, peak) = memory_of(pid).ok_or("cannot read the server's memory from /proc")?;

    let mut checks = vec![
        Check {
            target: "Encrypt 64 B >= 0.5x the baseline's requests per second".into(),
            measured: format!(
                "{:.2}x ({encrypt_rate:.0} ops/s against {:.0})",
                actions[0].ratio_to_baseline, baseline_phase.summary.ops_per_second
            ),
            met: actions[0].ratio_to_baseline >= 0.5,
        },
        Check {
            target: "p99 latency at half of the peak Encrypt rate < 2 ms".into(),
            measured: format!(
                "{} at {half:.0} ops/s{}; without the audit at the same rate: {}{}; one durable write of \
                 this disk: p99 {}, p99.9 {}",
                load::micros(half_rate.p99_us),
                half_rate_server_p99_us.map_or(String::new(), |us| format!(
                    " (the server's own histogram: p99 ~{}, arrival to answer)",
                    load::micros(us)
                )),
                load::micros(half_rate_unaudited.p99_us),
                half_rate_in_memory.as_ref().map_or(String::new(), |m| format!(
                    "; audited with the store in memory: {}",
                    load::micros(m.p99_us)
                )),
                load::micros(flushes.p99_us),
                load::micros(flushes.p999_us)
            ),
            met: half_rate.p99_us < 2000 && half_rate.errors == 0,
        },
    ];
    checks.push(Check {
        target: "the audit costs at most 20% of Encrypt throughput".into(),
        measured: format!(
            "{:.1}% (median of the rounds' pairs; {encrypt_rate:.0} ops/s audited, {:.0} with danger_disable_audit; \
             this disk makes {:.0} serial durable writes/s{})",
            100.0 * audit_cost,
            unaudited_phase.summary.ops_per_second,
            flushes.writes_per_second,
            audit_cost_in_memory.map_or(String::new(), |c| format!(
                "; with the store in memory, where a flush costs nothing: {:.1}%",
                100.0 * c
            ))
        ),
        met: audit_cost <= 0.20,
    });
    for op in [Op::GenerateDataKey, Op::Decrypt] {
        let p = actions.iter().find(|p| p.summary.action == op.name()).expect("every action ran");
        let ratio = p.ratio_to_encrypt;
        checks.push(Check {
            target: format!("{} within 10% of Encrypt", op.name()),
            measured: format!(
                "{ratio:.2}x Encrypt (median of the rounds' ratios; {:.0} ops/s)",
                p.summary.ops_per_second
            ),
            met: (ratio - 1.0).abs() <= 0.10,
        });
    }
    checks.push(Check {
        target: "cold `custody encrypt` of 1 KiB with the KMS keyring < 30 ms".into(),
        measured: format!("median {:.1} ms (p90 {:.1} ms, slowest {:.1} ms)", cold[0], cold[1], cold[2]),
        met: cold[0] < 30.0,
    });
    checks.push(Check {
        target: "server resident memory < 64 MiB after the run".into(),
        measured: format!("{:.1} MiB after {served} requests (peak {:.1} MiB)", mib(rss), mib(peak)),
        met: rss < 64 << 20,
    });
    if let Some(s) = &soak {
        checks.push(Check {
            target: format!("{} mixed requests: zero errors", s.summary.requests + s.summary.errors),
            measured: format!("{} errors", s.summary.errors),
            met: s.summary.errors == 0,
        });
    }
    Ok(Report {
        machine: Machine::this(),
        connections: settings.connections,
        seconds_per_phase: settings.seconds,
        rounds: settings.rounds,
        baseline: baseline_phase,
        actions,
        unaudited_encrypt: unaudited_phase,
        sigv4_encrypt: signed_phase,
        audit_cost,
        in_memory_encrypt: in_memory_phase,
        audit_cost_in_memory,
        half_rate,
        half_rate_target_per_second: half,
        half_rate_server_p99_us,
        half_rate_unaudited,
        half_rate_in_memory,
        disk_flush: flushes,
        cold_encrypt_ms: cold,
        soak,
        server_rss_bytes: rss,
        server_peak_rss_bytes: peak,
        server_requests: served,
        checks,
    })
}

/// An Encrypt phase run each round beside the audited one: each round's rate, everything measured.
#[derive(Default)]
struct Beside {
    rates: Vec<f64>,
    total: load::Outcome,
}

impl Beside {
    /// Keeps a round's run; returns its rate.
    fn record(&mut self, run: load::Outcome) -> f64 {
        let rate = run.ok_per_second();
        self.rates.push(rate);
        self.total.absorb(run);
        rate
    }
}

/// Each round's `a` divided by that round's `b`.
fn per_round(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| a / b).collect()
}

/// One action's rounds: requests per second, ratio to the baseline, everything measured.
struct Rounds {
    op: Op,
    rates: Vec<f64>,
    ratios: Vec<f64>,
    total: load::Outcome,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// Runs `custody encrypt -k KEY` on a 1 KiB file `settings.cold_runs` times, each a new process
/// that reads its profile, connects (TLS 1.3 handshake with its client certificate), asks for
/// one data key and writes the message. Wall milliseconds: median, 90th percentile, slowest.
fn cold_encrypt(settings: &Settings, dir: &Path, profile: &Path, key: &str) -> Result<[f64; 3], String> {
    let input = dir.join("cold.txt");
    std::fs::write(&input, [b'x'; 1024]).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for i in 0..settings.cold_runs.max(1) {
        let out = dir.join(format!("cold-{i}.encrypted"));
        let t = Instant::now();
        let status = Command::new(&settings.custody)
            .args(["encrypt", "-k", key, "-c", "purpose=bench", "-o"])
            .arg(&out)
            .arg(&input)
            .env("CUSTODY_PROFILE", profile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.success() {
            return Err(format!(
                "`custody encrypt` failed ({status}); run it by hand with CUSTODY_PROFILE={}",
                profile.display()
            ));
        }
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Ok([at(0.5), at(0.9), times[times.len() - 1]])
}

async fn soak(target: &Target, prepared: &[Prepared], settings: &Settings, pid: u32) -> Result<Soak, String> {
    let plan = Plan {
        connections: settings.connections,
        stop: Stop::Requests(settings.soak),
        rate: None,
        mix: prepared.to_vec(),
    };
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sampling = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Some((rss, _)) = memory_of(pid) {
                if tx.send((started.elapsed().as_secs(), rss)).is_err() {
                    return;
                }
            }
        }
    });
    let outcome = load::run(target, &plan).await?;
    sampling.abort();
    let mut rss_samples = Vec::new();
    while let Ok(s) = rx.try_recv() {
        rss_samples.push(s);
    }
    let actions =
        Op::ALL.iter().filter(|op| outcome.ops.contains_key(op)).map(|op| outcome.summary(Some(*op))).collect();
    Ok(Soak { summary: outcome.summary(None), actions, rss_samples })
}

/// The report as text.
pub fn print(report: &Report) {
    let m = &report.machine;
    println!("machine: {} cores, {}, Linux {}", m.cores, m.cpu, m.kernel);
    println!(
        "{} connections (TLS 1.3; client certificates, but SigV4 for 'encrypt, SigV4'), {} rounds of {} s per phase; ops/s is the median round",
        report.connections, report.rounds, report.seconds_per_phase
    );
    println!();
    println!("{}", report.baseline.summary.line());
    for p in &report.actions {
        println!("{}  {:.2}x baseline  {:.2}x encrypt", p.summary.line(), p.ratio_to_baseline, p.ratio_to_encrypt);
    }
    let u = &report.unaudited_encrypt;
    println!(
        "{}  {:.2}x baseline  (the audit costs {:.1} %)",
        u.summary.line(),
        u.ratio_to_baseline,
        100.0 * report.audit_cost
    );
    if let (Some(m), Some(cost)) = (&report.in_memory_encrypt, report.audit_cost_in_memory) {
        println!(
            "{}  {:.2}x baseline  (store in /dev/shm: the audit costs {:.1} % without the disk)",
            m.summary.line(),
            m.ratio_to_baseline,
            100.0 * cost
        );
    }
    let s = &report.sigv4_encrypt;
    println!("{}  {:.2}x baseline  {:.2}x encrypt", s.summary.line(), s.ratio_to_baseline, s.ratio_to_encrypt);
    println!();
    println!(
        "encrypt at {:.0} ops/s (half the peak), latency from when each request was due:",
        report.half_rate_target_per_second
    );
    println!("{}", report.half_rate.line());
    if let Some(us) = report.half_rate_server_p99_us {
        println!("the same requests timed by the server (arrival to answer): p99 ~{}", load::micros(us));
    }
    println!("the same rate against the custody without the audit:");
    println!("{}", report.half_rate_unaudited.line());
    if let Some(m) = &report.half_rate_in_memory {
        println!("the same rate against the audited custody with its store in /dev/shm:");
        println!("{}", m.line());
    }
    let d = &report.disk_flush;
    println!(
        "the disk under the stores, before the load: {:.0} durable 4 KiB writes/s one after another, p50 {}, p99 {}, p99.9 {}, max {}",
        d.writes_per_second,
        load::micros(d.p50_us),
        load::micros(d.p99_us),
        load::micros(d.p999_us),
        load::micros(d.max_us)
    );
    if let Some(s) = &report.soak {
        println!();
        println!("soak:");
        println!("{}", s.summary.line());
        for a in &s.actions {
            println!("{}", a.line());
        }
        let samples: Vec<String> = s.rss_samples.iter().map(|(t, rss)| format!("{t}s {:.1}", mib(*rss))).collect();
        println!("server RSS (MiB) during the soak: {}", samples.join(", "));
    }
    println!();
    println!("targets:");
    for c in &report.checks {
        println!("  [{}] {}: {}", if c.met { "met" } else { "GAP" }, c.target, c.measured);
    }
}
