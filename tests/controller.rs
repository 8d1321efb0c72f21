//! `kache controller` against real Kubernetes API servers (1.20 and current, each test on both)
//! with kube-controller-manager,
//! the real webhook rewriting the pods, and a real `kache registry` pulling through from a real
//! upstream (CNCF distribution):
//!
//! - a Deployment's image becomes a CachedImage that is cached with the right digest, counts its
//!   pods and has its events; a Deployment with no pods and a CronJob (`batch/v1beta1` on 1.20,
//!   `batch/v1` on the current version) have their images pre-cached; a controller
//!   restart loses nothing and expires nothing early; a CachedImage deleted by hand while pods
//!   use it comes back; one made by hand with `retain` is cached and kept; scaling to 0 starts
//!   the expiry clock, and at expiry the CachedImage goes and its tag leaves the registry;
//! - an image the upstream lacks is Failed with the upstream's answer and retried until it
//!   appears; malformed references are Failed, not a crash; a pod's pull secret opens a
//!   password-protected upstream; a leader whose API server hangs stops leading before its Lease
//!   lapses and leads again later; the API server killed and restarted loses nothing;
//! - a NodeImageSet is warmed and becomes one DaemonSet pulling each image by digest through the
//!   proxy, with its node selector, tolerations and pace; its status and printer columns count
//!   the nodes; a tag moved upstream rolls a new digest out; its images are pinned in the
//!   registry until it is deleted, which removes the DaemonSet; a spec that cannot work (no
//!   image, a bad reference, a missing pull secret) says why in its Ready condition and gets no
//!   DaemonSet.

use kache_testkit as support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kache_api::{CachedImage, NodeImageSet, cached_image_name};
use kube::CustomResourceExt;
use serde_json::{Value, json};
use support::kube::{KubeServer, Version, non_loopback_name, pull_secret};
use support::metrics;
use support::pull::{Scratch, cache_repo, multi_layer_image};
use support::webhook::{Webhook, certificates, register};
use support::{Content, Distribution, DistributionKind, KacheRegistry};

const WAIT: Duration = Duration::from_secs(90);
const IMAGES: &str = "/apis/kache.io/v1alpha1/cachedimages";

struct Controller {
    child: Child,
    metrics: std::net::SocketAddr,
}

impl Controller {
    fn start(kubeconfig: &Path, registry: &str, identity: &str, log: &Path) -> Self {
        Self::start_with(kubeconfig, registry, identity, log, &[])
    }

