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
use kache_oci::distribution::Route;
use kache_wire::CACHE_HEADER;
use uuid::Uuid;

pub(crate) use self::headers::unsupported;

use self::headers::params;
use crate::Registry;
use crate::content::{Requester, Served, Want};
use crate::error::Result;

impl Registry {
    /// Answers `req` on `route`, read by `who`.
    pub(crate) async fn dispatch(
        &self,
        route: Route,
        req: Request,
        who: &Requester,
    ) -> Result<Response> {
        let method = req.method().clone();
        match (route, method) {
            (Route::Base, Method::GET | Method::HEAD) => self.ping(&req),
            (Route::Base, m) => Err(unsupported(&m, "GET, HEAD")),
            (Route::Catalog, Method::GET) => self.catalog(&params(&req)),
            (Route::Catalog, m) => Err(unsupported(&m, "GET")),

            (Route::Blob(repo, d), m @ (Method::GET | Method::HEAD)) => {
                let want = if m == Method::HEAD {
                    Want::Head
                } else {
                    Want::Get
                };
                self.get_blob(&repo, &d, want, req.headers(), who).await
            }
            (Route::Blob(repo, d), Method::DELETE) => self.delete_blob(&repo, &d).await,
            (Route::Blob(..), m) => Err(unsupported(&m, "GET, HEAD, DELETE")),

            (Route::Manifest(repo, r), m @ (Method::GET | Method::HEAD)) => {
                self.get_manifest(&repo, &r, m == Method::HEAD, who).await
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

            (Route::Tags(repo), Method::GET) => self.list_tags(&repo, &params(&req), who).await,
            (Route::Tags(..), m) => Err(unsupported(&m, "GET")),
            (Route::Referrers(repo, d), Method::GET) => {
                self.referrers(&repo, &d, &params(&req), who).await
            }
            (Route::Referrers(..), m) => Err(unsupported(&m, "GET")),
        }
    }

    /// `GET /v2/`. With private-image scoping, a request without credentials hears the
    /// challenge (containers/image, behind CRI-O and podman, asks for credentials only when the
    /// ping challenges it); any `Authorization`, the anonymous token's included, is answered
    /// 200, so public pulls go on without one.
    fn ping(&self, req: &Request) -> Result<Response> {
        if self.inner.content.scoping().is_some()
            && !req
                .headers()
                .contains_key(axum::http::header::AUTHORIZATION)
        {
            return Err(crate::error::Error::new(
                crate::error::Code::Unauthorized,
                "credentials are asked for: a pull token, or the anonymous one",
            ));
        }
        Ok(StatusCode::OK.into_response())
    }

    /// Tells the client how the cache answered (the content layer counted it).
    fn cache_header<T>(served: &Served<T>, h: &mut HeaderMap) {
        if let Some(o) = served.outcome {
            h.insert(CACHE_HEADER, HeaderValue::from_static(o.as_str()));
        }
    }
}
