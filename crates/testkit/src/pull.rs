//! Shared pieces of the pull-through tests: a scratch dir with a skopeo, the images they pull,
//! and checks of what came back (byte-identical content, the spec's error bodies).

use std::cell::Cell;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tempfile::TempDir;

use super::Skopeo;
use super::http::Response;
use super::image::{
    Content, Flavor, Image, ImageBuilder, Index, OciLayoutContents, Platform, assert_same_blobs,
    media_type, read_oci_layout, write_oci_layout,
};

/// A scratch dir for layouts, data dirs and configs, and a skopeo.
#[derive(Debug)]
pub struct Scratch {
    tmp: TempDir,
    pub skopeo: Skopeo,
    /// Numbers the output dirs.
    outputs: Cell<usize>,
}

impl Scratch {
    pub fn new(prefix: &str) -> Self {
        Scratch {
            tmp: tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .expect("create temp dir"),
            skopeo: Skopeo::new(),
            outputs: Cell::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes an OCI layout of `tagged` and returns `oci:<dir>` (add `:<tag>`).
    pub fn layout(&self, name: &str, tagged: &[(&str, &dyn Content)]) -> String {
        let dir = self.path(name);
        write_oci_layout(&dir, tagged);
        format!("oci:{}", path_str(&dir))
    }

    /// Copies `src` into a new OCI layout as `pulled` and reads it back.
    pub fn pull(&self, src: &str, extra: &[&str]) -> OciLayoutContents {
        let dir = self.next_output();
        self.skopeo
            .copy(src, &format!("oci:{}:pulled", path_str(&dir)), extra);
        read_oci_layout(&dir)
    }

    /// Runs a `skopeo copy` that must fail; returns its stderr.
    pub fn copy_fails(&self, src: &str, dest: &str, extra: &[&str]) -> String {
        let mut args = vec!["copy", "--src-tls-verify=false", "--dest-tls-verify=false"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[src, dest]);
        let out = self.skopeo.try_run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "skopeo {} succeeded but must fail\n{stderr}",
            args.join(" ")
        );
        stderr
    }

    pub fn pull_fails(&self, src: &str, extra: &[&str]) -> String {
        let dir = self.next_output();
        self.copy_fails(src, &format!("oci:{}:pulled", path_str(&dir)), extra)
    }

    pub fn next_output(&self) -> PathBuf {
        self.outputs.set(self.outputs.get() + 1);
        self.path(&format!("pulled-{}", self.outputs.get()))
    }
}

pub fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// The cache repository of `<upstream host>/<path>`: `127.0.0.1_5000/<path>`.
pub fn cache_repo(upstream_host: &str, path: &str) -> String {
    format!("{}/{path}", upstream_host.replace(':', "_"))
}

/// Fails the test unless a pull wrote exactly `content` (top digest and every blob, byte for
/// byte) as `pulled`.
pub fn assert_pulled(what: &str, content: &dyn Content, got: &OciLayoutContents) {
    assert_eq!(got.by_name("pulled").digest, content.digest(), "{what}");
    assert_same_blobs(what, content, &got.blobs);
}

/// Fails the test unless `r` is the spec's error: one of `statuses`, and a body
/// `{"errors":[{"code","message",...}]}` whose first code is `code`.
pub fn assert_spec_error(what: &str, r: &Response, statuses: &[u16], code: &str) {
    assert!(
        statuses.contains(&r.status),
        "{what}: status {} (expected one of {statuses:?}): {}",
        r.status,
        r.text()
    );
    let body = r.json();
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no errors array in {body}"));
    assert!(!errors.is_empty(), "{what}: empty errors array");
    assert_eq!(errors[0]["code"], code, "{what}: {body}");
    assert!(errors[0]["message"].is_string(), "{what}: {body}");
}

/// Four layers of different sizes and compressibility.
pub fn multi_layer_image(seed: u64) -> Image {
    ImageBuilder::new(Flavor::Oci)
        .random_layer(seed, &[13])
        .random_layer(seed + 1, &[64 << 10, 100 << 10, 3000])
        .random_layer(seed + 2, &[1024, 700 << 10])
        .random_layer(seed + 3, &[200, 5000, 70_000, 12])
        .build()
}

pub fn platform_image(platform: Platform, seed: u64) -> Image {
    ImageBuilder::new(Flavor::Oci)
        .platform(platform)
        .random_layer(seed, &[4096, 30_000])
        .random_layer(seed + 1, &[100, 50_000])
        .build()
}

/// An index over linux/amd64, linux/arm64/v8 and linux/arm/v7 images, in that order.
pub fn three_arch_index(seed: u64) -> Index {
    Index::new(
        Flavor::Oci,
        vec![
            platform_image(Platform::linux_amd64(), seed),
            platform_image(Platform::new("linux", "arm64", Some("v8")), seed + 10),
            platform_image(Platform::new("linux", "arm", Some("v7")), seed + 20),
        ],
    )
}

pub fn manifest_headers() -> [(&'static str, &'static str); 1] {
    [("Accept", media_type::ACCEPT_ALL_MANIFESTS)]
}

/// A docker config.json giving `user:password` for `registry` (as the `auths` key is written).
pub fn write_docker_config(path: &Path, registry: &str, user: &str, password: &str) {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = serde_json::json!({ "auths": { registry: { "auth": auth } } });
    std::fs::write(path, config.to_string()).expect("write docker config");
}
