//! A Docker token server for distribution's `auth.token` mode, inside the test process.
//!
//! `GET /token?service=S&scope=repository:NAME:pull,push` with optional Basic credentials
//! answers `{"token","access_token","expires_in"}`: a JWT signed with ES256 by a key whose
//! certificate is issued by this server's own CA. The CA certificate is the registry's
//! `rootcertbundle`, and the JWT header's `x5c` carries the signing certificate and the CA, which
//! is how distribution 2.8 finds and trusts the key. Only what the scope asks and the user may do
//! is granted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::background::ServerThread;
use super::distribution::TokenAuth;

/// How long issued tokens are valid unless a test says otherwise.
const DEFAULT_EXPIRES_IN: u64 = 300;

/// One entry of a token's `access` claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// `repository`, `registry`, ...
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Access {
    /// `repository:<name>:<actions>`.
    pub fn repository(name: &str, actions: &[&str]) -> Self {
        Access {
            kind: "repository".to_owned(),
            name: name.to_owned(),
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// Parses a scope, `type:name:action,action`. The name may hold a port (`host:5000/x`),
    /// so the type ends at the first colon and the actions start after the last.
    pub fn parse_scope(scope: &str) -> Option<Self> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        Some(Access {
            kind: kind.to_owned(),
            name: name.to_owned(),
            actions: actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    fn to_json(&self) -> Value {
        json!({ "type": self.kind, "name": self.name, "actions": self.actions })
    }
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic user name, `None` when the request had no credentials.
    pub user: Option<String>,
    pub service: Option<String>,
    /// Every `scope` parameter, as sent.
    pub scopes: Vec<String>,
    /// 200, or 401 for wrong credentials.
    pub status: u16,
    /// What the issued token grants.
    pub granted: Vec<Access>,
}

/// What a user (or anonymous clients) may do: repository patterns with their actions.
/// A pattern is `*` (every repository), `prefix/*` (everything below it) or an exact name.
#[derive(Clone, Debug, Default)]
struct Grants(Vec<(String, Vec<String>)>);

impl Grants {
    fn new(grants: &[(&str, &[&str])]) -> Self {
        Grants(
            grants
                .iter()
                .map(|(p, a)| ((*p).to_owned(), a.iter().map(|a| (*a).to_owned()).collect()))
                .collect(),
        )
    }

    fn allows(&self, name: &str, action: &str) -> bool {
        self.0.iter().any(|(pattern, actions)| {
            let matches = pattern == "*"
                || pattern == name
                || pattern
                    .strip_suffix("/*")
                    .is_some_and(|p| name.strip_prefix(p).is_some_and(|r| r.starts_with('/')));
            matches && actions.iter().any(|a| a == action || a == "*")
        })
    }

    /// The part of `asked` these grants allow: repository scopes only, actions intersected.
    fn grant(&self, asked: &Access) -> Option<Access> {
        if asked.kind != "repository" {
            return None;
        }
        let actions: Vec<String> = asked
            .actions
            .iter()
            .filter(|a| self.allows(&asked.name, a))
            .cloned()
            .collect();
        (!actions.is_empty()).then(|| Access {
            actions,
            ..asked.clone()
        })
    }
}

#[derive(Debug)]
struct Users {
    by_name: HashMap<String, (String, Grants)>,
    anonymous: Grants,
    expires_in: u64,
}

struct Signer {
    key: EcdsaKeyPair,
    /// Base64 (standard, padded) DER: the signing certificate, then the CA.
    x5c: Vec<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Issuer {
    service: String,
    issuer: String,
    signer: Signer,
    users: Mutex<Users>,
    seen: Mutex<Vec<TokenRequest>>,
    next_id: AtomicU64,
}

/// The running token server; stopped when dropped.
#[derive(Debug)]
pub struct TokenServer {
    state: Arc<Issuer>,
    server: ServerThread,
    dir: TempDir,
}

impl TokenServer {
    /// A token server for registries whose `auth.token.service` is `service`, with a fresh CA,
    /// no users and nothing for anonymous clients.
    pub fn start(service: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-token-server")
            .tempdir()
            .expect("create token server dir");
        let (signer, ca_pem) = make_signer();
        std::fs::write(dir.path().join("rootcertbundle.pem"), ca_pem).expect("write CA bundle");
        let state = Arc::new(Issuer {
            service: service.to_owned(),
            issuer: "kache-test-token-issuer".to_owned(),
            signer,
            users: Mutex::new(Users {
                by_name: HashMap::new(),
                anonymous: Grants::default(),
                expires_in: DEFAULT_EXPIRES_IN,
            }),
            seen: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        let router = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .with_state(state.clone());
        let server = ServerThread::start("token-server", router);
        TokenServer { state, server, dir }
    }

    /// Adds (or replaces) a user. `grants` are `(repository pattern, actions)`: `("*",
    /// &["pull", "push"])`, `("team/*", &["pull"])`, `("exact/name", &["*"])`.
    pub fn add_user(&self, user: &str, password: &str, grants: &[(&str, &[&str])]) {
        lock(&self.state.users)
            .by_name
            .insert(user.to_owned(), (password.to_owned(), Grants::new(grants)));
    }

    /// What requests without credentials get (nothing unless this is called).
    pub fn allow_anonymous(&self, grants: &[(&str, &[&str])]) {
        lock(&self.state.users).anonymous = Grants::new(grants);
    }

    /// The lifetime of tokens issued from now on, in seconds (`expires_in` and `exp`).
    pub fn set_expires_in(&self, seconds: u64) {
        lock(&self.state.users).expires_in = seconds;
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT/token`: the `realm` of the registry's challenge.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.server.addr())
    }

    pub fn service(&self) -> &str {
        &self.state.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The PEM file holding this server's CA certificate.
    pub fn root_cert_bundle(&self) -> PathBuf {
        self.dir.path().join("rootcertbundle.pem")
    }

    /// What a distribution in token mode needs to trust this server.
    pub fn distribution_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: self.state.service.clone(),
            issuer: self.state.issuer.clone(),
            root_cert_bundle: self.root_cert_bundle(),
        }
    }

    /// A token for `subject` granting exactly `access`, without any request or check: for
    /// sending straight to a registry.
    pub fn issue(&self, subject: &str, access: &[Access]) -> String {
        let expires_in = lock(&self.state.users).expires_in;
        sign_token(&self.state, subject, access, expires_in)
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.seen).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.seen).len()
    }

    /// Requests whose scopes include exactly `scope`.
    pub fn count_scope(&self, scope: &str) -> usize {
        lock(&self.state.seen)
            .iter()
            .filter(|r| r.scopes.iter().any(|s| s == scope))
            .count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A CA and a signing certificate issued by it, both P-256. Returns the signer and the CA PEM.
fn make_signer() -> (Signer, String) {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kache test token CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");

    let key = KeyPair::generate().expect("generate signing key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("signing cert params");
    params
        .distinguished_name
        .push(DnType::CommonName, "kache test token signer");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = params.signed_by(&key, &ca).expect("sign signing cert");

    let rng = SystemRandom::new();
    let signing_key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.serialized_der(), &rng)
            .expect("load signing key into ring");
    let signer = Signer {
        key: signing_key,
        x5c: vec![STANDARD.encode(cert.der()), STANDARD.encode(ca.der())],
    };
    (signer, ca.pem())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A compact JWS: base64url(header).base64url(claims).base64url(r || s).
///
/// What distribution 2.8.2 checks, as tried against it: `x5c` (standard base64 DER, leaf
/// first) must chain to a certificate of `rootcertbundle` (the leaf alone is enough, the CA alone
/// is refused as "invalid signature"); `aud` must be a string (an array is "malformed token");
/// `exp` and `nbf` are checked with 60 s of leeway; and the signature is raw r || s, not DER.
fn sign_token(state: &Issuer, subject: &str, access: &[Access], expires_in: u64) -> String {
    let header = json!({ "typ": "JWT", "alg": "ES256", "x5c": state.signer.x5c });
    let now = now();
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let claims = json!({
        "iss": state.issuer,
        "sub": subject,
        "aud": state.service,
        "exp": now + expires_in,
        "nbf": now,
        "iat": now,
        "jti": format!("kache-test-{}-{id}", std::process::id()),
        "access": access.iter().map(Access::to_json).collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = state
        .signer
        .key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .expect("ES256 signature");
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    )
}

/// `Authorization: Basic` as (user, password); `None` when absent or malformed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

async fn token(
    State(state): State<Arc<Issuer>>,
    // `scope` may repeat, so the query is read as pairs rather than a struct.
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned))
        .filter(|s| !s.is_empty())
        .collect();
    let credentials = basic_credentials(&headers);
    let mut record = TokenRequest {
        user: credentials.as_ref().map(|(u, _)| u.clone()),
        service: service.clone(),
        scopes: scopes.clone(),
        status: 200,
        granted: Vec::new(),
    };

    let (grants, expires_in) = {
        let users = lock(&state.users);
        let grants = match &credentials {
            None => Some(users.anonymous.clone()),
            Some((user, password)) => users
                .by_name
                .get(user)
                .filter(|(expected, _)| expected == password)
                .map(|(_, grants)| grants.clone()),
        };
        (grants, users.expires_in)
    };
    let Some(grants) = grants else {
        record.status = 401;
        lock(&state.seen).push(record);
        let body = json!({ "errors": [{
            "code": "UNAUTHORIZED",
            "message": "invalid username or password",
            "detail": null,
        }] });
        let mut r = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"kache-test-token-server\""
                .parse()
                .expect("header value"),
        );
        return r;
    };
    if service.as_deref() != Some(state.service.as_str()) {
        // A token for another service would be refused by the registry anyway; saying so here
        // makes a misconfigured test obvious.
        record.status = 400;
        lock(&state.seen).push(record);
        let message = format!(
            "unknown service {service:?}, this server issues for {:?}",
            state.service
        );
        return (StatusCode::BAD_REQUEST, Body::from(message)).into_response();
    }

    let granted: Vec<Access> = scopes
        .iter()
        .filter_map(|s| Access::parse_scope(s))
        .filter_map(|asked| grants.grant(&asked))
        .collect();
    let subject = record.user.clone().unwrap_or_default();
    let token = sign_token(&state, &subject, &granted, expires_in);
    record.granted = granted;
    lock(&state.seen).push(record);
    Json(json!({ "token": token, "access_token": token, "expires_in": expires_in })).into_response()
}

/// The claims of a token, decoded without checking anything: for tests that look inside.
pub fn decode_claims(token: &str) -> Value {
    let payload = token
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {token}"));
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_else(|e| panic!("JWT payload is not base64url ({e}): {token}"));
    serde_json::from_slice(&bytes).expect("JWT claims are JSON")
}
