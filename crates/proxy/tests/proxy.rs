//! The node proxy over real HTTP on 127.0.0.1: in front of a pull-through registry, and on its
//! own when that registry is down, failing or silent.

use std::sync::Arc;
use std::time::Duration;

use kache_http::ServerKind;
use kache_oci::{Digest, media_type};
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_testkit::inproc::{client, closed_port, push_image, serve};
use kache_testkit::parts::{self, ProxyOptions, RegistryOptions, Running};
use reqwest::{Client, Method, StatusCode};

/// A kache registry; with `pull_from`, a pull-through cache of that host.
async fn registry(pull_from: Option<&str>) -> Running {
    parts::registry(RegistryOptions {
        pull_from: pull_from.map(str::to_owned),
        ..RegistryOptions::default()
    })
    .await
}

/// A proxy on its own server (the spliced relay).
async fn proxy(registry: &str, upstream_host: &str, timeout: Duration) -> Running {
    proxy_with(registry, upstream_host, timeout, false).await
}

/// A proxy; with `hyper`, its router on hyper (every body copied through user space).
async fn proxy_with(
    registry: &str,
    upstream_host: &str,
    timeout: Duration,
    hyper: bool,
) -> Running {
    let server = if hyper {
        ServerKind::Hyper
    } else {
        ServerKind::Kache
    };
    parts::proxy(ProxyOptions {
        registry_timeout: timeout,
        server,
        ..ProxyOptions::new(registry, upstream_host)
    })
    .await
}

#[tokio::test]
async fn pulls_go_through_the_registry_and_count_hits_and_misses() {
    pulls_through(false).await;
}

#[tokio::test]
async fn pulls_go_through_the_registry_with_the_hyper_relay_too() {
    pulls_through(true).await;
}

