//! Who may put bytes into the cache, and the one write the controller makes: the warm call.
//!
//! Whatever the cache holds runs on every node, and any pod can reach the registry Service, so
//! `kache registry` refuses writes on the listener the proxies read from unless they carry the
//! write token, and takes them on its internal listener. The warm call caches an image for some
//! platforms of an index (and nothing else), with credentials that are used and never kept.

use kache_testkit as support;

use std::path::Path;

use base64::Engine as _;
use support::http::{Response, request};
use support::image::{Content, Image, assert_bytes_eq, media_type};
use support::pull::{
    Scratch, assert_pulled, assert_spec_error, cache_repo, manifest_headers, multi_layer_image,
    path_str, three_arch_index,
};
use support::registry::{fsck, stored_blobs};
use support::{Distribution, DistributionKind, KacheRegistry, get};

const WRITE_TOKEN: &str = "kache-write-token-6d2f0a9be1c34f57";

/// The write requests an attacker on the read listener might send, without credentials:
/// uploads (session and monolithic), a manifest over the cached tag, deletes, a warm call.
fn write_attempts(base: &str, repo: &str, real: &Image, evil: &Image) -> Vec<(String, Response)> {
    let attempt = |method: &str, path: String, headers: &[(&str, &str)], body: &[u8]| {
        let what = format!("{method} {path}");
        (
            what,
            request(method, &format!("{base}{path}"), headers, body),
        )
    };
    let warm = serde_json::json!({ "image": format!("{}:v1", repo.replacen('_', ":", 1)) });
    vec![
        attempt("POST", format!("/v2/{repo}/blobs/uploads/"), &[], &[]),
        attempt(
            "POST",
            format!("/v2/{repo}/blobs/uploads/?digest={}", evil.layers[0].digest),
            &[("Content-Type", "application/octet-stream")],
            &evil.layers[0].bytes,
        ),
        attempt(
            "PUT",
            format!("/v2/{repo}/manifests/v1"),
            &[("Content-Type", media_type::OCI_MANIFEST)],
            &evil.manifest.bytes,
        ),
        attempt(
            "DELETE",
            format!("/v2/{repo}/manifests/{}", real.digest()),
            &[],
            &[],
        ),
        attempt(
            "DELETE",
            format!("/v2/{repo}/blobs/{}", real.layers[0].digest),
            &[],
            &[],
        ),
        attempt(
            "POST",
            "/kache/v1/warm".to_owned(),
            &[("Content-Type", "application/json")],
            warm.to_string().as_bytes(),
        ),
    ]
}

/// Like [`write_attempts`], every request with `Authorization: <authorization>`.
fn write_attempts_with(
    base: &str,
    repo: &str,
    real: &Image,
    evil: &Image,
    authorization: &str,
) -> Vec<(String, Response)> {
    let auth = [("Authorization", authorization)];
    let mut out = Vec::new();
    let attempts: [(&str, String, Vec<u8>); 3] = [
        ("POST", format!("/v2/{repo}/blobs/uploads/"), Vec::new()),
        (
            "PUT",
            format!("/v2/{repo}/manifests/v1"),
            evil.manifest.bytes.clone(),
        ),
        (
            "DELETE",
            format!("/v2/{repo}/manifests/{}", real.digest()),
            Vec::new(),
        ),
    ];
    for (method, path, body) in attempts {
        let mut headers = auth.to_vec();
        if method == "PUT" {
            headers.push(("Content-Type", media_type::OCI_MANIFEST));
        }
        let r = request(method, &format!("{base}{path}"), &headers, &body);
        out.push((format!("{method} {path} ({authorization})"), r));
    }
    out
}

