//! What real OCI clients nobody here wrote see through kache (crane, regctl and oras, built by
//! scripts/oci-clients; skopeo seeds the upstream): CNCF distribution 2.8 (Debian's
//! `docker-registry`) is the upstream, `kache registry` caches it and `kache proxy` sits in front
//! as on a node. Each client is pointed at the proxy and at the registry's read listener, and
//! gets what the upstream would give it:
//!
//! - the upstream's tags of a cached repository, every page of them, with the cache's own, and
//!   still when the upstream is down;
//! - the referrers attached upstream (distribution 2.8 keeps them under the tag schema's
//!   `sha256-<hex>`; a registry with the referrers API answers from it), filtered by artifact
//!   type, and the referrer itself pulled through;
//! - a HEAD of a blob not cached yet, answered from the upstream's HEAD without its body;
//! - the catalog of what the cache holds, paged;
//! - nothing an upstream that lies sent: the registry's refusal, not the bytes, through the proxy.

use kache_testkit as support;

use std::time::Duration;

use serde_json::Value;
use support::pull::{Scratch, cache_repo, manifest_headers, multi_layer_image};
use support::{
    Content, Distribution, DistributionKind, Fault, FaultyUpstream, KacheProxy, KacheRegistry,
    OciClients, get, head,
};

/// How long distribution's access log may lag behind an answer a client already has.
const LOG_WAIT: Duration = Duration::from_secs(5);

fn lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

#[test]
fn tags_blob_heads_and_the_catalog_are_the_upstream_s_through_the_cache() {
    let s = Scratch::new("kache-e2e-clients");
    let c = OciClients::new();
    let image = multi_layer_image(40);
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("app", &image)]);
    s.skopeo.copy(
        &format!("{src}:app"),
        &format!("docker://{host}/team/app:v00"),
        &[],
    );
    // 30 tags upstream, made by crane itself.
    let mut want: Vec<String> = (0..30).map(|i| format!("v{i:02}")).collect();
    for t in &want[1..] {
        c.crane(&["tag", &format!("{host}/team/app:v00"), t])
            .out("crane tag");
    }
    let mut registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &["--insecure-registry", &host, "--tag-ttl", "1s"],
    );
    let proxy = KacheProxy::start(&registry.base_url(), &["--insecure-registry", &host]);
    let p = proxy.addr().to_string();
    let r = registry.addr().to_string();
    let repo = cache_repo(&host, "team/app");

    // Nothing pulled yet: every upstream tag, through the proxy and from the registry.
    for at in [&p, &r] {
        let listed = c.crane(&["ls", &format!("{at}/{repo}")]);
        assert_eq!(lines(listed.out("crane ls")), want, "crane ls at {at}");
        let listed = c.regctl(&[at], &["tag", "ls", &format!("{at}/{repo}")]);
        assert_eq!(
            lines(listed.out("regctl tag ls")),
            want,
            "regctl tag ls at {at}"
        );
    }
    // Paged as the spec says: `n`, then `last` from the Link.
    let page = get(&format!("http://{p}/v2/{repo}/tags/list?n=10"), &[]);
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.json()["tags"].as_array().unwrap().len(), 10);
    let link = page
        .header("link")
        .expect("a Link to the next page")
        .to_owned();
    assert!(
        link.contains("last=v09") && link.contains("rel=\"next\""),
        "{link}"
    );
    let next = get(
        &format!("http://{p}/v2/{repo}/tags/list?n=10&last=v09"),
        &[],
    );
    assert_eq!(next.json()["tags"][0], "v10");

    // A HEAD of a layer nobody pulled yet: the size and digest the GET would give, from the
    // upstream's HEAD, and no body fetched.
    let layer = &image.layers[1];
    let blob_path = format!("/v2/team/app/blobs/{}", layer.digest);
    let heads = c.regctl(
        &[&p],
        &["blob", "head", &format!("{p}/{repo}"), &layer.digest],
    );
    heads.out("regctl blob head");
    for at in [&p, &r] {
        let h = head(
            &format!("http://{at}/v2/{repo}/blobs/{}", layer.digest),
            &[],
        );
        assert_eq!(h.status, 200, "HEAD at {at}");
        assert_eq!(
            h.header("content-length"),
            Some(layer.bytes.len().to_string().as_str())
        );
        assert_eq!(
            h.header("docker-content-digest"),
            Some(layer.digest.as_str())
        );
    }
    assert!(upstream.wait_for_requests("HEAD", &blob_path, 1, LOG_WAIT) >= 1);
    assert_eq!(
        upstream.count_requests("GET", &blob_path),
        0,
        "a HEAD fetched the body"
    );
    // A blob the upstream does not have is unknown.
    let absent = kache_oci::Digest::sha256(b"no such layer");
    let h = head(&format!("http://{p}/v2/{repo}/blobs/{absent}"), &[]);
    assert_eq!(h.status, 404);

    // Pulled, and a tag of the cache's own beside the upstream's (pushed to the cache
    // repository on the internal listener): listed with them.
    let pulled = c.crane(&[
        "pull",
        &format!("{p}/{repo}:v00"),
        &s.path("app.tar").display().to_string(),
    ]);
    pulled.out("crane pull");
    let internal = registry.internal_addr().unwrap().to_string();
    c.crane(&["tag", &format!("{internal}/{repo}:v00"), "local-only"])
        .out("crane tag in the cache");
    want.push("local-only".to_owned());
    want.sort();
    let listed = c.crane(&["ls", &format!("{p}/{repo}")]);
    assert_eq!(lines(listed.out("crane ls")), want);

    // The catalog: what the cache holds, on the read listener and through the proxy, paged.
    let other = cache_repo(&host, "team/other");
    s.skopeo.copy(
        &format!("{src}:app"),
        &format!("docker://{host}/team/other:v1"),
        &[],
    );
    c.crane(&["manifest", &format!("{p}/{other}:v1")])
        .out("crane manifest");
    for at in [&p, &r] {
        let cat = c.crane(&["catalog", at]);
        assert_eq!(
            lines(cat.out("crane catalog")),
            lines(&format!("{repo}\n{other}"))
        );
        let cat = c.regctl(&[at], &["repo", "ls", at]);
        assert_eq!(
            lines(cat.out("regctl repo ls")),
            lines(&format!("{repo}\n{other}"))
        );
    }
    let page = get(&format!("http://{p}/v2/_catalog?n=1"), &[]);
    assert_eq!(page.status, 200);
    assert_eq!(page.json()["repositories"], serde_json::json!([repo]));
    assert!(
        page.header("link")
            .is_some_and(|l| l.contains("/v2/_catalog?n=1&last="))
    );

    // The upstream goes: past the tag TTL the kept list is served, counted stale, merged as
    // before.
    upstream.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let listed = c.crane(&["ls", &format!("{p}/{repo}")]);
    assert_eq!(lines(listed.out("crane ls with the upstream down")), want);
    let r2 = get(&format!("http://{r}/v2/{repo}/tags/list"), &[]);
    assert_eq!(r2.header("x-kache-cache"), Some("stale"));
    registry.stop();
}

