//! The load generator: C kept-alive TLS 1.3 connections, each sending one request at a time,
//! for a duration or a number of requests, as fast as answers come (closed loop) or at a fixed
//! total rate (open loop).
//!
//! Connections are opened before the clock starts, so handshakes are not measured. Latency is
//! kept in an HDR histogram per action (microseconds, 3 significant digits). At a fixed rate, a
//! request that is late because earlier answers were late is measured from when it was *due*,
//! not when it was sent, so a stalled server cannot hide its stall by delaying the requests that
//! would have seen it (coordinated omission); a request sent on time is measured from when it
//! was sent (tokio's timer wakes up to a millisecond late, which is not the server's doing).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use custody_crypto::sigv4;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The actions the generator can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Op {
    /// Encrypt of 64 bytes.
    Encrypt,
    /// Decrypt of a 64-byte plaintext's ciphertext.
    Decrypt,
    /// GenerateDataKey, AES_256.
    GenerateDataKey,
    /// ReEncrypt of that ciphertext to a second key.
    ReEncrypt,
    /// DescribeKey.
    DescribeKey,
}

impl Op {
    /// Every action, in report order.
    pub const ALL: [Op; 5] = [Op::Encrypt, Op::Decrypt, Op::GenerateDataKey, Op::ReEncrypt, Op::DescribeKey];

    /// The X-Amz-Target.
    pub fn target(self) -> &'static str {
        match self {
            Op::Encrypt => "TrentService.Encrypt",
            Op::Decrypt => "TrentService.Decrypt",
            Op::GenerateDataKey => "TrentService.GenerateDataKey",
            Op::ReEncrypt => "TrentService.ReEncrypt",
            Op::DescribeKey => "TrentService.DescribeKey",
        }
    }

    /// The name used on the command line and in reports (`generate-data-key`).
    pub fn name(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::GenerateDataKey => "generate-data-key",
            Op::ReEncrypt => "re-encrypt",
            Op::DescribeKey => "describe-key",
        }
    }

    /// Parses a name as [`Op::name`] gives it.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.name() == s)
    }
}

/// One prepared request: the action and its JSON body.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The action.
    pub op: Op,
    /// Its body, sent as is.
    pub body: Bytes,
}

/// When a run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many requests in all.
    Requests(u64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Kept-alive connections, each with one request in flight.
    pub connections: usize,
    /// When to stop.
    pub stop: Stop,
    /// Total requests per second across all connections (open loop); `None`: as fast as the
    /// server answers (closed loop).
    pub rate: Option<f64>,
    /// The requests, in the order they are sent (weights expanded: `[e, e, d]` is two Encrypt
    /// for each Decrypt).
    pub mix: Vec<Prepared>,
}

/// Where to send, and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host (checked against the certificate) and port.
    pub endpoint: custody_client::Endpoint,
    /// TLS 1.3 client configuration (with the client certificate, unless requests are signed).
    pub tls: Arc<rustls::ClientConfig>,
    /// Signs every request (`None`: the TLS client certificate is the identity).
    pub sigv4: Option<Arc<SigV4Credentials>>,
}

impl Target {
    /// The profile's endpoint and TLS configuration: its client certificate is the identity.
    pub fn from_profile(profile: &custody_client::Profile) -> Result<Self, custody_client::ClientError> {
        Ok(Self { endpoint: profile.endpoint()?, tls: profile.tls_config()?, sigv4: None })
    }

