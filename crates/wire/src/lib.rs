//! The contracts between kache's processes: routes kache adds beside the Distribution API, the
//! bodies they carry, and the header the registry adds to its Distribution answers. Both sides
//! use these types, so neither can drift from the other.
//!
//! ```
//! use kache_wire::{CacheOutcome, WarmRequest};
//!
//! // What the node proxy reads off a registry answer's `x-kache-cache` header.
//! assert_eq!(CacheOutcome::parse("stale"), Some(CacheOutcome::Stale));
//! // What the controller sends to cache an image for the cluster's platforms.
//! let warm: WarmRequest =
//!     serde_json::from_str(r#"{"image":"nginx:1.27","platforms":["linux/arm64"]}"#).unwrap();
//! assert_eq!(warm.platforms, ["linux/arm64"]);
//! ```

pub mod pull_token;

use kache_oci::Digest;
use serde::{Deserialize, Serialize};

/// The registry's header on an error answer that is about the upstream, not about kache: the
/// upstream failed (down, rate-limiting, refusing), or what it sent broke a rule the registry
/// holds every upstream to (a digest that does not match, a manifest too large or of no kind
/// kache takes). A node proxy passes such an answer on and does not ask the upstream itself:
/// it would only fail again, or relay the very bytes the registry refused. Its one value is
/// [`UPSTREAM_FAILURE`]; an error without it is the registry failing, which the proxy works
/// around by going upstream.
pub const FAILURE_HEADER: &str = "x-kache-failure";

/// The value of [`FAILURE_HEADER`]: the upstream failed, or its answer was refused.
pub const UPSTREAM_FAILURE: &str = "upstream";

/// Whether an answer's [`FAILURE_HEADER`] says the upstream failed it.
pub fn upstream_failed(value: Option<&str>) -> bool {
    value == Some(UPSTREAM_FAILURE)
}

/// Caches an image (`POST`, a [`WarmRequest`]; the answer is a [`WarmResponse`]), on the
/// registry's internal listener: what the controller asks for each CachedImage.
pub const WARM_PATH: &str = "/kache/v1/warm";

/// The registry's header on a manifest or blob it served: how the cache answered
/// ([`CacheOutcome`]). The node proxy counts it in its metrics and passes it on.
pub const CACHE_HEADER: &str = "x-kache-cache";

/// How the cache answered a pull, in [`CACHE_HEADER`] and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// From the store, fresh (or by digest).
    Hit,
    /// Fetched from upstream now.
    Miss,
    /// From the store after the upstream failed to re-validate it.
    Stale,
}

impl CacheOutcome {
    /// The header's value (and the metrics' label).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Stale => "stale",
        }
    }

    /// Reads the header's value; `None` for anything else.
    pub fn parse(value: &str) -> Option<CacheOutcome> {
        [CacheOutcome::Hit, CacheOutcome::Miss, CacheOutcome::Stale]
            .into_iter()
            .find(|o| o.as_str() == value)
    }
}

/// The body of a warm call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// Any image reference (`nginx:1.27`, `ghcr.io/o/a@sha256:...`); normalised as Docker does.
    pub image: String,
    /// `os/arch[/variant]`; `linux/amd64` when empty. Ignored for single-platform images.
    #[serde(default)]
    pub platforms: Vec<String>,
    /// Credentials for the image's registry, for this fetch only: never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<WarmCredentials>,
    /// Ask the upstream where a cached tag points now, whatever its age (the tag TTL is for
    /// pulls); the cached answer is kept when the upstream cannot say.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refresh: bool,
}

/// Registry credentials for one warm call.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for WarmCredentials {
    /// Never the password: requests are logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The answer to a warm call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmResponse {
    /// The normalised reference.
    pub image: String,
    /// The cache repository it is stored under.
    pub repository: String,
    /// Digest of the manifest or index the reference resolved to.
    pub digest: Digest,
    pub media_type: String,
    /// Bytes of every manifest and blob of the warmed platforms.
    pub bytes: u64,
    pub platforms: Vec<PlatformResult>,
}

/// One platform of a warm call. A single-platform image is reported as one result with an
/// empty `platform`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlatformResult {
    pub platform: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    pub bytes: u64,
    pub status: PlatformStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What became of one platform of a warm call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformStatus {
    /// The cache serves it.
    Cached,
    /// The image has no such platform.
    Absent,
    /// It could not be cached (`message` says why).
    Failed,
}

impl WarmResponse {
    /// The platforms of `requested` the cache now serves. A single-platform image (reported
    /// without a platform) is what every node pulls, so it serves them all.
    pub fn cached_platforms(&self, requested: &[String]) -> Vec<String> {
        let cached = self
            .platforms
            .iter()
            .filter(|p| p.status == PlatformStatus::Cached);
        if cached.clone().any(|p| p.platform.is_empty()) {
            return requested.to_vec();
        }
        cached.map(|p| p.platform.clone()).collect()
    }

