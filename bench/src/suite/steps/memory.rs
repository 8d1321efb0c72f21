//! The multi-GiB stream through the proxy, whose RSS must stay flat, and the memory table of
//! every step.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use crate::client::Url;
use crate::load;
use crate::suite::meter::{RssSampler, Usage};
use crate::suite::report::{mb, mib};
use crate::suite::{Bench, MIB};

/// The steps whose peak RSS the memory table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemStep {
    Blob,
    Stream1,
    Stream4,
    Huge,
}

/// Peak RSS of the two kache processes in one step.
#[derive(Debug)]
pub struct MemRow {
    /// The row's label.
    pub step: String,
    pub key: MemStep,
    pub proxy: u64,
    pub registry: u64,
}

impl MemRow {
    /// From the usage of the kache proxy server (proxy first, registry second).
    pub fn of(step: String, key: MemStep, u: &Usage) -> Self {
        MemRow {
            step,
            key,
            proxy: u.peak.first().copied().unwrap_or(0),
            registry: u.peak.get(1).copied().unwrap_or(0),
        }
    }
}

/// The multi-GiB stream through the proxy, and the memory table of every step.
pub async fn memory_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        blobs,
        urls,
        meter,
        servers,
        report,
        memory_rows,
        ..
    } = bench;
    let kproxy = &servers.kache_proxy;
    let mut flat: Option<(Vec<(u64, u64)>, usize)> = None;
    if o.wants("memory") {
        eprintln!("{} MiB blob through the proxy, 1 stream", o.huge_mib);
        let url = Url::parse(&urls.blob(kproxy.kind, &blobs.huge), None)?;
        let before = meter.start(kproxy);
        let sampler = RssSampler::start(kproxy.procs.iter().map(|(_, p)| *p).collect());
        let r = load::stream(&url, 1, Duration::ZERO, Duration::from_secs(180)).await?;
        let samples = sampler.stop().await;
        let u = meter.end(kproxy, before);
        // Flat: what the processes hold after the first quarter of the transfer is all they
        // ever hold; a blob buffered whole would grow with every byte.
        let quarter = samples.len() / 4;
        let growth: Vec<(u64, u64)> = (0..kproxy.procs.len())
            .map(|i| {
                let max = |s: &[Vec<u64>]| s.iter().map(|v| v[i]).max().unwrap_or(0);
                (
                    max(&samples[..quarter.max(1).min(samples.len())]),
                    max(&samples),
                )
            })
            .collect();
        flat = Some((growth, samples.len()));
        report.note_errors(
            &format!("{} MiB, kache proxy", o.huge_mib),
            r.errors,
            &r.first_error,
        );
        memory_rows.push(MemRow::of(
            format!(
                "{} MiB blob through the proxy, 1 stream ({} MB/s)",
                o.huge_mib,
                mb(r.bps())
            ),
            MemStep::Huge,
            &u,
        ));
    }
    if !memory_rows.is_empty() {
        let _ = writeln!(
            report.md,
            "### Memory: peak RSS (VmHWM, reset before each step) of the kache processes\n"
        );
        let _ = writeln!(report.md, "| step | kache proxy | kache registry |");
        let _ = writeln!(report.md, "| --- | ---: | ---: |");
        for r in memory_rows.iter() {
            let _ = writeln!(
                report.md,
                "| {} | {} | {} |",
                r.step,
                mib(r.proxy),
                mib(r.registry)
            );
        }
        let _ = writeln!(report.md);
        let find = |k: MemStep| memory_rows.iter().find(|r| r.key == k);
        if let Some(p) = find(MemStep::Blob) {
            report.budget(
                "memory: proxy and registry RSS < 32 MiB under the 1 MiB ×32 load",
                format!("proxy {}, registry {}", mib(p.proxy), mib(p.registry)),
                p.proxy < 32 * MIB && p.registry < 32 * MIB,
            );
        }
        if let Some((g, n)) = &flat {
            let _ = writeln!(
                report.md,
                "While the {} MiB blob streamed ({n} samples of VmRSS, every 50 ms): proxy {} after the first quarter, {} at most; registry {} after the first quarter, {} at most.\n",
                o.huge_mib,
                mib(g[0].0),
                mib(g[0].1),
                mib(g[1].0),
                mib(g[1].1),
            );
            let grew = |(x, y): (u64, u64)| y.saturating_sub(x) <= 4 * MIB;
            report.budget(
                format!(
                    "memory: flat while streaming {} MiB (RSS after the first quarter vs the rest, within 4 MiB)",
                    o.huge_mib
                ),
                format!(
                    "proxy {} → {}, registry {} → {}",
                    mib(g[0].0),
                    mib(g[0].1),
                    mib(g[1].0),
                    mib(g[1].1)
                ),
                *n >= 8 && grew(g[0]) && grew(g[1]),
            );
        }
    }

    Ok(())
}
