//! The contracts between kache's processes: routes kache adds beside the Distribution API, and
//! the bodies they carry. Both sides use these types, so neither can drift from the other.

use serde::{Deserialize, Serialize};

/// Runs a garbage collection (`POST`, `?dryRun=true` to decide without removing) or reads the
/// last report (`GET`), on the registry's internal listener.
pub const GC_PATH: &str = "/kache/v1/gc";
/// Replaces (`PUT`, a [`KeptImages`]) or reads (`GET`) the images the cluster keeps.
pub const IMAGES_PATH: &str = "/kache/v1/images";

/// An image the cluster keeps, as the controller reports it (its CachedImages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptImage {
    /// A normalised reference: `docker.io/library/nginx:1.27`, `ghcr.io/o/a@sha256:...`.
    pub image: String,
    /// Never evicted: retained, or used by a live pod.
    #[serde(default)]
    pub pinned: bool,
}

/// The body of `PUT /kache/v1/images`: the whole list, replacing the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptImages {
    pub images: Vec<KeptImage>,
}

/// Why a collection evicted, and whether it could free enough.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pressure {
    /// What the store is over: `max-size`, `min-free` or both.
    pub reason: String,
    /// Bytes to free to be within both limits.
    pub needed_bytes: u64,
    /// Bytes that could not be freed (everything left is pinned or in use).
    pub unmet_bytes: u64,
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GcReport {
    pub dry_run: bool,
    /// When it started, unix seconds.
    pub started_at: u64,
    pub duration_seconds: f64,
    /// Of that, the time it worked: a collection takes a share of a core (`--gc-cpu`) and
    /// rests between slices of work.
    pub worked_seconds: f64,
    /// Manifests (per repository) and blobs reachable from a root.
    pub marked_manifests: u64,
    pub marked_blobs: u64,
    /// Blobs (manifests included) removed, their manifest records, and their bytes.
    pub removed_blobs: u64,
    pub removed_manifests: u64,
    pub removed_bytes: u64,
    /// Candidates kept after all because something used them while the collection ran.
    pub kept_in_use: u64,
    /// Images evicted to meet the limits, as `repo:tag` or `repo@digest`.
    pub evicted_images: Vec<String>,
    pub expired_uploads: u64,
    /// Bytes the store holds afterwards.
    pub store_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_read_older_ones() {
        let r = GcReport {
            dry_run: true,
            removed_blobs: 3,
            evicted_images: vec!["docker.io/library/nginx:1.27".into()],
            pressure: Some(Pressure {
                reason: "max-size".into(),
                needed_bytes: 10,
                unmet_bytes: 0,
            }),
            ..GcReport::default()
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["removedBlobs"], 3);
        assert_eq!(serde_json::from_value::<GcReport>(json).unwrap(), r);
        let sparse: GcReport = serde_json::from_str(r#"{"dryRun":false}"#).unwrap();
        assert_eq!(sparse.removed_blobs, 0);
    }

    #[test]
    fn image_lists_refuse_unknown_fields() {
        let ok: KeptImages =
            serde_json::from_str(r#"{"images":[{"image":"docker.io/library/a:1","pinned":true}]}"#)
                .unwrap();
        assert!(ok.images[0].pinned);
        assert!(serde_json::from_str::<KeptImages>(r#"{"images":[],"extra":1}"#).is_err());
    }
}