    /// Why some platform failed, if one did.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<_> = self
            .platforms
            .iter()
            .filter(|p| p.status == PlatformStatus::Failed)
            .map(|p| {
                format!(
                    "{}: {}",
                    p.platform,
                    p.message.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

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
    /// Repositories that hold nothing any more whose visibility and grants were forgotten, and
    /// grants that had expired (private repositories, `--pull-token-keys`).
    pub forgotten_repositories: u64,
    pub forgotten_grants: u64,
    /// Bytes the store holds afterwards.
    pub store_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pressure: Option<Pressure>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_outcomes_read_back_what_they_write() {
        for o in [CacheOutcome::Hit, CacheOutcome::Miss, CacheOutcome::Stale] {
            assert_eq!(CacheOutcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(CacheOutcome::parse("HIT"), None);
        assert_eq!(CacheOutcome::parse(""), None);
    }

    #[test]
    fn warm_calls_round_trip_and_never_show_a_password() {
        let req = WarmRequest {
            image: "nginx:1.27".into(),
            platforms: vec!["linux/arm64".into()],
            credentials: Some(WarmCredentials {
                username: "u".into(),
                password: "hunter2".into(),
            }),
            refresh: true,
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<WarmRequest>(&json).unwrap(), req);
        // A plain warm says nothing of refresh, as registries before it expect.
        let plain = WarmRequest {
            refresh: false,
            ..req.clone()
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("refresh"));
        assert!(!format!("{req:?}").contains("hunter2"));
        assert!(serde_json::from_str::<WarmRequest>(r#"{"image":"a","extra":1}"#).is_err());
        let bare: WarmRequest = serde_json::from_str(r#"{"image":"a"}"#).unwrap();
        assert!(bare.platforms.is_empty() && bare.credentials.is_none() && !bare.refresh);
    }

    fn answer(platforms: &[(&str, PlatformStatus)]) -> WarmResponse {
        WarmResponse {
            image: "docker.io/library/a:1".into(),
            repository: "docker.io/library/a".into(),
            digest: Digest::sha256(b"index"),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            bytes: 1,
            platforms: platforms
                .iter()
                .map(|(p, status)| PlatformResult {
                    platform: (*p).into(),
                    digest: None,
                    bytes: 0,
                    status: *status,
                    message: (*status == PlatformStatus::Failed).then(|| "boom".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn warm_answers_say_which_platforms_are_served() {
        let want = vec!["linux/amd64".to_owned(), "linux/arm64".to_owned()];
        let multi = answer(&[
            ("linux/amd64", PlatformStatus::Cached),
            ("linux/arm64", PlatformStatus::Failed),
        ]);
        assert_eq!(multi.cached_platforms(&want), ["linux/amd64"]);
        assert_eq!(multi.failure().as_deref(), Some("linux/arm64: boom"));
        let json = serde_json::to_value(&multi).unwrap();
        assert_eq!(json["platforms"][1]["status"], "failed");
        assert_eq!(serde_json::from_value::<WarmResponse>(json).unwrap(), multi);
        // One manifest, no platform: every node pulls it.
        let single = answer(&[("", PlatformStatus::Cached)]);
        assert_eq!(single.cached_platforms(&want), want);
        assert_eq!(single.failure(), None);
    }

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

/// Who may read a cached repository: what the registry learnt of it from the upstream. A
/// repository of kache's own (pushed, with no upstream) has none: whoever reaches the registry
/// reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// The upstream serves it to anyone: so does kache.
    Public,
    /// Fetched with the chart-wide credentials, which stand for the nodes' own: every pod of
    /// the cluster may read it.
    Cluster,
    /// It took a namespace's pull secret: only namespaces with a grant read it.
    Private,
}

impl Visibility {
    /// The metric label and the JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Cluster => "cluster",
            Visibility::Private => "private",
        }
    }
}

/// Checks a namespace's credentials against the upstream and, when they may pull the image,
/// grants the namespace its cached repository (`POST`, a [`GrantRequest`]; the answer is a
/// [`GrantResponse`]); lists the grants (`GET`). On the registry's internal listener: what the
/// controller asks for each namespace whose pods use a private image.
pub const GRANTS_PATH: &str = "/kache/v1/grants";

/// The body of a grant call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    /// Any image reference; its tag or digest is what the check asks the upstream for.
    pub image: String,
    pub namespace: String,
    /// The namespace's own credentials for the image's registry, for this check only: never
    /// stored. Without them the namespace is granted nothing but what is public or cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<WarmCredentials>,
}

/// The answer to a grant call: what the repository is, and whether the namespace may read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantResponse {
    /// The cache repository.
    pub repository: String,
    pub namespace: String,
    pub visibility: Visibility,
    /// Whether the namespace may read the repository now (always, unless it is private).
    pub granted: bool,
    /// Until when (unix seconds) the grant of a private repository holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Why nothing was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One grant, as `GET` [`GRANTS_PATH`] lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub repository: String,
    pub namespace: String,
    /// When the upstream last accepted the namespace's credentials (unix seconds).
    pub verified_at: u64,
    pub expires_at: u64,
}
