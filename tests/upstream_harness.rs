//! The upstream side of the pull-through tests, each piece on its own, with real clients and no
//! kache in the path: CNCF distribution (open, htpasswd, token, proxy) round-trips images with
//! skopeo, the token server's tokens are what distribution trusts, the faulty upstream fails in
//! exactly the ways it is told to, and containerd pulls through a hosts.toml mirror entry.

use kache_testkit as support;

use std::cell::Cell;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::containerd::{Containerd, skip_unless_root, write_hosts_toml};
use support::distribution::AccessLogLine;
use support::faulty::{Fault, FaultyUpstream};
use support::http::{request, try_request_within};
use support::image::{
    Content, Flavor, Image, ImageBuilder, assert_bytes_eq, assert_same_blobs, media_type,
    read_dir_layout, sha256_digest, write_oci_layout,
};
use support::token::{Access, TokenServer, decode_claims};
use support::{Distribution, DistributionKind, Skopeo, get, head};
use tempfile::TempDir;

/// How long the access log may lag behind the answer a client already has.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// A scratch dir with an OCI layout of one image, and a skopeo.
struct Env {
    tmp: TempDir,
    skopeo: Skopeo,
    image: Image,
    /// `oci:<layout>:v1`.
    src: String,
    /// Numbers the output dirs.
    pulls: Cell<usize>,
}

impl Env {
    fn new(seed: u64) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kache-e2e-upstream")
            .tempdir()
            .expect("create temp dir");
        let image = ImageBuilder::new(Flavor::Oci)
            .random_layer(seed, &[3000, 200_000])
            .random_layer(seed + 1, &[40_000, 100])
            .build();
        let layout = tmp.path().join("src");
        write_oci_layout(&layout, &[("v1", &image)]);
        let src = format!("oci:{}:v1", path_str(&layout));
        Env {
            tmp,
            skopeo: Skopeo::new(),
            image,
            src,
            pulls: Cell::new(0),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Pushes the image to `dest` (`docker://...`) with the given extra skopeo arguments.
    fn push(&self, dest: &str, extra: &[&str]) {
        self.skopeo.copy(&self.src, dest, extra);
    }

    /// Pulls `src` into a new `dir:` directory and checks that it is the image, blob for blob.
    fn pull_and_check(&self, what: &str, src: &str, extra: &[&str]) {
        let out = self.path(&format!("pulled-{}", self.tmp_count()));
        self.skopeo
            .copy(src, &format!("dir:{}", path_str(&out)), extra);
        assert_same_blobs(what, &self.image, &read_dir_layout(&out).all_by_digest());
    }

    /// A fresh number per call, for unique output dirs.
    fn tmp_count(&self) -> usize {
        self.pulls.set(self.pulls.get() + 1);
        self.pulls.get()
    }

    /// Runs `skopeo copy` expecting failure; returns its stderr.
    fn copy_fails(&self, src: &str, dest: &str, extra: &[&str]) -> String {
        let mut args = vec!["copy", "--src-tls-verify=false", "--dest-tls-verify=false"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[src, dest]);
        let out = self.skopeo.try_run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "skopeo {} succeeded but should have failed\n{stderr}",
            args.join(" ")
        );
        stderr
    }

