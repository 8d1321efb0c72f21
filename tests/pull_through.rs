//! Pull-through for real: CNCF distribution (Debian's `docker-registry`) is the upstream, seeded
//! with skopeo; `kache registry` caches it and `kache proxy` sits in front the way it does on a
//! node; skopeo and a plain HTTP client pull. Covers caching and serving with the upstream gone
//! (fresh, by digest, and stale after the tag TTL), the proxy's fallback when the registry is
//! gone, upstream Basic and token auth, and one upstream GET for 32 concurrent cold pulls.
//!
//! Faults of the upstream are in `pull_faults.rs`, containerd's mirror mode in `mirror.rs`,
//! write protection and the warm call in `cache_writes.rs`.

use kache_testkit as support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::http::{get_streamed, request};
use support::image::{Content, assert_bytes_eq, random_bytes, sha256_digest};
use support::metrics;
use support::pull::{
    Scratch, assert_pulled, assert_spec_error, cache_repo, manifest_headers, multi_layer_image,
    path_str, three_arch_index, write_docker_config,
};
use support::registry::{fsck, stored_blobs};
use support::token::{Access, TokenServer};
use support::{Distribution, DistributionKind, KacheProxy, KacheRegistry, get};

/// How long distribution's access log may lag behind an answer a client already has.
const LOG_WAIT: Duration = Duration::from_secs(5);

