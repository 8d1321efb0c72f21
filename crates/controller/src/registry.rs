//! What the controller asks of the kache registry: warm an image, forget a tag. Both are writes,
//! so they go to the registry's internal listener (or carry its write token).

use std::time::Duration;

use kache_oci::ImageReference;
use kache_wire::{GC_PATH, GcReport, IMAGES_PATH, KeptImage, KeptImages};
use serde::Deserialize;

/// The registry's answer to a warm call (the fields the controller uses).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Warmed {
    pub digest: String,
    pub bytes: u64,
    pub platforms: Vec<WarmedPlatform>,
}

/// One platform of a warm call.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct WarmedPlatform {
    pub platform: String,
    /// `cached`, `absent` or `failed`.
    pub status: String,
    #[serde(default)]
    pub message: Option<String>,
}

impl Warmed {
    /// The platforms of `requested` the cache now serves. A single-platform image (the registry
    /// reports its one manifest without a platform) is what every node pulls, so it serves them
    /// all.
    pub fn cached_platforms(&self, requested: &[String]) -> Vec<String> {
        let cached = self.platforms.iter().filter(|p| p.status == "cached");
        if cached.clone().any(|p| p.platform.is_empty()) {
            return requested.to_vec();
        }
        cached.map(|p| p.platform.clone()).collect()
    }

    /// Why some platform failed, if one did.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<_> = self
            .platforms
            .iter()
            .filter(|p| p.status == "failed")
            .map(|p| {
                format!(
                    "{}: {}",
                    p.platform,
                    p.message.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
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
        let tls = kache_oci::upstream::tls_config(&[])?;
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
    ) -> Result<Warmed, String> {
        let mut body = serde_json::json!({"image": image, "platforms": platforms});
        if let Some((username, password)) = credentials {
            body["credentials"] = serde_json::json!({"username": username, "password": password});
        }
        let req = self
            .http
            .post(format!("{}/kache/v1/warm", self.base))
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
        let url = format!(
            "{}/v2/{}/manifests/{}",
            self.base,
            r.cache_repository(),
            tag.as_str()
        );
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
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_str::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let parts: Vec<_> = e
                .errors
                .iter()
                .map(|x| format!("{}: {}", x.code, x.message))
                .collect();
            format!("registry answered {status}: {}", parts.join("; "))
        }
        _ => format!("registry answered {status}: {}", body.trim()),
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

    #[test]
    fn failed_platforms_are_reported() {
        let w: Warmed = serde_json::from_value(serde_json::json!({
            "digest": "sha256:00", "bytes": 10,
            "platforms": [
                {"platform": "linux/amd64", "status": "cached"},
                {"platform": "linux/s390x", "status": "absent"},
                {"platform": "linux/arm64", "status": "failed", "message": "timeout"}
            ]
        }))
        .unwrap();
        assert_eq!(w.cached_platforms(&[]), ["linux/amd64"]);
        let single: Warmed = serde_json::from_value(serde_json::json!({
            "digest": "sha256:00", "bytes": 10,
            "platforms": [{"platform": "", "status": "cached"}]
        }))
        .unwrap();
        let nodes = ["linux/amd64".to_owned(), "linux/arm64".to_owned()];
        assert_eq!(single.cached_platforms(&nodes), nodes);
        assert_eq!(w.failure().as_deref(), Some("linux/arm64: timeout"));
    }
}
