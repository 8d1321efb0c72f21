//! `helm install` as a cluster admin runs it, following README "Install on a cluster" on the
//! test bed's real node (scripts/kube-test-node) of each Kubernetes version. On the current one,
//! cert-manager first, with the README's own command (its controller, webhook, cainjector and
//! cmctl built from its Go module and packed as images the way kache's is, installed from its own
//! chart); on 1.20, where current cert-manager releases do not run, a certificate from `kache
//! certs`. kache's image is built and imported as step 2 says (scripts/build-image, its default
//! name, `ctr images import`). Then, in one sequence per version (one node per machine):
//!
//! - without a default StorageClass the README's `helm install` stops at once and says what to
//!   set; a rollout whose image is on no node fails, and `helm status` points at step 2; with the
//!   README's way out (an emptyDir) it installs (on 1.20, a claim bound to a volume of the node);
//! - every pod is Ready, and the webhook configuration trusts the webhook's CA;
//! - step 4: a Deployment is rewritten, pulled through the proxy, Running and Cached, and
//!   `kubectl get cachedimages` also lists the workloads that were there before (cert-manager's);
//! - private images (on by default): a namespace's private image starts with its own pull secret
//!   and the token Secret the controller wrote, and another namespace's pod is refused with 401;
//!   the key survives the upgrade, and a new install signs the Secrets again;
//! - the certificate is renewed: the webhook serves the new one without a restart;
//! - `helm upgrade` with changed values (and every exclusion) rolls every component while pods
//!   keep starting, none with a failed pull from 1.22 on;
//! - every exclusion (an ignored namespace, an ignored registry holding a private image, the object
//!   selector, the accepted images, the opt-out label, `kache.io/precache: "false"`) leaves the pod
//!   and the cache untouched, and kache sends the upstream no request for them;
//! - `helm uninstall` leaves exactly what the README says, and a pod created afterwards is not
//!   rewritten;
//! - installed again with a certificate from `kache certs`: pods are rewritten and start (on 1.20
//!   the registry finds its store on the kept claim);
//! - removed as the README says: nothing of kache is left.
//!
//! The test bed has no kube-proxy and no cluster DNS, and the node's address is 127.0.0.1: the
//! registry runs on the node's network (registry.hostNetwork) and the proxies and the controller
//! are pointed at it (proxy.registryURL, controller.registryURL; pods reach the node's loopback
//! at the bridge's address, see scripts/kube-test-node). The API server calls both webhooks at
//! their pods' addresses (--enable-aggregator-routing). Those values, and HTTPS_PROXY set to the
//! closed port that pins every public registry, are the only ones the README's commands get here.

use kache_testkit as support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kache_api::cached_image_name;
use serde_json::{Value, json};
use support::containerd::skip_unless_root;
use support::helm::{Helm, assert_release_gone, chart};
use support::kube::{KubeServer, Version, non_loopback_name, pull_secret};
use support::metrics;
use support::node::{KubeNode, build_kache_image, build_program_image};
use support::pki::free_addr;
use support::pull::Scratch;
use support::{Content, Distribution, DistributionKind, Image, ImageBuilder};

const CERT_MANAGER: &str = "v1.11.5";
/// cert-manager's programs and the images its chart runs them from (ctl: the start-up check).
const CERT_MANAGER_IMAGES: [(&str, &str); 4] = [
    ("controller", "cert-manager-controller"),
    ("webhook", "cert-manager-webhook"),
    ("cainjector", "cert-manager-cainjector"),
    ("ctl", "cert-manager-ctl"),
];
/// Where the test bed pins every public registry (scripts/kube-test-node): a closed port. kache's
/// own upstream traffic to them goes there too, through HTTPS_PROXY.
const CLOSED: &str = "http://127.0.0.1:1";
const NS: &str = "kache";
const APPS: &str = "apps";
/// Long enough for a pull or a rollout on a slow machine; every wait ends as soon as its
/// condition holds.
const WAIT: Duration = Duration::from_secs(240);

fn runnable(pause: &[u8], seed: u64) -> Image {
    ImageBuilder::new(support::Flavor::Oci)
        .program("pause", pause.to_vec())
        .random_layer(seed, &[1 << 20])
        .build()
}

fn port(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The pods of `ns` matching `selector`.
fn pods(kube: &KubeServer, ns: &str, selector: &str) -> Vec<Value> {
    kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{ns}/pods?labelSelector={selector}"),
        None,
    )["items"]
        .as_array()
        .unwrap()
        .clone()
}

fn create_pod(kube: &KubeServer, name: &str, image: &str, policy: &str) -> Value {
    create_pod_in(kube, APPS, name, image, policy)
}

fn create_pod_in(kube: &KubeServer, ns: &str, name: &str, image: &str, policy: &str) -> Value {
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods"),
        Some(&json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"test": "helm"}},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "app", "image": image, "imagePullPolicy": policy}],
            },
        })),
    )
}

/// Fails unless the admitted pod's image points at the node proxy.
fn assert_rewritten(pod: &Value, why: &str) {
    let image = pod["spec"]["containers"][0]["image"].as_str().unwrap();
    assert!(image.starts_with("localhost:7439/"), "{why}: {pod}");
}

