//! Media types of the manifests kache stores and serves.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layers that registries do not hold (Windows base layers, `urls` pointing elsewhere): a
/// manifest may reference them without the blob being present.
pub const NON_DISTRIBUTABLE_LAYERS: [&str; 4] = [
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
];

/// Every manifest media type accepted on push, in the order offered in `Accept` headers.
pub const MANIFEST_TYPES: [&str; 4] = [
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    DOCKER_MANIFEST,
];

/// Whether `mt` lists other manifests (an index or a Docker manifest list).
pub fn is_index(mt: &str) -> bool {
    mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
}

/// The media type without parameters (`; charset=utf-8`) and surrounding spaces.
pub fn essence(mt: &str) -> &str {
    mt.split(';').next().unwrap_or("").trim()
}