    fn start_with(
        kubeconfig: &Path,
        registry: &str,
        identity: &str,
        log: &Path,
        extra: &[&str],
    ) -> Self {
        let ready = log.with_extension("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(env!("CARGO_BIN_EXE_kache"))
            .args(["controller", "--registry", registry, "--expiry-delay", "8s"])
            .args(["--lease-namespace", "kache", "--lease-duration", "6s"])
            .args(["--identity", identity])
            .args(["--metrics-listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("KACHE_LOG", "info,kache_controller=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let bound = support::process::wait_ready_file(&mut child, &ready, WAIT)
            .unwrap_or_else(|e| panic!("the controller never listened: {e:?}"));
        let metrics = bound["metrics"][0];
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

/// Applies the CRDs, as generated from the types (crates/api/crds.yaml is checked against them),
/// and waits until they are served.
fn install_crd(kube: &KubeServer) {
    install_crds(
        kube,
        &[
            serde_json::to_value(CachedImage::crd()).unwrap(),
            serde_json::to_value(NodeImageSet::crd()).unwrap(),
        ],
    );
}

/// Applies `crds` and waits until they are served.
fn install_crds(kube: &KubeServer, crds: &[Value]) {
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().unwrap();
        kube.ok(
            "POST",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            Some(crd),
        );
        kube.wait_for(
            &format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"),
            WAIT,
            |_, v| {
                v["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
                    .then_some(())
            },
        );
    }
}

/// A kubeconfig with only the rights the chart gives the controller, so that every test also
/// checks them.
fn least_privilege(kube: &KubeServer, dir: &Path) -> std::path::PathBuf {
    kube.namespace("kache");
    kube.apply_yaml(&support::helm::controller_rbac(kube));
    kube.service_account_kubeconfig("kache", "kache-controller", &dir.join("kubeconfig"))
}

/// A controller with the chart's rights and node pre-pull on (holder pods in `kache`, running
/// `image`); its log is `logs/first.log`.
fn node_images_controller(
    kube: &KubeServer,
    registry: &KacheRegistry,
    logs: &Path,
    image: &str,
) -> (Controller, std::path::PathBuf) {
    let log = logs.join("first.log");
    let kubeconfig = least_privilege(kube, logs);
    let controller = Controller::start_with(
        &kubeconfig,
        &registry.internal_url(),
        "only",
        &log,
        &[
            "--node-images-namespace",
            "kache",
            "--node-images-image",
            image,
        ],
    );
    (controller, log)
}

/// Creates a CachedImage by hand, with `retain`: how a user warms an image.
fn retained(kube: &KubeServer, name: &str, image: &str) {
    kube.ok(
        "POST",
        IMAGES,
        Some(&json!({
            "apiVersion": "kache.io/v1alpha1", "kind": "CachedImage",
            "metadata": {"name": name},
            "spec": {"sourceImage": image, "retain": true},
        })),
    );
}

/// The reasons of the events about a cluster-scoped object, as `kubectl describe` finds them.
fn event_reasons(kube: &KubeServer, name: &str) -> Vec<String> {
    let v = kube.ok(
        "GET",
        &format!("/api/v1/events?fieldSelector=involvedObject.name={name}"),
        None,
    );
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Polls `check` until it returns None, for at most WAIT; its last Some is the failure message.
fn eventually(mut check: impl FnMut() -> Option<String>) {
    let deadline = std::time::Instant::now() + WAIT;
    while let Some(why) = check() {
        assert!(std::time::Instant::now() < deadline, "{why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls a controller's `kache_controller_cached_images{phase}` until it equals `want`.
fn wait_phase_count(c: &Controller, phase: &str, want: f64, log: &dyn Fn() -> String) {
    eventually(|| {
        let text = metrics::scrape(&format!("http://{}/metrics", c.metrics));
        let got = metrics::value(&text, "kache_controller_cached_images", &[("phase", phase)]);
        (got != want).then(|| format!("{phase} images: {got}, never {want}\n{}", log()))
    });
}

/// Polls a controller's `kache_controller_is_leader` until it equals `want` (the metrics
/// listener may not be up yet).
fn wait_leader(c: &Controller, want: f64, log: &dyn Fn() -> String) {
    eventually(|| {
        (c.is_leader() != Some(want)).then(|| format!("is_leader never {want}\n{}", log()))
    });
}

/// Creates a Deployment in the namespace `t`.
fn create_deployment(kube: &KubeServer, deployment: &Value) {
    kube.ok(
        "POST",
        "/apis/apps/v1/namespaces/t/deployments",
        Some(deployment),
    );
}

#[test]
fn deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry_on_1_20() {
    deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry(Version::Oldest);
}

#[test]
fn deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry_on_current() {
    deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry(Version::Current);
}

fn deployments_get_cached_images_that_count_pods_expire_and_leave_the_registry(version: Version) {
    let kube = KubeServer::start(version);
    let s = Scratch::new("kache-e2e-controller");
    install_crd(&kube);

    // A real upstream with three images, a real registry in front of it.
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (web, idle, kept, batch) = (
        multi_layer_image(60),
        multi_layer_image(70),
        multi_layer_image(80),
        multi_layer_image(75),
    );
    let src = s.layout(
        "src",
        &[
            ("web", &web),
            ("idle", &idle),
            ("kept", &kept),
            ("batch", &batch),
        ],
    );
    for (tag, repo) in [
        ("web", "team/web:v1"),
        ("idle", "team/idle:v1"),
        ("kept", "team/kept:v1"),
        ("batch", "team/batch:v1"),
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
    let kubeconfig = least_privilege(&kube, logs.path());
    let mut first = Controller::start(
        &kubeconfig,
        &registry.internal_url(),
        "first",
        &log("first.log"),
    );

    let web_image = format!("{host}/team/web:v1");
    let web_name = cached_image_name(&web_image);
    let web_path = format!("{IMAGES}/{web_name}");
    create_deployment(&kube, &deployment("web", &format!("{host}/team/web:v1"), 3));
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
    // The registry holds the tag: a HEAD of it is a hit (within the tag TTL, the upstream is
    // not asked).
    let tag_url = format!(
        "{}/v2/{}/manifests/v1",
        registry.base_url(),
        cache_repo(&host, "team/web")
    );
    let held = || {
        let r = support::http::head(&tag_url, &support::pull::manifest_headers());
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("x-kache-cache").map(str::to_owned)
    };
    assert_eq!(held().as_deref(), Some("hit"));
    assert_eq!(first.is_leader(), Some(1.0), "{}", read_log("first.log"));
    // What `kubectl describe cachedimage` lists.
    let reasons = event_reasons(&kube, &web_name);
    assert!(
        reasons.contains(&"Caching".to_owned()) && reasons.contains(&"Cached".to_owned()),
        "{reasons:?}"
    );
    wait_phase_count(&first, "Cached", 1.0, &|| read_log("first.log"));

    // A second replica waits for the Lease.
    let second = Controller::start(
        &kubeconfig,
        &registry.internal_url(),
        "second",
        &log("second.log"),
    );
    // Up, and a follower from the start: it never held the Lease the first one holds.
    eventually(|| second.is_leader().is_none().then(|| read_log("second.log")));
    assert_eq!(second.is_leader(), Some(0.0));
    // A follower counts nothing, so a sum over replicas is the cluster's count.
    wait_phase_count(&second, "Cached", 0.0, &|| read_log("second.log"));

    // A Deployment with no pods still gets its image cached, and (unused) it expires.
    let idle_image = format!("{host}/team/idle:v1");
    create_deployment(&kube, &deployment("idle", &idle_image, 0));
    let idle_ci = kube.wait_for(
        &format!("{IMAGES}/{}", cached_image_name(&idle_image)),
        WAIT,
        |code, v| (code == 200 && v["status"]["digest"] == idle.digest()).then(|| v.clone()),
    );
    assert_eq!(idle_ci["status"]["usedBy"]["count"], 0);

    // So does a CronJob's, in the version's own API: `batch/v1beta1` on 1.20, where `batch/v1`
    // has no CronJob, and `batch/v1` on the current version, which no longer serves v1beta1.
    let batch_image = format!("{host}/team/batch:v1");
    let group_version = match version {
        Version::Oldest => "batch/v1beta1",
        Version::Current => "batch/v1",
    };
    kube.ok(
        "POST",
        &format!("/apis/{group_version}/namespaces/t/cronjobs"),
        Some(&json!({
            "apiVersion": group_version, "kind": "CronJob",
            "metadata": {"name": "nightly"},
            "spec": {
                "schedule": "0 0 1 1 *", "suspend": true,
                "jobTemplate": {"spec": {"template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "c", "image": batch_image}],
                }}}},
            },
        })),
    );
    let other = match version {
        Version::Oldest => "batch/v1",
        Version::Current => "batch/v1beta1",
    };
    let (code, _) = kube.request("GET", &format!("/apis/{other}/namespaces/t/cronjobs"), None);
    assert_eq!(code, 404, "{other} CronJobs are not served on {version:?}");
    kube.wait_for(
        &format!("{IMAGES}/{}", cached_image_name(&batch_image)),
        WAIT,
        |code, v| (code == 200 && v["status"]["digest"] == batch.digest()).then_some(()),
    );

    // The leader stops as Kubernetes stops it (SIGTERM): it deletes its Lease on the way out, so
    // the second does not wait for it to lapse but makes a Lease of its own (no transition
    // counted, as on a Lease taken over). The web image keeps its three pods and no expiry.
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/kache/leases/kache-controller";
    assert_eq!(
        kube.ok("GET", lease_path, None)["spec"]["holderIdentity"],
        "first"
    );
    match support::process::terminate(&mut first.child, Duration::from_secs(10)) {
        support::process::Stopped::Exited(status) => assert!(status.success(), "{status}"),
        support::process::Stopped::Killed => panic!("the leader did not stop on SIGTERM"),
    }
    assert!(
        read_log("first.log").contains("Lease released"),
        "{}",
        read_log("first.log")
    );
    wait_leader(&second, 1.0, &|| read_log("second.log"));
    let lease = kube.ok("GET", lease_path, None);
    assert_eq!(lease["spec"]["holderIdentity"], "second", "{lease}");
    assert_eq!(lease["spec"]["leaseTransitions"], 0, "{lease}");
    let after = kube.ok("GET", &web_path, None);
    assert_eq!(after["status"]["usedBy"]["count"], 3, "{after}");
    assert!(after["spec"].get("expiresAt").is_none(), "{after}");

    // Deleted by hand while its pods run: it comes back, cached again, without a pod event.
    kube.ok("DELETE", &web_path, None);
    let old_uid = after["metadata"]["uid"].clone();
    let again = kube.wait_for(&web_path, WAIT, |code, v| {
        (code == 200
            && v["metadata"]["uid"] != old_uid
            && v["status"]["phase"] == "Cached"
            && v["status"]["usedBy"]["count"] == 3)
            .then(|| v.clone())
    });
    assert_eq!(again["status"]["digest"], web.digest(), "{again}");

    // A CachedImage made by hand with retain: cached, and kept though no pod uses it.
    let kept_image = format!("{host}/team/kept:v1");
    let kept_path = format!("{IMAGES}/warm-kept");
    retained(&kube, "warm-kept", &kept_image);
    let kept_ci = kube.wait_for(&kept_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached").then(|| v.clone())
    });
    assert_eq!(kept_ci["status"]["digest"], kept.digest(), "{kept_ci}");
    assert!(kept_ci["spec"].get("expiresAt").is_none(), "{kept_ci}");
    // web and kept; idle is Expiring or already gone.
    wait_phase_count(&second, "Cached", 2.0, &|| read_log("second.log"));

    // The registry knows which images the cluster keeps: the ones in use or retained are
    // pinned (never evicted), the idle one is not.
    let kept_list = || {
        let r = support::http::get(&format!("{}/kache/v1/images", registry.internal_url()), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        let list = r.json();
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["image"].as_str().unwrap().to_owned(), i["pinned"] == true))
            .collect::<std::collections::BTreeMap<String, bool>>()
    };
    let in_cache = |repo: &str| format!("{}:v1", cache_repo(&host, repo));
    eventually(|| {
        let list = kept_list();
        (list.get(&in_cache("team/web")) != Some(&true)
            || list.get(&in_cache("team/kept")) != Some(&true)
            || list.get(&in_cache("team/idle")).is_some_and(|p| *p))
        .then(|| format!("{list:?}\n{}", read_log("second.log")))
    });

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
    let reasons = event_reasons(&kube, &web_name);
    assert!(
        reasons.contains(&"Expiring".to_owned()) && reasons.contains(&"Expired".to_owned()),
        "{reasons:?}"
    );
    // Long past the expiry delay, the retained image is still there, still Cached.
    let kept_ci = kube.ok("GET", &kept_path, None);
    assert_eq!(kept_ci["status"]["phase"], "Cached", "{kept_ci}");
    assert!(kept_ci["spec"].get("expiresAt").is_none(), "{kept_ci}");
    eventually(|| {
        let list = kept_list();
        list.contains_key(&in_cache("team/web"))
            .then(|| format!("web is still kept: {list:?}"))
    });
    // The tag went from the registry: a HEAD of it is fetched from the upstream again.
    assert_eq!(
        held().as_deref(),
        Some("miss"),
        "the tag is still in the registry: {}",
        read_log("second.log")
    );
    drop(webhook);
}

/// A TCP relay to the API server that can be frozen: bytes already in flight and new
/// connections are held, unanswered, as with an API server that hangs (which a real one does
/// not do on demand).
struct Relay {
    addr: std::net::SocketAddr,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(target: &str) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = target.to_owned();
        let flag = frozen.clone();
        // The threads end with the test process; each copies until its peer closes.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay { addr, frozen }
    }

    fn freeze(&self, on: bool) {
        self.frozen.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A Kubernetes Secret of type dockerconfigjson with Basic credentials for `host`.
#[test]
fn failures_are_reported_and_retried_pull_secrets_are_used_and_an_api_server_restart_loses_nothing_on_1_20()
 {
    failures_are_reported_and_retried_pull_secrets_are_used_and_an_api_server_restart_loses_nothing(
        Version::Oldest,
    );
}

#[test]
fn failures_are_reported_and_retried_pull_secrets_are_used_and_an_api_server_restart_loses_nothing_on_current()
 {
    failures_are_reported_and_retried_pull_secrets_are_used_and_an_api_server_restart_loses_nothing(
        Version::Current,
    );
}

fn failures_are_reported_and_retried_pull_secrets_are_used_and_an_api_server_restart_loses_nothing(
    version: Version,
) {
    let kube = KubeServer::start(version);
    let s = Scratch::new("kache-e2e-controller-faults");
    install_crd(&kube);

    // An open upstream, and one that wants a password.
    let open = Distribution::start(DistributionKind::Open);
    let open_host = non_loopback_name(&open.host());
    let password = "pull-pw-71c2e0";
    let private = Distribution::start(DistributionKind::htpasswd("puller", password));
    let private_host = non_loopback_name(&private.host());
    let (late, app, other, fresh) = (
        multi_layer_image(90),
        multi_layer_image(91),
        multi_layer_image(92),
        multi_layer_image(93),
    );
    let src = s.layout(
        "src",
        &[
            ("late", &late),
            ("app", &app),
            ("other", &other),
            ("fresh", &fresh),
        ],
    );
    let creds = format!("puller:{password}");
    for (tag, repo) in [("app", "team/app:v1"), ("other", "team/other:v1")] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{private_host}/{repo}"),
            &["--dest-creds", &creds],
        );
    }
    // No global credentials: only a pull secret opens the private upstream.
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            &format!("{open_host},{private_host}"),
        ],
    );

    let certs = tempfile::tempdir().unwrap();
    let ca = certificates(certs.path());
    let webhook = Webhook::start(certs.path());
    register(&kube, &webhook, &ca);
    kube.namespace("t");

    let logs = tempfile::tempdir().unwrap();
    let _dump = DumpOnPanic(logs.path().to_owned());
    let log = logs.path().join("first.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // The controller reaches the API server through a relay the test can freeze.
    let relay = Relay::start(kube.api.trim_start_matches("https://"));
    let kubeconfig = least_privilege(&kube, logs.path());
    std::fs::write(
        &kubeconfig,
        std::fs::read_to_string(&kubeconfig)
            .unwrap()
            .replace(&kube.api, &format!("https://{}", relay.addr)),
    )
    .unwrap();
    let mut controller = Controller::start(&kubeconfig, &registry.internal_url(), "only", &log);

    // An image the upstream does not have yet: Failed with the upstream's answer, a Warning
    // event, and retried with backoff until the image appears.
    let late_image = format!("{open_host}/team/late:v1");
    let late_path = format!("{IMAGES}/warm-late");
    retained(&kube, "warm-late", &late_image);
    let failed = kube.wait_for(&late_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Failed").then(|| v.clone())
    });
    // The upstream's own words, as the registry relayed them.
    let message = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("MANIFEST_UNKNOWN") && message.contains(&open_host),
        "{failed}"
    );
    assert_eq!(
        failed["status"]["conditions"][0]["status"], "False",
        "{failed}"
    );
    assert!(
        event_reasons(&kube, "warm-late").contains(&"Failed".to_owned()),
        "{:?}",
        event_reasons(&kube, "warm-late")
    );
    s.skopeo.copy(
        &format!("{src}:late"),
        &format!("docker://{open_host}/team/late:v1"),
        &[],
    );
    let recovered = kube.wait_for(&late_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached").then(|| v.clone())
    });
    assert_eq!(recovered["status"]["digest"], late.digest(), "{recovered}");
    assert!(recovered["status"].get("message").is_none(), "{recovered}");

    // A malformed object gets a clear Failed, and the controller goes on.
    for (name, image) in [
        ("bad-case", format!("{open_host}/Team/App:v1")),
        ("bad-garbage", "not an image reference at all".to_owned()),
    ] {
        retained(&kube, name, &image);
        let bad = kube.wait_for(&format!("{IMAGES}/{name}"), WAIT, |code, v| {
            (code == 200 && v["status"]["phase"] == "Failed").then(|| v.clone())
        });
        assert_eq!(event_reasons(&kube, name), ["Failed"]);
        assert!(
            bad["status"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not a normalised image reference"),
            "{bad}"
        );
    }

    // A pod's pull secret opens the private upstream; without one the upstream's refusal shows.
    kube.ok(
        "POST",
        "/api/v1/namespaces/t/secrets",
        Some(&pull_secret("creds", &private_host, "puller", password)),
    );
    let mut with_secret = deployment("app", &format!("{private_host}/team/app:v1"), 2);
    with_secret["spec"]["template"]["spec"]["imagePullSecrets"] = json!([{"name": "creds"}]);
    create_deployment(&kube, &with_secret);
    let app_path = format!(
        "{IMAGES}/{}",
        cached_image_name(&format!("{private_host}/team/app:v1"))
    );
    let app_ci = kube.wait_for(&app_path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached" && v["status"]["usedBy"]["count"] == 2)
            .then(|| v.clone())
    });
    assert_eq!(app_ci["status"]["digest"], app.digest(), "{app_ci}");
    assert_eq!(
        app_ci["spec"]["pullSecrets"],
        json!([{"namespace": "t", "name": "creds"}])
    );
    create_deployment(
        &kube,
        &deployment("other", &format!("{private_host}/team/other:v1"), 1),
    );
    let other_ci = kube.wait_for(
        &format!(
            "{IMAGES}/{}",
            cached_image_name(&format!("{private_host}/team/other:v1"))
        ),
        WAIT,
        |code, v| (code == 200 && v["status"]["phase"] == "Failed").then(|| v.clone()),
    );
    let message = other_ci["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("UNAUTHORIZED") && message.contains(&private_host),
        "{other_ci}"
    );
    // Retried with backoff: the repeats are one event with a count, not an event each.
    let other_name = other_ci["metadata"]["name"].as_str().unwrap();
    kube.wait_for(
        &format!("/apis/events.k8s.io/v1/namespaces/kube-system/events?fieldSelector=regarding.name={other_name}"),
        WAIT,
        |_, v| {
            let failed: Vec<_> = v["items"].as_array()?.iter().filter(|e| e["reason"] == "Failed").collect();
            (failed.len() == 1 && failed[0]["series"]["count"].as_i64() >= Some(2)).then_some(())
        },
    );

    // The API server hangs: the leader cannot renew its Lease, so it stops leading before the
    // Lease lapses (another replica could take it then), and leads again once it can.
    relay.freeze(true);
    wait_leader(&controller, 0.0, &read_log);
    relay.freeze(false);
    wait_leader(&controller, 1.0, &read_log);

    // The API server is killed and comes back: the controller reconnects, takes its Lease
    // again and goes on; nothing in use expires.
    kube.restart_apiserver();
    s.skopeo.copy(
        &format!("{src}:fresh"),
        &format!("docker://{open_host}/team/fresh:v1"),
        &[],
    );
    let fresh_image = format!("{open_host}/team/fresh:v1");
    create_deployment(&kube, &deployment("fresh", &fresh_image, 1));
    let fresh_ci = kube.wait_for(
        &format!("{IMAGES}/{}", cached_image_name(&fresh_image)),
        WAIT,
        |code, v| {
            (code == 200 && v["status"]["phase"] == "Cached" && v["status"]["usedBy"]["count"] == 1)
                .then(|| v.clone())
        },
    );
    assert_eq!(fresh_ci["status"]["digest"], fresh.digest(), "{fresh_ci}");
    assert!(
        controller.child.try_wait().unwrap().is_none(),
        "the controller exited:\n{}",
        read_log()
    );
    assert_eq!(controller.is_leader(), Some(1.0), "{}", read_log());
    // Well past the expiry delay (8 s) since the restart: the images in use are all there.
    let app_ci = kube.ok("GET", &app_path, None);
    assert_eq!(app_ci["status"]["usedBy"]["count"], 2, "{app_ci}");
    assert!(app_ci["spec"].get("expiresAt").is_none(), "{app_ci}");
    assert_eq!(app_ci["status"]["phase"], "Cached", "{app_ci}");
    drop(webhook);
}

#[test]
fn private_images_are_granted_to_namespaces_whose_own_secrets_the_upstream_accepts_on_1_20() {
    private_images_are_granted_to_namespaces_whose_own_secrets_the_upstream_accepts(
        Version::Oldest,
    );
}

#[test]
fn private_images_are_granted_to_namespaces_whose_own_secrets_the_upstream_accepts_on_current() {
    private_images_are_granted_to_namespaces_whose_own_secrets_the_upstream_accepts(
        Version::Current,
    );
}

/// With private-image scoping (the chart's `privateImages`, and its RBAC): the webhook adds the
/// token Secret to pods with pull secrets, the controller writes that Secret in their namespace
/// and has the registry check each namespace's own credentials upstream; a namespace whose
/// secret is wrong gets an AccessRefused event and no grant, and one whose secret is deleted
/// loses its grant at the next check.
fn private_images_are_granted_to_namespaces_whose_own_secrets_the_upstream_accepts(
    version: Version,
) {
    use base64::Engine as _;
    let kube = KubeServer::start(version);
    let s = Scratch::new("kache-e2e-controller-private");
    install_crd(&kube);
    let password = "scoped-pw-5e1b";
    let private = Distribution::start(DistributionKind::htpasswd("puller", password));
    let host = non_loopback_name(&private.host());
    let image = multi_layer_image(95);
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/team/app:v1"),
        &["--dest-creds", &format!("puller:{password}")],
    );
    let keys_dir = s.path("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    std::fs::write(keys_dir.join("k1"), [7u8; 32]).unwrap();
    let keys = kache_wire::pull_token::Keys::from_dir(&keys_dir).unwrap();
    let keys_arg = keys_dir.to_str().unwrap();
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &["--insecure-registry", &host, "--pull-token-keys", keys_arg],
    );

