//! Warm manifests by tag and by digest: request rate and latency, and whether kache asked the
//! upstream anything.

use std::fmt::Write as _;

use anyhow::Result;
use http::{HeaderMap, HeaderValue, header};

use super::{get_load, median_rounds, warm_up};
use crate::client::Url;
use crate::load::{self, LoadResult};
use crate::suite::meter::{Usage, count_log, metric};
use crate::suite::report::{ratio, thousands};
use crate::suite::servers::Kind;
use crate::suite::{ACCEPT, Bench, TAG};

/// Warm manifest by tag and by digest: req/s, latency, and whether kache asked upstream.
pub async fn manifest_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        blobs,
        urls,
        meter,
        servers,
        report,
        ..
    } = bench;
    let (registry_metrics, proxy_metrics, upstream_log) = (
        &urls.registry_metrics,
        &urls.proxy_metrics,
        &urls.upstream_log,
    );
    if !o.wants("manifest") {
        return Ok(());
    }
    let mut accept = HeaderMap::new();
    accept.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    let compared = [
        &servers.kache_proxy,
        &servers.kache_registry,
        &servers.distribution,
    ];
    let up_before = count_log(upstream_log, "GET", "/manifests/")
        + count_log(upstream_log, "HEAD", "/manifests/");
    let m = |outcome: &'static str| {
        let url = registry_metrics.clone();
        async move {
            metric(
                &url,
                "kache_registry_cache_requests_total",
                &[("kind", "manifest"), ("outcome", outcome)],
            )
            .await
        }
    };
    let fallback = || {
        let url = proxy_metrics.clone();
        async move {
            metric(
                &url,
                "kache_proxy_requests_total",
                &[("result", "fallback")],
            )
            .await
        }
    };
    let (hit0, miss0, stale0, fb0) = (
        m("hit").await?,
        m("miss").await?,
        m("stale").await?,
        fallback().await?,
    );
    let mut kache_requests = 0u64;
    let mut rows: Vec<Vec<(LoadResult, Usage)>> = vec![Vec::new(); 3];
    for (by, reference) in [("tag", TAG), ("digest", blobs.manifest_digest.as_str())] {
        eprintln!("warm manifest by {by}, {} connections", o.connections);
        let medians = median_rounds(
            &compared,
            o.rounds,
            async |round, s| {
                let url = Url::parse(&urls.manifest(s.kind, reference), None)?;
                let spec = get_load(o, url, accept.clone());
                let w = warm_up(&spec).await?;
                let (r, u) = meter.measure(s, load::load(spec)).await?;
                if matches!(s.kind, Kind::KacheProxy | Kind::KacheRegistry) {
                    kache_requests += w.ok + w.errors + r.ok + r.errors;
                }
                eprintln!(
                    "  round {}: {}: {:.0} req/s, p99 {:.2} ms, cpu {:.2} s",
                    round + 1,
                    s.label,
                    r.rps(),
                    r.ms(0.99),
                    u.cpu_total()
                );
                report.note_errors(
                    &format!("manifest by {by}, {}", s.label),
                    r.errors,
                    &r.first_error,
                );
                Ok((r, u))
            },
            |(r, _)| r.rps(),
        )
        .await?;
        for (row, median) in rows.iter_mut().zip(medians) {
            row.push(median);
        }
    }
    let up_after = count_log(upstream_log, "GET", "/manifests/")
        + count_log(upstream_log, "HEAD", "/manifests/");
    let (hit1, miss1, stale1, fb1) = (
        m("hit").await?,
        m("miss").await?,
        m("stale").await?,
        fallback().await?,
    );
    let upstream_requests = up_after - up_before;

    let _ = writeln!(
        report.md,
        "### Warm manifest GET, {} connections, {:?} per cell\n",
        o.connections, o.duration
    );
    let _ = writeln!(
        report.md,
        "| server | by tag req/s | p50 ms | p99 ms | CPU (cores) | by digest req/s | p50 ms | p99 ms | CPU (cores) | errors |"
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (s, cells) in compared.iter().zip(&rows) {
        let (t, d) = (&cells[0], &cells[1]);
        let _ = writeln!(
            report.md,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} |",
            s.label,
            thousands(t.0.rps()),
            t.0.ms(0.5),
            t.0.ms(0.99),
            t.1.cpu_total() / t.0.elapsed.as_secs_f64(),
            thousands(d.0.rps()),
            d.0.ms(0.5),
            d.0.ms(0.99),
            d.1.cpu_total() / d.0.elapsed.as_secs_f64(),
            t.0.errors + d.0.errors,
        );
    }
    let _ = writeln!(
        report.md,
        "\nRatios to distribution: kache proxy by tag {}, by digest {}; kache registry by tag {}, by digest {}.  ",
        ratio(rows[0][0].0.rps(), rows[2][0].0.rps()),
        ratio(rows[0][1].0.rps(), rows[2][1].0.rps()),
        ratio(rows[1][0].0.rps(), rows[2][0].0.rps()),
        ratio(rows[1][1].0.rps(), rows[2][1].0.rps()),
    );
    let _ = writeln!(
        report.md,
        "Upstream requests during the kache manifest steps: {upstream_requests} in the upstream's access log, for {} requests to kache; registry cache outcomes: hit {:.0}, miss {:.0}, stale {:.0}; proxy fallbacks {:.0}.\n",
        thousands(kache_requests as f64),
        hit1 - hit0,
        miss1 - miss0,
        stale1 - stale0,
        fb1 - fb0,
    );
    for (col, what) in [(0, "tag"), (1, "digest")] {
        report.budget(
            format!("manifest by {what}: proxy req/s ≥ 5× distribution"),
            ratio(rows[0][col].0.rps(), rows[2][col].0.rps()),
            rows[0][col].0.rps() >= 5.0 * rows[2][col].0.rps(),
        );
        report.budget(
            format!("manifest by {what}: proxy p99 < 10 ms"),
            format!("{:.2} ms", rows[0][col].0.ms(0.99)),
            rows[0][col].0.ms(0.99) < 10.0,
        );
    }
    let upstream_touched =
        upstream_requests as f64 + (miss1 - miss0) + (stale1 - stale0) + (fb1 - fb0);
    report.budget(
        "warm manifests: no upstream request at all",
        format!("{upstream_requests} upstream requests"),
        upstream_touched == 0.0,
    );
    Ok(())
}