/// Pushes `image` as `<repo>:v1` over plain HTTP, every request with the bearer `token`:
/// monolithic blob uploads, then the manifest.
fn push_with_token(base: &str, repo: &str, image: &Image, token: &str) {
    let bearer = format!("Bearer {token}");
    for blob in image.blobs().into_iter().skip(1) {
        let r = request(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={}", blob.digest),
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/octet-stream"),
            ],
            &blob.bytes,
        );
        assert_eq!(
            r.status,
            201,
            "upload of {} with the token: {}",
            blob.digest,
            r.text()
        );
    }
    let r = request(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/v1"),
        &[
            ("Authorization", &bearer),
            ("Content-Type", image.manifest.media_type.as_str()),
        ],
        &image.manifest.bytes,
    );
    assert_eq!(r.status, 201, "manifest push with the token: {}", r.text());
    assert_eq!(r.header("Docker-Content-Digest"), Some(image.digest()));
}

/// What a reader of `repo` sees: its tags, and the manifest and blobs its `v1` points at.
fn assert_cache_holds(registry: &KacheRegistry, repo: &str, image: &Image) {
    let base = registry.base_url();
    let tags = get(&format!("{base}/v2/{repo}/tags/list"), &[]);
    assert_eq!(tags.status, 200, "{}", tags.text());
    assert_eq!(tags.json()["tags"], serde_json::json!(["v1"]));
    let r = get(
        &format!("{base}/v2/{repo}/manifests/v1"),
        &manifest_headers(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_bytes_eq("cached manifest", &image.manifest.bytes, &r.body);
    // Config and layers: manifests are served by the manifests endpoint only.
    for blob in image.blobs().into_iter().skip(1) {
        let r = get(&format!("{base}/v2/{repo}/blobs/{}", blob.digest), &[]);
        assert_eq!(r.status, 200, "{}", blob.digest);
        assert_bytes_eq(&blob.digest, &blob.bytes, &r.body);
    }
}

#[test]
fn unauthenticated_writes_cannot_poison_the_cache_and_the_token_or_internal_listener_can_write() {
    let s = Scratch::new("kache-e2e-writes");
    let real = multi_layer_image(60);
    let evil = multi_layer_image(66);
    let upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("real", &real), ("evil", &evil)]);
    s.skopeo.copy(
        &format!("{src}:real"),
        &format!("docker://{host}/test/app:v1"),
        &[],
    );
    let token_file = s.path("write-token");
    std::fs::write(&token_file, format!("{WRITE_TOKEN}\n")).expect("write token file");
    let mut registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &[
            "--insecure-registry",
            host.as_str(),
            "--write-token-file",
            path_str(&token_file).as_str(),
        ],
    );
    let repo = cache_repo(&host, "test/app");
    let read = registry.base_url();

    // The genuine image is cached by a pull, as a node would.
    let got = s.pull(&format!("docker://{}/{repo}:v1", registry.addr()), &[]);
    assert_pulled("cached image", &real, &got);
    let before = stored_blobs(registry.data_dir());

    // Without the token (or with another one) every write is refused with the spec's error.
    for (what, r) in write_attempts(&read, &repo, &real, &evil) {
        assert_spec_error(&what, &r, &[401], "UNAUTHORIZED");
        assert!(
            r.header("WWW-Authenticate").is_some(),
            "{what}: no challenge"
        );
    }
    for auth in [
        "Bearer not-the-write-token-at-all".to_owned(),
        format!("Bearer {WRITE_TOKEN}x"),
        format!("Basic {WRITE_TOKEN}"),
    ] {
        for (what, r) in write_attempts_with(&read, &repo, &real, &evil, &auth) {
            assert_spec_error(&what, &r, &[401], "UNAUTHORIZED");
        }
    }
    // Nor can real clients push over the cached tag or delete it.
    let stderr = s.copy_fails(
        &format!("{src}:evil"),
        &format!(
            "docker://{read_addr}/{repo}:v1",
            read_addr = registry.addr()
        ),
        &[],
    );
    assert!(
        stderr.to_lowercase().contains("unauthorized") || stderr.contains("401"),
        "{stderr}"
    );
    let out = s.skopeo.try_run(&[
        "delete",
        "--tls-verify=false",
        &format!("docker://{}/{repo}:v1", registry.addr()),
    ]);
    assert!(
        !out.status.success(),
        "skopeo delete on the read listener worked"
    );

    // The cache is as it was: same tag, same bytes, no new file.
    assert_cache_holds(&registry, &repo, &real);
    assert_eq!(
        stored_blobs(registry.data_dir()),
        before,
        "the store changed"
    );

    // With the token, the same listener takes a push and a delete. Plain HTTP here: the read
    // listener answers `GET /v2/` without a challenge (reads are open), so skopeo never sends
    // its `--dest-registry-token`.
    let pushed = cache_repo(&host, "test/pushed");
    push_with_token(&read, &pushed, &evil, WRITE_TOKEN);
    let got = s.pull(&format!("docker://{}/{pushed}:v1", registry.addr()), &[]);
    assert_pulled("pushed with the token", &evil, &got);
    let bearer = format!("Bearer {WRITE_TOKEN}");
    let r = request(
        "DELETE",
        &format!("{read}/v2/{pushed}/manifests/{}", evil.digest()),
        &[("Authorization", &bearer)],
        &[],
    );
    assert_eq!(r.status, 202, "delete with the token: {}", r.text());
    let r = get(
        &format!("{read}/v2/{pushed}/manifests/v1"),
        &manifest_headers(),
    );
    assert_spec_error("deleted manifest", &r, &[404], "MANIFEST_UNKNOWN");

    // The internal listener takes writes without a token.
    let internal = registry.internal_url();
    let internal_addr = internal.trim_start_matches("http://").to_owned();
    s.skopeo.copy(
        &format!("{src}:evil"),
        &format!("docker://{internal_addr}/team/app:v1"),
        &[],
    );
    let got = s.pull(&format!("docker://{}/team/app:v1", registry.addr()), &[]);
    assert_pulled("pushed on the internal listener", &evil, &got);

    registry.stop();
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
    // It says how far it has come as it goes, and ends at every blob.
    assert!(report.progress.len() >= 2, "{}", report.output);
    assert!(
        report.progress.windows(2).all(|w| w[0].0 < w[1].0),
        "{:?}",
        report.progress
    );
    assert_eq!(
        report.progress.last(),
        Some(&(report.blobs, report.blobs)),
        "{}",
        report.output
    );
}

