//! Private repositories through the registry's API, in process: every read (path and mirror
//! form) refuses a caller whose namespace holds no grant, with the spec's 401 and a Bearer
//! challenge; a granted one reads; and a private blob is never served through another
//! repository. How a repository becomes private (the upstream's answers) is the end-to-end
//! tests' (tests/private_images.rs), with a real upstream that asks for credentials; the
//! upstreams here do on purpose what no real one does on demand (hold a request open).

use std::sync::Arc;

use base64::Engine as _;
use kache_oci::{Digest, RepoName};
use kache_registry::Access;
use kache_store::Storage;
use kache_testkit::inproc::{client, error_code, push_image};
use kache_testkit::parts::{self, RegistryOptions};
use kache_wire::pull_token::{self, Keys};
use kache_wire::{Grant, Visibility};
use reqwest::StatusCode;

fn keys(c: u8) -> Keys {
    Keys::from_entries([("k1", vec![c; 32])]).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn grant(repo: &RepoName, ns: &str, expires_at: u64) -> Grant {
    Grant {
        repository: repo.to_string(),
        namespace: ns.to_owned(),
        verified_at: expires_at.saturating_sub(3600),
        expires_at,
    }
}

#[tokio::test]
async fn every_read_of_a_private_repository_needs_a_namespace_granted_it() {
    let c = client();
    let up = parts::registry(RegistryOptions::default()).await;
    let layer = vec![7u8; 4096];
    let (manifest, layer_digest) = push_image(&c, &up.base, "team/app", "v1", &layer, None).await;
    let (_, other_layer) = push_image(&c, &up.base, "team/other", "v1", b"other", None).await;
    let k = keys(1);
    let cache = parts::registry(RegistryOptions {
        scoping: Some(k.clone()),
        access: Access::ReadOnly,
        ..RegistryOptions::pull_from(&up.addr.to_string())
    })
    .await;
    let host = format!("127.0.0.1_{}", up.addr.port());
    let repo: RepoName = format!("{host}/team/app").parse().unwrap();
    let other = format!("{host}/team/other");

    // The upstream asked nothing: the repository is public, and read by anyone.
    let r = c
        .get(cache.url(&format!("/v2/{repo}/manifests/v1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        cache.store().visibility(&repo).unwrap(),
        Some(Visibility::Public)
    );
    let r = c
        .get(cache.url(&format!("/v2/{repo}/blobs/{layer_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), layer);

    // Private, as a fetch with a namespace's pull secret makes it; team-a granted, team-old
    // granted once.
    let store: &Arc<_> = cache.store();
    store
        .set_visibility(&repo, Visibility::Private)
        .await
        .unwrap();
    let later = now() + 3600;
    store
        .put_grant(&repo, &grant(&repo, "team-a", later))
        .await
        .unwrap();
    store
        .put_grant(&repo, &grant(&repo, "team-old", now() - 1))
        .await
        .unwrap();

    let digest = Digest::sha256(&manifest);
    let mirror_ns = format!("127.0.0.1%3A{}", up.addr.port());
    let reads = [
        ("HEAD", format!("/v2/{repo}/manifests/v1")),
        ("GET", format!("/v2/{repo}/manifests/v1")),
        ("GET", format!("/v2/{repo}/manifests/{digest}")),
        ("HEAD", format!("/v2/{repo}/manifests/{digest}")),
        ("GET", format!("/v2/{repo}/tags/list")),
        ("GET", format!("/v2/{repo}/referrers/{digest}")),
        ("HEAD", format!("/v2/{repo}/blobs/{layer_digest}")),
        ("GET", format!("/v2/{repo}/blobs/{layer_digest}")),
        // containerd's mirror form: the same repository, its registry in `ns`.
        ("GET", format!("/v2/team/app/manifests/v1?ns={mirror_ns}")),
        (
            "GET",
            format!("/v2/team/app/blobs/{layer_digest}?ns={mirror_ns}"),
        ),
    ];
    let bearer = |t: &str| format!("Bearer {t}");
    let basic = |t: &str| {
        let pair = format!("kache:{t}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    };
    let team_a = k.sign("team-a").unwrap();
    let callers: [(&str, Option<String>, StatusCode); 9] = [
        ("anonymous", None, StatusCode::UNAUTHORIZED),
        ("team-a", Some(bearer(&team_a)), StatusCode::OK),
        ("team-a as Basic", Some(basic(&team_a)), StatusCode::OK),
        (
            "team-b, no grant",
            Some(bearer(&k.sign("team-b").unwrap())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "team-old, expired",
            Some(bearer(&k.sign("team-old").unwrap())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "another cluster's key",
            Some(bearer(&keys(2).sign("team-a").unwrap())),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "garbage",
            Some(bearer("v1.k1.team-a.garbage")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "the anonymous token",
            Some(bearer("anonymous")),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "oversized",
            Some(bearer(&"x".repeat(16 * 1024))),
            StatusCode::UNAUTHORIZED,
        ),
    ];
    let challenge = pull_token::challenge(&cache.addr.to_string(), Some(repo.as_str()));
    for (who, auth, status) in &callers {
        for (method, path) in &reads {
            let mut req = c.request(method.parse().unwrap(), cache.url(path));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), *status, "{who}: {method} {path}");
            if *status == StatusCode::UNAUTHORIZED {
                assert_eq!(
                    r.headers()["www-authenticate"],
                    challenge.as_str(),
                    "{who}: {method} {path}"
                );
                if *method == "GET" {
                    assert_eq!(
                        error_code(r).await,
                        "UNAUTHORIZED",
                        "{who}: {method} {path}"
                    );
                }
            } else if path.contains("/blobs/") && *method == "GET" {
                assert_eq!(r.bytes().await.unwrap(), layer, "{who}");
            }
        }
    }
    let n = reads.len() as f64;
    for (result, times) in [
        ("granted", 2.0 * n),
        // No token, the anonymous one, and a header too long to hold one.
        ("anonymous", 3.0 * n),
        ("no_grant", n),
        ("expired", n),
        ("invalid_token", 2.0 * n),
    ] {
        assert_eq!(
            cache.count(&format!(
                r#"kache_registry_auth_total{{result="{result}"}}"#
            )),
            times,
            "{result}"
        );
    }

    // The private layer is not read through another repository of the same upstream, which
    // holds no such blob; that repository's own blobs are read by anyone.
    for method in ["HEAD", "GET"] {
        let r = c
            .request(
                method.parse().unwrap(),
                cache.url(&format!("/v2/{other}/blobs/{layer_digest}")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let r = c
        .get(cache.url(&format!("/v2/{other}/blobs/{other_layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), "other".as_bytes());
    let other_repo: RepoName = other.parse().unwrap();
    assert_eq!(
        cache
            .store()
            .stat_blob(&other_repo, &layer_digest.parse().unwrap())
            .unwrap(),
        None,
        "never linked"
    );
}

#[tokio::test]
async fn the_ping_challenges_a_client_without_credentials_and_the_token_endpoint_answers() {
    let c = client();
    let k = keys(1);
    let cache = parts::registry(RegistryOptions {
        scoping: Some(k.clone()),
        access: Access::ReadOnly,
        ..RegistryOptions::pull_from("127.0.0.1:9")
    })
    .await;
    let r = c.get(cache.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        r.headers()["www-authenticate"],
        pull_token::challenge(&cache.addr.to_string(), None).as_str()
    );
    // The anonymous token, as Docker fetches it, reads the public rest.
    let r = c
        .get(cache.url("/v2/"))
        .header("authorization", "Bearer anonymous")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let token = k.sign("team-a").unwrap();
    let json = |r: reqwest::Response| async move {
        let v: serde_json::Value = r.json().await.unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    // containers/image and Docker: GET with Basic; containerd: POST with a password grant.
    let r = c
        .get(cache.url("/kache/token?service=kache&scope=repository:x:pull"))
        .basic_auth("kache", Some(&token))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await, token);
    let r = c
        .post(cache.url("/kache/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=password&username=kache&password={token}&service=kache"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "on the read-only listener too");
    assert_eq!(json(r).await, token);
    let r = c.get(cache.url("/kache/token")).send().await.unwrap();
    assert_eq!(json(r).await, "anonymous");
    let r = c
        .post(cache.url("/kache/token"))
        .body(vec![b'a'; 8192])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Without scoping, the ping is open as ever.
    let open = parts::registry(RegistryOptions::default()).await;
    let r = c.get(open.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A request the upstream holds: `asked` is told when it arrives, and it is answered once
/// `released` says so.
#[derive(Clone)]
struct Held {
    asked: Arc<tokio::sync::Notify>,
    released: tokio::sync::watch::Receiver<bool>,
}

impl Held {
    /// A hold, and the sender that releases it.
    fn new() -> (Held, tokio::sync::watch::Sender<bool>) {
        let (release, released) = tokio::sync::watch::channel(false);
        let asked = Arc::new(tokio::sync::Notify::new());
        (Held { asked, released }, release)
    }

    /// One that holds nothing.
    fn none() -> Held {
        let (held, release) = Held::new();
        release.send_replace(true);
        held
    }

    async fn wait(mut self) {
        self.asked.notify_one();
        let _ = self.released.wait_for(|r| *r).await;
    }
}

/// The private image the upstream below serves: a manifest, its config and a 200 kB layer.
struct PrivateImage {
    manifest: Vec<u8>,
    config: Vec<u8>,
    layer: Vec<u8>,
}

impl PrivateImage {
    fn new() -> Self {
        let layer = vec![9u8; 200_000];
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": kache_oci::media_type::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::sha256(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": Digest::sha256(&layer).to_string(), "size": layer.len()}],
        }))
        .unwrap();
        PrivateImage {
            manifest,
            config,
            layer,
        }
    }
}

/// An upstream whose `team/app` holds `image` for `bob:pw` only (its layer held back by one
/// byte by `layer_hold`; a manifest HEAD without credentials, as kache's classification sends,
/// held by `anonymous_hold`, then answered `anonymous`: 401 with a challenge, or any other
/// status) and whose `team/other` refuses everyone.
fn private_upstream(
    image: &PrivateImage,
    layer_hold: Held,
    anonymous_hold: Held,
    anonymous: axum::http::StatusCode,
) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode as S, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use futures_util::StreamExt as _;
    let login = || {
        (
            S::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, r#"Basic realm="private""#)],
        )
            .into_response()
    };
    let authorized = |h: &HeaderMap| {
        let bob = base64::engine::general_purpose::STANDARD.encode("bob:pw");
        h.get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Basic {bob}").as_bytes())
    };
    let manifest = image.manifest.clone();
    let manifest_route = get(move |method: axum::http::Method, h: HeaderMap| {
        let (manifest, hold) = (manifest.clone(), anonymous_hold.clone());
        async move {
            // A GET without credentials is a client that has not answered the challenge yet.
            if !authorized(&h) && method == axum::http::Method::GET {
                return login();
            }
            if !authorized(&h) {
                hold.wait().await;
                return match anonymous {
                    S::UNAUTHORIZED => login(),
                    other => other.into_response(),
                };
            }
            let d = Digest::sha256(&manifest).to_string();
            let media_type = kache_oci::media_type::OCI_MANIFEST.to_owned();
            (
                [
                    (header::CONTENT_TYPE, media_type),
                    (header::HeaderName::from_static("docker-content-digest"), d),
                ],
                manifest,
            )
                .into_response()
        }
    });
    let blobs = vec![image.config.clone(), image.layer.clone()];
    let layer = Digest::sha256(&image.layer).to_string();
    let blob_route = get(
        move |h: HeaderMap, axum::extract::Path(digest): axum::extract::Path<String>| {
            let (blobs, hold, layer) = (blobs.clone(), layer_hold.clone(), layer.clone());
            async move {
                if !authorized(&h) {
                    return login();
                }
                let Some(bytes) = blobs
                    .into_iter()
                    .find(|b| Digest::sha256(b).to_string() == digest)
                else {
                    return S::NOT_FOUND.into_response();
                };
                if digest != layer {
                    return bytes.into_response();
                }
                let len = bytes.len();
                let (head, last) = bytes.split_at(len - 1);
                let (head, last) = (
                    bytes::Bytes::copy_from_slice(head),
                    bytes::Bytes::copy_from_slice(last),
                );
                let body = futures_util::stream::iter([Ok::<_, std::io::Error>(head)]).chain(
                    futures_util::stream::once(async move {
                        hold.wait().await;
                        Ok(last)
                    }),
                );
                Response::builder()
                    .header(header::CONTENT_LENGTH, len)
                    .body(axum::body::Body::from_stream(body))
                    .unwrap()
            }
        },
    );
    axum::Router::new()
        .route("/v2/team/app/manifests/{reference}", manifest_route)
        .route("/v2/team/app/blobs/{digest}", blob_route)
        .route(
            "/v2/team/other/blobs/{digest}",
            get(move || async move { login() }),
        )
}

/// A registry with scoping on, pulling through from `up`.
async fn scoped_cache(up: std::net::SocketAddr) -> parts::Running {
    parts::registry(RegistryOptions {
        scoping: Some(keys(1)),
        access: Access::ReadWrite,
        ..RegistryOptions::pull_from(&up.to_string())
    })
    .await
}

/// The controller's warm call of `team/app:v1` at `up` with bob's credentials, as a task.
fn warm_with_credentials(
    cache: &parts::Running,
    up: std::net::SocketAddr,
) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(
        client()
            .post(cache.url("/kache/v1/warm"))
            .json(&serde_json::json!({
                "image": format!("{up}/team/app:v1"),
                "credentials": {"username": "bob", "password": "pw"},
            }))
            .send(),
    )
}

#[tokio::test]
async fn bytes_fetched_for_a_private_repository_are_never_shared_with_another_one() {
    let c = client();
    let image = PrivateImage::new();
    let ld = Digest::sha256(&image.layer);
    let (layer_hold, release) = Held::new();
    let up = kache_testkit::inproc::serve(private_upstream(
        &image,
        layer_hold.clone(),
        Held::none(),
        StatusCode::UNAUTHORIZED,
    ))
    .await;
    let cache = scoped_cache(up).await;

    // The controller warms the private image with a namespace's pull secret; its layer's fetch
    // is held open by the upstream.
    let warm = warm_with_credentials(&cache, up);
    layer_hold.asked.notified().await;

    // Meanwhile an anonymous client asks for the same digest through another repository of the
    // same upstream, which refuses it: it hears the refusal at once, never the private bytes.
    let other: RepoName = format!("127.0.0.1_{}/team/other", up.port())
        .parse()
        .unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        c.get(cache.url(&format!("/v2/{other}/blobs/{ld}"))).send(),
    )
    .await
    .expect("answered while the private fetch is held")
    .unwrap();
    assert_ne!(r.status(), StatusCode::OK);
    release.send_replace(true);
    let r = warm.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    let app: RepoName = format!("127.0.0.1_{}/team/app", up.port()).parse().unwrap();
    assert_eq!(
        cache.store().visibility(&app).unwrap(),
        Some(Visibility::Private)
    );
    assert_eq!(
        cache.store().stat_blob(&app, &ld).unwrap(),
        Some(image.layer.len() as u64)
    );
    assert_eq!(
        cache.store().stat_blob(&other, &ld).unwrap(),
        None,
        "never linked"
    );
}

#[tokio::test]
async fn a_manifest_fetched_with_credentials_is_stored_only_once_its_repository_is_classified() {
    let image = PrivateImage::new();
    // The classification's anonymous read is held, then answered 503: the upstream cannot tell.
    let (anonymous_hold, release) = Held::new();
    let up = kache_testkit::inproc::serve(private_upstream(
        &image,
        Held::none(),
        anonymous_hold.clone(),
        StatusCode::SERVICE_UNAVAILABLE,
    ))
    .await;
    let cache = scoped_cache(up).await;
    let app: RepoName = format!("127.0.0.1_{}/team/app", up.port()).parse().unwrap();
    let warm = warm_with_credentials(&cache, up);
    anonymous_hold.asked.notified().await;

    // The manifest came with bob's credentials; until the repository is classified it is not
    // in the store, where it would read as anyone's.
    let stored = cache
        .store()
        .get_manifest(&app, &"v1".parse().unwrap())
        .await;
    assert!(stored.is_err(), "stored before it was classified");
    assert_eq!(cache.store().visibility(&app).unwrap(), None);
    release.send_replace(true);
    let r = warm.await.unwrap().unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());

    // The upstream could not tell; credentials were needed: private, refused to anyone else.
    assert_eq!(
        cache.store().visibility(&app).unwrap(),
        Some(Visibility::Private)
    );
    let r = client()
        .get(cache.url(&format!("/v2/{app}/manifests/v1")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_grants_gauge_counts_grants_that_hold() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Storage> = Arc::new(kache_store::Store::open(dir.path()).unwrap().0);
    let mut prom = prometheus_client::registry::Registry::default();
    let registry =
        kache_registry::Registry::new(store.clone(), kache_registry::Metrics::new(&mut prom))
            .scoped(kache_registry::Scoping::new(
                kache_registry::KeyRing::fixed(keys(1)),
            ));
    let repo: RepoName = "ghcr.io/team/app".parse().unwrap();
    for (ns, expires_at) in [("team-a", now() + 3600), ("team-old", now() - 1)] {
        store
            .put_grant(&repo, &grant(&repo, ns, expires_at))
            .await
            .unwrap();
    }
    registry.refresh_gauges();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &prom).unwrap();
    assert_eq!(
        kache_testkit::metrics::sample(&text, "kache_registry_grants"),
        1.0,
        "{text}"
    );
}
