//! Bearer tokens from a registry's token server, for the realm a `401` names.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use kache_oci::credentials::Credentials;

use crate::auth::DEFAULT_TOKEN_LIFETIME;
use crate::client::Upstream;
use crate::error::SMALL_BODY_LIMIT;
use crate::error::UpstreamError;
use crate::response::check;

impl Upstream {
    /// A bearer token from the challenge's realm, with the credentials if there are any.
    pub(crate) async fn fetch_token(
        &self,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: Option<&Credentials>,
    ) -> Result<(String, Duration), UpstreamError> {
        let mut url = reqwest::Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| UpstreamError::Status {
                status: 502,
                message: format!("{host}: token realm {realm:?} is not an http(s) URL"),
            })?;
        let realm_host = url.host_str().unwrap_or_default().to_owned();
        let req = match creds {
            Some(Credentials::IdentityToken(refresh)) => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", refresh)
                    .append_pair("client_id", "kache")
                    .append_pair("scope", scope);
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                self.http()
                    .post(url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.finish())
            }
            basic => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = service {
                        q.append_pair("service", service);
                    }
                    q.append_pair("scope", scope);
                }
                let req = self.http().get(url);
                match basic {
                    Some(Credentials::Basic { username, password }) => {
                        req.basic_auth(username, Some(password))
                    }
                    _ => req,
                }
            }
        };
        tracing::debug!(%host, %realm_host, scope, "fetching a registry token");
        let resp = self.send_request(&realm_host, req).await?;
        let body = check(&realm_host, resp)
            .await?
            .bytes_limited(SMALL_BODY_LIMIT)
            .await?;
        read_token(&realm_host, &body)
    }
}

/// The token and its lifetime in a token server's answer. `token` is the spec's name and
/// `access_token` OAuth2's; servers send either or both.
fn read_token(realm_host: &str, body: &[u8]) -> Result<(String, Duration), UpstreamError> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let bad = |why: &str| UpstreamError::Status {
        status: 502,
        message: format!("{realm_host}: token response {why}"),
    };
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| bad(&format!("is not JSON: {e}")))?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| bad("holds no token"))?;
    let expires_in = match parsed.expires_in {
        Some(0) | None => DEFAULT_TOKEN_LIFETIME,
        Some(s) => Duration::from_secs(s),
    };
    Ok((token, expires_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses() {
        let read = |body: &str| read_token("auth.example", body.as_bytes());
        assert_eq!(
            read(r#"{"token":"t","access_token":"a","expires_in":300}"#),
            Ok(("t".to_owned(), Duration::from_secs(300)))
        );
        assert_eq!(
            read(r#"{"token":"","access_token":"a","expires_in":0}"#),
            Ok(("a".to_owned(), DEFAULT_TOKEN_LIFETIME))
        );
        for body in [r#"{"expires_in":60}"#, "not json"] {
            let err = read(body).unwrap_err();
            assert!(
                matches!(err, UpstreamError::Status { status: 502, .. }),
                "{err}"
            );
        }
    }
}
