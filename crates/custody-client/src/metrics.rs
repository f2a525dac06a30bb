//! Reading a custody server's metrics: the Prometheus/OpenMetrics text its metrics listener
//! serves (`GET /metrics`, plain HTTP, loopback only), parsed into samples, and what two scrapes
//! say together (counter resets, quantiles of the observations between them). Used by
//! `custody top` and by the load generator's suite.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One sample: metric name (with its `_total`, `_bucket`… suffix), labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name as exposed (`custody_requests_total`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// Whether its labels include every `(name, value)` of `labels`.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// One scrape: when it was taken, and every sample.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// When the answer arrived.
    pub at: Instant,
    /// Every sample, in the order served.
    pub samples: Vec<Sample>,
}

/// Checks that `url` is an `http://` URL with a host (the metrics listener speaks plain HTTP).
pub fn parse_url(url: &str) -> Result<hyper::Uri, String> {
    url.parse::<hyper::Uri>()
        .ok()
        .filter(|u| u.scheme_str() == Some("http") && u.authority().is_some())
        .ok_or_else(|| format!("a metrics URL is http://HOST:PORT/metrics, not {url:?}"))
}

impl Scrape {
    /// `GET url` (within `timeout`) and parses the answer.
    pub async fn fetch(url: &hyper::Uri, timeout: Duration) -> Result<Self, String> {
        let text = tokio::time::timeout(timeout, get(url))
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs_f64()))??;
        let samples = parse(&text).map_err(|e| format!("not Prometheus text: {e}"))?;
        Ok(Scrape { at: Instant::now(), samples })
    }
}

/// `GET url` over plain HTTP/1.1; the body if the answer is 200.
async fn get(url: &hyper::Uri) -> Result<String, String> {
    use http_body_util::{BodyExt, Empty};
    let authority = url.authority().expect("checked: the URL has an authority");
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::get(url.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(format!("the answer was {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|_| "the answer is not UTF-8".into())
}

/// Parses the Prometheus text exposition format (and OpenMetrics' text, which custody serves):
/// `name{label="value",...} value [timestamp]` per line; comments and `# EOF` are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(bad("not a metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                rest = rest.trim_start_matches([' ', ',']);
                if let Some(after) = rest.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (label, after) = rest.split_once("=\"").ok_or_else(|| bad("a label without a quoted value"))?;
                let (value, after) = unquote(after).ok_or_else(|| bad("an unterminated label value"))?;
                labels.insert(label.trim().to_string(), value);
                rest = after;
            }
        }
        let value = rest.split_whitespace().next().ok_or_else(|| bad("no value"))?;
        let value = number(value).ok_or_else(|| bad("the value is not a number"))?;
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

/// The label value at the start of `s` (after its opening quote), unescaped, and what follows
/// its closing quote.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

impl Scrape {
    /// Every sample named `name`.
    pub fn get<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of `name`'s first sample whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.get(name).find(|s| s.has(labels)).map(|s| s.value)
    }

    /// The sum of `name`'s samples whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name).filter(|s| s.has(labels)).map(|s| s.value).sum()
    }

    /// Whether a counter (or a histogram's count, sum or bucket) is lower now than in `before`.
    pub fn reset_since(&self, before: &Scrape) -> bool {
        let counter = |n: &str| ["_total", "_count", "_sum", "_bucket"].iter().any(|s| n.ends_with(s));
        before.samples.iter().filter(|s| counter(&s.name)).any(|old| {
            self.samples.iter().any(|new| new.name == old.name && new.labels == old.labels && new.value < old.value)
        })
    }

    /// Histogram `name`'s cumulative buckets (upper bound, count) for the series with `labels`.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Buckets {
        let bucket = format!("{name}_bucket");
        let mut b: Vec<(f64, f64)> = self
            .get(&bucket)
            .filter(|s| s.has(labels))
            .filter_map(|s| Some((number(s.labels.get("le")?)?, s.value)))
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// A histogram's cumulative buckets: (upper bound, observations at or below it), ascending.
pub type Buckets = Vec<(f64, f64)>;

/// A sample's value or a bucket's bound: a float, `+Inf` or `-Inf`.
fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        v => v.parse().ok(),
    }
}

/// The `q` quantile of the observations between two scrapes of one histogram's cumulative
/// buckets: linear within the bucket it falls in; in the open-ended last bucket, that bucket's
/// lower bound (as Prometheus answers). `None` without observations.
pub fn quantile(q: f64, before: &[(f64, f64)], now: &[(f64, f64)]) -> Option<f64> {
    let counts: Vec<(f64, f64)> =
        now.iter().map(|&(le, n)| (le, n - before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1))).collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cumulative) in &counts {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = cumulative - lower.1;
            let share = if within > 0.0 { (rank - lower.1) / within } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, cumulative);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_exposition_format() {
        let text = "# HELP x help\n# TYPE x counter\nx_total{a=\"b\",c=\"with \\\"quotes\\\", comma\"} 3\n\
                    y 1.5e3 1700000000\nz{le=\"+Inf\"} +Inf\n\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].labels["c"], "with \"quotes\", comma");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].value, 1500.0);
        assert!(s[2].value.is_infinite());
        for bad in ["x{a=\"b} 1", "x{a} 1", "x", "x{} one", "bad-name 1"] {
            assert!(parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn quantiles_interpolate_within_the_interval_s_buckets() {
        let before = [(0.001, 10.0), (0.002, 10.0), (0.004, 10.0), (f64::INFINITY, 10.0)];
        // 100 new observations: 50 under 1 ms, 40 in (1, 2] ms, 10 in (2, 4] ms.
        let now = [(0.001, 60.0), (0.002, 100.0), (0.004, 110.0), (f64::INFINITY, 110.0)];
        assert_eq!(quantile(0.5, &before, &now), Some(0.001));
        let p90 = quantile(0.9, &before, &now).unwrap();
        assert!((p90 - 0.002).abs() < 1e-12, "{p90}");
        let p95 = quantile(0.95, &before, &now).unwrap();
        assert!((p95 - 0.003).abs() < 1e-12, "{p95}");
        assert_eq!(quantile(0.5, &now, &now), None, "nothing observed in the interval");
        // In the open-ended bucket: its lower bound.
        let later = [(0.001, 60.0), (0.002, 100.0), (0.004, 110.0), (f64::INFINITY, 210.0)];
        assert_eq!(quantile(0.99, &now, &later), Some(0.004));
    }
}