#[test]
fn referrers_attached_upstream_are_listed_and_pulled_through_the_cache() {
    let s = Scratch::new("kache-e2e-referrers");
    let c = OciClients::new();
    let image = multi_layer_image(50);
    // Distribution 2.8 has no referrers API (oras keeps the tag schema's index there); a kache
    // registry has one.
    let mut distribution = Distribution::start(DistributionKind::Open);
    let with_api = KacheRegistry::start_with_internal(s.path("with-api"), &[] as &[&str]);
    let with_api_host = with_api.internal_addr().unwrap().to_string();
    let src = s.layout("src", &[("app", &image)]);
    // oras names a file by the path it was given: relative ones, in the clients' home.
    std::fs::write(c.path("sbom.json"), br#"{"spdxVersion":"SPDX-2.3"}"#).unwrap();
    std::fs::write(c.path("sig.txt"), b"a signature").unwrap();
    let upstreams = [distribution.host(), with_api_host.clone()];
    for host in &upstreams {
        s.skopeo.copy(
            &format!("{src}:app"),
            &format!("docker://{host}/team/app:v1"),
            &[],
        );
        for (file, kind) in [
            ("sbom.json", "application/spdx+json"),
            ("sig.txt", "application/vnd.example.sig"),
        ] {
            let out = c.oras(&[
                "attach",
                &format!("{host}/team/app:v1"),
                "--artifact-type",
                kind,
                &format!("{file}:text/plain"),
            ]);
            out.out(&format!("oras attach {file} at {host}"));
        }
    }
    let mut insecure = Vec::new();
    for h in &upstreams {
        insecure.extend(["--insecure-registry".to_owned(), h.clone()]);
    }
    let registry = KacheRegistry::start_with_args(s.path("data"), &insecure);
    let proxy = KacheProxy::start(&registry.base_url(), &insecure);
    let p = proxy.addr().to_string();
    for host in &upstreams {
        let repo = cache_repo(host, "team/app");
        let subject = format!("{p}/{repo}@{}", image.digest());
        let found = c.oras(&["discover", &subject, "--format", "json"]);
        let found: Value = serde_json::from_str(found.out("oras discover")).unwrap();
        let mut kinds: Vec<String> = found["referrers"]
            .as_array()
            .or_else(|| found["manifests"].as_array())
            .unwrap_or_else(|| panic!("no referrers in {found}"))
            .iter()
            .map(|r| r["artifactType"].as_str().unwrap().to_owned())
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            ["application/spdx+json", "application/vnd.example.sig"],
            "from {host}"
        );
        let listed = c.regctl(
            &[&p],
            &["artifact", "list", &subject, "--format", "{{json .}}"],
        );
        assert!(
            listed
                .out("regctl artifact list")
                .contains("application/spdx+json")
        );
        // Filtered by artifact type, as the spec's API does.
        let filtered = get(
            &format!(
                "http://{p}/v2/{repo}/referrers/{}?artifactType=application/spdx%2Bjson",
                image.digest()
            ),
            &[],
        );
        assert_eq!(filtered.status, 200);
        assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
        let listed = filtered.json()["manifests"].as_array().unwrap().clone();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["artifactType"], "application/spdx+json");
        // The referrer pulls through like any other image.
        let digest = listed[0]["digest"].as_str().unwrap();
        let out = s.path(&format!("pulled-{}", host.replace(':', "_")));
        let pulled = c.oras(&[
            "pull",
            &format!("{p}/{repo}@{digest}"),
            "-o",
            &out.display().to_string(),
        ]);
        pulled.out("oras pull of the referrer");
        assert_eq!(
            std::fs::read(out.join("sbom.json")).unwrap(),
            br#"{"spdxVersion":"SPDX-2.3"}"#
        );
    }
    // The upstream gone, the kept list still answers.
    distribution.stop();
    let repo = cache_repo(&upstreams[0], "team/app");
    let r = get(
        &format!(
            "{}/v2/{repo}/referrers/{}",
            registry.base_url(),
            image.digest()
        ),
        &manifest_headers(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 2);
}

