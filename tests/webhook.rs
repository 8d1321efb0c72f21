//! The webhook behind a real Kubernetes 1.20 API server (scripts/kube-test-server): pods and a
//! Deployment's pods (made by kube-controller-manager) come out rewritten and labelled, so do
//! ephemeral containers added through `pods/ephemeralcontainers`, an ignored pod is untouched, and
//! with the webhook gone pods are still created.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::kube::KubeServer;

/// A test CA and a serving certificate for 127.0.0.1 signed by it (rustls, in the API
/// server's client too, refuses a self-signed certificate that is its own CA).
fn certificates(dir: &Path) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kache webhook test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    ca_cert.pem()
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

struct Webhook {
    child: Child,
    addr: String,
}

impl Webhook {
    fn start(dir: &Path) -> Self {
        let (addr, metrics) = (free_addr(), free_addr());
        let child = Command::new(env!("CARGO_BIN_EXE_kache"))
            .args(["webhook", "--listen", &addr, "--metrics-listen", &metrics])
            .arg("--tls-cert")
            .arg(dir.join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.join("tls.key"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("webhook.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the webhook never listened on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Webhook { child, addr }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox:1.36", "command": ["true"]}],
            "containers": [
                {"name": "web", "image": "nginx"},
                {"name": "app", "image": "ghcr.io/o/a:1"},
                {"name": "local", "image": "registry:5000/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
            ],
        },
    })
}

fn images(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| c["image"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pods_are_rewritten_by_a_real_api_server_and_never_blocked() {
    let kube = KubeServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let webhook = Webhook::start(dir.path());
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
                    "url": format!("https://{}/mutate", webhook.addr),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(ca),
                },
                "rules": [
                    {"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]},
                    {"operations": ["UPDATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/ephemeralcontainers"]},
                ],
                "failurePolicy": "Ignore",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "objectSelector": {"matchExpressions": [
                    {"key": "kache.io/image-caching-policy", "operator": "NotIn", "values": ["ignore"]},
                ]},
            }],
        })),
    );
    kube.namespace("t");

    // A pod: every container and init container rewritten, labelled, originals recorded.
    let created = kube.ok(
        "POST",
        "/api/v1/namespaces/t/pods",
        Some(&pod("plain", json!({"app": "x"}))),
    );
    assert_eq!(
        images(&created, "containers"),
        [
            "localhost:7439/docker.io/library/nginx:latest",
            "localhost:7439/ghcr.io/o/a:1",
            "localhost:7439/registry_5000/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
        "{}",
        kube.logs()
    );
    assert_eq!(
        images(&created, "initContainers"),
        ["localhost:7439/docker.io/library/busybox:1.36"]
    );
    assert_eq!(created["metadata"]["labels"]["kache.io/managed"], "true");
    assert_eq!(created["metadata"]["labels"]["app"], "x");
    let annotations = created["metadata"]["annotations"]
        .as_object()
        .expect("annotations");
    let originals: Vec<&str> = annotations.values().filter_map(Value::as_str).collect();
    for original in ["nginx", "ghcr.io/o/a:1", "busybox:1.36"] {
        assert!(
            originals.contains(&original),
            "{original} not recorded: {annotations:?}"
        );
    }

    // Ephemeral containers: on 1.16–1.21 they come through `pods/ephemeralcontainers` as an
    // EphemeralContainers object (the list and the pod's identity), not a Pod; the new one is
    // rewritten all the same, through the same rules.
    let subresource = "/api/v1/namespaces/t/pods/plain/ephemeralcontainers";
    let debug = |name: &str, image: &str| {
        // Read first: the update carries the resourceVersion and the whole current list.
        let mut ec = kube.ok("GET", subresource, None);
        assert_eq!(ec["kind"], "EphemeralContainers", "{ec}");
        ec["ephemeralContainers"]
            .as_array_mut()
            .expect("a list")
            .push(json!({
                "name": name, "image": image, "command": ["sh"], "stdin": true, "tty": true,
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            }));
        kube.ok("PUT", subresource, Some(&ec))
    };
    let updated = debug("debugger", "busybox:1.36");
    assert_eq!(
        updated["ephemeralContainers"][0]["image"],
        "localhost:7439/docker.io/library/busybox:1.36",
        "{updated}\n{}",
        kube.logs()
    );
    let debugged = kube.ok("GET", "/api/v1/namespaces/t/pods/plain", None);
    assert_eq!(
        images(&debugged, "ephemeralContainers"),
        ["localhost:7439/docker.io/library/busybox:1.36"]
    );
    assert_eq!(
        images(&debugged, "containers"),
        images(&created, "containers")
    );
    assert_eq!(
        debugged["metadata"]["labels"],
        created["metadata"]["labels"]
    );
    // A second one: the first is left exactly as stored (the API server refuses any change to it).
    debug("shell", "ghcr.io/o/a:1");
    let debugged = kube.ok("GET", "/api/v1/namespaces/t/pods/plain", None);
    assert_eq!(
        images(&debugged, "ephemeralContainers"),
        [
            "localhost:7439/docker.io/library/busybox:1.36",
            "localhost:7439/ghcr.io/o/a:1",
        ]
    );

    // An ignored pod is untouched.
    let ignored = kube.ok(
        "POST",
        "/api/v1/namespaces/t/pods",
        Some(&pod(
            "ignored",
            json!({"kache.io/image-caching-policy": "ignore"}),
        )),
    );
    assert_eq!(images(&ignored, "containers")[0], "nginx");
    assert!(
        ignored["metadata"]["labels"]
            .get("kache.io/managed")
            .is_none()
    );

    // A Deployment's pods, made by kube-controller-manager, are rewritten too.
    kube.ok(
        "POST",
        "/apis/apps/v1/namespaces/t/deployments",
        Some(&json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}},
            },
        })),
    );
    let pods = kube.wait_for(
        "/api/v1/namespaces/t/pods?labelSelector=app%3Dweb",
        Duration::from_secs(60),
        |_, v| {
            let items = v["items"].as_array()?;
            (items.len() == 2).then(|| items.clone())
        },
    );
    for p in &pods {
        assert_eq!(
            images(p, "containers"),
            ["localhost:7439/docker.io/library/nginx:1.27"]
        );
        assert_eq!(p["metadata"]["labels"]["kache.io/managed"], "true");
    }

    // A second admission of an already rewritten pod changes nothing.
    let again = kube.ok("POST", "/api/v1/namespaces/t/pods", Some(&{
        let mut p = created.clone();
        p["metadata"] = json!({"name": "again", "labels": created["metadata"]["labels"], "annotations": created["metadata"]["annotations"]});
        p.as_object_mut().unwrap().remove("status");
        p
    }));
    assert_eq!(images(&again, "containers"), images(&created, "containers"));

    // With the webhook gone, pods are still created (failurePolicy: Ignore), unchanged.
    drop(webhook);
    let unmutated = kube.ok(
        "POST",
        "/api/v1/namespaces/t/pods",
        Some(&pod("after", json!({}))),
    );
    assert_eq!(images(&unmutated, "containers")[0], "nginx");
}
