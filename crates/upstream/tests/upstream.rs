//! The upstream client against small registries and token servers served on 127.0.0.1.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use futures_util::StreamExt as _;
use kache_oci::credentials::{Credentials, DockerConfig};
use kache_oci::media_type;
use kache_oci::{Digest, Origin, ParsedManifest, Reference};
use kache_testkit::inproc::serve;
use kache_upstream::{Upstream, UpstreamConfig, UpstreamError};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},"layers":[]}"#;

/// The origin `path` on `registry`.
fn o(registry: impl AsRef<str>, path: &str) -> Origin {
    Origin::new(registry.as_ref(), path.parse().unwrap()).unwrap()
}

/// A tag or digest.
fn tag_or_digest(reference: impl AsRef<str>) -> Reference {
    reference.as_ref().parse().unwrap()
}

fn upstream(cfg: UpstreamConfig) -> Upstream {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Upstream::new(cfg).unwrap()
}

fn plain_http(addrs: &[SocketAddr]) -> UpstreamConfig {
    UpstreamConfig {
        insecure_registries: addrs.iter().map(|a| a.to_string()).collect(),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

fn basic(u: &str, p: &str) -> Credentials {
    Credentials::Basic {
        username: u.into(),
        password: p.into(),
    }
}

fn basic_header(u: &str, p: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
    )
}

fn auth_of(h: &HeaderMap) -> Option<String> {
    h.get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn blob_response(body: &'static [u8]) -> Response {
    (
        [("docker-content-digest", Digest::sha256(body).to_string())],
        body,
    )
        .into_response()
}

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#),
    )
        .into_response()
}

async fn collect(resp: kache_upstream::UpstreamResponse) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = std::pin::pin!(resp.into_stream());
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

#[tokio::test]
async fn anonymous_manifest_get_and_head() {
    let accepts = Arc::new(Mutex::new(
        Vec::<(Method, Option<String>, Option<String>)>::new(),
    ));
    let seen = accepts.clone();
    let app = Router::new().route(
        "/v2/library/nginx/manifests/{reference}",
        get(move |method: Method, headers: HeaderMap| async move {
            seen.lock().unwrap().push((
                method,
                headers
                    .get(header::ACCEPT)
                    .map(|v| v.to_str().unwrap().to_owned()),
                auth_of(&headers),
            ));
            (
                [
                    (header::CONTENT_TYPE, media_type::OCI_MANIFEST.to_owned()),
                    (
                        header::HeaderName::from_static("docker-content-digest"),
                        Digest::sha256(MANIFEST.as_bytes()).to_string(),
                    ),
                ],
                MANIFEST,
            )
        }),
    );
    let addr = serve(app).await;
    let up = upstream(plain_http(&[addr]));
    let registry = addr.to_string();

    let resp = up
        .manifest(
            &o(&registry, "library/nginx"),
            &tag_or_digest("1.27"),
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.content_type(), Some(media_type::OCI_MANIFEST));
    assert_eq!(resp.digest(), Some(Digest::sha256(MANIFEST.as_bytes())));
    assert_eq!(resp.content_length(), Some(MANIFEST.len() as u64));
    let body = resp.bytes_limited(4 << 20).await.unwrap();
    assert_eq!(body, MANIFEST.as_bytes());
    ParsedManifest::parse(&body, None).unwrap();

    let digest = Digest::sha256(MANIFEST.as_bytes()).to_string();
    let resp = up
        .manifest(
            &o(&registry, "library/nginx"),
            &tag_or_digest(&digest),
            true,
            None,
        )
        .await
        .unwrap();
    assert_eq!(resp.content_length(), Some(MANIFEST.len() as u64));
    assert!(collect(resp).await.is_empty(), "HEAD has no body");

    let seen = accepts.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0, Method::GET);
    assert_eq!(seen[1].0, Method::HEAD);
    for (_, accept, auth) in seen.iter() {
        let accept = accept.as_deref().unwrap();
        for mt in media_type::MANIFEST_TYPES {
            assert!(accept.contains(mt), "{mt} missing from {accept}");
        }
        assert_eq!(auth, &None);
    }

    // What could change a URL's meaning cannot even be said: the typed origin and reference
    // refuse it before any request.
    assert!("bad tag!".parse::<kache_oci::Reference>().is_err());
    for reg in ["user@127.0.0.1", "127.0.0.1:1?x="] {
        assert!(
            Origin::new(reg, "library/nginx".parse().unwrap()).is_err(),
            "{reg}"
        );
    }
    for repo in ["../etc", "Library/nginx"] {
        assert!(repo.parse::<kache_oci::RepoName>().is_err(), "{repo}");
    }
}