#[test]
fn without_a_write_token_the_read_listener_is_read_only() {
    let s = Scratch::new("kache-e2e-readonly");
    let real = multi_layer_image(70);
    let evil = multi_layer_image(77);
    let src = s.layout("src", &[("real", &real), ("evil", &evil)]);
    let mut registry = KacheRegistry::start_with_internal(s.path("data"), &[] as &[&str]);
    let internal_addr = registry.internal_addr().expect("internal listener");
    s.skopeo.copy(
        &format!("{src}:real"),
        &format!("docker://{internal_addr}/team/app:v1"),
        &[],
    );
    let before = stored_blobs(registry.data_dir());

    for (what, r) in write_attempts(&registry.base_url(), "team/app", &real, &evil) {
        assert_spec_error(&what, &r, &[405], "UNSUPPORTED");
    }
    for (what, r) in write_attempts_with(
        &registry.base_url(),
        "team/app",
        &real,
        &evil,
        &format!("Bearer {WRITE_TOKEN}"),
    ) {
        assert_spec_error(&what, &r, &[405], "UNSUPPORTED");
    }
    s.copy_fails(
        &format!("{src}:evil"),
        &format!("docker://{}/team/app:v1", registry.addr()),
        &[],
    );
    assert_cache_holds(&registry, "team/app", &real);
    assert_eq!(
        stored_blobs(registry.data_dir()),
        before,
        "the store changed"
    );
    registry.stop();
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
}

