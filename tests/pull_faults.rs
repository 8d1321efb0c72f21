//! Pull-through against an upstream that misbehaves on purpose (support::faulty): a connection
//! reset mid-blob, wrong bytes for the digest, a slow drip, 500s and 429s. Whatever happens, a
//! client of `kache registry` gets an error or the right bytes, never a complete answer with
//! wrong bytes; nothing bad is kept (every stored file re-hashed, `kache fsck` after stopping);
//! and once the upstream behaves, the same pull works.

use kache_testkit as support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::http::{Streamed, get_streamed, try_request_within};
use support::image::{Content, Flavor, Image, ImageBuilder, assert_bytes_eq};
use support::pull::{Scratch, assert_spec_error, cache_repo, manifest_headers};
use support::registry::{fsck, stored_blobs};
use support::{Fault, FaultyUpstream, KacheProxy, KacheRegistry, get, head};

/// Bound on one request in these tests; the slowest (a drip) takes about 2 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An image with one big, incompressible layer (faults mid-body land well inside it) and one
/// small one.
fn faulty_image() -> Image {
    ImageBuilder::new(Flavor::Oci)
        .random_layer(700, &[1, 600_000])
        .random_layer(701, &[1, 12_000])
        .build()
}

/// A faulty upstream serving `library/app:v1` and a kache registry caching it.
struct Env {
    _scratch: Scratch,
    image: Image,
    upstream: FaultyUpstream,
    registry: KacheRegistry,
    /// `127.0.0.1_<port>/library/app`.
    repo: String,
}

impl Env {
    fn start(prefix: &str, extra_args: &[&str]) -> Self {
        let scratch = Scratch::new(prefix);
        let image = faulty_image();
        let upstream = FaultyUpstream::start("library/app", "v1", &image);
        let host = upstream.host();
        let mut args = vec!["--insecure-registry", host.as_str()];
        args.extend_from_slice(extra_args);
        let registry = KacheRegistry::start_with_args(scratch.path("data"), &args);
        let repo = cache_repo(&host, "library/app");
        Env {
            _scratch: scratch,
            image,
            upstream,
            registry,
            repo,
        }
    }

    fn big(&self) -> &support::Blob {
        &self.image.layers[0]
    }

    fn blob_url(&self, digest: &str) -> String {
        format!(
            "{}/v2/{}/blobs/{digest}",
            self.registry.base_url(),
            self.repo
        )
    }

    fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}/v2/{}/manifests/{reference}",
            self.registry.base_url(),
            self.repo
        )
    }

    /// GETs the upstream received for `digest`'s blob.
    fn upstream_gets(&self, digest: &str) -> usize {
        self.upstream
            .count_requests("GET", &self.upstream.blob_path(digest))
    }

    fn stored(&self, digest: &str) -> bool {
        stored_blobs(self.registry.data_dir()).contains_key(digest)
    }

    /// The blob is served whole and right, and was fetched upstream exactly `upstream_gets`
    /// times in all (so a failed attempt left nothing that was served instead).
    fn assert_serves(&self, digest: &str, expected: &[u8], upstream_gets: usize) {
        let r = get(&self.blob_url(digest), &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_bytes_eq(&format!("blob {digest}"), expected, &r.body);
        assert_eq!(self.upstream_gets(digest), upstream_gets, "upstream GETs");
        let again = get(&self.blob_url(digest), &[]);
        assert_eq!(again.header("X-Kache-Cache"), Some("hit"));
        assert_bytes_eq("cached blob", expected, &again.body);
        assert_eq!(
            self.upstream_gets(digest),
            upstream_gets,
            "a hit went upstream"
        );
    }

    /// Stops kache and checks the store: `kache fsck` finds nothing bad, and every file is a
    /// blob of the image whose bytes match its name.
    fn finish(mut self) {
        self.registry.stop();
        let report = fsck(self.registry.data_dir());
        assert!(report.success && report.bad == 0, "{}", report.output);
        let known: Vec<&str> = self
            .image
            .blobs()
            .iter()
            .map(|b| b.digest.as_str())
            .collect();
        for digest in stored_blobs(self.registry.data_dir()).keys() {
            assert!(
                known.contains(&digest.as_str()),
                "the store holds {digest}, which the image does not"
            );
        }
    }
}

/// Fails the test unless `got` is an error to the client: an error status, or a 200 whose body
/// broke off before its end. A 200 with a whole body is never right for these faults.
fn assert_client_error(what: &str, got: &Streamed, full_size: usize) {
    if got.status >= 400 {
        return;
    }
    assert_eq!(got.status, 200, "{what}: {got:?}");
    assert!(
        got.error.is_some(),
        "{what}: a complete 200 answer ({} bytes, {}) instead of an error",
        got.size,
        got.digest
    );
    assert!(
        got.size < full_size as u64,
        "{what}: all {} bytes arrived before the answer broke off",
        got.size
    );
}

