//! `review` against a reference on kube's types and a k8s-openapi `Pod`, bodies in and answers out.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::Deserialize;
use serde_json::{Value, json};

use super::dispatch::onto_ephemeral_containers;
use super::*;
use crate::rules::{self, Scope, Selector};
use crate::view::Form;

/// What `review` did before it read the body in one pass, and the reference for its answers:
/// the body as a `Value`, the envelope through kube's `AdmissionReview`, the object as a
/// k8s-openapi `Pod`, the patch checked by applying it to the object, and the answer as kube's
/// `AdmissionResponse` serialises it (its patch bytes, an array of numbers, rewritten to
/// base64 through a `Value`).
fn through_kube(body: &[u8], policy: &Policy) -> Result<Reference, &'static str> {
    let mut doc: Value = serde_json::from_slice(body).map_err(|_| "json")?;
    let mut take = |p: &str| doc.pointer_mut(p).map(Value::take).filter(|v| !v.is_null());
    let (object, old_object) = (take("/request/object"), take("/request/oldObject"));
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(doc).map_err(|_| "json")?;
    if review.types.kind != "AdmissionReview"
        || !review.types.api_version.starts_with("admission.k8s.io/")
    {
        return Err("not a review");
    }
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| "no request")?;
    let mut response = AdmissionResponse::from(&request);
    let mut out = Reference::default();
    match reference_rewrite_request(&request, object, old_object, policy) {
        Ok((rewrite, checked)) => {
            out.rewritten = rewrite.rewritten;
            out.skipped = rewrite.skipped;
            out.pod_skipped = rewrite.pod_skipped;
            if !rewrite.warnings.is_empty() {
                response.warnings = Some(rewrite.warnings);
            }
            if let Some(patch) = checked {
                response = response.with_patch(patch).unwrap();
            }
        }
        Err((reason, _)) => out.unhandled = Some(reason),
    }
    let mut v = serde_json::to_value(response.into_review()).unwrap();
    if let Some(patch) = v.pointer_mut("/response/patch") {
        let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap();
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    out.body = String::from_utf8(serde_json::to_vec(&v).unwrap()).unwrap();
    Ok(out)
}

#[derive(Debug, Default, PartialEq)]
struct Reference {
    body: String,
    rewritten: usize,
    skipped: Vec<Skipped>,
    pod_skipped: Option<PodSkip>,
    unhandled: Option<Unhandled>,
}

fn ours(body: &[u8], policy: &Policy) -> Result<Reference, &'static str> {
    outcome(review(body, policy))
}

/// `review` with the objects left in place until the request says what they are: the path
/// of a body whose objects do not read as either form.
fn in_two_passes(body: &[u8], policy: &Policy) -> Result<Reference, &'static str> {
    let envelope =
        utf8(body).and_then(|text| Ok(serde_json::from_str::<Envelope<'_, &RawValue>>(text)?));
    outcome(envelope.and_then(|e| answer(e, policy)))
}

fn outcome(reviewed: Result<Reviewed, BadReview>) -> Result<Reference, &'static str> {
    match reviewed {
        Ok(r) => Ok(Reference {
            body: String::from_utf8(r.body).unwrap(),
            rewritten: r.rewritten,
            skipped: r.skipped,
            pod_skipped: r.pod_skipped,
            unhandled: r.unhandled.map(|(reason, _)| reason),
        }),
        Err(BadReview::Json(_)) => Err("json"),
        Err(BadReview::NotAReview { .. }) => Err("not a review"),
        Err(BadReview::NoRequest) => Err("no request"),
    }
}

fn reference_rewrite_request(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    old_object: Option<Value>,
    policy: &Policy,
) -> Result<(rules::Rewrite, Option<json_patch::Patch>), (Unhandled, String)> {
    let kind = &request.kind;
    let form = match (
        kind.group.as_str(),
        kind.version.as_str(),
        kind.kind.as_str(),
    ) {
        ("", "v1", "Pod") => Form::Pod,
        ("", "v1", "EphemeralContainers") => Form::EphemeralContainers,
        _ => return Err((Unhandled::NotPod, String::new())),
    };
    let ephemeral_update = request.operation == Operation::Update
        && request.sub_resource.as_deref() == Some("ephemeralcontainers");
    let create = form == Form::Pod
        && request.operation == Operation::Create
        && request.sub_resource.is_none();
    if !create && !ephemeral_update {
        return Err((Unhandled::Operation, String::new()));
    }
    let mut doc = object.ok_or_else(|| (Unhandled::BadObject, String::new()))?;
    let mut pod = reference_pod(&doc, form)?;
    // The request names the namespace; the object may not.
    pod.metadata.namespace = request.namespace.clone();
    let old;
    let scope = if ephemeral_update {
        let old_doc = old_object.ok_or_else(|| (Unhandled::BadObject, String::new()))?;
        old = reference_pod(&old_doc, form)?;
        Scope::EphemeralUpdate { old: &old }
    } else {
        Scope::Create
    };
    let mut rewrite = rules::rewrite(&pod, policy, scope);
    let patch = std::mem::take(&mut rewrite.patch);
    let patch = match form {
        Form::Pod => patch,
        Form::EphemeralContainers => onto_ephemeral_containers(patch)?,
    };
    if patch.0.is_empty() {
        return Ok((rewrite, None));
    }
    json_patch::patch(&mut doc, &patch).map_err(|e| (Unhandled::BadPatch, e.to_string()))?;
    Ok((rewrite, Some(patch)))
}

