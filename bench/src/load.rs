//! The three measurements: many connections hammering one URL, whole-body downloads on a few
//! streams, and clients pulling one URL at the same instant. Each is bounded in time and stops
//! by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderMap, Method};
use tokio::task::JoinSet;

use crate::client::{self, Conn, Url};

/// Extra time an in-flight request gets after the deadline before it is abandoned.
const GRACE: Duration = Duration::from_secs(30);

/// What [`load`] sends.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub url: Url,
    pub method: Method,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub connections: usize,
    /// How long to send new requests.
    pub duration: Duration,
    /// Stop after this many requests (across connections), if sooner than `duration`.
    pub requests: Option<u64>,
    /// Open loop: this many requests per second in all, spread evenly over the connections,
    /// instead of back to back. A request that could not be sent on time because the previous
    /// answer was late has its latency counted from its scheduled time, so it counts that wait
    /// too.
    pub rate: Option<f64>,
}

/// Latencies in microseconds, 1 µs to 10 minutes, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests answered 2xx with their whole body read.
    pub ok: u64,
    /// Connection failures, timeouts, and non-2xx answers.
    pub errors: u64,
    pub first_error: Option<String>,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Latency of 2xx requests, request sent to last body byte, in µs.
    pub hist: Histogram<u64>,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    /// Bytes per second (decimal MB/s is `/ 1e6`).
    pub fn bps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
    /// Latency at quantile `q` (0..=1) in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }
}

#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    bytes: u64,
}

