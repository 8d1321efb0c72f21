//! Registry-mirror mode for real: Debian's containerd, with a `certs.d/<registry>/hosts.toml`
//! naming the kache proxy as mirror of a CNCF distribution, pulls an image of that registry
//! with its pod-spec name untouched. The proxy counts the pulls per upstream, the registry
//! stores the image under `<host>_<port>/<repo>`, and once cached it is pulled again with the
//! upstream switched off.
//!
//! containerd needs root: without it the test prints SKIPPED and passes.

use kache_testkit as support;

use support::containerd::{Containerd, skip_unless_root, write_hosts_toml};
use support::image::Content;
use support::metrics;
use support::pull::{Scratch, cache_repo, multi_layer_image};
use support::registry::stored_blobs;
use support::{Distribution, DistributionKind, KacheProxy, KacheRegistry, get};

#[test]
fn containerd_pulls_through_the_proxy_as_a_registry_mirror() {
    if skip_unless_root("containerd_pulls_through_the_proxy_as_a_registry_mirror") {
        return;
    }
    let s = Scratch::new("kache-e2e-mirror");
    let image = multi_layer_image(50);
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("v1", &image)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/app:v1"),
        &[],
    );
    let registry = KacheRegistry::start_with_args(s.path("data"), &["--insecure-registry", &host]);
    let proxy = KacheProxy::start(&registry.base_url(), &["--insecure-registry", &host]);
    let requests = |result: &str| {
        metrics::value(
            &metrics::scrape(&proxy.metrics_url()),
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", result)],
        )
    };

    let containerd = Containerd::start();
    let hosts = containerd.scratch_dir("certs.d");
    write_hosts_toml(&hosts, &host, &upstream.base_url(), &proxy.base_url());
    let image_ref = format!("{host}/test/app:v1");
    containerd.pull(&image_ref, &hosts);
    let pulled = containerd
        .image(&image_ref)
        .unwrap_or_else(|| panic!("{image_ref} not in {:?}", containerd.images()));
    assert_eq!(pulled.digest, image.digest());

    // Everything went through the mirror: the proxy counted it for this upstream, and
    // containerd never had to fall back to the server itself.
    let misses = requests("miss");
    assert!(
        misses >= image.layers.len() as f64,
        "the proxy counted {misses} misses for {host}:\n{}",
        metrics::scrape(&proxy.metrics_url())
    );
    let direct: Vec<_> = upstream
        .access_log_lines()
        .into_iter()
        .filter(|l| l.user_agent.starts_with("containerd/"))
        .collect();
    assert!(
        direct.is_empty(),
        "containerd went to the upstream: {direct:#?}"
    );

    // The registry keeps it under the name the webhook's rewrite would use.
    let repo = cache_repo(&host, "test/app");
    let tags = get(&format!("{}/v2/{repo}/tags/list", registry.base_url()), &[]);
    assert_eq!(tags.status, 200, "{}", tags.text());
    assert_eq!(tags.json()["tags"], serde_json::json!(["v1"]));
    let stored = stored_blobs(registry.data_dir());
    for blob in image.blobs() {
        assert!(stored.contains_key(&blob.digest), "{blob:?} is not cached");
    }

    // Forgotten by containerd and gone upstream: pulled again, from the cache.
    containerd.remove_image(&image_ref);
    upstream.stop();
    let hits = requests("hit");
    containerd.pull(&image_ref, &hosts);
    assert_eq!(
        containerd.image(&image_ref).map(|i| i.digest),
        Some(image.digest().to_owned())
    );
    assert!(
        requests("hit") > hits,
        "the second pull counted no hit:\n{}",
        metrics::scrape(&proxy.metrics_url())
    );
    assert_eq!(requests("fallback"), 0.0);
}
