//! kache's registry as a library: a store in a temporary directory, the Distribution API served
//! on 127.0.0.1 by kache's own HTTP/1.1 server, and an image pushed and pulled back over HTTP, as
//! any client would.
//!
//!     cargo run -p kache-examples --example embedded_registry

use std::sync::Arc;

use kache_oci::Digest;
use kache_registry::{Metrics, Registry};
use kache_store::Store;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The one TLS provider of kache; reqwest is built without a default one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let (store, recovered) = Store::open(dir.path())?;
    println!(
        "store in {} (recovery: {recovered:?})",
        dir.path().display()
    );
    let mut prom = prometheus_client::registry::Registry::default();
    let registry = Registry::new(Arc::new(store), Metrics::new(&mut prom));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(kache_registry::serve(
        registry.router(),
        listener,
        kache_http::ServerKind::Kache,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();

    // A config and a layer (monolithic uploads), then the manifest that names them.
    let push_blob = async |bytes: &'static [u8]| -> Result<Digest, Box<dyn std::error::Error>> {
        let digest = Digest::sha256(bytes);
        let url = format!("{base}/v2/demo/hello/blobs/uploads/?digest={digest}");
        let status = http.post(url).body(bytes).send().await?.status();
        assert_eq!(status, 201, "blob upload");
        Ok(digest)
    };
    let config: &[u8] =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer: &[u8] = b"not really a tar, but the registry stores bytes";
    let (config_digest, layer_digest) = (push_blob(config).await?, push_blob(layer).await?);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    })
    .to_string();
    let put = http
        .put(format!("{base}/v2/demo/hello/manifests/1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .await?;
    let digest = put.headers()["docker-content-digest"].to_str()?.to_owned();
    println!("pushed demo/hello:1 as {digest}");

    // Pulled back byte for byte, by tag and by digest.
    let got = http
        .get(format!("{base}/v2/demo/hello/manifests/1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(got, manifest);
    let blob = http
        .get(format!("{base}/v2/demo/hello/blobs/{layer_digest}"))
        .send()
        .await?
        .bytes()
        .await?;
    assert_eq!(&blob[..], layer);
    let tags = http
        .get(format!("{base}/v2/demo/hello/tags/list"))
        .send()
        .await?
        .text()
        .await?;
    println!("tags: {tags}");
    Ok(())
}