fn reference_pod(doc: &Value, form: Form) -> Result<Pod, (Unhandled, String)> {
    let bad = |e: serde_json::Error| (Unhandled::BadObject, e.to_string());
    match form {
        Form::Pod => Pod::deserialize(doc).map_err(bad),
        Form::EphemeralContainers => {
            let o = doc
                .as_object()
                .ok_or_else(|| (Unhandled::BadObject, String::new()))?;
            let field = |name: &str| o.get(name).cloned().unwrap_or(Value::Null);
            let view = json!({
                "metadata": field("metadata"),
                "spec": {"containers": [], "ephemeralContainers": field("ephemeralContainers")},
            });
            Pod::deserialize(&view).map_err(bad)
        }
    }
}

fn fixtures() -> Vec<(String, Vec<u8>)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5, "fixtures in {dir}");
    out
}

fn policies() -> [Policy; 5] {
    [
        Policy::default(),
        Policy {
            pull_secret: Some("kache-pull".into()),
            ..Policy::default()
        },
        Policy {
            skip_mutable: true,
            ..Policy::default()
        },
        Policy {
            ignored_namespaces: vec!["prod".into()],
            ..Policy::default()
        },
        Policy {
            object_selector: Selector::from_json(
                r#"{"matchExpressions":[{"key":"app","operator":"NotIn","values":["web"]}]}"#,
            )
            .unwrap(),
            ..Policy::default()
        },
    ]
}

#[test]
fn answers_are_byte_for_byte_what_kube_wrote() {
    for (name, body) in fixtures() {
        for policy in &policies() {
            let ours = ours(&body, policy).unwrap();
            assert_eq!(ours, through_kube(&body, policy).unwrap(), "{name}");
            assert_eq!(Ok(ours), in_two_passes(&body, policy), "{name}");
        }
    }
}

