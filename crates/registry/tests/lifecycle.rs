//! A registry's life over its store: opened (recovering), served, closed, opened again.

use kache_http::ServerKind;
use kache_oci::Digest;
use kache_registry::{Metrics, Registry};
use reqwest::{Client, StatusCode};

fn metrics() -> Metrics {
    Metrics::new(&mut prometheus_client::registry::Registry::default())
}

#[tokio::test]
async fn close_writes_what_was_served_and_the_store_opens_again() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (registry, recovery) = Registry::open(dir.path(), metrics(), None).await.unwrap();
    assert_eq!(
        recovery,
        Default::default(),
        "a new store has nothing to recover"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kache_registry::serve(
        registry.router(),
        listener,
        ServerKind::Kache,
        async {
            let _ = stopped.await;
        },
    ));

    let body = b"a layer".to_vec();
    let digest = Digest::sha256(&body);
    let http = Client::new();
    let r = http
        .post(format!("{base}/v2/demo/blobs/uploads/?digest={digest}"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http
        .get(format!("{base}/v2/demo/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), body);

    // The pull is counted in memory until the upkeep's next flush, or until close.
    assert_eq!(registry.store().last_access(&digest).unwrap(), None);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    registry.close().await.unwrap();
    let served_at = registry.store().last_access(&digest).unwrap();
    assert!(served_at.is_some(), "close wrote the access time");
    drop(registry);

    let (again, recovery) = Registry::open(dir.path(), metrics(), None).await.unwrap();
    assert_eq!(
        recovery,
        Default::default(),
        "a closed store has nothing to recover"
    );
    assert_eq!(again.store().last_access(&digest).unwrap(), served_at);
    let demo = "demo".parse().unwrap();
    assert_eq!(again.store().stat_blob(&demo, &digest).unwrap(), Some(7));
}

#[tokio::test]
async fn a_data_dir_that_is_a_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"keep me").unwrap();
    let e = Registry::open(&file, metrics(), None).await.unwrap_err();
    assert!(!e.to_string().is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}
