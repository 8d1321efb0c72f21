//! The node proxy over real HTTP on 127.0.0.1: in front of a pull-through registry, and on its
//! own when that registry is down, failing or silent.

use std::sync::Arc;
use std::time::Duration;

use kache_oci::upstream::{Upstream, UpstreamConfig};
use kache_oci::{Digest, media_type};
use kache_proxy::{Proxy, ProxyConfig, ProxyMetrics};
use kache_registry::{Access, Metrics, Registry};
use kache_store::Store;
use reqwest::{Client, StatusCode};
use serde_json::json;

struct Served {
    addr: std::net::SocketAddr,
    prom: Arc<prometheus_client::registry::Registry>,
    _dir: Option<tempfile::TempDir>,
}

impl Served {
    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self, series: &str) -> f64 {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom).unwrap();
        out.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new()
}

async fn serve(app: axum::Router) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

fn upstream_client(host: &str) -> Upstream {
    Upstream::new(UpstreamConfig {
        insecure_registries: vec![host.to_owned()],
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    })
    .unwrap()
}

/// A kache registry; with `pull_from`, a pull-through cache of that host.
async fn registry(pull_from: Option<&str>) -> Served {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap().0);
    let mut prom = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut prom);
    let reg = match pull_from {
        Some(h) => Registry::with_pull_through(
            store,
            metrics,
            upstream_client(h),
            Duration::from_secs(3600),
        ),
        None => Registry::new(store, metrics),
    };
    let addr = serve(reg.router_for(Access::ReadWrite)).await;
    Served {
        addr,
        prom: Arc::new(prom),
        _dir: Some(dir),
    }
}

async fn proxy(registry: &str, upstream_host: &str, timeout: Duration) -> Served {
    let mut prom = prometheus_client::registry::Registry::default();
    let p = Proxy::new(
        ProxyConfig {
            registry: registry.to_owned(),
            registry_timeout: timeout,
        },
        upstream_client(upstream_host),
        ProxyMetrics::new(&mut prom),
    )
    .unwrap();
    let addr = serve(p.router()).await;
    Served {
        addr,
        prom: Arc::new(prom),
        _dir: None,
    }
}

/// Pushes a one-layer image; returns (manifest bytes, layer digest).
async fn push_image(
    c: &Client,
    base: &str,
    repo: &str,
    tag: &str,
    layer: &[u8],
) -> (Vec<u8>, Digest) {
    let mut digests = Vec::new();
    for b in [&b"{}"[..], layer] {
        let d = Digest::sha256(b);
        let r = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
            .body(b.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        digests.push(d);
    }
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media_type::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0].to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digests[1].to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", media_type::OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    (m, digests[1].clone())
}

fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    format!("http://{a}")
}

#[tokio::test]
async fn pulls_go_through_the_registry_and_count_hits_and_misses() {
    let c = client();
    let up = registry(None).await;
    let uh = up.addr.to_string();
    let (m, ld) = push_image(&c, &up.base(), "app", "v1", b"layer bytes").await;
    let cache = registry(Some(&uh)).await;
    let p = proxy(&cache.base(), &uh, Duration::from_secs(2)).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());

    assert_eq!(
        c.get(format!("{}/v2/", p.base()))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    for _ in 0..2 {
        let r = c
            .get(format!("{}/v2/{repo}/manifests/v1", p.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], media_type::OCI_MANIFEST);
        assert_eq!(r.bytes().await.unwrap(), m);
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{ld}", p.base()))
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
            p.base(),
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
    let (m, ld) = push_image(&c, &up.base(), "app", "v1", b"fallback layer").await;
    let p = proxy(&closed_port(), &uh, Duration::from_secs(2)).await;
    let repo = format!("127.0.0.1_{}/app", up.addr.port());
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", p.base()))
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
        .head(format!("{}/v2/{repo}/manifests/v1", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), "fallback layer");
    // containerd's mirror form falls back too, its ns percent-encoded.
    let r = c
        .get(format!(
            "{}/v2/app/manifests/v1?ns={}",
            p.base(),
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
        .get(format!("{}/v2/{repo}/manifests/v404", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // The kubelet's ping never depends on the registry.
    assert_eq!(
        c.get(format!("{}/v2/", p.base()))
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
    let (m, _) = push_image(&c, &up.base(), "app", "v1", b"x").await;
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
        c.get(format!("{}/v2/{repo}/manifests/v1", p.base()))
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
        c.get(format!("{}/v2/{repo}/manifests/v1", p.base()))
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
    let p = proxy(&empty.base(), &uh, Duration::from_secs(2)).await;
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", p.base()))
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
    let r = c
        .put(format!("{}/v2/a/manifests/v1", p.base()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    let r = c
        .get(format!("{}/v2/UPPER/manifests/v1", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
    // A plain repository names no upstream: with the registry down there is nowhere to go.
    let r = c
        .get(format!("{}/v2/plain/manifests/v1", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}
