//! `custody top`: the server's metrics (its loopback `GET /metrics`), as rates and latencies
//! over the last interval, refreshed in place — a look at a running custody without Prometheus.
//!
//! Everything shown is computed from two scrapes: counters as differences per second, latency
//! quantiles from the differences of the histogram buckets (interpolated within a bucket, as
//! Prometheus' `histogram_quantile` does), gauges as read.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use custody_client::metrics::{parse_url, quantile, Buckets, Scrape};
use serde::Serialize;

use crate::exit::{self, CliError};

/// `custody top`
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The server's metrics URL (its `metrics_listen`; `custody dev` prints it and writes it to
    /// `.custody-dev/env`).
    #[arg(long, value_name = "URL", env = "CUSTODY_METRICS_URL", default_value = DEFAULT_URL)]
    pub metrics: String,
    /// Seconds between refreshes (rates and latencies are over this interval).
    #[arg(long, short = 'i', value_name = "SECONDS", default_value_t = 2.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Print one view (over one interval) and exit.
    #[arg(long)]
    pub once: bool,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("expected seconds between 0.1 and 3600, got {s:?}")),
    }
}

/// Runs `custody top`.
pub async fn run(a: TopArgs, json: bool) -> Result<(), CliError> {
    let url = parse_url(&a.metrics)
        .map_err(|e| CliError::new(exit::USAGE, format!("--metrics: {e}, such as {DEFAULT_URL}")))?;
    let interval = Duration::from_secs_f64(a.interval);
    let redraw = !json && !a.once && std::io::stdout().is_terminal();
    let mut before = scrape(&url).await?;
    let mut view = None;
    loop {
        if let Some(v) = &view {
            show(v, json, redraw)?;
            if a.once {
                return Ok(());
            }
        }
        tokio::time::sleep(interval).await;
        let now = scrape(&url).await?;
        view = Some(View::between(&before, &now, a.metrics.as_str()));
        before = now;
    }
}

const DEFAULT_URL: &str = "http://127.0.0.1:9464/metrics";

fn show(v: &View, json: bool, redraw: bool) -> Result<(), CliError> {
    let text = if json { serde_json::to_string(v).expect("views serialize") + "\n" } else { v.render() };
    let mut out = std::io::stdout().lock();
    // In place on a terminal (home, clear); one view after another otherwise, as `top -b` does.
    let written = if redraw {
        write!(out, "\x1b[H\x1b[2J{text}")
    } else if json {
        write!(out, "{text}")
    } else {
        writeln!(out, "{text}")
    };
    written.and_then(|()| out.flush()).map_err(|e| CliError::new(exit::FAILURE, format!("cannot write: {e}")))
}

async fn scrape(url: &hyper::Uri) -> Result<Scrape, CliError> {
    Scrape::fetch(url, Duration::from_secs(5)).await.map_err(|why| {
        CliError::new(
            exit::UNREACHABLE,
            format!(
                "cannot read metrics at {url}: {why}\nhint: the server serves them only with metrics_listen set \
                 (custody dev: CUSTODY_METRICS_LISTEN=127.0.0.1:9464); point --metrics or CUSTODY_METRICS_URL at it"
            ),
        )
    })
}

