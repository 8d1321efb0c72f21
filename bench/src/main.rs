//! kache-bench: the load generator and benchmark suite described in BENCHMARKS.md.
//!
//! `kache-bench suite` starts nginx, CNCF distribution and kache on 127.0.0.1, measures them side
//! by side in one run and prints Markdown; `load`, `stream` and `cold` are its measurements on
//! their own, for any local URL. Every step is bounded in time and stops by itself. Nothing
//! here is a test: no number is asserted anywhere.

mod client;
mod load;
mod procs;
mod suite;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

#[derive(Parser, Debug)]
#[command(
    name = "kache-bench",
    about = "Benchmarks kache against nginx and distribution on 127.0.0.1"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N connections send requests to one URL back to back: req/s, latency, bytes/s.
    Load(LoadArgs),
    /// Whole-body downloads of one URL on N parallel connections: MB/s.
    Stream(StreamArgs),
    /// N clients GET one URL at the same instant: time to first byte and total of each.
    Cold(ColdArgs),
    /// The whole benchmark: starts the servers, measures them, prints a Markdown report.
    Suite(suite::Options),
}

#[derive(clap::Args, Debug)]
struct LoadArgs {
    url: String,
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 32)]
    connections: usize,
    /// How long to send requests.
    #[arg(short = 'd', long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
    /// Stop after this many requests (still bounded by --duration).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open loop: send this many requests per second in all (latency from each request's
    /// scheduled time when it could not be sent on time) instead of back to back.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(short = 'X', long, default_value = "GET")]
    method: Method,
    /// A request header, `name: value`; repeatable.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The request body (e.g. an AdmissionReview for POST).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// PEM bundle of the CA to trust for https:// URLs.
    #[arg(long)]
    cacert: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct StreamArgs {
    url: String,
    /// Parallel download streams.
    #[arg(short = 'n', long, default_value_t = 1)]
    streams: usize,
    /// Keep downloading for this long (every stream completes at least one download).
    #[arg(short = 'd', long, value_parser = parse_duration, default_value = "10s")]
    duration: Duration,
}

#[derive(clap::Args, Debug)]
struct ColdArgs {
    url: String,
    /// Clients starting at the same instant.
    #[arg(short = 'n', long, default_value_t = 1)]
    clients: usize,
    /// Longest a client may take.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    timeout: Duration,
}

/// `500ms`, `10s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit {unit:?} in {s:?} (ms, s or m)")),
    }
}

fn header_map(headers: &[String]) -> Result<HeaderMap> {
    let mut h = HeaderMap::new();
    for line in headers {
        let (k, v) = line
            .split_once(':')
            .with_context(|| format!("header {line:?} is not `name: value`"))?;
        h.append(
            HeaderName::from_bytes(k.trim().as_bytes())?,
            HeaderValue::from_str(v.trim())?,
        );
    }
    Ok(h)
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Load(a) => {
            let url = client::Url::parse(&a.url, a.cacert.as_deref())?;
            let body = match &a.body_file {
                Some(p) => Bytes::from(
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                ),
                None => Bytes::new(),
            };
            let mut headers = header_map(&a.headers)?;
            if !body.is_empty() {
                headers
                    .entry(http::header::CONTENT_LENGTH)
                    .or_insert(HeaderValue::from(body.len()));
            }
            let r = load::load(load::LoadSpec {
                url,
                method: a.method,
                headers,
                body,
                connections: a.connections,
                duration: a.duration,
                requests: a.requests,
                rate: a.rate,
            })
            .await?;
            println!("| requests | errors | req/s | MB/s | p50 ms | p99 ms | max ms |");
            println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} |",
                r.ok,
                r.errors,
                r.rps(),
                r.bps() / 1e6,
                r.ms(0.5),
                r.ms(0.99),
                r.max_ms()
            );
            if let Some(e) = r.first_error {
                eprintln!("first error: {e}");
            }
        }
        Cmd::Stream(a) => {
            let url = client::Url::parse(&a.url, None)?;
            let r = load::stream(&url, a.streams, a.duration, Duration::from_secs(300)).await?;
            println!(
                "{} downloads, {} bytes in {:.2} s: {:.1} MB/s ({} errors)",
                r.downloads,
                r.bytes,
                r.elapsed.as_secs_f64(),
                r.bps() / 1e6,
                r.errors
            );
            if let Some(e) = r.first_error {
                eprintln!("first error: {e}");
            }
        }
        Cmd::Cold(a) => {
            let url = client::Url::parse(&a.url, None)?;
            let r = load::cold(&url, a.clients, a.timeout).await?;
            println!(
                "{} pulls ({} errors): first byte p50 {:.3} s max {:.3} s; total p50 {:.3} s max {:.3} s; {} bytes each",
                r.pulls.len(),
                r.errors,
                r.ttfb(0.5).as_secs_f64(),
                r.ttfb(1.0).as_secs_f64(),
                r.total(0.5).as_secs_f64(),
                r.total(1.0).as_secs_f64(),
                r.min_bytes()
            );
            if let Some(e) = r.first_error {
                eprintln!("first error: {e}");
            }
        }
        Cmd::Suite(o) => suite::run(o).await?,
    }
    Ok(())
}

fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli.command))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
