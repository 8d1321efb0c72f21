//! Registry credentials in the docker `config.json` format, which is also the payload of a
//! `kubernetes.io/dockerconfigjson` Secret.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::reference::DOCKER_HUB;

/// Credentials for one registry.
///
/// `Debug` never shows the secret parts.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A user name and password (or personal access token), sent as HTTP Basic to the registry
    /// or to its token server.
    Basic { username: String, password: String },
    /// A docker config `identitytoken`: an OAuth2 refresh token, exchanged at the token server
    /// with `grant_type=refresh_token`.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// Why a docker config cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read docker config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("docker config is not valid JSON: {0}")]
    Json(String),
    #[error("docker config entry {key:?}: {reason}")]
    Entry { key: String, reason: String },
}

/// Per-registry credentials, keyed by registry host (with port).
///
/// Keys are matched by host whatever form they were written in (`https://index.docker.io/v1/`,
/// `docker.io`, `http://reg:5000`, `reg:5000/v2/`), and Docker Hub's aliases are one registry.
/// `Debug` lists the registries only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    auths: BTreeMap<String, Credentials>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig")
            .field("registries", &self.auths.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl Entry {
    /// `Ok(None)` for an entry without credentials: `docker login` with a credential store
    /// leaves `{}` behind, and that must not make the whole file unusable.
    fn credentials(self) -> Result<Option<Credentials>, String> {
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        if let Some(token) = nonempty(self.identitytoken) {
            return Ok(Some(Credentials::IdentityToken(token)));
        }
        if let Some(auth) = nonempty(self.auth) {
            // Some writers drop the padding; docker accepts both.
            let engine = GeneralPurpose::new(
                &base64::alphabet::STANDARD,
                GeneralPurposeConfig::new()
                    .with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            let decoded = engine
                .decode(auth.trim())
                .map_err(|e| format!("auth is not valid base64: {e}"))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| "auth does not decode to UTF-8".to_owned())?;
            let (username, password) = decoded
                .split_once(':')
                .ok_or_else(|| "auth does not decode to username:password".to_owned())?;
            return Ok(Some(Credentials::Basic {
                username: username.to_owned(),
                password: password.to_owned(),
            }));
        }
        match (nonempty(self.username), self.password) {
            (None, None) => Ok(None),
            (username, password) => Ok(Some(Credentials::Basic {
                username: username.unwrap_or_default(),
                password: password.unwrap_or_default(),
            })),
        }
    }
}

/// The registry host a docker config key or a reference's registry names: scheme and path
/// dropped, lowercased, Docker Hub's aliases folded into `docker.io`.
pub fn registry_host(key: &str) -> String {
    let key = key.trim();
    let rest = ["https://", "http://"]
        .iter()
        .find_map(|scheme| {
            key.get(..scheme.len())
                .filter(|p| p.eq_ignore_ascii_case(scheme))
                .map(|_| &key[scheme.len()..])
        })
        .unwrap_or(key);
    let host = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_owned()
        }
        _ => host,
    }
}

