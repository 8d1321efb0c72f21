//! Tag lists and the catalog: sorted names, paged with `n` and `last` and a `Link` to the next
//! page. A cached repository lists the upstream's tags with the cache's own (the upstream's
//! kept for the tag TTL, and served from the cache when the upstream is down).

use std::collections::BTreeSet;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kache_oci::RepoName;
use kache_store::StoreError;
use serde_json::json;

use super::headers::{Params, hv};
use crate::Registry;
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
    pub(super) async fn list_tags(&self, repo: &RepoName, p: &Params) -> Result<Response> {
        let page = Page::of(p)?;
        let store = &self.inner.store;
        let mut h = HeaderMap::new();
        let tags = match self.origin(repo) {
            None => store.list_tags(repo, page.last, page.want())?,
            Some((pull, origin)) => {
                let local = match store.list_tags(repo, None, usize::MAX) {
                    Ok(t) => Some(t),
                    Err(StoreError::NameUnknown) => None,
                    Err(e) => return Err(e.into()),
                };
                let upstream = match pull.tags(repo, &origin).await {
                    Ok((tags, outcome)) => {
                        self.cache_outcome("tags", outcome, &mut h);
                        Some(tags)
                    }
                    // The upstream says nothing and kept nothing: the cache's own tags.
                    Err(e) if local.is_some() => {
                        tracing::warn!(%repo, error = %e.message, "upstream could not list tags");
                        None
                    }
                    Err(e) => return Err(e),
                };
                let all: BTreeSet<&str> = local
                    .iter()
                    .flatten()
                    .chain(upstream.iter().flat_map(|t| t.iter()))
                    .map(String::as_str)
                    .collect();
                all.into_iter()
                    .filter(|t| page.last.is_none_or(|l| *t > l))
                    .take(page.want())
                    .map(str::to_owned)
                    .collect()
            }
        };
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
