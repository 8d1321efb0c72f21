//! The garbage-collection step: a store of 100,000 blobs and 10,000 manifests (a fifth of them
//! untagged, so there is garbage), a registry started on it, warm blob and manifest pulls
//! without a collection and then during collections run back to back, and what a collection
//! costs: its time and the registry's peak RSS.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use kache_store::fixtures;

use super::meter::median_by;
use super::push::call;
use super::report::{mib, ratio, secs, thousands};
use super::synthetic::{StoreRegistry, make_store, start_registry};
use super::{ACCEPT, Bench, MIB};
use crate::client::{self, Url};
use crate::load::{self, LoadSpec};
use crate::procs;

/// What the collections of one window did.
#[derive(Debug, Default)]
struct Collections {
    runs: u64,
    removed_blobs: u64,
    removed_bytes: u64,
    /// Seconds of each run, in order.
    seconds: Vec<f64>,
    /// Seconds each run worked (without its rests), in order.
    worked: Vec<f64>,
}

/// Runs collections back to back on `internal` until `stop`, `max` at most.
async fn collect_until(internal: String, stop: Arc<AtomicBool>, max: u64) -> Result<Collections> {
    let mut c = Collections::default();
    while !stop.load(Ordering::Relaxed) && c.runs < max {
        let url = format!("{internal}/kache/v1/gc");
        let (status, _, body) =
            call(&url, Method::POST, &HeaderMap::new(), client::empty()).await?;
        if status != StatusCode::OK {
            bail!("POST {url}: {status} {}", String::from_utf8_lossy(&body));
        }
        let r: serde_json::Value = serde_json::from_slice(&body)?;
        c.runs += 1;
        c.removed_blobs += r["removedBlobs"].as_u64().unwrap_or(0);
        c.removed_bytes += r["removedBytes"].as_u64().unwrap_or(0);
        c.seconds.push(r["durationSeconds"].as_f64().unwrap_or(0.0));
        c.worked.push(r["workedSeconds"].as_f64().unwrap_or(0.0));
    }
    Ok(c)
}