impl Tally {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// Takes one request from the shared budget; false when it is spent.
fn take(budget: &Option<Arc<AtomicU64>>) -> bool {
    budget.as_ref().is_none_or(|b| {
        b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    })
}

/// When a paced connection sends its requests: from `first`, every `interval`.
#[derive(Clone, Copy, Debug)]
struct Pace {
    first: Instant,
    interval: Duration,
}

/// Each connection's schedule for `rate` requests/s in all (`None`: back to back), staggered so
/// that requests arrive evenly rather than in bursts of `connections`.
fn paces(connections: usize, rate: Option<f64>, started: Instant) -> Result<Vec<Option<Pace>>> {
    let interval = match rate {
        Some(r) if !(r.is_finite() && r > 0.0) => bail!("the rate must be a positive number"),
        Some(r) => Some(Duration::from_secs_f64(connections as f64 / r)),
        None => None,
    };
    Ok((0..connections)
        .map(|i| {
            interval.map(|interval| Pace {
                first: started + interval.mul_f64(i as f64 / connections as f64),
                interval,
            })
        })
        .collect())
}

async fn connection(
    spec: Arc<LoadSpec>,
    deadline: Instant,
    budget: Option<Arc<AtomicU64>>,
    pace: Option<Pace>,
) -> (Tally, Histogram<u64>) {
    let mut tally = Tally::default();
    let mut hist = histogram();
    let mut conn: Option<Conn> = None;
    let hard = tokio::time::Instant::from_std(deadline + GRACE);
    let mut next = pace.map(|p| p.first);
    while next.unwrap_or_else(Instant::now) < deadline && take(&budget) {
        // Behind schedule (the previous answer came late): the wait counts, from the scheduled
        // time. Ahead: the timer wakes up to a millisecond late, which is the client's doing,
        // so the latency runs from the actual send.
        let mut late_since = None;
        if let Some(at) = next {
            if Instant::now() >= at {
                late_since = Some(at);
            } else {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
            }
        }
        if conn.as_ref().is_none_or(Conn::is_closed) {
            conn = None;
            match spec.url.endpoint.connect().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tally.error(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let req = match spec.url.endpoint.request(
            spec.method.clone(),
            &spec.url.path,
            &spec.headers,
            client::full(spec.body.clone()),
        ) {
            Ok(r) => r,
            Err(e) => {
                tally.error(format!("{e:#}"));
                break;
            }
        };
        let started = late_since.unwrap_or_else(Instant::now);
        if let (Some(at), Some(p)) = (next.as_mut(), pace) {
            *at += p.interval;
        }
        let answer = tokio::time::timeout_at(hard, async {
            let resp = c.send(req).await?;
            let status = resp.status();
            let (n, _) = client::drain(resp).await?;
            anyhow::Ok((status, n))
        })
        .await;
        match answer {
            Ok(Ok((status, n))) if status.is_success() => {
                let us = started.elapsed().as_micros().max(1) as u64;
                hist.saturating_record(us);
                tally.ok += 1;
                tally.bytes += n;
            }
            Ok(Ok((status, _))) => tally.error(format!("HTTP {status}")),
            Ok(Err(e)) => {
                tally.error(format!("{e:#}"));
                conn = None;
            }
            Err(_) => {
                tally.error("no answer within the grace time after the deadline");
                break;
            }
        }
    }
    (tally, hist)
}

/// `connections` connections send requests back to back until `duration` is over (or the
/// request budget is spent).
pub async fn load(spec: LoadSpec) -> Result<LoadResult> {
    if spec.connections == 0 {
        bail!("at least one connection");
    }
    let spec = Arc::new(spec);
    let budget = spec.requests.map(|n| Arc::new(AtomicU64::new(n)));
    let started = Instant::now();
    let deadline = started + spec.duration;
    let paces = paces(spec.connections, spec.rate, started)?;
    let mut set = JoinSet::new();
    for pace in paces {
        set.spawn(connection(spec.clone(), deadline, budget.clone(), pace));
    }
    let mut out = LoadResult {
        ok: 0,
        errors: 0,
        first_error: None,
        bytes: 0,
        elapsed: Duration::ZERO,
        hist: histogram(),
    };
    while let Some(r) = set.join_next().await {
        let (t, h) = r?;
        out.ok += t.ok;
        out.errors += t.errors;
        out.bytes += t.bytes;
        if out.first_error.is_none() {
            out.first_error = t.first_error;
        }
        out.hist.add(&h)?;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct StreamResult {
    pub downloads: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl StreamResult {
    pub fn bps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64()
    }
}

/// `streams` connections each download `url` whole, again and again, until `duration` is over
/// (every stream finishes at least one download; `limit` bounds any single one).
pub async fn stream(
    url: &Url,
    streams: usize,
    duration: Duration,
    limit: Duration,
) -> Result<StreamResult> {
    if streams == 0 {
        bail!("at least one stream");
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = JoinSet::new();
    for _ in 0..streams {
        let url = url.clone();
        set.spawn(async move {
            let mut tally = Tally::default();
            let mut downloads = 0u64;
            let mut conn: Option<Conn> = None;
            loop {
                let one = async {
                    if conn.as_ref().is_none_or(Conn::is_closed) {
                        conn = Some(url.endpoint.connect().await?);
                    }
                    let c = conn.as_mut().expect("connected just above");
                    let req = url.endpoint.request(
                        Method::GET,
                        &url.path,
                        &HeaderMap::new(),
                        client::empty(),
                    )?;
                    let resp = c.send(req).await?;
                    let status = resp.status();
                    let (n, _) = client::drain(resp).await?;
                    if !status.is_success() {
                        bail!("HTTP {status}");
                    }
                    anyhow::Ok(n)
                };
                match tokio::time::timeout(limit, one).await {
                    Ok(Ok(n)) => {
                        downloads += 1;
                        tally.bytes += n;
                    }
                    Ok(Err(e)) => {
                        tally.error(format!("{e:#}"));
                        conn = None;
                    }
                    Err(_) => {
                        tally.error(format!("a download took longer than {limit:?}"));
                        break;
                    }
                }
                if Instant::now() >= deadline || tally.errors > 3 {
                    break;
                }
            }
            (tally, downloads)
        });
    }
    let mut out = StreamResult {
        downloads: 0,
        bytes: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    while let Some(r) = set.join_next().await {
        let (t, d) = r?;
        out.downloads += d;
        out.bytes += t.bytes;
        out.errors += t.errors;
        if out.first_error.is_none() {
            out.first_error = t.first_error;
        }
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

/// One client of a [`cold`] run.
#[derive(Debug, Clone)]
pub struct ColdPull {
    pub ttfb: Duration,
    pub total: Duration,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ColdResult {
    pub pulls: Vec<ColdPull>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl ColdResult {
    fn pick(&self, f: impl Fn(&ColdPull) -> Duration, q: f64) -> Duration {
        let mut v: Vec<Duration> = self.pulls.iter().map(f).collect();
        v.sort();
        if v.is_empty() {
            return Duration::ZERO;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
    pub fn ttfb(&self, q: f64) -> Duration {
        self.pick(|p| p.ttfb, q)
    }
    pub fn total(&self, q: f64) -> Duration {
        self.pick(|p| p.total, q)
    }
    pub fn min_bytes(&self) -> u64 {
        self.pulls.iter().map(|p| p.bytes).min().unwrap_or(0)
    }
}

/// `clients` connections are opened, then all send `GET url` at the same instant; each
/// reports when its first body byte and its last arrived.
pub async fn cold(url: &Url, clients: usize, limit: Duration) -> Result<ColdResult> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(url.endpoint.connect().await?);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let mut set = JoinSet::new();
    for mut c in conns {
        let url = url.clone();
        let barrier = barrier.clone();
        set.spawn(async move {
            let req =
                url.endpoint
                    .request(Method::GET, &url.path, &HeaderMap::new(), client::empty())?;
            barrier.wait().await;
            let t0 = Instant::now();
            let pull = async {
                let resp = c.send(req).await?;
                let status = resp.status();
                let (bytes, first) = client::drain(resp).await?;
                if !status.is_success() {
                    bail!("HTTP {status}");
                }
                let total = t0.elapsed();
                Ok(ColdPull {
                    ttfb: first.map_or(total, |f| f - t0),
                    total,
                    bytes,
                })
            };
            match tokio::time::timeout(limit, pull).await {
                Ok(r) => r,
                Err(_) => bail!("no complete answer within {limit:?}"),
            }
        });
    }
    let mut out = ColdResult {
        pulls: Vec::new(),
        errors: 0,
        first_error: None,
    };
    while let Some(r) = set.join_next().await {
        match r? {
            Ok(p) => out.pulls.push(p),
            Err(e) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_spread_evenly_over_the_connections() {
        let t0 = Instant::now();
        let p = paces(4, Some(1000.0), t0).unwrap();
        // 4 connections at 1,000/s in all: each sends every 4 ms, 1 ms after the previous one.
        let p: Vec<_> = p.into_iter().map(Option::unwrap).collect();
        assert!(p.iter().all(|p| p.interval == Duration::from_millis(4)));
        let offsets: Vec<_> = p.iter().map(|p| p.first - t0).collect();
        assert_eq!(
            offsets,
            [0, 1, 2, 3].map(Duration::from_millis).to_vec(),
            "{offsets:?}"
        );
        assert!(paces(3, None, t0).unwrap().iter().all(Option::is_none));
        for bad in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            assert!(paces(3, Some(bad), t0).is_err(), "{bad}");
        }
    }
}
