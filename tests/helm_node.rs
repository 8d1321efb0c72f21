//! `helm install` as a cluster admin runs it, on the test bed's real node (scripts/kube-test-node)
//! of each Kubernetes version. On the current one, cert-manager first (its controller, webhook
//! and cainjector built from its Go module and packed as images the way kache's is, installed
//! from its own chart), then kache from helm/kache; on 1.20, where current cert-manager releases
//! do not run, kache with a certificate from `kache certs`. Then, in one sequence per version
//! (one node per machine):
//!
//! - every pod is Ready, and the webhook configuration trusts the webhook's CA (cert-manager
//!   issued the certificate and injected its CA, or the chart set the one given);
//! - a Deployment in another namespace is rewritten, pulled through the proxy and Running, and
//!   its CachedImage is Cached;
//! - the certificate is renewed (as `cmctl renew` asks, or `kache certs` run again and the
//!   Secret updated): the webhook serves the new one without a restart, and the API server still
//!   trusts it;
//! - `helm upgrade` with changed values rolls every component while pods keep starting, none with
//!   a failed pull from 1.22 on (the proxy surges; before, the kubelet retries);
//! - `helm uninstall` leaves only the CRD and the registry's claim, and a pod created afterwards
//!   is not rewritten;
//! - installed again with a certificate from `kache certs`: the registry finds its store on the
//!   kept claim, and pods are rewritten and start.
//!
//! The test bed has no kube-proxy and no cluster DNS, and the node's address is 127.0.0.1: the
//! registry runs on the node's network (registry.hostNetwork) and the proxies and the controller
//! are pointed at it (proxy.registryURL, controller.registryURL; pods reach the node's loopback
//! at the bridge's address, see scripts/kube-test-node). The API server calls both webhooks at
//! their pods' addresses (--enable-aggregator-routing).

use kache_testkit as support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kache_api::cached_image_name;
use serde_json::{Value, json};
use support::containerd::skip_unless_root;
use support::helm::{Helm, assert_release_gone, chart};
use support::kube::{KubeServer, Version, non_loopback_name};
use support::metrics;
use support::node::{KubeNode, build_kache_image, build_program_image};
use support::pki::free_addr;
use support::pull::Scratch;
use support::{Content as _, Distribution, DistributionKind, Image, ImageBuilder};

