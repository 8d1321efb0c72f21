//! kache's own admin routes on the registry, beside the Distribution API:
//!
//! - `POST /kache/v1/gc[?dryRun=true]` runs one garbage collection now and answers its report;
//!   `GET /kache/v1/gc` answers the last one (`kache gc` is their client).
//! - `PUT /kache/v1/images` replaces the list of images the cluster keeps (the controller's
//!   CachedImages: roots of every collection, pinned ones never evicted); `GET` reads it.
//!
//! Like every write, the POST and the PUT are refused on the read-only listener.

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use kache_wire::KeptImages;

use crate::Registry;
use crate::error::{Code, Error, Result};

/// Largest kept-images list accepted: some 40,000 references.
const MAX_IMAGES_BODY: usize = 8 * 1024 * 1024;

fn bad_request(m: String) -> Error {
    Error::new(Code::Unsupported, m).status(StatusCode::BAD_REQUEST)
}

fn method_not_allowed(method: &Method, allow: &'static str) -> Error {
    Error::new(
        Code::Unsupported,
        format!("method {method} is not supported here"),
    )
    .header(axum::http::header::ALLOW, allow)
}

impl Registry {
    pub(crate) async fn gc_endpoint(&self, req: Request) -> Result<Response> {
        match *req.method() {
            Method::GET => match self.collector().last() {
                Some(r) => Ok(axum::Json(r).into_response()),
                None => Err(Error::new(
                    Code::Unsupported,
                    "no garbage collection has run since the registry started",
                )
                .status(StatusCode::NOT_FOUND)),
            },
            Method::POST => {
                let dry_run = match query_flag(&req, "dryRun")? {
                    Some(d) => d,
                    None => query_flag(&req, "dry-run")?.unwrap_or(false),
                };
                let report = self
                    .collector()
                    .run_once(dry_run, crate::gc::Trigger::Request)
                    .await?;
                Ok(axum::Json(report).into_response())
            }
            ref m => Err(method_not_allowed(m, "GET, POST")),
        }
    }

    pub(crate) async fn images_endpoint(&self, req: Request) -> Result<Response> {
        match *req.method() {
            Method::GET => Ok(axum::Json(KeptImages {
                images: self.store().kept()?,
            })
            .into_response()),
            Method::PUT => {
                let body = http_body_util::Limited::new(req.into_body(), MAX_IMAGES_BODY)
                    .collect()
                    .await
                    .map_err(|e| bad_request(format!("reading the image list failed: {e}")))?
                    .to_bytes();
                let list: KeptImages = serde_json::from_slice(&body)
                    .map_err(|e| bad_request(format!("not an image list: {e}")))?;
                let n = self
                    .store()
                    .set_kept(&list.images)
                    .await
                    .map_err(|e| match e {
                        kache_store::StoreError::Index(m) if m.contains("not a normalised") => {
                            Error::new(Code::NameInvalid, m)
                        }
                        e => e.into(),
                    })?;
                let pinned = list.images.iter().filter(|i| i.pinned).count();
                tracing::debug!(images = n, pinned, "kept images replaced");
                Ok(axum::Json(serde_json::json!({"images": n, "pinned": pinned})).into_response())
            }
            ref m => Err(method_not_allowed(m, "GET, PUT")),
        }
    }
}

/// `?name=true|false|1|0`, absent as None.
fn query_flag(req: &Request, name: &str) -> Result<Option<bool>> {
    let Some(q) = req.uri().query() else {
        return Ok(None);
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k == name {
            return match v {
                "true" | "1" | "" => Ok(Some(true)),
                "false" | "0" => Ok(Some(false)),
                v => Err(bad_request(format!("{name}={v:?}: expected true or false"))),
            };
        }
    }
    Ok(None)
}
