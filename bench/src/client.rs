//! A minimal HTTP/1.1 client over hyper's connection API: one TCP (or TLS) connection per
//! worker, no pool, bodies counted and dropped. The load generator has to cost the same for
//! every server it measures and as little as possible, so nothing here parses or copies a body.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::io::ReaderStream;

/// Every request body: empty, in memory, or streamed from a file.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where connections go: host, port, and TLS when the URL is `https://`.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    authority: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A parsed `http(s)://host:port/path?query`.
#[derive(Clone, Debug)]
pub struct Url {
    pub endpoint: Endpoint,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// `cacert` is the PEM bundle trusted for `https://` (the bench only talks to servers it
    /// started, with their own certificates).
    pub fn parse(s: &str, cacert: Option<&Path>) -> Result<Url> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            bail!("{s:?}: only http:// and https:// URLs");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .with_context(|| format!("{s:?}: bad IPv6 authority"))?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().with_context(|| format!("{s:?}: bad port"))?,
                None => default_port,
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().with_context(|| format!("{s:?}: bad port"))?,
                ),
                None => (authority.to_owned(), default_port),
            }
        };
        let tls = if tls {
            let Some(ca) = cacert else {
                bail!("{s:?}: https needs --cacert (the PEM of the server's CA)");
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots.add(cert.with_context(|| format!("reading {}", ca.display()))?)?;
            }
            let mut config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("{host:?} is not a TLS server name"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Url {
            endpoint: Endpoint {
                authority: HeaderValue::from_str(authority)?,
                host,
                port,
                tls,
            },
            path: path.to_owned(),
        })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.endpoint.tls.is_some() {
            "https"
        } else {
            "http"
        };
        write!(
            f,
            "{scheme}://{}{}",
            self.endpoint.authority.to_str().unwrap_or("?"),
            self.path
        )
    }
}

/// One open HTTP/1.1 connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<ReqBody>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").finish_non_exhaustive()
    }
}

impl Endpoint {
    pub async fn connect(&self) -> Result<Conn> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}:{}", self.host, self.port))?;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
        };
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await?;
        // Ends when the sender is dropped or the server closes the connection.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// A request for `path` with the Host header set.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &HeaderMap,
        body: ReqBody,
    ) -> Result<Request<ReqBody>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .with_context(|| format!("bad request path {path:?}"))?;
        let h = req.headers_mut();
        h.insert(header::HOST, self.authority.clone());
        h.insert(header::USER_AGENT, HeaderValue::from_static("kache-bench"));
        for (k, v) in headers {
            h.insert(k, v.clone());
        }
        Ok(req)
    }
}

impl Conn {
    /// Whether the server closed the connection (a keep-alive limit, an error).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn send(&mut self, req: Request<ReqBody>) -> Result<Response<Incoming>> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }
}

pub fn empty() -> ReqBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// A file streamed in 1 MiB chunks, and its length.
pub async fn file_body(path: &Path) -> Result<(ReqBody, u64)> {
    let f = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().await?.len();
    let stream = ReaderStream::with_capacity(f, 1 << 20).map(|r| r.map(Frame::data));
    Ok((BodyExt::boxed(StreamBody::new(stream)), len))
}

/// Reads a response body to its end, counting bytes; also when its first byte arrived.
pub async fn drain(resp: Response<Incoming>) -> Result<(u64, Option<Instant>)> {
    let mut body = resp.into_body();
    let mut n = 0u64;
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            if first.is_none() && !d.is_empty() {
                first = Some(Instant::now());
            }
            n += d.len() as u64;
        }
    }
    Ok((n, first))
}

/// One request on a fresh connection, body collected: for set-up and metrics, not for load.
pub async fn fetch(
    url: &Url,
    method: Method,
    headers: &HeaderMap,
    body: ReqBody,
) -> Result<(StatusCode, HeaderMap, Bytes)> {
    let mut conn = url.endpoint.connect().await?;
    let req = url.endpoint.request(method, &url.path, headers, body)?;
    let resp = conn.send(req).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, bytes))
}
