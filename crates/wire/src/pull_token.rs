//! Pull tokens: what a namespace presents to read the private repositories it was granted.
//!
//! A token names its namespace and is an HMAC of it under a cluster key, so the registry checks
//! it with no state of its own: `v1.<key id>.<namespace>.<mac>`, the MAC being the unpadded
//! base64url of HMAC-SHA256 over `kache/v1/<namespace>`. The controller signs one per namespace
//! and keeps it in that namespace's
//! `kache-pull` Secret as the password of [`USERNAME`]; tokens differ per namespace, so a
//! kubelet that checks pull credentials per image (KEP-2535) treats them as different ones.
//!
//! Keys rotate by id: add a key, sign with it, and drop the old one once every Secret was
//! rewritten; a token under a dropped key is refused.
//!
//! ```
//! use kache_wire::pull_token::{Keys, Token};
//!
//! let keys = Keys::from_entries([("k1", b"0123456789abcdef0123456789abcdef".to_vec())]).unwrap();
//! let token = keys.sign("team-a").unwrap();
//! assert_eq!(keys.verify(&token).unwrap(), "team-a");
//! assert!(keys.verify("v1.k1.team-b.AAAA").is_err());
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

/// The user name of a pull token in a docker config (`kache-pull` Secrets).
pub const USERNAME: &str = "kache";

/// The token endpoint's path, on the node proxy and the registry alike: where a client trades
/// its credentials for the bearer token it then sends (the realm of the challenge).
pub const TOKEN_PATH: &str = "/kache/token";

/// The service named in the challenge.
pub const SERVICE: &str = "kache";

/// Longest token accepted: anything longer is refused before it is parsed.
pub const MAX_LEN: usize = 256;

/// Shortest key: an HMAC key shorter than its hash's output weakens it.
pub const MIN_KEY_LEN: usize = 32;

const VERSION: &str = "v1";

/// Why a token was refused. Every variant answers 401: the distinction is for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Not `v1.<kid>.<namespace>.<mac>`, or longer than [`MAX_LEN`].
    Malformed,
    /// Signed under a key this side does not hold (dropped by a rotation, or never known).
    UnknownKey(String),
    /// The MAC does not match: forged, or for another namespace.
    BadSignature,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Malformed => f.write_str("not a kache pull token"),
            Refused::UnknownKey(kid) => write!(f, "pull token signed under unknown key {kid:?}"),
            Refused::BadSignature => f.write_str("pull token signature does not match"),
        }
    }
}

impl std::error::Error for Refused {}

/// What a key set cannot be built from.
#[derive(Debug)]
pub enum KeyError {
    /// No key at all: nothing could be signed or checked.
    Empty,
    /// A key id that is not a short lowercase name (`[a-z0-9-]`, at most 63).
    BadId(String),
    /// A key shorter than [`MIN_KEY_LEN`] bytes.
    Short(String),
    /// A namespace that cannot be signed (not a DNS label).
    BadNamespace(String),
    Io(std::io::Error),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("no pull-token key"),
            KeyError::BadId(id) => write!(
                f,
                "pull-token key id {id:?} is not a lowercase name of at most 63 characters"
            ),
            KeyError::Short(id) => write!(
                f,
                "pull-token key {id:?} is shorter than {MIN_KEY_LEN} bytes"
            ),
            KeyError::BadNamespace(ns) => write!(f, "{ns:?} is not a namespace name"),
            KeyError::Io(e) => write!(f, "reading pull-token keys: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

/// Whether `s` is a DNS label as Kubernetes names namespaces: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`,
/// at most 63 characters.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The pull-token keys, by id; the last id in order signs.
#[derive(Clone)]
pub struct Keys {
    keys: BTreeMap<String, hmac::Key>,
}

impl fmt::Debug for Keys {
    /// Key ids only: never the keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keys {
    /// Keys from `(id, bytes)` pairs.
    pub fn from_entries<I, S>(entries: I) -> Result<Keys, KeyError>
    where
        I: IntoIterator<Item = (S, Vec<u8>)>,
        S: Into<String>,
    {
        let mut keys = BTreeMap::new();
        for (id, bytes) in entries {
            let id = id.into();
            if !is_label(&id) {
                return Err(KeyError::BadId(id));
            }
            if bytes.len() < MIN_KEY_LEN {
                return Err(KeyError::Short(id));
            }
            keys.insert(id, hmac::Key::new(hmac::HMAC_SHA256, &bytes));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Keys { keys })
    }

    /// Keys from a directory with one file per key, named by its id (a mounted Secret: its
    /// `..data` links and other dot files are not keys). Surrounding whitespace is not part of
    /// a key.
    pub fn from_dir(dir: &Path) -> Result<Keys, KeyError> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(KeyError::Io)? {
            let entry = entry.map_err(KeyError::Io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            let bytes = std::fs::read(entry.path()).map_err(KeyError::Io)?;
            entries.push((name, bytes.trim_ascii().to_vec()));
        }
        Keys::from_entries(entries)
    }

    /// The key ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// The id that signs: the last in order.
    pub fn signing_id(&self) -> &str {
        self.keys
            .keys()
            .next_back()
            .expect("a key set is never empty")
    }

    /// The token of `namespace`, under the signing key.
    pub fn sign(&self, namespace: &str) -> Result<String, KeyError> {
        if !is_label(namespace) {
            return Err(KeyError::BadNamespace(namespace.to_owned()));
        }
        let (id, key) = self.keys.iter().next_back().expect("never empty");
        let mac = hmac::sign(key, message(namespace).as_bytes());
        Ok(format!(
            "{VERSION}.{id}.{namespace}.{}",
            URL_SAFE_NO_PAD.encode(mac.as_ref())
        ))
    }

    /// The namespace `token` was signed for, when it was signed under one of these keys.
    pub fn verify<'t>(&self, token: &'t str) -> Result<&'t str, Refused> {
        let t = Token::parse(token)?;
        let key = self
            .keys
            .get(t.key_id)
            .ok_or_else(|| Refused::UnknownKey(t.key_id.to_owned()))?;
        let mac = URL_SAFE_NO_PAD
            .decode(t.mac)
            .map_err(|_| Refused::BadSignature)?;
        // Constant time: a forger learns nothing from how long the refusal took.
        hmac::verify(key, message(t.namespace).as_bytes(), &mac)
            .map_err(|_| Refused::BadSignature)?;
        Ok(t.namespace)
    }
}

