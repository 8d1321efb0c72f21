//! Cold pulls, where the cache does not hold the blob yet: one client of the large blob, then
//! many clients of one blob at once, and how often each path asked the upstream.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::Url;
use crate::load::{self, ColdResult};
use crate::suite::meter::count_log;
use crate::suite::report::{mb, ratio, secs};
use crate::suite::{Bench, REPO};

/// Cold pulls: one client of the large blob, then N clients of one blob at once.
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
    // The upstream's files into the page cache first: every path then reads them from
    // memory, and none pays for a disk read the others skip.
    for blob in [&blobs.cold, &blobs.cold_many] {
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
    eprintln!("cold {} MiB blob", o.big_mib);
    let get_count = |d: &str| count_log(upstream_log, "GET", &format!("/blobs/{d}"));
    let head_count = |d: &str| count_log(upstream_log, "HEAD", &format!("/blobs/{d}"));
    let limit = Duration::from_secs(180);
    let cold_paths: [(&str, String); 3] = [
        (
            "straight from the upstream distribution",
            format!("{upstream_url}/v2/{REPO}/blobs/{}", blobs.cold.digest),
        ),
        (
            "kache proxy → kache registry → upstream",
            format!("{proxy_url}/v2/{kache_repo}/blobs/{}", blobs.cold.digest),
        ),
        (
            "distribution proxy → upstream",
            format!("{dproxy_url}/v2/{REPO}/blobs/{}", blobs.cold.digest),
        ),
    ];
    let _ = writeln!(
        report.md,
        "### Cold pulls (the cache does not hold the blob)\n"
    );
    let _ = writeln!(
        report.md,
        "One client, {} MiB blob:\n\n| path | first byte | complete | MB/s | upstream GETs (HEADs) |",
        o.big_mib
    );
    let _ = writeln!(report.md, "| --- | ---: | ---: | ---: | ---: |");
    let mut single: Vec<ColdResult> = Vec::new();
    for (label, url) in &cold_paths {
        let (g0, h0) = (
            get_count(&blobs.cold.digest),
            head_count(&blobs.cold.digest),
        );
        let r = load::cold(&Url::parse(url, None)?, 1, limit).await?;
        let (g1, h1) = (
            get_count(&blobs.cold.digest),
            head_count(&blobs.cold.digest),
        );
        report.note_errors(&format!("cold, {label}"), r.errors, &r.first_error);
        if r.min_bytes() != blobs.cold.size && r.errors == 0 {
            report.note(format!(
                "cold, {label}: got {} bytes of {}",
                r.min_bytes(),
                blobs.cold.size
            ));
        }
        eprintln!(
            "  {label}: first byte {}, complete {}",
            secs(r.ttfb(0.5)),
            secs(r.total(0.5))
        );
        let _ = writeln!(
            report.md,
            "| {label} | {} | {} | {} | {} ({}) |",
            secs(r.ttfb(0.5)),
            secs(r.total(0.5)),
            mb(blobs.cold.size as f64 / r.total(0.5).as_secs_f64().max(1e-9)),
            g1 - g0,
            h1 - h0
        );
        single.push(r);
    }
    eprintln!(
        "{} concurrent cold pulls of one {} MiB blob",
        o.cold_clients, o.cold_clients_mib
    );
    let _ = writeln!(
        report.md,
        "\n{} clients at once, one {} MiB blob:\n\n| path | first byte p50 | first byte max | complete p50 | complete max | errors | upstream GETs (HEADs) |",
        o.cold_clients, o.cold_clients_mib
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut many_gets = Vec::new();
    for (label, url) in [
        (
            "kache proxy → kache registry → upstream",
            format!(
                "{proxy_url}/v2/{kache_repo}/blobs/{}",
                blobs.cold_many.digest
            ),
        ),
        (
            "distribution proxy → upstream",
            format!("{dproxy_url}/v2/{REPO}/blobs/{}", blobs.cold_many.digest),
        ),
    ] {
        let d = &blobs.cold_many.digest;
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
            "| {label} | {} | {} | {} | {} | {} | {} ({}) |",
            secs(r.ttfb(0.5)),
            secs(r.ttfb(1.0)),
            secs(r.total(0.5)),
            secs(r.total(1.0)),
            r.errors,
            g1 - g0,
            h1 - h0
        );
        many_gets.push(g1 - g0);
    }
    let _ = writeln!(report.md);
    let (k, dp, up) = (&single[1], &single[2], &single[0]);
    report.budget(
        "cold: the first byte leaves before the blob is complete",
        format!(
            "first byte {} of {} (upstream alone: {})",
            secs(k.ttfb(0.5)),
            secs(k.total(0.5)),
            secs(up.total(0.5))
        ),
        k.errors == 0 && k.ttfb(0.5) < k.total(0.5) / 2,
    );
    report.budget(
        format!(
            "cold {} MiB: no slower than distribution's proxy",
            o.big_mib
        ),
        format!(
            "{} vs {} ({})",
            secs(k.total(0.5)),
            secs(dp.total(0.5)),
            ratio(k.total(0.5).as_secs_f64(), dp.total(0.5).as_secs_f64())
        ),
        k.errors == 0 && k.total(0.5) <= dp.total(0.5),
    );
    report.budget(
        format!(
            "{} concurrent cold pulls: exactly 1 upstream GET",
            o.cold_clients
        ),
        format!(
            "kache {}, distribution proxy {}",
            many_gets[0], many_gets[1]
        ),
        many_gets[0] == 1,
    );
    Ok(())
}
