//! The scale step: a store of 100,000 blobs in 10,000 repositories, left as an unclean stop
//! leaves it (temporary files, blob files the index never recorded). How long `kache registry`
//! takes to answer on it, recovery included; its memory; tag-list pages of a repository with
//! 10,000 tags, the first and a deep one; and `kache fsck` over all of it, with its progress.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, Method};
use kache_store::fixtures;

use super::fixtures::{digest_of, kache_blob_file};
use super::report::{mib, secs, thousands};
use super::servers::kache_command;
use super::synthetic::{StoreRegistry, make_store, start_registry};
use super::{Bench, MIB};
use crate::client::Url;
use crate::load::{self, LoadResult, LoadSpec};
use crate::procs;

/// Temporary files and unrecorded blob files the step leaves, as a crash mid-write would.
const TEMP_FILES: usize = 100;
const ORPHANS: usize = 1_000;

pub(super) async fn scale_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        pids,
        report,
        ..
    } = bench;
    if !o.wants("scale") {
        return Ok(());
    }
    let dir = work.join("kache-scale");
    std::fs::create_dir_all(&dir)?;
    // One image a repository: a config and 9 layers, one of them from a pool of shared ones.
    let images = o.scale_repositories;
    let spec = fixtures::Spec {
        manifests: images,
        layers: 9,
        shared: 1,
        shared_pool: (images / 10).max(1),
        repositories: images,
        untagged_every: 0,
        blob_size: 1024,
        age_secs: 2 * 86400,
        extra_tags: o.scale_tags,
    };
    let (data, made) = make_store("scale", &dir, &spec, leave_unclean).await?;
    let blobs = made.blobs + ORPHANS;
    let cold = procs::drop_page_cache();
    let StoreRegistry {
        proc: mut registry,
        base,
        ready,
        ..
    } = start_registry(kache, &data, &dir, pids, "kache-registry-scale", &[]).await?;
    let (rss_ready, _) = procs::memory(registry.pid).unwrap_or_default();
    let log = std::fs::read_to_string(&registry.stderr)?;
    let repaired = log.contains(&format!("orphan_blobs_adopted: {ORPHANS}"))
        && log.contains(&format!("temp_files_removed: {TEMP_FILES}"));

    let repo = &made.sample.0;
    let deep = format!("t{:05}", o.scale_tags.saturating_sub(101));
    let pages = [
        ("first page (n=100)".to_owned(), "n=100".to_owned()),
        (
            format!("deep page (n=100, last={deep})"),
            format!("n=100&last={deep}"),
        ),
        ("whole list (no n)".to_owned(), String::new()),
    ];
    let mut rows: Vec<(&str, LoadResult, usize)> = Vec::new();
    for (what, query) in &pages {
        let url = format!("{base}/v2/{repo}/tags/list?{query}");
        let (_, _, body) =
            super::push::call(&url, Method::GET, &HeaderMap::new(), crate::client::empty()).await?;
        let tags = serde_json::from_slice::<serde_json::Value>(&body)
            .with_context(|| format!("GET {url}"))?["tags"]
            .as_array()
            .map_or(0, Vec::len);
        eprintln!("scale: tag list, {what}: {tags} tags");
        let spec = LoadSpec {
            url: Url::parse(&url, None)?,
            method: Method::GET,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            connections: o.connections,
            duration: o.duration,
            requests: None,
            rate: None,
        };
        let r = load::load(spec).await?;
        report.note_errors(&format!("scale step, {what}"), r.errors, &r.first_error);
        rows.push((what, r, tags));
    }
    let (_, peak) = procs::memory(registry.pid).unwrap_or_default();
    registry.check_alive()?;
    registry.stop();

    eprintln!("scale: kache fsck");
    let fsck_cold = procs::drop_page_cache();
    let t = Instant::now();
    let fsck = {
        let (kache, data) = (kache.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            kache_command(&kache)
                .arg("fsck")
                .arg("--data-dir")
                .arg(&data)
                .env("NO_COLOR", "1")
                .output()
        })
        .await
        .map_err(|e| anyhow!("{e}"))??
    };
    let fsck_time = t.elapsed();
    let stdout = String::from_utf8_lossy(&fsck.stdout);
    let progress = String::from_utf8_lossy(&fsck.stderr)
        .lines()
        .filter(|l| l.starts_with("fsck: checked"))
        .count();
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("blobs:"))
        .unwrap_or("")
        .to_owned();
    if !fsck.status.success() {
        bail!("kache fsck failed on the scale store: {stdout}");
    }

    let _ = writeln!(
        report.md,
        "### Scale: a store of {} blobs in {} repositories\n",
        thousands(blobs as f64),
        thousands(made.repositories as f64)
    );
    let _ = writeln!(
        report.md,
        "One image a repository (a config and 9 layers of 1 KiB, one layer from a pool of {} shared ones), {} more tags on one of them; left as a crash leaves a store: {TEMP_FILES} temporary files and {ORPHANS} blob files the index never recorded. `kache registry` answered `/v2/` {} after it was started on it{}, recovery included ({}); RSS then {}, peak (VmHWM) over the step {}.\n",
        thousands(spec.shared_pool as f64),
        thousands(o.scale_tags as f64),
        secs(ready),
        cache_state(cold),
        if repaired {
            "its log shows both repaired"
        } else {
            "its log does not show the repair"
        },
        mib(rss_ready),
        mib(peak),
    );
    let _ = writeln!(
        report.md,
        "| tag list of the {}-tag repository | tags | req/s | p50 ms | p99 ms |",
        thousands((o.scale_tags + 1) as f64)
    );
    let _ = writeln!(report.md, "| --- | ---: | ---: | ---: | ---: |");
    for (what, r, tags) in &rows {
        let _ = writeln!(
            report.md,
            "| {what} | {tags} | {} | {:.2} | {:.2} |",
            thousands(r.rps()),
            r.ms(0.5),
            r.ms(0.99)
        );
    }
    let _ = writeln!(
        report.md,
        "\n{} connections, {:?} a row. `kache fsck` (registry stopped) checked the store in {}{}: `{summary}`, with {progress} progress lines on the way.\n",
        o.connections,
        o.duration,
        secs(fsck_time),
        cache_state(fsck_cold),
    );

    report.budget(
        format!(
            "scale: registry answers within 5 s on {} blobs, recovery included",
            thousands(blobs as f64)
        ),
        secs(ready),
        ready < Duration::from_secs(5) && repaired,
    );
    report.budget(
        "scale: registry RSS under 64 MiB",
        format!("peak {}", mib(peak)),
        peak < 64 * MIB,
    );
    if let [(_, first, _), (_, deep, _), _] = rows.as_slice() {
        report.budget(
            "scale: a deep tag-list page is as fast as the first (p99 within 1.5×)",
            format!("{:.2} ms vs {:.2} ms", deep.ms(0.99), first.ms(0.99)),
            deep.ms(0.99) <= 1.5 * first.ms(0.99),
        );
    }
    report.budget(
        "scale: kache fsck reports progress and finds the store sound",
        format!("{progress} progress lines; {summary}"),
        progress >= 2 && summary.contains(&format!("blobs: {blobs} ")),
    );
    Ok(())
}

/// Leaves `data` as a crash leaves it: temporary files of writes that never finished, and blob
/// files renamed into place whose index commit never happened.
fn leave_unclean(data: &Path) -> Result<()> {
    for i in 0..TEMP_FILES {
        std::fs::write(data.join("tmp").join(format!("crashed-{i}")), [0u8; 512])?;
    }
    for i in 0..ORPHANS {
        let bytes = format!("a blob written just before the crash, number {i}");
        let file = kache_blob_file(data, &digest_of(bytes.as_bytes()));
        std::fs::create_dir_all(file.parent().expect("blob files have a parent"))?;
        std::fs::write(file, bytes)?;
    }
    Ok(())
}

/// How the page cache was when something was timed.
fn cache_state(dropped: bool) -> &'static str {
    if dropped {
        " with the page cache dropped (as after a reboot)"
    } else {
        " with the page cache as it was (dropping it needs root)"
    }
}
