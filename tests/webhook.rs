//! The webhook behind a real Kubernetes 1.20 API server (scripts/kube-test-server): pods and a
//! Deployment's pods (made by kube-controller-manager) come out rewritten and labelled, so do
//! ephemeral containers added through `pods/ephemeralcontainers`, an ignored pod is untouched, and
//! with the webhook gone pods are still created.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::kube::KubeServer;
use support::webhook::{Webhook, certificates, register};

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
    register(&kube, &webhook, &ca);
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