/// `POST <base>/kache/v1/warm` with `body`.
fn warm(base: &str, body: serde_json::Value) -> Response {
    request(
        "POST",
        &format!("{base}/kache/v1/warm"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn warm_caches_the_asked_platforms_of_an_index_and_nothing_else() {
    let s = Scratch::new("kache-e2e-warm");
    let index = three_arch_index(80);
    let (amd64, arm64, armv7) = (&index.images[0], &index.images[1], &index.images[2]);
    let upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("v1", &index)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/multi:v1"),
        &["--multi-arch", "all"],
    );
    let mut registry =
        KacheRegistry::start_with_internal(s.path("data"), &["--insecure-registry", &host]);
    // Every line of a request is written once its response is complete: skopeo's are all in.
    let seeded = upstream.access_log_lines().len();

    let r = warm(
        &registry.internal_url(),
        serde_json::json!({
            "image": format!("{host}/test/multi:v1"),
            "platforms": ["linux/amd64", "linux/arm64"],
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(
        answer["repository"],
        cache_repo(&host, "test/multi"),
        "{answer}"
    );
    assert_eq!(answer["digest"], index.digest(), "{answer}");
    assert_eq!(answer["mediaType"], media_type::OCI_INDEX, "{answer}");
    let image_bytes = |i: &Image| i.blobs().iter().map(|b| b.size() as u64).sum::<u64>();
    let platforms = answer["platforms"].as_array().expect("platforms");
    assert_eq!(platforms.len(), 2, "{answer}");
    for (result, (name, image)) in platforms
        .iter()
        .zip([("linux/amd64", amd64), ("linux/arm64", arm64)])
    {
        assert_eq!(result["platform"], name, "{answer}");
        assert_eq!(result["status"], "cached", "{answer}");
        assert_eq!(result["digest"], image.digest(), "{answer}");
        assert_eq!(result["bytes"], image_bytes(image), "{answer}");
    }
    let total = index.index.size() as u64 + image_bytes(amd64) + image_bytes(arm64);
    assert_eq!(answer["bytes"], total, "{answer}");

    // The upstream was never asked for anything of arm/v7 (the lines before the warm call are
    // skopeo's seeding).
    let warm_lines: Vec<_> = upstream.access_log_lines().split_off(seeded);
    for blob in armv7.blobs() {
        let asked: Vec<_> = warm_lines
            .iter()
            .filter(|l| l.uri.contains(&blob.digest))
            .collect();
        assert!(
            asked.is_empty(),
            "arm/v7's {blob:?} was fetched: {asked:#?}"
        );
    }

    // The store holds the index and both platforms, nothing of arm/v7: counted on disk after
    // stopping, since asking kache about a missing blob of a cached repository fetches it.
    registry.stop();
    let mut expected: Vec<String> = [&index.index]
        .into_iter()
        .chain(amd64.blobs())
        .chain(arm64.blobs())
        .map(|b| b.digest.clone())
        .collect();
    expected.sort();
    let stored: Vec<String> = stored_blobs(registry.data_dir()).into_keys().collect();
    assert_eq!(stored, expected, "blobs in the store after warming");
    let report = fsck(registry.data_dir());
    assert!(report.success && report.bad == 0, "{}", report.output);
    assert_eq!(report.blobs, expected.len() as u64, "{}", report.output);
}

#[test]
fn warm_credentials_serve_the_fetch_and_are_never_stored() {
    let s = Scratch::new("kache-e2e-warm-creds");
    let index = three_arch_index(90);
    let password = "warm-only-pw-b81d2e7c";
    let upstream = Distribution::start(DistributionKind::htpasswd("warmer", password));
    let host = upstream.host();
    let src = s.layout("src", &[("v1", &index)]);
    s.skopeo.copy(
        &format!("{src}:v1"),
        &format!("docker://{host}/test/multi:v1"),
        &[
            "--multi-arch",
            "all",
            "--dest-creds",
            &format!("warmer:{password}"),
        ],
    );
    let mut registry =
        KacheRegistry::start_with_internal(s.path("data"), &["--insecure-registry", &host]);
    let image = format!("{host}/test/multi:v1");

    // The registry has no credentials of its own for this upstream.
    let r = warm(
        &registry.internal_url(),
        serde_json::json!({ "image": image, "platforms": ["linux/amd64"] }),
    );
    assert_spec_error("warm without credentials", &r, &[401], "UNAUTHORIZED");
    assert!(stored_blobs(registry.data_dir()).is_empty());

    let r = warm(
        &registry.internal_url(),
        serde_json::json!({
            "image": image,
            "platforms": ["linux/amd64"],
            "credentials": { "username": "warmer", "password": password },
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json();
    assert_eq!(answer["platforms"][0]["status"], "cached", "{answer}");
    assert_eq!(answer["digest"], index.digest(), "{answer}");

    // Warmed means a reader needs no credentials for it.
    let repo = cache_repo(&host, "test/multi");
    let amd64 = &index.images[0];
    let r = get(
        &format!(
            "{}/v2/{repo}/manifests/{}",
            registry.base_url(),
            amd64.digest()
        ),
        &manifest_headers(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Kache-Cache"), Some("hit"));

    // Neither the password nor the Basic token made of it is anywhere under the data dir, nor
    // in what kache logged.
    registry.stop();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("warmer:{password}"));
    let files = files_under(registry.data_dir());
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        for secret in [password, basic.as_str()] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds {secret:?}",
                file.display()
            );
        }
    }
    let logs = registry.logs();
    assert!(!logs.contains(password), "kache logged the password");
    assert!(!logs.contains(&basic), "kache logged the Basic token");
    let stored = stored_blobs(registry.data_dir());
    for blob in amd64.blobs() {
        assert!(stored.contains_key(&blob.digest), "{blob:?} was not warmed");
    }
}

#[test]
fn a_refresh_warm_asks_the_upstream_for_the_tag_whatever_its_age() {
    let s = Scratch::new("kache-e2e-warm-refresh");
    let (old, new) = (multi_layer_image(1), multi_layer_image(20));
    let mut upstream = Distribution::start(DistributionKind::Open);
    let host = upstream.host();
    let src = s.layout("src", &[("old", &old), ("new", &new)]);
    let push = |tag: &str| {
        s.skopeo.copy(
            &format!("{src}:{tag}"),
            &format!("docker://{host}/test/moving:v1"),
            &[],
        )
    };
    push("old");
    // Tags stay fresh for an hour: only a refresh looks past that.
    let registry = KacheRegistry::start_with_internal(
        s.path("data"),
        &["--insecure-registry", &host, "--tag-ttl", "1h"],
    );
    let image = format!("{host}/test/moving:v1");
    let warmed = |body: serde_json::Value| {
        let r = warm(&registry.internal_url(), body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["digest"].as_str().expect("a digest").to_owned()
    };
    assert_eq!(warmed(serde_json::json!({ "image": image })), old.digest());

    push("new");
    assert_eq!(
        warmed(serde_json::json!({ "image": image })),
        old.digest(),
        "a plain warm serves the cached tag while it is fresh"
    );
    assert_eq!(
        warmed(serde_json::json!({ "image": image, "refresh": true })),
        new.digest()
    );
    // The cache moved the tag: pulls see it too.
    let r = get(
        &format!(
            "{}/v2/{}/manifests/v1",
            registry.base_url(),
            cache_repo(&host, "test/moving")
        ),
        &manifest_headers(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("docker-content-digest"), Some(new.digest()));

    // With the upstream gone, a refresh keeps what the cache holds.
    upstream.stop();
    assert_eq!(
        warmed(serde_json::json!({ "image": image, "refresh": true })),
        new.digest()
    );
    let r = warm(
        &registry.internal_url(),
        serde_json::json!({ "image": image, "refresh": "yes" }),
    );
    assert_eq!(r.status, 400, "{}", r.text());
}
