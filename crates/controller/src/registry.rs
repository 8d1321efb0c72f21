//! What the controller asks of the kache registry: warm an image, forget a tag. Both are writes,
//! so they go to the registry's internal listener (or carry its write token).

use std::time::Duration;

use kache_oci::distribution::{ErrorBody, Route};
use kache_oci::{ImageReference, Reference};
use kache_wire::{
    GC_PATH, GRANTS_PATH, GcReport, GrantRequest, GrantResponse, IMAGES_PATH, KeptImage,
    KeptImages, WARM_PATH, WarmCredentials, WarmRequest, WarmResponse,
};

/// Why a call to the registry failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry answer cut short: {0}")]
    CutShort(String),
    /// The registry answered an error: its status and what it said (an OCI error body on one
    /// line, or the body itself).
    #[error("registry answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("registry answer unreadable: {0}")]
    Unreadable(String),
    #[error("{image:?} is not an image reference: {why}")]
    NotAnImage { image: String, why: String },
}

/// A client of the registry's write API.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl RegistryClient {
    /// `base` is the internal listener's URL (`http://kache-registry-internal.kache:5001`).
    pub fn new(base: &str, token: Option<String>, timeout: Duration) -> anyhow::Result<Self> {
        // The same roots as the upstream client: the kache image holds no system CA store.
        let tls = kache_upstream::tls_config(&[])?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .no_proxy()
            .build()?;
        Ok(RegistryClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Caches `image` for `platforms`, with credentials for this fetch only. With `refresh`, a
    /// cached tag is asked upstream whatever its age.
    pub async fn warm(
        &self,
        image: &str,
        platforms: &[String],
        credentials: Option<(String, String)>,
        refresh: bool,
    ) -> Result<WarmResponse, RegistryError> {
        let body = WarmRequest {
            image: image.to_owned(),
            platforms: platforms.to_vec(),
            credentials: credentials
                .map(|(username, password)| WarmCredentials { username, password }),
            refresh,
        };
        let req = self
            .http
            .post(format!("{}{WARM_PATH}", self.base))
            .json(&body);
        self.json(req).await
    }

    /// Asks whether `namespace`, with its own `credentials` for the image's registry, may read
    /// the image's cached repository (the registry checks them upstream and keeps the grant).
    pub async fn grant(
        &self,
        image: &str,
        namespace: &str,
        credentials: Option<(String, String)>,
    ) -> Result<GrantResponse, RegistryError> {
        let body = GrantRequest {
            image: image.to_owned(),
            namespace: namespace.to_owned(),
            credentials: credentials
                .map(|(username, password)| WarmCredentials { username, password }),
        };
        let req = self
            .http
            .post(format!("{}{GRANTS_PATH}", self.base))
            .json(&body);
        self.json(req).await
    }

    /// Runs one garbage collection now (`kache gc`).
    pub async fn collect(&self, dry_run: bool) -> Result<GcReport, RegistryError> {
        let url = format!("{}{GC_PATH}?dryRun={dry_run}", self.base);
        self.json(self.http.post(url)).await
    }

    /// Sends `req` with the write token; the JSON answer, or the registry's error in one line.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, RegistryError> {
        let resp = self
            .authorized(req)
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| RegistryError::CutShort(e.to_string()))?;
        if !status.is_success() {
            return Err(refused(status.as_u16(), &text));
        }
        serde_json::from_str(&text).map_err(|e| RegistryError::Unreadable(e.to_string()))
    }

    /// Tells the registry which images the cluster keeps: the whole list, replacing the last.
    pub async fn set_kept(&self, images: Vec<KeptImage>) -> Result<(), RegistryError> {
        let url = format!("{}{IMAGES_PATH}", self.base);
        let resp = self
            .authorized(self.http.put(url).json(&KeptImages { images }))
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(refused(status.as_u16(), &text))
    }

    /// Removes the tag of `image` from the registry (its blobs go at the next garbage
    /// collection). An image named by digest has no tag to remove; a tag already gone is fine.
    pub async fn forget(&self, image: &str) -> Result<(), RegistryError> {
        let r: ImageReference = image.parse().map_err(|e| RegistryError::NotAnImage {
            image: image.to_owned(),
            why: format!("{e}"),
        })?;
        let Some(tag) = &r.tag else {
            return Ok(());
        };
        let route = Route::Manifest(r.cache_repository(), Reference::Tag(tag.clone()));
        let url = format!("{}{}", self.base, route.path());
        let resp = self
            .authorized(self.http.delete(url))
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(e.to_string()))?;
        match resp.status().as_u16() {
            200..=299 | 404 => Ok(()),
            code => {
                let text = resp.text().await.unwrap_or_default();
                Err(refused(code, &text))
            }
        }
    }
}

/// The registry's refusal: the message of an OCI error body (`{"errors":[{"message":...}]}`),
/// or the body itself.
fn refused(status: u16, body: &str) -> RegistryError {
    let message = match ErrorBody::parse(body.as_bytes()) {
        Some(e) => e.summary(),
        None => body.trim().to_owned(),
    };
    RegistryError::Refused { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_errors_become_one_line() {
        let body =
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"upstream has no such tag"}]}"#;
        assert_eq!(
            refused(404, body).to_string(),
            "registry answered 404: MANIFEST_UNKNOWN: upstream has no such tag"
        );
        assert_eq!(
            refused(502, "bad gateway\n"),
            RegistryError::Refused {
                status: 502,
                message: "bad gateway".into()
            }
        );
    }
}
