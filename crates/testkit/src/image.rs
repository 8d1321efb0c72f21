//! Images built in memory, deterministically: gzip'd tar layers with pseudo-random content, a
//! config whose `rootfs.diff_ids` match the layers, and an OCI or Docker schema2 manifest (or an
//! index over several). They are written as an OCI image layout or a skopeo `dir:` directory, and
//! layouts that skopeo wrote are read back to compare blob for blob.
//!
//! Written here rather than with oci-spec: the point is control over the exact manifest bytes
//! (pretty-printed JSON, Docker media types) so the tests can tell whether anything re-encoded them.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

pub mod media_type {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// An `Accept` header value naming every manifest type the tests use.
    pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
        application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json, \
        application/vnd.docker.distribution.manifest.list.v2+json";
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One piece of content-addressed data with the media type it is referenced by.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for Blob {
    // The bytes can be megabytes: show what identifies the blob instead.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("media_type", &self.media_type)
            .field("digest", &self.digest)
            .field("size", &self.bytes.len())
            .finish()
    }
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// The digest without its `sha256:` prefix.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// An OCI/Docker descriptor: `{"mediaType","digest","size"}`.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size() })
    }
}

/// Which family of media types an image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Oci,
    /// Docker image manifest v2 schema 2 (and manifest list for an index).
    Docker,
}

impl Flavor {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Flavor::Oci => media_type::OCI_MANIFEST,
            Flavor::Docker => media_type::DOCKER_MANIFEST,
        }
    }
    pub fn index_type(self) -> &'static str {
        match self {
            Flavor::Oci => media_type::OCI_INDEX,
            Flavor::Docker => media_type::DOCKER_MANIFEST_LIST,
        }
    }
    pub fn config_type(self) -> &'static str {
        match self {
            Flavor::Oci => media_type::OCI_CONFIG,
            Flavor::Docker => media_type::DOCKER_CONFIG,
        }
    }
    pub fn layer_type(self) -> &'static str {
        match self {
            Flavor::Oci => media_type::OCI_LAYER_GZIP,
            Flavor::Docker => media_type::DOCKER_LAYER_GZIP,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    pub fn linux_amd64() -> Self {
        Self::new("linux", "amd64", None)
    }

    fn to_json(&self) -> Value {
        let mut p = json!({ "os": self.os, "architecture": self.architecture });
        if let Some(v) = &self.variant {
            p["variant"] = json!(v);
        }
        p
    }
}

/// Something that can be pushed as one reference: a single image or an index.
pub trait Content {
    /// The manifest or index that a tag points at.
    fn top(&self) -> &Blob;
    /// Every blob reachable from [`top`](Self::top), including it.
    fn blobs(&self) -> Vec<&Blob>;
    fn digest(&self) -> &str {
        &self.top().digest
    }
}

/// A single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub flavor: Flavor,
    pub platform: Platform,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Content for Image {
    fn top(&self) -> &Blob {
        &self.manifest
    }
    fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = vec![&self.manifest, &self.config];
        blobs.extend(&self.layers);
        blobs
    }
}

/// An OCI index (or Docker manifest list) over single-platform images.
#[derive(Clone, Debug)]
pub struct Index {
    pub index: Blob,
    pub images: Vec<Image>,
}

impl Index {
    /// Builds the index over `images`, each entry carrying its image's platform.
    pub fn new(flavor: Flavor, images: Vec<Image>) -> Self {
        let manifests: Vec<Value> = images
            .iter()
            .map(|image| {
                let mut d = image.manifest.descriptor();
                d["platform"] = image.platform.to_json();
                d
            })
            .collect();
        let doc = json!({
            "schemaVersion": 2,
            "mediaType": flavor.index_type(),
            "manifests": manifests,
        });
        Index {
            index: Blob::new(flavor.index_type(), pretty(&doc)),
            images,
        }
    }
}

impl Content for Index {
    fn top(&self) -> &Blob {
        &self.index
    }
    fn blobs(&self) -> Vec<&Blob> {
        let mut blobs = vec![&self.index];
        for image in &self.images {
            blobs.extend(image.blobs());
        }
        blobs
    }
}

/// Builds an [`Image`] layer by layer.
#[derive(Debug)]
pub struct ImageBuilder {
    flavor: Flavor,
    platform: Platform,
    layers: Vec<Vec<(String, Vec<u8>)>>,
    /// Set by [`program`](Self::program): the file that runs, written with mode 0755.
    entrypoint: Option<String>,
}

impl ImageBuilder {
    /// A linux/amd64 image of the given flavor with no layers yet.
    pub fn new(flavor: Flavor) -> Self {
        ImageBuilder {
            flavor,
            platform: Platform::linux_amd64(),
            layers: Vec::new(),
            entrypoint: None,
        }
    }

    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// A layer holding exactly these files (path, contents).
    pub fn layer(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.layers.push(files);
        self
    }

