//! The tag list of a repository, paged with `n` and `last` and a `Link` to the next page.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kache_oci::RepoName;
use serde_json::json;

use super::headers::{Params, hv};
use crate::Registry;
use crate::error::{Code, Error, Result};

impl Registry {
    pub(super) fn list_tags(&self, repo: &RepoName, p: &Params) -> Result<Response> {
        let n = match p.get("n") {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                Error::new(Code::Unsupported, format!("n={n:?} is not a number"))
                    .status(StatusCode::BAD_REQUEST)
            })?),
        };
        let last = p.get("last").map(String::as_str);
        // One more than asked tells whether a next page exists.
        let want = n.map_or(usize::MAX, |n| n.saturating_add(1));
        let mut tags = self.inner.store.list_tags(repo, last, want)?;
        let mut h = HeaderMap::new();
        if let Some(n) = n
            && tags.len() > n
        {
            tags.truncate(n);
            if let Some(l) = tags.last() {
                h.insert(
                    header::LINK,
                    hv(format!(
                        "</v2/{repo}/tags/list?n={n}&last={l}>; rel=\"next\""
                    )),
                );
            }
        }
        Ok((
            h,
            axum::Json(json!({ "name": repo.as_str(), "tags": tags })),
        )
            .into_response())
    }
}
