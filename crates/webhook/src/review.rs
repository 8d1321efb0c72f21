//! One AdmissionReview body in, the response body out: what `POST /mutate` does, without HTTP.
//!
//! A body that is not an AdmissionReview is an error (the server answers 400). Anything
//! unexpected inside a valid review is answered `allowed` with no patch: the webhook never blocks
//! a pod.

use base64::Engine as _;
use json_patch::jsonptr::Pointer;
use json_patch::jsonptr::index::Index;
use json_patch::{PatchOperation, ReplaceOperation};
use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::admission::{AdmissionResponse, Operation};
use kube::core::{GroupVersionKind, GroupVersionResource};
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::rules::{self, ContainerKind, Policy, Skipped};
use crate::view::{EitherForm, Form, Object, PodView, Text};

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
    let text = utf8(body)?;
    // The objects are read in the same pass as the envelope, as either form: what the API server
    // sends always reads so. A body that does not is read again with its objects left in place,
    // which tells a bad object from a bad review.
    match serde_json::from_str::<Envelope<'_, EitherForm<'_>>>(text) {
        Ok(review) => answer(review, policy),
        Err(_) => answer(
            serde_json::from_str::<Envelope<'_, &RawValue>>(text)?,
            policy,
        ),
    }
}

/// The answer to a review whose objects are read as `O`.
fn answer<'a, O: Object<'a>>(
    review: Envelope<'a, O>,
    policy: &Policy,
) -> Result<Reviewed, BadReview> {
    if review.kind.as_str() != "AdmissionReview"
        || !review.api_version.as_str().starts_with("admission.k8s.io/")
    {
        return Err(BadReview::NotAReview {
            kind: review.kind.as_str().to_owned(),
            api_version: review.api_version.as_str().to_owned(),
        });
    }
    let mut request = review.request.ok_or(BadReview::NoRequest)?;
    let decided = decide(&mut request, policy);
    let mut out = Reviewed {
        body: Vec::new(),
        uid: String::new(),
        rewritten: 0,
        skipped: Vec::new(),
        opted_out: false,
        unhandled: None,
    };
    let mut answer = Answer {
        api_version: review.api_version.as_str(),
        kind: review.kind.as_str(),
        response: AnswerResponse {
            allowed: true,
            patch: None,
            patch_type: None,
            status: Empty {},
            uid: &request.uid,
            warnings: None,
        },
    };
    match decided {
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
    // Room for the envelope, so that the answer is written without growing the buffer.
    let room = 256 + answer.response.patch.as_ref().map_or(0, String::len);
    out.body = Vec::with_capacity(room);
    serde_json::to_writer(&mut out.body, &answer).expect("an AdmissionReview always serialises");
    out.uid = request.uid;
    Ok(out)
}

/// The body as text. JSON is UTF-8; checked once for the whole body, the parser then skips what
/// the webhook does not read without looking into it.
fn utf8(body: &[u8]) -> Result<&str, BadReview> {
    std::str::from_utf8(body).map_err(|_| {
        // The error a full parse gives, which says where; bytes that are not UTF-8 are never
        // valid JSON, so there is one.
        let e = serde_json::from_slice::<serde_json::Value>(body)
            .err()
            .unwrap_or_else(|| de::Error::custom("the body is not UTF-8"));
        BadReview::Json(e)
    })
}

/// An AdmissionReview as kube's `AdmissionReview` reads it, keeping only what the webhook uses,
/// its objects read as `O`. The fields it does not use have kube's types still, so that what kube
/// refused is still refused.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a, O> {
    #[serde(borrow)]
    api_version: Text<'a>,
    #[serde(borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    request: Option<Request<'a, O>>,
    /// Never sent to a webhook; read as kube reads it.
    #[serde(default)]
    #[expect(dead_code, reason = "read only to refuse what kube refused")]
    response: Option<AdmissionResponse>,
}

/// kube's `AdmissionRequest`, as above.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(dead_code, reason = "fields read only to refuse what kube refused")]
struct Request<'a, O> {
    uid: String,
    #[serde(borrow)]
    kind: Gvk<'a>,
    resource: GroupVersionResource,
    #[serde(default, borrow)]
    sub_resource: Option<Text<'a>>,
    #[serde(default)]
    request_kind: Option<GroupVersionKind>,
    #[serde(default)]
    request_resource: Option<GroupVersionResource>,
    #[serde(default)]
    request_sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    operation: Operation,
    user_info: UserInfo,
    object: Option<O>,
    old_object: Option<O>,
    #[serde(default)]
    dry_run: bool,
    /// Any JSON value (kube's `RawExtension`).
    #[serde(default)]
    options: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct Gvk<'a> {
    #[serde(borrow)]
    group: Text<'a>,
    #[serde(borrow)]
    version: Text<'a>,
    #[serde(borrow)]
    kind: Text<'a>,
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

