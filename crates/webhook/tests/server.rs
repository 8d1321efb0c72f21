//! The admission server over real TLS on 127.0.0.1: reviews, refusals, metrics, and certificate
//! rotation under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kache_http::serve_tls;
use kache_webhook::{Policy, ReloadingCert, Webhook, WebhookMetrics, server_config};
use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio::sync::oneshot;

/// A test CA (rustls refuses a self-signed serving certificate that is its own CA).
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A serving certificate for 127.0.0.1, as the PEM files cert-manager would mount.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, "kache test CA");
        let cert = ca.self_signed(&key).unwrap();
        Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(ca, key),
        }
    }

    fn leaf(&self, serial: u8, name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        p.serial_number = Some(SerialNumber::from_slice(&[serial]));
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Replaces `path` the way a careful writer does: a temporary file, then a rename over.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Server {
    addr: SocketAddr,
    certs: Arc<ReloadingCert>,
    prom: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    watch: tokio::task::JoinHandle<()>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Server {
    async fn start(dir: &Path, leaf: &Leaf, policy: Policy) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        replace(&cert_path, &leaf.cert_pem);
        replace(&key_path, &leaf.key_pem);
        let certs = ReloadingCert::load(&cert_path, &key_path).unwrap();
        let watch = tokio::spawn(certs.clone().watch(Duration::from_millis(50)));
        let mut prom = Registry::default();
        let hook = Webhook::new(policy, WebhookMetrics::new(&mut prom));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_tls(
            listener,
            server_config(certs.clone()).unwrap(),
            hook.router(),
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            certs,
            prom,
            stop: Some(stop),
            task,
            watch,
            cert_path,
            key_path,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.addr.port())
    }

    async fn stop(mut self) {
        self.watch.abort();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.prom).unwrap();
        out
    }
}