    fn pull_fails(&self, src: &str, extra: &[&str]) -> String {
        let out = self.path(&format!("not-pulled-{}", self.tmp_count()));
        self.copy_fails(src, &format!("dir:{}", path_str(&out)), extra)
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

fn assert_contains_any(what: &str, text: &str, needles: &[&str]) {
    assert!(
        needles.iter().any(|n| text.contains(n)),
        "{what}: expected one of {needles:?} in:\n{text}"
    );
}

#[test]
fn access_log_lines_parse_in_distributions_format() {
    let line = AccessLogLine::parse(
        r#"127.0.0.1 - - [22/Nov/2026:04:35:59 +0000] "HEAD /v2/foo/blobs/sha256:ab?ns=x HTTP/1.1" 404 157 "" "containerd/1.6.20~ds1 \"q\"""#,
    )
    .expect("parses");
    assert_eq!(line.remote, "127.0.0.1");
    assert_eq!(line.time, "22/Nov/2026:04:35:59 +0000");
    assert_eq!(line.method, "HEAD");
    assert_eq!(line.uri, "/v2/foo/blobs/sha256:ab?ns=x");
    assert_eq!(line.protocol, "HTTP/1.1");
    assert_eq!((line.status, line.size), (404, 157));
    assert_eq!(line.user_agent, r#"containerd/1.6.20~ds1 "q""#);
    assert_eq!(AccessLogLine::parse("time=\"...\" level=info msg=x"), None);
}

#[test]
fn open_distribution_round_trips_and_logs_every_request() {
    let env = Env::new(100);
    let mut registry = Distribution::start(DistributionKind::Open);
    let remote = format!("docker://{}/test/app:v1", registry.host());
    env.push(&remote, &[]);
    env.pull_and_check("pulled from open distribution", &remote, &[]);

    // Manifests are served as pushed, with distribution's headers.
    let base = registry.base_url();
    let url = format!("{base}/v2/test/app/manifests/v1");
    let r = get(&url, &[("Accept", media_type::ACCEPT_ALL_MANIFESTS)]);
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    assert_bytes_eq("manifest", &env.image.manifest.bytes, &r.body);
    assert_eq!(r.header("Docker-Content-Digest"), Some(env.image.digest()));
    assert_eq!(r.header("Content-Type"), Some(media_type::OCI_MANIFEST));
    assert_eq!(
        r.header("Docker-Distribution-Api-Version"),
        Some("registry/2.0")
    );
    // Blobs are octets whatever their media type: the faulty upstream copies this.
    let layer = &env.image.layers[0];
    let url = format!("{base}/v2/test/app/blobs/{}", layer.digest);
    let layer_path = &url[base.len()..];
    let heads = registry.count_requests("HEAD", layer_path);
    let r = head(&url, &[]);
    assert_eq!(r.status, 200, "HEAD {url}");
    assert_eq!(r.header("Content-Type"), Some("application/octet-stream"));
    let length = layer.size().to_string();
    assert_eq!(r.header("Content-Length"), Some(length.as_str()));
    assert!(registry.has_blob(&layer.digest));

    // One access log line per request, parsed.
    assert_eq!(
        registry.wait_for_requests("HEAD", layer_path, heads + 1, LOG_WAIT),
        heads + 1
    );
    assert_eq!(
        registry.count_requests("PUT", "/v2/test/app/manifests/v1"),
        1
    );
    for blob in std::iter::once(&env.image.config).chain(&env.image.layers) {
        let path = format!("/v2/test/app/blobs/{}", blob.digest);
        assert!(
            registry.count_requests("GET", &path) >= 1,
            "no GET {path} in the access log:\n{:#?}",
            registry.access_log_lines()
        );
    }
    let lines = registry.access_log_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.method == "GET" && l.uri == "/v2/" && l.remote == "127.0.0.1"),
        "no GET /v2/ in {lines:#?}"
    );
    assert!(
        lines.iter().all(|l| l.status >= 200 && l.status < 500),
        "{lines:#?}"
    );

    // Stopped, nothing answers; started again, same port, same storage.
    registry.stop();
    let refused = try_request_within(
        Duration::from_secs(2),
        "GET",
        &format!("{base}/v2/"),
        &[],
        &[],
    );
    assert!(
        refused.is_err(),
        "a stopped distribution answered: {refused:?}"
    );
    registry.start_again();
    assert_eq!(registry.base_url(), base);
    env.pull_and_check("pulled after start_again", &remote, &[]);
    let manifest_gets = registry.wait_for_requests("GET", "/v2/test/app/manifests/v1", 2, LOG_WAIT);
    assert!(
        manifest_gets >= 2,
        "the access log lost lines across the restart"
    );
}

#[test]
fn htpasswd_distribution_takes_only_the_right_credentials() {
    let env = Env::new(200);
    let registry = Distribution::start(DistributionKind::htpasswd("alice", "s3cret pass"));
    let remote = format!("docker://{}/test/app:v1", registry.host());

    let r = get(&format!("{}/v2/", registry.base_url()), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("WWW-Authenticate"),
        Some(r#"Basic realm="kache-test""#)
    );

    let denied = ["authentication required", "unauthorized", "401"];
    let stderr = env.copy_fails(&env.src, &remote, &[]);
    assert_contains_any("push without credentials", &stderr, &denied);
    let stderr = env.copy_fails(&env.src, &remote, &["--dest-creds", "alice:wrong"]);
    assert_contains_any("push with a wrong password", &stderr, &denied);

    env.push(&remote, &["--dest-creds", "alice:s3cret pass"]);
    env.pull_and_check(
        "pulled with Basic credentials",
        &remote,
        &["--src-creds", "alice:s3cret pass"],
    );
    let stderr = env.pull_fails(&remote, &["--src-creds", "alice:wrong"]);
    assert_contains_any("pull with a wrong password", &stderr, &denied);
    let stderr = env.pull_fails(&remote, &["--src-creds", "mallory:s3cret pass"]);
    assert_contains_any("pull as an unknown user", &stderr, &denied);
    let stderr = env.pull_fails(&remote, &[]);
    assert_contains_any("pull without credentials", &stderr, &denied);
}

#[test]
fn token_distribution_trusts_exactly_the_token_servers_grants() {
    let env = Env::new(300);
    let tokens = TokenServer::start("kache-test-registry");
    tokens.add_user("alice", "alice-pw", &[("*", &["pull", "push"])]);
    tokens.add_user("bob", "bob-pw", &[("test/*", &["pull"])]);
    tokens.allow_anonymous(&[("public/*", &["pull"])]);
    let registry = Distribution::start(DistributionKind::Token(tokens.distribution_auth()));
    let base = registry.base_url();
    let remote = format!("docker://{}/test/app:v1", registry.host());

    let r = get(&format!("{base}/v2/"), &[]);
    assert_eq!(r.status, 401);
    let challenge = format!(
        r#"Bearer realm="{}",service="kache-test-registry""#,
        tokens.realm()
    );
    assert_eq!(r.header("WWW-Authenticate"), Some(challenge.as_str()));

    // alice pushes: the token server is asked for pull,push on the repository and grants it.
    env.push(&remote, &["--dest-creds", "alice:alice-pw"]);
    let scope = "repository:test/app:pull,push";
    let asked: Vec<_> = tokens
        .requests()
        .into_iter()
        .filter(|r| r.scopes.iter().any(|s| s == scope))
        .collect();
    assert!(
        !asked.is_empty(),
        "no token request for {scope}: {:#?}",
        tokens.requests()
    );
    for r in &asked {
        assert_eq!(r.user.as_deref(), Some("alice"));
        assert_eq!(r.service.as_deref(), Some("kache-test-registry"));
        assert_eq!(r.status, 200);
        assert!(
            r.granted
                .contains(&Access::repository("test/app", &["pull", "push"])),
            "{r:?}"
        );
    }

    // bob may pull test/* but not push.
    let before = tokens.request_count();
    env.pull_and_check("bob pulls", &remote, &["--src-creds", "bob:bob-pw"]);
    assert!(
        tokens.request_count() > before,
        "bob's pull asked for no token"
    );
    assert!(tokens.count_scope("repository:test/app:pull") >= 1);
    let bob_push = format!("docker://{}/test/app:bob", registry.host());
    let stderr = env.copy_fails(&env.src, &bob_push, &["--dest-creds", "bob:bob-pw"]);
    assert_contains_any(
        "bob pushes",
        &stderr,
        &["denied", "authentication required", "unauthorized"],
    );
    let bobs = tokens.requests();
    let bobs: Vec<_> = bobs
        .iter()
        .filter(|r| r.user.as_deref() == Some("bob"))
        .collect();
    assert!(
        bobs.iter()
            .flat_map(|r| &r.granted)
            .all(|a| a.actions == ["pull"]),
        "bob was granted more than pull: {bobs:#?}"
    );

    // A wrong password is refused by the token server itself; no credentials get nothing here.
    let stderr = env.pull_fails(&remote, &["--src-creds", "alice:nope"]);
    assert_contains_any(
        "wrong password",
        &stderr,
        &["unauthorized", "invalid username or password", "401"],
    );
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.user.as_deref() == Some("alice") && r.status == 401),
        "the token server did not refuse alice's wrong password"
    );
    let stderr = env.pull_fails(&remote, &[]);
    assert_contains_any(
        "anonymous pull of test/app",
        &stderr,
        &["authentication required", "unauthorized", "denied"],
    );

