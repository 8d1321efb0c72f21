//! The one kache binary: `kache registry|dev|fsck`. It parses configuration and wires the
//! crates together; behaviour lives in the crates.

mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "kache",
    version,
    about = "Keeps every container image a Kubernetes cluster runs inside the cluster"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "KACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OCI registry over the store in --data-dir.
    Registry(RegistryArgs),
    /// Run everything a newcomer needs on 127.0.0.1, with data in ./kache-data.
    Dev(DevArgs),
    /// Re-hash every blob in a (stopped) store and report what does not verify.
    Fsck {
        #[arg(long, env = "KACHE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RegistryArgs {
    /// Address of the Distribution API.
    #[arg(long, env = "KACHE_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Where blobs and the index live.
    #[arg(long, env = "KACHE_DATA_DIR", default_value = "/var/lib/kache")]
    data_dir: PathBuf,
    /// Upload sessions untouched for this long are removed.
    #[arg(long, env = "KACHE_UPLOAD_TIMEOUT", value_parser = parse_duration, default_value = "1h")]
    upload_timeout: Duration,
}

#[derive(clap::Args, Debug)]
struct DevArgs {
    #[arg(long, env = "KACHE_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    #[arg(long, env = "KACHE_DATA_DIR", default_value = "kache-data")]
    data_dir: PathBuf,
}

/// Durations as `30s`, `15m`, `2h`, `30d` (or plain seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 15m, 2h or 30d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Registry(a) => {
                serve::registry(serve::RegistryOptions {
                    listen: a.listen,
                    metrics_listen: a.metrics_listen,
                    data_dir: a.data_dir,
                    upload_timeout: a.upload_timeout,
                })
                .await
            }
            Command::Dev(a) => {
                tracing::info!(
                    registry = %a.listen,
                    data_dir = %a.data_dir.display(),
                    "kache dev: push and pull with skopeo --dest-tls-verify=false docker://{}/<name>:<tag>",
                    a.listen
                );
                serve::registry(serve::RegistryOptions {
                    listen: a.listen,
                    metrics_listen: a.metrics_listen,
                    data_dir: a.data_dir,
                    upload_timeout: Duration::from_secs(3600),
                })
                .await
            }
            Command::Fsck { data_dir } => serve::fsck(&data_dir).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
