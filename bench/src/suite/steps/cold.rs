//! Cold pulls, where the cache does not hold the blob yet: one client of the large blob, then
//! many clients of one blob at once, and how often each path asked the upstream.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::Url;
use crate::load::{self, ColdResult};
use crate::suite::fixtures::Blob;
use crate::suite::meter::count_log;
use crate::suite::report::{mb, ratio, secs};
use crate::suite::{Bench, REPO};

/// Cold pulls: one client of each large blob, then N clients of one blob at once.
pub async fn cold_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        blobs,
        urls,
        report,
        ..
    } = bench;
    let (upstream_url, proxy_url, dproxy_url, kache_repo, upstream_log) = (
        &urls.upstream,
        &urls.proxy,
        &urls.dproxy,
        &urls.kache_repo,
        &urls.upstream_log,
    );
    if !o.wants("cold") {
        return Ok(());
    }
    // One client of each single blob: `--big-mib`, and `--cold-huge-mib` unless it is 0.
    let mut sizes: Vec<(u64, &Blob)> = vec![(o.big_mib, &blobs.cold)];
    if o.cold_huge_mib > 0 {
        sizes.push((o.cold_huge_mib, &blobs.cold_huge));
    }
    // The upstream's files into the page cache first: every path then reads them from
    // memory, and none pays for a disk read the others skip.
    for blob in sizes.iter().map(|(_, b)| *b).chain([&blobs.cold_many]) {
        let hex = blob.digest.trim_start_matches("sha256:");
        let data = work
            .join("upstream/storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data");
        let mut f = std::fs::File::open(&data)
            .with_context(|| format!("the upstream's copy of {}", blob.digest))?;
        std::io::copy(&mut f, &mut std::io::sink())?;
    }
    let get_count = |d: &str| count_log(upstream_log, "GET", &format!("/blobs/{d}"));
    let head_count = |d: &str| count_log(upstream_log, "HEAD", &format!("/blobs/{d}"));
    let limit = Duration::from_secs(300);
    let _ = writeln!(
        report.md,
        "### Cold pulls (the cache does not hold the blob)\n"
    );
    // Each single blob through each path: (MiB, upstream alone, kache, distribution's proxy).
    let mut singles: Vec<(u64, ColdResult, ColdResult, ColdResult)> = Vec::new();
    for (mib, blob) in sizes {
        eprintln!("cold {mib} MiB blob");
        let _ = writeln!(
            report.md,
            "One client, {mib} MiB blob:\n\n| path | first byte | complete | MB/s | vs. the upstream alone | upstream GETs (HEADs) |"
        );
        let _ = writeln!(report.md, "| --- | ---: | ---: | ---: | ---: | ---: |");
        let paths: [(&str, String); 3] = [
            (
                "straight from the upstream distribution",
                format!("{upstream_url}/v2/{REPO}/blobs/{}", blob.digest),
            ),
            (
                "kache proxy → kache registry → upstream",
                format!("{proxy_url}/v2/{kache_repo}/blobs/{}", blob.digest),
            ),
            (
                "distribution proxy → upstream",
                format!("{dproxy_url}/v2/{REPO}/blobs/{}", blob.digest),
            ),
        ];
        let mut results = Vec::new();
        for (label, url) in &paths {
            let (g0, h0) = (get_count(&blob.digest), head_count(&blob.digest));
            let r = load::cold(&Url::parse(url, None)?, 1, limit).await?;
            let (g1, h1) = (get_count(&blob.digest), head_count(&blob.digest));
            report.note_errors(
                &format!("cold {mib} MiB, {label}"),
                r.errors,
                &r.first_error,
            );
            if r.min_bytes() != blob.size && r.errors == 0 {
                report.note(format!(
                    "cold {mib} MiB, {label}: got {} bytes of {}",
                    r.min_bytes(),
                    blob.size
                ));
            }
            eprintln!(
                "  {label}: first byte {}, complete {}",
                secs(r.ttfb(0.5)),
                secs(r.total(0.5))
            );
            let direct = results
                .first()
                .map_or(r.total(0.5), |d: &ColdResult| d.total(0.5));
            let _ = writeln!(
                report.md,
                "| {label} | {} | {} | {} | {} | {} ({}) |",
                secs(r.ttfb(0.5)),
                secs(r.total(0.5)),
                mb(blob.size as f64 / r.total(0.5).as_secs_f64().max(1e-9)),
                ratio(r.total(0.5).as_secs_f64(), direct.as_secs_f64()),
                g1 - g0,
                h1 - h0
            );
            results.push(r);
        }
        let _ = writeln!(report.md);
        let mut it = results.into_iter();
        let (up, k, dp) = (
            it.next().expect("three paths"),
            it.next().expect("three paths"),
            it.next().expect("three paths"),
        );
        singles.push((mib, up, k, dp));
    }

    eprintln!(
        "{} concurrent cold pulls of one {} MiB blob",
        o.cold_clients, o.cold_clients_mib
    );
    // What one client gets straight from the upstream: the time the many are held to.
    let d = &blobs.cold_many.digest;
    let direct_many = load::cold(
        &Url::parse(&format!("{upstream_url}/v2/{REPO}/blobs/{d}"), None)?,
        1,
        limit,
    )
    .await?;
    let _ = writeln!(
        report.md,
        "{} clients at once, one {} MiB blob (one client straight from the upstream: {}):\n\n| path | first byte p50 | first byte max | complete p50 | complete max | max vs. one client from the upstream | errors | upstream GETs (HEADs) |",
        o.cold_clients,
        o.cold_clients_mib,
        secs(direct_many.total(0.5))
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut many = Vec::new();
    for (label, url) in [
        (
            "kache proxy → kache registry → upstream",
            format!("{proxy_url}/v2/{kache_repo}/blobs/{d}"),
        ),
        (
            "distribution proxy → upstream",
            format!("{dproxy_url}/v2/{REPO}/blobs/{d}"),
        ),
    ] {
        let (g0, h0) = (get_count(d), head_count(d));
        let r = load::cold(&Url::parse(&url, None)?, o.cold_clients, limit).await?;
        let (g1, h1) = (get_count(d), head_count(d));
        report.note_errors(
            &format!("cold ×{}, {label}", o.cold_clients),
            r.errors,
            &r.first_error,
        );
        eprintln!(
            "  {label}: complete max {}, upstream GETs {}",
            secs(r.total(1.0)),
            g1 - g0
        );
        let _ = writeln!(
            report.md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} ({}) |",
            secs(r.ttfb(0.5)),
            secs(r.ttfb(1.0)),
            secs(r.total(0.5)),
            secs(r.total(1.0)),
            ratio(
                r.total(1.0).as_secs_f64(),
                direct_many.total(0.5).as_secs_f64()
            ),
            r.errors,
            g1 - g0,
            h1 - h0
        );
        many.push((r, g1 - g0));
    }
    let _ = writeln!(report.md);

    for (mib, up, k, dp) in &singles {
        report.budget(
            format!("cold {mib} MiB: the first byte within 50 ms"),
            format!("{} (complete {})", secs(k.ttfb(0.5)), secs(k.total(0.5))),
            k.errors == 0 && k.ttfb(0.5) <= Duration::from_millis(50),
        );
        report.budget(
            format!("cold {mib} MiB: within 1.2x of the upstream alone"),
            format!(
                "{} vs {} ({}; distribution's proxy {})",
                secs(k.total(0.5)),
                secs(up.total(0.5)),
                ratio(k.total(0.5).as_secs_f64(), up.total(0.5).as_secs_f64()),
                ratio(dp.total(0.5).as_secs_f64(), up.total(0.5).as_secs_f64()),
            ),
            k.errors == 0 && k.total(0.5).as_secs_f64() <= 1.2 * up.total(0.5).as_secs_f64(),
        );
    }
    let (k_many, k_gets) = &many[0];
    report.budget(
        format!(
            "{} clients joining one cold pull: all done within 1.3x of one client from the upstream",
            o.cold_clients
        ),
        format!(
            "{} vs {} ({})",
            secs(k_many.total(1.0)),
            secs(direct_many.total(0.5)),
            ratio(
                k_many.total(1.0).as_secs_f64(),
                direct_many.total(0.5).as_secs_f64()
            )
        ),
        k_many.errors == 0
            && k_many.total(1.0).as_secs_f64() <= 1.3 * direct_many.total(0.5).as_secs_f64(),
    );
    report.budget(
        format!(
            "{} concurrent cold pulls: exactly 1 upstream GET",
            o.cold_clients
        ),
        format!("kache {}, distribution proxy {}", k_gets, many[1].1),
        *k_gets == 1,
    );
    Ok(())
}
