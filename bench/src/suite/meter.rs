//! What the servers spend and do while they are measured: CPU time and peak RSS per step, RSS
//! sampled through a transfer, and the counters the upstream's access log and kache's metrics
//! keep.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use http::{HeaderMap, Method};

use super::push::call;
use super::servers::Server;
use crate::client;
use crate::procs;

/// What a server's processes spent during one measurement.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// CPU seconds per process, in `Server::procs` order.
    pub cpu: Vec<f64>,
    /// Peak RSS per process during the step, bytes.
    pub peak: Vec<u64>,
}

impl Usage {
    /// CPU seconds of every process together.
    pub fn cpu_total(&self) -> f64 {
        self.cpu.iter().sum()
    }
}

/// Reads a server's CPU time and peak RSS around a measurement.
#[derive(Debug)]
pub struct Meter {
    ticks_per_s: f64,
}

impl Meter {
    /// A meter in this machine's clock ticks.
    pub fn new() -> Self {
        Meter {
            ticks_per_s: procs::clock_ticks() as f64,
        }
    }

    /// Resets the peak RSS of `s`'s processes and notes their CPU time so far.
    pub fn start(&self, s: &Server) -> Vec<u64> {
        if s.track_memory {
            for (_, pid) in &s.procs {
                let _ = procs::reset_peak(*pid);
            }
        }
        s.procs.iter().map(|(_, p)| procs::tree_ticks(*p)).collect()
    }

    /// What `s` spent since [`Meter::start`] answered `before`.
    pub fn end(&self, s: &Server, before: Vec<u64>) -> Usage {
        let cpu = s
            .procs
            .iter()
            .zip(before)
            .map(|((_, p), b)| procs::tree_ticks(*p).saturating_sub(b) as f64 / self.ticks_per_s)
            .collect();
        let peak = if s.track_memory {
            s.procs
                .iter()
                .map(|(_, p)| procs::memory(*p).map_or(0, |m| m.1))
                .collect()
        } else {
            Vec::new()
        };
        Usage { cpu, peak }
    }

    /// Runs `measurement` between [`Meter::start`] and [`Meter::end`].
    pub async fn measure<T>(
        &self,
        s: &Server,
        measurement: impl Future<Output = Result<T>>,
    ) -> Result<(T, Usage)> {
        let before = self.start(s);
        let r = measurement.await?;
        Ok((r, self.end(s, before)))
    }
}

/// The middle one of `v` by `key` (the upper of the two middle ones of an even count).
pub fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = v.len() / 2;
    v.swap_remove(mid)
}

/// Samples VmRSS of some processes every 50 ms until stopped.
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Vec<u64>>>,
}

impl RssSampler {
    /// Starts sampling `pids`.
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            // Bounded: 180 s of samples at most.
            for _ in 0..3600 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                samples.push(
                    pids.iter()
                        .map(|p| procs::memory(*p).map_or(0, |m| m.0))
                        .collect(),
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        });
        RssSampler { stop, task }
    }

    /// The samples, oldest first, each one with an RSS per pid in the order given.
    pub async fn stop(self) -> Vec<Vec<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Counts access-log lines of the upstream distribution; waits until the log stops growing
/// (a line is written once its response is complete).
pub fn count_log(path: &Path, method: &str, needle: &str) -> usize {
    let count = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(needle))
            .count()
    };
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = count();
    let mut stable_since = Instant::now();
    while Instant::now() < until && stable_since.elapsed() < Duration::from_millis(700) {
        std::thread::sleep(Duration::from_millis(100));
        let n = count();
        if n != last {
            last = n;
            stable_since = Instant::now();
        }
    }
    last
}

/// Sum of the samples of `metric` whose labels include every `k="v"` of `labels`.
pub async fn metric(url: &str, metric: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let (_, _, text) = call(url, Method::GET, &HeaderMap::new(), client::empty()).await?;
    let text = String::from_utf8_lossy(&text);
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if labels
            .iter()
            .all(|(k, v)| labels_text.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok(sum)
}
