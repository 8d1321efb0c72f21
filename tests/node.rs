//! kache as users run it, on a real node (scripts/kube-test-node: kubelet, containerd's CRI,
//! runc) of the current Kubernetes: the registry, the webhook and the controller as pods from the
//! kache image, the proxy as a hostNetwork DaemonSet on 127.0.0.1:7439, and upstream registries
//! (CNCF distribution, and one that drips a layer slowly) named by this machine's name, never
//! loopback, so that the webhook rewrites their images. Then, in one sequence (one node per
//! machine):
//!
//! - a Deployment's pod is rewritten, pulled by the kubelet through the proxy and the registry,
//!   runs, and its CachedImage is Cached;
//! - a pod labelled `kache.io/image-caching-policy: ignore` pulls straight from the upstream;
//! - with the registry stopped, the proxy falls back to the upstream and a new pod starts;
//! - the proxy killed in the middle of a pull: the kubelet retries and the pod starts;
//! - a private image and a pod's `imagePullSecrets`: the kubelet's anonymous pull through the
//!   proxy is refused, the controller caches the image with the pod's secret, and the kubelet's
//!   next try starts the pod from the cache, with no manual step;
//! - the upstream stopped and the node's copy of the image removed, content included: a new pod
//!   still starts, every byte from kache.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use kache_api::{CachedImage, cached_image_name};
use kube::CustomResourceExt;
use serde_json::{Value, json};
use support::containerd::skip_unless_root;
use support::kube::{KubeServer, Version, non_loopback_name, pull_secret};
use support::metrics;
use support::node::{KubeNode, build_kache_image};
use support::pull::Scratch;
use support::webhook::{certificates, free_addr};
use support::{
    Content, Distribution, DistributionKind, Fault, FaultyUpstream, Flavor, Image, ImageBuilder,
};

/// The kache image, as the node knows it (imported, never pulled).
const KACHE_IMAGE: &str = "test.invalid/kache:e2e";
/// kache's namespace.
const NS: &str = "kache";
/// The workloads' namespace.
const APPS: &str = "apps";
/// Long enough for a pull on a slow machine; every wait ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(180);

/// The ports kache's pods listen on, on the node's 127.0.0.1 (hostNetwork).
struct Ports {
    registry: String,
    internal: String,
    registry_metrics: String,
    proxy_metrics: String,
    webhook: String,
    webhook_metrics: String,
    controller_metrics: String,
}

impl Ports {
    fn new() -> Self {
        Ports {
            registry: free_addr(),
            internal: free_addr(),
            registry_metrics: free_addr(),
            proxy_metrics: free_addr(),
            webhook: free_addr(),
            webhook_metrics: free_addr(),
            controller_metrics: free_addr(),
        }
    }
}

fn port(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// A runnable image: the node's pause program as its entrypoint (it runs until killed), and a
/// layer of `size` bytes of its own.
fn runnable(pause: &[u8], seed: u64, size: usize) -> Image {
    ImageBuilder::new(Flavor::Oci)
        .program("pause", pause.to_vec())
        .random_layer(seed, &[size / 2, size - size / 2])
        .build()
}

/// A kache container (user 65532, read-only root, no capabilities, RuntimeDefault seccomp) in
/// a hostNetwork pod, ready when `/readyz` on its metrics listener answers.
fn kache_pod(component: &str, args: Vec<String>, metrics: &str, extra: Value) -> Value {
    let mut spec = json!({
        "hostNetwork": true,
        "dnsPolicy": "Default",
        "automountServiceAccountToken": false,
        "securityContext": {
            "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": component,
            "image": KACHE_IMAGE,
            "imagePullPolicy": "Never",
            "args": args,
            "securityContext": {
                "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
            },
            "readinessProbe": {
                "httpGet": {"host": "127.0.0.1", "port": port(metrics), "path": "/readyz"},
                "periodSeconds": 1,
            },
        }],
    });
    merge(&mut spec, extra);
    json!({
        "metadata": {"labels": {"app": format!("kache-{component}")}},
        "spec": spec,
    })
}

