//! Warm large blob: download throughput on 1 and 4 streams, and CPU per GB, of every server.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::median_rounds;
use super::memory::{MemRow, MemStep};
use crate::client::Url;
use crate::load::{self, StreamResult};
use crate::suite::Bench;
use crate::suite::meter::Usage;
use crate::suite::report::{mb, mib, ratio};

/// Warm large blob, 1 and 4 download streams on every server: MB/s and CPU per GB.
pub async fn stream_step(bench: &mut Bench<'_>) -> Result<()> {
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
    if !o.wants("stream") {
        return Ok(());
    }
    let all_blob_servers = servers.all();
    let _ = writeln!(
        report.md,
        "### Warm {} MiB blob: download throughput, {:?} per cell\n",
        o.big_mib, o.stream_duration
    );
    let _ = writeln!(
        report.md,
        "| server | 1 stream MB/s | CPU s/GB | 4 streams MB/s | CPU s/GB | peak RSS (1 / 4 streams) |"
    );
    let _ = writeln!(report.md, "| --- | ---: | ---: | ---: | ---: | --- |");
    let mut cells: Vec<Vec<(StreamResult, Usage)>> = Vec::new();
    for streams in [1usize, 4] {
        eprintln!("warm {} MiB blob, {streams} stream(s)", o.big_mib);
        let medians = median_rounds(
            &all_blob_servers,
            o.rounds,
            async |round, s| {
                let url = Url::parse(&urls.blob(s.kind, &blobs.big), None)?;
                if round == 0 && streams == 1 {
                    // Warm-up: the file in the page cache, the connection paths hot.
                    let _ = load::stream(&url, 1, Duration::ZERO, Duration::from_secs(120)).await?;
                }
                let limit = Duration::from_secs(120);
                let (r, u) = meter
                    .measure(s, load::stream(&url, streams, o.stream_duration, limit))
                    .await?;
                eprintln!(
                    "  round {}: {}: {:.0} MB/s, cpu {:.2} s",
                    round + 1,
                    s.label,
                    r.bps() / 1e6,
                    u.cpu_total()
                );
                report.note_errors(
                    &format!("{} MiB ×{streams}, {}", o.big_mib, s.label),
                    r.errors,
                    &r.first_error,
                );
                Ok((r, u))
            },
            |(r, _)| r.bps(),
        )
        .await?;
        cells.push(medians);
    }
    let cpu_per_gb = |(r, u): &(StreamResult, Usage)| u.cpu_total() / (r.bytes as f64 / 1e9);
    for (i, s) in all_blob_servers.iter().enumerate() {
        let (one, four) = (&cells[0][i], &cells[1][i]);
        let peak = if s.track_memory {
            let p = |u: &Usage| u.peak.iter().copied().max().unwrap_or(0);
            format!("{} / {}", mib(p(&one.1)), mib(p(&four.1)))
        } else {
            "—".into()
        };
        let _ = writeln!(
            report.md,
            "| {} | {} | {:.2} | {} | {:.2} | {} |",
            s.label,
            mb(one.0.bps()),
            cpu_per_gb(one),
            mb(four.0.bps()),
            cpu_per_gb(four),
            peak
        );
    }
    let (p1, n1) = (cells[0][0].0.bps(), cells[0][3].0.bps());
    let (p4, d4) = (cells[1][0].0.bps(), cells[1][2].0.bps());
    let (pc, dc) = (cpu_per_gb(&cells[1][0]), cpu_per_gb(&cells[1][2]));
    let _ = writeln!(
        report.md,
        "\nRatios: kache proxy, 1 stream: {} of nginx, {} of distribution; 4 streams: {} of nginx, {} of distribution; CPU per GB (4 streams, proxy + registry): {} of distribution's. kache registry alone, 1 stream: {} of nginx.\n",
        ratio(p1, n1),
        ratio(p1, cells[0][2].0.bps()),
        ratio(p4, cells[1][3].0.bps()),
        ratio(p4, d4),
        ratio(pc, dc),
        ratio(cells[0][1].0.bps(), n1),
    );
    report.budget(
        format!("{} MiB, 1 stream: proxy ≥ 0.9× nginx", o.big_mib),
        format!("{} ({} vs {} MB/s)", ratio(p1, n1), mb(p1), mb(n1)),
        p1 >= 0.9 * n1,
    );
    let r1 = cells[0][1].0.bps();
    report.budget(
        format!(
            "{} MiB, 1 stream: registry ≥ 0.9× nginx (the form BENCHMARKS.md holds)",
            o.big_mib
        ),
        format!("{} ({} vs {} MB/s)", ratio(r1, n1), mb(r1), mb(n1)),
        r1 >= 0.9 * n1,
    );
    report.budget(
        format!("{} MiB, 4 streams: proxy ≥ distribution", o.big_mib),
        format!("{} ({} vs {} MB/s)", ratio(p4, d4), mb(p4), mb(d4)),
        p4 >= d4,
    );
    report.budget(
        format!(
            "{} MiB, 4 streams: less CPU than distribution (proxy + registry, per GB)",
            o.big_mib
        ),
        format!("{pc:.2} vs {dc:.2} CPU s/GB ({})", ratio(pc, dc)),
        pc < dc,
    );
    memory_rows.push(MemRow::of(
        format!("{} MiB blob through the proxy, 1 stream", o.big_mib),
        MemStep::Stream1,
        &cells[0][0].1,
    ));
    memory_rows.push(MemRow::of(
        format!("{} MiB blob through the proxy, 4 streams", o.big_mib),
        MemStep::Stream4,
        &cells[1][0].1,
    ));
    Ok(())
}