/// What `custody top` shows: one interval between two scrapes.
#[derive(Debug, Serialize)]
pub(crate) struct View {
    metrics: String,
    interval_seconds: f64,
    sealed: Option<bool>,
    root_generation: Option<u64>,
    connections_open: Option<u64>,
    tls_handshake_failures_per_second: f64,
    /// One row per action that was requested in the interval, busiest first.
    actions: Vec<ActionView>,
    all: ActionView,
    audit: AuditView,
    keys: BTreeMap<String, u64>,
    /// Share of hits among the interval's lookups, per cache.
    cache_hit_ratio: BTreeMap<String, f64>,
    /// Seconds until each certificate expires.
    certificate_expiry_seconds: BTreeMap<String, f64>,
    /// Background tasks that failed, since the server started.
    scheduler_errors_total: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct ActionView {
    action: String,
    requests_per_second: f64,
    /// Answers other than `success` (denied, unauthenticated, failed), per second.
    errors_per_second: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    mean_ms: Option<f64>,
    /// Answered since the server started.
    total: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct AuditView {
    failing: Option<bool>,
    queue_depth: Option<u64>,
    commits_per_second: f64,
    records_per_commit: Option<f64>,
    commit_mean_ms: Option<f64>,
    commit_p99_ms: Option<f64>,
    alerts_per_second: f64,
    alerts_total: u64,
}

const REQUESTS: &str = "custody_requests_total";
const DURATION: &str = "custody_request_duration_seconds";
const COMMIT: &str = "custody_audit_commit_duration_seconds";
const RECORDS: &str = "custody_audit_commit_records";

impl View {
    pub(crate) fn between(before: &Scrape, now: &Scrape, metrics: &str) -> Self {
        let secs = now.at.duration_since(before.at).as_secs_f64().max(1e-3);
        // A counter that went down: the server restarted in between, and every counter began
        // again from zero (Prometheus' `rate` reads a reset the same way).
        let restarted = Scrape { at: before.at, samples: Vec::new() };
        let before = if now.reset_since(before) { &restarted } else { before };
        let rate =
            |name: &str, labels: &[(&str, &str)]| (now.sum(name, labels) - before.sum(name, labels)).max(0.0) / secs;
        let delta = |name: &str| (now.sum(name, &[]) - before.sum(name, &[])).max(0.0);
        let gauge = |name: &str| now.value(name, &[]);
        let ms = |s: f64| s * 1e3;

        let mut names: Vec<&str> =
            now.get(REQUESTS).filter_map(|s| s.labels.get("action").map(String::as_str)).collect();
        names.sort_unstable();
        names.dedup();
        let action_view = |action: &str, labels: &[(&str, &str)], hist: Option<(Buckets, Buckets)>| {
            let (count, sum) = (format!("{DURATION}_count"), format!("{DURATION}_sum"));
            let n = now.sum(&count, labels) - before.sum(&count, labels);
            let total = now.sum(REQUESTS, labels);
            let (b, a) = hist.unwrap_or_else(|| (before.buckets(DURATION, labels), now.buckets(DURATION, labels)));
            let requests = rate(REQUESTS, labels);
            let successes = rate(REQUESTS, &[labels, &[("outcome", "success")]].concat());
            ActionView {
                action: action.to_string(),
                requests_per_second: requests,
                errors_per_second: (requests - successes).max(0.0),
                p50_ms: quantile(0.5, &b, &a).map(ms),
                p99_ms: quantile(0.99, &b, &a).map(ms),
                mean_ms: (n > 0.0).then(|| ms((now.sum(&sum, labels) - before.sum(&sum, labels)) / n)),
                total: total as u64,
            }
        };
        let mut actions: Vec<ActionView> = names
            .iter()
            .map(|a| action_view(a, &[("action", a)], None))
            .filter(|v| v.requests_per_second > 0.0)
            .collect();
        actions.sort_by(|x, y| y.requests_per_second.total_cmp(&x.requests_per_second));
        // Every action's histogram added up, bucket by bucket (they share their bounds).
        let merged = |s: &Scrape| {
            let mut all: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
            for a in &names {
                for (le, n) in s.buckets(DURATION, &[("action", a)]) {
                    all.entry(le.to_bits()).or_insert((le, 0.0)).1 += n;
                }
            }
            let mut v: Vec<(f64, f64)> = all.into_values().collect();
            v.sort_by(|x, y| x.0.total_cmp(&y.0));
            v
        };
        let all = action_view("all", &[], Some((merged(before), merged(now))));

        let commits = delta(&format!("{COMMIT}_count"));
        let audit = AuditView {
            failing: gauge("custody_audit_failing").map(|v| v > 0.0),
            queue_depth: gauge("custody_audit_queue_depth").map(|v| v as u64),
            commits_per_second: commits / secs,
            records_per_commit: (commits > 0.0).then(|| delta(&format!("{RECORDS}_sum")) / commits),
            commit_mean_ms: (commits > 0.0).then(|| ms(delta(&format!("{COMMIT}_sum")) / commits)),
            commit_p99_ms: quantile(0.99, &before.buckets(COMMIT, &[]), &now.buckets(COMMIT, &[])).map(ms),
            alerts_per_second: rate("custody_audit_alerts_total", &[]),
            alerts_total: now.sum("custody_audit_alerts_total", &[]) as u64,
        };
        let by_label = |name: &str, label: &str| -> BTreeMap<String, f64> {
            now.get(name).filter_map(|s| Some((s.labels.get(label)?.clone(), s.value))).collect()
        };
        let mut cache_hit_ratio = BTreeMap::new();
        for cache in by_label("custody_cache_lookups_total", "cache").into_keys() {
            let hits = rate("custody_cache_lookups_total", &[("cache", &cache), ("result", "hit")]);
            let all = rate("custody_cache_lookups_total", &[("cache", &cache)]);
            if all > 0.0 {
                cache_hit_ratio.insert(cache, hits / all);
            }
        }
        View {
            metrics: metrics.to_string(),
            interval_seconds: secs,
            sealed: gauge("custody_sealed").map(|v| v > 0.0),
            root_generation: gauge("custody_root_generation").map(|v| v as u64),
            connections_open: gauge("custody_connections_open").map(|v| v as u64),
            tls_handshake_failures_per_second: rate("custody_tls_handshake_failures_total", &[]),
            actions,
            all,
            audit,
            keys: by_label("custody_keys", "state").into_iter().map(|(k, v)| (k, v as u64)).collect(),
            cache_hit_ratio,
            certificate_expiry_seconds: by_label("custody_tls_cert_expiry_seconds", "cert"),
            scheduler_errors_total: now.sum("custody_scheduler_runs_total", &[("result", "error")]) as u64,
        }
    }

    /// The view as a screen of text.
    pub(crate) fn render(&self) -> String {
        use std::fmt::Write as _;
        let yes_no = |v: Option<bool>, yes: &str, no: &str| {
            v.map_or("?".to_string(), |v| (if v { yes } else { no }).to_string())
        };
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2} ms"));
        let mut s = String::new();
        let _ = writeln!(s, "custody top — {} — every {:.1} s (Ctrl-C to stop)", self.metrics, self.interval_seconds);
        let _ = writeln!(
            s,
            "{} · root generation {} · {} connections open · {:.1} failed handshakes/s",
            yes_no(self.sealed, "SEALED", "unsealed"),
            opt(self.root_generation),
            opt(self.connections_open),
            self.tls_handshake_failures_per_second
        );
        let a = &self.audit;
        let _ = writeln!(
            s,
            "audit: {} · queue {} · {:.0} commits/s · {} records/commit · commit {} (p99 {}) · alerts {:.1}/s ({} since start)",
            yes_no(a.failing, "FAILING (requests refused)", "ok"),
            opt(a.queue_depth),
            a.commits_per_second,
            a.records_per_commit.map_or("-".to_string(), |v| format!("{v:.1}")),
            ms(a.commit_mean_ms),
            ms(a.commit_p99_ms),
            a.alerts_per_second,
            a.alerts_total
        );
        let _ = writeln!(
            s,
            "\n{:<34} {:>10} {:>9} {:>10} {:>10} {:>10} {:>12}",
            "action", "req/s", "errors/s", "p50", "p99", "mean", "since start"
        );
        for v in self.actions.iter().chain(std::iter::once(&self.all)) {
            let name = v.action.strip_prefix("TrentService.").unwrap_or(&v.action);
            let _ = writeln!(
                s,
                "{:<34} {:>10.1} {:>9.1} {:>10} {:>10} {:>10} {:>12}",
                name,
                v.requests_per_second,
                v.errors_per_second,
                ms(v.p50_ms),
                ms(v.p99_ms),
                ms(v.mean_ms),
                v.total
            );
        }
        let join = |m: &mut dyn Iterator<Item = String>| m.collect::<Vec<_>>().join(", ");
        let _ = writeln!(s, "\nkeys: {}", join(&mut self.keys.iter().map(|(k, v)| format!("{v} {k}"))));
        let _ = writeln!(
            s,
            "caches (hits): {}",
            join(&mut self.cache_hit_ratio.iter().map(|(k, v)| format!("{k} {:.2} %", v * 100.0)))
        );
        let _ = writeln!(
            s,
            "certificates expire in: {}",
            join(&mut self.certificate_expiry_seconds.iter().map(|(k, v)| format!("{k} {:.1} days", v / 86_400.0)))
        );
        let _ = write!(s, "background task errors since start: {}", self.scheduler_errors_total);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_client::metrics::parse;
    use std::time::Instant;

    #[test]
    fn a_view_is_rates_over_the_interval() {
        let at = Instant::now();
        let scrape =
            |secs: u64, text: &str| Scrape { at: at + Duration::from_secs(secs), samples: parse(text).unwrap() };
        let before = scrape(
            0,
            "custody_requests_total{action=\"TrentService.Encrypt\",outcome=\"success\"} 100\n\
             custody_request_duration_seconds_bucket{le=\"0.001\",action=\"TrentService.Encrypt\"} 100\n\
             custody_request_duration_seconds_bucket{le=\"+Inf\",action=\"TrentService.Encrypt\"} 100\n\
             custody_request_duration_seconds_sum{action=\"TrentService.Encrypt\"} 0.05\n\
             custody_request_duration_seconds_count{action=\"TrentService.Encrypt\"} 100\n\
             custody_audit_commit_duration_seconds_sum 0.01\ncustody_audit_commit_duration_seconds_count 20\n\
             custody_audit_commit_records_sum 100\ncustody_audit_commit_records_count 20\n\
             custody_sealed 0\ncustody_audit_failing 0\n",
        );
        let now = scrape(
            2,
            "custody_requests_total{action=\"TrentService.Encrypt\",outcome=\"success\"} 300\n\
             custody_requests_total{action=\"TrentService.Encrypt\",outcome=\"denied\"} 10\n\
             custody_requests_total{action=\"TrentService.Decrypt\",outcome=\"success\"} 5\n\
             custody_request_duration_seconds_bucket{le=\"0.001\",action=\"TrentService.Encrypt\"} 300\n\
             custody_request_duration_seconds_bucket{le=\"+Inf\",action=\"TrentService.Encrypt\"} 310\n\
             custody_request_duration_seconds_sum{action=\"TrentService.Encrypt\"} 0.26\n\
             custody_request_duration_seconds_count{action=\"TrentService.Encrypt\"} 310\n\
             custody_audit_commit_duration_seconds_sum 0.03\ncustody_audit_commit_duration_seconds_count 60\n\
             custody_audit_commit_records_sum 310\ncustody_audit_commit_records_count 60\n\
             custody_sealed 0\ncustody_audit_failing 1\n",
        );
        let v = View::between(&before, &now, "http://x/metrics");
        assert_eq!(v.actions.len(), 2);
        let enc = &v.actions[0];
        assert_eq!(enc.action, "TrentService.Encrypt");
        assert_eq!(enc.requests_per_second, 105.0);
        assert_eq!(enc.errors_per_second, 5.0);
        assert_eq!(enc.total, 310);
        assert!((enc.mean_ms.unwrap() - 1.0).abs() < 1e-9, "{:?}", enc.mean_ms);
        assert_eq!(v.actions[1].requests_per_second, 2.5, "an action first seen in the interval");
        assert_eq!(v.all.requests_per_second, 107.5);
        assert_eq!(v.audit.commits_per_second, 20.0);
        assert_eq!(v.audit.records_per_commit, Some(5.25));
        assert!((v.audit.commit_mean_ms.unwrap() - 0.5).abs() < 1e-9);
        assert_eq!((v.sealed, v.audit.failing), (Some(false), Some(true)));
        // The server restarted: the counters began again; the interval counts what they hold now.
        let restarted = scrape(
            4,
            "custody_requests_total{action=\"TrentService.Encrypt\",outcome=\"success\"} 40\n\
             custody_request_duration_seconds_bucket{le=\"0.001\",action=\"TrentService.Encrypt\"} 40\n\
             custody_request_duration_seconds_bucket{le=\"+Inf\",action=\"TrentService.Encrypt\"} 40\n",
        );
        let r = View::between(&now, &restarted, "http://x/metrics");
        assert_eq!(r.actions[0].requests_per_second, 20.0);
        assert_eq!(r.actions[0].errors_per_second, 0.0);
        assert!(r.actions[0].p99_ms.unwrap() <= 1.0);
        let text = v.render();
        assert!(text.contains("FAILING") && text.contains("Encrypt") && text.contains("105.0"), "{text}");
    }
}