#[derive(Default)]
struct Counters {
    registry: AtomicUsize,
    tokens: AtomicUsize,
}

#[tokio::test]
async fn basic_auth_is_answered_then_sent_up_front() {
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let app = Router::new().route(
        "/v2/o/a/blobs/{digest}",
        get(move |headers: HeaderMap| async move {
            c.registry.fetch_add(1, Ordering::SeqCst);
            if auth_of(&headers) == Some(basic_header("bob", "pw")) {
                blob_response(b"layer")
            } else {
                let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "login first");
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(r#"Basic realm="fake""#),
                );
                r
            }
        }),
    );
    let addr = serve(app).await;
    let creds = DockerConfig::from_json(
        format!(r#"{{"auths":{{"http://{addr}/v2/":{{"username":"bob","password":"pw"}}}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    let up = upstream(UpstreamConfig {
        credentials: creds,
        ..plain_http(&[addr])
    });
    let registry = addr.to_string();
    let digest = Digest::sha256(b"layer");

    let resp = up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    assert_eq!(collect(resp).await, b"layer");
    assert_eq!(
        counters.registry.load(Ordering::SeqCst),
        2,
        "401, then Basic"
    );
    let resp = up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    assert_eq!(resp.digest(), Some(digest.clone()));
    assert_eq!(
        counters.registry.load(Ordering::SeqCst),
        3,
        "Basic up front"
    );

    let err = up
        .blob(&o(&registry, "o/a"), &digest, Some(&basic("bob", "wrong")))
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Unauthorized(m) => assert!(m.contains("login first"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!err.is_unavailable());

    // Without credentials there is nothing to answer the challenge with.
    let bare = upstream(plain_http(&[addr]));
    let err = bare
        .blob(&o(&registry, "o/a"), &digest, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Unauthorized(_)), "{err}");
}

/// A registry that wants bearer tokens from its own `/token` realm.
struct BearerFake {
    addr: SocketAddr,
    counters: Arc<Counters>,
    issued: Arc<Mutex<HashSet<String>>>,
    token_auth: Arc<Mutex<Vec<Option<String>>>>,
}

#[derive(Clone)]
struct BearerState {
    counters: Arc<Counters>,
    issued: Arc<Mutex<HashSet<String>>>,
    token_auth: Arc<Mutex<Vec<Option<String>>>>,
    expires_in: u64,
    realm: Arc<Mutex<String>>,
}

async fn bearer_registry(expires_in: u64) -> BearerFake {
    async fn registry(State(s): State<BearerState>, headers: HeaderMap, uri: Uri) -> Response {
        s.counters.registry.fetch_add(1, Ordering::SeqCst);
        let ok = auth_of(&headers)
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned))
            .is_some_and(|t| s.issued.lock().unwrap().contains(&t));
        if !ok {
            let mut r = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "token required");
            let challenge = format!(
                r#"Bearer realm="{}",service="fake, registry",scope="repository:o/a:pull""#,
                s.realm.lock().unwrap()
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&challenge).unwrap(),
            );
            return r;
        }
        if uri.path().contains("/manifests/") {
            ([(header::CONTENT_TYPE, media_type::OCI_MANIFEST)], MANIFEST).into_response()
        } else {
            blob_response(b"secret layer")
        }
    }
    async fn token(
        State(s): State<BearerState>,
        headers: HeaderMap,
        Query(q): Query<Vec<(String, String)>>,
    ) -> Response {
        let n = s.counters.tokens.fetch_add(1, Ordering::SeqCst);
        let auth = auth_of(&headers);
        s.token_auth.lock().unwrap().push(auth.clone());
        let want = [
            ("service".to_owned(), "fake, registry".to_owned()),
            ("scope".to_owned(), "repository:o/a:pull".to_owned()),
        ];
        if q != want {
            return (StatusCode::BAD_REQUEST, format!("bad query {q:?}")).into_response();
        }
        if auth.is_some() && auth != Some(basic_header("alice", "secret")) {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"details":"incorrect username or password"}"#,
            )
                .into_response();
        }
        let t = format!("tok-{n}");
        s.issued.lock().unwrap().insert(t.clone());
        // Both spellings of the field are in use.
        let field = if n % 2 == 0 { "token" } else { "access_token" };
        format!(r#"{{"{field}":"{t}","expires_in":{}}}"#, s.expires_in).into_response()
    }
    let state = BearerState {
        counters: Arc::default(),
        issued: Arc::default(),
        token_auth: Arc::default(),
        expires_in,
        realm: Arc::default(),
    };
    let app = Router::new()
        .route("/token", get(token))
        .route("/v2/o/a/blobs/{digest}", get(registry))
        .route("/v2/o/a/manifests/{reference}", get(registry))
        .with_state(state.clone());
    let addr = serve(app).await;
    *state.realm.lock().unwrap() = format!("http://{addr}/token");
    BearerFake {
        addr,
        counters: state.counters,
        issued: state.issued,
        token_auth: state.token_auth,
    }
}