/// JSON merge (RFC 7386 without deletion): `extra`'s fields over `base`'s, arrays replaced.
fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn workload(kind: &str, name: &str, replicas: Option<u32>, template: Value) -> Value {
    let mut spec = json!({
        "selector": {"matchLabels": {"app": format!("kache-{name}")}},
        "template": template,
    });
    if let Some(n) = replicas {
        spec["replicas"] = json!(n);
    }
    json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": format!("kache-{name}"), "namespace": NS}, "spec": spec})
}

/// The registry, proxy, webhook and controller, as the chart will run them.
fn deploy_kache(
    kube: &KubeServer,
    ports: &Ports,
    data: &Path,
    certs: &Path,
    upstreams: &[&str],
    ca: &str,
) {
    kube.namespace(NS);
    kube.ok(
        "POST",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        Some(&serde_json::to_value(CachedImage::crd()).unwrap()),
    );
    kube.apply_yaml(include_str!("../deploy/controller-rbac.yaml"));
    let insecure: Vec<String> = upstreams
        .iter()
        .flat_map(|h| ["--insecure-registry".to_owned(), (*h).to_owned()])
        .collect();
    let args = |base: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| (*s).to_owned())
            .chain(insecure.iter().cloned())
            .collect()
    };

    // The registry: its store on the node's disk (a hostPath stands in for the PVC), so that it
    // survives the registry's pod.
    let registry = kache_pod(
        "registry",
        args(&[
            "registry",
            "--listen",
            &ports.registry,
            "--internal-listen",
            &ports.internal,
            "--metrics-listen",
            &ports.registry_metrics,
            "--data-dir",
            "/var/lib/kache",
        ]),
        &ports.registry_metrics,
        json!({"volumes": [{"name": "data", "hostPath": {"path": data.to_str().unwrap(), "type": "Directory"}}]}),
    );
    let registry = with_mounts(
        registry,
        json!([{"name": "data", "mountPath": "/var/lib/kache"}]),
    );
    kube.ok(
        "POST",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments"),
        Some(&workload("Deployment", "registry", Some(1), registry)),
    );

    let proxy = kache_pod(
        "proxy",
        args(&[
            "proxy",
            "--listen",
            "127.0.0.1:7439",
            "--registry",
            &format!("http://{}", ports.registry),
            "--metrics-listen",
            &ports.proxy_metrics,
        ]),
        &ports.proxy_metrics,
        json!({"priorityClassName": "system-node-critical", "tolerations": [{"operator": "Exists"}]}),
    );
    kube.ok(
        "POST",
        &format!("/apis/apps/v1/namespaces/{NS}/daemonsets"),
        Some(&workload("DaemonSet", "proxy", None, proxy)),
    );

    // The webhook's serving pair, as cert-manager would put it in a Secret.
    use base64::Engine as _;
    let b64 = |p: &str| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap());
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{NS}/secrets"),
        Some(&json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "kache-webhook-tls"},
            "data": {
                "tls.crt": b64(certs.join("tls.crt").to_str().unwrap()),
                "tls.key": b64(certs.join("tls.key").to_str().unwrap()),
            },
        })),
    );
    let webhook = kache_pod(
        "webhook",
        vec![
            "webhook".into(),
            "--listen".into(),
            ports.webhook.clone(),
            "--metrics-listen".into(),
            ports.webhook_metrics.clone(),
            "--tls-cert".into(),
            "/tls/tls.crt".into(),
            "--tls-key".into(),
            "/tls/tls.key".into(),
        ],
        &ports.webhook_metrics,
        json!({"volumes": [{"name": "tls", "secret": {"secretName": "kache-webhook-tls"}}]}),
    );
    let webhook = with_mounts(
        webhook,
        json!([{"name": "tls", "mountPath": "/tls", "readOnly": true}]),
    );
    kube.ok(
        "POST",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments"),
        Some(&workload("Deployment", "webhook", Some(1), webhook)),
    );

    // The controller reaches the API server on the node's 127.0.0.1 (there is no kube-proxy to
    // serve the `kubernetes` Service's address).
    let api_port = kube.api.rsplit_once(':').unwrap().1.to_owned();
    let mut controller = kache_pod(
        "controller",
        vec![
            "controller".into(),
            "--registry".into(),
            format!("http://{}", ports.internal),
            "--metrics-listen".into(),
            ports.controller_metrics.clone(),
            "--lease-namespace".into(),
            NS.into(),
        ],
        &ports.controller_metrics,
        json!({"serviceAccountName": "kache-controller", "automountServiceAccountToken": true}),
    );
    controller["spec"]["containers"][0]["env"] = json!([
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": api_port},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]);
    kube.ok(
        "POST",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments"),
        Some(&workload("Deployment", "controller", Some(1), controller)),
    );

    // Registered by URL (the webhook listens on the node's loopback, which the API server on
    // this machine reaches), for every namespace but kache's own and kube-system.
    kube.ok(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
        Some(&json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "kache"},
            "webhooks": [{
                "name": "pods.kache.io",
                "clientConfig": {
                    "url": format!("https://{}/mutate", ports.webhook),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(ca),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "reinvocationPolicy": "IfNeeded",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [NS, "kube-system"]},
                ]},
                "objectSelector": {"matchExpressions": [
                    {"key": "kache.io/image-caching-policy", "operator": "NotIn", "values": ["ignore"]},
                ]},
            }],
        })),
    );
    for name in ["registry", "webhook", "controller"] {
        wait_available(kube, "deployments", name);
    }
    wait_available(kube, "daemonsets", "proxy");
}

