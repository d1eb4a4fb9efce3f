//! `dfs metrics URL`: fetches a dfs process's Prometheus metrics and prints, for every timed
//! operation, how many there were and their latency (mean and percentiles estimated from the
//! histogram buckets, as Prometheus's `histogram_quantile` does).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use prometheus_parse::{Scrape, Value};

#[derive(Debug, thiserror::Error)]
pub enum MetricsViewError {
    #[error("{url} is not a metrics address (expected http://HOST:PORT/metrics or HOST:PORT)")]
    BadUrl { url: String },
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// The latency of one kind of operation, from a `_duration_seconds` histogram.
#[derive(Debug, Clone, PartialEq)]
pub struct OpLatency {
    /// The histogram, without the process prefix and unit (`request`, `fuse_request`, ...).
    pub metric: String,
    /// Its `op` label, if any.
    pub op: String,
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// GETs the metrics text from `url`.
pub async fn fetch(url: &str, timeout: Duration) -> Result<String, MetricsViewError> {
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}/metrics")
    };
    let bad = || MetricsViewError::BadUrl { url: url.to_owned() };
    let uri: hyper::Uri = full.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?.to_string();
    let path = match uri.path() {
        "" | "/" => "/metrics".to_owned(),
        p => p.to_owned(),
    };
    let fetch_err = |reason: String| MetricsViewError::Fetch {
        url: full.clone(),
        reason,
    };
    let get = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        tokio::spawn(conn);
        let request = hyper::Request::get(&path)
            .header(hyper::header::HOST, &authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_err(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if !response.status().is_success() {
            return Err(MetricsViewError::Status {
                url: full.clone(),
                status: response.status().as_u16(),
            });
        }
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fetch_err(e.to_string()))?
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| MetricsViewError::Timeout {
            url: full.clone(),
            timeout,
        })?
}

/// Every `*_duration_seconds` histogram in `text`, one row per operation, most frequent first.
pub fn latencies(text: &str) -> Vec<OpLatency> {
    let scrape = match Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))) {
        Ok(s) => s,
        Err(_) => return Vec::new(),
    };
    // (histogram, op) -> sum of observations, from the `_sum` samples.
    let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in &scrape.samples {
        if let (Some(base), Value::Untyped(v) | Value::Gauge(v) | Value::Counter(v)) =
            (s.metric.strip_suffix("_sum"), &s.value)
        {
            sums.insert((base.to_owned(), s.labels.get("op").unwrap_or("").to_owned()), *v);
        }
    }
    let mut rows = Vec::new();
    for s in &scrape.samples {
        let Value::Histogram(buckets) = &s.value else { continue };
        let Some(name) = s.metric.strip_suffix("_duration_seconds") else {
            continue;
        };
        let op = s.labels.get("op").unwrap_or("").to_owned();
        let mut buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let count = buckets.last().map_or(0.0, |b| b.1);
        if count == 0.0 {
            continue;
        }
        let sum = sums.get(&(s.metric.clone(), op.clone())).copied().unwrap_or(0.0);
        rows.push(OpLatency {
            metric: short_name(name),
            op,
            count: count as u64,
            mean: sum / count,
            p50: quantile(&buckets, 0.5),
            p90: quantile(&buckets, 0.9),
            p99: quantile(&buckets, 0.99),
        });
    }
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.op.cmp(&b.op)));
    rows
}

/// `dfs_mount_fuse_request` -> `fuse_request`.
fn short_name(name: &str) -> String {
    ["dfs_mount_", "dfs_metaserver_", "dfs_storaged_"]
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name)
        .to_owned()
}

/// The `q` quantile of a histogram given as (upper bound, cumulative count) sorted by bound,
/// interpolating linearly inside the bucket it falls in.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                // Past the last finite bucket: its bound is all that is known.
                return lower.0;
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return lower.0 + (bound - lower.0) * fraction;
        }
        lower = (bound, count);
    }
    lower.0
}

fn human(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.2} s")
    } else if seconds >= 1e-3 {
        format!("{:.2} ms", seconds * 1e3)
    } else {
        format!("{:.0} us", seconds * 1e6)
    }
}

/// The table `dfs metrics` prints.
pub fn render(rows: &[OpLatency]) -> String {
    let mut out = format!(
        "{:<16} {:<20} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "requests", "operation", "count", "mean", "p50", "p90", "p99"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<20} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            r.metric,
            r.op,
            r.count,
            human(r.mean),
            human(r.p50),
            human(r.p90),
            human(r.p99)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_read_from_what_the_servers_expose() {
        let metrics = dfs_common::metrics::Metrics::new("dfs_mount");
        let requests = metrics.requests("fuse_request", "FUSE requests");
        for _ in 0..10 {
            requests.start("create").done(None);
        }
        requests.start("lookup").done(Some("ENOENT".into()));
        let rows = latencies(&metrics.encode());
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            (rows[0].metric.as_str(), rows[0].op.as_str(), rows[0].count),
            ("fuse_request", "create", 10)
        );
        assert_eq!((rows[1].op.as_str(), rows[1].count), ("lookup", 1));
        assert!(rows[0].p50 <= rows[0].p99 && rows[0].p99 < 1.0, "{rows:?}");
        let table = render(&rows);
        assert!(table.contains("create") && table.contains("p99"), "{table}");
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let buckets = [(1.0, 0.0), (2.0, 10.0), (4.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(&buckets, 0.5), 2.0);
        assert_eq!(quantile(&buckets, 0.25), 1.5);
        assert_eq!(quantile(&buckets, 0.75), 3.0);
        let overflow = [(1.0, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&overflow, 0.9), 1.0);
    }
}
