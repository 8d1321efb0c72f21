//! Table tests on AdmissionReview bodies shaped as the API server sends them: the answer's patch
//! is applied to the object as sent, the result checked, and a second admission changes nothing.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Pod;
use kache_webhook::{ContainerKind, Pattern, PodSkip, Policy, review};
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Sends `body` through the webhook; returns the response and the object with its patch applied.
fn admit(body: &Value, policy: &Policy) -> (Value, Value) {
    let reviewed = review(&serde_json::to_vec(body).unwrap(), policy).unwrap();
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], body["request"]["uid"]);
    assert_eq!(response["allowed"], true, "never blocks: {response}");
    let mut object = body["request"]["object"].clone();
    if let Some(patch) = response.get("patch") {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = STANDARD
            .decode(patch.as_str().expect("a base64 string"))
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut object, &patch).unwrap_or_else(|e| panic!("{e}: {patch:?}"));
    }
    (response, object)
}

struct Case {
    fixture: &'static str,
    policy: fn() -> Policy,
    /// JSON pointers into the patched object and the value expected there.
    expect: Vec<(&'static str, Value)>,
    /// Substrings of the expected warnings, one per warning.
    warnings: &'static [&'static str],
    patched: bool,
}

const N62: &str = "sidecar-with-a-remarkably-long-name-that-nearly-fills-a-labelx";
const N63: &str = "init-container-with-a-remarkably-long-name-that-fills-the-label";
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn cases() -> Vec<Case> {
    vec![
        Case {
            fixture: "create_replicaset_pod.json",
            policy: Policy::default,
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!("localhost:7439/docker.io/library/nginx:1.19"),
                ),
                (
                    "/spec/containers/1/image",
                    json!(format!(
                        "localhost:7439/quay.io/prometheus/nginx-exporter@sha256:{HEX}"
                    )),
                ),
                (
                    "/spec/initContainers/0/image",
                    json!("localhost:7439/ghcr.io/acme/shop-migrate:2.4.1"),
                ),
                (
                    "/metadata/labels",
                    json!({"app": "web", "pod-template-hash": "6d4cf56db6", "kache.io/managed": "true"}),
                ),
                (
                    "/metadata/annotations",
                    json!({
                        "original-image.kache.io/c.web": "nginx:1.19",
                        "original-image.kache.io/c.exporter": format!("quay.io/prometheus/nginx-exporter@sha256:{HEX}"),
                        "original-image.kache.io/i.migrate": "ghcr.io/acme/shop-migrate:2.4.1",
                    }),
                ),
                // The rest of the pod is as it was sent.
                ("/spec/tolerations/1/tolerationSeconds", json!(300)),
                (
                    "/spec/volumes/0/projected/sources/0/serviceAccountToken/expirationSeconds",
                    json!(3607),
                ),
                (
                    "/metadata/managedFields/0/manager",
                    json!("kube-controller-manager"),
                ),
            ],
            warnings: &[],
            patched: true,
        },
        Case {
            fixture: "create_bare_pod.json",
            policy: Policy::default,
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!(
                        "localhost:7439/registry_5000/tools/x@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                    ),
                ),
                (
                    "/spec/containers/1/image",
                    json!("localhost:7439/docker.io/library/busybox:latest"),
                ),
                ("/spec/containers/2/image", json!("acme/dev-build:wip")),
                (
                    "/spec/containers/3/image",
                    json!("localhost:7439/docker.io/library/redis:6.2"),
                ),
                ("/metadata/labels", json!({"kache.io/managed": "true"})),
                (
                    "/metadata/annotations",
                    json!({
                        "original-image.kache.io/c.tools": "registry:5000/tools/x@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                        "original-image.kache.io/c.shell": "busybox",
                    }),
                ),
            ],
            warnings: &[],
            patched: true,
        },
        Case {
            fixture: "create_bare_pod.json",
            policy: || Policy {
                skip_mutable: true,
                ignore_registries: vec![Pattern::registry("registry:5000").unwrap()],
                ..Policy::default()
            },
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!(format!(
                        "registry:5000/tools/x@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                    )),
                ),
                ("/spec/containers/1/image", json!("busybox")),
                ("/metadata/labels", Value::Null),
            ],
            warnings: &[],
            patched: false,
        },
        Case {
            fixture: "create_applied_pod.json",
            policy: Policy::default,
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!("localhost:7439/gcr.io/acme-prod/api:v3.2.0"),
                ),
                (
                    "/spec/containers/1/image",
                    json!("localhost:7439/docker.io/envoyproxy/envoy:v1.17.0"),
                ),
                ("/spec/containers/2/image", json!("Acme/Legacy:1")),
                (
                    "/spec/initContainers/0/image",
                    json!("localhost:7439/docker.io/library/alpine:3.13"),
                ),
                ("/metadata/labels/kache.io~1managed", json!("true")),
                ("/metadata/labels/tier", json!("backend")),
                ("/metadata/annotations/example.com~1a~0b", json!("tilde")),
                (
                    "/metadata/annotations/original-image.kache.io~1c.api",
                    json!("gcr.io/acme-prod/api:v3.2.0"),
                ),
            ],
            warnings: &["\"legacy\"", "\"archive\""],
            patched: true,
        },
        Case {
            fixture: "create_applied_pod.json",
            policy: || Policy {
                accept: vec![Pattern::image("regex:^gcr\\.io/").unwrap()],
                ..Policy::default()
            },
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!("localhost:7439/gcr.io/acme-prod/api:v3.2.0"),
                ),
                (
                    "/spec/containers/1/image",
                    json!("docker.io/envoyproxy/envoy:v1.17.0"),
                ),
                ("/spec/initContainers/0/image", json!("alpine:3.13")),
            ],
            // Unparsable images are still worth a warning; too long ones are not on the list.
            warnings: &["\"legacy\""],
            patched: true,
        },
        Case {
            fixture: "create_opted_out_pod.json",
            policy: Policy::default,
            expect: vec![
                ("/spec/containers/0/image", json!("restic/restic:0.12.0")),
                ("/metadata/labels/kache.io~1managed", Value::Null),
            ],
            warnings: &[],
            patched: false,
        },
        Case {
            fixture: "update_ephemeral_containers.json",
            policy: Policy::default,
            expect: vec![
                (
                    "/spec/containers/0/image",
                    json!("localhost:7439/docker.io/acme/app:2.1"),
                ),
                // Already there before: the API server refuses changes to it.
                ("/spec/ephemeralContainers/0/image", json!("busybox:1.32")),
                (
                    "/spec/ephemeralContainers/1/image",
                    json!("localhost:7439/docker.io/nicolaka/netshoot:v0.2"),
                ),
                (
                    "/metadata/annotations",
                    json!({
                        "original-image.kache.io/c.app": "acme/app:2.1",
                        "original-image.kache.io/e.debugger-2": "nicolaka/netshoot:v0.2",
                    }),
                ),
                (
                    "/metadata/labels",
                    json!({"app": "app", "pod-template-hash": "7f9c6b8d4", "kache.io/managed": "true"}),
                ),
            ],
            warnings: &[],
            patched: true,
        },
        // Kubernetes 1.16–1.21: the subresource's own kind, with only the pod's identity for
        // metadata. A strategic merge patch puts the new containers first.
        Case {
            fixture: "update_ephemeral_containers_1_20.json",
            policy: Policy::default,
            expect: vec![
                (
                    "/ephemeralContainers/0/image",
                    json!("localhost:7439/docker.io/nicolaka/netshoot:v0.2"),
                ),
                ("/ephemeralContainers/0/targetContainerName", json!("app")),
                ("/ephemeralContainers/1/image", json!("Busybox:1.32")),
                // Already there before: the API server refuses changes to it.
                ("/ephemeralContainers/2/image", json!("busybox:1.32")),
                // No label or annotation: the subresource would drop them.
                (
                    "/metadata",
                    json!({
                        "name": "app-7f9c6b8d4-zx2kq",
                        "namespace": "shop",
                        "uid": "4c3b2a19-0f8e-4d7c-b6a5-948372615a0b",
                        "resourceVersion": "183391",
                        "creationTimestamp": "2021-02-11T09:14:03Z",
                    }),
                ),
                ("/spec", Value::Null),
            ],
            warnings: &["ephemeral container \"debugger-3\""],
            patched: true,
        },
        Case {
            fixture: "create_deployment.json",
            policy: Policy::default,
            expect: vec![(
                "/spec/template/spec/containers/0/image",
                json!("nginx:1.19"),
            )],
            warnings: &[],
            patched: false,
        },
    ]
}

