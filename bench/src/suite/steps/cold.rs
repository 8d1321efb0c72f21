//! Cold pulls, where the cache does not hold the blob yet: one client of the large blob, then
//! many clients of one blob at once, and how often each path asked the upstream.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::Url;
use crate::load::{self, ColdResult};
use crate::suite::fixtures::{Blob, distribution_blob_file, kache_blob_file};
use crate::suite::meter::count_log;
use crate::suite::report::{mb, ratio, secs};
use crate::suite::servers::Server;
use crate::suite::{Bench, MIB, REPO};

/// Cold pulls: one client of each large blob, then N clients of one blob at once.
pub async fn cold_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        blobs,
        urls,
        report,
        meter,
        servers,
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
    // One client of each single blob: `--big-mib`, and `--cold-huge-mib` unless it is 0; over
    // loopback, then through the paced link when there is one.
    let mut loopback = vec![&blobs.cold];
    let mut paced = vec![&blobs.cold_paced];
    if o.cold_huge_mib > 0 {
        loopback.push(&blobs.cold_huge);
        paced.push(&blobs.cold_huge_paced);
    }
    if urls.paced.is_none() {
        paced.clear();
    }
    // The upstream's files into the page cache first: every path then reads them from
    // memory, and none pays for a disk read the others skip.
    for &blob in loopback.iter().chain(&paced).chain([&&blobs.cold_many]) {
        let data = distribution_blob_file(&work.join("upstream/storage"), &blob.digest);
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
    // Each single blob through each path, over loopback and then through the paced link.
    let mut singles: Vec<Single> = Vec::new();
    let mut routes = vec![Route {
        pace: None,
        upstream: upstream_url,
        dproxy: dproxy_url,
        dproxy_dir: "distribution-proxy",
        dproxy_server: &servers.distribution_proxy,
        kache_repo,
        blobs: loopback,
    }];
    if let (Some(p), Some(s)) = (&urls.paced, &servers.distribution_proxy_paced) {
        routes.push(Route {
            pace: Some(p.bytes_per_s),
            upstream: &p.upstream,
            dproxy: &p.dproxy,
            dproxy_dir: "distribution-proxy-paced",
            dproxy_server: s,
            kache_repo: &p.kache_repo,
            blobs: paced,
        });
    }
    for Route {
        pace,
        upstream,
        dproxy,
        dproxy_dir,
        dproxy_server,
        kache_repo,
        blobs,
    } in routes
    {
        for blob in blobs {
            let mib = blob.size / MIB;
            let over = match pace {
                None => "loopback".to_owned(),
                Some(b) => format!("the upstream paced at {} MB/s", b / 1_000_000),
            };
            eprintln!("cold {mib} MiB blob, {over}");
            let _ = writeln!(
                report.md,
                "One client, {mib} MiB blob, {over}:\n\n| path | first byte | complete | MB/s | vs. the upstream alone | in the cache after | the cache's CPU | upstream GETs (HEADs) |"
            );
            let _ = writeln!(
                report.md,
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            let paths: [(&str, String, Option<Cache>); 3] = [
                (
                    "straight from the upstream distribution",
                    format!("{upstream}/v2/{REPO}/blobs/{}", blob.digest),
                    None,
                ),
                (
                    "kache proxy → kache registry → upstream",
                    format!("{proxy_url}/v2/{kache_repo}/blobs/{}", blob.digest),
                    Some((kache_file(work, &blob.digest), &servers.kache_proxy)),
                ),
                (
                    "distribution proxy → upstream",
                    format!("{dproxy}/v2/{REPO}/blobs/{}", blob.digest),
                    Some((
                        distribution_file(work, dproxy_dir, &blob.digest),
                        dproxy_server,
                    )),
                ),
            ];
            let mut results = Vec::new();
            let mut cpus = Vec::new();
            for (label, url, cache) in &paths {
                if results.len() == 1 {
                    // What every verifying cache does with each byte besides moving it, alone
                    // and right before kache's pull: store it (bytes the machine has not stored
                    // before, so memory is met as a growing cache meets it) and hash it.
                    let stored = write_new_file(&work.join("page-cache-write"), blob.size).await?;
                    let hashed = hash_alone(blob.size).await?;
                    for (what, t) in [
                        (
                            "a new file of the same size written into the page cache",
                            stored,
                        ),
                        ("SHA-256 of the same size, one core", hashed),
                    ] {
                        let _ = writeln!(
                            report.md,
                            "| no network: {what} | | {} | {} | | | | |",
                            secs(t),
                            mb(blob.size as f64 / t.as_secs_f64().max(1e-9)),
                        );
                    }
                }
                let (g0, h0) = (get_count(&blob.digest), head_count(&blob.digest));
                let cpu0 = cache.as_ref().map(|(_, s)| meter.start(s));
                let start = Instant::now();
                let r = load::cold(&Url::parse(url, None)?, 1, limit).await?;
                let (stored, cpu) = match (cache, cpu0) {
                    (Some((f, s)), Some(before)) => {
                        let stored = stored_after(f, start, limit).await?;
                        (Some(stored), Some(meter.end(s, before).cpu_total()))
                    }
                    _ => (None, None),
                };
                let (stored, cpu_text) = (
                    stored.map_or("—".to_owned(), secs),
                    cpu.map_or("—".to_owned(), |c| format!("{c:.2} s")),
                );
                let (g1, h1) = (get_count(&blob.digest), head_count(&blob.digest));
                report.note_errors(
                    &format!("cold {mib} MiB, {over}, {label}"),
                    r.errors,
                    &r.first_error,
                );
                if r.min_bytes() != blob.size && r.errors == 0 {
                    report.note(format!(
                        "cold {mib} MiB, {over}, {label}: got {} bytes of {}",
                        r.min_bytes(),
                        blob.size
                    ));
                }
                eprintln!(
                    "  {label}: first byte {}, complete {}, in the cache {stored}, CPU {cpu_text}",
                    secs(r.ttfb(0.5)),
                    secs(r.total(0.5))
                );
                let direct = results
                    .first()
                    .map_or(r.total(0.5), |d: &ColdResult| d.total(0.5));
                let _ = writeln!(
                    report.md,
                    "| {label} | {} | {} | {} | {} | {stored} | {cpu_text} | {} ({}) |",
                    secs(r.ttfb(0.5)),
                    secs(r.total(0.5)),
                    mb(blob.size as f64 / r.total(0.5).as_secs_f64().max(1e-9)),
                    ratio(r.total(0.5).as_secs_f64(), direct.as_secs_f64()),
                    g1 - g0,
                    h1 - h0
                );
                results.push(r);
                cpus.push(cpu.unwrap_or(0.0));
            }
            let _ = writeln!(report.md);
            std::fs::remove_file(work.join("page-cache-write"))?;
            let mut it = results.into_iter();
            singles.push(Single {
                mib,
                over,
                paced: pace.is_some(),
                up: it.next().expect("three paths"),
                k: it.next().expect("three paths"),
                dp: it.next().expect("three paths"),
                k_cpu: cpus[1],
                dp_cpu: cpus[2],
            });
        }
    }

    eprintln!(
        "{} concurrent cold pulls of one {} MiB blob",
        o.cold_clients, o.cold_clients_mib
    );
    // What the same clients get straight from the upstream, all at once: the time the many are
    // held to (on loopback they move N times the bytes of one, through the same cores); and
    // one client alone, for scale.
    let d = &blobs.cold_many.digest;
    let upstream_blob = Url::parse(&format!("{upstream_url}/v2/{REPO}/blobs/{d}"), None)?;
    let direct_one = load::cold(&upstream_blob, 1, limit).await?;
    let direct_many = load::cold(&upstream_blob, o.cold_clients, limit).await?;
    let _ = writeln!(
        report.md,
        "{} clients at once, one {} MiB blob (one client alone straight from the upstream: {}):\n\n| path | first byte p50 | first byte max | complete p50 | complete max | max vs. the same clients from the upstream | errors | upstream GETs (HEADs) |",
        o.cold_clients,
        o.cold_clients_mib,
        secs(direct_one.total(0.5))
    );
    let _ = writeln!(
        report.md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    many_row(
        &mut report.md,
        "straight from the upstream distribution (its page cache)",
        &direct_many,
        &direct_many,
        o.cold_clients.to_string(),
    );
    let mut many = Vec::new();
    for (label, url, file) in [
        (
            "kache proxy → kache registry → upstream",
            format!("{proxy_url}/v2/{kache_repo}/blobs/{d}"),
            kache_file(work, d),
        ),
        (
            "distribution proxy → upstream",
            format!("{dproxy_url}/v2/{REPO}/blobs/{d}"),
            distribution_file(work, "distribution-proxy", d),
        ),
    ] {
        let (g0, h0) = (get_count(d), head_count(d));
        let start = Instant::now();
        let r = load::cold(&Url::parse(&url, None)?, o.cold_clients, limit).await?;
        stored_after(&file, start, limit).await?;
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
        many_row(
            &mut report.md,
            label,
            &r,
            &direct_many,
            format!("{} ({})", g1 - g0, h1 - h0),
        );
        many.push((r, g1 - g0));
    }
    let _ = writeln!(report.md);

    for Single {
        mib,
        over,
        paced,
        up,
        k,
        dp,
        k_cpu,
        dp_cpu,
    } in &singles
    {
        report.budget(
            format!("cold {mib} MiB, {over}: the first byte within 50 ms"),
            format!("{} (complete {})", secs(k.ttfb(0.5)), secs(k.total(0.5))),
            k.errors == 0 && k.ttfb(0.5) <= Duration::from_millis(50),
        );
        if *paced {
            report.budget(
                format!("cold {mib} MiB, {over}: within 1.2x of the upstream alone"),
                format!(
                    "{} vs {} ({}; distribution's proxy {})",
                    secs(k.total(0.5)),
                    secs(up.total(0.5)),
                    ratio(k.total(0.5).as_secs_f64(), up.total(0.5).as_secs_f64()),
                    ratio(dp.total(0.5).as_secs_f64(), up.total(0.5).as_secs_f64()),
                ),
                k.errors == 0 && k.total(0.5).as_secs_f64() <= 1.2 * up.total(0.5).as_secs_f64(),
            );
        } else {
            // Over loopback the upstream can outrun SHA-256 on one core, and every path shares
            // the same cores: the time is the work (the table shows both), and the work is what
            // a cache can hold down.
            report.budget(
                format!("cold {mib} MiB, {over}: the cache's CPU below distribution's proxy's"),
                format!("kache {k_cpu:.2} s, distribution's proxy {dp_cpu:.2} s"),
                k.errors == 0 && k_cpu < dp_cpu,
            );
        }
    }
    let (k_many, k_gets) = &many[0];
    report.budget(
        format!(
            "{} clients joining one cold pull: all done within 1.3x of the same clients straight from the upstream",
            o.cold_clients
        ),
        format!(
            "{} vs {} ({}; one client alone {})",
            secs(k_many.total(1.0)),
            secs(direct_many.total(1.0)),
            ratio(
                k_many.total(1.0).as_secs_f64(),
                direct_many.total(1.0).as_secs_f64()
            ),
            secs(direct_one.total(0.5)),
        ),
        k_many.errors == 0
            && k_many.total(1.0).as_secs_f64() <= 1.3 * direct_many.total(1.0).as_secs_f64(),
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

/// A row of the many-clients table: `r` against `reference`, the same clients straight from the
/// upstream.
fn many_row(md: &mut String, label: &str, r: &ColdResult, reference: &ColdResult, gets: String) {
    let _ = writeln!(
        md,
        "| {label} | {} | {} | {} | {} | {} | {} | {gets} |",
        secs(r.ttfb(0.5)),
        secs(r.ttfb(1.0)),
        secs(r.total(0.5)),
        secs(r.total(1.0)),
        ratio(
            r.total(1.0).as_secs_f64(),
            reference.total(1.0).as_secs_f64()
        ),
        r.errors,
    );
}

/// The kache registry's file of `digest` once it holds the blob.
fn kache_file(work: &Path, digest: &str) -> PathBuf {
    kache_blob_file(&work.join("kache-registry/data"), digest)
}

/// The file of `digest` in the distribution proxy under `dir` once it holds the blob.
fn distribution_file(work: &Path, dir: &str, digest: &str) -> PathBuf {
    distribution_blob_file(&work.join(dir).join("storage"), digest)
}

/// How the upstream is reached (over loopback, or through the paced `link::Link`), and the
/// caches in front of it.
struct Route<'a> {
    /// `None` over loopback, else bytes per second per connection.
    pace: Option<u64>,
    upstream: &'a str,
    dproxy: &'a str,
    /// The distribution proxy's directory under the work directory, and its processes.
    dproxy_dir: &'static str,
    dproxy_server: &'a Server,
    kache_repo: &'a str,
    blobs: Vec<&'a Blob>,
}

/// A cache on a path: the file that shows it holds the blob, and its processes.
type Cache<'a> = (PathBuf, &'a Server);

/// One client's cold pull of one blob, on each path.
struct Single {
    mib: u64,
    /// "loopback", or the pace of the upstream's link.
    over: String,
    paced: bool,
    up: ColdResult,
    k: ColdResult,
    dp: ColdResult,
    /// CPU seconds of kache's processes and of distribution's proxy, until each held the blob.
    k_cpu: f64,
    dp_cpu: f64,
}

/// How long after `start` the cache held the blob at `file` (both cache by renaming a verified
/// file into place). Distribution's proxy stores a blob with a second upstream GET of its own,
/// in the background, after its client may have finished; its upstream GETs are only all
/// counted once this returns.
async fn stored_after(file: &Path, start: Instant, limit: Duration) -> Result<Duration> {
    loop {
        if file.exists() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", file.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `size` bytes to a new file at `path` as a cache stores a blob (256 KiB `write`s of a
/// reused buffer, no fsync); how long it took. The file is kept until the caller removes it, so
/// the pulls after it find the memory as a cache growing would.
async fn write_new_file(path: &Path, size: u64) -> Result<Duration> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        let buf = vec![0x5a_u8; 256 * 1024];
        let start = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(start.elapsed())
    })
    .await?
}

/// How long SHA-256 of `size` bytes takes on one core (the bytes of one warm 1 MiB buffer,
/// again and again): the least time a cache that verifies a blob before its last byte needs.
async fn hash_alone(size: u64) -> Result<Duration> {
    tokio::task::spawn_blocking(move || {
        use sha2::Digest as _;
        let buf = vec![0xa5_u8; MIB as usize];
        let mut h = sha2::Sha256::new();
        let start = Instant::now();
        let mut left = size;
        while left > 0 {
            let n = left.min(MIB) as usize;
            h.update(&buf[..n]);
            left -= n as u64;
        }
        std::hint::black_box(h.finalize());
        Ok(start.elapsed())
    })
    .await?
}
