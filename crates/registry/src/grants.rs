//! The grant call: the controller asks whether a namespace may read an image's cached
//! repository, with the namespace's own credentials; the registry asks the upstream (a manifest
//! HEAD) and records the answer. No grant is written without the upstream's yes, and a no (or
//! a namespace with no credentials left) ends the grant it had. An upstream that cannot answer
//! changes nothing: grants run until they expire, and a namespace without one stays refused.

use axum::extract::Request;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use kache_oci::credentials::Credentials;
use kache_oci::reference::ImageReference;
use kache_oci::{Origin, RepoName};
use kache_wire::pull_token::is_label;
use kache_wire::{Grant, GrantRequest, GrantResponse, Visibility};

use crate::Registry;
use crate::content::now;
use crate::error::{Code, Error, Result};
use crate::handlers::unsupported;
use crate::pull::upstream_error;
use crate::tenancy::{self, Caller};

impl Registry {
    /// Who a request is for, as its pull token says (anonymous without scoping).
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Caller {
        match self.inner.content.scoping() {
            Some(s) => s.keys.caller(
                headers
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            ),
            None => Caller::Anonymous,
        }
    }

    /// `POST /kache/v1/grants` with a [`GrantRequest`]; `GET` lists every grant.
    pub(crate) async fn grants_endpoint(&self, req: Request) -> Result<Response> {
        match *req.method() {
            Method::GET => {
                let grants = self.inner.store.grants()?;
                Ok(axum::Json(grants).into_response())
            }
            Method::POST => {
                let bad =
                    |m: String| Error::new(Code::Unsupported, m).status(StatusCode::BAD_REQUEST);
                let body = http_body_util::Limited::new(req.into_body(), 64 * 1024)
                    .collect()
                    .await
                    .map_err(|e| bad(format!("reading the grant request failed: {e}")))?
                    .to_bytes();
                let grant: GrantRequest = serde_json::from_slice(&body)
                    .map_err(|e| bad(format!("not a grant request: {e}")))?;
                Ok(axum::Json(self.grant(grant).await?).into_response())
            }
            ref m => Err(unsupported(m, "GET, POST")),
        }
    }

    /// Checks `req.namespace`'s credentials upstream and records what they may read.
    pub async fn grant(&self, req: GrantRequest) -> Result<GrantResponse> {
        let content = &self.inner.content;
        let store = &self.inner.store;
        let (Some(scoping), Some(pull)) = (content.scoping(), content.pull()) else {
            return Err(Error::new(
                Code::Unsupported,
                "private-image scoping is off on this registry",
            ));
        };
        if !is_label(&req.namespace) {
            return Err(Error::new(
                Code::Unsupported,
                format!("{:?} is not a namespace name", req.namespace),
            )
            .status(StatusCode::BAD_REQUEST));
        }
        let image: ImageReference = req
            .image
            .parse()
            .map_err(|e| Error::new(Code::NameInvalid, format!("image {:?}: {e}", req.image)))?;
        let repo: RepoName = image.cache_repository();
        let Some(origin) = Origin::of(&repo) else {
            return Err(Error::new(
                Code::NameInvalid,
                format!("{repo} does not name an upstream registry"),
            ));
        };
        let reference = image.reference();
        let answer = |visibility, granted, expires_at, message| GrantResponse {
            repository: repo.to_string(),
            namespace: req.namespace.clone(),
            visibility,
            granted,
            expires_at,
            message,
        };
        let creds = req.credentials.map(|c| Credentials::Basic {
            username: c.username,
            password: c.password,
        });
        let Some(creds) = creds else {
            // Nothing to check with: whatever is private is no longer this namespace's.
            let v = self.visibility_of(&repo, &origin, &reference, None).await?;
            if v == Visibility::Private {
                if store.remove_grant(&repo, &req.namespace).await? {
                    tracing::info!(%repo, namespace = %req.namespace, "grant ended: the namespace has no pull secret left");
                }
                return Ok(answer(
                    v,
                    false,
                    None,
                    Some("the namespace has no credentials for this registry".to_owned()),
                ));
            }
            return Ok(answer(v, true, None, None));
        };
        let upstream = pull.upstream();
        match upstream
            .manifest(&origin, &reference, true, Some(&creds))
            .await
        {
            Ok(_) => {}
            Err(e) if tenancy::refused(&e) => {
                if store.remove_grant(&repo, &req.namespace).await? {
                    tracing::info!(%repo, namespace = %req.namespace, error = %e, "grant ended: the upstream refused the namespace's credentials");
                }
                let v = self.visibility_of(&repo, &origin, &reference, None).await?;
                let granted = v != Visibility::Private;
                return Ok(answer(
                    v,
                    granted,
                    None,
                    (!granted).then(|| format!("upstream: {e}")),
                ));
            }
            Err(e) => return Err(upstream_error(&e, Code::ManifestUnknown)),
        }
        let v = self
            .visibility_of(&repo, &origin, &reference, Some(&creds))
            .await?;
        if v != Visibility::Private {
            return Ok(answer(v, true, None, None));
        }
        let now = now();
        let grant = Grant {
            repository: repo.to_string(),
            namespace: req.namespace.clone(),
            verified_at: now,
            expires_at: now + scoping.grant_ttl.as_secs(),
        };
        store.put_grant(&repo, &grant).await?;
        tracing::info!(%repo, namespace = %req.namespace, expires_at = grant.expires_at, "granted");
        Ok(answer(v, true, Some(grant.expires_at), None))
    }

    /// The recorded visibility of `repo`, or, before there is one, what the upstream says now
    /// (recorded). A repository the upstream cannot classify now counts as private: nothing is
    /// granted on a guess.
    async fn visibility_of(
        &self,
        repo: &RepoName,
        origin: &Origin,
        reference: &kache_oci::Reference,
        creds: Option<&Credentials>,
    ) -> Result<Visibility> {
        let store = &self.inner.store;
        if let Some(v) = store.visibility(repo)? {
            return Ok(v);
        }
        let (Some(scoping), Some(pull)) = (self.inner.content.scoping(), self.inner.content.pull())
        else {
            return Ok(Visibility::Private);
        };
        match scoping
            .classify()
            .visibility(pull.upstream(), origin, reference, creds, creds.is_some())
            .await
        {
            Some(v) => {
                tenancy::record(&**store, repo, v).await?;
                Ok(v)
            }
            None => Ok(Visibility::Private),
        }
    }
}