    /// A layer holding an executable at `path` (relative, e.g. `bin/app`), which becomes the
    /// image's entrypoint: an image a container runtime can start.
    pub fn program(mut self, path: &str, contents: Vec<u8>) -> Self {
        self.entrypoint = Some(path.to_owned());
        self.layer(vec![(path.to_owned(), contents)])
    }

    /// A layer with one file per entry of `sizes`, alternating text-like (compressible) and
    /// pseudo-random (incompressible) contents, all derived from `seed`.
    pub fn random_layer(self, seed: u64, sizes: &[usize]) -> Self {
        let files = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let file_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
                let contents = if i % 2 == 0 {
                    text_bytes(file_seed, size)
                } else {
                    random_bytes(file_seed, size)
                };
                (format!("data/layer-{seed}/file-{i}"), contents)
            })
            .collect();
        self.layer(files)
    }

    pub fn build(self) -> Image {
        let flavor = self.flavor;
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        for (n, files) in self.layers.iter().enumerate() {
            let tar = tar_bytes(files, self.entrypoint.as_deref());
            diff_ids.push(sha256_digest(&tar));
            history.push(json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": format!("kache e2e test layer {n}"),
            }));
            layers.push(Blob::new(flavor.layer_type(), gzip(&tar)));
        }
        let mut config = json!({
            "created": "2024-01-01T00:00:00Z",
            "os": self.platform.os,
            "architecture": self.platform.architecture,
            "config": match &self.entrypoint {
                Some(path) => json!({ "Entrypoint": [format!("/{path}")], "Env": ["PATH=/usr/bin:/bin"] }),
                None => json!({ "Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"] }),
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        if let Some(v) = &self.platform.variant {
            config["variant"] = json!(v);
        }
        let config = Blob::new(
            flavor.config_type(),
            serde_json::to_vec(&config).expect("serialize config"),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": flavor.manifest_type(),
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        Image {
            flavor,
            platform: self.platform,
            manifest: Blob::new(flavor.manifest_type(), pretty(&manifest)),
            config,
            layers,
        }
    }
}

/// Manifests are pretty-printed on purpose: a registry or client that re-encodes JSON changes
/// these bytes and so the digest, which the byte-for-byte checks then catch.
fn pretty(value: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("serialize JSON")
}

/// splitmix64: a tiny deterministic generator, so every run builds the same images.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` pseudo-random bytes derived from `seed` (incompressible).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` bytes of word-like text derived from `seed` (compresses well, like real files).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "kache", "layer", "image", "blob", "digest", "manifest", "registry", "pull", "push",
        "node", "pod", "cache", "sha256", "tar", "gzip", "index",
    ];
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        let r = splitmix64(&mut state);
        out.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
        out.push(if r >> 60 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// A reproducible tar stream: fixed owners, modes and times; `executable` gets mode 0755.
fn tar_bytes(files: &[(String, Vec<u8>)], executable: Option<&str>) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in files {
        let mut header = tar::Header::new_ustar();
        header
            .set_path(path)
            .unwrap_or_else(|e| panic!("tar path {path}: {e}"));
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(contents.len() as u64);
        header.set_mode(if Some(path.as_str()) == executable {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_704_067_200);
        header.set_cksum();
        builder
            .append(&header, contents.as_slice())
            .expect("append tar entry");
    }
    builder.into_inner().expect("finish tar")
}

/// gzip with a zero mtime and no file name, so the same input always gives the same bytes.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzBuilder::new().write(Vec::new(), Compression::default());
    encoder.write_all(data).expect("gzip write");
    encoder.finish().expect("gzip finish")
}