async fn pulls_through(hyper: bool) {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let (m, ld) = push_image(&c, &up.base, "app", "v1", b"layer bytes", None).await;
    let cache = registry(Some(&uh)).await;
    let p = proxy_with(&cache.base, &uh, Duration::from_secs(2), hyper).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());

    assert_eq!(
        c.get(format!("{}/v2/", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    for _ in 0..2 {
        let r = c
            .get(format!("{}/v2/{repo}/manifests/v1", p.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], media_type::OCI_MANIFEST);
        assert_eq!(r.bytes().await.unwrap(), m);
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{ld}", p.base))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["docker-content-digest"],
            ld.to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), "layer bytes");
    }
    let series = |result: &str| {
        format!(r#"kache_proxy_requests_total{{upstream="{uh}",result="{result}"}}"#)
    };
    assert_eq!(p.count(&series("miss")), 2.0);
    assert_eq!(p.count(&series("hit")), 2.0);
    assert_eq!(p.count(&series("fallback")), 0.0);
    // Mirror mode through the proxy: the registry resolves ns, percent-encoded as containerd sends it.
    let r = c
        .get(format!(
            "{}/v2/app/manifests/v1?ns={}",
            p.base,
            uh.replace(':', "%3A")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), m);
}

#[tokio::test]
async fn an_unreachable_registry_means_straight_to_upstream() {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let (m, ld) = push_image(&c, &up.base, "app", "v1", b"fallback layer", None).await;
    let p = proxy(&closed_port(), &uh, Duration::from_secs(2)).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-content-digest"],
        Digest::sha256(&m).to_string().as_str()
    );
    assert_eq!(r.bytes().await.unwrap(), m);
    let r = c
        .head(format!("{}/v2/{repo}/manifests/v1", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), "fallback layer");
    // containerd's mirror form falls back too, its ns percent-encoded.
    let r = c
        .get(format!(
            "{}/v2/app/manifests/v1?ns={}",
            p.base,
            uh.replace(':', "%3A")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), m);
    assert_eq!(
        p.count(&format!(
            r#"kache_proxy_requests_total{{upstream="{uh}",result="fallback"}}"#
        )),
        4.0
    );
    // Nothing upstream either: the upstream's answer, as the spec's error.
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v404", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The kubelet's ping never depends on the registry.
    assert_eq!(
        c.get(format!("{}/v2/", p.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_failing_or_silent_registry_means_upstream_but_a_404_is_the_answer() {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let (m, _) = push_image(&c, &up.base, "app", "v1", b"x", None).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());
    let upstream_gets =
        || up.count(r#"kache_registry_requests_total{route="manifest",method="GET",status="200"}"#);

    // A registry answering 500 (a fault no real registry produces on demand).
    let failing = serve(
        axum::Router::new().fallback(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") }),
    )
    .await;
    let p = proxy(&format!("http://{failing}"), &uh, Duration::from_secs(2)).await;
    assert_eq!(
        c.get(format!("{}/v2/{repo}/manifests/v1", p.base))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        m
    );
    assert_eq!(upstream_gets(), 1.0);

    // A registry that accepts and never answers: the timeout sends the pull upstream.
    let silent = serve(axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "too late"
    }))
    .await;
    let p = proxy(&format!("http://{silent}"), &uh, Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert_eq!(
        c.get(format!("{}/v2/{repo}/manifests/v1", p.base))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        m
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(upstream_gets(), 2.0);

    // A registry 404 is passed on; the upstream is not asked.
    let empty = registry(None).await;
    let p = proxy(&empty.base, &uh, Duration::from_secs(2)).await;
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(upstream_gets(), 2.0);
}

#[tokio::test]
async fn the_proxy_only_serves_pulls() {
    let c = client();
    let p = proxy(&closed_port(), "127.0.0.1:1", Duration::from_secs(1)).await;
    for (method, path, status, code) in [
        (Method::PUT, "/v2/a/manifests/v1", 405, Some("UNSUPPORTED")),
        (
            Method::GET,
            "/v2/UPPER/manifests/v1",
            400,
            Some("NAME_INVALID"),
        ),
        // A tag that cannot exist names no manifest: answered here, as the registry would.
        (
            Method::GET,
            "/v2/docker.io/a/manifests/.INVALID_MANIFEST_NAME",
            404,
            Some("MANIFEST_UNKNOWN"),
        ),
        // A mirror request whose ns names no registry.
        (
            Method::GET,
            "/v2/library/a/manifests/v1?ns=%zz",
            400,
            Some("NAME_INVALID"),
        ),
        // A plain repository names no upstream: with the registry down there is nowhere to go.
        (Method::GET, "/v2/plain/manifests/v1", 503, None),
    ] {
        let r = c
            .request(method.clone(), format!("{}{path}", p.base))
            .body(if method == Method::PUT { "{}" } else { "" })
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        if let Some(code) = code {
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["errors"][0]["code"], code, "{method} {path}");
        }
    }
}

// The proxy's own HTTP/1.1 server and the spliced blob relay, seen from raw sockets.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bounds every wait of a raw client: a broken server fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

/// Bytes that are not all alike, so a misplaced chunk shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body has the length the head announced (or its last chunk arrived).
    complete: bool,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client on a raw socket: requests as written, answers parsed here.
struct Raw {
    tcp: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw {
            tcp: tokio::net::TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, text: &[u8]) {
        self.tcp.write_all(text).await.unwrap();
    }

    /// Reads more; 0 when the server closed.
    async fn fill(&mut self) -> usize {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("the proxy answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// One answer; `head` for the answer to a HEAD request (it has no body).
    async fn answer(&mut self, head: bool) -> Answer {
        let (status, headers, used) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(n) = r.parse(&self.buf).unwrap() {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (r.code.unwrap(), headers, n);
            }
            assert!(self.fill().await > 0, "closed before a whole answer head");
        };
        self.buf.drain(..used);
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
            complete: true,
        };
        if head {
            return a;
        }
        if let Some(len) = a.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if self.fill().await == 0 {
                    a.complete = false;
                    a.body = std::mem::take(&mut self.buf);
                    return a;
                }
            }
            a.body = self.buf.drain(..len).collect();
        } else if a.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await > 0, "closed inside a chunk size");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line_end]).unwrap().trim(),
                    16,
                )
                .unwrap();
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await > 0, "closed inside a chunk");
                }
                a.body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await > 0 {}
            a.body = std::mem::take(&mut self.buf);
        }
        a
    }

    /// Whether the server closed the connection (with nothing more sent).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && self.fill().await == 0
    }
}

/// An upstream with one image whose layer is `layer`, a pull-through registry of it, a proxy in
/// front; returns them with the cache repository, the manifest and the layer digest.
async fn stack(layer: &[u8]) -> (Running, Running, Running, String, Vec<u8>, Digest) {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let (m, ld) = push_image(&c, &up.base, "app", "v1", layer, None).await;
    let cache = registry(Some(&uh)).await;
    let p = proxy(&cache.base, &uh, Duration::from_secs(5)).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());
    (up, cache, p, repo, m, ld.parse().unwrap())
}