fn message(namespace: &str) -> String {
    format!("kache/{VERSION}/{namespace}")
}

/// A token's parts, unverified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token<'t> {
    pub key_id: &'t str,
    pub namespace: &'t str,
    mac: &'t str,
}

impl<'t> Token<'t> {
    /// Splits a token into its parts; what cannot be one is [`Refused::Malformed`].
    pub fn parse(token: &'t str) -> Result<Token<'t>, Refused> {
        if token.len() > MAX_LEN {
            return Err(Refused::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(VERSION), Some(key_id), Some(namespace), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refused::Malformed);
        };
        if !is_label(key_id) || !is_label(namespace) || mac.is_empty() {
            return Err(Refused::Malformed);
        }
        Ok(Token {
            key_id,
            namespace,
            mac,
        })
    }
}

/// The `WWW-Authenticate` value of a private repository's 401: a Bearer challenge whose realm
/// is the token endpoint on `host` (the address the client used), so every client (containerd,
/// containers/image, Docker) fetches a token with its credentials and retries. `repo` is
/// `None` for the `/v2/` ping.
pub fn challenge(host: &str, repo: Option<&str>) -> String {
    let mut c = format!("Bearer realm=\"http://{host}{TOKEN_PATH}\",service=\"{SERVICE}\"");
    if let Some(r) = repo {
        c.push_str(&format!(",scope=\"repository:{r}:pull\""));
    }
    c
}

/// The address a client used, from its `Host` header, for the realm of a challenge: anything but
/// a plain `host[:port]` (absent, too long, or with characters a realm cannot hold) is the node
/// proxy's usual address.
pub fn realm_host(host: Option<&str>) -> &str {
    host.filter(|h| {
        !h.is_empty()
            && h.len() <= 255
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    })
    .unwrap_or("localhost:7439")
}

/// The bearer token in an `Authorization` value: `Bearer <token>`, or `Basic` with
/// [`USERNAME`] and the token as password (what a client sends when it skips the token
/// endpoint). `None` when there is none, or it is not a kache token's shape.
pub fn from_authorization(value: &str) -> Option<String> {
    if value.len() > 2 * MAX_LEN {
        return None;
    }
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        return (user == USERNAME).then(|| password.to_owned());
    }
    None
}

/// The token endpoint's answer to a request with `authorization` and, for a `POST`, the form
/// `form` (see [`token_of_request`] and [`token_response`]).
pub fn token_answer(authorization: Option<&str>, form: Option<&[u8]>) -> String {
    let form = form.map(String::from_utf8_lossy);
    token_response(token_of_request(authorization, form.as_deref()).as_deref())
}

/// The answer of the token endpoint, as the distribution token spec has it: the presented pull
/// token itself, which the registry verifies on every read (`anonymous` when none was given).
pub fn token_response(token: Option<&str>) -> String {
    let t = token.unwrap_or("anonymous");
    // The token's alphabet needs no JSON escaping: it was checked to be one, or is the default.
    format!("{{\"token\":\"{t}\",\"access_token\":\"{t}\",\"expires_in\":3600}}")
}

/// What the token endpoint takes: the pull token from a `POST` form (containerd's password
/// grant: `password=`) or from `Authorization: Basic` (containers/image, Docker), only when it
/// has a pull token's shape; anything else gets the anonymous token.
pub fn token_of_request(authorization: Option<&str>, form: Option<&str>) -> Option<String> {
    let from_form = form.and_then(|f| {
        f.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "password")
            .map(|(_, v)| percent_decode(v))
    });
    from_form
        .or_else(|| authorization.and_then(from_authorization))
        .filter(|t| Token::parse(t).is_ok())
}

/// `application/x-www-form-urlencoded` value decoding (`+` is a space).
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