    // Anonymous clients may pull public/*.
    let public = format!("docker://{}/public/app:v1", registry.host());
    env.push(&public, &["--dest-creds", "alice:alice-pw"]);
    env.pull_and_check("anonymous pull of public/app", &public, &[]);
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.user.is_none() && r.granted == [Access::repository("public/app", &["pull"])]),
        "{:#?}",
        tokens.requests()
    );

    // What distribution checks: the x5c chain must lead to its bundle, and the access claim
    // must cover the request. A token server with another CA is not trusted at all.
    let url = format!("{base}/v2/test/app/manifests/v1");
    let accept = ("Accept", media_type::ACCEPT_ALL_MANIFESTS);
    let pull = [Access::repository("test/app", &["pull"])];
    let bearer = |token: &str| format!("Bearer {token}");

    let token = tokens.issue("carol", &pull);
    let claims = decode_claims(&token);
    assert_eq!(claims["aud"], "kache-test-registry");
    assert_eq!(claims["iss"], tokens.issuer());
    assert_eq!(claims["sub"], "carol");
    assert_eq!(
        claims["access"],
        serde_json::json!([{"type": "repository", "name": "test/app", "actions": ["pull"]}])
    );
    let r = get(&url, &[accept, ("Authorization", &bearer(&token))]);
    assert_eq!(
        r.status,
        200,
        "a token from the trusted server: {}",
        r.text()
    );
    assert_bytes_eq(
        "manifest with a bearer token",
        &env.image.manifest.bytes,
        &r.body,
    );

    let elsewhere = tokens.issue("carol", &[Access::repository("other/app", &["pull"])]);
    let r = get(&url, &[accept, ("Authorization", &bearer(&elsewhere))]);
    assert_eq!(
        r.status,
        401,
        "a token for another repository: {}",
        r.text()
    );

    let rogue = TokenServer::start("kache-test-registry");
    let forged = rogue.issue("carol", &pull);
    assert_eq!(decode_claims(&forged)["iss"], tokens.issuer());
    let r = get(&url, &[accept, ("Authorization", &bearer(&forged))]);
    assert_eq!(
        r.status,
        401,
        "a token signed under another CA: {}",
        r.text()
    );
    assert!(
        registry.logs().contains(
            "unable to verify certificate chain: x509: certificate signed by unknown authority"
        ),
        "distribution refused the forged token for another reason than its x5c chain:\n{}",
        registry.logs()
    );
}

