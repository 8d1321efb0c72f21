//! The node proxy holds an upstream to the registry's rules, whichever of the two asks it.
//! With the registry up, an answer the registry refused (a manifest that does not hash to its
//! digest, one of no kind kache takes, one over the size limit) reaches the client as the
//! registry's error, and the proxy does not fetch it again. With the registry down, the proxy
//! refuses the same answers itself, and a blob that does not verify never arrives whole.
//!
//! The upstream lies on purpose (kache-testkit's FaultyUpstream): no real registry does it on
//! demand.

use std::time::Duration;

use kache_http::ServerKind;
use kache_registry::Freshness;
use kache_testkit::inproc::{client, closed_port};
use kache_testkit::parts::{self, ProxyOptions, RegistryOptions, Running};
use kache_testkit::{Content, Fault, FaultyUpstream, Flavor, Image, ImageBuilder};
use reqwest::StatusCode;

/// A proxy of `registry` falling back to `upstream_host`, on the server `kind`.
async fn proxy(registry: &str, upstream_host: &str, kind: ServerKind) -> Running {
    parts::proxy(ProxyOptions {
        server: kind,
        ..ProxyOptions::new(registry, upstream_host)
    })
    .await
}

fn image() -> Image {
    ImageBuilder::new(Flavor::Oci)
        .random_layer(7, &[300_000])
        .build()
}

/// What an honest upstream may still not hand a cache: a schema1 manifest, and an OCI manifest
/// one byte over the limit (its bytes and digest agree).
fn refused_manifests() -> Vec<(&'static str, Fault)> {
    let schema1 = br#"{"schemaVersion":1,"name":"app","tag":"v1","architecture":"amd64","fsLayers":[],"history":[]}"#;
    let head = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"annotations":{"pad":""#;
    let tail = r#""}}"#;
    let pad = kache_oci::MAX_MANIFEST_SIZE as usize + 1 - head.len() - tail.len();
    let huge = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(huge.len() as u64, kache_oci::MAX_MANIFEST_SIZE + 1);
    vec![
        ("wrong bytes", Fault::WrongBytes),
        (
            "schema1",
            Fault::Replace {
                bytes: schema1.to_vec(),
                media_type: "application/vnd.docker.distribution.manifest.v1+prettyjws".into(),
            },
        ),
        (
            "over the limit",
            Fault::Replace {
                bytes: huge.into_bytes(),
                media_type: kache_oci::media_type::OCI_MANIFEST.into(),
            },
        ),
    ]
}

/// `GET` of `path`: the status and the body, or `None` for a body that broke off.
async fn get(url: &str) -> (StatusCode, Option<Vec<u8>>, reqwest::header::HeaderMap) {
    let r = client()
        .get(url)
        .header("accept", kache_oci::media_type::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    (status, r.bytes().await.ok().map(|b| b.to_vec()), headers)
}

#[tokio::test]
async fn what_the_registry_refused_reaches_the_client_as_its_error_and_is_not_fetched_again() {
    for kind in [ServerKind::Kache, ServerKind::Hyper] {
        let img = image();
        let up = FaultyUpstream::start("team/app", "v1", &img);
        let reg = parts::registry(RegistryOptions::pull_from(&up.host())).await;
        let p = proxy(&reg.base, &up.host(), kind).await;
        let p = &p.base;
        let repo = format!("127.0.0.1_{}/team/app", up.addr().port());
        for (what, fault) in refused_manifests() {
            up.fail("v1", fault);
            let before = up.count_requests("GET", "/manifests/");
            let (status, body, headers) = get(&format!("{p}/v2/{repo}/manifests/v1")).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{what} ({kind:?})");
            let body = String::from_utf8(body.unwrap()).unwrap();
            assert!(body.contains("UNAVAILABLE"), "{what}: {body}");
            assert_eq!(
                headers.get(kache_wire::FAILURE_HEADER).unwrap(),
                kache_wire::UPSTREAM_FAILURE
            );
            assert_eq!(
                up.count_requests("GET", "/manifests/") - before,
                1,
                "{what}: the registry's one GET, and none from the proxy ({kind:?})"
            );
        }
        up.clear_all();
        let (status, body, _) = get(&format!("{p}/v2/{repo}/manifests/v1")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), img.top().bytes);
    }
}

#[tokio::test]
async fn with_the_registry_down_the_proxy_refuses_the_same_answers_itself() {
    for kind in [ServerKind::Kache, ServerKind::Hyper] {
        let img = image();
        let up = FaultyUpstream::start("team/app", "v1", &img);
        let p = proxy(&closed_port(), &up.host(), kind).await;
        let p = &p.base;
        let repo = format!("127.0.0.1_{}/team/app", up.addr().port());
        let by_tag = format!("{p}/v2/{repo}/manifests/v1");
        let by_digest = format!("{p}/v2/{repo}/manifests/{}", img.digest());
        for (what, fault) in refused_manifests() {
            up.fail("v1", fault.clone());
            let (status, body, _) = get(&by_tag).await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{what} ({kind:?})");
            let body = String::from_utf8(body.unwrap()).unwrap();
            assert!(body.contains("refuses"), "{what}: {body}");
            up.clear_all();
            up.fail(img.digest(), fault);
            let (status, _, _) = get(&by_digest).await;
            assert_eq!(
                status,
                StatusCode::BAD_GATEWAY,
                "{what} by digest ({kind:?})"
            );
            up.clear_all();
        }
        // A blob that does not hash to its digest breaks off before its last byte.
        let layer = &img.layers[0];
        let blob = format!("{p}/v2/{repo}/blobs/{}", layer.digest);
        up.fail(&layer.digest, Fault::WrongBytes);
        let (status, body, headers) = get(&blob).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the status went out before the last byte"
        );
        assert_eq!(
            headers.get("content-length").unwrap(),
            &layer.bytes.len().to_string()
        );
        assert!(
            body.is_none(),
            "a blob that does not verify arrived whole ({kind:?})"
        );
        // And served honestly, everything arrives as it is.
        up.clear_all();
        let (status, body, headers) = get(&by_tag).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), img.top().bytes);
        assert_eq!(headers.get("docker-content-digest").unwrap(), img.digest());
        let (status, body, _) = get(&blob).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), layer.bytes);
    }
}