#[tokio::test]
async fn bearer_tokens_are_fetched_with_scope_and_reused() {
    let fake = bearer_registry(300).await;
    let up = upstream(plain_http(&[fake.addr]));
    let registry = fake.addr.to_string();
    let digest = Digest::sha256(b"secret layer");
    let alice = basic("alice", "secret");
    let tokens = || fake.counters.tokens.load(Ordering::SeqCst);
    let hits = || fake.counters.registry.load(Ordering::SeqCst);

    let resp = up
        .blob(&o(&registry, "o/a"), &digest, Some(&alice))
        .await
        .unwrap();
    assert_eq!(collect(resp).await, b"secret layer");
    assert_eq!((tokens(), hits()), (1, 2));
    let resp = up
        .blob(&o(&registry, "o/a"), &digest, Some(&alice))
        .await
        .unwrap();
    assert_eq!(collect(resp).await, b"secret layer");
    assert_eq!((tokens(), hits()), (1, 3), "the cached token goes up front");
    up.manifest(
        &o(&registry, "o/a"),
        &tag_or_digest("v1"),
        false,
        Some(&alice),
    )
    .await
    .unwrap();
    assert_eq!((tokens(), hits()), (1, 4), "same scope, same token");
    assert_eq!(
        fake.token_auth.lock().unwrap().as_slice(),
        [Some(basic_header("alice", "secret"))]
    );

    // Anonymous pulls get their own token, asked for without credentials.
    up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    assert_eq!(tokens(), 2);
    assert_eq!(fake.token_auth.lock().unwrap()[1], None);

    // A token the registry stopped honouring is replaced once.
    fake.issued.lock().unwrap().clear();
    up.blob(&o(&registry, "o/a"), &digest, Some(&alice))
        .await
        .unwrap();
    assert_eq!(tokens(), 3);

    let err = up
        .blob(
            &o(&registry, "o/a"),
            &digest,
            Some(&basic("alice", "wrong")),
        )
        .await
        .unwrap_err();
    match &err {
        UpstreamError::Unauthorized(m) => {
            assert!(m.contains("incorrect username or password"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tokens(), 4);
}

#[tokio::test]
async fn expired_tokens_are_fetched_again() {
    let fake = bearer_registry(2).await;
    let up = upstream(plain_http(&[fake.addr]));
    let registry = fake.addr.to_string();
    let digest = Digest::sha256(b"secret layer");
    let tokens = || fake.counters.tokens.load(Ordering::SeqCst);

    up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    assert_eq!(tokens(), 1);
    // A 2 s token is used for 1.5 s at most.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    up.blob(&o(&registry, "o/a"), &digest, None).await.unwrap();
    assert_eq!(tokens(), 2);
}

#[tokio::test]
async fn statuses_map_to_errors() {
    let app = Router::new().route(
        "/v2/{*rest}",
        get(|uri: Uri| async move {
            let path = uri.path();
            if path.starts_with("/v2/s/limited/") {
                let mut r = oci_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "pull rate limit",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("17"));
                r
            } else if path.starts_with("/v2/s/broken/") {
                (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
            } else if path.starts_with("/v2/s/denied/") {
                oci_error(StatusCode::FORBIDDEN, "DENIED", "no access")
            } else if path.starts_with("/v2/s/slow/") {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late".into_response()
            } else {
                oci_error(
                    StatusCode::NOT_FOUND,
                    "MANIFEST_UNKNOWN",
                    "manifest unknown",
                )
            }
        }),
    );
    let addr = serve(app).await;
    let up = upstream(plain_http(&[addr]));
    let r = addr.to_string();

    let err = up
        .manifest(&o(&r, "s/limited"), &tag_or_digest("1"), false, None)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        UpstreamError::TooManyRequests {
            retry_after: Some("17".into()),
            message: format!("{r}: TOOMANYREQUESTS: pull rate limit"),
        }
    );
    assert!(err.is_unavailable());

    let err = up
        .manifest(&o(&r, "s/broken"), &tag_or_digest("1"), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Status { status: 500, message } if message.contains("boom")),
        "{err}"
    );
    assert!(err.is_unavailable());

    let err = up
        .manifest(&o(&r, "s/denied"), &tag_or_digest("1"), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Denied(m) if m.contains("no access")),
        "{err}"
    );
    assert!(!err.is_unavailable());

    let err = up
        .manifest(&o(&r, "s/missing"), &tag_or_digest("1"), false, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::NotFound(m) if m.contains("manifest unknown")),
        "{err}"
    );
    let err = up
        .manifest(&o(&r, "s/missing"), &tag_or_digest("1"), true, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::NotFound(_)), "HEAD: {err}");

    let impatient = upstream(UpstreamConfig {
        request_timeout: Duration::from_millis(300),
        ..plain_http(&[addr])
    });
    let err = impatient
        .manifest(&o(&r, "s/slow"), &tag_or_digest("1"), false, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Transport(_)), "{err}");
    assert!(err.is_unavailable());
}

