//! `kache-bench suite`: every row of BENCHMARKS.md in one run.
//!
//! Starts on 127.0.0.1: nginx (sendfile) serving the blob files; CNCF distribution holding the
//! same blobs (the warm peer); a second distribution as the upstream of the cold pulls, with
//! its access log counting upstream requests; distribution in proxy mode in front of that
//! upstream; `kache registry` with the same blobs pushed through its internal listener; and
//! `kache proxy` in front of it. Then measures each step on every server back to back, so the
//! ratios come from one machine in one state, and prints Markdown on stdout (progress on
//! stderr).
//!
//! The run, module by module: [`fixtures`] writes the blobs; [`servers`] starts the servers
//! and fills them through [`push`]; the [`steps`] measure, with [`meter`] reading what the
//! servers spend; [`gc`], [`scale`] and [`pod`] start servers of their own; [`report`] holds
//! the Markdown and ends it with the budgets.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::parse_duration;
use fixtures::Blobs;
use meter::Meter;
use report::Report;
use servers::{ServersUnderTest, Urls};
use steps::memory::MemRow;

mod fixtures;
mod gc;
mod link;
mod meter;
mod pod;
mod prepull;
mod push;
mod report;
mod scale;
mod servers;
mod steps;
mod synthetic;

const MIB: u64 = 1 << 20;
/// The repository of the blobs in distribution, and the upstream path kache caches.
const REPO: &str = "bench/app";
const TAG: &str = "v1";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What containerd sends when it resolves a tag.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The options of `kache-bench suite`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// The kache binary, built with --release.
    #[arg(long, default_value = "target/release/kache")]
    kache: PathBuf,
    /// Scratch directory for blobs, stores and logs (about 40 GiB at the default sizes).
    #[arg(long)]
    work: PathBuf,
    /// Length of each load step (1 MiB blob, manifests).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Length of each download-throughput step.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    stream_duration: Duration,
    /// Connections of the 1 MiB blob and manifest steps.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Size of the large blob, MiB.
    #[arg(long, default_value_t = 512)]
    big_mib: u64,
    /// Size of the blob of the memory run, MiB.
    #[arg(long, default_value_t = 2048)]
    huge_mib: u64,
    /// Size of the second blob of the single cold pull, MiB (0: only `--big-mib`).
    #[arg(long, default_value_t = 4096)]
    cold_huge_mib: u64,
    /// Clients of the concurrent cold pull.
    #[arg(long, default_value_t = 32)]
    cold_clients: usize,
    /// Size of the blob of the concurrent cold pull, MiB.
    #[arg(long, default_value_t = 64)]
    cold_clients_mib: u64,
    /// Pace of the upstream's link for the single cold pulls, MB/s per connection (250: a
    /// 2 Gbit/s link); 0 pulls over loopback only.
    #[arg(long, default_value_t = 250)]
    cold_link_mbs: u64,
    /// Rounds of each warm step (servers interleaved in every round); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Manifests of the garbage-collection step's store (each with a config and 9 layers: ten
    /// blobs a manifest).
    #[arg(long, default_value_t = 10_000)]
    gc_manifests: usize,
    /// Repositories of the scale step's store (one image of ten blobs each).
    #[arg(long, default_value_t = 10_000)]
    scale_repositories: usize,
    /// Tags of the scale step's long tag list.
    #[arg(long, default_value_t = 10_000)]
    scale_tags: usize,
    /// Size of the image of the pod step, MiB.
    #[arg(long, default_value_t = 100)]
    pod_image_mib: u64,
    /// Only these steps (comma-separated): blob, stream, manifest, private, cold, memory,
    /// webhook, gc, scale, pod, prepull.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The whole run is stopped after this long.
    #[arg(long, value_parser = parse_duration, default_value = "25m")]
    max_time: Duration,
    /// Start and fill the servers, print their addresses, keep them up this long, then stop
    /// without measuring (for profiling one of them by hand).
    #[arg(long, value_parser = parse_duration)]
    hold: Option<Duration>,
    /// Also write the report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The kache proxy's `--http-server` (`kache` or `hyper`); its own default when not given.
    #[arg(long, alias = "proxy-relay")]
    proxy_http_server: Option<String>,
    /// The kache registry's `--http-server` (`kache` or `hyper`); its own default when not given.
    #[arg(long, alias = "registry-server")]
    registry_http_server: Option<String>,
}

