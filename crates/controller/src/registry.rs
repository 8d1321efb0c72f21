//! What the controller asks of the kache registry: warm an image, forget a tag. Both are writes,
//! so they go to the registry's internal listener (or carry its write token).

use std::time::Duration;

use kache_oci::api::{ErrorBody, Route};
use kache_oci::{ImageReference, Reference};
use kache_wire::{
    GC_PATH, GcReport, IMAGES_PATH, KeptImage, KeptImages, WARM_PATH, WarmCredentials, WarmRequest,
    WarmResponse,
};

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

    /// Caches `image` for `platforms`, with credentials for this fetch only.
    pub async fn warm(
        &self,
        image: &str,
        platforms: &[String],
        credentials: Option<(String, String)>,
    ) -> Result<WarmResponse, String> {
        let body = WarmRequest {
            image: image.to_owned(),
            platforms: platforms.to_vec(),
            credentials: credentials
                .map(|(username, password)| WarmCredentials { username, password }),
        };
        let req = self
            .http
            .post(format!("{}{WARM_PATH}", self.base))
            .json(&body);
        self.json(req).await
    }

    /// Runs one garbage collection now (`kache gc`).
    pub async fn collect(&self, dry_run: bool) -> Result<GcReport, String> {
        let url = format!("{}{GC_PATH}?dryRun={dry_run}", self.base);
        self.json(self.http.post(url)).await
    }

    /// Sends `req` with the write token; the JSON answer, or the registry's error in one line.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, String> {
        let resp = self
            .authorized(req)
            .send()
            .await
            .map_err(|e| format!("registry unreachable: {e}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("registry answer cut short: {e}"))?;
        if !status.is_success() {
            return Err(error_message(status.as_u16(), &text));
        }
        serde_json::from_str(&text).map_err(|e| format!("registry answer unreadable: {e}"))
    }

    /// Tells the registry which images the cluster keeps: the whole list, replacing the last.
    pub async fn set_kept(&self, images: Vec<KeptImage>) -> Result<(), String> {
        let url = format!("{}{IMAGES_PATH}", self.base);
        let resp = self
            .authorized(self.http.put(url).json(&KeptImages { images }))
            .send()
            .await
            .map_err(|e| format!("registry unreachable: {e}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(error_message(status.as_u16(), &text))
    }

    /// Removes the tag of `image` from the registry (its blobs go at the next garbage
    /// collection). An image named by digest has no tag to remove; a tag already gone is fine.
    pub async fn forget(&self, image: &str) -> Result<(), String> {
        let r: ImageReference = image
            .parse()
            .map_err(|e| format!("{image:?} is not an image reference: {e}"))?;
        let Some(tag) = &r.tag else {
            return Ok(());
        };
        let route = Route::Manifest(r.cache_repository(), Reference::Tag(tag.clone()));
        let url = format!("{}{}", self.base, route.path());
        let resp = self
            .authorized(self.http.delete(url))
            .send()
            .await
            .map_err(|e| format!("registry unreachable: {e}"))?;
        match resp.status().as_u16() {
            200..=299 | 404 => Ok(()),
            code => {
                let text = resp.text().await.unwrap_or_default();
                Err(error_message(code, &text))
            }
        }
    }
}

/// The message of an OCI error body (`{"errors":[{"message":...}]}`), or the body itself.
fn error_message(status: u16, body: &str) -> String {
    match ErrorBody::parse(body.as_bytes()) {
        Some(e) => format!("registry answered {status}: {}", e.summary()),
        None => format!("registry answered {status}: {}", body.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_errors_become_one_line() {
        let body =
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"upstream has no such tag"}]}"#;
        assert_eq!(
            error_message(404, body),
            "registry answered 404: MANIFEST_UNKNOWN: upstream has no such tag"
        );
        assert_eq!(
            error_message(502, "bad gateway\n"),
            "registry answered 502: bad gateway"
        );
    }
}