/// The kubelet's `Failed` events in `ns` (a pull that failed, among others), as
/// `object: message`.
fn failed_pulls(kube: &KubeServer, ns: &str) -> Vec<String> {
    kube.ok(
        "GET",
        &format!("/api/v1/namespaces/{ns}/events?fieldSelector=reason%3DFailed"),
        None,
    )["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["involvedObject"]["name"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The token a `kache-pull` Secret holds for `localhost:7439`.
fn pull_token_of(secret: &Value) -> String {
    use base64::Engine as _;
    let config = base64::engine::general_purpose::STANDARD
        .decode(secret["data"][".dockerconfigjson"].as_str().unwrap())
        .unwrap();
    let config: Value = serde_json::from_slice(&config).unwrap();
    config["auths"]["localhost:7439"]["password"]
        .as_str()
        .expect("a token for localhost:7439")
        .to_owned()
}

/// The serial number of the certificate served at `addr` (openssl's view of the handshake).
fn served_serial(addr: &str) -> Option<String> {
    let shell = format!(
        "openssl s_client -connect {addr} -servername kache-webhook.{NS}.svc </dev/null 2>/dev/null | openssl x509 -noout -serial"
    );
    let out = Command::new("sh").args(["-c", &shell]).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    s.strip_prefix("serial=").map(str::to_owned)
}

/// The serial of a PEM certificate.
fn pem_serial(pem: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .strip_prefix("serial=")
        .expect("a serial")
        .to_owned()
}

fn secret_pem(kube: &KubeServer, name: &str, key: &str) -> Option<String> {
    let (code, s) = kube.request(
        "GET",
        &format!("/api/v1/namespaces/{NS}/secrets/{name}"),
        None,
    );
    use base64::Engine as _;
    let b64 = s["data"][key].as_str().filter(|_| code == 200)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(String::from_utf8(bytes).unwrap())
}

/// cert-manager's images, built from its Go module by the test bed and packed by
/// scripts/build-image, then imported under the names its chart uses.
fn import_cert_manager(kube: &KubeServer, node: &KubeNode, dir: &Path) {
    for (bin, image) in CERT_MANAGER_IMAGES {
        let archive = build_program_image(
            &kube.cert_manager.join("bin").join(bin),
            &dir.join(image),
            image,
            CERT_MANAGER,
            &format!("quay.io/jetstack/{image}:{CERT_MANAGER}"),
            &[],
        );
        node.import(&archive);
    }
}

/// A PersistentVolume on the node for the registry's claim (the test bed has no provisioner):
/// the StatefulSet's claim binds to it by its StorageClass name.
fn registry_volume(kube: &KubeServer, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(65532), Some(65532)).unwrap();
    kube.ok(
        "POST",
        "/api/v1/persistentvolumes",
        Some(&json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "kache-test-registry"},
            "spec": {
                "capacity": {"storage": "2Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "kache-test",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": dir.to_str().unwrap(), "type": "Directory"},
            },
        })),
    );
}

/// Waits until every workload of the release is Ready (beyond what `helm --wait` saw, the
/// DaemonSet's pods must all be current).
fn wait_kache_ready(kube: &KubeServer, node: &KubeNode) {
    for (resource, name) in [
        ("statefulsets", "kache-registry"),
        ("deployments", "kache-webhook"),
        ("deployments", "kache-controller"),
        ("daemonsets", "kache-proxy"),
    ] {
        node.wait_ready_in(kube, NS, resource, name);
    }
}

/// `kache certs` into `dir` for the webhook's Service; returns the Secret holding the pair.
fn kache_certs(dir: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kache"))
        .args(["certs", "--out", dir.to_str().unwrap()])
        .args(["--dns", &format!("kache-webhook.{NS}.svc")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "webhook-provided"},
        "stringData": {"tls.crt": read("tls.crt"), "tls.key": read("tls.key")},
    })
}

/// A Deployment `name` in `ns` of `image` (label `app: <name>`), with more template labels,
/// workload annotations, a replica count and a pull secret.
struct Workload {
    name: &'static str,
    ns: &'static str,
    image: String,
    labels: Value,
    annotations: Value,
    replicas: u32,
    pull_secret: Option<&'static str>,
}

impl Workload {
    fn new(name: &'static str, ns: &'static str, image: String) -> Self {
        Workload {
            name,
            ns,
            image,
            labels: json!({}),
            annotations: json!({}),
            replicas: 1,
            pull_secret: None,
        }
    }

    fn create(&self, kube: &KubeServer) {
        let mut labels = json!({"app": self.name});
        labels
            .as_object_mut()
            .unwrap()
            .extend(self.labels.as_object().unwrap().clone());
        let secrets: Vec<Value> = self
            .pull_secret
            .map(|n| json!({"name": n}))
            .into_iter()
            .collect();
        kube.ok(
            "POST",
            &format!("/apis/apps/v1/namespaces/{}/deployments", self.ns),
            Some(&json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": self.name, "annotations": self.annotations},
                "spec": {
                    "replicas": self.replicas,
                    "selector": {"matchLabels": {"app": self.name}},
                    "template": {"metadata": {"labels": labels}, "spec": {
                        "terminationGracePeriodSeconds": 0,
                        "imagePullSecrets": secrets,
                        "containers": [{"name": "app", "image": self.image}],
                    }},
                },
            })),
        );
    }
}

/// The first pod of the Deployment `name` in `ns`, as admitted.
fn first_pod(kube: &KubeServer, ns: &str, name: &str) -> Value {
    kube.wait_for(
        &format!("/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{name}"),
        WAIT,
        |_, v| v["items"].as_array()?.first().cloned(),
    )
}

/// The requests kache (its user agent) made to `upstream` whose path holds `fragment`.
fn kache_requests(upstream: &Distribution, fragment: &str) -> Vec<String> {
    upstream
        .access_log_lines()
        .into_iter()
        .filter(|l| l.user_agent.starts_with("kache/") && l.uri.contains(fragment))
        .map(|l| format!("{} {} {}", l.method, l.uri, l.status))
        .collect()
}