#[test]
fn pulls_through_proxy_and_registry_then_serves_from_cache_stale_and_by_fallback() {
    let s = Scratch::new("kache-e2e-pull");
    let image = multi_layer_image(10);
    let index = three_arch_index(20);
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("app", &image), ("multi", &index)]);
    s.skopeo.copy(
        &format!("{src}:app"),
        &format!("docker://{host}/test/app:v1"),
        &[],
    );
    s.skopeo.copy(
        &format!("{src}:multi"),
        &format!("docker://{host}/test/multi:v1"),
        &["--multi-arch", "all"],
    );

    let mut registry = KacheRegistry::start_with_args(
        s.path("data"),
        &["--insecure-registry", &host, "--tag-ttl", "1s"],
    );
    let proxy = KacheProxy::start(&registry.base_url(), &["--insecure-registry", &host]);
    let app = cache_repo(&host, "test/app");
    let multi = cache_repo(&host, "test/multi");
    let via_proxy = |reference: &str| format!("docker://{}/{reference}", proxy.addr());
    let proxy_count = |result: &str| {
        metrics::value(
            &metrics::scrape(&proxy.metrics_url()),
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", result)],
        )
    };

    // Cold: everything comes from distribution, through proxy and registry, unchanged.
    let got = s.pull(&via_proxy(&format!("{app}:v1")), &[]);
    assert_pulled("cold pull of the image", &image, &got);
    let got = s.pull(&via_proxy(&format!("{multi}:v1")), &["--multi-arch", "all"]);
    assert_pulled("cold pull of the index, every platform", &index, &got);
    let tags_stored = Instant::now();
    assert!(proxy_count("miss") > 0.0, "the proxy counted no miss");
    // The registry asked for each blob once.
    for blob in image.blobs().iter().skip(1) {
        let path = format!("/v2/test/app/blobs/{}", blob.digest);
        assert_eq!(
            upstream.wait_for_requests("GET", &path, 1, LOG_WAIT),
            1,
            "GETs of {path} at the upstream"
        );
    }

    // The upstream is gone: tags, digests and every platform are served from the store.
    upstream.stop();
    let got = s.pull(&via_proxy(&format!("{app}:v1")), &[]);
    assert_pulled("image with the upstream down", &image, &got);
    let got = s.pull(&via_proxy(&format!("{app}@{}", image.digest())), &[]);
    assert_pulled("image by digest with the upstream down", &image, &got);
    let got = s.pull(&via_proxy(&format!("{multi}:v1")), &["--multi-arch", "all"]);
    assert_pulled("index with the upstream down", &index, &got);

    // Past the 1 s tag TTL (tag times are whole seconds, so 1.1 s after the tags were stored
    // they are stale), a tag is re-validated, the dead upstream cannot answer, and the cached
    // manifest is served and counted as stale.
    let stale_at = tags_stored + Duration::from_millis(1100);
    if let Some(wait) = stale_at.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let registry_stale = || {
        metrics::value(
            &metrics::scrape(&registry.metrics_url()),
            "kache_registry_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "stale")],
        )
    };
    let before = registry_stale();
    let r = get(
        &format!("{}/v2/{app}/manifests/v1", registry.base_url()),
        &manifest_headers(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Kache-Cache"), Some("stale"));
    assert_bytes_eq("stale manifest", &image.manifest.bytes, &r.body);
    assert_eq!(
        registry_stale(),
        before + 1.0,
        "the stale answer was not counted"
    );
    let proxy_stale = proxy_count("stale");
    let got = s.pull(&via_proxy(&format!("{app}:v1")), &[]);
    assert_pulled("image after the tag TTL, upstream down", &image, &got);
    assert!(
        registry_stale() >= before + 2.0,
        "the stale pull was not counted"
    );
    assert!(
        proxy_count("stale") > proxy_stale,
        "the proxy counted no stale"
    );

    // The registry is gone and the upstream back: the proxy goes straight to the upstream.
    upstream.start_again();
    registry.stop();
    let fallbacks = proxy_count("fallback");
    let layer_gets: Vec<usize> = image
        .layers
        .iter()
        .map(|l| upstream.count_requests("GET", &format!("/v2/test/app/blobs/{}", l.digest)))
        .collect();
    let got = s.pull(&via_proxy(&format!("{app}:v1")), &[]);
    assert_pulled("image through the proxy's fallback", &image, &got);
    assert!(
        proxy_count("fallback") > fallbacks,
        "the proxy counted no fallback:\n{}",
        metrics::scrape(&proxy.metrics_url())
    );
    for (layer, before) in image.layers.iter().zip(layer_gets) {
        let path = format!("/v2/test/app/blobs/{}", layer.digest);
        assert!(
            upstream.wait_for_requests("GET", &path, before + 1, LOG_WAIT) > before,
            "the fallback did not fetch {path} upstream"
        );
    }

    // The store holds exactly what was pulled, and every blob verifies.
    let mut expected: Vec<String> = image.blobs().iter().map(|b| b.digest.clone()).collect();
    expected.extend(index.blobs().iter().map(|b| b.digest.clone()));
    expected.sort();
    let stored: Vec<String> = stored_blobs(registry.data_dir()).into_keys().collect();
    assert_eq!(stored, expected, "blobs in the store");
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
    assert_eq!(report.blobs, expected.len() as u64, "{}", report.output);
}

#[test]
fn upstream_basic_auth_uses_the_docker_config_and_missing_credentials_are_401() {
    let s = Scratch::new("kache-e2e-basic");
    let image = multi_layer_image(30);
    let password = "basic-pw-3f9a1c";
    let upstream = Distribution::start(DistributionKind::htpasswd("puller", password));
    let host = upstream.host();
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/app:v1"),
        &["--dest-creds", &format!("puller:{password}")],
    );
    let config = s.path("config.json");
    write_docker_config(&config, &host, "puller", password);
    let app = cache_repo(&host, "test/app");

    let with = KacheRegistry::start_with_args(
        s.path("with"),
        &[
            "--insecure-registry",
            &host,
            "--docker-config",
            path_str(&config).as_str(),
        ],
    );
    let got = s.pull(&format!("docker://{}/{app}:v1", with.addr()), &[]);
    assert_pulled("pulled with the docker config's credentials", &image, &got);

    let without =
        KacheRegistry::start_with_args(s.path("without"), &["--insecure-registry", &host]);
    let proxy = KacheProxy::start(&without.base_url(), &["--insecure-registry", &host]);
    for base in [without.base_url(), proxy.base_url()] {
        let r = get(
            &format!("{base}/v2/{app}/manifests/v1"),
            &manifest_headers(),
        );
        assert_spec_error(
            &format!("manifest without credentials from {base}"),
            &r,
            &[401],
            "UNAUTHORIZED",
        );
        let r = get(
            &format!("{base}/v2/{app}/blobs/{}", image.layers[0].digest),
            &[],
        );
        assert_spec_error(
            &format!("blob without credentials from {base}"),
            &r,
            &[401],
            "UNAUTHORIZED",
        );
        assert!(
            r.header("www-authenticate").is_some(),
            "a 401 from {base} without a challenge"
        );
    }
    let stderr = s.pull_fails(&format!("docker://{}/{app}:v1", without.addr()), &[]);
    assert!(
        stderr.to_lowercase().contains("unauthorized") || stderr.contains("401"),
        "{stderr}"
    );
    assert!(
        stored_blobs(without.data_dir()).is_empty(),
        "a refused pull stored something"
    );
}

