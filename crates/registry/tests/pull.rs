//! Pull-through over real HTTP on 127.0.0.1: a caching registry in front of an upstream that
//! is itself a kache registry (the Debian distribution runs in the end-to-end tests).

use std::time::Duration;

use kache_oci::{Digest, media_type};
use kache_registry::{Access, Freshness};
use kache_testkit::inproc::{client, error_code as code, push_image};
use kache_testkit::parts::{self, RegistryOptions, Running};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A registry on a free port; with `upstream_of`, a pull-through cache of that host whose tags
/// are re-validated once older than `ttl`.
async fn start(upstream_of: Option<&str>, ttl: Duration, access: Access) -> Running {
    parts::registry(RegistryOptions {
        pull_from: upstream_of.map(str::to_owned),
        freshness: Freshness::tags(ttl),
        access,
        ..RegistryOptions::default()
    })
    .await
}

fn cache_repo(upstream: &Running, path: &str) -> String {
    format!("127.0.0.1_{}/{path}", upstream.addr.port())
}

#[tokio::test]
async fn pulls_through_then_serves_from_cache_when_upstream_is_gone() {
    let mut up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let layer = vec![42u8; 300_000];
    let (m, ld) = push_image(&c, &up.base, "team/app", "v1", &layer, None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadOnly,
    )
    .await;
    let repo = cache_repo(&up, "team/app");

    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-kache-cache"], "miss");
    assert_eq!(r.headers()["content-type"], media_type::OCI_MANIFEST);
    assert_eq!(r.bytes().await.unwrap(), m);
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-kache-cache"], "miss");
    assert_eq!(r.bytes().await.unwrap(), layer);

    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-kache-cache"], "hit");
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-kache-cache"], "hit");

    up.stop().await;
    let r = c
        .get(format!("{}/v2/{repo}/manifests/v1", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), m);
    let r = c
        .get(format!("{}/v2/{repo}/blobs/{ld}", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), layer);
    assert_eq!(
        cache.store().verify().await.unwrap().bad,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn stale_tags_are_revalidated_and_served_when_upstream_fails() {
    let mut up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let (m1, _) = push_image(&c, &up.base, "app", "latest", b"one", None).await;
    // A zero TTL re-validates on every request.
    let cache = start(Some(&up.addr.to_string()), Duration::ZERO, Access::ReadOnly).await;
    let url = format!(
        "{}/v2/{}/manifests/latest",
        cache.base,
        cache_repo(&up, "app")
    );
    assert_eq!(c.get(&url).send().await.unwrap().bytes().await.unwrap(), m1);

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(
        r.headers()["x-kache-cache"],
        "hit",
        "unchanged upstream: confirmed by HEAD"
    );
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="manifest",method="HEAD",status="200"}"#),
        1.0
    );

    let (m2, _) = push_image(&c, &up.base, "app", "latest", b"two", None).await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), m2, "the tag moved upstream");

    up.stop().await;
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-kache-cache"], "stale");
    assert_eq!(r.bytes().await.unwrap(), m2);
    assert_eq!(
        cache.count(r#"kache_registry_cache_requests_total{kind="manifest",outcome="stale"}"#),
        1.0,
        "{}",
        cache.metrics()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_pulls_make_one_upstream_request() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let layer: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
    let (_, ld) = push_image(&c, &up.base, "big", "v1", &layer, None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadOnly,
    )
    .await;
    let url = format!("{}/v2/{}/blobs/{ld}", cache.base, cache_repo(&up, "big"));
    let gets: Vec<_> = (0..16)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { c.get(url).send().await.unwrap().bytes().await.unwrap() })
        })
        .collect();
    for g in gets {
        assert!(g.await.unwrap() == layer, "a client got wrong bytes");
    }
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="blob",method="GET",status="200"}"#),
        1.0
    );
    let mc = format!("{}/v2/{}/manifests/v1", cache.base, cache_repo(&up, "big"));
    let gets: Vec<_> = (0..8)
        .map(|_| {
            let (c, mc) = (c.clone(), mc.clone());
            tokio::spawn(async move { c.get(mc).send().await.unwrap().status() })
        })
        .collect();
    for g in gets {
        assert_eq!(g.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="manifest",method="GET",status="200"}"#),
        1.0
    );
}