/// Bodies off the beaten path, each answered (or refused) as the reference does.
#[test]
fn variants_are_answered_as_kube_answered_them() {
    let fixture = |name: &str| -> Value {
        let (_, body) = fixtures()
            .into_iter()
            .find(|(n, _)| n.ends_with(name))
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    };
    let pod = fixture("create_replicaset_pod.json");
    let bare = fixture("create_bare_pod.json");
    let ephemeral = fixture("update_ephemeral_containers.json");
    let old_form = fixture("update_ephemeral_containers_1_20.json");
    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    let mut edit = |what: &str, base: &Value, pointer: &str, value: Option<Value>| {
        let mut v = base.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let parent = v.pointer_mut(parent).unwrap_or_else(|| panic!("{pointer}"));
        match (value, parent) {
            (Some(value), Value::Array(a)) => a[key.parse::<usize>().unwrap()] = value,
            (Some(value), p) => p[key] = value,
            (None, p) => {
                p.as_object_mut().unwrap().remove(key);
            }
        }
        bodies.push((format!("{what} {pointer}"), serde_json::to_vec(&v).unwrap()));
    };
    for base in [&pod, &bare] {
        for (pointer, value) in [
            ("/kind", Some(json!("AdmissionRequest"))),
            ("/kind", None),
            ("/apiVersion", Some(json!("v1"))),
            ("/apiVersion", Some(json!(1))),
            ("/request", None),
            ("/request", Some(Value::Null)),
            ("/request", Some(json!(42))),
            ("/response", Some(json!({"uid": "x"}))),
            ("/request/uid", None),
            ("/request/uid", Some(json!(7))),
            ("/request/kind", Some(json!({"group": "", "version": "v1"}))),
            ("/request/kind/kind", Some(json!("Binding"))),
            ("/request/kind/group", Some(json!("apps"))),
            ("/request/resource", None),
            ("/request/resource/group", Some(json!(1))),
            ("/request/requestKind", Some(json!([]))),
            ("/request/name", Some(Value::Null)),
            ("/request/namespace", Some(Value::Null)),
            ("/request/namespace", Some(json!({}))),
            ("/request/operation", Some(json!("PATCH"))),
            ("/request/operation", Some(json!("DELETE"))),
            ("/request/operation", Some(json!("UPDATE"))),
            ("/request/subResource", Some(json!("status"))),
            ("/request/userInfo", None),
            ("/request/userInfo/groups", Some(json!("system:masters"))),
            ("/request/dryRun", Some(json!("yes"))),
            ("/request/dryRun", Some(Value::Null)),
            ("/request/options", Some(json!([1, {"a": null}]))),
            ("/request/object", None),
            ("/request/object", Some(json!(42))),
            ("/request/object", Some(json!([]))),
            ("/request/object", Some(json!({}))),
            ("/request/object/kind", Some(json!("Deployment"))),
            ("/request/object/kind", Some(Value::Null)),
            ("/request/object/kind", None),
            ("/request/object/apiVersion", Some(json!("apps/v1"))),
            ("/request/object/apiVersion", None),
            ("/request/object/metadata", None),
            ("/request/object/metadata", Some(Value::Null)),
            ("/request/object/metadata", Some(json!([]))),
            ("/request/object/metadata", Some(json!({}))),
            ("/request/object/metadata/labels", Some(Value::Null)),
            ("/request/object/metadata/labels", Some(json!({}))),
            ("/request/object/metadata/labels", Some(json!([]))),
            ("/request/object/metadata/labels", Some(json!({"a": 1}))),
            (
                "/request/object/metadata/labels",
                Some(json!({"kache.io/managed": "true", "x": "\u{e9}\""})),
            ),
            (
                "/request/object/metadata/labels",
                Some(json!({"kache.io/image-caching-policy": "ignore"})),
            ),
            (
                "/request/object/metadata/labels",
                Some(json!({"kache.io/image-caching-policy": null})),
            ),
            ("/request/object/metadata/annotations", Some(Value::Null)),
            ("/request/object/metadata/annotations", Some(json!({}))),
            ("/request/object/metadata/annotations", Some(json!("x"))),
            (
                "/request/object/metadata/annotations",
                Some(json!({"original-image.kache.io/c.web": "nginx:1.19"})),
            ),
            (
                "/request/object/metadata/annotations",
                Some(json!({"original-image.kache.io/c.web": 1})),
            ),
            ("/request/object/spec", None),
            ("/request/object/spec", Some(Value::Null)),
            ("/request/object/spec", Some(json!([]))),
            ("/request/object/spec/containers", Some(Value::Null)),
            ("/request/object/spec/containers", Some(json!("not a list"))),
            ("/request/object/spec/containers", Some(json!({}))),
            (
                "/request/object/spec/containers/0",
                Some(json!(["web", "nginx"])),
            ),
            ("/request/object/spec/containers/0", Some(Value::Null)),
            ("/request/object/spec/containers/0/image", None),
            ("/request/object/spec/containers/0/image", Some(Value::Null)),
            ("/request/object/spec/containers/0/image", Some(json!(""))),
            ("/request/object/spec/containers/0/image", Some(json!(5))),
            (
                "/request/object/spec/containers/0/image",
                Some(json!("ngin\"x")),
            ),
            ("/request/object/spec/containers/0/name", None),
            (
                "/request/object/spec/containers/0/name",
                Some(json!(["web"])),
            ),
            (
                "/request/object/spec/containers/0/imagePullPolicy",
                Some(json!("Never")),
            ),
            (
                "/request/object/spec/containers/0/imagePullPolicy",
                Some(json!(true)),
            ),
            (
                "/request/object/spec/initContainers",
                Some(json!([{"name": "i", "image": "busybox"}])),
            ),
        ] {
            edit("pod", base, pointer, value);
        }
    }
    for (pointer, value) in [
        ("/request/oldObject", None),
        ("/request/oldObject", Some(json!("x"))),
        (
            "/request/oldObject/spec/ephemeralContainers",
            Some(Value::Null),
        ),
        (
            "/request/oldObject/spec/ephemeralContainers",
            Some(json!({})),
        ),
        (
            "/request/object/spec/ephemeralContainers/1/image",
            Some(json!(1)),
        ),
        (
            "/request/object/spec/ephemeralContainers",
            Some(Value::Null),
        ),
        ("/request/subResource", None),
        ("/request/operation", Some(json!("CREATE"))),
        ("/request/object/metadata", None),
        ("/request/object/metadata/annotations", Some(Value::Null)),
    ] {
        edit("ephemeral", &ephemeral, pointer, value);
    }
    for (pointer, value) in [
        ("/request/object", Some(json!(42))),
        ("/request/object", Some(json!([]))),
        ("/request/object", Some(json!({}))),
        ("/request/object/metadata", None),
        ("/request/object/metadata", Some(json!([]))),
        (
            "/request/object/metadata/labels",
            Some(json!({"kache.io/image-caching-policy": "ignore"})),
        ),
        (
            "/request/object/ephemeralContainers",
            Some(json!({"name": "debugger-2"})),
        ),
        ("/request/object/ephemeralContainers", Some(Value::Null)),
        (
            "/request/object/ephemeralContainers/0",
            Some(json!(["debugger-2"])),
        ),
        (
            "/request/object/ephemeralContainers/0/image",
            Some(json!(null)),
        ),
        ("/request/object/kind", Some(json!("Pod"))),
        ("/request/object/spec", Some(json!("not read"))),
        ("/request/oldObject", Some(Value::Null)),
        ("/request/oldObject/ephemeralContainers", Some(json!([]))),
        ("/request/operation", Some(json!("CREATE"))),
    ] {
        edit("1.20", &old_form, pointer, value);
    }
    for raw in [
        &b""[..],
        b"{",
        b"null",
        b"[]",
        b"{}",
        b"{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\"}",
        b"{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\",\"request\":null}",
        b"{\"kind\":\"Pod\",\"apiVersion\":\"v1\",\"request\":{}}",
        b"\xff\xfe",
        b"{\"kind\":\"AdmissionReview\",\"apiVersion\":\"admission.k8s.io/v1\",\"x\":\"\xff\"}",
    ] {
        bodies.push((String::from_utf8_lossy(raw).into_owned(), raw.to_vec()));
    }
    // Not UTF-8, deep in a string the webhook does not read.
    let mut v = serde_json::to_vec(&pod).unwrap();
    let at = v.windows(8).position(|w| w == b"\"system:").unwrap();
    v[at + 1] = 0xff;
    bodies.push(("a byte that is not UTF-8".to_owned(), v));
    // Trailing garbage.
    let mut v = serde_json::to_vec(&pod).unwrap();
    v.extend_from_slice(b" x");
    bodies.push(("trailing garbage".to_owned(), v));

    for (what, body) in &bodies {
        for policy in &policies() {
            let ours = ours(body, policy);
            assert_eq!(ours, through_kube(body, policy), "{what}");
            assert_eq!(ours, in_two_passes(body, policy), "{what}");
        }
    }
}

