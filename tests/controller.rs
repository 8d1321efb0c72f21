//! `kache controller` against a real Kubernetes 1.20 API server with kube-controller-manager,
//! the real webhook rewriting the pods, and a real `kache registry` pulling through from a real
//! upstream (CNCF distribution): a Deployment's image becomes a CachedImage that is cached with
//! the right digest and counts its pods, a Deployment with no pods has its image pre-cached,
//! a controller restart loses nothing and expires nothing early, a CachedImage made by hand with
//! `retain` is cached and kept, scaling to 0 starts the expiry
//! clock, and at expiry the CachedImage goes and its tag leaves the registry.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kache_api::{CachedImage, cached_image_name};
use kube::CustomResourceExt;
use serde_json::{Value, json};
use support::kube::KubeServer;
use support::metrics;
use support::pull::{Scratch, cache_repo, multi_layer_image};
use support::registry::free_local_addr;
use support::webhook::{Webhook, certificates, register};
use support::{Content, Distribution, DistributionKind, KacheRegistry};

const WAIT: Duration = Duration::from_secs(90);
const IMAGES: &str = "/apis/kache.io/v1alpha1/cachedimages";

struct Controller {
    child: Child,
    metrics: std::net::SocketAddr,
}

impl Controller {
    fn start(kube: &KubeServer, registry: &str, identity: &str, log: &Path) -> Self {
        let metrics = free_local_addr();
        let child = Command::new(env!("CARGO_BIN_EXE_kache"))
            .args(["controller", "--registry", registry, "--expiry-delay", "8s"])
            .args(["--lease-namespace", "default", "--lease-duration", "6s"])
            .args(["--identity", identity])
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .env("KUBECONFIG", kube.kubeconfig())
            .env("KACHE_LOG", "info,kache_controller=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Controller { child, metrics }
    }

    fn is_leader(&self) -> Option<f64> {
        std::net::TcpStream::connect(self.metrics).ok()?;
        let text = metrics::scrape(&format!("http://{}/metrics", self.metrics));
        Some(metrics::value(&text, "kache_controller_is_leader", &[]))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The upstream as `<this host's name>:<port>`: the webhook leaves loopback registries
/// (`127.0.0.1`, `localhost`) alone, as a node-local registry has nothing to cache, so the pods
/// must name the upstream by a name; the machine's own resolves to loopback in /etc/hosts.
fn non_loopback_name(addr: &str) -> String {
    use std::net::ToSocketAddrs;
    let name = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let name = name.trim();
    let port = addr.rsplit_once(':').unwrap().1;
    let host = format!("{name}:{port}");
    let resolved: Vec<_> = host
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    assert!(
        !name.is_empty()
            && name != "localhost"
            && resolved
                .iter()
                .any(|a: &std::net::SocketAddr| a.ip().is_loopback()),
        "this test needs the host name ({name:?}) to resolve to 127.0.0.1 (/etc/hosts): {resolved:?}"
    );
    host
}

/// Prints the controllers' logs when the test fails: what they decided, and why.
struct DumpOnPanic(std::path::PathBuf);

impl Drop for DumpOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["first.log", "second.log"] {
                let text = std::fs::read_to_string(self.0.join(name)).unwrap_or_default();
                let from = (text.len().saturating_sub(20_000)..text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                let tail = &text[from..];
                eprintln!("----- controller {name} -----\n{tail}");
            }
        }
    }
}

fn deployment(name: &str, image: &str, replicas: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": image}]}},
        },
    })
}