#[tokio::test]
async fn unreachable_and_wrong_scheme_are_transport_errors() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = upstream(plain_http(&[closed]));
    let err = up
        .manifest(
            &o(closed.to_string(), "a/b"),
            &tag_or_digest("1"),
            false,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Transport(m) if m.contains("refused")),
        "{err}"
    );
    assert!(err.is_unavailable());

    // A plain-HTTP registry not listed as insecure is spoken to with TLS, which fails.
    let addr = serve(Router::new().route("/v2/a/b/manifests/1", get(|| async { MANIFEST }))).await;
    let tls_only = upstream(UpstreamConfig::default());
    let err = tls_only
        .manifest(
            &o(addr.to_string(), "a/b"),
            &tag_or_digest("1"),
            false,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Transport(_)), "{err}");
    let listed = upstream(plain_http(&[addr]));
    listed
        .manifest(
            &o(addr.to_string(), "a/b"),
            &tag_or_digest("1"),
            false,
            None,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn manifests_are_read_up_to_a_limit() {
    let big = "x".repeat(10_000);
    let app = Router::new()
        .route("/v2/a/b/manifests/sized", get(move || async move { big }))
        .route(
            "/v2/a/b/manifests/chunked",
            get(|| async {
                let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 1000]));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        );
    let addr = serve(app).await;
    let up = upstream(plain_http(&[addr]));
    let r = addr.to_string();
    for tag in ["sized", "chunked"] {
        let resp = up
            .manifest(&o(&r, "a/b"), &tag_or_digest(tag), false, None)
            .await
            .unwrap();
        assert_eq!(
            resp.bytes_limited(9_999).await.unwrap_err(),
            UpstreamError::TooLarge(9_999),
            "{tag}"
        );
        let resp = up
            .manifest(&o(&r, "a/b"), &tag_or_digest(tag), false, None)
            .await
            .unwrap();
        assert_eq!(
            resp.bytes_limited(10_000).await.unwrap().len(),
            10_000,
            "{tag}"
        );
    }
}