pub(super) async fn gc_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        pids,
        report,
        ..
    } = bench;
    if !o.wants("gc") {
        return Ok(());
    }
    let dir = work.join("kache-gc");
    std::fs::create_dir_all(&dir)?;
    // 10,000 manifests of a config and 9 layers, one of them from a pool of 1,000 shared ones:
    // 10,000 + 10,000 + 80,000 + 1,000 blobs.
    let spec = fixtures::Spec {
        manifests: o.gc_manifests,
        layers: 9,
        shared: 1,
        shared_pool: (o.gc_manifests / 10).max(1),
        repositories: (o.gc_manifests / 10).max(1),
        untagged_every: 5,
        blob_size: 1024,
        age_secs: 2 * 86400,
        extra_tags: 0,
    };
    let (data, made) = make_store("gc", &dir, &spec, |_| Ok(())).await?;
    let StoreRegistry {
        proc: mut registry,
        base,
        internal,
        ready,
    } = start_registry(kache, &data, &dir, pids, "kache-registry-gc", &[]).await?;

    let (repo, tag, _, layer) = &made.sample;
    let mut accept = HeaderMap::new();
    accept.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    let pulls = [
        (
            "warm blob (1 KiB)",
            format!("{base}/v2/{repo}/blobs/{layer}"),
            HeaderMap::new(),
        ),
        (
            "warm manifest by tag",
            format!("{base}/v2/{repo}/manifests/{tag}"),
            accept,
        ),
    ];
    let spec_for = |url: &str, headers: &HeaderMap| -> Result<LoadSpec> {
        Ok(LoadSpec {
            url: Url::parse(url, None)?,
            method: Method::GET,
            headers: headers.clone(),
            body: Bytes::new(),
            connections: o.connections,
            duration: o.duration,
            requests: None,
            rate: None,
        })
    };
    // The collection alone: what it costs in time and memory.
    eprintln!("gc: one collection alone");
    let _ = procs::reset_peak(registry.pid);
    let alone = collect_until(internal.clone(), Arc::new(AtomicBool::new(false)), 1).await?;
    let alone_peak = procs::memory(registry.pid).map_or(0, |m| m.1);

    // Pulls without a collection and during collections run back to back, each "during" cell
    // starting with new garbage: tags of 1,000 images removed just before, so its first
    // collection sweeps 10,000 blobs while the pulls go on.
    let mut doomed_tags = (0..made.manifests)
        .rev()
        .filter(|m| m % spec.untagged_every != 0)
        .map(|m| {
            (
                made.repositories_names[m % made.repositories_names.len()].clone(),
                format!("v{m}"),
            )
        })
        .filter(|(r, t)| !(r == repo && t == tag));
    let mut rows = Vec::new();
    let mut peak_loaded = 0u64;
    let mut marking = Vec::new();
    let mut marking_worked = Vec::new();
    let mut swept = 0u64;
    for (what, url, headers) in &pulls {
        let mut rounds = Vec::new();
        for round in 0..o.rounds {
            eprintln!(
                "gc: {what}, {} connections, round {}",
                o.connections,
                round + 1
            );
            let warm = load::load(LoadSpec {
                requests: Some(o.connections as u64 * 4),
                ..spec_for(url, headers)?
            })
            .await?;
            report.note_errors(
                &format!("gc step warm-up, {what}"),
                warm.errors,
                &warm.first_error,
            );
            let without = load::load(spec_for(url, headers)?).await?;
            report.note_errors(
                &format!("gc step, {what}"),
                without.errors,
                &without.first_error,
            );

            for (r, t) in doomed_tags.by_ref().take(1000) {
                let url = format!("{internal}/v2/{r}/manifests/{t}");
                let (status, _, _) =
                    call(&url, Method::DELETE, &HeaderMap::new(), client::empty()).await?;
                if status != StatusCode::ACCEPTED {
                    bail!("DELETE {url}: {status}");
                }
            }
            let _ = procs::reset_peak(registry.pid);
            let stop = Arc::new(AtomicBool::new(false));
            let collector = tokio::spawn(collect_until(internal.clone(), stop.clone(), 1000));
            let during = load::load(spec_for(url, headers)?).await?;
            stop.store(true, Ordering::Relaxed);
            let c = collector.await.map_err(|e| anyhow!("{e}"))??;
            peak_loaded = peak_loaded.max(procs::memory(registry.pid).map_or(0, |m| m.1));
            report.note_errors(
                &format!("gc step during collections, {what}"),
                during.errors,
                &during.first_error,
            );
            eprintln!(
                "  p99 {:.2} ms without, {:.2} ms during {} collections",
                without.ms(0.99),
                during.ms(0.99),
                c.runs
            );
            swept += c.removed_blobs;
            marking.extend(c.seconds.iter().skip(1).copied());
            marking_worked.extend(c.worked.iter().skip(1).copied());
            rounds.push((without, during, c.runs));
        }
        let (without, during, runs) = median_by(rounds, |(w, d, _)| d.ms(0.99) / w.ms(0.99));
        rows.push((*what, without, during, runs));
    }
    registry.check_alive()?;
    registry.stop();

    let _ = writeln!(
        report.md,
        "### Garbage collection: a store of {} blobs and {} manifests\n",
        thousands(made.blobs as f64),
        thousands(made.manifests as f64)
    );
    let _ = writeln!(
        report.md,
        "{} repositories; one manifest in five untagged (with its config and own layers: {} blobs of garbage). The registry answered `/v2/` {} after it was started on the store. {} connections, {:?} per cell; during: collections back to back on the internal listener for the whole cell, the first sweeping new garbage.\n",
        thousands(made.repositories as f64),
        thousands(made.garbage_blobs as f64),
        secs(ready),
        o.connections,
        o.duration
    );
    let _ = writeln!(
        report.md,
        "| pulls | without: req/s | p50 ms | p99 ms | during: req/s | p50 ms | p99 ms | collections | p99 during / without |"
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (what, without, during, runs) in &rows {
        let _ = writeln!(
            report.md,
            "| {what} | {} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {runs} | {} |",
            thousands(without.rps()),
            without.ms(0.5),
            without.ms(0.99),
            thousands(during.rps()),
            during.ms(0.5),
            during.ms(0.99),
            ratio(during.ms(0.99), without.ms(0.99)),
        );
    }
    let median = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            median_by(v.to_vec(), |s| *s)
        }
    };
    let _ = writeln!(
        report.md,
        "\nOne collection alone removed {} blobs ({}) in {:.2} s, of which it worked {:.2} s (the registry's default `--gc-cpu 10%`); registry peak RSS (VmHWM) during it {}. During the pulls, each cell's first collection swept the 10,000 blobs of the 1,000 images untagged before it ({} blobs in all); the later ones, with nothing left to sweep, marked the store in {:.2} s, {:.2} s of work (medians of {}). Peak RSS with the pulls: {}. Medians of {} round(s), by the ratio.\n",
        thousands(alone.removed_blobs as f64),
        mib(alone.removed_bytes),
        alone.seconds.first().copied().unwrap_or(0.0),
        alone.worked.first().copied().unwrap_or(0.0),
        mib(alone_peak),
        thousands(swept as f64),
        median(&marking),
        median(&marking_worked),
        marking.len(),
        mib(peak_loaded),
        o.rounds,
    );
    for (what, without, during, _) in &rows {
        report.budget(
            format!("gc: {what} p99 during collections ≤ 1.2× without"),
            format!("{:.2} ms vs {:.2} ms", during.ms(0.99), without.ms(0.99)),
            during.ms(0.99) <= 1.2 * without.ms(0.99),
        );
    }
    report.budget(
        format!(
            "gc: registry RSS under 64 MiB collecting {} blobs",
            thousands(made.blobs as f64)
        ),
        mib(alone_peak),
        alone_peak < 64 * MIB,
    );
    report.budget(
        "gc: the collection removed exactly the garbage",
        format!("{} of {} blobs", alone.removed_blobs, made.garbage_blobs),
        alone.removed_blobs as usize == made.garbage_blobs,
    );
    Ok(())
}