#[test]
fn fixtures() {
    for case in cases() {
        let name = case.fixture;
        let policy = (case.policy)();
        let body = fixture(name);
        let (response, object) = admit(&body, &policy);
        assert_eq!(
            response.get("patch").is_some(),
            case.patched,
            "{name}: {response}"
        );
        for (pointer, want) in &case.expect {
            let got = object.pointer(pointer).cloned().unwrap_or(Value::Null);
            assert_eq!(&got, want, "{name}: {pointer}");
        }
        let warnings: Vec<String> = response
            .get("warnings")
            .map(|w| serde_json::from_value(w.clone()).unwrap())
            .unwrap_or_default();
        assert_eq!(warnings.len(), case.warnings.len(), "{name}: {warnings:?}");
        for (w, want) in warnings.iter().zip(case.warnings) {
            assert!(w.contains(want), "{name}: {w:?} lacks {want}");
        }

        // A second admission of the patched pod changes nothing.
        let mut again = body.clone();
        again["request"]["object"] = object.clone();
        let (response2, object2) = admit(&again, &policy);
        assert!(response2.get("patch").is_none(), "{name}: {response2}");
        assert_eq!(object2, object, "{name}");
    }
}

#[test]
fn long_container_names_get_packed_keys() {
    let (_, object) = admit(&fixture("create_applied_pod.json"), &Policy::default());
    let annotations = object["metadata"]["annotations"].as_object().unwrap();
    let keys: Vec<&str> = annotations
        .keys()
        .map(String::as_str)
        .filter(|k| k.starts_with("original-image.kache.io/"))
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    for k in &keys {
        let name_part = k.split_once('/').unwrap().1;
        assert!(name_part.len() <= 63, "{k}");
    }
    let pod: Pod = serde_json::from_value(object.clone()).unwrap();
    assert_eq!(
        kache_webhook::original_images(&pod),
        vec![
            (
                ContainerKind::Container,
                "api".to_owned(),
                "gcr.io/acme-prod/api:v3.2.0".to_owned()
            ),
            (
                ContainerKind::Container,
                N62.to_owned(),
                "docker.io/envoyproxy/envoy:v1.17.0".to_owned()
            ),
            (
                ContainerKind::Init,
                N63.to_owned(),
                "alpine:3.13".to_owned()
            ),
        ]
    );
}