#[test]
fn upstream_token_auth_asks_for_the_pull_scope_and_missing_credentials_are_401() {
    let s = Scratch::new("kache-e2e-token");
    let image = multi_layer_image(40);
    let tokens = TokenServer::start("kache-test-registry");
    tokens.add_user("alice", "alice-pw", &[("test/*", &["pull", "push"])]);
    let upstream = Distribution::start(DistributionKind::Token(tokens.distribution_auth()));
    let host = upstream.host();
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/app:v1"),
        &["--dest-creds", "alice:alice-pw"],
    );
    // The auths key with a scheme, as some tools write it.
    let config = s.path("config.json");
    write_docker_config(&config, &format!("http://{host}"), "alice", "alice-pw");
    let app = cache_repo(&host, "test/app");

    let seen_before = tokens.request_count();
    let with = KacheRegistry::start_with_args(
        s.path("with"),
        &[
            "--insecure-registry",
            &host,
            "--docker-config",
            path_str(&config).as_str(),
        ],
    );
    let got = s.pull(&format!("docker://{}/{app}:v1", with.addr()), &[]);
    assert_pulled("pulled with a token", &image, &got);
    let kache_asked: Vec<_> = tokens.requests().into_iter().skip(seen_before).collect();
    let pull_scope = "repository:test/app:pull";
    assert!(
        kache_asked
            .iter()
            .any(|r| r.scopes.iter().any(|s| s == pull_scope)
                && r.user.as_deref() == Some("alice")
                && r.status == 200
                && r.granted == [Access::repository("test/app", &["pull"])]),
        "no token for {pull_scope} as alice: {kache_asked:#?}"
    );
    for r in &kache_asked {
        assert_eq!(r.service.as_deref(), Some("kache-test-registry"), "{r:?}");
        assert_eq!(
            r.scopes,
            [pull_scope],
            "kache asked for more than pull: {r:?}"
        );
    }

    let without =
        KacheRegistry::start_with_args(s.path("without"), &["--insecure-registry", &host]);
    let base = without.base_url();
    let r = get(
        &format!("{base}/v2/{app}/manifests/v1"),
        &manifest_headers(),
    );
    assert_spec_error("manifest without credentials", &r, &[401], "UNAUTHORIZED");
    let r = get(
        &format!("{base}/v2/{app}/blobs/{}", image.layers[1].digest),
        &[],
    );
    assert_spec_error("blob without credentials", &r, &[401], "UNAUTHORIZED");
    assert!(stored_blobs(without.data_dir()).is_empty());
}

