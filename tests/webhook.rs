//! The webhook behind real Kubernetes API servers, 1.20 and current (scripts/kube-test-server):
//! pods and a Deployment's pods (made by kube-controller-manager) come out rewritten and
//! labelled, so do ephemeral containers added through `pods/ephemeralcontainers` in both of its
//! forms, an ignored pod is untouched, and with the webhook gone pods are still created.

use kache_testkit as support;

use std::time::Duration;

use serde_json::{Value, json};
use support::kube::{KubeServer, Version};
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
fn pods_are_rewritten_by_kubernetes_1_20_and_never_blocked() {
    pods_are_rewritten_and_never_blocked(Version::Oldest);
}

#[test]
fn pods_are_rewritten_by_a_current_kubernetes_and_never_blocked() {
    pods_are_rewritten_and_never_blocked(Version::Current);
}

fn pods_are_rewritten_and_never_blocked(version: Version) {
    let kube = KubeServer::start(version);
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
    // EphemeralContainers object (the list and the pod's identity); from 1.22 as the whole Pod.
    // The new one is rewritten all the same, through the same rules.
    let subresource = "/api/v1/namespaces/t/pods/plain/ephemeralcontainers";
    let list = |v: &mut Value| -> Value {
        match version {
            Version::Oldest => v["ephemeralContainers"].take(),
            Version::Current => v["spec"]["ephemeralContainers"].take(),
        }
    };
    let debug = |name: &str, image: &str| {
        // Read, then update with the resourceVersion read, as kubectl does; on either version
        // the scheduler may write the pending pod's status in between (409): read again.
        for _ in 0..10 {
            let mut ec = kube.ok("GET", subresource, None);
            let kind = match version {
                Version::Oldest => "EphemeralContainers",
                Version::Current => "Pod",
            };
            assert_eq!(ec["kind"], kind, "{ec}");
            let mut containers = list(&mut ec);
            if containers.is_null() {
                containers = json!([]);
            }
            containers.as_array_mut().expect("a list").push(json!({
                "name": name, "image": image, "command": ["sh"], "stdin": true, "tty": true,
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent",
            }));
            match version {
                Version::Oldest => ec["ephemeralContainers"] = containers,
                Version::Current => ec["spec"]["ephemeralContainers"] = containers,
            }
            let (status, v) = kube.request("PUT", subresource, Some(&ec));
            if status != 409 {
                assert!(
                    (200..300).contains(&status),
                    "PUT {subresource}: {status} {v}"
                );
                return v;
            }
        }
        panic!("PUT {subresource}: a conflict ten times in a row");
    };
    let mut updated = debug("debugger", "busybox:1.36");
    assert_eq!(
        list(&mut updated)[0]["image"],
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