#[test]
fn proxy_distribution_pulls_through_from_another_distribution() {
    let env = Env::new(400);
    let upstream = Distribution::start(DistributionKind::Open);
    env.push(&format!("docker://{}/test/app:v1", upstream.host()), &[]);
    let proxy = Distribution::start(DistributionKind::proxy(&upstream.base_url()));
    let through = format!("docker://{}/test/app:v1", proxy.host());

    let digest = &env.image.layers[1].digest;
    let layer = format!("/v2/test/app/blobs/{digest}");
    let before = upstream.count_requests("GET", &layer);
    env.pull_and_check("pulled through the proxy", &through, &[]);
    // distribution 2.8 fetches a cold blob twice for one client: once in the background to
    // store it, once to stream it to the client. This is the reference kache is compared with.
    let cold = upstream.wait_for_requests("GET", &layer, before + 2, LOG_WAIT);
    assert_eq!(
        cold,
        before + 2,
        "the cold pull fetched the layer {} times",
        cold - before
    );
    assert!(proxy.count_requests("GET", &layer) >= 1);

    // Warm, once the background copy is stored: the proxy does not fetch the blob again.
    let deadline = Instant::now() + LOG_WAIT;
    while !proxy.has_blob(digest) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.has_blob(digest), "the proxy never stored {digest}");
    env.pull_and_check("pulled through the proxy again", &through, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        upstream.count_requests("GET", &layer),
        cold,
        "the warm pull fetched the layer upstream again"
    );
    assert!(proxy.count_requests("GET", &layer) >= 2);
}

/// An image with one big, incompressible layer (for mid-body faults) and one small one.
fn faulty_image() -> Image {
    ImageBuilder::new(Flavor::Oci)
        .random_layer(500, &[1, 600_000])
        .random_layer(501, &[1, 12_000])
        .build()
}