/// The names of the objects of each kind left in the release's namespace: everything a release
/// or its components could leave there.
fn left_in_namespace(kube: &KubeServer) -> Vec<(&'static str, Vec<String>)> {
    let kinds = [
        ("secrets", "/api/v1/namespaces/kache/secrets"),
        ("configmaps", "/api/v1/namespaces/kache/configmaps"),
        (
            "serviceaccounts",
            "/api/v1/namespaces/kache/serviceaccounts",
        ),
        (
            "persistentvolumeclaims",
            "/api/v1/namespaces/kache/persistentvolumeclaims",
        ),
        ("pods", "/api/v1/namespaces/kache/pods"),
        ("services", "/api/v1/namespaces/kache/services"),
        (
            "leases",
            "/apis/coordination.k8s.io/v1/namespaces/kache/leases",
        ),
        (
            "roles",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/kache/roles",
        ),
        (
            "rolebindings",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/kache/rolebindings",
        ),
    ];
    kinds
        .into_iter()
        .map(|(kind, path)| {
            let list = kube.ok("GET", path, None);
            let mut names: Vec<String> = list["items"]
                .as_array()
                .unwrap()
                .iter()
                // What Kubernetes makes in every namespace, and 1.20's ServiceAccount tokens.
                .filter(|o| {
                    let name = o["metadata"]["name"].as_str().unwrap_or("");
                    o["type"] != "kubernetes.io/service-account-token"
                        && name != "kube-root-ca.crt"
                        && !(kind == "serviceaccounts" && name == "default")
                })
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
                .collect();
            names.sort();
            (kind, names)
        })
        .collect()
}

/// The release's objects in every collection a kache release writes to.
const RELEASE_COLLECTIONS: &[&str] = &[
    "/apis/apps/v1/namespaces/kache/statefulsets",
    "/apis/apps/v1/namespaces/kache/deployments",
    "/apis/apps/v1/namespaces/kache/daemonsets",
    "/api/v1/namespaces/kache/services",
    "/api/v1/namespaces/kache/serviceaccounts",
    "/api/v1/namespaces/kache/configmaps",
    "/apis/networking.k8s.io/v1/namespaces/kache/networkpolicies",
    "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/kache/roles",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/roles",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/rolebindings",
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
];

/// One node per machine: the current version (with cert-manager), then 1.20 (with a
/// certificate from `kache certs`, as current cert-manager releases do not run there).
#[test]
fn helm_installs_kache_on_a_real_node_of_each_version() {
    if skip_unless_root("helm_installs_kache_on_a_real_node_of_each_version") {
        return;
    }
    install_on_a_real_node(Version::Current);
    install_on_a_real_node(Version::Oldest);
}

