//! The parts of a manifest a registry reads: what it references and what it is about.
//! The bytes themselves are never re-serialised; digests are always of what was received.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::media_type::{self, MANIFEST_TYPES};

/// Largest manifest kache takes, pushed or pulled: the limit distribution and most clients use.
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// Why bytes are not a manifest kache accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest schemaVersion must be 2")]
    SchemaVersion,
    #[error(
        "manifest media type {0:?} is not supported (OCI image manifest or index, Docker schema2 manifest or manifest list)"
    )]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {body:?} differs from Content-Type {header:?}")]
    MediaTypeMismatch { body: String, header: String },
    #[error("manifest media type could not be determined: set Content-Type or mediaType")]
    UnknownMediaType,
    #[error("{0} manifest must have {1}")]
    MissingField(&'static str, &'static str),
}

/// A platform as written in an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<u32>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

/// A manifest or index as far as a registry cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    /// The effective media type: what `Content-Type` must say when it is served.
    pub media_type: String,
    pub artifact_type: Option<String>,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    /// Child manifests of an index.
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ParsedManifest {
    /// Parses `bytes` received with `content_type` (the request's header, if any).
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Self, ManifestError> {
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if raw.schema_version != Some(2) {
            return Err(ManifestError::SchemaVersion);
        }
        let header = content_type
            .map(media_type::essence)
            .filter(|h| !h.is_empty());
        let media_type = match (raw.media_type.as_deref(), header) {
            (Some(body), Some(header)) if MANIFEST_TYPES.contains(&header) && body != header => {
                return Err(ManifestError::MediaTypeMismatch {
                    body: body.to_owned(),
                    header: header.to_owned(),
                });
            }
            (Some(body), _) => body.to_owned(),
            (None, Some(header)) if MANIFEST_TYPES.contains(&header) => header.to_owned(),
            // OCI makes mediaType optional in the body; the structure then says which it is.
            (None, _) if raw.manifests.is_some() => media_type::OCI_INDEX.to_owned(),
            (None, _) if raw.config.is_some() => media_type::OCI_MANIFEST.to_owned(),
            (None, Some(header)) => {
                return Err(ManifestError::UnsupportedMediaType(header.to_owned()));
            }
            (None, None) => return Err(ManifestError::UnknownMediaType),
        };
        if !MANIFEST_TYPES.contains(&media_type.as_str()) {
            return Err(ManifestError::UnsupportedMediaType(media_type));
        }
        let parsed = ParsedManifest {
            artifact_type: raw.artifact_type,
            config: raw.config,
            layers: raw.layers.unwrap_or_default(),
            manifests: raw.manifests.unwrap_or_default(),
            subject: raw.subject,
            annotations: raw.annotations,
            media_type,
        };
        if media_type::is_index(&parsed.media_type) {
            if parsed.config.is_some() || !parsed.layers.is_empty() {
                return Err(ManifestError::MissingField(
                    "an index",
                    "manifests and no config or layers",
                ));
            }
        } else if parsed.config.is_none() {
            return Err(ManifestError::MissingField(
                "an image",
                "a config descriptor",
            ));
        }
        Ok(parsed)
    }

    pub fn is_index(&self) -> bool {
        media_type::is_index(&self.media_type)
    }

    /// The blobs that must be present before this manifest is accepted: config and layers,
    /// except layers that registries never hold.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(
            self.layers
                .iter()
                .filter(|l| !media_type::NON_DISTRIBUTABLE_LAYERS.contains(&l.media_type.as_str())),
        )
    }

    /// Every digest this manifest points at (blobs and child manifests), for garbage
    /// collection. The subject is not included: a referrer does not keep its subject alive.
    pub fn references(&self) -> impl Iterator<Item = &Digest> {
        self.config
            .iter()
            .chain(self.layers.iter())
            .chain(self.manifests.iter())
            .map(|d| &d.digest)
    }

    /// The artifact type a referrers listing reports: `artifactType`, else the config's
    /// media type for an image manifest.
    pub fn effective_artifact_type(&self) -> Option<&str> {
        self.artifact_type
            .as_deref()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> String {
        Digest::sha256(s.as_bytes()).to_string()
    }

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,{extra}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":2}},{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{}","size":3,"urls":["https://example.invalid/x"]}}]}}"#,
            d("c"),
            d("l"),
            d("f")
        )
    }

    #[test]
    fn infers_type_and_lists_references() {
        let m = ParsedManifest::parse(image("").as_bytes(), None).unwrap();
        assert_eq!(m.media_type, media_type::OCI_MANIFEST);
        assert_eq!(
            m.required_blobs().count(),
            2,
            "foreign layer is not required"
        );
        assert_eq!(m.references().count(), 3);
        assert_eq!(
            m.effective_artifact_type(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn header_and_body_must_agree() {
        let body = image(&format!(r#""mediaType":"{}","#, media_type::OCI_MANIFEST));
        assert!(ParsedManifest::parse(body.as_bytes(), Some(media_type::OCI_MANIFEST)).is_ok());
        assert!(matches!(
            ParsedManifest::parse(body.as_bytes(), Some(media_type::DOCKER_MANIFEST)),
            Err(ManifestError::MediaTypeMismatch { .. })
        ));
        let body = image(&format!(
            r#""mediaType":"{}","#,
            media_type::DOCKER_MANIFEST
        ));
        let m = ParsedManifest::parse(body.as_bytes(), Some("application/json")).unwrap();
        assert_eq!(m.media_type, media_type::DOCKER_MANIFEST);
    }

    #[test]
    fn refuses_unknown_types_and_garbage() {
        let body = image(r#""mediaType":"application/vnd.docker.distribution.manifest.v1+json","#);
        assert!(matches!(
            ParsedManifest::parse(body.as_bytes(), None),
            Err(ManifestError::UnsupportedMediaType(_))
        ));
        assert!(ParsedManifest::parse(b"{", None).is_err());
        assert!(ParsedManifest::parse(b"[]", None).is_err());
        assert!(ParsedManifest::parse(br#"{"schemaVersion":1}"#, None).is_err());
        assert_eq!(
            ParsedManifest::parse(br#"{"schemaVersion":2}"#, None),
            Err(ManifestError::UnknownMediaType)
        );
        let bad_digest = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:../..","size":1},"layers":[]}"#;
        assert!(matches!(
            ParsedManifest::parse(bad_digest, None),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn index_children_and_platforms() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":5,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#,
            media_type::OCI_INDEX,
            media_type::OCI_MANIFEST,
            d("child")
        );
        let m = ParsedManifest::parse(body.as_bytes(), None).unwrap();
        assert!(m.is_index());
        assert_eq!(m.required_blobs().count(), 0);
        assert_eq!(
            m.manifests[0].platform.as_ref().unwrap().variant.as_deref(),
            Some("v8")
        );
    }
}