    let certs = tempfile::tempdir().unwrap();
    let ca = certificates(certs.path());
    let webhook = Webhook::start_with(certs.path(), &["--pull-secret", "kache-pull"]);
    register(&kube, &webhook, &ca);
    let logs = tempfile::tempdir().unwrap();
    let _dump = DumpOnPanic(logs.path().to_owned());
    let log = logs.path().join("first.log");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Exactly the chart's rights with privateImages on.
    kube.namespace("kache");
    kube.apply_yaml(&support::helm::controller_rbac_with(
        &kube,
        &["--set", "privateImages.enabled=true"],
    ));
    let kubeconfig = kube.service_account_kubeconfig(
        "kache",
        "kache-controller",
        &logs.path().join("kubeconfig"),
    );
    let _controller = Controller::start_with(
        &kubeconfig,
        &registry.internal_url(),
        "only",
        &log,
        &[
            "--pull-token-keys",
            keys_arg,
            "--pull-secret",
            "kache-pull",
            "--grant-renewal",
            "1s",
        ],
    );

    let app = format!("{host}/team/app:v1");
    // a: the right password; c: a wrong one; b: no pull secret at all.
    for (ns, pw) in [("a", Some(password)), ("b", None), ("c", Some("wrong"))] {
        kube.namespace(ns);
        let mut d = deployment("app", &app, 1);
        if let Some(pw) = pw {
            kube.ok(
                "POST",
                &format!("/api/v1/namespaces/{ns}/secrets"),
                Some(&pull_secret("creds", &host, "puller", pw)),
            );
            d["spec"]["template"]["spec"]["imagePullSecrets"] = json!([{"name": "creds"}]);
        }
        kube.ok(
            "POST",
            &format!("/apis/apps/v1/namespaces/{ns}/deployments"),
            Some(&d),
        );
    }