/// The rules' verdict and the patch to send (checked against the object as sent), or why the
/// rules were not applied.
fn decide<'a, O: Object<'a>>(
    request: &mut Request<'a, O>,
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
        (group, version, kind) => {
            return Err((
                Unhandled::NotPod,
                format!(
                    "object is {group}/{version} {kind}, neither a Pod nor an EphemeralContainers"
                ),
            ));
        }
    };
    let sub_resource = request.sub_resource.as_ref().map(Text::as_str);
    let ephemeral_update =
        request.operation == Operation::Update && sub_resource == Some("ephemeralcontainers");
    let create =
        form == Form::Pod && request.operation == Operation::Create && sub_resource.is_none();
    if !create && !ephemeral_update {
        return Err((
            Unhandled::Operation,
            format!(
                "{:?} of pods{} ({}) is not rewritten",
                request.operation,
                sub_resource.map(|s| format!("/{s}")).unwrap_or_default(),
                kind.kind.as_str()
            ),
        ));
    }
    let object = request
        .object
        .take()
        .ok_or_else(|| (Unhandled::BadObject, "no object".to_owned()))?;
    let pod = read(object, form, "object")?;
    let old = if ephemeral_update {
        let old = request
            .old_object
            .take()
            .ok_or_else(|| (Unhandled::BadObject, "no oldObject".to_owned()))?;
        Some(read(old, form, "oldObject")?)
    } else {
        None
    };
    let mut rewrite = rules::rewrite_view(&pod, policy, old.as_ref());
    let patch = std::mem::take(&mut rewrite.patch);
    let patch = match form {
        Form::Pod => patch,
        Form::EphemeralContainers => onto_ephemeral_containers(patch)?,
    };
    if patch.0.is_empty() {
        return Ok((rewrite, None));
    }
    if let Some(op) = patch.0.iter().find(|op| !applies(op, &pod, form)) {
        return Err((
            Unhandled::BadPatch,
            format!("the patch does not apply: no target in the object for {op:?}"),
        ));
    }
    Ok((rewrite, Some(patch)))
}

/// The object as the rules read it. An EphemeralContainers object reads as a pod with its
/// metadata and its ephemeral containers (and no other container), so that the rules, their skip
/// reasons and warnings are the same for both forms.
///
/// The API server gives an EphemeralContainers only the pod's identity for metadata, and clients
/// send back what they read, so the pod's opt-out label is seen only when a client adds it.
fn read<'a>(
    object: impl Object<'a>,
    form: Form,
    field: &str,
) -> Result<PodView<'a>, (Unhandled, String)> {
    object.read(form).map_err(|e| {
        let what = match form {
            Form::Pod => "a Pod",
            Form::EphemeralContainers => "an EphemeralContainers",
        };
        (Unhandled::BadObject, format!("{field} is not {what}: {e}"))
    })
}

/// Whether `op` finds its target in the object as sent, read as `pod`: a patch that does not
/// apply would make the API server fail the request. A bug guard, in place of applying the patch
/// to a copy of the object: the rules only replace the image of a container that has one and add
/// labels and annotations, so nothing else is accepted. The view reads every level of these paths
/// as a JSON object or array, as they must be for the patch to apply.
fn applies(op: &PatchOperation, pod: &PodView<'_>, form: Form) -> bool {
    let mut path = op.path().tokens();
    let mut next = || path.next();
    match op {
        PatchOperation::Replace(_) => {
            if form == Form::Pod && next().is_none_or(|t| t.decoded() != "spec") {
                return false;
            }
            let (Some(list), Some(index), Some(field), None) = (next(), next(), next(), next())
            else {
                return false;
            };
            let Some(kind) = ContainerKind::ALL
                .into_iter()
                .find(|k| list.decoded() == k.spec_field())
            else {
                return false;
            };
            field.decoded() == "image"
                && matches!(index.to_index(), Ok(Index::Num(i))
                    if pod.list(kind).get(i).is_some_and(|c| c.image.is_some()))
        }
        PatchOperation::Add(_) => {
            let Some(metadata) = &pod.metadata else {
                return false;
            };
            let (Some(top), Some(map), key, None) = (next(), next(), next(), next()) else {
                return false;
            };
            // A whole map may be added where there is none; a key only into a map.
            let exists = match &*map.decoded() {
                "labels" => metadata.labels.is_some(),
                "annotations" => metadata.annotations.is_some(),
                _ => return false,
            };
            top.decoded() == "metadata" && (key.is_none() || exists)
        }
        _ => false,
    }
}

/// The patch of an EphemeralContainers object's Pod view (see [`read`]), made to apply to the
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
mod tests;
