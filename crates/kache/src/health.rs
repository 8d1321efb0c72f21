//! `kache health`: the container engine's healthcheck (docker-compose.yml's `healthcheck:`),
//! for an image that has no shell and no curl to run one with.

use std::time::Duration;

use anyhow::Context as _;
use hyper::Request;
use hyper::header::HOST;
use hyper_util::rt::TokioIo;

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// A plain-HTTP URL of a listener on this host, normally a component's /readyz.
    #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
    url: String,
    /// Longest wait for the whole answer.
    #[arg(long, value_parser = crate::flags::parse_duration, default_value = "3s")]
    timeout: Duration,
}

/// Succeeds when `--url` answers 2xx within `--timeout`; the error says what it got instead.
pub async fn run(a: &HealthArgs) -> anyhow::Result<()> {
    let uri: hyper::Uri = a
        .url
        .parse()
        .with_context(|| format!("--url {:?} is not a URL", a.url))?;
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        anyhow::bail!(
            "--url {:?} must be plain http://host:port/path (an ops listener)",
            a.url
        );
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(HOST, authority.as_str())
        .body(String::new())?;
    let status = tokio::time::timeout(a.timeout, async {
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        anyhow::Ok(send.send_request(request).await?.status())
    })
    .await
    .map_err(|_| anyhow::anyhow!("{} did not answer within {:?}", a.url, a.timeout))?
    .with_context(|| format!("{} cannot be reached", a.url))?;
    anyhow::ensure!(status.is_success(), "{} answered {status}", a.url);
    println!("{} answered {status}", a.url);
    Ok(())
}