#[test]
fn faulty_upstream_serves_like_a_registry_until_told_otherwise() {
    let env = Env::new(0);
    let image = faulty_image();
    let upstream = FaultyUpstream::start("library/app", "v1", &image);
    let base = upstream.base_url();

    let r = get(&format!("{base}/v2/"), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Docker-Distribution-Api-Version"),
        Some("registry/2.0")
    );

    let url = format!("{base}{}", upstream.manifest_path("v1"));
    for r in [get(&url, &[]), head(&url, &[])] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Type"), Some(media_type::OCI_MANIFEST));
        assert_eq!(r.header("Docker-Content-Digest"), Some(image.digest()));
        let length = image.manifest.size().to_string();
        assert_eq!(r.header("Content-Length"), Some(length.as_str()));
        assert_eq!(
            r.header("Docker-Distribution-Api-Version"),
            Some("registry/2.0")
        );
    }
    let by_digest = format!("{base}{}", upstream.manifest_path(image.digest()));
    assert_bytes_eq(
        "manifest by digest",
        &image.manifest.bytes,
        &get(&by_digest, &[]).body,
    );
    let missing = format!("{base}{}", upstream.manifest_path("v2"));
    assert_eq!(
        get(&missing, &[]).json()["errors"][0]["code"],
        "MANIFEST_UNKNOWN"
    );
    let other = format!("{base}/v2/library/other/manifests/v1");
    assert_eq!(get(&other, &[]).json()["errors"][0]["code"], "NAME_UNKNOWN");

    // A real client pulls the image from it, blob for blob.
    let out = env.path("pulled");
    env.skopeo.copy(
        &format!("docker://{}/library/app:v1", upstream.host()),
        &format!("dir:{}", path_str(&out)),
        &[],
    );
    assert_same_blobs(
        "pulled from the faulty upstream",
        &image,
        &read_dir_layout(&out).all_by_digest(),
    );
    assert!(upstream.count_requests("GET", &upstream.manifest_path("v1")) >= 2);
    for layer in &image.layers {
        assert!(upstream.count_requests("GET", &upstream.blob_path(&layer.digest)) >= 1);
    }

    // Ranges, as distribution answers them.
    let layer = &image.layers[0];
    let url = format!("{base}{}", upstream.blob_path(&layer.digest));
    let r = get(&url, &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, layer.bytes[10..20]);
    let range = format!("bytes 10-19/{}", layer.size());
    assert_eq!(r.header("Content-Range"), Some(range.as_str()));
}

#[test]
fn faulty_upstream_answers_each_fault_as_configured() {
    let image = faulty_image();
    let mut upstream = FaultyUpstream::start("library/app", "v1", &image);
    let base = upstream.base_url();
    let big = &image.layers[0];
    let small = &image.layers[1];
    let big_path = upstream.blob_path(&big.digest);
    let small_url = format!("{base}{}", upstream.blob_path(&small.digest));
    let manifest_url = format!("{base}{}", upstream.manifest_path("v1"));

    // 500 on GET and HEAD, every time.
    upstream.fail(&small.digest, Fault::Status(500));
    for method in ["GET", "HEAD", "GET"] {
        let r = request(method, &small_url, &[], &[]);
        assert_eq!(r.status, 500, "{method} {small_url}");
    }
    assert_eq!(get(&small_url, &[]).json()["errors"][0]["code"], "UNKNOWN");
    upstream.clear(&small.digest);
    assert_eq!(get(&small_url, &[]).status, 200);

    // 429 with Retry-After: 7, on the tag.
    upstream.fail("v1", Fault::TooManyRequests);
    let r = get(&manifest_url, &[]);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("Retry-After"), Some("7"));
    assert_eq!(r.json()["errors"][0]["code"], "TOOMANYREQUESTS");
    upstream.clear("v1");

    // A limited fault: twice 503, then served.
    upstream.fail_times("v1", Fault::Status(503), 2);
    let statuses: Vec<u16> = (0..3).map(|_| get(&manifest_url, &[]).status).collect();
    assert_eq!(statuses, [503, 503, 200]);

    // Wrong bytes: same length, same headers, another digest.
    upstream.fail(&small.digest, Fault::WrongBytes);
    let r = get(&small_url, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Docker-Content-Digest"),
        Some(small.digest.as_str())
    );
    assert_eq!(r.body.len(), small.size());
    assert_ne!(sha256_digest(&r.body), small.digest, "the bytes were right");
    upstream.clear(&small.digest);

    // A slow drip: all the bytes, in no less time than the pauses add up to.
    let every = Duration::from_millis(40);
    let chunk = small.size().div_ceil(5);
    upstream.fail(&small.digest, Fault::SlowDrip { chunk, every });
    let started = Instant::now();
    let r = get(&small_url, &[]);
    let took = started.elapsed();
    assert_eq!(r.status, 200);
    assert_bytes_eq("dripped blob", &small.bytes, &r.body);
    assert!(
        took >= every * 5,
        "5 chunks with {every:?} pauses took {took:?}"
    );
    upstream.clear(&small.digest);

    // A reset: the full Content-Length is announced, 1000 bytes arrive, then the connection
    // closes. Read with a raw socket to see exactly that.
    upstream.fail(&big.digest, Fault::Reset { after: 1000 });
    let (head, body) = raw_get(upstream.addr(), &big_path);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length = format!("content-length: {}", big.size());
    assert!(head.to_ascii_lowercase().contains(&length), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body.len(), 1000, "bytes before the reset");
    assert_eq!(body, big.bytes[..1000]);
    // An ordinary client sees an error, not a short success.
    let r = try_request_within(
        Duration::from_secs(10),
        "GET",
        &format!("{base}{big_path}"),
        &[],
        &[],
    );
    assert!(r.is_err(), "a reset body read as a whole answer: {r:?}");
    upstream.clear(&big.digest);
    assert_bytes_eq(
        "after clear",
        &big.bytes,
        &get(&format!("{base}{big_path}"), &[]).body,
    );

    // Requests are counted per path, faults recorded.
    let seen = upstream.requests();
    assert!(
        seen.iter()
            .any(|r| r.fault == Some(Fault::Reset { after: 1000 }) && r.uri == big_path)
    );
    assert_eq!(
        upstream.count_requests("HEAD", &upstream.blob_path(&small.digest)),
        1
    );
    assert_eq!(
        upstream.count_requests("GET", &upstream.manifest_path("v1")),
        4
    );

    // Down, then back on the same port with the same record.
    upstream.stop();
    let down = try_request_within(Duration::from_secs(2), "GET", &manifest_url, &[], &[]);
    assert!(down.is_err(), "a stopped upstream answered: {down:?}");
    upstream.start_again();
    assert_eq!(get(&manifest_url, &[]).status, 200);
    assert_eq!(
        upstream.count_requests("GET", &upstream.manifest_path("v1")),
        5
    );
}

