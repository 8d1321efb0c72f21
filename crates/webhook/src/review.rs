//! One AdmissionReview body in, the response body out: what `POST /mutate` does, without HTTP.
//!
//! A body that is not an AdmissionReview is an error (the server answers 400). Anything
//! unexpected inside a valid review is answered `allowed` with no patch: the webhook never blocks
//! a pod.

mod dispatch;
mod envelope;
#[cfg(test)]
mod tests;

use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::rules::{PodSkip, Policy, Skipped};
use crate::view::{EitherForm, Object};

use dispatch::rewrite_request;
use envelope::{Envelope, utf8};

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
    /// Why the whole pod was left alone, if it was (the opt-out label, its namespace, the object
    /// selector).
    pub pod_skipped: Option<PodSkip>,
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
    let decided = rewrite_request(&mut request, policy);
    let mut out = Reviewed {
        body: Vec::new(),
        uid: String::new(),
        rewritten: 0,
        skipped: Vec::new(),
        pod_skipped: None,
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
            out.pod_skipped = rewrite.pod_skipped;
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
