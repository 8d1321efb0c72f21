//! The AdmissionReview as read: kube's envelope, borrowed from the body.

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::admission::{AdmissionResponse, Operation};
use kube::core::{GroupVersionKind, GroupVersionResource};
use serde::Deserialize;
use serde::de::{self, IgnoredAny};

use super::BadReview;
use crate::view::Text;

/// The body as text. JSON is UTF-8; checked once for the whole body, the parser then skips what
/// the webhook does not read without looking into it.
pub(super) fn utf8(body: &[u8]) -> Result<&str, BadReview> {
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
pub(super) struct Envelope<'a, O> {
    #[serde(borrow)]
    pub(super) api_version: Text<'a>,
    #[serde(borrow)]
    pub(super) kind: Text<'a>,
    #[serde(borrow)]
    pub(super) request: Option<Request<'a, O>>,
    /// Never sent to a webhook; read as kube reads it.
    #[serde(default)]
    #[expect(dead_code, reason = "read only to refuse what kube refused")]
    response: Option<AdmissionResponse>,
}

/// kube's `AdmissionRequest`, as above.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(dead_code, reason = "fields read only to refuse what kube refused")]
pub(super) struct Request<'a, O> {
    pub(super) uid: String,
    #[serde(borrow)]
    pub(super) kind: Gvk<'a>,
    resource: GroupVersionResource,
    #[serde(default, borrow)]
    pub(super) sub_resource: Option<Text<'a>>,
    #[serde(default)]
    request_kind: Option<GroupVersionKind>,
    #[serde(default)]
    request_resource: Option<GroupVersionResource>,
    #[serde(default)]
    request_sub_resource: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    pub(super) namespace: Option<String>,
    pub(super) operation: Operation,
    user_info: UserInfo,
    pub(super) object: Option<O>,
    pub(super) old_object: Option<O>,
    #[serde(default)]
    dry_run: bool,
    /// Any JSON value (kube's `RawExtension`).
    #[serde(default)]
    options: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Gvk<'a> {
    #[serde(borrow)]
    pub(super) group: Text<'a>,
    #[serde(borrow)]
    pub(super) version: Text<'a>,
    #[serde(borrow)]
    pub(super) kind: Text<'a>,
}