#[tokio::test]
async fn upstream_404_reaches_the_client_as_the_spec_error() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    push_image(&c, &up.base, "exists", "v1", b"x", None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadOnly,
    )
    .await;
    let r = c
        .get(format!(
            "{}/v2/{}/manifests/nope",
            cache.base,
            cache_repo(&up, "exists")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .get(format!(
            "{}/v2/{}/blobs/{}",
            cache.base,
            cache_repo(&up, "exists"),
            Digest::sha256(b"absent")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(code(r).await, "BLOB_UNKNOWN");
    // An unreachable upstream with nothing cached is a gateway error, not a 404.
    let r = c
        .get(format!("{}/v2/127.0.0.1_1/x/manifests/v1", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(code(r).await, "UNAVAILABLE");
}

#[tokio::test]
async fn mirror_requests_name_the_upstream_in_ns() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let (m, ld) = push_image(&c, &up.base, "library/web", "1.0", b"mirror layer", None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadOnly,
    )
    .await;
    let ns = up.addr.to_string();
    let r = c
        .get(format!(
            "{}/v2/library/web/manifests/1.0?ns={ns}",
            cache.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), m);
    let r = c
        .get(format!("{}/v2/library/web/blobs/{ld}?ns={ns}", cache.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), "mirror layer");
    // Stored under the cache's own naming, so the webhook's form finds it too.
    let r = c
        .get(format!(
            "{}/v2/{}/manifests/1.0",
            cache.base,
            cache_repo(&up, "library/web")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-kache-cache"], "hit");
}

#[tokio::test]
async fn writes_need_the_internal_listener_or_the_token() {
    let c = client();
    for (access, status, code_) in [
        (
            Access::ReadOnly,
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Access::Token("s3cret-token-0123456789".into()),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
    ] {
        let node = start(None, Duration::ZERO, access).await;
        let d = Digest::sha256(b"poison");
        let r = c
            .post(format!(
                "{}/v2/docker.io/library/nginx/blobs/uploads/?digest={d}",
                node.base
            ))
            .body("poison")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(code(r).await, code_);
        let r = c
            .put(format!(
                "{}/v2/docker.io/library/nginx/manifests/latest",
                node.base
            ))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        let r = c
            .delete(format!(
                "{}/v2/docker.io/library/nginx/manifests/latest",
                node.base
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        let r = c
            .post(format!("{}/kache/v1/warm", node.base))
            .body(r#"{"image":"nginx"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(node.store().total_bytes(), 0, "nothing was written");
        assert_eq!(
            node.store()
                .stat_blob(&"docker.io/library/nginx".parse().unwrap(), &d)
                .unwrap(),
            None
        );
    }
    let node = start(
        None,
        Duration::ZERO,
        Access::Token("s3cret-token-0123456789".into()),
    )
    .await;
    let d = Digest::sha256(b"legit");
    let r = c
        .post(format!("{}/v2/r/blobs/uploads/?digest={d}", node.base))
        .bearer_auth("wrong-token-000000000")
        .body("legit")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .post(format!("{}/v2/r/blobs/uploads/?digest={d}", node.base))
        .bearer_auth("s3cret-token-0123456789")
        .body("legit")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Reads never need it.
    assert_eq!(
        c.get(format!("{}/v2/r/blobs/{d}", node.base))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn warm_caches_the_asked_platforms_of_an_index_and_nothing_else() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let mut children = Vec::new();
    let mut layers = Vec::new();
    for (arch, tag) in [("amd64", "amd"), ("arm64", "arm"), ("s390x", "s390")] {
        let (m, ld) = push_image(
            &c,
            &up.base,
            "multi",
            tag,
            format!("layer of {arch}").as_bytes(),
            Some(("linux", arch)),
        )
        .await;
        children.push(json!({"mediaType": media_type::OCI_MANIFEST, "digest": Digest::sha256(&m).to_string(), "size": m.len(), "platform": {"os": "linux", "architecture": arch}}));
        layers.push(ld);
    }
    let index = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": media_type::OCI_INDEX, "manifests": children}),
    )
    .unwrap();
    let r = c
        .put(format!("{}/v2/multi/manifests/v1", up.base))
        .header("content-type", media_type::OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadWrite,
    )
    .await;
    let image = format!("{}/multi:v1", up.addr);
    let r = c
        .post(format!("{}/kache/v1/warm", cache.base))
        .json(
            &json!({"image": image, "platforms": ["linux/amd64", "linux/arm64", "linux/riscv64"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["digest"], Digest::sha256(&index).to_string().as_str());
    assert_eq!(v["repository"], cache_repo(&up, "multi").as_str());
    let statuses: Vec<(&str, &str)> = v["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().unwrap(),
                p["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("linux/amd64", "cached"),
            ("linux/arm64", "cached"),
            ("linux/riscv64", "absent")
        ]
    );
    assert!(v["bytes"].as_u64().unwrap() > index.len() as u64);

    let repo: kache_oci::RepoName = cache_repo(&up, "multi").parse().unwrap();
    assert!(
        cache
            .store()
            .stat_blob(&repo, &layers[0].parse().unwrap())
            .unwrap()
            .is_some(),
        "amd64 layer cached"
    );
    assert!(
        cache
            .store()
            .stat_blob(&repo, &layers[1].parse().unwrap())
            .unwrap()
            .is_some(),
        "arm64 layer cached"
    );
    assert!(
        cache
            .store()
            .stat_blob(&repo, &layers[2].parse().unwrap())
            .unwrap()
            .is_none(),
        "s390x layer not fetched"
    );

    let r = c
        .post(format!("{}/kache/v1/warm", cache.base))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .post(format!("{}/kache/v1/warm", cache.base))
        .json(&json!({"image": "UPPER/case"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_blob_fetched_for_one_repository_is_not_fetched_again_for_another() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let layer = vec![7u8; 100_000];
    let (_, ld) = push_image(&c, &up.base, "one", "v1", &layer, None).await;
    push_image(&c, &up.base, "two", "v1", &layer, None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadOnly,
    )
    .await;
    for repo in ["one", "two"] {
        let r = c
            .get(format!(
                "{}/v2/{}/blobs/{ld}",
                cache.base,
                cache_repo(&up, repo)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap(), layer);
    }
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="blob",method="GET",status="200"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_head_on_a_missing_blob_answers_from_the_upstream_s_head() {
    let up = start(None, Duration::ZERO, Access::ReadWrite).await;
    let c = client();
    let (_, ld) = push_image(&c, &up.base, "app", "v1", b"only upstream", None).await;
    let cache = start(
        Some(&up.addr.to_string()),
        Duration::from_secs(3600),
        Access::ReadWrite,
    )
    .await;
    let url = format!("{}/v2/{}/blobs/{ld}", cache.base, cache_repo(&up, "app"));
    // Not cached: answered as the GET would be, from the upstream's HEAD, without the body.
    let h = c.head(&url).send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    assert_eq!(h.headers()["content-length"], "13");
    assert_eq!(
        h.headers()["docker-content-digest"],
        ld.to_string().as_str()
    );
    assert_eq!(h.headers()["x-kache-cache"], "miss");
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="blob",method="HEAD",status="200"}"#),
        1.0
    );
    assert_eq!(
        up.count(r#"kache_registry_requests_total{route="blob",method="GET",status="200"}"#),
        0.0
    );
    // One the upstream lacks is unknown; so is one of an upstream that is down.
    let absent = kache_oci::Digest::sha256(b"nowhere");
    let absent_url = format!(
        "{}/v2/{}/blobs/{absent}",
        cache.base,
        cache_repo(&up, "app")
    );
    assert_eq!(
        c.head(&absent_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().bytes().await.unwrap(),
        "only upstream"
    );
    let h = c.head(&url).send().await.unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    assert_eq!(h.headers()["x-kache-cache"], "hit");
}