fn write_file(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Writes an OCI image layout at `dir` (`oci-layout`, `index.json`, `blobs/sha256/...`) with one
/// `org.opencontainers.image.ref.name` per entry, so skopeo can read `oci:DIR:TAG`.
pub fn write_oci_layout(dir: &Path, tagged: &[(&str, &dyn Content)]) {
    write_file(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    );
    let mut manifests = Vec::new();
    for (tag, content) in tagged {
        let mut d = content.top().descriptor();
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        manifests.push(d);
        for blob in content.blobs() {
            write_file(&dir.join("blobs/sha256").join(blob.hex()), &blob.bytes);
        }
    }
    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    write_file(&dir.join("index.json"), &pretty(&index));
}

/// Writes skopeo's `dir:` transport format for one image: `manifest.json`, one file per blob
/// named by its hex digest, and `version`. Unlike `oci:`, it takes any manifest type as is.
pub fn write_dir_layout(dir: &Path, image: &Image) {
    write_file(&dir.join("version"), b"Directory Transport Version: 1.1\n");
    write_file(&dir.join("manifest.json"), &image.manifest.bytes);
    write_file(&dir.join(image.config.hex()), &image.config.bytes);
    for layer in &image.layers {
        write_file(&dir.join(layer.hex()), &layer.bytes);
    }
}

/// An entry of an OCI layout's `index.json`.
#[derive(Clone, Debug)]
pub struct LayoutRef {
    pub name: Option<String>,
    pub media_type: String,
    pub digest: String,
}

/// What an OCI image layout holds: its `index.json` entries and every blob by digest.
#[derive(Debug)]
pub struct OciLayoutContents {
    pub refs: Vec<LayoutRef>,
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl OciLayoutContents {
    /// The entry tagged `name`; fails the test if there is none.
    pub fn by_name(&self, name: &str) -> &LayoutRef {
        self.refs
            .iter()
            .find(|r| r.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no {name:?} in layout index: {:?}", self.refs))
    }
}

/// Reads an OCI image layout (such as one skopeo wrote with `oci:DIR:TAG`).
pub fn read_oci_layout(dir: &Path) -> OciLayoutContents {
    let index: Value = serde_json::from_slice(&read_file(&dir.join("index.json")))
        .expect("layout index.json is JSON");
    let refs = index["manifests"]
        .as_array()
        .expect("index.json has manifests")
        .iter()
        .map(|d| LayoutRef {
            name: d["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .map(str::to_owned),
            media_type: d["mediaType"].as_str().unwrap_or_default().to_owned(),
            digest: d["digest"].as_str().expect("descriptor digest").to_owned(),
        })
        .collect();
    let mut blobs = BTreeMap::new();
    let blob_dir = dir.join("blobs/sha256");
    for entry in
        std::fs::read_dir(&blob_dir).unwrap_or_else(|e| panic!("read {}: {e}", blob_dir.display()))
    {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        blobs.insert(format!("sha256:{name}"), read_file(&entry.path()));
    }
    OciLayoutContents { refs, blobs }
}

/// What a skopeo `dir:` directory holds.
#[derive(Debug)]
pub struct DirContents {
    /// `manifest.json`: the top-level manifest or index.
    pub manifest: Vec<u8>,
    /// Every other file that holds content, by digest: blobs (named by hex) and, after
    /// `--all`, the instance manifests (`<hex>.manifest.json`).
    pub blobs: BTreeMap<String, Vec<u8>>,
}

impl DirContents {
    /// The manifest and every blob, by digest: comparable with [`Content::blobs`].
    pub fn all_by_digest(&self) -> BTreeMap<String, Vec<u8>> {
        let mut all = self.blobs.clone();
        all.insert(sha256_digest(&self.manifest), self.manifest.clone());
        all
    }
}

/// Reads a directory that skopeo wrote with `dir:DIR`.
pub fn read_dir_layout(dir: &Path) -> DirContents {
    let manifest = read_file(&dir.join("manifest.json"));
    let mut blobs = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let entry = entry.expect("dir entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex = name.strip_suffix(".manifest.json").unwrap_or(&name);
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            blobs.insert(format!("sha256:{hex}"), read_file(&entry.path()));
        }
    }
    DirContents { manifest, blobs }
}

/// Fails the test unless `got` holds exactly the blobs of `expected`, byte for byte.
pub fn assert_same_blobs(what: &str, expected: &dyn Content, got: &BTreeMap<String, Vec<u8>>) {
    let expected_blobs = expected.blobs();
    for blob in &expected_blobs {
        match got.get(&blob.digest) {
            None => panic!("{what}: missing {blob:?}; have {:?}", got.keys()),
            Some(bytes) => assert_bytes_eq(&format!("{what}: {blob:?}"), &blob.bytes, bytes),
        }
    }
    let extra: Vec<_> = got
        .iter()
        .filter(|(d, _)| !expected_blobs.iter().any(|b| &b.digest == *d))
        .map(|(d, b)| format!("{d} ({} bytes)", b.len()))
        .collect();
    assert!(extra.is_empty(), "{what}: unexpected blobs {extra:?}");
}

/// `assert_eq!` for byte strings that may be megabytes: reports sizes, the first differing
/// offset and short excerpts, instead of printing everything.
pub fn assert_bytes_eq(what: &str, expected: &[u8], got: &[u8]) {
    if expected == got {
        return;
    }
    let first_diff = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    // JSON shows as text, layers as hex.
    let start = first_diff.saturating_sub(32);
    let excerpt = |b: &[u8]| {
        let window = &b[start.min(b.len())..(first_diff + 64).min(b.len())];
        match std::str::from_utf8(window) {
            Ok(text) => format!("{text:?}"),
            Err(_) => hex::encode(window),
        }
    };
    panic!(
        "{what}: bytes differ\n  expected {} bytes ({}), got {} bytes ({})\n  \
         first difference at offset {first_diff}; from offset {start}:\n  \
         expected: {}\n  got:      {}",
        expected.len(),
        sha256_digest(expected),
        got.len(),
        sha256_digest(got),
        excerpt(expected),
        excerpt(got),
    );
}
