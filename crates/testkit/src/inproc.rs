//! For the crates' async tests, which run kache's parts in process: a router on a free port of
//! 127.0.0.1, a client, pushes over the Distribution API, and the spec's error code of an
//! answer.

use std::net::SocketAddr;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The OCI image manifest media type.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Serves `app` with axum on a free port of 127.0.0.1, for as long as the test runs.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A client that shows redirects instead of following them (a registry's answers are tested
/// as they are).
pub fn client() -> Client {
    // The one TLS provider of the project; reqwest is built without a default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `http://127.0.0.1:<port>` where nothing listens (the port was free a moment ago).
pub fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    format!("http://{a}")
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Pushes `bytes` as a blob of `repo` in one request; returns its digest.
pub async fn push_blob(c: &Client, base: &str, repo: &str, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "pushing {d} to {repo}");
    d
}

/// Pushes an image of one config (with `platform`'s os and architecture, if given) and one
/// layer, tagged `tag`; returns the manifest's bytes and the layer's digest.
pub async fn push_image(
    c: &Client,
    base: &str,
    repo: &str,
    tag: &str,
    layer: &[u8],
    platform: Option<(&str, &str)>,
) -> (Vec<u8>, String) {
    let config = match platform {
        Some((os, arch)) => format!(r#"{{"os":"{os}","architecture":"{arch}"}}"#),
        None => "{}".to_owned(),
    };
    let cd = push_blob(c, base, repo, config.as_bytes()).await;
    let ld = push_blob(c, base, repo, layer).await;
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": layer.len()}],
    }))
    .unwrap();
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "pushing {repo}:{tag}");
    (m, ld)
}

/// The spec's error code of an error answer (`errors[0].code`).
pub async fn error_code(r: reqwest::Response) -> String {
    let v: Value = r.json().await.unwrap();
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OCI error body: {v}"))
        .to_owned()
}