#[test]
fn deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry() {
    let kube = KubeServer::start();
    let s = Scratch::new("kache-e2e-controller");

    // The CRD, as generated from the types (api/crds.yaml is checked against them).
    kube.ok(
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some(&serde_json::to_value(CachedImage::crd()).unwrap()),
    );
    kube.wait_for(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/cachedimages.kache.io",
        WAIT,
        |_, v| {
            v["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
                .then_some(())
        },
    );

    // A real upstream with three images, a real registry in front of it.
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (web, idle, kept) = (
        multi_layer_image(60),
        multi_layer_image(70),
        multi_layer_image(80),
    );
    let src = s.layout("src", &[("web", &web), ("idle", &idle), ("kept", &kept)]);
    for (tag, repo) in [
        ("web", "team/web:v1"),
        ("idle", "team/idle:v1"),
        ("kept", "team/kept:v1"),
    ] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/{repo}"),
            &[],
        );
    }
    let registry =
        KacheRegistry::start_with_internal(s.path("data"), &["--insecure-registry", &host]);

    let certs = tempfile::tempdir().unwrap();
    let ca = certificates(certs.path());
    let webhook = Webhook::start(certs.path());
    register(&kube, &webhook, &ca);
    kube.namespace("t");

    let logs = tempfile::tempdir().unwrap();
    let _dump = DumpOnPanic(logs.path().to_owned());
    let log = |n: &str| logs.path().join(n);
    let read_log = |n: &str| std::fs::read_to_string(log(n)).unwrap_or_default();
    let mut first = Controller::start(&kube, &registry.internal_url(), "first", &log("first.log"));

    let web_image = format!("{host}/team/web:v1");
    let web_name = cached_image_name(&web_image);
    let web_path = format!("{IMAGES}/{web_name}");
    kube.ok(
        "POST",
        "/apis/apps/v1/namespaces/t/deployments",
        Some(&deployment("web", &format!("{host}/team/web:v1"), 3)),
    );
    let cached = kube.wait_for(&web_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached" && v["status"]["usedBy"]["count"] == 3)
            .then(|| v.clone())
    });
    assert_eq!(cached["spec"]["sourceImage"], web_image.as_str());
    assert_eq!(cached["status"]["digest"], web.digest(), "{cached}");
    assert!(cached["status"]["size"].as_i64().unwrap() > 0);
    assert_eq!(cached["status"]["platforms"], json!(["linux/amd64"]));
    assert!(cached["spec"].get("expiresAt").is_none(), "{cached}");
    let pods: Vec<_> = cached["status"]["usedBy"]["pods"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        pods.iter()
            .all(|p| p.as_str().unwrap().starts_with("t/web-")),
        "{pods:?}"
    );
    assert_eq!(
        cached["metadata"]["finalizers"],
        json!(["kache.io/registry-tag"])
    );
    // The registry holds it: its own tag list, which never asks the upstream.
    let tags_url = format!(
        "{}/v2/{}/tags/list",
        registry.base_url(),
        cache_repo(&host, "team/web")
    );
    let tags = support::http::get(&tags_url, &[]);
    assert!(String::from_utf8_lossy(&tags.body).contains("\"v1\""));
    assert_eq!(first.is_leader(), Some(1.0), "{}", read_log("first.log"));

    // A second replica waits for the Lease.
    let second = Controller::start(
        &kube,
        &registry.internal_url(),
        "second",
        &log("second.log"),
    );
    let deadline = std::time::Instant::now() + WAIT;
    while second.is_leader().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            read_log("second.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(second.is_leader(), Some(0.0));

    // A Deployment with no pods still gets its image cached, and (unused) it expires.
    let idle_image = format!("{host}/team/idle:v1");
    kube.ok(
        "POST",
        "/apis/apps/v1/namespaces/t/deployments",
        Some(&deployment("idle", &idle_image, 0)),
    );
    let idle_ci = kube.wait_for(
        &format!("{IMAGES}/{}", cached_image_name(&idle_image)),
        WAIT,
        |code, v| (code == 200 && v["status"]["digest"] == idle.digest()).then(|| v.clone()),
    );
    assert_eq!(idle_ci["status"]["usedBy"]["count"], 0);

    // The leader goes away: the second takes over, and the web image keeps its three pods and
    // no expiry.
    let _ = first.child.kill();
    let _ = first.child.wait();
    let deadline = std::time::Instant::now() + WAIT;
    while second.is_leader() != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            read_log("second.log")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = kube.ok("GET", &web_path, None);
    assert_eq!(after["status"]["usedBy"]["count"], 3, "{after}");
    assert!(after["spec"].get("expiresAt").is_none(), "{after}");

    // A CachedImage made by hand with retain: cached, and kept though no pod uses it.
    let kept_image = format!("{host}/team/kept:v1");
    let kept_path = format!("{IMAGES}/warm-kept");
    kube.ok(
        "POST",
        IMAGES,
        Some(&json!({
            "apiVersion": "kache.io/v1alpha1", "kind": "CachedImage",
            "metadata": {"name": "warm-kept"},
            "spec": {"sourceImage": kept_image, "retain": true},
        })),
    );
    let kept_ci = kube.wait_for(&kept_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached").then(|| v.clone())
    });
    assert_eq!(kept_ci["status"]["digest"], kept.digest(), "{kept_ci}");
    assert!(kept_ci["spec"].get("expiresAt").is_none(), "{kept_ci}");

    // What `kubectl get cachedimages` shows.
    let (columns, rows) = kube.table(IMAGES);
    assert_eq!(
        columns,
        [
            "Name", "Image", "Phase", "Size", "Pods", "Retain", "Expires", "Age"
        ]
    );
    let row = rows
        .iter()
        .find(|r| r[0] == web_name)
        .expect("a row for web");
    assert_eq!(row[1], web_image);
    assert_eq!(row[2], "Cached");
    assert_eq!(row[3], cached["status"]["size"].to_string());
    assert_eq!(row[4], "3");
    assert_eq!(row[5], "false");

    // Scale to 0: the clock starts, then the CachedImage and the registry's tag go.
    kube.ok(
        "PATCH",
        "/apis/apps/v1/namespaces/t/deployments/web",
        Some(&json!({"spec": {"replicas": 0}})),
    );
    // expiresAt (spec) and usedBy (status) are two writes: wait for both.
    let expiring = kube.wait_for(&web_path, WAIT, |code, v| {
        (code == 200 && v["spec"]["expiresAt"].is_string() && v["status"]["usedBy"]["count"] == 0)
            .then(|| v.clone())
    });
    assert_eq!(expiring["status"]["phase"], "Expiring", "{expiring}");
    kube.wait_for(&web_path, WAIT, |code, _| (code == 404).then_some(()));
    // Long past the expiry delay, the retained image is still there, still Cached.
    let kept_ci = kube.ok("GET", &kept_path, None);
    assert_eq!(kept_ci["status"]["phase"], "Cached", "{kept_ci}");
    assert!(kept_ci["spec"].get("expiresAt").is_none(), "{kept_ci}");
    let tags = support::http::get(&tags_url, &[]);
    assert!(
        !String::from_utf8_lossy(&tags.body).contains("\"v1\""),
        "the tag is still in the registry: {}\n{}",
        String::from_utf8_lossy(&tags.body),
        read_log("second.log")
    );
    drop(webhook);
}
