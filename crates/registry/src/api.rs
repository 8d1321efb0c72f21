//! Handlers of the Distribution API: thin translations between HTTP and the store.
//!
//! [`Registry::dispatch`] is the table of the API: a route and a method to its handler, one
//! module per endpoint family.

mod blobs;
mod headers;
mod manifests;
mod referrers;
mod tags;
mod uploads;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use kache_oci::api::Route;
use kache_oci::{Origin, RepoName};
use kache_wire::{CACHE_HEADER, CacheOutcome};
use uuid::Uuid;

pub(crate) use self::headers::unsupported;

use self::headers::params;
use crate::Registry;
use crate::error::Result;
use crate::pull::PullThrough;

impl Registry {
    pub(crate) async fn dispatch(&self, route: Route, req: Request) -> Result<Response> {
        let method = req.method().clone();
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => Ok(StatusCode::OK.into_response()),
            (Route::Base, m) => Err(unsupported(&m, "GET, HEAD")),
            (Route::Catalog, Method::GET) => self.catalog(&params(&req)),
            (Route::Catalog, m) => Err(unsupported(&m, "GET")),

            (Route::Blob(repo, d), m @ (Method::GET | Method::HEAD)) => {
                self.get_blob(&repo, &d, m == Method::HEAD, req.headers())
                    .await
            }
            (Route::Blob(repo, d), Method::DELETE) => self.delete_blob(&repo, &d).await,
            (Route::Blob(..), m) => Err(unsupported(&m, "GET, HEAD, DELETE")),

            (Route::Manifest(repo, r), m @ (Method::GET | Method::HEAD)) => {
                self.get_manifest(&repo, &r, m == Method::HEAD).await
            }
            (Route::Manifest(repo, r), Method::PUT) => self.put_manifest(&repo, &r, req).await,
            (Route::Manifest(repo, r), Method::DELETE) => self.delete_manifest(&repo, &r).await,
            (Route::Manifest(..), m) => Err(unsupported(&m, "GET, HEAD, PUT, DELETE")),

            (Route::UploadStart(repo), Method::POST) => self.start_upload(&repo, req).await,
            (Route::UploadStart(..), m) => Err(unsupported(&m, "POST")),
            (Route::Upload(repo, id), m) => {
                let id = Uuid::from_u128(id.0);
                match m {
                    Method::GET => self.upload_status(&repo, &id).await,
                    Method::PATCH => self.patch_upload(&repo, &id, req).await,
                    Method::PUT => self.finish_upload(&repo, &id, req).await,
                    Method::DELETE => self.cancel_upload(&repo, &id).await,
                    m => Err(unsupported(&m, "GET, PATCH, PUT, DELETE")),
                }
            }

            (Route::Tags(repo), Method::GET) => self.list_tags(&repo, &params(&req)).await,
            (Route::Tags(..), m) => Err(unsupported(&m, "GET")),
            (Route::Referrers(repo, d), Method::GET) => {
                self.referrers(&repo, &d, &params(&req)).await
            }
            (Route::Referrers(..), m) => Err(unsupported(&m, "GET")),
        }
    }

    /// The pull-through side and the upstream of `repo`, when both exist.
    fn origin(&self, repo: &RepoName) -> Option<(&PullThrough, Origin)> {
        let pull = self.inner.pull.as_ref()?;
        Some((pull, pull.origin(repo)?))
    }

    /// Counts a cached repository's hit or miss and tells the client which it was.
    fn cache_outcome(&self, kind: &'static str, outcome: CacheOutcome, h: &mut HeaderMap) {
        self.inner
            .metrics
            .cache
            .get_or_create(&crate::metrics::CacheLabels {
                kind,
                outcome: outcome.as_str(),
            })
            .inc();
        h.insert(CACHE_HEADER, HeaderValue::from_static(outcome.as_str()));
    }
}
