//! One AdmissionReview body in, the response body out: what `POST /mutate` does, without HTTP.
//!
//! A body that is not an AdmissionReview is an error (the server answers 400). Anything
//! unexpected inside a valid review is answered `allowed` with no patch: the webhook never blocks
//! a pod.

use base64::Engine as _;
use json_patch::jsonptr::Pointer;
use json_patch::{PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rules::{self, Policy, Scope, Skipped};

/// Why a body is not an AdmissionReview the webhook can answer.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "the body is a {kind:?} of {api_version:?}, not an AdmissionReview of admission.k8s.io"
    )]
    NotAReview { kind: String, api_version: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// Why a valid review was answered without looking at its containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unhandled {
    /// The object is neither a core/v1 Pod nor a core/v1 EphemeralContainers (the webhook
    /// configuration sent something else).
    NotPod,
    /// An operation or subresource the rules do not apply to (neither a create nor an update of
    /// `pods/ephemeralcontainers`).
    Operation,
    /// The object is missing or does not read as what its kind says.
    BadObject,
    /// The patch would not apply to the object as sent (a bug guard: an invalid patch would make
    /// the API server fail the request).
    BadPatch,
}

impl Unhandled {
    /// The reason as a metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotPod => "not_pod",
            Self::Operation => "operation",
            Self::BadObject => "unparsable_object",
            Self::BadPatch => "invalid_patch",
        }
    }
}

/// The answer to one review.
#[derive(Debug)]
pub struct Reviewed {
    /// The AdmissionReview to send back (JSON).
    pub body: Vec<u8>,
    /// The request's uid.
    pub uid: String,
    /// Images rewritten.
    pub rewritten: usize,
    /// Containers left alone.
    pub skipped: Vec<Skipped>,
    /// The pod opted out with `kache.io/image-caching-policy: ignore`.
    pub opted_out: bool,
    /// Set when the review was answered without applying the rules, with a reason for the log.
    pub unhandled: Option<(Unhandled, String)>,
}