/// The 1.16–1.21 form of `pods/ephemeralcontainers`: the patch only replaces images of new
/// ephemeral containers, the pod's opt-out label is honoured when the object carries it, and the
/// controller still finds the original images (from the rewritten references).
#[test]
fn ephemeral_containers_object() {
    let policy = Policy::default();
    let body = fixture("update_ephemeral_containers_1_20.json");
    let reviewed = review(&serde_json::to_vec(&body).unwrap(), &policy).unwrap();
    assert_eq!(reviewed.rewritten, 1);
    assert_eq!(
        reviewed
            .skipped
            .iter()
            .map(|s| (s.kind, s.container.as_str(), s.reason.as_str()))
            .collect::<Vec<_>>(),
        [(ContainerKind::Ephemeral, "debugger-3", "unparsable")]
    );
    let (response, object) = admit(&body, &policy);
    let patch: Value = serde_json::from_slice(
        &STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        patch,
        json!([{
            "op": "replace",
            "path": "/ephemeralContainers/0/image",
            "value": "localhost:7439/docker.io/nicolaka/netshoot:v0.2",
        }])
    );

    // What the pod holds once the API server has stored the list.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": "app-7f9c6b8d4-zx2kq",
            "annotations": {"original-image.kache.io/c.app": "acme/app:2.1"},
        },
        "spec": {
            "containers": [{"name": "app", "image": "localhost:7439/docker.io/acme/app:2.1"}],
            "ephemeralContainers": object["ephemeralContainers"],
        },
    }))
    .unwrap();
    assert_eq!(
        kache_webhook::original_images(&pod),
        vec![
            (
                ContainerKind::Container,
                "app".to_owned(),
                "acme/app:2.1".to_owned()
            ),
            (
                ContainerKind::Ephemeral,
                "debugger-2".to_owned(),
                "docker.io/nicolaka/netshoot:v0.2".to_owned()
            ),
        ]
    );

    // Nothing of the metadata is needed to rewrite.
    let mut bare = body.clone();
    bare["request"]["object"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    let (_, object) = admit(&bare, &policy);
    assert_eq!(
        object["ephemeralContainers"][0]["image"],
        "localhost:7439/docker.io/nicolaka/netshoot:v0.2"
    );

    let mut ignored = body.clone();
    ignored["request"]["object"]["metadata"]["labels"] =
        json!({"kache.io/image-caching-policy": "ignore"});
    let reviewed = review(&serde_json::to_vec(&ignored).unwrap(), &policy).unwrap();
    assert!(reviewed.pod_skipped == Some(PodSkip::OptedOut) && reviewed.unhandled.is_none());
    let (response, object) = admit(&ignored, &policy);
    assert!(response.get("patch").is_none(), "{response}");
    assert_eq!(object, ignored["request"]["object"]);

    // The same rules as for a Pod: a policy that leaves mutable images alone still takes a
    // pinned tag.
    let skip_mutable = Policy {
        skip_mutable: true,
        ..Policy::default()
    };
    let (_, object) = admit(&body, &skip_mutable);
    assert_eq!(
        object["ephemeralContainers"][0]["image"],
        "localhost:7439/docker.io/nicolaka/netshoot:v0.2"
    );
    let mut latest = body.clone();
    latest["request"]["object"]["ephemeralContainers"][0]["image"] = json!("nicolaka/netshoot");
    let (response, _) = admit(&latest, &skip_mutable);
    assert!(response.get("patch").is_none(), "{response}");
}