fn with_mounts(mut pod: Value, mounts: Value) -> Value {
    pod["spec"]["containers"][0]["volumeMounts"] = mounts;
    pod
}

/// Waits until every replica of a kache Deployment or DaemonSet is Ready.
fn wait_available(kube: &KubeServer, resource: &str, name: &str) {
    let path = format!("/apis/apps/v1/namespaces/{NS}/{resource}/kache-{name}");
    kube.wait_for(&path, WAIT, |code, v| {
        let s = &v["status"];
        let ready = match resource {
            "daemonsets" => {
                s["numberReady"].as_u64().unwrap_or(0) >= 1
                    && s["numberReady"] == s["desiredNumberScheduled"]
                    && s["updatedNumberScheduled"] == s["desiredNumberScheduled"]
            }
            _ => {
                s["readyReplicas"].as_u64().unwrap_or(0) >= 1
                    && s["readyReplicas"] == v["spec"]["replicas"]
                    && s["replicas"] == v["spec"]["replicas"]
            }
        };
        (code == 200 && ready).then_some(())
    });
}

fn app_pod(name: &str, image: &str, labels: Value, secrets: &[&str]) -> Value {
    let mut labels = labels;
    labels["app"] = json!(name);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "imagePullSecrets": secrets.iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "IfNotPresent"}],
        },
    })
}

/// Creates a pod in APPS; returns it as admitted (the webhook's rewrite included).
fn create_pod(kube: &KubeServer, pod: &Value) -> Value {
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/pods"),
        Some(pod),
    )
}

