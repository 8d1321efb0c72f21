//! Tag lists and the catalog: sorted names, paged with `n` and `last` and a `Link` to the next
//! page. A cached repository's tags are the upstream's with the cache's own
//! ([`crate::content`]).

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kache_oci::RepoName;
use serde_json::json;

use super::headers::{Params, hv};
use crate::Registry;
use crate::content::Requester;
use crate::error::{Code, Error, Result};

/// `n` and `last` of a listing.
struct Page<'a> {
    n: Option<usize>,
    last: Option<&'a str>,
}

impl<'a> Page<'a> {
    fn of(p: &'a Params) -> Result<Self> {
        let n = match p.get("n") {
            None => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| {
                Error::new(Code::Unsupported, format!("n={n:?} is not a number"))
                    .status(StatusCode::BAD_REQUEST)
            })?),
        };
        Ok(Page {
            n,
            last: p.get("last").map(String::as_str),
        })
    }

    /// How many to read: one more than asked tells whether a next page exists.
    fn want(&self) -> usize {
        self.n.map_or(usize::MAX, |n| n.saturating_add(1))
    }

    /// The page of `names` (sorted, after `last`, at most `want`), cut to `n`, with the `Link`
    /// to the next page at `path`.
    fn answer(
        &self,
        mut names: Vec<String>,
        path: &str,
        mut h: HeaderMap,
    ) -> (HeaderMap, Vec<String>) {
        if let Some(n) = self.n
            && names.len() > n
        {
            names.truncate(n);
            if let Some(l) = names.last() {
                h.insert(
                    header::LINK,
                    hv(format!("<{path}?n={n}&last={l}>; rel=\"next\"")),
                );
            }
        }
        (h, names)
    }
}

impl Registry {
    pub(super) async fn list_tags(
        &self,
        repo: &RepoName,
        p: &Params,
        who: &Requester,
    ) -> Result<Response> {
        let page = Page::of(p)?;
        let mut h = HeaderMap::new();
        let served = self
            .inner
            .content
            .tags(repo, page.last, page.want(), who)
            .await?;
        Self::cache_header(&served, &mut h);
        let tags = served.value;
        let (h, tags) = page.answer(tags, &format!("/v2/{repo}/tags/list"), h);
        Ok((
            h,
            axum::Json(json!({ "name": repo.as_str(), "tags": tags })),
        )
            .into_response())
    }

    /// `/v2/_catalog`: the repositories the store holds.
    pub(super) fn catalog(&self, p: &Params) -> Result<Response> {
        let page = Page::of(p)?;
        let names = self.inner.store.repositories(page.last, page.want())?;
        let (h, names) = page.answer(names, "/v2/_catalog", HeaderMap::new());
        Ok((h, axum::Json(json!({ "repositories": names }))).into_response())
    }
}