/// `GET path` over a plain socket: the response head and every body byte until the server
/// closes the connection (or 10 s pass).
fn raw_get(addr: std::net::SocketAddr, path: &str) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut received = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // A reset instead of a close ends the body the same way.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading {path}: {e}"),
        }
    }
    let split = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no response head in {:?}",
                String::from_utf8_lossy(&received)
            )
        });
    let head = String::from_utf8_lossy(&received[..split]).into_owned();
    (head, received[split + 4..].to_vec())
}

#[test]
fn containerd_pulls_through_a_hosts_toml_mirror() {
    if skip_unless_root("containerd_pulls_through_a_hosts_toml_mirror") {
        return;
    }
    let env = Env::new(600);
    let registry = Distribution::start(DistributionKind::Open);
    env.push(&format!("docker://{}/test/app:v1", registry.host()), &[]);

    let containerd = Containerd::start();
    // The image's own registry is a port nobody listens on: the pull can only succeed through
    // the mirror entry, which is the distribution above.
    let dead = support::registry::free_local_addr();
    let hosts = containerd.scratch_dir("certs.d");
    let hosts_toml = write_hosts_toml(
        &hosts,
        &dead.to_string(),
        &format!("http://{dead}"),
        &registry.base_url(),
    );
    let written = std::fs::read_to_string(&hosts_toml).expect("read hosts.toml");
    assert!(
        written.contains(&format!("[host.\"{}\"]", registry.base_url())),
        "{written}"
    );

    let image_ref = format!("{dead}/test/app:v1");
    let out = containerd.pull(&image_ref, &hosts);
    eprintln!("ctr images pull:\n{}{}", out.stdout, out.stderr);
    let pulled = containerd
        .image(&image_ref)
        .unwrap_or_else(|| panic!("{image_ref} not in {:?}", containerd.images()));
    assert_eq!(pulled.digest, env.image.digest());

    // The mirror saw the pull, told which registry it was for.
    // containerd percent-encodes the colon of host:port in the ns parameter.
    let ns = format!("ns={}", dead.to_string().replace(':', "%3A"));
    let manifest_gets = registry.wait_for_requests("GET", &ns, 1, LOG_WAIT);
    assert!(
        manifest_gets >= 1,
        "no request carried {ns}: {:#?}",
        registry.access_log_lines()
    );
    for layer in &env.image.layers {
        let path = format!("/v2/test/app/blobs/{}", layer.digest);
        assert!(
            registry.wait_for_requests("GET", &path, 1, LOG_WAIT) >= 1,
            "containerd did not fetch {path} from the mirror: {:#?}",
            registry.access_log_lines()
        );
    }
    let user_agents: Vec<String> = registry
        .access_log_lines()
        .into_iter()
        .filter(|l| l.uri.contains(&ns))
        .map(|l| l.user_agent)
        .collect();
    assert!(
        user_agents.iter().all(|ua| ua.starts_with("containerd/")),
        "{user_agents:?}"
    );

    containerd.remove_image(&image_ref);
    assert_eq!(containerd.image(&image_ref), None);
}
