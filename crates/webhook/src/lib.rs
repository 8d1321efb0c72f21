//! kache's mutating admission webhook: pod images are rewritten to the node proxy
//! (`nginx` → `localhost:7439/docker.io/library/nginx:latest`), the original kept in an annotation.
//!
//! [`rules`] is the pure part (a Pod and a [`Policy`] in, a JSON patch out; the policy is
//! kache-api's, shared with the controller); [`review()`] answers
//! one AdmissionReview body with it; [`server`] serves that over TLS with a certificate that is
//! reloaded when its files change ([`tls`]).
//!
//! ```
//! use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
//! use kache_webhook::{Policy, Scope, rewrite};
//!
//! let pod = Pod {
//!     spec: Some(PodSpec {
//!         containers: vec![Container {
//!             name: "web".into(),
//!             image: Some("nginx:1.27".into()),
//!             ..Container::default()
//!         }],
//!         ..PodSpec::default()
//!     }),
//!     ..Pod::default()
//! };
//! let decided = rewrite(&pod, &Policy::default(), Scope::Create);
//! assert_eq!(decided.rewritten, 1);
//! let patch = serde_json::to_string(&decided.patch).unwrap();
//! assert!(patch.contains("localhost:7439/docker.io/library/nginx:1.27"));
//! ```

pub mod review;
pub mod rules;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod tls;
mod view;

pub use review::{BadReview, Reviewed, Unhandled, review};
pub use rules::{
    ContainerKind, Pattern, PatternError, PodSkip, Policy, Rewrite, Scope, Selector, SkipReason,
    Skipped, annotation_key, original_images, parse_annotation_key, rewrite,
};
#[cfg(feature = "server")]
pub use server::{MAX_BODY, Webhook, WebhookMetrics};
#[cfg(feature = "server")]
pub use tls::{ReloadingCert, TlsError, server_config};