/// A client trusting only the test CA.
fn client(pki: &Pki) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client that opens a new connection, with a full handshake, for every request: a resumed
/// TLS session would show the certificate of the session it resumes, not the one served now.
fn fresh_client(pki: &Pki) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.resumption = rustls::client::Resumption::disabled();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test]
async fn answers_reviews_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let server = Server::start(dir.path(), &pki.leaf(1, "kache-webhook"), Policy::default()).await;
    let c = client(&pki);

    // A pod: patched, uid echoed, over HTTP/2.
    let res = c
        .post(server.url())
        .header("content-type", "application/json")
        .body(fixture("create_replicaset_pod.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["response"]["uid"], "3f6a1c2e-8d4b-4b7e-9a51-2c0d7e9f1a01");
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["patchType"], "JSONPatch");
    let bytes = STANDARD
        .decode(v["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        patch[0],
        serde_json::json!({"op": "replace", "path": "/spec/containers/0/image", "value": "localhost:7439/docker.io/library/nginx:1.19"})
    );
    assert!(v["response"].get("warnings").is_none());

    // Warnings reach the answer.
    let v: Value = c
        .post(server.url())
        .body(fixture("create_applied_pod.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["response"]["warnings"].as_array().unwrap().len(), 2);

    // Not a pod: allowed, no patch.
    let v: Value = c
        .post(server.url())
        .body(fixture("create_deployment.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert_eq!(v["response"]["uid"], "0d9c8b7a-6f5e-4d3c-2b1a-09f8e7d6c5b4");
    assert!(v["response"].get("patch").is_none());

    // Opted out: allowed, no patch.
    let v: Value = c
        .post(server.url())
        .body(fixture("create_opted_out_pod.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none());

    // Not a review: 400 with a reason.
    let res = c.post(server.url()).body("hello").send().await.unwrap();
    assert_eq!(res.status(), 400);
    let text = res.text().await.unwrap();
    assert!(text.contains("not an AdmissionReview"), "{text}");

    // Too big: 413.
    let res = c
        .post(server.url())
        .body(vec![b' '; kache_webhook::MAX_BODY + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    // Only POST /mutate.
    assert_eq!(c.get(server.url()).send().await.unwrap().status(), 405);
    let other = server.url().replace("/mutate", "/validate");
    assert_eq!(c.post(other).send().await.unwrap().status(), 404);

    // HTTP/1.1 clients too.
    let h1 = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap()])
        .http1_only()
        .build()
        .unwrap();
    let res = h1
        .post(server.url())
        .body(fixture("create_bare_pod.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert_eq!(res.status(), 200);

    let m = server.metrics();
    for line in [
        "kache_webhook_reviews_total 5",
        "kache_webhook_patched_total 3",
        "kache_webhook_skipped_total{reason=\"not_pod\"} 1",
        "kache_webhook_skipped_total{reason=\"unparsable\"} 1",
        "kache_webhook_skipped_total{reason=\"too_long\"} 1",
        "kache_webhook_skipped_total{reason=\"pull_never\"} 1",
        "kache_webhook_skipped_total{reason=\"already_proxied\"} 1",
        "kache_webhook_skipped_total{reason=\"pod_opt_out\"} 1",
        "kache_webhook_review_duration_seconds_count 5",
    ] {
        assert!(m.contains(line), "{line} missing from\n{m}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_bad_pair_is_ignored_until_a_good_one_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let a = pki.leaf(1, "a");
    let b = pki.leaf(2, "b");
    let server = Server::start(dir.path(), &a, Policy::default()).await;
    server.watch.abort();
    let certs = &server.certs;
    let current = || certs.current().cert[0].to_vec();
    assert!(!certs.reload().unwrap(), "nothing changed");

    replace(&server.cert_path, "-----BEGIN CERTIFICATE-----\ngarbage\n");
    assert!(certs.reload().is_err());
    assert_eq!(current(), a.der);
    // The same content is not retried (no log every second), a change is.
    assert!(!certs.reload().unwrap());

    // Half of a new pair: B's certificate with A's key.
    replace(&server.cert_path, &b.cert_pem);
    let err = certs.reload().unwrap_err();
    assert!(err.to_string().contains("usable pair"), "{err}");
    assert_eq!(current(), a.der);

    replace(&server.key_path, &b.key_pem);
    assert!(certs.reload().unwrap());
    assert_eq!(current(), b.der);

    std::fs::remove_file(&server.key_path).unwrap();
    assert!(certs.reload().is_err());
    assert_eq!(current(), b.der);
    server.stop().await;
}

#[tokio::test]
async fn rotation_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let old = pki.leaf(1, "kache-webhook-old");
    let new = pki.leaf(2, "kache-webhook-new");
    let server = Server::start(dir.path(), &old, Policy::default()).await;
    let c = fresh_client(&pki);
    let body = fixture("create_replicaset_pod.json");

    let mut seen = Vec::new();
    let mut rotated = false;
    let mut new_since = 0;
    // Bounded: the rotation starts at request 30; at most 2,000 requests in all.
    for i in 0..2000 {
        if i == 30 {
            // The key first: for a while the files do not match and the old pair stays.
            replace(&server.key_path, &new.key_pem);
            rotated = true;
        }
        if i == 60 {
            replace(&server.cert_path, &new.cert_pem);
        }
        let res = c
            .post(server.url())
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        assert_eq!(res.status(), 200, "request {i}");
        let peer = res
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|t| t.peer_certificate())
            .expect("the peer certificate")
            .to_vec();
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["response"]["allowed"], true, "request {i}");
        seen.push(peer.clone());
        if peer == new.der {
            new_since += 1;
            if new_since == 20 {
                break;
            }
        } else {
            assert_eq!(peer, old.der, "request {i}: an unknown certificate");
            assert_eq!(new_since, 0, "request {i}: the old certificate came back");
        }
        if (30..60).contains(&i) {
            // Slow enough that the watcher polls while the pair is half written.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(rotated);
    assert_eq!(new_since, 20, "the new certificate was never served");
    assert_eq!(seen[0], old.der);
    // Nothing was served from the half-written pair.
    let first_new = seen.iter().position(|d| *d == new.der).unwrap();
    assert!(
        first_new >= 60,
        "new certificate before it was complete: {first_new}"
    );
    server.stop().await;
}
