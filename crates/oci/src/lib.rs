//! The vocabulary of the OCI Distribution and Image specs that every other kache crate speaks:
//! repository names, tags, digests, media types, image references, the parts of a manifest
//! a registry must read, the Distribution API's routes and error body, and registry credentials
//! in docker's `config.json` format. It is pure: no HTTP client, no runtime. The client that fetches from upstream registries is kache-upstream.
//!
//! An image as a pod names it, the cache repository kache keeps it under, and back:
//!
//! ```
//! use kache_oci::{ImageReference, Origin};
//!
//! let image: ImageReference = "registry:5000/team/app:1.2".parse().unwrap();
//! let repo = image.cache_repository();
//! assert_eq!(repo.as_str(), "registry_5000/team/app");
//! let origin = Origin::of(&repo).unwrap();
//! assert_eq!((origin.registry(), origin.path().as_str()), ("registry:5000", "team/app"));
//! // Docker's short names are normalised as Docker does.
//! let nginx: ImageReference = "nginx".parse().unwrap();
//! assert_eq!(nginx.to_string(), "docker.io/library/nginx:latest");
//! ```

pub mod credentials;
pub mod digest;
pub mod distribution;
pub mod manifest;
pub mod media_type;
pub mod name;
pub mod origin;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use manifest::{Descriptor, MAX_MANIFEST_SIZE, ManifestError, ParsedManifest};
pub use name::{NameError, Reference, RepoName, Tag};
pub use origin::Origin;
pub use reference::{ImageReference, ReferenceError, mirror_repository};