    // The webhook named the token Secret in the pods with pull secrets, and only there.
    for (ns, want) in [
        ("a", json!([{"name": "creds"}, {"name": "kache-pull"}])),
        ("b", json!(null)),
    ] {
        let pods = kube.wait_for(&format!("/api/v1/namespaces/{ns}/pods"), WAIT, |_, v| {
            (!v["items"].as_array()?.is_empty()).then(|| v.clone())
        });
        assert_eq!(pods["items"][0]["spec"]["imagePullSecrets"], want, "{ns}");
    }
    // The controller wrote a's token Secret for localhost:7439; b needs none.
    let secret = kube.wait_for(
        "/api/v1/namespaces/a/secrets/kache-pull",
        WAIT,
        |code, v| (code == 200).then(|| v.clone()),
    );
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    let config: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(secret["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let token_a = keys.sign("a").unwrap();
    assert_eq!(
        config["auths"]["localhost:7439"]["password"], token_a,
        "{config}"
    );
    let (code, _) = kube.request("GET", "/api/v1/namespaces/b/secrets/kache-pull", None);
    assert_eq!(code, 404);

    // a is granted; c is refused with an event; nobody else reads.
    let repo = cache_repo(&host, "team/app");
    let grants =
        || support::get(&format!("{}/kache/v1/grants", registry.internal_url()), &[]).json();
    eventually(|| {
        let g = grants();
        let held: Vec<&str> = g
            .as_array()
            .expect("a list of grants")
            .iter()
            .filter_map(|g| g["namespace"].as_str())
            .collect();
        (held != ["a"]).then(|| format!("grants {g}\n{}", read_log()))
    });
    let read = |token: &str| {
        support::get(
            &format!("{}/v2/{repo}/manifests/v1", registry.base_url()),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .status
    };
    assert_eq!(read(&token_a), 200);
    for ns in ["b", "c"] {
        assert_eq!(read(&keys.sign(ns).unwrap()), 401, "{ns}");
    }
    let name = cached_image_name(&app);
    eventually(|| {
        let reasons = event_reasons(&kube, &name);
        (!reasons.contains(&"AccessRefused".to_owned()))
            .then(|| format!("{reasons:?}\n{}", read_log()))
    });

    // A second key, whose id sorts last: the controller signs with it and rewrites the Secret
    // by itself; the registry reads the new token at once (it reads the keys again when a
    // token names one it lacks).
    std::fs::write(keys_dir.join("k2"), [0x5a; 32]).unwrap();
    let rotated = kache_wire::pull_token::Keys::from_dir(&keys_dir).unwrap();
    let token_a2 = rotated.sign("a").unwrap();
    assert!(token_a2.starts_with("v1.k2."), "{token_a2}");
    eventually(|| {
        let (_, s) = kube.request("GET", "/api/v1/namespaces/a/secrets/kache-pull", None);
        let config: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(s["data"][".dockerconfigjson"].as_str().unwrap_or_default())
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        let password = &config["auths"]["localhost:7439"]["password"];
        (*password != json!(token_a2)).then(|| format!("the Secret still holds {password}"))
    });
    assert_eq!(read(&token_a2), 200);

    // a's secret deleted: its grant ends at the next check.
    kube.ok("DELETE", "/api/v1/namespaces/a/secrets/creds", None);
    eventually(|| {
        let g = grants();
        let empty = g.as_array().expect("a list of grants").is_empty();
        (!empty).then(|| format!("grants {g}\n{}", read_log()))
    });
    assert_eq!(read(&token_a2), 401);
}

#[test]
fn node_image_sets_become_digest_pinned_daemon_sets_and_say_what_is_missing_on_1_20() {
    node_image_sets_become_digest_pinned_daemon_sets_and_say_what_is_missing(Version::Oldest);
}

#[test]
fn node_image_sets_become_digest_pinned_daemon_sets_and_say_what_is_missing_on_current() {
    node_image_sets_become_digest_pinned_daemon_sets_and_say_what_is_missing(Version::Current);
}

fn node_image_sets_become_digest_pinned_daemon_sets_and_say_what_is_missing(version: Version) {
    const SETS: &str = "/apis/kache.io/v1alpha1/nodeimagesets";
    const DAEMON_SETS: &str = "/apis/apps/v1/namespaces/kache/daemonsets";
    const KACHE_IMAGE: &str = "registry.example/kache/kache:test";
    let kube = KubeServer::start(version);
    let s = Scratch::new("kache-e2e-controller-node-images");
    install_crd(&kube);
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (a, b, moved) = (
        multi_layer_image(61),
        multi_layer_image(62),
        multi_layer_image(63),
    );
    let src = s.layout("src", &[("a", &a), ("b", &b), ("moved", &moved)]);
    for (tag, repo) in [
        ("a", "team/a:v1"),
        ("b", "team/b:v1"),
        ("b", "team/c:v1"),
        ("b", "team/d:v1"),
        ("b", "team/e:v1"),
    ] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/{repo}"),
            &[],
        );
    }
    // Tags asked upstream again after a second: the moved tag below is seen at the next resolve.
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &["--insecure-registry", &host, "--tag-ttl", "1s"],
    );
    // Two nodes (objects only: what the DaemonSet controller counts); one is selected.
    for (name, pool) in [("n1", "ci"), ("n2", "web")] {
        kube.ok(
            "POST",
            "/api/v1/nodes",
            Some(&json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"pool": pool}}})),
        );
    }
    kube.namespace("t");
    let logs = tempfile::tempdir().unwrap();
    let _dump = DumpOnPanic(logs.path().to_owned());
    let (controller, log) = node_images_controller(&kube, &registry, logs.path(), KACHE_IMAGE);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let image_a = format!("{host}/team/a:v1");
    let image_b = format!("{host}/team/b:v1");
    kube.ok(
        "POST",
        SETS,
        Some(&json!({
            "apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "ci"},
            "spec": {
                "images": [image_a, image_b, image_a],
                "nodeSelector": {"pool": "ci"},
                // Every taint: these nodes have no kubelet, so the node controller taints them.
                "tolerations": [{"operator": "Exists"}],
                "rollout": {"maxUnavailable": "50%"},
            },
        })),
    );
    let proxied =
        |repo: &str, digest: &str| format!("localhost:7439/{}@{digest}", cache_repo(&host, repo));
    let init_images = |ds: &Value| -> Vec<String> {
        ds["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["image"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let ds_path = format!("{DAEMON_SETS}/kache-images-ci-0");
    let ds = kube.wait_for(&ds_path, WAIT, |code, v| (code == 200).then(|| v.clone()));
    assert_eq!(
        init_images(&ds),
        [
            KACHE_IMAGE.to_owned(),
            proxied("team/a", a.digest()),
            proxied("team/b", b.digest()),
        ],
        "{}",
        read_log()
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"], json!({"pool": "ci"}));
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["containers"][0]["command"], json!(["/kache/hold"]));
    assert_eq!(pod["initContainers"][1]["command"], json!(["/kache/noop"]));
    assert_eq!(
        pod["initContainers"][1]["securityContext"]["runAsUser"],
        65532
    );
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        "50%"
    );
    assert_eq!(ds["metadata"]["ownerReferences"][0]["name"], "ci");

    // The status counts the selected node (no kubelet here: none is ready), and says so.
    let set = kube.wait_for(&format!("{SETS}/ci"), WAIT, |_, v| {
        (v["status"]["desiredNodes"] == 1).then(|| v.clone())
    });
    let status = &set["status"];
    assert_eq!(status["imageCount"], 2, "{set}");
    assert_eq!(status["readyNodes"], 0, "{set}");
    assert_eq!(status["images"][0]["digest"], a.digest(), "{set}");
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "False");
    assert_eq!(status["conditions"][0]["reason"], "Rolling", "{set}");
    let (columns, rows) = kube.table(SETS);
    assert_eq!(columns, ["Name", "Images", "Desired", "Ready", "Age"]);
    assert_eq!(rows[0][..4], ["ci", "2", "1", "0"]);
    eventually(|| {
        let text = metrics::scrape(&format!("http://{}/metrics", controller.metrics));
        let got = metrics::value(
            &text,
            "kache_controller_nodeimageset_desired_nodes",
            &[("set", "ci")],
        );
        (got != 1.0).then(|| format!("desired_nodes {got}"))
    });

    // Its images are pinned in the registry, by tag and by digest.
    let kept = || support::get(&format!("{}/kache/v1/images", registry.internal_url()), &[]).json();
    // The registry lists them by cache repository.
    let by_digest_a = format!("{}@{}", cache_repo(&host, "team/a"), a.digest());
    eventually(|| {
        let k = kept();
        let pinned = k["images"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["image"] == by_digest_a.as_str() && i["pinned"] == true);
        (!pinned).then(|| format!("{by_digest_a} not pinned: {k}"))
    });

    // The tag moves upstream; a change of spec resolves it again and rolls the new digest out.
    s.skopeo.copy(
        &format!("{src}:moved"),
        &format!("docker://{host}/team/a:v1"),
        &[],
    );
    kube.ok(
        "PATCH",
        &format!("{SETS}/ci"),
        Some(&json!({"spec": {"refresh": "1h"}})),
    );
    let want = proxied("team/a", moved.digest());
    kube.wait_for(&ds_path, WAIT, |_, v| {
        init_images(v).contains(&want).then_some(())
    });

    // Specs that cannot work: the condition says why, and there is no DaemonSet.
    kube.ok(
        "POST",
        "/api/v1/namespaces/t/secrets",
        Some(&pull_secret("unrelated", &host, "u", "p")),
    );
    for (name, spec, why) in [
        (
            "empty",
            json!({"images": []}),
            "spec.images is empty".to_owned(),
        ),
        (
            "bad",
            json!({"images": [image_a, "Not A Reference"]}),
            "spec.images[1] \"Not A Reference\" is not an image reference".to_owned(),
        ),
        (
            "secret",
            json!({"images": [image_b], "pullSecrets": [{"namespace": "t", "name": "creds"}]}),
            "spec.pullSecrets: Secret t/creds does not exist".to_owned(),
        ),
    ] {
        kube.ok(
            "POST",
            SETS,
            Some(
                &json!({"apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
                "metadata": {"name": name}, "spec": spec}),
            ),
        );
        let set = kube.wait_for(&format!("{SETS}/{name}"), WAIT, |_, v| {
            (v["status"]["conditions"][0]["reason"] == "InvalidSpec").then(|| v.clone())
        });
        let message = set["status"]["conditions"][0]["message"].as_str().unwrap();
        assert!(message.starts_with(&why), "{name}: {message}");
        let (code, _) = kube.request("GET", &format!("{DAEMON_SETS}/kache-images-{name}-0"), None);
        assert_eq!(code, 404, "{name}");
        eventually(|| {
            let reasons = event_reasons(&kube, name);
            (!reasons.contains(&"InvalidSpec".to_owned())).then(|| format!("{name}: {reasons:?}"))
        });
    }
    // The missing Secret appears: the set goes on by itself.
    kube.ok(
        "POST",
        "/api/v1/namespaces/t/secrets",
        Some(&pull_secret("creds", &host, "u", "p")),
    );
    let ds = kube.wait_for(
        &format!("{DAEMON_SETS}/kache-images-secret-0"),
        WAIT,
        |code, v| (code == 200).then(|| v.clone()),
    );
    assert_eq!(init_images(&ds)[1], proxied("team/b", b.digest()));

    // Five images make two lanes, each a DaemonSet of its own; with two images left, the second
    // lane goes.
    let five: Vec<String> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|r| format!("{host}/team/{r}:v1"))
        .collect();
    kube.ok(
        "POST",
        SETS,
        Some(
            &json!({"apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "wide"}, "spec": {"images": five}}),
        ),
    );
    let lane = |i: usize| format!("{DAEMON_SETS}/kache-images-wide-{i}");
    let first = kube.wait_for(&lane(0), WAIT, |code, v| (code == 200).then(|| v.clone()));
    let second = kube.wait_for(&lane(1), WAIT, |code, v| (code == 200).then(|| v.clone()));
    assert_eq!(
        init_images(&first)[1..],
        [
            proxied("team/a", moved.digest()),
            proxied("team/b", b.digest()),
            proxied("team/c", b.digest()),
        ]
    );
    assert_eq!(
        init_images(&second)[1..],
        [proxied("team/d", b.digest()), proxied("team/e", b.digest())]
    );
    kube.ok(
        "PATCH",
        &format!("{SETS}/wide"),
        Some(&json!({"spec": {"images": &five[..2]}})),
    );
    kube.wait_for(&lane(1), WAIT, |code, _| (code == 404).then_some(()));
    let first = kube.wait_for(&lane(0), WAIT, |_, v| {
        (init_images(v).len() == 3).then(|| v.clone())
    });
    assert_eq!(
        init_images(&first)[1..],
        [
            proxied("team/a", moved.digest()),
            proxied("team/b", b.digest())
        ]
    );

    // An image the registry cannot get: reported with the warm's reason and no node, counted in
    // the metrics; the set's other images are held all the same.
    let missing = format!("{host}/team/missing:v1");
    kube.ok(
        "POST",
        SETS,
        Some(
            &json!({"apiVersion": "kache.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "partial"}, "spec": {"images": [image_b, missing]}}),
        ),
    );
    let set = kube.wait_for(&format!("{SETS}/partial"), WAIT, |_, v| {
        v["status"]["failures"]
            .as_array()?
            .iter()
            .any(|f| f["image"] == missing.as_str() && f["reason"] == "WarmFailed")
            .then(|| v.clone())
    });
    assert!(set["status"]["failures"][0].get("node").is_none(), "{set}");
    assert_eq!(set["status"]["conditions"][0]["status"], "False", "{set}");
    let ds = kube.wait_for(
        &format!("{DAEMON_SETS}/kache-images-partial-0"),
        WAIT,
        |code, v| (code == 200).then(|| v.clone()),
    );
    assert_eq!(
        init_images(&ds)[1..],
        [proxied("team/b", b.digest())],
        "{ds}"
    );
    eventually(|| {
        let text = metrics::scrape(&format!("http://{}/metrics", controller.metrics));
        let got = metrics::value(
            &text,
            "kache_controller_nodeimageset_failures",
            &[("set", "partial")],
        );
        (got != 1.0).then(|| format!("failures {got}"))
    });
    eventually(|| {
        let reasons = event_reasons(&kube, "partial");
        (!reasons.contains(&"WarmFailed".to_owned())).then(|| format!("{reasons:?}"))
    });

    // Deleting the sets holding team/a removes their DaemonSets and unpins its digests.
    kube.ok("DELETE", &format!("{SETS}/ci"), None);
    kube.ok("DELETE", &format!("{SETS}/wide"), None);
    kube.wait_for(&ds_path, WAIT, |code, _| (code == 404).then_some(()));
    kube.wait_for(&lane(0), WAIT, |code, _| (code == 404).then_some(()));
    let by_digest_moved = format!("{}@{}", cache_repo(&host, "team/a"), moved.digest());
    eventually(|| {
        let k = kept();
        let held =
            k["images"].as_array().into_iter().flatten().any(|i| {
                i["image"] == by_digest_moved.as_str() || i["image"] == by_digest_a.as_str()
            });
        held.then(|| format!("still kept after the set went: {k}"))
    });
}

/// An API server without the NodeImageSet CRD (`helm upgrade` installs no new CRD): the
/// controller says what to do, and runs CachedImages as before.
#[test]
fn without_the_node_image_set_crd_the_controller_says_so_and_runs_the_rest() {
    let kube = KubeServer::start(Version::Current);
    let s = Scratch::new("kache-e2e-controller-no-sets");
    install_crds(&kube, &[serde_json::to_value(CachedImage::crd()).unwrap()]);
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let image = multi_layer_image(64);
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/team/kept:v1"),
        &[],
    );
    let registry =
        KacheRegistry::start_with_internal(s.path("data"), &["--insecure-registry", &host]);
    let logs = tempfile::tempdir().unwrap();
    let _dump = DumpOnPanic(logs.path().to_owned());
    let (_controller, log) = node_images_controller(&kube, &registry, logs.path(), "k/k:1");
    retained(&kube, "kept", &format!("{host}/team/kept:v1"));
    let cached = kube.wait_for(&format!("{IMAGES}/kept"), WAIT, |_, v| {
        (v["status"]["phase"] == "Cached").then(|| v.clone())
    });
    assert_eq!(cached["status"]["digest"], image.digest());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("does not serve NodeImageSets")
            && text.contains("kache crds | kubectl apply -f -"),
        "{text}"
    );
}