#[test]
fn concurrent_cold_pulls_of_one_big_blob_make_one_upstream_get() {
    const CLIENTS: usize = 32;
    const SIZE: usize = 64 << 20;
    let s = Scratch::new("kache-e2e-flight");
    let upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let blob = random_bytes(4242, SIZE);
    let digest = sha256_digest(&blob);

    // Seeded with a plain monolithic upload: the blob needs no image around it to be served.
    let start = request(
        "POST",
        &format!("{}/v2/test/big/blobs/uploads/", upstream.base_url()),
        &[],
        &[],
    );
    assert_eq!(start.status, 202, "{}", start.text());
    let location = start.header("Location").expect("upload location");
    let location = if location.starts_with('/') {
        format!("{}{location}", upstream.base_url())
    } else {
        location.to_owned()
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let done = request(
        "PUT",
        &format!("{location}{sep}digest={digest}"),
        &[("Content-Type", "application/octet-stream")],
        &blob,
    );
    assert_eq!(done.status, 201, "{}", done.text());
    drop(blob);

    let registry = KacheRegistry::start_with_args(s.path("data"), &["--insecure-registry", &host]);
    let proxy = KacheProxy::start(&registry.base_url(), &["--insecure-registry", &host]);
    let url = format!(
        "{}/v2/{}/blobs/{digest}",
        proxy.base_url(),
        cache_repo(&host, "test/big")
    );
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                get_streamed(&url, Duration::from_secs(120))
            })
        })
        .collect();
    for (n, client) in clients.into_iter().enumerate() {
        let got = client
            .join()
            .expect("client thread")
            .unwrap_or_else(|e| panic!("client {n}: no answer: {e}"));
        assert_eq!(got.status, 200, "client {n}: {got:?}");
        assert_eq!(got.error, None, "client {n}: body broke off");
        assert_eq!(got.size, SIZE as u64, "client {n}");
        assert_eq!(got.digest, digest, "client {n} got other bytes");
    }

    let path = format!("/v2/test/big/blobs/{digest}");
    assert_eq!(
        upstream.wait_for_requests("GET", &path, 1, LOG_WAIT),
        1,
        "upstream GETs of the blob"
    );
    // Every client has all its bytes, so any fetch made for one of them has ended; its log
    // line may lag a moment behind, so give it that moment.
    assert_eq!(
        upstream.wait_for_requests("GET", &path, 2, Duration::from_secs(1)),
        1,
        "upstream GETs of the blob: {:#?}",
        upstream.access_log_lines()
    );
    let text = metrics::scrape(&proxy.metrics_url());
    let count = |result: &str| {
        metrics::value(
            &text,
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", result)],
        )
    };
    let (hits, misses) = (count("hit"), count("miss"));
    assert_eq!(
        hits + misses,
        CLIENTS as f64,
        "all through the registry:\n{text}"
    );
    // More than one miss: the pulls did overlap, so the single GET above was shared.
    assert!(
        misses > 1.0,
        "the pulls did not overlap ({misses} misses, {hits} hits)"
    );
    assert_eq!(
        stored_blobs(registry.data_dir()).get(&digest),
        Some(&(SIZE as u64))
    );
}

#[test]
fn metrics_text_is_read_by_name_and_label_subset() {
    let text = "# TYPE kache_proxy_requests counter\n\
        kache_proxy_requests_total{upstream=\"127.0.0.1:5000\",result=\"hit\"} 3\n\
        kache_proxy_requests_total{upstream=\"127.0.0.1:5000\",result=\"miss\"} 2\n\
        kache_proxy_requests_total{upstream=\"other\",result=\"hit\"} 1\n\
        kache_proxy_sent_bytes_total 42\n# EOF\n";
    let v = |labels: &[(&str, &str)]| metrics::value(text, "kache_proxy_requests_total", labels);
    assert_eq!(v(&[("result", "hit")]), 4.0);
    assert_eq!(v(&[("upstream", "127.0.0.1:5000")]), 5.0);
    assert_eq!(
        v(&[("upstream", "127.0.0.1:5000"), ("result", "miss")]),
        2.0
    );
    assert_eq!(v(&[("result", "fallback")]), 0.0);
    assert_eq!(
        metrics::value(text, "kache_proxy_sent_bytes_total", &[]),
        42.0
    );
}