impl Options {
    /// Whether `--only` leaves `step` in the run.
    fn wants(&self, step: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == step)
    }
}

/// Runs the suite and prints its report (and writes it to `--out`).
pub async fn run(o: Options) -> Result<()> {
    std::fs::create_dir_all(&o.work)?;
    let started = Instant::now();
    // Ctrl-C, SIGTERM and --max-time all drop the suite, and with it every server it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        r = tokio::time::timeout(o.max_time, suite(&o)) => match r {
            Ok(r) => r?,
            Err(_) => bail!(
                "stopped after --max-time {:?}; servers were stopped",
                o.max_time
            ),
        },
        _ = tokio::signal::ctrl_c() => bail!("interrupted; servers were stopped"),
        _ = term.recv() => bail!("terminated; servers were stopped"),
    };
    let report = format!(
        "{report}\nWhole run: {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    std::io::stdout().flush()?;
    if let Some(p) = &o.out {
        std::fs::write(p, &report).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// What every step shares: the options, the servers and their blobs, and the report being
/// written.
struct Bench<'a> {
    o: &'a Options,
    work: PathBuf,
    kache: PathBuf,
    /// Where started processes are noted (for `bench/run` to stop if this one dies).
    pids: PathBuf,
    blobs: Blobs,
    urls: Urls,
    meter: Meter,
    servers: ServersUnderTest,
    report: Report,
    /// Each kache process's peak RSS per step, for the memory table.
    memory_rows: Vec<MemRow>,
}

async fn suite(o: &Options) -> Result<String> {
    let work = std::fs::canonicalize(&o.work)?;
    let kache = std::fs::canonicalize(&o.kache).with_context(|| {
        format!(
            "{} (build it: cargo build --release -p kache)",
            o.kache.display()
        )
    })?;
    let pids = work.join("pids");
    let blob_dir = work.join("blobs");
    let report = Report::new(o, &kache);

    eprintln!("making blobs in {}", blob_dir.display());
    let blobs = fixtures::make_blobs(o, &blob_dir).await?;

    eprintln!("starting servers");
    let (mut processes, urls) = servers::start(o, &work, &kache, &pids, &blob_dir, &blobs).await?;

    eprintln!("pushing blobs");
    let t = Instant::now();
    servers::fill(&urls, &blobs).await?;
    eprintln!("  pushed in {:.1} s", t.elapsed().as_secs_f64());

    if let Some(hold) = o.hold {
        let env = processes.describe(&urls, &blobs);
        std::fs::write(work.join("servers.txt"), &env)?;
        eprintln!(
            "{env}holding the servers for {hold:?} (also in {})",
            work.join("servers.txt").display()
        );
        tokio::time::sleep(hold).await;
        return Ok(String::new());
    }

    let mut bench = Bench {
        o,
        work,
        kache,
        pids,
        blobs,
        urls,
        meter: Meter::new(),
        servers: processes.under_test(),
        report,
        memory_rows: Vec::new(),
    };
    steps::blob_step(&mut bench).await?;
    steps::stream_step(&mut bench).await?;
    steps::manifest_step(&mut bench).await?;
    steps::private_step(&mut bench).await?;
    steps::cold_step(&mut bench).await?;
    steps::memory_step(&mut bench).await?;
    steps::webhook_step(&mut bench).await?;
    gc::gc_step(&mut bench).await?;
    scale::scale_step(&mut bench).await?;
    pod::pod_step(&mut bench).await?;
    prepull::prepull_step(&mut bench).await?;
    Ok(bench.report.finish(&processes.deaths()))
}