#[tokio::test]
async fn a_blob_is_spliced_byte_for_byte_cold_and_warm() {
    let layer = pattern(3 * 1024 * 1024 + 17);
    let (up, _cache, p, repo, _, ld) = stack(&layer).await;
    let c = client();
    for _ in 0..2 {
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{ld}", p.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["content-length"],
            layer.len().to_string().as_str()
        );
        let body = r.bytes().await.unwrap();
        assert_eq!(Digest::sha256(&body), ld);
        assert!(body == layer);
    }
    let uh = up.addr.to_string();
    let series = |result: &str| {
        format!(r#"kache_proxy_requests_total{{upstream="{uh}",result="{result}"}}"#)
    };
    assert_eq!(p.count(&series("miss")), 1.0);
    assert_eq!(p.count(&series("hit")), 1.0);
    // Both bodies went socket to socket, bar what arrived with the registry's answer head.
    let spliced = p.count("kache_proxy_spliced_bytes_total");
    assert!(
        spliced > 2.0 * (layer.len() - 64 * 1024) as f64,
        "spliced {spliced}"
    );
    assert_eq!(
        p.count("kache_proxy_sent_bytes_total"),
        2.0 * layer.len() as f64
    );
}

#[tokio::test]
async fn one_connection_serves_pings_manifests_heads_and_blobs_in_turn() {
    let layer = pattern(300 * 1024);
    let (_up, _cache, p, repo, m, ld) = stack(&layer).await;
    let mut raw = Raw::connect(p.addr).await;
    for round in 0..2 {
        raw.send(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
        raw.send(
            format!(
                "GET /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: {}\r\n\r\n",
                media_type::OCI_MANIFEST
            )
            .as_bytes(),
        )
        .await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200, "round {round}");
        assert_eq!(a.body, m);
        raw.send(format!("HEAD /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let a = raw.answer(true).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("content-length"),
            Some(m.len().to_string().as_str())
        );
        raw.send(format!("GET /v2/{repo}/blobs/{ld} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200);
        assert!(a.complete && a.body == layer);
        assert_eq!(
            a.header("docker-content-digest"),
            Some(ld.to_string().as_str())
        );
        raw.send(format!("HEAD /v2/{repo}/blobs/{ld} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let a = raw.answer(true).await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("content-length"),
            Some(layer.len().to_string().as_str())
        );
        // An unknown blob: the registry's 404, and the connection carries on.
        let unknown = Digest::sha256(b"nothing");
        raw.send(format!("GET /v2/{repo}/blobs/{unknown} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 404);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let layer = pattern(200 * 1024 + 3);
    let (_up, _cache, p, repo, m, ld) = stack(&layer).await;
    let mut raw = Raw::connect(p.addr).await;
    let mut all = Vec::new();
    for _ in 0..2 {
        all.extend_from_slice(
            format!("GET /v2/{repo}/blobs/{ld} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        all.extend_from_slice(
            format!("HEAD /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        all.extend_from_slice(
            format!("GET /v2/{repo}/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        all.extend_from_slice(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    // The last one asks to close: everything before it is still answered.
    all.extend_from_slice(
        format!("GET /v2/{repo}/blobs/{ld} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    raw.send(&all).await;
    for _ in 0..2 {
        let a = raw.answer(false).await;
        assert!(a.status == 200 && a.body == layer);
        let a = raw.answer(true).await;
        assert_eq!(
            a.header("content-length"),
            Some(m.len().to_string().as_str())
        );
        let a = raw.answer(false).await;
        assert_eq!(a.body, m);
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200);
    }
    let a = raw.answer(false).await;
    assert!(a.complete && a.body == layer);
    assert_eq!(a.header("connection"), Some("close"));
    assert!(raw.closed().await);
}

#[tokio::test]
async fn http_1_0_and_connection_close_end_the_connection() {
    let layer = pattern(100 * 1024);
    let (_up, _cache, p, repo, m, ld) = stack(&layer).await;
    for (request, keep) in [
        (format!("GET /v2/{repo}/blobs/{ld} HTTP/1.0\r\n\r\n"), false),
        (
            format!("GET /v2/{repo}/manifests/v1 HTTP/1.0\r\n\r\n"),
            false,
        ),
        (
            format!("GET /v2/{repo}/blobs/{ld} HTTP/1.1\r\nConnection: close\r\n\r\n"),
            false,
        ),
        (
            format!("GET /v2/{repo}/manifests/v1 HTTP/1.1\r\nConnection: close\r\n\r\n"),
            false,
        ),
        (
            format!("GET /v2/{repo}/blobs/{ld} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            true,
        ),
    ] {
        let mut raw = Raw::connect(p.addr).await;
        raw.send(request.as_bytes()).await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200, "{request}");
        assert!(a.body == layer || a.body == m, "{request}");
        if keep {
            assert_eq!(a.header("connection"), Some("keep-alive"));
            raw.send(b"GET /v2/ HTTP/1.0\r\n\r\n").await;
            assert_eq!(raw.answer(false).await.status, 200);
        }
        assert!(raw.closed().await, "{request}");
    }
}

#[tokio::test]
async fn an_oversize_head_gets_431_and_a_request_body_400() {
    let p = proxy(&closed_port(), "127.0.0.1:1", Duration::from_secs(1)).await;
    let mut raw = Raw::connect(p.addr).await;
    let mut big = b"GET /v2/ HTTP/1.1\r\n".to_vec();
    for i in 0..700 {
        big.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(90)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert!(big.len() > 64 * 1024);
    raw.send(&big).await;
    let a = raw.answer(false).await;
    assert_eq!(a.status, 431);
    assert!(raw.closed().await);

    for request in [
        &b"GET /v2/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
        &b"GET /v2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        &b"GET /v2/ HTTP/1.1\r\nContent-Length: five\r\n\r\n"[..],
    ] {
        let mut raw = Raw::connect(p.addr).await;
        raw.send(request).await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 400);
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert!(v["errors"][0]["message"].is_string());
        assert!(raw.closed().await);
    }
    // Not HTTP at all.
    let mut raw = Raw::connect(p.addr).await;
    raw.send(b"\x16\x03\x01 not http\r\n\r\n").await;
    assert_eq!(raw.answer(false).await.status, 400);
    assert!(raw.closed().await);
}

/// A registry on raw sockets: `reply` gets each request head and returns the bytes to answer
/// and whether to close the connection after them. Counts the connections it accepted.
async fn fake_registry(
    reply: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static,
) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let (bytes, close) = reply(&head);
                    if tcp.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), accepted)
}

fn blob_answer(body: &[u8], declared: usize) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\ncontent-type: application/octet-stream\r\nx-kache-cache: hit\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn a_registry_that_dies_mid_blob_leaves_a_short_body_and_a_closed_connection() {
    let body = pattern(1024 * 1024);
    let sent = body[..300 * 1024].to_vec();
    let (reg, _) = fake_registry(move |_| (blob_answer(&sent, 1024 * 1024), true)).await;
    let p = proxy(&reg, "127.0.0.1:1", Duration::from_secs(5)).await;
    let d = Digest::sha256(&body);
    let mut raw = Raw::connect(p.addr).await;
    raw.send(
        format!("GET /v2/docker.io/library/app/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    let a = raw.answer(false).await;
    assert_eq!(a.status, 200);
    assert!(!a.complete, "a body cut short must not look complete");
    assert_eq!(a.body, body[..300 * 1024]);
    assert!(raw.closed().await);
    // An HTTP client sees an error, not a blob.
    let r = client()
        .get(format!("{}/v2/docker.io/library/app/blobs/{d}", p.base))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err());
}

#[tokio::test]
async fn registry_connections_are_reused_and_a_closed_one_is_replaced() {
    let body = pattern(256 * 1024);
    let d = Digest::sha256(&body);
    let b = body.clone();
    let (reg, accepted) = fake_registry(move |_| (blob_answer(&b, b.len()), false)).await;
    let p = proxy(&reg, "127.0.0.1:1", Duration::from_secs(5)).await;
    let url = format!("{}/v2/docker.io/library/app/blobs/{d}", p.base);
    let c = client();
    for _ in 0..3 {
        assert!(c.get(&url).send().await.unwrap().bytes().await.unwrap() == body);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one registry connection, reused"
    );

    // A registry that closes every connection after one answer: each request still succeeds.
    let b = body.clone();
    let (reg, accepted) = fake_registry(move |_| (blob_answer(&b, b.len()), true)).await;
    let p = proxy(&reg, "127.0.0.1:1", Duration::from_secs(5)).await;
    let url = format!("{}/v2/docker.io/library/app/blobs/{d}", p.base);
    for _ in 0..3 {
        assert!(c.get(&url).send().await.unwrap().bytes().await.unwrap() == body);
    }
    assert!(accepted.load(Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn blobs_the_registry_fails_or_sends_chunked_still_arrive() {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let layer = pattern(150 * 1024);
    let (_, ld) = push_image(&c, &up.base, "app", "v1", &layer, None).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());
    let upstream_blob_gets =
        || up.count(r#"kache_registry_requests_total{route="blob",method="GET",status="200"}"#);

    // 500 from the registry: the upstream, straight.
    let (reg, _) = fake_registry(|_| {
        (
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom".to_vec(),
            false,
        )
    })
    .await;
    let p = proxy(&reg, &uh, Duration::from_secs(5)).await;
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == layer);
    assert_eq!(upstream_blob_gets(), 1.0);
    assert_eq!(
        p.count(&format!(
            r#"kache_proxy_requests_total{{upstream="{uh}",result="fallback"}}"#
        )),
        1.0
    );

    // A registry that accepts and never answers: the timeout sends the blob upstream.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
        }
    });
    let p = proxy(&silent_url, &uh, Duration::from_millis(300)).await;
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", p.base))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == layer);
    assert_eq!(upstream_blob_gets(), 2.0);

    // A chunked answer (no length to splice by) is relayed the general way, whole.
    let chunked = layer.clone();
    let (reg, _) = fake_registry(move |_| {
        let mut out =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kache-cache: miss\r\n\r\n"
                .to_vec();
        for piece in chunked.chunks(40_000) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        (out, false)
    })
    .await;
    let p = proxy(&reg, &uh, Duration::from_secs(5)).await;
    let mut raw = Raw::connect(p.addr).await;
    for _ in 0..2 {
        raw.send(format!("GET /v2/{repo}/blobs/{ld} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let a = raw.answer(false).await;
        assert_eq!(a.status, 200);
        assert!(a.complete && a.body == layer);
    }
    assert_eq!(upstream_blob_gets(), 2.0);
    assert_eq!(
        p.count(&format!(
            r#"kache_proxy_requests_total{{upstream="{uh}",result="miss"}}"#
        )),
        2.0
    );
}

#[tokio::test]
async fn ranges_and_h2c_still_work() {
    let layer = pattern(64 * 1024);
    let (_up, _cache, p, repo, m, ld) = stack(&layer).await;
    let c = client();
    let url = format!("{}/v2/{repo}/blobs/{ld}", p.base);
    // Warm it first: a range on a miss may be answered whole.
    assert!(c.get(&url).send().await.unwrap().bytes().await.unwrap() == layer);
    let r = c
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap(), layer[10..20]);

    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2.get(format!("{}/v2/", p.base)).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);
    let r = h2
        .get(format!("{}/v2/{repo}/manifests/v1", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), m);
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert!(r.bytes().await.unwrap() == layer);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_the_answer_in_flight() {
    // A registry that answers a blob's head and half its body, then waits for the test.
    let body = pattern(512 * 1024);
    let d = Digest::sha256(&body);
    let half = body.len() / 2;
    let b = body.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg = format!("http://{}", l.local_addr().unwrap());
    let (rest_tx, rest_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await.unwrap();
        tcp.write_all(&blob_answer(&b[..half], b.len()))
            .await
            .unwrap();
        let _ = rest_rx.await;
        tcp.write_all(&b[half..]).await.unwrap();
        let _ = tcp.read(&mut buf).await;
    });

    let mut prom = prometheus_client::registry::Registry::default();
    let p = Proxy::new(
        ProxyConfig {
            registry: reg.parse().unwrap(),
            registry_timeout: Duration::from_secs(5),
            private_images: false,
        },
        parts::upstream_client("127.0.0.1:1"),
        ProxyMetrics::new(&mut prom),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(p.serve(l, ServerKind::Kache, async {
        let _ = stop_rx.await;
    }));

    let mut idle = Raw::connect(addr).await;
    idle.send(b"GET /v2/ HTTP/1.1\r\n\r\n").await;
    assert_eq!(idle.answer(false).await.status, 200);
    let mut busy = Raw::connect(addr).await;
    busy.send(format!("GET /v2/docker.io/library/app/blobs/{d} HTTP/1.1\r\n\r\n").as_bytes())
        .await;
    // The head and the first half are through: the request is in flight.
    while busy.buf.len() < half {
        assert!(busy.fill().await > 0);
    }
    stop_tx.send(()).unwrap();
    assert!(
        idle.closed().await,
        "an idle connection is closed at shutdown"
    );
    assert!(!server.is_finished());
    rest_tx.send(()).unwrap();
    let a = busy.answer(false).await;
    assert!(a.complete && a.body == body);
    // Its head left before the shutdown; the connection closes after the answer.
    assert!(busy.closed().await);
    tokio::time::timeout(WAIT, server)
        .await
        .expect("the server returns once its connections are done")
        .unwrap()
        .unwrap();
}