    /// The profile's endpoint and CA, without its client certificate: every request is signed
    /// with AWS Signature Version 4 instead, as the AWS SDKs and CLI send them.
    pub fn signed(
        profile: &custody_client::Profile,
        credentials: SigV4Credentials,
    ) -> Result<Self, custody_client::ClientError> {
        let anonymous = custody_client::Profile { cert_file: None, key_file: None, ..profile.clone() };
        Ok(Self { endpoint: profile.endpoint()?, tls: anonymous.tls_config()?, sigv4: Some(Arc::new(credentials)) })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let (host, port) = (self.endpoint.host.as_str(), self.endpoint.port);
        let tcp = TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|e| e.to_string())?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// An AWS access key and the region requests are scoped to.
pub struct SigV4Credentials {
    /// Access key id (`AKIA...`).
    pub access_key_id: String,
    /// The secret access key.
    pub secret: custody_crypto::secret::SecretBytes,
    /// Region of the credential scope (custody checks it against its own).
    pub region: String,
}

impl std::fmt::Debug for SigV4Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigV4Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl SigV4Credentials {
    /// From the variables the AWS SDKs read: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_REGION` or `AWS_DEFAULT_REGION` (default `us-east-1`), looked up with `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let need = |name: &str| {
            var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                format!("{name} is not set: SigV4 needs an access key (`custody dev` writes one to its env file)")
            })
        };
        Ok(Self {
            access_key_id: need("AWS_ACCESS_KEY_ID")?,
            secret: custody_crypto::secret::SecretBytes::new(need("AWS_SECRET_ACCESS_KEY")?.into_bytes()),
            region: var("AWS_REGION")
                .or_else(|| var("AWS_DEFAULT_REGION"))
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "us-east-1".into()),
        })
    }

    /// From a shell file of `export NAME=VALUE` lines (what `custody dev` writes as `EnvFile`).
    pub fn from_env_file(path: &std::path::Path) -> Result<Self, String> {
        // It holds the secret access key: wiped once read.
        let text =
            zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?);
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.trim().trim_start_matches("export ").split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches(['"', '\''])))
            .collect();
        Self::from_vars(|name| vars.get(name).map(|v| v.to_string())).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The `Authorization` header of a KMS request (`POST /`, JSON 1.1) signed at `amz_date`
    /// (`YYYYMMDDTHHMMSSZ`) with `key` (the signing key of that date), covering `content-type`,
    /// `host`, `x-amz-date` and `x-amz-target`, as the AWS SDKs sign them.
    fn authorization(&self, key: &sigv4::SigningKey, amz_date: &str, host: &str, target: &str, body: &[u8]) -> String {
        const SIGNED: &str = "content-type;host;x-amz-date;x-amz-target";
        let canonical = format!(
            "POST\n/\n\ncontent-type:{JSON_1_1}\nhost:{host}\nx-amz-date:{amz_date}\nx-amz-target:{target}\n\n{SIGNED}\n{}",
            sigv4::sha256_hex(body)
        );
        let scope = format!("{}/{}/kms/aws4_request", &amz_date[..8], self.region);
        let to_sign = format!("AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}", sigv4::sha256_hex(canonical.as_bytes()));
        let signature = hex::encode(sigv4::sign(key, to_sign.as_bytes()));
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={SIGNED}, Signature={signature}",
            self.access_key_id
        )
    }

    fn signing_key(&self, date: &str) -> sigv4::SigningKey {
        sigv4::signing_key(&self.secret, date, &self.region, "kms")
    }
}

/// What a connection's signer keeps between requests: the `X-Amz-Date` of the current second,
/// and the signing key of the current day (AWS SDKs cache it the same way).
#[derive(Default)]
struct SignerState {
    second: u64,
    amz_date: String,
    key: Option<(String, sigv4::SigningKey)>,
}

impl SignerState {
    /// The `X-Amz-Date` and `Authorization` headers for one request, signed now.
    fn headers(&mut self, creds: &SigV4Credentials, host: &str, target: &str, body: &[u8]) -> (String, String) {
        let now = std::time::SystemTime::now();
        let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.amz_date.is_empty() {
            let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
            self.amz_date = time::OffsetDateTime::from(now).format(&format).expect("a UTC time formats");
            self.second = second;
        }
        let date = &self.amz_date[..8];
        if self.key.as_ref().is_none_or(|(d, _)| d != date) {
            self.key = Some((date.to_string(), creds.signing_key(date)));
        }
        let (_, key) = self.key.as_ref().expect("just set");
        let authorization = creds.authorization(key, &self.amz_date, host, target, body);
        (self.amz_date.clone(), authorization)
    }
}

/// The content type of KMS's JSON protocol.
const JSON_1_1: &str = "application/x-amz-json-1.1";

/// Latency and counts of one action.
#[derive(Debug, Clone)]
pub struct OpStats {
    /// Answered with 200, latency in microseconds.
    pub latency: Histogram<u64>,
    /// Failed requests by cause (`HTTP 503 ServiceUnavailableException`, `connection: ...`).
    pub errors: BTreeMap<String, u64>,
}

