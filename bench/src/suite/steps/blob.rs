//! Warm 1 MiB blob: request rate, latency, CPU and peak RSS of every server.

use std::fmt::Write as _;

use anyhow::Result;
use http::HeaderMap;

use super::memory::{MemRow, MemStep};
use super::{get_load, median_rounds, warm_up};
use crate::client::Url;
use crate::load::{self, LoadResult};
use crate::suite::Bench;
use crate::suite::meter::Usage;
use crate::suite::report::{mb, mib, ratio, thousands};
use crate::suite::servers::Server;

/// Warm 1 MiB blob at N connections on every server: req/s, latency, CPU, peak RSS.
pub async fn blob_step(bench: &mut Bench<'_>) -> Result<()> {
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
    if !o.wants("blob") {
        return Ok(());
    }
    eprintln!("warm 1 MiB blob, {} connections", o.connections);
    let all_blob_servers = servers.all();
    let medians = median_rounds(
        &all_blob_servers,
        o.rounds,
        async |round, s| {
            let url = Url::parse(&urls.blob(s.kind, &blobs.small), None)?;
            let spec = get_load(o, url, HeaderMap::new());
            warm_up(&spec).await?;
            let (r, u) = meter.measure(s, load::load(spec)).await?;
            eprintln!(
                "  round {}: {}: {:.0} req/s, p99 {:.1} ms, cpu {:.2} s",
                round + 1,
                s.label,
                r.rps(),
                r.ms(0.99),
                u.cpu_total()
            );
            Ok((r, u))
        },
        |(r, _)| r.rps(),
    )
    .await?;
    let blob1m: Vec<(&Server, LoadResult, Usage)> = all_blob_servers
        .into_iter()
        .zip(medians)
        .map(|(s, (r, u))| (s, r, u))
        .collect();

    let _ = writeln!(
        report.md,
        "### Warm 1 MiB blob, {} connections, {:?}\n",
        o.connections, o.duration
    );
    let _ = writeln!(
        report.md,
        "| server | req/s | MB/s | p50 ms | p99 ms | max ms | errors | server CPU (cores) | CPU ms/req | peak RSS |"
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (s, r, u) in &blob1m {
        let cores = u.cpu_total() / r.elapsed.as_secs_f64();
        let cpu_detail = if u.cpu.len() > 1 {
            format!(
                "{cores:.2} ({})",
                s.procs
                    .iter()
                    .zip(&u.cpu)
                    .map(|((n, _), c)| format!("{n} {:.2}", c / r.elapsed.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(" + ")
            )
        } else {
            format!("{cores:.2}")
        };
        let peak = if u.peak.is_empty() {
            "—".into()
        } else {
            s.procs
                .iter()
                .zip(&u.peak)
                .map(|((n, _), p)| format!("{n} {}", mib(*p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            report.md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.3} | {} |",
            s.label,
            thousands(r.rps()),
            mb(r.bps()),
            r.ms(0.5),
            r.ms(0.99),
            r.max_ms(),
            r.errors,
            cpu_detail,
            u.cpu_total() * 1000.0 / r.ok.max(1) as f64,
            peak
        );
        report.note_errors(&format!("1 MiB, {}", s.label), r.errors, &r.first_error);
    }
    let (kp, kr, d, n) = (&blob1m[0], &blob1m[1], &blob1m[2], &blob1m[3]);
    let _ = writeln!(
        report.md,
        "\nRatios: kache proxy req/s {} of nginx, {} of distribution; p99 {} of distribution's. kache registry alone: {} of nginx, {} of distribution.\n",
        ratio(kp.1.rps(), n.1.rps()),
        ratio(kp.1.rps(), d.1.rps()),
        ratio(kp.1.ms(0.99), d.1.ms(0.99)),
        ratio(kr.1.rps(), n.1.rps()),
        ratio(kr.1.rps(), d.1.rps()),
    );
    report.budget(
        "1 MiB ×32: proxy req/s ≥ 2× distribution",
        ratio(kp.1.rps(), d.1.rps()),
        kp.1.rps() >= 2.0 * d.1.rps(),
    );
    report.budget(
        "1 MiB ×32: proxy req/s ≥ 0.8× nginx",
        ratio(kp.1.rps(), n.1.rps()),
        kp.1.rps() >= 0.8 * n.1.rps(),
    );
    report.budget(
        "1 MiB ×32: registry req/s ≥ 0.8× nginx (the form BENCHMARKS.md holds)",
        ratio(kr.1.rps(), n.1.rps()),
        kr.1.rps() >= 0.8 * n.1.rps(),
    );
    report.budget(
        "1 MiB ×32: proxy p99 < 1/3 of distribution's",
        format!(
            "{:.1} ms vs {:.1} ms ({})",
            kp.1.ms(0.99),
            d.1.ms(0.99),
            ratio(kp.1.ms(0.99), d.1.ms(0.99))
        ),
        kp.1.ms(0.99) * 3.0 < d.1.ms(0.99),
    );
    memory_rows.push(MemRow {
        step: format!(
            "1 MiB blob, {} connections (proxy step; registry: max of both kache steps)",
            o.connections
        ),
        key: MemStep::Blob,
        proxy: kp.2.peak.first().copied().unwrap_or(0),
        registry: kp
            .2
            .peak
            .get(1)
            .copied()
            .unwrap_or(0)
            .max(kr.2.peak.first().copied().unwrap_or(0)),
    });
    Ok(())
}