impl DockerConfig {
    /// Parses a docker `config.json` (`{"auths": {...}}`) or the older `.dockercfg` layout
    /// (the same map at the top level).
    ///
    /// When two keys name the same host, the one written as the bare host wins; otherwise the
    /// first in sorted order.
    pub fn from_json(json: &[u8]) -> Result<Self, CredentialsError> {
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| CredentialsError::Json(e.to_string()))?;
        let serde_json::Value::Object(mut top) = value else {
            return Err(CredentialsError::Json(
                "top level is not an object".to_owned(),
            ));
        };
        // The legacy layout shares the top level with settings (`credsStore`, `HttpHeaders`):
        // only objects there can be registries.
        let (entries, legacy) = match top.remove("auths") {
            Some(serde_json::Value::Object(auths)) => (auths, false),
            Some(_) => {
                return Err(CredentialsError::Json(
                    "\"auths\" is not an object".to_owned(),
                ));
            }
            None => (top, true),
        };
        let mut cfg = DockerConfig::default();
        let mut bare = std::collections::BTreeSet::new();
        let mut keys: Vec<_> = entries.into_iter().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in keys {
            if legacy && !value.is_object() {
                continue;
            }
            let entry_err = |reason: String| CredentialsError::Entry {
                key: key.clone(),
                reason,
            };
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| entry_err(e.to_string()))?;
            let Some(creds) = entry.credentials().map_err(entry_err)? else {
                continue;
            };
            let host = registry_host(&key);
            if host.is_empty() {
                return Err(entry_err("names no registry host".to_owned()));
            }
            let is_bare = key == host;
            if !cfg.auths.contains_key(&host) || (is_bare && !bare.contains(&host)) {
                if is_bare {
                    bare.insert(host.clone());
                }
                cfg.auths.insert(host, creds);
            }
        }
        Ok(cfg)
    }

    /// Reads and parses a docker config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, CredentialsError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| CredentialsError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_json(&bytes)
    }

    /// The credentials for `registry` (`docker.io`, `ghcr.io`, `reg:5000`), if any.
    pub fn lookup(&self, registry: &str) -> Option<Credentials> {
        self.auths.get(&registry_host(registry)).cloned()
    }

    /// Sets the credentials for `registry`, replacing any.
    pub fn insert(&mut self, registry: &str, credentials: Credentials) {
        self.auths.insert(registry_host(registry), credentials);
    }

    /// The registry hosts that have credentials.
    pub fn registries(&self) -> impl Iterator<Item = &str> {
        self.auths.keys().map(String::as_str)
    }

    /// Whether no registry has credentials.
    pub fn is_empty(&self) -> bool {
        self.auths.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Option<Credentials> {
        Some(Credentials::Basic {
            username: u.to_owned(),
            password: p.to_owned(),
        })
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn keys_in_every_form_match_their_host() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "http://reg:5000": {{"username": "u2", "password": "p2"}},
                "ghcr.io/v2/": {{"auth": "{}", "email": "ignored@example.invalid"}},
                "https://Quay.io": {{"identitytoken": "refresh-me"}},
                "gone.example.com": {{}},
                "helper.example.com": {{"auth": ""}}
            }}, "credsStore": "desktop"}}"#,
            b64("hub:pa:ss"),
            b64("gh:token").trim_end_matches('='),
        );
        let cfg = DockerConfig::from_json(json.as_bytes()).unwrap();
        for (registry, want) in [
            ("docker.io", basic("hub", "pa:ss")),
            ("index.docker.io", basic("hub", "pa:ss")),
            ("registry-1.docker.io", basic("hub", "pa:ss")),
            ("reg:5000", basic("u2", "p2")),
            ("http://reg:5000/v2/", basic("u2", "p2")),
            ("reg", None),
            ("reg:5001", None),
            ("ghcr.io", basic("gh", "token")),
            (
                "quay.io",
                Some(Credentials::IdentityToken("refresh-me".into())),
            ),
            ("gone.example.com", None),
            ("helper.example.com", None),
            ("example.com", None),
        ] {
            assert_eq!(cfg.lookup(registry), want, "{registry}");
        }
        assert_eq!(
            cfg.registries().collect::<Vec<_>>(),
            ["docker.io", "ghcr.io", "quay.io", "reg:5000"]
        );
        let shown = format!("{cfg:?} {:?}", cfg.lookup("docker.io").unwrap());
        assert!(
            !shown.contains("pa:ss") && !shown.contains("refresh-me"),
            "{shown}"
        );
    }

    #[test]
    fn bare_host_wins_and_legacy_layout() {
        let json = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{}"}}, "docker.io": {{"auth": "{}"}}}}}}"#,
            b64("a:1"),
            b64("b:2")
        );
        let cfg = DockerConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(cfg.lookup("docker.io"), basic("b", "2"));

        let legacy = format!(
            r#"{{"https://reg.example.com": {{"auth": "{}", "email": "x"}}, "psFormat": "table"}}"#,
            b64("l:p")
        );
        let cfg = DockerConfig::from_json(legacy.as_bytes()).unwrap();
        assert_eq!(cfg.lookup("reg.example.com"), basic("l", "p"));
        assert!(DockerConfig::from_json(b"{}").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_named() {
        for (json, needle) in [
            (
                r#"{"auths": {"r.io": {"auth": "!!!"}}}"#.to_owned(),
                "base64",
            ),
            (
                format!(
                    r#"{{"auths": {{"r.io": {{"auth": "{}"}}}}}}"#,
                    b64("nocolon")
                ),
                "username:password",
            ),
            (r#"{"auths": {"r.io": {"auth": 5}}}"#.to_owned(), "r.io"),
            (r#"{"auths": {"r.io": "x"}}"#.to_owned(), "r.io"),
            (r#"{"auths": []}"#.to_owned(), "auths"),
            ("[]".to_owned(), "object"),
            ("{".to_owned(), "JSON"),
        ] {
            let err = DockerConfig::from_json(json.as_bytes()).unwrap_err();
            assert!(err.to_string().contains(needle), "{json}: {err}");
        }
        let err = DockerConfig::from_file("/nonexistent/kache/config.json").unwrap_err();
        assert!(matches!(err, CredentialsError::Read { .. }), "{err}");
    }
}