/// An upstream behind a black hole (no answer, no refusal) costs a cached tag the registry's
/// re-validation wait, not the upstream timeout: the registry answers the proxy with what it
/// holds before the proxy gives up on it, so the proxy never takes a cache that holds the
/// image for a failing one (and never tries the silent upstream itself).
#[tokio::test]
async fn a_cached_tag_is_served_while_the_upstream_answers_nothing() {
    let img = image();
    let up = FaultyUpstream::start("team/app", "v1", &img);
    // Every read re-validates; the upstream client waits 5 s, the proxy 2 s for the registry.
    let freshness = Freshness {
        tag_ttl: Duration::ZERO,
        revalidate_wait: Duration::from_millis(200),
    };
    let reg = parts::registry(RegistryOptions {
        freshness,
        ..RegistryOptions::pull_from(&up.host())
    })
    .await;
    let p = proxy(&reg.base, &up.host(), ServerKind::Kache).await;
    let p = &p.base;
    let repo = format!("127.0.0.1_{}/team/app", up.addr().port());
    let by_tag = format!("{p}/v2/{repo}/manifests/v1");
    let (status, body, _) = get(&by_tag).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), img.top().bytes, "cached");

    up.fail("v1", Fault::Silence);
    let (status, body, headers) = get(&by_tag).await;
    assert_eq!(status, StatusCode::OK, "{headers:?}");
    assert_eq!(body.unwrap(), img.top().bytes);
    assert_eq!(
        headers.get(kache_wire::CACHE_HEADER).unwrap(),
        "stale",
        "the registry's copy, not the proxy's fallback"
    );
    assert_eq!(
        up.held(),
        1,
        "answered while the upstream still held the registry's HEAD"
    );
    assert_eq!(
        up.count_requests("GET", "/manifests/v1"),
        1,
        "nobody fetched the tag again"
    );
    up.clear_all();
}
