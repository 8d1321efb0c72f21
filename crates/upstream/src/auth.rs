//! Registry authentication: `WWW-Authenticate` challenges and the cache of bearer tokens.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest as _;

use kache_oci::credentials::Credentials;

/// A challenge from a `401 Unauthorized`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The challenges of one `WWW-Authenticate` value (RFC 9110 §11.6.1): several may share a
/// header, and quoted parameter values may hold commas and escapes. Unknown schemes and
/// Bearer challenges without a realm are dropped.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut raw: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut i = 0;
    // Every pass consumes at least one byte, so the loop ends within `b.len()` passes.
    while i < b.len() {
        if b[i] == b',' || b[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == start {
            i += 1;
            continue;
        }
        let token = &header[start..i];
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' {
            // A parameter of the current challenge.
            i = j + 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = String::new();
            if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut bytes = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    bytes.push(b[i]);
                    i += 1;
                }
                i += 1;
                value = String::from_utf8_lossy(&bytes).into_owned();
            } else {
                let vstart = i;
                while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
                value.push_str(&header[vstart..i]);
            }
            if let Some((_, params)) = raw.last_mut() {
                params.push((token.to_ascii_lowercase(), value));
            }
        } else {
            raw.push((token.to_ascii_lowercase(), Vec::new()));
        }
    }
    raw.into_iter()
        .filter_map(|(scheme, params)| {
            let get = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            match scheme.as_str() {
                "bearer" => Some(Challenge::Bearer {
                    realm: get("realm").filter(|r| !r.is_empty())?,
                    service: get("service"),
                    scope: get("scope"),
                }),
                "basic" => Some(Challenge::Basic),
                _ => None,
            }
        })
        .collect()
}

/// Who a token was issued to, without keeping the secret: a salted hash, the salt chosen
/// per process, so one set of credentials never gets a token issued to another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Identity(Option<[u8; 32]>);

/// Bearer tokens kept for reuse, and the registries known to want Basic up front.
#[derive(Debug)]
pub(crate) struct AuthCache {
    salt: [u8; 16],
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    basic_hosts: Mutex<HashSet<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    host: String,
    scope: String,
    identity: Identity,
}

#[derive(Debug)]
struct CachedToken {
    token: String,
    valid_until: Instant,
}

/// Bounds memory however many repositories and pull secrets pass through.
const MAX_ENTRIES: usize = 4096;

/// Lifetime assumed when the token server states none (the distribution token spec's default).
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A token is dropped this much before it expires (a quarter of its life, at most 30 s), so a
/// request never leaves with a token that dies on the way.
fn usable_for(expires_in: Duration) -> Duration {
    expires_in - (expires_in / 4).min(Duration::from_secs(30))
}

impl Default for AuthCache {
    fn default() -> Self {
        let mut salt = [0u8; 16];
        // RandomState is seeded from the OS per process; two fresh states give two seeds.
        salt[..8].copy_from_slice(&std::hash::RandomState::new().hash_one(1u8).to_le_bytes());
        salt[8..].copy_from_slice(&std::hash::RandomState::new().hash_one(2u8).to_le_bytes());
        AuthCache {
            salt,
            tokens: Mutex::default(),
            basic_hosts: Mutex::default(),
        }
    }
}

impl AuthCache {
    pub(crate) fn identity(&self, creds: Option<&Credentials>) -> Identity {
        let Some(creds) = creds else {
            return Identity(None);
        };
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        match creds {
            Credentials::Basic { username, password } => {
                h.update(b"basic\0");
                h.update((username.len() as u64).to_le_bytes());
                h.update(username);
                h.update(password);
            }
            Credentials::IdentityToken(t) => {
                h.update(b"identity\0");
                h.update(t);
            }
        }
        Identity(Some(h.finalize().into()))
    }

    pub(crate) fn key(&self, host: &str, scope: &str, creds: Option<&Credentials>) -> TokenKey {
        TokenKey {
            host: host.to_owned(),
            scope: scope.to_owned(),
            identity: self.identity(creds),
        }
    }

