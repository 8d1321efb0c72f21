//! The vocabulary of the OCI Distribution and Image specs that every other kache crate speaks:
//! repository names, tags, digests, media types, image references and the parts of a manifest
//! a registry must read; with the `upstream` feature, the client that fetches from upstream
//! registries.

pub mod api;
pub mod digest;
pub mod manifest;
pub mod media_type;
pub mod name;
#[cfg(feature = "net")]
pub mod net;
pub mod reference;
#[cfg(feature = "upstream")]
pub mod upstream;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use manifest::{Descriptor, ManifestError, ParsedManifest};
pub use name::{NameError, Reference, RepoName, Tag};
pub use reference::{
    ImageReference, ReferenceError, mirror_repository, registry_endpoint, split_cache_repository,
};