#[test]
fn a_reset_mid_blob_is_a_client_error_and_nothing_is_cached() {
    let env = Env::start("kache-e2e-reset", &[]);
    let big = env.big().clone();
    env.upstream
        .fail(&big.digest, Fault::Reset { after: 100_000 });

    match get_streamed(&env.blob_url(&big.digest), REQUEST_TIMEOUT) {
        Ok(got) => assert_client_error("blob reset by the upstream", &got, big.size()),
        // No answer at all is an error too.
        Err(e) => eprintln!("blob reset by the upstream: no answer ({e})"),
    }
    assert_eq!(env.upstream_gets(&big.digest), 1);
    assert!(!env.stored(&big.digest), "a reset blob was stored");

    env.upstream.clear(&big.digest);
    env.assert_serves(&big.digest, &big.bytes, 2);
    env.finish();
}

#[test]
fn wrong_bytes_for_the_digest_are_never_served_whole_nor_cached() {
    let env = Env::start("kache-e2e-wrong", &[]);
    let big = env.big().clone();
    env.upstream.fail(&big.digest, Fault::WrongBytes);

    // A client that reads the whole answer sees an error...
    let whole = try_request_within(REQUEST_TIMEOUT, "GET", &env.blob_url(&big.digest), &[], &[]);
    if let Ok(r) = &whole {
        assert!(
            r.status >= 400,
            "a complete {} answer of {} bytes for a blob the upstream lied about",
            r.status,
            r.body.len()
        );
    }
    // ...and one that reads as it arrives gets no more than a broken-off body.
    match get_streamed(&env.blob_url(&big.digest), REQUEST_TIMEOUT) {
        Ok(got) => assert_client_error("blob with wrong bytes", &got, big.size()),
        Err(e) => eprintln!("blob with wrong bytes: no answer ({e})"),
    }
    assert!(
        !env.stored(&big.digest),
        "a blob with wrong bytes was stored"
    );

    // A manifest whose bytes do not match the digest the upstream announced is refused too.
    env.upstream.fail("v1", Fault::WrongBytes);
    let r = get(&env.manifest_url("v1"), &manifest_headers());
    assert_spec_error("manifest with wrong bytes", &r, &[502, 503], "UNAVAILABLE");
    env.upstream.fail(env.image.digest(), Fault::WrongBytes);
    let r = get(&env.manifest_url(env.image.digest()), &manifest_headers());
    assert_spec_error(
        "manifest by digest with wrong bytes",
        &r,
        &[502, 503],
        "UNAVAILABLE",
    );
    assert!(
        !env.stored(env.image.digest()),
        "a lying manifest was stored"
    );
    // The tag list is the upstream's own, nothing the lie added.
    let tags = get(
        &format!("{}/v2/{}/tags/list", env.registry.base_url(), env.repo),
        &[],
    );
    assert_eq!(tags.status, 200, "{}", tags.text());
    assert_eq!(
        tags.json()["tags"],
        serde_json::json!(["v1"]),
        "tags after a lie"
    );

    env.upstream.clear_all();
    let r = get(&env.manifest_url("v1"), &manifest_headers());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_bytes_eq("manifest", &env.image.manifest.bytes, &r.body);
    let before = env.upstream_gets(&big.digest);
    env.assert_serves(&big.digest, &big.bytes, before + 1);
    env.finish();
}

#[test]
fn a_slow_drip_streams_the_first_bytes_before_the_blob_is_complete() {
    let env = Env::start("kache-e2e-drip", &[]);
    let big = env.big().clone();
    // 20 pieces 100 ms apart: the whole blob needs at least 2 s to arrive.
    let every = Duration::from_millis(100);
    let chunk = big.size().div_ceil(20);
    env.upstream
        .fail(&big.digest, Fault::SlowDrip { chunk, every });

    let got = get_streamed(&env.blob_url(&big.digest), REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("dripped blob: no answer: {e}"));
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.error, None, "the dripped blob broke off");
    assert_eq!(got.digest, big.digest, "the dripped blob arrived wrong");
    assert!(
        got.total >= every * 19,
        "the drip took only {:?}",
        got.total
    );
    let first = got.first_byte.expect("a first byte");
    // Streamed while fetched: many drip pauses lie between the first byte and the last.
    assert!(
        first + every * 5 <= got.total,
        "first byte after {first:?} of {:?}: the blob was not streamed while fetched",
        got.total
    );

    env.upstream.clear(&big.digest);
    let started = Instant::now();
    env.assert_serves(&big.digest, &big.bytes, 1);
    assert!(
        started.elapsed() < every * 20,
        "the cached blob was not served from the store"
    );

    // The first client leaves after its first bytes; the one fetch goes on, and a client
    // arriving after that still gets every byte from it.
    let small = env.image.layers[1].clone();
    let chunk = small.size().div_ceil(10);
    env.upstream
        .fail(&small.digest, Fault::SlowDrip { chunk, every });
    let path = format!("/v2/{}/blobs/{}", env.repo, small.digest);
    let first = first_body_bytes(env.registry.addr(), &path);
    assert!(!first.is_empty());
    let got = get_streamed(&env.blob_url(&small.digest), REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("blob after the first client left: no answer: {e}"));
    assert_eq!((got.status, got.error.as_deref()), (200, None), "{got:?}");
    assert_eq!(got.digest, small.digest);
    assert_eq!(
        env.upstream_gets(&small.digest),
        1,
        "the fetch was started again"
    );
    env.finish();
}