/// Waits until the pod runs and is ready; on timeout, says what the kubelet reported.
fn wait_running(kube: &KubeServer, node: &KubeNode, name: &str) -> Value {
    let path = format!("/api/v1/namespaces/{APPS}/pods/{name}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, pod) = kube.request("GET", &path, None);
        if pod["status"]["phase"] == "Running"
            && pod["status"]["containerStatuses"][0]["ready"] == true
        {
            return pod;
        }
        if Instant::now() > deadline {
            panic!(
                "{name} never ran: {}\nevents: {:?}\n{}",
                pod["status"],
                pod_events(kube, name),
                node.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What the kubelet said about a pod: (reason, message) of its events, oldest first.
fn pod_events(kube: &KubeServer, name: &str) -> Vec<(String, String)> {
    let v = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{APPS}/events?fieldSelector=involvedObject.name={name}"),
        None,
    );
    let mut events: Vec<(String, String, String)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["firstTimestamp"]
                    .as_str()
                    .or(e["eventTime"].as_str())
                    .unwrap_or("")
                    .to_owned(),
                e["reason"].as_str().unwrap_or("").to_owned(),
                e["message"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    events.sort();
    events.into_iter().map(|(_, r, m)| (r, m)).collect()
}

fn delete_pod(kube: &KubeServer, ns: &str, name: &str) {
    kube.ok(
        "DELETE",
        &format!("/api/v1/namespaces/{ns}/pods/{name}?gracePeriodSeconds=0"),
        None,
    );
    kube.wait_for(
        &format!("/api/v1/namespaces/{ns}/pods/{name}"),
        WAIT,
        |code, _| (code == 404).then_some(()),
    );
}

fn scale(kube: &KubeServer, name: &str, replicas: u32) {
    kube.ok(
        "PATCH",
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/kache-{name}"),
        Some(&json!({"spec": {"replicas": replicas}})),
    );
}

/// Polls until `addr` refuses connections (the pod behind it is gone).
fn wait_closed(addr: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "{addr} still listens");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scrape(addr: &str) -> String {
    metrics::scrape(&format!("http://{addr}/metrics"))
}

fn proxy_requests(ports: &Ports, upstream: &str, result: &str) -> f64 {
    metrics::value(
        &scrape(&ports.proxy_metrics),
        "kache_proxy_requests_total",
        &[("upstream", upstream), ("result", result)],
    )
}

fn wait_cached(kube: &KubeServer, image: &str, digest: &str) {
    let path = format!(
        "/apis/kache.io/v1alpha1/cachedimages/{}",
        cached_image_name(image)
    );
    kube.wait_for(&path, WAIT, |code, v| {
        (code == 200 && v["status"]["phase"] == "Cached" && v["status"]["digest"] == digest)
            .then_some(())
    });
}

#[test]
fn pods_pull_through_kache_on_a_real_node_and_start_without_the_upstream() {
    if skip_unless_root("pods_pull_through_kache_on_a_real_node_and_start_without_the_upstream") {
        return;
    }
    let kube = KubeServer::start(Version::Current);
    let node = KubeNode::start(&kube);
    let s = Scratch::new("kache-e2e-node");

    // The kache image, imported as a node gets an image no registry serves.
    let image_dir = s.path("image");
    build_kache_image(&image_dir, KACHE_IMAGE);
    node.import(&image_dir.join("kache-image.tar"));

    // The upstreams and their images.
    let pause = std::fs::read(kube.bin.join("pause")).expect("the release's pause program");
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (app, plain, other) = (
        runnable(&pause, 1, 3 << 20),
        runnable(&pause, 2, 1 << 20),
        runnable(&pause, 3, 1 << 20),
    );
    let password = "node-pw-5d1e";
    let private = Distribution::start(DistributionKind::htpasswd("puller", password));
    let private_host = non_loopback_name(&private.host());
    let secret = runnable(&pause, 4, 1 << 20);
    let src = s.layout(
        "src",
        &[
            ("app", &app),
            ("plain", &plain),
            ("other", &other),
            ("secret", &secret),
        ],
    );
    for (tag, repo) in [
        ("app", "e2e/app:v1"),
        ("plain", "e2e/plain:v1"),
        ("other", "e2e/other:v1"),
    ] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/{repo}"),
            &[],
        );
    }
    s.skopeo.copy(
        &format!("{src}:secret"),
        &format!("docker://{private_host}/e2e/secret:v1"),
        &["--dest-creds", &format!("puller:{password}")],
    );
    // A big layer that drips out slowly, so that a pull is surely in progress when the proxy dies.
    let big = runnable(&pause, 5, 24 << 20);
    let slow = FaultyUpstream::start("e2e/slow", "v1", &big);
    let slow_host = non_loopback_name(&slow.host());

    let ports = Ports::new();
    let data = s.path("registry-data");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(65532), Some(65532)).unwrap();
    let certs = s.path("webhook-certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = certificates(&certs);
    deploy_kache(
        &kube,
        &ports,
        &data,
        &certs,
        &[&host, &private_host, &slow_host],
        &ca,
    );
    kube.namespace(APPS);

    // 1. A Deployment's pod: rewritten, pulled through the proxy and the registry, running, and
    // its CachedImage Cached.
    let app_image = format!("{host}/e2e/app:v1");
    kube.ok(
        "POST",
        &format!("/apis/apps/v1/namespaces/{APPS}/deployments"),
        Some(&json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "app"}},
                "template": {"metadata": {"labels": {"app": "app"}}, "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "app", "image": app_image}],
                }},
            },
        })),
    );
    let first = kube.wait_for(
        &format!("/api/v1/namespaces/{APPS}/pods?labelSelector=app%3Dapp"),
        WAIT,
        |_, v| v["items"].as_array()?.first().cloned(),
    );
    let app_pod_name = first["metadata"]["name"].as_str().unwrap().to_owned();
    let rewritten = first["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        rewritten.starts_with("localhost:7439/") && rewritten.ends_with("/e2e/app:v1"),
        "{rewritten}"
    );
    wait_running(&kube, &node, &app_pod_name);
    assert!(
        proxy_requests(&ports, &host, "miss") + proxy_requests(&ports, &host, "hit") > 0.0,
        "{}",
        scrape(&ports.proxy_metrics)
    );
    // The registry served every blob of the image (the controller may have cached it before
    // the kubelet asked, so whether that was a miss or a hit is a race).
    let registry_metrics = scrape(&ports.registry_metrics);
    assert!(
        metrics::value(
            &registry_metrics,
            "kache_registry_requests_total",
            &[("route", "blob"), ("method", "GET"), ("status", "200")]
        ) >= (app.blobs().len() - 1) as f64,
        "{registry_metrics}"
    );
    assert!(upstream.count_requests("GET", "/v2/e2e/app/blobs/") > 0);
    wait_cached(&kube, &app_image, app.digest());
    // The node holds the image under its rewritten name only.
    let prefix = rewritten.rsplit_once(':').unwrap().0.to_owned();
    assert!(
        node.images().iter().any(|i| i.starts_with(&prefix)),
        "{:?}",
        node.images()
    );

    // 2. An ignored pod pulls straight from the upstream (containerd speaks plain HTTP to it).
    support::containerd::write_hosts_toml(
        &node.hosts_dir(),
        &host,
        &format!("http://{host}"),
        &format!("http://{host}"),
    );
    let before = scrape(&ports.proxy_metrics);
    let ignored = create_pod(
        &kube,
        &app_pod(
            "ignored",
            &format!("{host}/e2e/plain:v1"),
            json!({"kache.io/image-caching-policy": "ignore"}),
            &[],
        ),
    );
    assert_eq!(
        ignored["spec"]["containers"][0]["image"],
        format!("{host}/e2e/plain:v1")
    );
    wait_running(&kube, &node, "ignored");
    assert!(upstream.count_requests("GET", "/v2/e2e/plain/manifests/") > 0);
    assert_eq!(
        metrics::value(&before, "kache_proxy_requests_total", &[]),
        metrics::value(
            &scrape(&ports.proxy_metrics),
            "kache_proxy_requests_total",
            &[]
        ),
        "the proxy saw the ignored pod's pull"
    );

    // 3. The registry stops: the proxy falls back to the upstream, and a new pod starts.
    scale(&kube, "registry", 0);
    wait_closed(&ports.registry);
    let fallbacks = proxy_requests(&ports, &host, "fallback");
    create_pod(
        &kube,
        &app_pod("fallback", &format!("{host}/e2e/other:v1"), json!({}), &[]),
    );
    wait_running(&kube, &node, "fallback");
    assert!(proxy_requests(&ports, &host, "fallback") > fallbacks);
    scale(&kube, "registry", 1);
    wait_available(&kube, "deployments", "registry");

    // 4. The proxy dies in the middle of a pull: the pull is taken up again through the new
    // proxy (containerd re-requests a cut blob, the kubelet retries a failed pull), and the pod
    // starts.
    let layer = big.layers.last().unwrap().digest.clone();
    slow.fail(
        &layer,
        Fault::SlowDrip {
            chunk: 128 << 10,
            every: Duration::from_millis(100),
        },
    );
    create_pod(
        &kube,
        &app_pod("slow", &format!("{slow_host}/e2e/slow:v1"), json!({}), &[]),
    );
    let deadline = Instant::now() + WAIT;
    while slow.count_requests("GET", &layer) == 0 {
        assert!(
            Instant::now() < deadline,
            "the big layer was never asked for"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let proxy_pod = kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{NS}/pods?labelSelector=app%3Dkache-proxy"),
        None,
    )["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    delete_pod(&kube, NS, &proxy_pod);
    let pulled = |kube: &KubeServer| {
        pod_events(kube, "slow")
            .iter()
            .any(|(reason, _)| reason == "Pulled")
    };
    assert!(
        !pulled(&kube),
        "the pull ended before the proxy died: {:?}",
        pod_events(&kube, "slow")
    );
    slow.clear_all();
    wait_available(&kube, "daemonsets", "proxy");
    let running = wait_running(&kube, &node, "slow");
    assert_eq!(running["status"]["containerStatuses"][0]["restartCount"], 0);
    // The new proxy (its counters start at zero) served the rest of the pull.
    let after_restart: f64 = ["hit", "miss", "stale", "fallback"]
        .iter()
        .map(|r| proxy_requests(&ports, &slow_host, r))
        .sum();
    assert!(
        after_restart > 0.0,
        "{}\n{:?}",
        scrape(&ports.proxy_metrics),
        pod_events(&kube, "slow")
    );
    eprintln!(
        "the slow pod's events, the proxy killed mid-pull: {:?}",
        pod_events(&kube, "slow")
    );

    // 5. A private image and a pod's pull secret. The kubelet has credentials for the upstream,
    // not for `localhost:7439`, so it pulls through the proxy anonymously, and the upstream
    // refuses that; the controller caches the image with the pod's secret (usually before the
    // kubelet even asks), and the kubelet's next try gets it from the cache. With the
    // controller stopped, the refusal shows first, then the pod starts by itself once the
    // controller is back.
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/secrets"),
        Some(&pull_secret("creds", &private_host, "puller", password)),
    );
    scale(&kube, "controller", 0);
    wait_closed(&ports.controller_metrics);
    let secret_image = format!("{private_host}/e2e/secret:v1");
    create_pod(
        &kube,
        &app_pod("private", &secret_image, json!({}), &["creds"]),
    );
    let refused = kube.wait_for(
        &format!("/api/v1/namespaces/{APPS}/pods/private"),
        WAIT,
        |_, _| {
            pod_events(&kube, "private")
                .into_iter()
                .find(|(reason, message)| {
                    reason == "Failed" && message.starts_with("Failed to pull image")
                })
        },
    );
    eprintln!("the private image, before the controller cached it: {refused:?}");
    assert!(
        refused.1.contains("401") || refused.1.to_lowercase().contains("unauthorized"),
        "{refused:?}"
    );
    scale(&kube, "controller", 1);
    wait_cached(&kube, &secret_image, secret.digest());
    wait_running(&kube, &node, "private");

    // 6. The upstream goes, and the node forgets the image, content included (every workload
    // goes, as the images share their program's layer): a new pod still starts, every byte from
    // kache.
    upstream.stop();
    kube.ok(
        "PATCH",
        &format!("/apis/apps/v1/namespaces/{APPS}/deployments/app"),
        Some(&json!({"spec": {"replicas": 0}})),
    );
    kube.ok(
        "DELETE",
        &format!("/api/v1/namespaces/{APPS}/pods?gracePeriodSeconds=0"),
        None,
    );
    kube.wait_for(&format!("/api/v1/namespaces/{APPS}/pods"), WAIT, |_, v| {
        v["items"].as_array()?.is_empty().then_some(())
    });
    node.forget("localhost:7439/");
    node.forget(&format!("{host}/"));
    for blob in app.blobs() {
        assert!(
            !node.has_content(&blob.digest),
            "the node still holds {}: {:?}",
            blob.digest,
            node.images()
        );
    }
    let hits = proxy_requests(&ports, &host, "hit");
    create_pod(&kube, &app_pod("offline", &app_image, json!({}), &[]));
    let offline = wait_running(&kube, &node, "offline");
    assert_eq!(
        offline["spec"]["containers"][0]["image"].as_str(),
        Some(rewritten.as_str())
    );
    assert!(proxy_requests(&ports, &host, "hit") > hits);
    assert!(!upstream.is_running());
}