    pub(crate) fn token(&self, key: &TokenKey) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens
            .get(key)
            .filter(|t| t.valid_until > Instant::now())
            .map(|t| t.token.clone())
    }

    pub(crate) fn forget_token(&self, key: &TokenKey) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.remove(key);
    }

    pub(crate) fn store_token(&self, key: TokenKey, token: String, expires_in: Duration) {
        let now = Instant::now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if tokens.len() >= MAX_ENTRIES {
            tokens.retain(|_, t| t.valid_until > now);
            if tokens.len() >= MAX_ENTRIES {
                tokens.clear();
            }
        }
        tokens.insert(
            key,
            CachedToken {
                token,
                valid_until: now + usable_for(expires_in),
            },
        );
    }

    pub(crate) fn wants_basic(&self, host: &str) -> bool {
        let hosts = self.basic_hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.contains(host)
    }

    pub(crate) fn remember_basic(&self, host: &str) {
        let mut hosts = self.basic_hosts.lock().unwrap_or_else(|e| e.into_inner());
        if hosts.len() >= MAX_ENTRIES {
            hosts.clear();
        }
        hosts.insert(host.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(realm: &str, service: Option<&str>, scope: Option<&str>) -> Challenge {
        Challenge::Bearer {
            realm: realm.to_owned(),
            service: service.map(str::to_owned),
            scope: scope.map(str::to_owned),
        }
    }

    #[test]
    fn challenges() {
        let cases: &[(&str, Vec<Challenge>)] = &[
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
                vec![bearer(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/nginx:pull"),
                )],
            ),
            (
                r#"bearer  Realm = "https://h/t?a=1,b=2" , service="a, \"b\"", scope="repository:x:pull,push""#,
                vec![bearer(
                    "https://h/t?a=1,b=2",
                    Some(r#"a, "b""#),
                    Some("repository:x:pull,push"),
                )],
            ),
            (
                "Bearer realm=https://h/token,service=reg",
                vec![bearer("https://h/token", Some("reg"), None)],
            ),
            (r#"Basic realm="Registry Realm""#, vec![Challenge::Basic]),
            (
                r#"Basic realm="x", Bearer realm="https://t", Negotiate abc=="#,
                vec![Challenge::Basic, bearer("https://t", None, None)],
            ),
            ("Bearer", vec![]),
            (r#"Bearer service="s""#, vec![]),
            ("", vec![]),
            (
                r#"Bearer realm="unterminated"#,
                vec![bearer("unterminated", None, None)],
            ),
            ("===,,\"\\", vec![]),
        ];
        for (header, want) in cases {
            assert_eq!(&parse_challenges(header), want, "{header}");
        }
    }

    #[test]
    fn tokens_expire_and_are_per_identity() {
        let cache = AuthCache::default();
        let alice = Credentials::Basic {
            username: "alice".into(),
            password: "pw".into(),
        };
        let alice_other = Credentials::Basic {
            username: "alice".into(),
            password: "other".into(),
        };
        let k = cache.key("h", "repository:a:pull", Some(&alice));
        assert_ne!(k, cache.key("h", "repository:a:pull", Some(&alice_other)));
        assert_ne!(k, cache.key("h", "repository:a:pull", None));
        assert_ne!(k, cache.key("h", "repository:b:pull", Some(&alice)));
        cache.store_token(k.clone(), "t".into(), Duration::from_secs(60));
        assert_eq!(cache.token(&k).as_deref(), Some("t"));
        assert_eq!(
            cache.token(&cache.key("h", "repository:a:pull", None)),
            None
        );
        cache.store_token(k.clone(), "t2".into(), Duration::ZERO);
        assert_eq!(cache.token(&k), None);
        assert_eq!(
            usable_for(Duration::from_secs(300)),
            Duration::from_secs(270)
        );
        assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(45));
    }
}