#[test]
fn unexpected_reviews_are_allowed_unchanged() {
    let policy = Policy::default();
    let base = fixture("create_replicaset_pod.json");
    let mut variants = Vec::new();
    let mut v = base.clone();
    v["request"]["object"]["spec"]["containers"] = json!("not a list");
    variants.push(("unparsable object", v, "unparsable_object"));
    let mut v = base.clone();
    v["request"]["object"] = Value::Null;
    variants.push(("no object", v, "unparsable_object"));
    let mut v = base.clone();
    v["request"]["object"] = json!(42);
    variants.push(("object not an object", v, "unparsable_object"));
    let mut v = base.clone();
    v["request"]["object"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    // No API server sends that, but a patch that does not apply would fail the request.
    variants.push(("object without metadata", v, "invalid_patch"));
    let mut v = base.clone();
    v["request"]["operation"] = json!("DELETE");
    variants.push(("delete", v, "operation"));
    let mut v = base.clone();
    v["request"]["operation"] = json!("UPDATE");
    variants.push(("plain update", v, "operation"));
    let mut v = fixture("update_ephemeral_containers.json");
    v["request"]["oldObject"] = Value::Null;
    variants.push(("ephemeral update without oldObject", v, "unparsable_object"));
    let ec = fixture("update_ephemeral_containers_1_20.json");
    let mut v = ec.clone();
    v["request"]["object"] = json!(42);
    variants.push(("EphemeralContainers not an object", v, "unparsable_object"));
    let mut v = ec.clone();
    v["request"]["object"]["ephemeralContainers"] = json!({"name": "debugger-2"});
    variants.push(("ephemeral containers not a list", v, "unparsable_object"));
    let mut v = ec.clone();
    v["request"]["oldObject"] = Value::Null;
    variants.push((
        "EphemeralContainers without oldObject",
        v,
        "unparsable_object",
    ));
    let mut v = ec.clone();
    v["request"]["operation"] = json!("CREATE");
    v["request"]["subResource"] = Value::Null;
    variants.push(("EphemeralContainers create", v, "operation"));
    let mut v = base.clone();
    v["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Binding"});
    variants.push(("binding", v, "not_pod"));
    for (what, body, reason) in variants {
        let reviewed = review(&serde_json::to_vec(&body).unwrap(), &policy).unwrap();
        let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
        assert_eq!(answer["response"]["allowed"], true, "{what}");
        assert_eq!(answer["response"]["uid"], body["request"]["uid"], "{what}");
        assert!(answer["response"].get("patch").is_none(), "{what}");
        assert_eq!(
            reviewed.unhandled.map(|(r, _)| r.as_str()),
            Some(reason),
            "{what}"
        );
    }
}

#[test]
fn garbage_is_not_a_review() {
    let policy = Policy::default();
    for body in [
        &b""[..],
        b"{",
        b"null",
        b"[]",
        b"{}",
        b"{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\"}",
        b"{\"kind\":\"Pod\",\"apiVersion\":\"v1\",\"request\":{}}",
        b"\xff\xfe",
    ] {
        let err = review(body, &policy).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
}
