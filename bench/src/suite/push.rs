//! Requests to the registries outside the measurements: one bounded call, and the pushes that
//! fill kache and distribution.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::fixtures::Blob;
use super::{OCI_MANIFEST, TAG};
use crate::client::{self, Url};

fn content_length(n: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h
}

/// One request, bounded: uploads of the large blobs take seconds, not minutes.
pub async fn call(
    url: &str,
    method: Method,
    headers: &HeaderMap,
    body: client::ReqBody,
) -> Result<(StatusCode, HeaderMap, Bytes)> {
    let u = Url::parse(url, None)?;
    tokio::time::timeout(
        Duration::from_secs(180),
        client::fetch(&u, method.clone(), headers, body),
    )
    .await
    .map_err(|_| anyhow!("{method} {url}: no answer in 180 s"))?
}

/// kache takes a monolithic upload in one request: `POST .../uploads/?digest=`.
pub async fn push_blob_kache(base: &str, repo: &str, blob: &Blob) -> Result<()> {
    let (body, len) = client::file_body(&blob.path).await?;
    let url = format!("{base}/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
    let (status, _, text) = call(&url, Method::POST, &content_length(len), body).await?;
    if status != StatusCode::CREATED {
        bail!("POST {url}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

/// distribution 2.8 ignores the body of `POST ?digest=` (it opens a session), so: POST, then
/// the whole blob in the closing PUT.
pub async fn push_blob_distribution(base: &str, repo: &str, blob: &Blob) -> Result<()> {
    let (body, len) = client::file_body(&blob.path).await?;
    push_body_distribution(base, repo, &blob.digest, body, len).await
}

/// [`push_blob_distribution`] of a body already at hand.
pub async fn push_body_distribution(
    base: &str,
    repo: &str,
    digest: &str,
    body: client::ReqBody,
    len: u64,
) -> Result<()> {
    let url = format!("{base}/v2/{repo}/blobs/uploads/");
    let (status, headers, _) = call(&url, Method::POST, &HeaderMap::new(), client::empty()).await?;
    if status != StatusCode::ACCEPTED {
        bail!("POST {url}: {status}");
    }
    let loc = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("upload without Location")?;
    // Location may be absolute: keep path and query.
    let path = match loc.find("/v2/") {
        Some(i) => &loc[i..],
        None => loc,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let put = format!("{base}{path}{sep}digest={digest}");
    let (status, _, text) = call(&put, Method::PUT, &content_length(len), body).await?;
    if status != StatusCode::CREATED {
        bail!("PUT {put}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

/// Puts `manifest` as [`TAG`] of `repo`.
pub async fn put_manifest(base: &str, repo: &str, manifest: &Bytes) -> Result<()> {
    let url = format!("{base}/v2/{repo}/manifests/{TAG}");
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_MANIFEST));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(manifest.len()));
    let (status, _, text) = call(&url, Method::PUT, &h, client::full(manifest.clone())).await?;
    if status != StatusCode::CREATED {
        bail!("PUT {url}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}