/// Answers one AdmissionReview body under `policy`.
pub fn review(body: &[u8], policy: &Policy) -> Result<Reviewed, BadReview> {
    let mut doc: Value = serde_json::from_slice(body)?;
    // The objects stay as sent: the patch is checked against exactly what the API server will
    // apply it to, and an object that is not a Pod is no reason to refuse the review.
    let mut take = |pointer: &str| {
        doc.pointer_mut(pointer)
            .map(Value::take)
            .filter(|v| !v.is_null())
    };
    let object = take("/request/object");
    let old_object = take("/request/oldObject");
    let review: AdmissionReview<DynamicObject> = serde_json::from_value(doc)?;
    if review.types.kind != "AdmissionReview"
        || !review.types.api_version.starts_with("admission.k8s.io/")
    {
        return Err(BadReview::NotAReview {
            kind: review.types.kind,
            api_version: review.types.api_version,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| BadReview::NoRequest)?;
    let mut out = Reviewed {
        body: Vec::new(),
        uid: request.uid.clone(),
        rewritten: 0,
        skipped: Vec::new(),
        opted_out: false,
        unhandled: None,
    };
    let mut answer = Answer {
        api_version: &request.types.api_version,
        kind: &request.types.kind,
        response: AnswerResponse {
            allowed: true,
            patch: None,
            patch_type: None,
            status: Empty {},
            uid: &request.uid,
            warnings: None,
        },
    };
    match decide(&request, object, old_object, policy) {
        Ok((rewrite, checked)) => {
            out.rewritten = rewrite.rewritten;
            out.skipped = rewrite.skipped;
            out.opted_out = rewrite.opted_out;
            if !rewrite.warnings.is_empty() {
                answer.response.warnings = Some(rewrite.warnings);
            }
            if let Some(patch) = checked {
                let json = serde_json::to_vec(&patch).expect("a JSON patch always serialises");
                answer.response.patch =
                    Some(base64::engine::general_purpose::STANDARD.encode(json));
                answer.response.patch_type = Some("JSONPatch");
            }
        }
        Err(unhandled) => out.unhandled = Some(unhandled),
    }
    out.body = serde_json::to_vec(&answer).expect("an AdmissionReview always serialises");
    Ok(out)
}

/// The AdmissionReview sent back. Written directly rather than through kube's
/// `AdmissionResponse`, which holds the patch as bytes that serde writes as an array of numbers:
/// turning that into the base64 string the API documents for `[]byte` cost a round trip through
/// a `Value` per review. Fields are in the order a `Value` (sorted keys) wrote them before.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    api_version: &'a str,
    kind: &'a str,
    response: AnswerResponse<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AnswerResponse<'a> {
    /// The webhook never blocks a pod.
    allowed: bool,
    /// The JSON patch, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
    /// A metav1.Status with nothing to say: an allowed review has no failure to report.
    status: Empty,
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct Empty {}

/// What the review's object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// A core/v1 Pod: creates, and updates of `pods/ephemeralcontainers` from Kubernetes 1.22.
    Pod,
    /// A core/v1 EphemeralContainers (`metadata` and `ephemeralContainers`): what an update of
    /// `pods/ephemeralcontainers` carries on Kubernetes 1.16–1.21.
    EphemeralContainers,
}

/// The rules' verdict and the patch to send (checked against the object as sent), or why the
/// rules were not applied.
fn decide(
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
        _ => {
            return Err((
                Unhandled::NotPod,
                format!(
                    "object is {}/{} {}, neither a Pod nor an EphemeralContainers",
                    kind.group, kind.version, kind.kind
                ),
            ));
        }
    };
    let ephemeral_update = request.operation == Operation::Update
        && request.sub_resource.as_deref() == Some("ephemeralcontainers");
    let create = form == Form::Pod
        && request.operation == Operation::Create
        && request.sub_resource.is_none();
    if !create && !ephemeral_update {
        return Err((
            Unhandled::Operation,
            format!(
                "{:?} of pods{} ({}) is not rewritten",
                request.operation,
                request
                    .sub_resource
                    .as_deref()
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
                kind.kind
            ),
        ));
    }
    let mut doc = object.ok_or_else(|| (Unhandled::BadObject, "no object".to_owned()))?;
    let pod = as_pod(&doc, form, "object")?;
    let old;
    let scope = if ephemeral_update {
        let old_doc =
            old_object.ok_or_else(|| (Unhandled::BadObject, "no oldObject".to_owned()))?;
        old = as_pod(&old_doc, form, "oldObject")?;
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
    json_patch::patch(&mut doc, &patch).map_err(|e| {
        (
            Unhandled::BadPatch,
            format!("the patch does not apply: {e}"),
        )
    })?;
    Ok((rewrite, Some(patch)))
}

/// The object as a Pod, for the rules. An EphemeralContainers object becomes a Pod with its
/// metadata and its ephemeral containers (and no other container), so that the rules, their skip
/// reasons and warnings are the same for both forms.
///
/// The API server gives an EphemeralContainers only the pod's identity for metadata, and clients
/// send back what they read, so the pod's opt-out label is seen only when a client adds it.
fn as_pod(doc: &Value, form: Form, field: &str) -> Result<Pod, (Unhandled, String)> {
    match form {
        Form::Pod => Pod::deserialize(doc)
            .map_err(|e| (Unhandled::BadObject, format!("{field} is not a Pod: {e}"))),
        Form::EphemeralContainers => {
            let not_it = |e: &dyn std::fmt::Display| {
                (
                    Unhandled::BadObject,
                    format!("{field} is not an EphemeralContainers: {e}"),
                )
            };
            let o = doc
                .as_object()
                .ok_or_else(|| not_it(&"not a JSON object"))?;
            let field = |name: &str| o.get(name).cloned().unwrap_or(Value::Null);
            let view = serde_json::json!({
                "metadata": field("metadata"),
                "spec": {
                    // Required in a PodSpec; the rules look at none but new ephemeral containers.
                    "containers": [],
                    "ephemeralContainers": field("ephemeralContainers"),
                },
            });
            Pod::deserialize(&view).map_err(|e| not_it(&e))
        }
    }
}

/// The patch of an EphemeralContainers object's Pod view (see [`as_pod`]), made to apply to the
/// object itself: `/spec/ephemeralContainers/<i>/image` becomes `/ephemeralContainers/<i>/image`.
///
/// The label and annotation operations are left out: the subresource stores nothing of the
/// object's metadata but its identity, and the controller reads the original image back from the
/// rewritten reference instead. Any other operation would be a bug, answered as such rather than
/// sent to the API server.
fn onto_ephemeral_containers(
    patch: json_patch::Patch,
) -> Result<json_patch::Patch, (Unhandled, String)> {
    let spec = Pointer::from_static("/spec");
    let list = Pointer::from_static("/ephemeralContainers");
    let metadata = Pointer::from_static("/metadata");
    let mut ops = Vec::new();
    for op in patch.0 {
        let path = op.path();
        match (&op, path.strip_prefix(spec)) {
            (PatchOperation::Replace(r), Some(rest)) if rest.starts_with(list) => {
                ops.push(PatchOperation::Replace(ReplaceOperation {
                    path: rest.to_buf(),
                    value: r.value.clone(),
                }));
            }
            _ if path.starts_with(metadata) => {}
            _ => {
                return Err((
                    Unhandled::BadPatch,
                    format!("no place in an EphemeralContainers for the operation {op:?}"),
                ));
            }
        }
    }
    Ok(json_patch::Patch(ops))
}

#[cfg(test)]
mod tests {
    use kube::core::admission::AdmissionResponse;

    use super::*;

    /// The answer as kube's `AdmissionResponse` serialises it, its patch bytes (an array of
    /// numbers) rewritten to base64 through a `Value`: what `review` sent before it wrote the
    /// answer itself.
    fn through_kube(body: &[u8], policy: &Policy) -> Vec<u8> {
        let mut doc: Value = serde_json::from_slice(body).unwrap();
        let mut take = |p: &str| doc.pointer_mut(p).map(Value::take).filter(|v| !v.is_null());
        let (object, old_object) = (take("/request/object"), take("/request/oldObject"));
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(doc).unwrap();
        let request: AdmissionRequest<DynamicObject> = review.try_into().unwrap();
        let mut response = AdmissionResponse::from(&request);
        if let Ok((rewrite, checked)) = decide(&request, object, old_object, policy) {
            if !rewrite.warnings.is_empty() {
                response.warnings = Some(rewrite.warnings);
            }
            if let Some(patch) = checked {
                response = response.with_patch(patch).unwrap();
            }
        }
        let mut v = serde_json::to_value(response.into_review()).unwrap();
        if let Some(patch) = v.pointer_mut("/response/patch") {
            let bytes: Vec<u8> = serde_json::from_value(patch.take()).unwrap();
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        serde_json::to_vec(&v).unwrap()
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

    #[test]
    fn answers_are_byte_for_byte_what_kube_wrote() {
        let policies = [
            Policy::default(),
            Policy {
                skip_mutable: true,
                ..Policy::default()
            },
        ];
        for (name, body) in fixtures() {
            for policy in &policies {
                let ours = review(&body, policy).unwrap().body;
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(through_kube(&body, policy)).unwrap(),
                    "{name}"
                );
            }
        }
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
}