const CERT_MANAGER: &str = "v1.11.5";
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
    kube.ok(
        "POST",
        &format!("/api/v1/namespaces/{APPS}/pods"),
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

/// cert-manager's three images, built from its Go module by the test bed and packed by
/// scripts/build-image, then imported under the names its chart uses.
fn import_cert_manager(kube: &KubeServer, node: &KubeNode, dir: &Path) {
    for (bin, image) in [
        ("controller", "cert-manager-controller"),
        ("webhook", "cert-manager-webhook"),
        ("cainjector", "cert-manager-cainjector"),
    ] {
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

    // The images: kache's under the chart's default name, cert-manager's under its chart's.
    let kache_image = format!("ghcr.io/kache-io/kache:{}", env!("CARGO_PKG_VERSION"));
    build_kache_image(
        Path::new(env!("CARGO_BIN_EXE_kache")),
        &s.path("kache-image"),
        &kache_image,
    );
    node.import(&s.path("kache-image").join("kache-image.tar"));
    if current {
        import_cert_manager(&kube, &node, &s.path("cert-manager-images"));
    }

    // The upstream and its images.
    let pause = std::fs::read(kube.bin.join("pause")).expect("the release's pause program");
    let upstream = Distribution::start(DistributionKind::Open);
    let host = non_loopback_name(&upstream.host());
    let (app, during, after) = (
        runnable(&pause, 11),
        runnable(&pause, 12),
        runnable(&pause, 13),
    );
    let src = s.layout(
        "src",
        &[("app", &app), ("during", &during), ("after", &after)],
    );
    for tag in ["app", "during", "after"] {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/e2e/{tag}:v1"),
            &[],
        );
    }

    // 1. cert-manager, from its chart (on 1.20, a certificate from `kache certs` instead).
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
            // Its start-up check runs cmctl, which is not built here; the waits below do its job.
            "--set",
            "startupapicheck.enabled=false",
            // The Secrets it writes go with their Certificates (so with `helm uninstall`).
            "--set",
            "extraArgs={--enable-certificate-owner-ref=true}",
            "--wait",
            "--timeout",
            "5m",
        ]);
    }

    // 2. kache, from helm/kache, with the test bed's addresses.
    registry_volume(&kube, &s.path("registry-data"));
    let (registry, internal, registry_metrics, proxy_metrics) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let values = s.path("values.yaml");
    std::fs::write(
        &values,
        serde_json::to_string_pretty(&json!({
            "registry": {
                "hostNetwork": true,
                "port": port(&registry),
                "internalPort": port(&internal),
                "metricsPort": port(&registry_metrics),
                "persistence": {"storageClass": "kache-test", "size": "1Gi"},
                // The volume is the machine's disk, whose free space is not the test's.
                "minFree": "0",
            },
            "proxy": {
                "registryURL": format!("http://{registry}"),
                "metricsPort": port(&proxy_metrics),
            },
            "controller": {"registryURL": format!("http://10.244.77.1:{}", port(&internal))},
            "upstream": {"insecureRegistries": [host]},
            "webhook": {"ignoredNamespaces": ["cert-manager"]},
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
        "--timeout",
        "5m",
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
    let mut args = vec!["install"];
    if current {
        args.push("--create-namespace");
    } else {
        kube.namespace(NS);
        let secret = kache_certs(&certs);
        kube.ok(
            "POST",
            &format!("/api/v1/namespaces/{NS}/secrets"),
            Some(&secret),
        );
        args.extend(provided);
    }
    args.extend(install);
    helm.ok(&args);
    wait_kache_ready(&kube, &node);
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

    // 3. A Deployment in another namespace: rewritten, pulled through the proxy, Running, Cached.
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

    // 4. The certificate renewed (as `cmctl renew` asks cert-manager for it; on 1.20, `kache
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

    // 5. `helm upgrade` with changed values: every component rolls while pods keep starting,
    // each pulling its image (Always) through whichever proxy is there; no pull fails.
    let proxies_before = pods(&kube, NS, "app.kubernetes.io/component%3Dproxy");
    let upgrade = {
        let helm = Helm::new(&kube);
        let mut args: Vec<String> = ["upgrade", "--reuse-values", "--set", "logFormat=text"]
            .map(String::from)
            .to_vec();
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

    // 6. `helm uninstall`: everything goes but the CRD and the registry's claim, and pods are no
    // longer rewritten.
    helm.ok(&["uninstall", "kache", "-n", NS, "--wait", "--timeout", "5m"]);
    let collections = [
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
    assert_release_gone(&kube, &collections);
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
    // cert-manager's Secrets go with their Certificates, through the garbage collector.
    kube.wait_for(
        "/api/v1/namespaces/kache/secrets?labelSelector=app.kubernetes.io/instance%3Dkache",
        WAIT,
        |_, v| (v["items"] == json!([])).then_some(()),
    );
    assert_eq!(
        kube.request(
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/cachedimages.kache.io",
            None
        )
        .0,
        200,
        "the CRD went with the release"
    );
    let claim = kube.ok(
        "GET",
        "/api/v1/namespaces/kache/persistentvolumeclaims/data-kache-registry-0",
        None,
    );
    assert_eq!(claim["status"]["phase"], "Bound", "{claim}");
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

    // 7. Installed again, without cert-manager, with a certificate from `kache certs` (on 1.20,
    // the Secret is still there): the registry finds its store on the kept claim, and pods are
    // rewritten and start again.
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
    helm.ok(&args);
    wait_kache_ready(&kube, &node);
    assert_eq!(
        kube.webhook_ca_bundle("kache"),
        std::fs::read_to_string(certs.join("ca.crt")).unwrap()
    );
    // The app's manifest, by digest, straight from the kept store: the upstream is not asked.
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
    let again = create_pod(&kube, "reinstalled", &app_image, "Always");
    assert_rewritten(&again, "the reinstalled webhook does not rewrite");
    node.wait_running(&kube, APPS, "reinstalled", WAIT);
}