#[test]
fn what_a_lying_upstream_sends_never_reaches_a_client_through_the_proxy() {
    let s = Scratch::new("kache-e2e-lies");
    let c = OciClients::new();
    let image = multi_layer_image(60);
    let up = FaultyUpstream::start("team/app", "v1", &image);
    let host = up.host();
    let registry = KacheRegistry::start_with_args(s.path("data"), &["--insecure-registry", &host]);
    let proxy = KacheProxy::start(&registry.base_url(), &["--insecure-registry", &host]);
    let p = proxy.addr().to_string();
    let repo = cache_repo(&host, "team/app");
    up.fail("v1", Fault::WrongBytes);
    let got = c.crane(&["manifest", &format!("{p}/{repo}:v1")]);
    assert!(
        !got.ok,
        "crane took a manifest that does not hash: {}",
        got.stdout
    );
    assert!(
        got.stderr.contains("UNAVAILABLE") || got.stderr.contains("502"),
        "{}",
        got.stderr
    );
    // crane tries again on a 502; each try is one GET upstream, the registry's: the proxy
    // passed the refusal on and never went upstream itself.
    let scraped = support::metrics::scrape(&proxy.metrics_url());
    let count = |result: &str| {
        support::metrics::value(
            &scraped,
            "kache_proxy_requests_total",
            &[("upstream", &host), ("result", result)],
        )
    };
    assert_eq!(count("fallback"), 0.0, "{scraped}");
    assert_eq!(
        up.count_requests("GET", "/manifests/v1") as f64,
        count("error"),
        "{scraped}"
    );
    up.clear_all();
    let got = c.crane(&["manifest", &format!("{p}/{repo}:v1")]);
    assert_eq!(
        got.out("crane manifest").as_bytes(),
        image.top().bytes.as_slice()
    );
}