fn install_on_a_real_node(version: Version) {
    let current = version == Version::Current;
    let kube = KubeServer::start(version);
    let node = KubeNode::start(&kube);
    let helm = Helm::new(&kube);
    let s = Scratch::new("kache-e2e-helm");

    // README step 2: kache's image built with scripts/build-image under its default name (the
    // chart's default), imported into the node's containerd. cert-manager's under its chart's.
    build_kache_image(
        Path::new(env!("CARGO_BIN_EXE_kache")),
        &s.path("kache-image"),
        None,
    );
    node.import(&s.path("kache-image").join("kache-image.tar"));
    let kache_image = format!("ghcr.io/kache-io/kache:{}", env!("CARGO_PKG_VERSION"));
    assert!(node.images().contains(&kache_image), "{:?}", node.images());
    if current {
        import_cert_manager(&kube, &node, &s.path("cert-manager-images"));
    }

    // The upstreams and their images: an open one, and one that wants a password (private).
    let pause = std::fs::read(kube.bin.join("pause")).expect("the release's pause program");
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let private = Distribution::start(DistributionKind::htpasswd("team", "s3cret"));
    let private_host = non_loopback_name(&private.host());
    let tags = [
        "app", "during", "after", "ns", "selector", "ignored", "precache", "control",
    ];
    let images: Vec<Image> = (0..tags.len() as u64 + 3)
        .map(|i| runnable(&pause, 11 + i))
        .collect();
    let app = &images[0];
    let mut tagged: Vec<(&str, &dyn Content)> = tags
        .iter()
        .zip(&images)
        .map(|(t, i)| (*t, i as &dyn Content))
        .collect();
    tagged.push(("other", &images[tags.len()]));
    tagged.push(("secret", &images[tags.len() + 1]));
    tagged.push(("team", &images[tags.len() + 2]));
    let src = s.layout("src", &tagged);
    for tag in tags {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/e2e/{tag}:v1"),
            &[],
        );
    }
    s.skopeo.copy(
        &format!("{src}:other"),
        &format!("docker://{host}/other/app:v1"),
        &[],
    );
    s.skopeo.copy(
        &format!("{src}:secret"),
        &format!("docker://{private_host}/e2e/secret:v1"),
        &["--dest-creds", "team:s3cret"],
    );
    s.skopeo.copy(
        &format!("{src}:team"),
        &format!("docker://{private_host}/e2e/team:v1"),
        &["--dest-creds", "team:s3cret"],
    );

    // README step 1: cert-manager, with its command (`installCRDs`: this chart is before 1.15).
    let cm_chart = kube.cert_manager.join("chart");
    if current {
        helm.ok(&[
            "install",
            "cert-manager",
            cm_chart.to_str().unwrap(),
            "-n",
            "cert-manager",
            "--create-namespace",
            "--set",
            "installCRDs=true",
            "--wait",
        ]);
    }

    // README step 3, with the test bed's addresses.
    let (registry, internal, registry_metrics, proxy_metrics) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let values = s.path("values.yaml");
    let https_proxy = json!([{"name": "HTTPS_PROXY", "value": CLOSED}]);
    std::fs::write(
        &values,
        serde_json::to_string_pretty(&json!({
            "registry": {
                "hostNetwork": true,
                "port": port(&registry),
                "internalPort": port(&internal),
                "metricsPort": port(&registry_metrics),
                // The volume is the machine's disk, whose free space is not the test's.
                "minFree": "0",
                "extraEnv": https_proxy,
            },
            "proxy": {
                "registryURL": format!("http://{registry}"),
                "metricsPort": port(&proxy_metrics),
                "extraEnv": https_proxy,
            },
            "controller": {"registryURL": format!("http://10.244.77.1:{}", port(&internal))},
            "upstream": {"insecureRegistries": [host, private_host]},
        }))
        .unwrap(),
    )
    .unwrap();
    let chart = chart();
    let install = [
        "kache",
        chart.to_str().unwrap(),
        "-n",
        NS,
        "-f",
        values.to_str().unwrap(),
        "--wait",
    ];
    let certs = s.path("certs");
    let ca_file = format!("webhook.tls.caBundle={}", certs.join("ca.crt").display());
    let provided = [
        "--set",
        "certManager.enabled=false",
        "--set",
        "webhook.tls.existingSecret=webhook-provided",
        "--set-file",
        &ca_file,
    ];
    // The store: the README's emptyDir on the current version, a claim on 1.20.
    let store: [&str; 4] = if current {
        [
            "--set",
            "registry.persistence.enabled=false",
            "--set",
            "registry.emptyDirSizeLimit=1Gi",
        ]
    } else {
        [
            "--set",
            "registry.persistence.storageClass=kache-test",
            "--set",
            "registry.persistence.size=1Gi",
        ]
    };
    let mut first_install = vec!["install"];
    if current {
        first_install.push("--create-namespace");
    } else {
        kube.namespace(NS);
        let secret = kache_certs(&certs);
        kube.ok(
            "POST",
            &format!("/api/v1/namespaces/{NS}/secrets"),
            Some(&secret),
        );
        first_install.extend(provided);
    }
    first_install.extend(install);
    // The test bed has no StorageClass: the README's command stops at once, saying what to set,
    // and nothing is installed.
    let refused = helm.fails(&first_install);
    assert!(
        refused.contains("the cluster has no default StorageClass")
            && refused.contains("registry.persistence.storageClass")
            && refused.contains("registry.persistence.enabled=false"),
        "{refused}"
    );
    assert!(helm.run(&["status", "kache", "-n", NS]).status.code() != Some(0));
    if current {
        // A rollout whose image is on no node fails; `helm status` then points at README step 2.
        let mut missing = first_install.clone();
        missing.extend(store);
        missing.extend(["--set", "image.tag=not-loaded", "--timeout", "20s"]);
        helm.fails(&missing);
        let status = helm.ok(&["status", "kache", "-n", NS]);
        assert!(
            status
                .contains("ErrImagePull or ImagePullBackOff on ghcr.io/kache-io/kache:not-loaded")
                && status.contains("kache's image is not")
                && status.contains("scripts/build-image")
                && status.contains("step 2"),
            "{status}"
        );
        helm.ok(&["uninstall", "kache", "-n", NS, "--wait"]);
    } else {
        registry_volume(&kube, &s.path("registry-data"));
    }
    let mut args = first_install.clone();
    args.extend(store);
    let notes = helm.ok(&args);
    wait_kache_ready(&kube, &node);
    if current {
        assert!(
            notes.contains("every restart of its pod")
                && notes.contains("kache-ca and kache-webhook-tls"),
            "{notes}"
        );
        let sts = kube.ok(
            "GET",
            &format!("/apis/apps/v1/namespaces/{NS}/statefulsets/kache-registry"),
            None,
        );
        let args = &sts["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_array()
                .unwrap()
                .contains(&json!(format!("--max-size={}", (1u64 << 30) * 9 / 10))),
            "the emptyDir store is kept under its limit: {args}"
        );
    }
    let tls_secret = if current {
        "kache-webhook-tls"
    } else {
        "webhook-provided"
    };
    if current {
        // cert-manager issued the certificate and injected its CA.
        kube.wait_for(
            &format!("/apis/cert-manager.io/v1/namespaces/{NS}/certificates/kache-webhook"),
            WAIT,
            |_, c| {
                c["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    .then_some(())
            },
        );
        let ca = secret_pem(&kube, "kache-webhook-tls", "ca.crt").expect("the webhook's CA");
        let deadline = Instant::now() + WAIT;
        while kube.webhook_ca_bundle("kache") != ca {
            assert!(
                Instant::now() < deadline,
                "cert-manager never injected the CA"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    } else {
        assert_eq!(
            kube.webhook_ca_bundle("kache"),
            std::fs::read_to_string(certs.join("ca.crt")).unwrap()
        );
    }
    // The chart's pods run as it says: non-root, read-only, no capabilities, RuntimeDefault.
    for pod in pods(&kube, NS, "app.kubernetes.io/instance%3Dkache") {
        let spec = &pod["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{pod}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let c = &spec["containers"][0]["securityContext"];
        assert_eq!(c["readOnlyRootFilesystem"], true);
        assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
        let component = &pod["metadata"]["labels"]["app.kubernetes.io/component"];
        assert_eq!(
            spec["automountServiceAccountToken"] != false,
            component == "controller",
            "only the controller mounts a token: {pod}"
        );
    }

    // README step 4: a Deployment in another namespace: rewritten, pulled through the proxy,
    // Running, Cached.
    kube.namespace(APPS);
    let app_image = format!("{host}/e2e/app:v1");
    let first = kube.deployment(APPS, "app", &app_image, WAIT);
    let rewritten = first["spec"]["containers"][0]["image"].as_str().unwrap();
    assert!(
        rewritten.starts_with("localhost:7439/") && rewritten.ends_with("/e2e/app:v1"),
        "{rewritten}"
    );
    node.wait_running(
        &kube,
        APPS,
        first["metadata"]["name"].as_str().unwrap(),
        WAIT,
    );
    let scraped = metrics::scrape(&format!("http://{proxy_metrics}/metrics"));
    assert!(
        metrics::value(
            &scraped,
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", "miss")]
        ) + metrics::value(
            &scraped,
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", "hit")]
        ) > 0.0,
        "{scraped}"
    );
    kube.wait_for(
        &format!(
            "/apis/kache.io/v1alpha1/cachedimages/{}",
            cached_image_name(&app_image)
        ),
        WAIT,
        |code, v| (code == 200 && v["status"]["phase"] == "Cached").then_some(()),
    );
    // `kubectl get cachedimages` lists the workloads that were there before kache too, as the
    // README says: cert-manager's (their registry is closed here, so they are not Cached).
    if current {
        let (_, rows) = kube.table("/apis/kache.io/v1alpha1/cachedimages");
        let listed: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
        for (_, image) in &CERT_MANAGER_IMAGES[..3] {
            let want = format!("quay.io/jetstack/{image}:{CERT_MANAGER}");
            assert!(listed.contains(&want.as_str()), "{want} in {listed:?}");
        }
    }

    // Private images, on by default: a Deployment of team-a pulls a private image with its
    // own pull secret. The webhook adds the namespace's token Secret to its pod, the controller
    // writes it and has the registry check team-a's credentials upstream, and the pod starts
    // through the proxy. A pod of team-b, without credentials, pulling again as AlwaysPullImages
    // makes it (the node holds the image), is refused by kache with 401.
    let team_image = format!("{private_host}/e2e/team:v1");
    let team_repo = support::pull::cache_repo(&private_host, "e2e/team");
    for ns in ["team-a", "team-b"] {
        kube.namespace(ns);
    }
    kube.ok(
        "POST",
        "/api/v1/namespaces/team-a/secrets",
        Some(&pull_secret("team-pull", &private_host, "team", "s3cret")),
    );
    Workload {
        pull_secret: Some("team-pull"),
        ..Workload::new("private-app", "team-a", team_image.clone())
    }
    .create(&kube);
    let pod = first_pod(&kube, "team-a", "private-app");
    assert_rewritten(&pod, "the private image's pod");
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "team-pull"}, {"name": "kache-pull"}]),
        "the webhook adds the namespace's pull-token Secret"
    );
    node.wait_running(
        &kube,
        "team-a",
        pod["metadata"]["name"].as_str().unwrap(),
        WAIT,
    );
    let token_secret = kube.ok("GET", "/api/v1/namespaces/team-a/secrets/kache-pull", None);
    assert_eq!(token_secret["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(
        token_secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "kache"
    );
    let token = pull_token_of(&token_secret);
    let manifest = format!("http://127.0.0.1:7439/v2/{team_repo}/manifests/v1");
    let headers = support::pull::manifest_headers();
    assert_eq!(support::get(&manifest, &headers).status, 401, "anonymous");
    let bearer = format!("Bearer {token}");
    let headers = [headers[0], ("authorization", bearer.as_str())];
    assert_eq!(
        support::get(&manifest, &headers).status,
        200,
        "team-a's token"
    );
    create_pod_in(&kube, "team-b", "no-credentials", &team_image, "Always");
    let refused = kube.wait_for(
        "/api/v1/namespaces/team-b/pods/no-credentials",
        WAIT,
        |_, _| {
            failed_pulls(&kube, "team-b")
                .into_iter()
                .find(|m| m.contains("Failed to pull image"))
        },
    );
    assert!(
        (refused.contains("401") || refused.to_lowercase().contains("unauthorized"))
            && refused.contains("localhost:7439"),
        "{refused}"
    );
    kube.ok(
        "DELETE",
        "/api/v1/namespaces/team-b/pods/no-credentials",
        None,
    );
    let keys_secret = secret_pem(&kube, "kache-pull-token-keys", "k1").expect("the chart's key");

    // The certificate renewed (as `cmctl renew` asks cert-manager for it; on 1.20, `kache
    // certs` run again and the Secret updated): the webhook's pods serve the new one from their
    // updated volume, without a restart, and admission goes on.
    let webhooks = pods(&kube, NS, "app.kubernetes.io/component%3Dwebhook");
    let before: Vec<(String, String)> = webhooks
        .iter()
        .map(|p| {
            let addr = format!("{}:8443", p["status"]["podIP"].as_str().unwrap());
            let serial = served_serial(&addr).expect("the webhook serves TLS");
            (addr, serial)
        })
        .collect();
    let old_serial = pem_serial(&secret_pem(&kube, tls_secret, "tls.crt").unwrap());
    assert!(
        before.iter().all(|(_, s)| *s == old_serial),
        "{before:?} vs {old_serial}"
    );
    if current {
        let cert_path =
            format!("/apis/cert-manager.io/v1/namespaces/{NS}/certificates/kache-webhook");
        let mut conditions = kube.ok("GET", &cert_path, None)["status"]["conditions"].clone();
        conditions.as_array_mut().unwrap().push(json!({
            "type": "Issuing", "status": "True", "reason": "ManuallyTriggered",
            "message": "Certificate re-issuance manually triggered",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }));
        kube.ok(
            "PATCH",
            &format!("{cert_path}/status"),
            Some(&json!({"status": {"conditions": conditions}})),
        );
    } else {
        let secret = kache_certs(&certs);
        kube.ok(
            "PUT",
            &format!("/api/v1/namespaces/{NS}/secrets/{tls_secret}"),
            Some(&secret),
        );
    }
    let new_serial = kube.wait_for(
        &format!("/api/v1/namespaces/{NS}/secrets/{tls_secret}"),
        WAIT,
        |_, _| {
            let serial = pem_serial(&secret_pem(&kube, tls_secret, "tls.crt")?);
            (serial != old_serial).then_some(serial)
        },
    );
    let deadline = Instant::now() + WAIT;
    for (addr, _) in &before {
        while served_serial(addr).as_deref() != Some(&new_serial) {
            assert!(
                Instant::now() < deadline,
                "{addr} never served the renewed certificate"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let after_renewal = pods(&kube, NS, "app.kubernetes.io/component%3Dwebhook");
    for p in &after_renewal {
        assert!(
            webhooks
                .iter()
                .any(|w| w["metadata"]["uid"] == p["metadata"]["uid"]),
            "a webhook pod was replaced"
        );
        assert_eq!(
            p["status"]["containerStatuses"][0]["restartCount"], 0,
            "{p}"
        );
    }
    let renewed = create_pod(&kube, "after-renewal", &app_image, "IfNotPresent");
    assert_rewritten(
        &renewed,
        "the API server does not trust the renewed certificate",
    );
    node.wait_running(&kube, APPS, "after-renewal", WAIT);

    // `helm upgrade` with changed values, every exclusion among them: every component rolls
    // while pods keep starting, each pulling its image (Always) through whichever proxy is
    // there; no pull fails.
    let exclusions = s.path("exclusions.yaml");
    std::fs::write(
        &exclusions,
        serde_json::to_string_pretty(&json!({"webhook": {
            "ignoredNamespaces": ["excluded"],
            "objectSelector": {"matchExpressions": [
                {"key": "kache-test", "operator": "NotIn", "values": ["skip"]},
            ]},
            "ignoredRegistries": [private_host],
            "acceptedImages": [format!("{host}/e2e/*"), format!("{private_host}/*")],
        }}))
        .unwrap(),
    )
    .unwrap();
    let proxies_before = pods(&kube, NS, "app.kubernetes.io/component%3Dproxy");
    let upgrade = {
        let helm = Helm::new(&kube);
        let mut args: Vec<String> = ["upgrade", "--reuse-values", "--set", "logFormat=text"]
            .map(String::from)
            .to_vec();
        args.extend(["-f".to_owned(), exclusions.to_str().unwrap().to_owned()]);
        args.extend(install.iter().map(|a| a.to_string()));
        std::thread::spawn(move || helm.ok(&args))
    };
    let during_image = format!("{host}/e2e/during:v1");
    let mut started = Vec::new();
    // Bounded: at most 60 pods, one a second, while the upgrade runs.
    while !upgrade.is_finished() && started.len() < 60 {
        let name = format!("during-{}", started.len());
        create_pod(&kube, &name, &during_image, "Always");
        started.push(name);
        std::thread::sleep(Duration::from_secs(1));
    }
    upgrade.join().expect("helm upgrade");
    assert!(
        started.len() >= 2,
        "the upgrade ended before pods could start during it"
    );
    wait_kache_ready(&kube, &node);
    for name in &started {
        node.wait_running(&kube, APPS, name, WAIT);
    }
    // From 1.22 the new proxy surges beside the old one; on 1.20 a node is without one for a
    // moment (maxUnavailable), so a pull may fail there and be retried by the kubelet.
    if current {
        let failed = failed_pulls(&kube, APPS);
        assert!(
            failed.is_empty(),
            "pulls failed during the upgrade: {failed:?}"
        );
    }
    let proxies_after = pods(&kube, NS, "app.kubernetes.io/component%3Dproxy");
    assert!(
        proxies_after.iter().all(|p| proxies_before
            .iter()
            .all(|b| b["metadata"]["uid"] != p["metadata"]["uid"])
            && p["spec"]["containers"][0]["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--log-format=text"))),
        "the proxy did not roll: {proxies_after:?}"
    );

    // The webhook's and the controller's pods all run with the exclusions (none of the old ones
    // is left to answer).
    for component in ["webhook", "controller"] {
        let flag = json!(format!("--ignore-registry={private_host}"));
        kube.wait_for(
            &format!("/api/v1/namespaces/{NS}/pods?labelSelector=app.kubernetes.io/component%3D{component}"),
            WAIT,
            |_, v| {
                let pods = v["items"].as_array()?;
                (pods.len() == 2
                    && pods.iter().all(|p| {
                        p["metadata"].get("deletionTimestamp").is_none()
                            && p["spec"]["containers"][0]["args"]
                                .as_array()
                                .is_some_and(|a| a.contains(&flag))
                    }))
                .then_some(())
            },
        );
    }

    // The upgrade kept the pull-token key: a new one would end every namespace's token.
    assert_eq!(
        secret_pem(&kube, "kache-pull-token-keys", "k1").as_ref(),
        Some(&keys_secret)
    );

    // Every exclusion leaves the pod and the cache untouched. Each excluded Deployment below
    // comes before a last one that is not excluded, which the controller's watch of Deployments
    // (one stream, handled in order) pre-caches only once it has seen them all.
    kube.namespace("excluded");
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/secrets"),
        Some(&pull_secret(
            "private-pull",
            &private_host,
            "team",
            "s3cret",
        )),
    );
    let excluded = [
        Workload::new("in-ignored-ns", "excluded", format!("{host}/e2e/ns:v1")),
        Workload {
            pull_secret: Some("private-pull"),
            ..Workload::new("private", APPS, format!("{private_host}/e2e/secret:v1"))
        },
        Workload {
            labels: json!({"kache-test": "skip"}),
            ..Workload::new("not-selected", APPS, format!("{host}/e2e/selector:v1"))
        },
        Workload::new("not-accepted", APPS, format!("{host}/other/app:v1")),
        Workload {
            labels: json!({"kache.io/image-caching-policy": "ignore"}),
            ..Workload::new("opted-out", APPS, format!("{host}/e2e/ignored:v1"))
        },
        // No pods: its pods would be rewritten (the opt-out is of pre-caching only).
        Workload {
            annotations: json!({"kache.io/precache": "false"}),
            replicas: 0,
            ..Workload::new("no-precache", APPS, format!("{host}/e2e/precache:v1"))
        },
    ];
    for w in &excluded {
        w.create(&kube);
    }
    // Last by creation and by name (an initial list comes sorted by namespace, then name).
    kube.namespace("zz-control");
    let control_image = format!("{host}/e2e/control:v1");
    Workload {
        replicas: 0,
        ..Workload::new("control", "zz-control", control_image.clone())
    }
    .create(&kube);
    kube.wait_for(
        &format!(
            "/apis/kache.io/v1alpha1/cachedimages/{}",
            cached_image_name(&control_image)
        ),
        WAIT,
        // No pods: cached, then Expiring at once.
        |code, v| (code == 200 && v["status"]["digest"].is_string()).then_some(()),
    );
    for w in &excluded {
        if w.replicas > 0 {
            let pod = first_pod(&kube, w.ns, w.name);
            assert_eq!(
                pod["spec"]["containers"][0]["image"], w.image,
                "{}: {pod}",
                w.name
            );
            assert!(
                pod["metadata"]["labels"].get("kache.io/managed").is_none(),
                "{}: {pod}",
                w.name
            );
        }
        let (code, ci) = kube.request(
            "GET",
            &format!(
                "/apis/kache.io/v1alpha1/cachedimages/{}",
                cached_image_name(&w.image)
            ),
            None,
        );
        assert_eq!(code, 404, "{} was pre-cached: {ci}", w.name);
    }
    for fragment in [
        "/e2e/ns/",
        "/e2e/selector/",
        "/other/app/",
        "/e2e/ignored/",
        "/e2e/precache/",
    ] {
        let asked = kache_requests(&upstream, fragment);
        assert!(asked.is_empty(), "kache fetched {fragment}: {asked:?}");
    }
    let asked = kache_requests(&private, "/e2e/secret/");
    assert!(
        asked.is_empty(),
        "kache fetched the private image: {asked:?}"
    );
    // So the private image is not in the cache for anyone to pull without a password.
    let through_proxy = support::get(
        &format!(
            "http://127.0.0.1:7439/v2/{}/manifests/v1",
            support::pull::cache_repo(&private_host, "e2e/secret")
        ),
        &support::pull::manifest_headers(),
    );
    assert_eq!(through_proxy.status, 401, "{}", through_proxy.text());
    for w in &excluded {
        kube.ok(
            "DELETE",
            &format!("/apis/apps/v1/namespaces/{}/deployments/{}", w.ns, w.name),
            None,
        );
    }

    // `helm uninstall`: the release's objects go, and it leaves exactly what the README says:
    // the CRD and the CachedImages, the claim (1.20: the emptyDir went with its pod on the
    // current version) and cert-manager's Secrets (the README's cert-manager runs without
    // --enable-certificate-owner-ref), the controllers' Lease (the uninstall took the
    // leader's rights away before it stopped), and the pull-token Secrets.
    helm.ok(&["uninstall", "kache", "-n", NS, "--wait", "--timeout", "5m"]);
    assert_release_gone(&kube, RELEASE_COLLECTIONS);
    if current {
        assert_release_gone(
            &kube,
            &[
                "/apis/policy/v1/namespaces/kache/poddisruptionbudgets",
                "/apis/cert-manager.io/v1/namespaces/kache/certificates",
                "/apis/cert-manager.io/v1/namespaces/kache/issuers",
            ],
        );
    } else {
        assert_release_gone(
            &kube,
            &["/apis/policy/v1beta1/namespaces/kache/poddisruptionbudgets"],
        );
    }
    // Pods go as the garbage collector gets to them.
    kube.wait_for(&format!("/api/v1/namespaces/{NS}/pods"), WAIT, |_, v| {
        (v["items"] == json!([])).then_some(())
    });
    let left = left_in_namespace(&kube);
    let want: Vec<(&str, Vec<String>)> = vec![
        (
            "secrets",
            if current {
                vec!["kache-ca".into(), "kache-webhook-tls".into()]
            } else {
                vec!["webhook-provided".into()]
            },
        ),
        ("configmaps", vec![]),
        ("serviceaccounts", vec![]),
        (
            "persistentvolumeclaims",
            if current {
                vec![]
            } else {
                vec!["data-kache-registry-0".into()]
            },
        ),
        ("pods", vec![]),
        ("services", vec![]),
        ("leases", vec!["kache-controller".into()]),
        ("roles", vec![]),
        ("rolebindings", vec![]),
    ];
    assert_eq!(left, want);
    // And the pull-token Secret of each namespace that used pull secrets.
    let team_secret = "/api/v1/namespaces/team-a/secrets/kache-pull";
    assert_eq!(kube.request("GET", team_secret, None).0, 200);
    let crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/cachedimages.kache.io";
    assert_eq!(
        kube.request("GET", crd, None).0,
        200,
        "the CRD went with the release"
    );
    let cached = kube.ok("GET", "/apis/kache.io/v1alpha1/cachedimages", None);
    assert!(!cached["items"].as_array().unwrap().is_empty(), "{cached}");
    if !current {
        let claim = kube.ok(
            "GET",
            "/api/v1/namespaces/kache/persistentvolumeclaims/data-kache-registry-0",
            None,
        );
        assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
    }
    let plain = create_pod(
        &kube,
        "after-uninstall",
        &format!("{host}/e2e/after:v1"),
        "IfNotPresent",
    );
    assert_eq!(
        plain["spec"]["containers"][0]["image"],
        format!("{host}/e2e/after:v1")
    );
    if current {
        // The README's removal of what cert-manager wrote.
        for secret in ["kache-ca", "kache-webhook-tls"] {
            kube.ok(
                "DELETE",
                &format!("/api/v1/namespaces/{NS}/secrets/{secret}"),
                None,
            );
        }
    }

    // Installed again, without cert-manager, with a certificate from `kache certs` (on 1.20,
    // the Secret is still there): pods are rewritten and start again, and on 1.20 the registry
    // finds its store on the kept claim.
    if current {
        let secret = kache_certs(&certs);
        kube.ok(
            "POST",
            &format!("/api/v1/namespaces/{NS}/secrets"),
            Some(&secret),
        );
    }
    let mut args = vec!["install"];
    args.extend(provided);
    args.extend(install);
    args.extend(store);
    helm.ok(&args);
    wait_kache_ready(&kube, &node);
    assert_eq!(
        kube.webhook_ca_bundle("kache"),
        std::fs::read_to_string(certs.join("ca.crt")).unwrap()
    );
    if !current {
        // The app's manifest, by digest, straight from the kept store: the upstream is not
        // asked.
        let asked = upstream.count_requests("GET", "/v2/e2e/app/manifests/");
        let kept = support::get(
            &format!(
                "http://{registry}/v2/{}/manifests/{}",
                support::pull::cache_repo(&host, "e2e/app"),
                app.digest()
            ),
            &support::pull::manifest_headers(),
        );
        assert_eq!(kept.status, 200, "the reinstalled registry lost its store");
        assert_eq!(
            upstream.count_requests("GET", "/v2/e2e/app/manifests/"),
            asked
        );
    }
    // The new install made a key of its own, and signs team-a's Secret again with it.
    kube.wait_for(team_secret, WAIT, |code, v| {
        (code == 200 && pull_token_of(v) != token).then_some(())
    });
    let again = create_pod(&kube, "reinstalled", &app_image, "Always");
    assert_rewritten(&again, "the reinstalled webhook does not rewrite");
    node.wait_running(&kube, APPS, "reinstalled", WAIT);

    // Removed as the README says: the release; the CachedImages' finalizer, which only the
    // controller removes, cleared so that the CRD can go; the claim, the Lease, the pull-token
    // Secrets and (already) cert-manager's Secrets.
    // Nothing of kache is left but the Secret the user made.
    helm.ok(&["uninstall", "kache", "-n", NS, "--wait", "--timeout", "5m"]);
    let images_path = "/apis/kache.io/v1alpha1/cachedimages";
    let listed = kube.ok("GET", images_path, None);
    for ci in listed["items"].as_array().unwrap() {
        let name = ci["metadata"]["name"].as_str().unwrap();
        kube.ok(
            "PATCH",
            &format!("{images_path}/{name}"),
            Some(&json!({"metadata": {"finalizers": null}})),
        );
    }
    kube.ok("DELETE", crd, None);
    kube.wait_for(crd, WAIT, |code, _| (code == 404).then_some(()));
    let (code, _) = kube.request(
        "DELETE",
        &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims/data-kache-registry-0"),
        None,
    );
    assert_eq!(code, if current { 404 } else { 200 });
    kube.ok(
        "DELETE",
        &format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/kache-controller"),
        None,
    );
    let managed = "/api/v1/secrets?labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkache";
    for secret in kube.ok("GET", managed, None)["items"].as_array().unwrap() {
        let meta = &secret["metadata"];
        kube.ok(
            "DELETE",
            &format!(
                "/api/v1/namespaces/{}/secrets/{}",
                meta["namespace"].as_str().unwrap(),
                meta["name"].as_str().unwrap()
            ),
            None,
        );
    }
    assert_eq!(kube.ok("GET", managed, None)["items"], json!([]));
    assert_release_gone(&kube, RELEASE_COLLECTIONS);
    kube.wait_for(&format!("/api/v1/namespaces/{NS}/pods"), WAIT, |_, v| {
        (v["items"] == json!([])).then_some(())
    });
    kube.wait_for(
        &format!("/api/v1/namespaces/{NS}/persistentvolumeclaims"),
        WAIT,
        |_, v| (v["items"] == json!([])).then_some(()),
    );
    let left = left_in_namespace(&kube);
    assert!(
        left.iter().all(|(kind, names)| names.is_empty()
            || (*kind == "secrets" && names == &["webhook-provided"])),
        "{left:?}"
    );
}