/// What the webhook does not read is skipped, not checked: an object the API server sent has
/// the types of a Pod, and reading all of it cost more than the rest of the review. Before,
/// such an object was answered without a patch, and JSON a `Value` cannot hold (a number
/// beyond `f64`, a lone surrogate) refused wherever it was.
#[test]
fn what_the_webhook_does_not_read_is_not_checked() {
    let (_, body) = fixtures()
        .into_iter()
        .find(|(n, _)| n.ends_with("create_replicaset_pod.json"))
        .unwrap();
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["request"]["object"]["spec"]["volumes"] = json!("not a list");
    let body = serde_json::to_vec(&v).unwrap();
    let policy = Policy::default();
    assert_eq!(
        through_kube(&body, &policy).unwrap().unhandled,
        Some(Unhandled::BadObject)
    );
    let reviewed = review(&body, &policy).unwrap();
    assert!(reviewed.unhandled.is_none() && reviewed.rewritten == 3);

    let body = String::from_utf8(body)
        .unwrap()
        .replacen('{', r#"{"x": [1e400, "\ud800"], "#, 1);
    assert_eq!(through_kube(body.as_bytes(), &policy), Err("json"));
    let reviewed = review(body.as_bytes(), &policy).unwrap();
    assert!(reviewed.unhandled.is_none() && reviewed.rewritten == 3);
}

#[test]
fn the_patch_is_base64_of_the_json_patch() {
    let (_, body) = fixtures()
        .into_iter()
        .find(|(n, _)| n.ends_with("create_replicaset_pod.json"))
        .unwrap();
    let reviewed = review(&body, &Policy::default()).unwrap();
    assert!(reviewed.rewritten > 0);
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let images = patch
        .0
        .iter()
        .filter(|op| op.path().to_string().ends_with("/image"))
        .count();
    assert_eq!(images, reviewed.rewritten);
}