#[tokio::test]
async fn redirects_do_not_carry_credentials_to_another_host() {
    let storage_auth = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let seen = storage_auth.clone();
    let payload: &'static [u8] = Box::leak(vec![7u8; 3 << 20].into_boxed_slice());
    let storage = serve(Router::new().route(
        "/bucket/{key}",
        get(move |headers: HeaderMap, uri: Uri| async move {
            seen.lock().unwrap().push(auth_of(&headers));
            assert_eq!(uri.query(), Some("sig=presigned"));
            payload
        }),
    ))
    .await;
    let registry = serve(Router::new().route(
        "/v2/o/a/blobs/{digest}",
        get(move |headers: HeaderMap| async move {
            if auth_of(&headers) != Some(basic_header("bob", "pw")) {
                let mut r = StatusCode::UNAUTHORIZED.into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=x"),
                );
                return r;
            }
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(
                    header::LOCATION,
                    format!("http://{storage}/bucket/k?sig=presigned"),
                )],
            )
                .into_response()
        }),
    ))
    .await;
    let up = upstream(plain_http(&[registry]));
    let digest = Digest::sha256(payload);
    let resp = up
        .blob(
            &o(registry.to_string(), "o/a"),
            &digest,
            Some(&basic("bob", "pw")),
        )
        .await
        .unwrap();
    assert_eq!(resp.content_length(), Some(payload.len() as u64));
    let mut hasher = kache_oci::Algorithm::Sha256.hasher();
    let mut chunks = 0;
    let mut stream = std::pin::pin!(resp.into_stream());
    while let Some(chunk) = stream.next().await {
        hasher.update(&chunk.unwrap());
        chunks += 1;
    }
    assert_eq!(hasher.finish(), digest);
    assert!(chunks > 1, "the body arrives in pieces");
    assert_eq!(storage_auth.lock().unwrap().as_slice(), [None]);
}

#[tokio::test]
async fn too_many_redirects_stop() {
    let addr = serve(Router::new().route(
        "/v2/o/a/blobs/{digest}",
        get(|uri: Uri| async move {
            (
                StatusCode::FOUND,
                [(header::LOCATION, uri.path().to_owned())],
            )
        }),
    ))
    .await;
    let up = upstream(plain_http(&[addr]));
    let err = up
        .blob(&o(addr.to_string(), "o/a"), &Digest::sha256(b""), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpstreamError::Transport(m) if m.contains("redirect")),
        "{err}"
    );
}

mod tls {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A CA and a certificate for 127.0.0.1 signed by it (rustls refuses a self-signed leaf
    /// that is its own CA).
    fn pki() -> (String, rustls::ServerConfig) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        (ca_cert.pem(), server)
    }

    async fn serve_tls(app: Router, cfg: rustls::ServerConfig, connections: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        tokio::spawn(async move {
            for _ in 0..connections {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    // A client that distrusts us hangs up during the handshake.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn https_with_an_extra_ca() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (ca_pem, server) = pki();
        let versions = Arc::new(Mutex::new(Vec::new()));
        let seen = versions.clone();
        let app = Router::new().route(
            "/v2/o/a/manifests/{reference}",
            get(move |req: axum::extract::Request| async move {
                seen.lock().unwrap().push(req.version());
                ([(header::CONTENT_TYPE, media_type::OCI_MANIFEST)], MANIFEST)
            }),
        );
        let addr = serve_tls(app, server, 8).await;
        let registry = addr.to_string();

        let trusting = upstream(UpstreamConfig {
            extra_ca_pem: vec![ca_pem.into_bytes()],
            ..Default::default()
        });
        let resp = trusting
            .manifest(&o(&registry, "o/a"), &tag_or_digest("1"), false, None)
            .await
            .unwrap();
        assert_eq!(
            resp.bytes_limited(1 << 20).await.unwrap(),
            MANIFEST.as_bytes()
        );
        assert_eq!(
            versions.lock().unwrap().as_slice(),
            [axum::http::Version::HTTP_2],
            "ALPN offers h2"
        );

        let default_roots = upstream(UpstreamConfig::default());
        let err = default_roots
            .manifest(&o(&registry, "o/a"), &tag_or_digest("1"), false, None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, UpstreamError::Transport(m) if m.to_lowercase().contains("certificate")),
            "{err}"
        );
    }
}
