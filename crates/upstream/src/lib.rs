//! The client kache fetches manifests and blobs from upstream registries with. The names,
//! references, routes and credentials it speaks are kache-oci's; this crate adds the HTTP.
//!
//! kache has its own thin client over reqwest rather than `oci-client`, because the cache needs
//! what a general-purpose client hides: bodies come back as streams handed straight to the
//! store's single-flight writer (never buffered whole); credentials are given per request (a
//! pod's pull secret) and never stored, only tokens are, keyed by a salted hash of them; and the
//! upstream's status and `Retry-After` reach kache's own clients unchanged. oci-client 0.18 uses
//! the same reqwest 0.13, so the binary would still hold one reqwest and one rustls, but it also
//! brings sha2 0.11 beside the workspace's 0.10, oci-spec, chrono and regex for little of this.
//!
//! Requests go out anonymously (or with Basic for a registry known to want it); a `401` is
//! answered once, with a bearer token from the challenge's realm or with Basic credentials.
//! Tokens are cached per registry, scope and credentials until shortly before they expire, so
//! the next request for the same repository carries one from the start.
//!
//! ```no_run
//! # async fn pull() -> Result<(), kache_upstream::UpstreamError> {
//! use kache_oci::{Origin, Reference};
//! use kache_upstream::{Upstream, UpstreamConfig};
//!
//! let upstream = Upstream::new(UpstreamConfig::default())?;
//! let nginx = Origin::of(&"docker.io/library/nginx".parse().unwrap()).unwrap();
//! let latest: Reference = "latest".parse().unwrap();
//! // Anonymous: the last argument would be a pod's pull secret.
//! let manifest = upstream.manifest(&nginx, &latest, false, None).await?;
//! let digest = manifest.digest();
//! let bytes = manifest.bytes_limited(4 << 20).await?;
//! # let _ = (digest, bytes);
//! # Ok(())
//! # }
//! ```

mod auth;
mod checked;
mod client;
mod config;
mod error;
mod response;
mod tls;
mod token;

pub use checked::CheckedManifest;
pub use client::Upstream;
pub use config::UpstreamConfig;
pub use error::{UpstreamAnswer, UpstreamError};
pub use response::{DOCKER_CONTENT_DIGEST, UpstreamResponse};
pub use tls::tls_config;