/// Sends `GET path` on a raw connection, reads until the first body bytes arrive, and closes
/// the connection: a client that goes away mid-blob. Returns the body bytes it saw.
fn first_body_bytes(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut received = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let n = stream.read(&mut buf).expect("read the answer");
        assert!(
            n > 0,
            "closed before any body byte: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            if received.len() > end + 4 {
                return received.split_off(end + 4);
            }
        }
    }
    panic!("no body byte of {path} within 10 s");
}

#[test]
fn upstream_500s_are_unavailable_to_the_client_and_not_cached() {
    let env = Env::start("kache-e2e-500", &[]);
    let big = env.big().clone();
    env.upstream.fail(&big.digest, Fault::Status(500));
    env.upstream.fail("v1", Fault::Status(500));

    for attempt in 1..=2 {
        let r = get(&env.blob_url(&big.digest), &[]);
        assert_spec_error("blob on a 500", &r, &[502, 503], "UNAVAILABLE");
        // A failure is not remembered: each pull asks the upstream again.
        assert_eq!(env.upstream_gets(&big.digest), attempt);
        let r = get(&env.manifest_url("v1"), &manifest_headers());
        assert_spec_error("manifest on a 500", &r, &[502, 503], "UNAVAILABLE");
    }
    // A HEAD answers from the cache alone (pushing clients ask it): not cached is 404, and
    // the failing upstream is not asked.
    let r = head(&env.blob_url(&big.digest), &[]);
    assert_eq!(r.status, 404, "HEAD of an uncached blob");
    assert_eq!(env.upstream_gets(&big.digest), 2);
    assert!(!env.stored(&big.digest));
    assert!(stored_blobs(env.registry.data_dir()).is_empty());

    env.upstream.clear_all();
    let r = get(&env.manifest_url("v1"), &manifest_headers());
    assert_eq!(r.status, 200, "{}", r.text());
    let before = env.upstream_gets(&big.digest);
    env.assert_serves(&big.digest, &big.bytes, before + 1);
    env.finish();
}

#[test]
fn upstream_429_reaches_the_client_with_retry_after_and_a_stale_tag_is_served() {
    let env = Env::start("kache-e2e-429", &["--tag-ttl", "1s"]);
    let proxy = KacheProxy::start(
        &env.registry.base_url(),
        &["--insecure-registry", &env.upstream.host()],
    );
    let big = env.big().clone();
    env.upstream.fail(&big.digest, Fault::TooManyRequests);
    env.upstream.fail("v1", Fault::TooManyRequests);

    let path = format!("/v2/{}/manifests/v1", env.repo);
    for base in [env.registry.base_url(), proxy.base_url()] {
        let r = get(&format!("{base}{path}"), &manifest_headers());
        assert_spec_error(
            &format!("manifest on a 429 from {base}"),
            &r,
            &[429],
            "TOOMANYREQUESTS",
        );
        assert_eq!(r.header("Retry-After"), Some("7"), "from {base}");
        let r = get(&format!("{base}/v2/{}/blobs/{}", env.repo, big.digest), &[]);
        assert_spec_error(
            &format!("blob on a 429 from {base}"),
            &r,
            &[429],
            "TOOMANYREQUESTS",
        );
        assert_eq!(r.header("Retry-After"), Some("7"), "from {base}");
    }
    assert!(stored_blobs(env.registry.data_dir()).is_empty());

    // Cached, then past the 1 s TTL (tag times are whole seconds): a rate-limited, failing or
    // emptied upstream cannot re-validate the tag, and the cached manifest is served.
    env.upstream.clear_all();
    let r = get(&env.manifest_url("v1"), &manifest_headers());
    assert_eq!(r.status, 200, "{}", r.text());
    // A wait for a clock condition, not for something to happen: the tag was stored before
    // `cached`, so 1.1 s later whole-second tag times make it older than the TTL.
    let cached = Instant::now();
    std::thread::sleep(
        (cached + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
    );
    for fault in [
        Fault::TooManyRequests,
        Fault::Status(500),
        Fault::Status(404),
    ] {
        env.upstream.fail("v1", fault.clone());
        let heads = env
            .upstream
            .count_requests("HEAD", &env.upstream.manifest_path("v1"));
        let r = get(&env.manifest_url("v1"), &manifest_headers());
        assert_eq!(r.status, 200, "stale tag on {fault:?}: {}", r.text());
        assert_eq!(r.header("X-Kache-Cache"), Some("stale"), "{fault:?}");
        assert_bytes_eq("stale manifest", &env.image.manifest.bytes, &r.body);
        assert!(
            env.upstream
                .count_requests("HEAD", &env.upstream.manifest_path("v1"))
                > heads,
            "the stale tag was not re-validated upstream on {fault:?}"
        );
    }
    drop(proxy);
    env.finish();
}
