//! kache's mutating admission webhook: pod images are rewritten to the node proxy
//! (`nginx` → `localhost:7439/docker.io/library/nginx:latest`), the original kept in an annotation.
//!
//! [`rules`] is the pure part (a Pod and a [`Policy`] in, a JSON patch out); [`review()`] answers
//! one AdmissionReview body with it; [`server`] serves that over TLS with a certificate that is
//! reloaded when its files change ([`tls`]).

pub mod review;
pub mod rules;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;
mod view;

pub use review::{BadReview, Reviewed, Unhandled, review};
pub use rules::{
    ContainerKind, Pattern, PatternError, Policy, Rewrite, Scope, SkipReason, Skipped,
    annotation_key, original_images, parse_annotation_key, rewrite,
};
#[cfg(feature = "server")]
pub use server::{MAX_BODY, Webhook, WebhookMetrics, serve_tls};
#[cfg(feature = "server")]
pub use tls::{ReloadingCert, TlsError, server_config};
