//! The vocabulary of the OCI Distribution and Image specs that every other kache crate speaks:
//! repository names, tags, digests, media types and the parts of a manifest a registry must read.

pub mod digest;
pub mod manifest;
pub mod media_type;
pub mod name;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use manifest::{Descriptor, ManifestError, ParsedManifest};
pub use name::{NameError, Reference, RepoName, Tag};