impl OpStats {
    fn new() -> Self {
        Self { latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"), errors: BTreeMap::new() }
    }

    fn merge(&mut self, other: &OpStats) {
        self.latency.add(&other.latency).expect("same bounds");
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    /// Requests that failed.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// From the first request sent to the last answer.
    pub elapsed: Duration,
    /// Per action.
    pub ops: BTreeMap<Op, OpStats>,
}

impl Outcome {
    /// Every action together.
    pub fn total(&self) -> OpStats {
        let mut all = OpStats::new();
        for s in self.ops.values() {
            all.merge(s);
        }
        all
    }

    /// Answered (200) requests, all actions.
    pub fn answered(&self) -> u64 {
        self.ops.values().map(|s| s.latency.len()).sum()
    }

    /// Failed requests, all actions.
    pub fn failed(&self) -> u64 {
        self.ops.values().map(OpStats::error_count).sum()
    }

    /// Answered (200) requests per second, all actions.
    pub fn ok_per_second(&self) -> f64 {
        self.answered() as f64 / self.elapsed.as_secs_f64()
    }

    /// Adds another run's figures (its time too) to these.
    pub fn absorb(&mut self, other: Outcome) {
        self.elapsed += other.elapsed;
        for (op, s) in other.ops {
            self.ops.entry(op).or_insert_with(OpStats::new).merge(&s);
        }
    }

    /// The summary of one action (or of all with `None`).
    pub fn summary(&self, op: Option<Op>) -> Summary {
        let s = match op {
            Some(op) => self.ops.get(&op).cloned().unwrap_or_else(OpStats::new),
            None => self.total(),
        };
        Summary::of(op.map_or("all", Op::name), &s, self.elapsed)
    }
}

/// Figures of one action, for printing and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Action name, or `all`.
    pub action: String,
    /// Answered (200) requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed requests by cause.
    pub error_causes: BTreeMap<String, u64>,
    /// Answered requests per second.
    pub ops_per_second: f64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// 99.9th percentile latency, µs.
    pub p999_us: u64,
    /// Slowest, µs.
    pub max_us: u64,
}

impl Summary {
    fn of(action: &str, s: &OpStats, elapsed: Duration) -> Self {
        let h = &s.latency;
        Summary {
            action: action.to_string(),
            requests: h.len(),
            errors: s.error_count(),
            error_causes: s.errors.clone(),
            ops_per_second: h.len() as f64 / elapsed.as_secs_f64(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// One line: `encrypt  12,345 ops/s  p50 ...`.
    pub fn line(&self) -> String {
        let errors = if self.errors == 0 {
            "0 errors".to_string()
        } else {
            let causes: Vec<String> = self.error_causes.iter().map(|(k, v)| format!("{v}× {k}")).collect();
            format!("{} errors ({})", self.errors, causes.join(", "))
        };
        format!(
            "{:<18} {:>9.0} ops/s  p50 {:>7}  p99 {:>7}  p99.9 {:>7}  max {:>7}  {:>9} requests  {errors}",
            self.action,
            self.ops_per_second,
            micros(self.p50_us),
            micros(self.p99_us),
            micros(self.p999_us),
            micros(self.max_us),
            self.requests,
        )
    }
}

/// `850 µs`, `1.25 ms`.
pub fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

/// Runs `plan` against `target`. Fails only if a connection cannot be opened at the start;
/// failures during the run are counted in the outcome.
pub async fn run(target: &Target, plan: &Plan) -> Result<Outcome, String> {
    assert!(!plan.mix.is_empty() && plan.connections > 0, "a plan has requests and connections");
    let mut senders = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        senders.push(target.connect().await.map_err(|e| format!("cannot connect to {}: {e}", target.endpoint))?);
    }
    let started = Instant::now();
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        started,
        deadline: match plan.stop {
            Stop::After(d) => Some(started + d),
            Stop::Requests(_) => None,
        },
        limit: match plan.stop {
            Stop::Requests(n) => n,
            Stop::After(_) => u64::MAX,
        },
        // Each connection sends every `connections / rate` seconds, the connections staggered.
        interval: plan.rate.map(|r| Duration::from_secs_f64(plan.connections as f64 / r)),
        authority: HeaderValue::from_str(&target.endpoint.authority()).expect("host and port make a header value"),
    });
    let mut tasks = Vec::new();
    for (index, sender) in senders.into_iter().enumerate() {
        let (target, plan, shared) = (target.clone(), plan.clone(), shared.clone());
        tasks.push(tokio::spawn(async move { worker(index, sender, &target, &plan, &shared).await }));
    }
    let mut ops: BTreeMap<Op, OpStats> = BTreeMap::new();
    for t in tasks {
        for (op, s) in t.await.map_err(|e| format!("a connection's task failed: {e}"))? {
            ops.entry(op).or_insert_with(OpStats::new).merge(&s);
        }
    }
    Ok(Outcome { elapsed: started.elapsed(), ops })
}

struct Shared {
    issued: AtomicU64,
    started: Instant,
    deadline: Option<Instant>,
    limit: u64,
    interval: Option<Duration>,
    authority: HeaderValue,
}

async fn worker(
    index: usize,
    mut sender: SendRequest<Full<Bytes>>,
    target: &Target,
    plan: &Plan,
    shared: &Shared,
) -> BTreeMap<Op, OpStats> {
    let mut stats: BTreeMap<Op, OpStats> = BTreeMap::new();
    let content_type = HeaderValue::from_static(JSON_1_1);
    let host = shared.authority.to_str().expect("made from a string").to_string();
    let mut signer = SignerState::default();
    let targets: BTreeMap<Op, HeaderValue> =
        Op::ALL.iter().map(|op| (*op, HeaderValue::from_static(op.target()))).collect();
    let offset = shared.interval.map(|i| i.mul_f64(index as f64 / plan.connections as f64));
    let mut sent: u64 = 0;
    loop {
        let n = shared.issued.fetch_add(1, Ordering::Relaxed);
        if n >= shared.limit {
            break;
        }
        let due = match (shared.interval, offset) {
            (Some(interval), Some(offset)) => {
                let due = shared.started + offset + interval.mul_f64(sent as f64);
                if shared.deadline.is_some_and(|d| due >= d) {
                    break;
                }
                if Instant::now() < due {
                    // Ahead of schedule: wait, and count from when the timer woke us (it
                    // wakes up to a millisecond late; that lateness is ours, not the server's).
                    tokio::time::sleep_until(due.into()).await;
                    Instant::now()
                } else {
                    // Behind schedule because answers came late: count from when it was due.
                    due
                }
            }
            _ => {
                let now = Instant::now();
                if shared.deadline.is_some_and(|d| now >= d) {
                    break;
                }
                now
            }
        };
        sent += 1;
        let prepared = &plan.mix[(n % plan.mix.len() as u64) as usize];
        let mut req = hyper::Request::new(Full::new(prepared.body.clone()));
        *req.method_mut() = hyper::Method::POST;
        let headers = req.headers_mut();
        headers.insert(HOST, shared.authority.clone());
        headers.insert(CONTENT_TYPE, content_type.clone());
        headers.insert("x-amz-target", targets[&prepared.op].clone());
        if let Some(creds) = &target.sigv4 {
            let (date, authorization) = signer.headers(creds, &host, prepared.op.target(), &prepared.body);
            headers.insert("x-amz-date", HeaderValue::from_str(&date).expect("digits and letters"));
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&authorization).expect("ASCII without controls"));
        }
        let result = send(&mut sender, req).await;
        let entry = stats.entry(prepared.op).or_insert_with(OpStats::new);
        match result {
            Ok(()) => {
                let us = due.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                entry.latency.record(us).expect("within bounds");
            }
            Err(Failure::Answer(cause)) => *entry.errors.entry(cause).or_default() += 1,
            Err(Failure::Connection(cause)) => {
                *entry.errors.entry(format!("connection: {cause}")).or_default() += 1;
                match target.connect().await {
                    Ok(s) => sender = s,
                    Err(e) => {
                        *entry.errors.entry(format!("reconnect: {e}")).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
    stats
}

enum Failure {
    /// The server answered, but not with 200.
    Answer(String),
    /// The connection broke.
    Connection(String),
}

async fn send(sender: &mut SendRequest<Full<Bytes>>, req: hyper::Request<Full<Bytes>>) -> Result<(), Failure> {
    let conn = |e: hyper::Error| Failure::Connection(e.to_string());
    sender.ready().await.map_err(conn)?;
    let resp = sender.send_request(req).await.map_err(conn)?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(conn)?.to_bytes();
    if status == hyper::StatusCode::OK {
        return Ok(());
    }
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["__type"].as_str().map(str::to_string))
        .unwrap_or_default();
    Err(Failure::Answer(format!("HTTP {} {code}", status.as_u16())))
}

/// Expands `encrypt=2,decrypt=1` into the order requests are sent: the weights interleaved
/// (`e d e`), so every stretch of the run sees the same mix.
pub fn parse_mix(spec: &str) -> Result<Vec<Op>, String> {
    let mut weighted = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
        let op = Op::parse(name.trim()).ok_or_else(|| {
            let names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
            format!("unknown action {name:?} in the mix: use {}", names.join(", "))
        })?;
        let weight: u32 = weight
            .trim()
            .parse()
            .ok()
            .filter(|w| (1..=1000).contains(w))
            .ok_or_else(|| format!("the weight of {name} must be a whole number from 1 to 1000"))?;
        weighted.push((op, weight));
    }
    if weighted.is_empty() {
        return Err("the mix is empty: give at least one action, e.g. encrypt=1".into());
    }
    let most = weighted.iter().map(|w| w.1).max().unwrap_or(1);
    let mut order = Vec::new();
    for round in 0..most {
        for (op, w) in &weighted {
            if round < *w {
                order.push(*op);
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> SigV4Credentials {
        SigV4Credentials {
            access_key_id: "AKIAEXAMPLE".into(),
            secret: custody_crypto::secret::SecretBytes::new(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_vec()),
            region: "eu-west-3".into(),
        }
    }

    /// What the generator signs, custody's own verifier (the server's canonical request, the
    /// crypto crate's check) accepts; and it fails for another secret or a changed body.
    #[test]
    fn signed_requests_verify_as_custody_checks_them() {
        let creds = credentials();
        let body = br#"{"KeyId":"alias/x","Plaintext":"AAAA"}"#;
        let (date, authorization) =
            SignerState::default().headers(&creds, "127.0.0.1:8443", "TrentService.Encrypt", body);
        let mut headers = hyper::HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("127.0.0.1:8443"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(JSON_1_1));
        headers.insert("x-amz-target", HeaderValue::from_static("TrentService.Encrypt"));
        headers.insert("x-amz-date", HeaderValue::from_str(&date).unwrap());
        let auth = custody_server::sigv4::parse_authorization(&authorization).unwrap();
        assert_eq!(
            (auth.access_key_id.as_str(), auth.region.as_str(), auth.service.as_str()),
            ("AKIAEXAMPLE", "eu-west-3", "kms")
        );
        assert_eq!(auth.date, date[..8]);
        let verifies = |secret: &[u8], body: &[u8]| {
            let parts =
                custody_server::sigv4::RequestParts { method: "POST", path: "/", query: "", headers: &headers, body };
            let canonical = custody_server::sigv4::canonical_request(&parts, &auth.signed_headers).unwrap();
            let scope = format!("{}/eu-west-3/kms/aws4_request", auth.date);
            let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", sigv4::sha256_hex(canonical.as_bytes()));
            let key = sigv4::signing_key(
                &custody_crypto::secret::SecretBytes::new(secret.to_vec()),
                &auth.date,
                "eu-west-3",
                "kms",
            );
            sigv4::verify(&key, to_sign.as_bytes(), &auth.signature)
        };
        assert!(verifies(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", body));
        assert!(!verifies(b"another secret", body));
        assert!(!verifies(b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", b"{}"));
    }

    #[test]
    fn credentials_from_an_env_file_and_never_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env");
        std::fs::write(&file, "export CUSTODY_ENDPOINT=https://127.0.0.1:1\nexport AWS_ACCESS_KEY_ID=AKIA1\nexport AWS_SECRET_ACCESS_KEY=s3cr3t/+=\nexport AWS_DEFAULT_REGION=ap-south-1\n").unwrap();
        let c = SigV4Credentials::from_env_file(&file).unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret.expose_secret(), c.region.as_str()),
            ("AKIA1", &b"s3cr3t/+="[..], "ap-south-1")
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));
        std::fs::write(&file, "export AWS_ACCESS_KEY_ID=AKIA1\n").unwrap();
        let e = SigV4Credentials::from_env_file(&file).unwrap_err();
        assert!(e.contains("AWS_SECRET_ACCESS_KEY is not set"), "{e}");
        let defaulted = SigV4Credentials::from_vars(|n| match n {
            "AWS_ACCESS_KEY_ID" => Some("A".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("S".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(defaulted.region, "us-east-1");
    }

    #[test]
    fn mixes_interleave_by_weight() {
        assert_eq!(parse_mix("encrypt=2,decrypt").unwrap(), vec![Op::Encrypt, Op::Decrypt, Op::Encrypt]);
        assert_eq!(parse_mix("describe-key").unwrap(), vec![Op::DescribeKey]);
        assert!(parse_mix("encrypt=0").unwrap_err().contains("from 1 to 1000"));
        assert!(parse_mix("sign=1").unwrap_err().contains("unknown action \"sign\""));
        assert!(parse_mix("").unwrap_err().contains("empty"));
    }
}
