//! Prometheus metrics, served at `GET /metrics` on a listener of their own (`metrics_listen`),
//! plain HTTP, bound to a loopback address only.
//!
//! Why a separate loopback listener, and not the API's: a scrape every few seconds on the API
//! would be an authenticated request like any other, with an audit record each; and the API's
//! listener stays exactly the AWS protocol. Metrics carry no secret (counts, latencies, states,
//! dates) but do describe the service, so they are not offered beyond the machine: a Prometheus
//! elsewhere scrapes through an agent on the host or an SSH tunnel (docs/OPERATIONS.md).
//!
//! Every label value comes from a fixed set (actions custody knows, outcomes, states), never
//! from what a client sent, so no request can grow the number of series.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;

use custody_kms::{Kms, Outcome};

use crate::tls::ServedCert;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    action: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    cert: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
    result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::Denied => "denied",
        Outcome::Unauthenticated => "unauthenticated",
        Outcome::Failed => "failed",
    }
}

/// Every metric the server keeps.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Histograms<ActionLabels>,
    audit_commit: Histogram,
    audit_group: Histogram,
    audit_queue: Gauge,
    audit_failing: Gauge,
    alerts: Counter,
    sealed: Gauge,
    root_generation: Gauge,
    keys: Family<StateLabels, Gauge>,
    scheduler_runs: Family<TaskLabels, Counter>,
    cert_expiry: Family<CertLabels, Gauge<i64, AtomicI64>>,
    cache: Family<CacheLabels, Counter>,
    connections: Gauge,
    handshake_failures: Counter<u64, AtomicU64>,
    request_read_timeouts: Counter<u64, AtomicU64>,
    connections_refused: Counter<u64, AtomicU64>,
    connections_refused_per_ip: Counter<u64, AtomicU64>,
}

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("custody");
        let seconds = Some(Unit::Seconds);
        Arc::new(Self {
            requests: add(&mut r, "requests", "Requests answered, by action and outcome", None, Family::default()),
            latency: add(
                &mut r,
                "request_duration",
                "Time from a request's arrival to its answer (audit record durable), by action",
                seconds.clone(),
                Family::new_with_constructor(latency_buckets as fn() -> Histogram),
            ),
            audit_commit: add(
                &mut r,
                "audit_commit_duration",
                "Time to make one group of audit records durable (one transaction)",
                seconds.clone(),
                Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            ),
            audit_group: add(
                &mut r,
                "audit_commit_records",
                "Audit records per group commit",
                None,
                Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            ),
            audit_queue: add(
                &mut r,
                "audit_queue_depth",
                "Audit records waiting for the next group commit",
                None,
                Gauge::default(),
            ),
            audit_failing: add(
                &mut r,
                "audit_failing",
                "1 while the audit trail cannot be written (every request is refused)",
                None,
                Gauge::default(),
            ),
            alerts: add(&mut r, "audit_alerts", "Audit records flagged alert since start", None, Counter::default()),
            sealed: add(&mut r, "sealed", "1 while sealed", None, Gauge::default()),
            root_generation: add(&mut r, "root_generation", "Generation of the root key", None, Gauge::default()),
            keys: add(
                &mut r,
                "keys",
                "Keys by state, every tenant, as of the last scheduler pass",
                None,
                Family::default(),
            ),
            scheduler_runs: add(
                &mut r,
                "scheduler_runs",
                "Background task runs, by task and result",
                None,
                Family::default(),
            ),
            cert_expiry: add(
                &mut r,
                "tls_cert_expiry",
                "Seconds until a certificate expires (server: the one served now; ca: the issuing CA)",
                seconds,
                Family::default(),
            ),
            cache: add(
                &mut r,
                "cache_lookups",
                "Cache lookups, by cache and result (hit or miss)",
                None,
                Family::default(),
            ),
            connections: add(&mut r, "connections_open", "TLS connections open now", None, Gauge::default()),
            handshake_failures: add(
                &mut r,
                "tls_handshake_failures",
                "TLS handshakes refused or timed out",
                None,
                Counter::default(),
            ),
            connections_refused: add(
                &mut r,
                "connections_refused",
                "Connections closed on accept because max_connections were open",
                None,
                Counter::default(),
            ),
            connections_refused_per_ip: add(
                &mut r,
                "connections_refused_per_ip",
                "Connections closed on accept because max_connections_per_ip were open from their address",
                None,
                Counter::default(),
            ),
            request_read_timeouts: add(
                &mut r,
                "request_read_timeouts",
                "Connections closed because a whole request did not arrive within request_read_timeout_ms",
                None,
                Counter::default(),
            ),
            registry: r,
        })
    }

    /// One answered request. `action` must be a label custody chose (the server's
    /// `metric_action`), never the request's target as sent.
    pub fn request(&self, action: &str, outcome: Outcome, took: Duration) {
        let action = action.to_string();
        self.requests.get_or_create(&RequestLabels { action: action.clone(), outcome: outcome_label(outcome) }).inc();
        self.latency.get_or_create(&ActionLabels { action }).observe(took.as_secs_f64());
    }

    /// One group commit of the audit trail.
    pub fn audit_commit(&self, took: Duration, records: usize) {
        self.audit_commit.observe(took.as_secs_f64());
        self.audit_group.observe(records as f64);
    }

    /// One run of a background task.
    pub fn task_ran(&self, task: &'static str, result: &'static str) {
        self.scheduler_runs.get_or_create(&TaskLabels { task, result }).inc();
    }

    /// Keys by state, as the scheduler counted them.
    pub fn key_counts(&self, by_state: [u64; 4]) {
        for (state, n) in custody_kms::model::KeyState::ALL.iter().zip(by_state) {
            self.keys.get_or_create(&StateLabels { state: state.as_str() }).set(n as i64);
        }
    }

    /// A TLS connection opened (`true`) or closed.
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections.inc();
        } else {
            self.connections.dec();
        }
    }

    /// A handshake that failed.
    pub fn handshake_failed(&self) {
        self.handshake_failures.inc();
    }

    /// A connection refused because `max_connections` were open.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// A connection refused because `max_connections_per_ip` were open from its address.
    pub fn connection_refused_per_ip(&self) {
        self.connections_refused_per_ip.inc();
    }

    /// A connection closed by its watchdog.
    pub fn request_read_timed_out(&self) {
        self.request_read_timeouts.inc();
    }

    /// The text exposition (OpenMetrics), with the gauges read from the service now.
    pub fn render(&self, kms: &Kms, served: &ServedCert) -> String {
        let health = kms.audit_health();
        self.audit_queue.set(kms.audit_queue_depth() as i64);
        self.audit_failing.set(i64::from(health.failing));
        raise_to(&self.alerts, health.alerts);
        match kms.status() {
            Ok(s) => {
                self.sealed.set(i64::from(s.sealed));
                self.root_generation.set(i64::from(s.root_generation));
            }
            Err(_) => {
                self.sealed.set(1);
            }
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.cert_expiry.get_or_create(&CertLabels { cert: "server" }).set(served.current().leaf.not_after - now);
        if let Ok(ca) = kms.ca_not_after() {
            self.cert_expiry.get_or_create(&CertLabels { cert: "ca" }).set(ca - now);
        }
        for (cache, stats) in kms.cache_stats() {
            raise_to(&self.cache.get_or_create(&CacheLabels { cache, result: "hit" }), stats.hits);
            raise_to(&self.cache.get_or_create(&CacheLabels { cache, result: "miss" }), stats.misses);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Registers `metric` (a handle: the registry keeps a clone) and returns it.
fn add<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: M) -> M {
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

/// Brings a counter up to a total kept elsewhere (counters only go up).
fn raise_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// Whether `addr` may serve metrics: loopback only.
pub fn check_listen(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(format!(
        "metrics_listen must be a loopback address (127.0.0.1:PORT or [::1]:PORT), got {addr}: metrics are \
         served without authentication; scrape them from this machine (a Prometheus agent on the host, or an SSH \
         tunnel)"
    ))
}

/// Serves `GET /metrics` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    kms: Arc<Kms>,
    served: Arc<ServedCert>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (metrics, kms, served) = (metrics.clone(), kms.clone(), served.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, kms, served) = (metrics.clone(), kms.clone(), served.clone());
                async move {
                    let resp = if req.method() == Method::GET && req.uri().path() == "/metrics" {
                        // Reading the service's state may touch the store: off the async workers.
                        let text = tokio::task::spawn_blocking(move || metrics.render(&kms, &served))
                            .await
                            .unwrap_or_else(|_| String::from("# metrics could not be rendered\n"));
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        resp.headers_mut().insert(
                            CONTENT_TYPE,
                            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                        );
                        resp
                    } else {
                        let mut resp =
                            Response::new(Full::new(Bytes::from_static(b"custody serves GET /metrics here\n")));
                        *resp.status_mut() = StatusCode::NOT_FOUND;
                        resp
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}
