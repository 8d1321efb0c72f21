//! Real clients push and pull images through `kache registry`, byte for byte: skopeo copies
//! images built by the test into the registry and back, and the manifests, configs and layers
//! that come back must be identical to what was built, with identical digests.

use kache_testkit as support;

use std::path::{Path, PathBuf};

use support::image::{
    Content, Flavor, Image, ImageBuilder, Index, Platform, assert_bytes_eq, assert_same_blobs,
    media_type, read_dir_layout, read_oci_layout, write_dir_layout, write_oci_layout,
};
use support::{KacheRegistry, Skopeo, get, head};
use tempfile::TempDir;

/// A registry on a fresh data dir, a skopeo, and a scratch dir for layouts.
struct Env {
    tmp: TempDir,
    registry: KacheRegistry,
    skopeo: Skopeo,
}

impl Env {
    fn start() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kache-e2e-skopeo")
            .tempdir()
            .expect("create temp dir");
        // Pushes need the listener that takes writes; it serves the whole Distribution API.
        let registry = KacheRegistry::start_with_internal(tmp.path().join("data"), &[] as &[&str]);
        Env {
            tmp,
            registry,
            skopeo: Skopeo::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `docker://127.0.0.1:PORT/<reference>`.
    fn remote(&self, reference: &str) -> String {
        format!(
            "docker://{}/{reference}",
            self.registry.internal_addr().expect("internal listener")
        )
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.registry.internal_url())
    }

    /// Writes an OCI layout under the scratch dir and returns its path for `oci:PATH:TAG`.
    fn oci_layout(&self, name: &str, tagged: &[(&str, &dyn Content)]) -> String {
        let dir = self.path(name);
        write_oci_layout(&dir, tagged);
        path_str(&dir)
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temp paths are UTF-8").to_owned()
}

/// Four layers of different sizes and compressibility, one of them over 4 MiB.
fn multi_layer_image() -> Image {
    ImageBuilder::new(Flavor::Oci)
        .random_layer(1, &[13])
        .random_layer(2, &[64 << 10, 100 << 10, 3000])
        .random_layer(3, &[1024, 4 << 20])
        .random_layer(4, &[200, 5000, 70_000, 12])
        .build()
}

/// A two-layer image whose content is derived from `seed`.
fn small_image(flavor: Flavor, platform: Platform, seed: u64) -> Image {
    ImageBuilder::new(flavor)
        .platform(platform)
        .random_layer(seed, &[4096, 30_000])
        .random_layer(seed + 1, &[100, 150_000, 777])
        .build()
}

/// Fails the test unless `GET /v2/<name>/manifests/<reference>` serves `expected` exactly, with
/// its media type as Content-Type and its digest as Docker-Content-Digest; HEAD must agree.
fn assert_manifest_served(env: &Env, name: &str, reference: &str, expected: &support::Blob) {
    let url = env.url(&format!("/v2/{name}/manifests/{reference}"));
    let accept = [("Accept", media_type::ACCEPT_ALL_MANIFESTS)];
    let r = get(&url, &accept);
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    assert_bytes_eq(&format!("GET {url} body"), &expected.bytes, &r.body);
    assert_eq!(
        r.header("Content-Type"),
        Some(expected.media_type.as_str()),
        "GET {url} Content-Type"
    );
    assert_eq!(
        r.header("Docker-Content-Digest"),
        Some(expected.digest.as_str()),
        "GET {url} Docker-Content-Digest"
    );

    let r = head(&url, &accept);
    assert_eq!(r.status, 200, "HEAD {url}");
    assert!(r.body.is_empty(), "HEAD {url} sent a body");
    assert_eq!(
        r.header("Content-Type"),
        Some(expected.media_type.as_str()),
        "HEAD {url} Content-Type"
    );
    assert_eq!(
        r.header("Docker-Content-Digest"),
        Some(expected.digest.as_str()),
        "HEAD {url} Docker-Content-Digest"
    );
    let length = expected.size().to_string();
    assert_eq!(
        r.header("Content-Length"),
        Some(length.as_str()),
        "HEAD {url} Content-Length"
    );
}

/// Fails the test unless every config and layer of `image` is served at `/v2/<name>/blobs/`.
fn assert_blobs_served(env: &Env, name: &str, image: &Image) {
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        let url = env.url(&format!("/v2/{name}/blobs/{}", blob.digest));
        let r = get(&url, &[]);
        assert_eq!(r.status, 200, "GET {url}: {}", r.text());
        assert_bytes_eq(&format!("GET {url}"), &blob.bytes, &r.body);
    }
}

/// The total size of the regular files under `dir`, to see whether content was stored twice.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read data dir") {
            let entry = entry.expect("dir entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// The layouts this file builds are valid for skopeo on their own: without this, a broken
/// builder would look like a registry bug in every other test.
#[test]
fn fixtures_are_valid_images_for_skopeo() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let skopeo = Skopeo::new();
    let image = multi_layer_image();
    let index = Index::new(
        Flavor::Oci,
        vec![
            small_image(Flavor::Oci, Platform::new("linux", "amd64", None), 10),
            small_image(Flavor::Oci, Platform::new("linux", "arm64", None), 20),
        ],
    );
    let src = tmp.path().join("src");
    write_oci_layout(&src, &[("image", &image), ("index", &index)]);
    let src = path_str(&src);

    let out = tmp.path().join("image");
    skopeo.copy(
        &format!("oci:{src}:image"),
        &format!("dir:{}", path_str(&out)),
        &[],
    );
    assert_same_blobs("oci → dir", &image, &read_dir_layout(&out).all_by_digest());

    let out = tmp.path().join("index");
    let dest = format!("oci:{}:index", path_str(&out));
    skopeo.copy(&format!("oci:{src}:index"), &dest, &["--multi-arch", "all"]);
    assert_same_blobs("oci index → oci", &index, &read_oci_layout(&out).blobs);

    let docker = small_image(Flavor::Docker, Platform::linux_amd64(), 30);
    let src = tmp.path().join("docker");
    write_dir_layout(&src, &docker);
    let out = tmp.path().join("docker-out");
    let dest = format!("dir:{}", path_str(&out));
    skopeo.copy(&format!("dir:{}", path_str(&src)), &dest, &[]);
    assert_same_blobs(
        "docker dir → dir",
        &docker,
        &read_dir_layout(&out).all_by_digest(),
    );
}

#[test]
fn multi_layer_image_round_trips_byte_for_byte() {
    let env = Env::start();
    let image = multi_layer_image();
    assert!(image.layers.len() >= 3 && image.layers.iter().any(|l| l.size() > 4 << 20));
    let src = env.oci_layout("src", &[("v1", &image)]);
    let remote = env.remote("test/multi:v1");

    env.skopeo.copy(&format!("oci:{src}:v1"), &remote, &[]);

    assert_bytes_eq(
        "skopeo inspect --raw",
        &image.manifest.bytes,
        &env.skopeo.inspect_raw(&remote),
    );
    assert_manifest_served(&env, "test/multi", "v1", &image.manifest);
    assert_manifest_served(&env, "test/multi", image.digest(), &image.manifest);
    assert_blobs_served(&env, "test/multi", &image);

    // Back by tag into an OCI layout...
    let out = env.path("pulled-oci");
    env.skopeo
        .copy(&remote, &format!("oci:{}:v1", path_str(&out)), &[]);
    let layout = read_oci_layout(&out);
    assert_eq!(layout.by_name("v1").digest, image.digest());
    assert_same_blobs("pulled by tag into oci:", &image, &layout.blobs);

    // ...and by digest into a dir: directory.
    let out = env.path("pulled-dir");
    let by_digest = env.remote(&format!("test/multi@{}", image.digest()));
    env.skopeo
        .copy(&by_digest, &format!("dir:{}", path_str(&out)), &[]);
    let dir = read_dir_layout(&out);
    assert_bytes_eq("pulled manifest.json", &image.manifest.bytes, &dir.manifest);
    assert_same_blobs("pulled by digest into dir:", &image, &dir.all_by_digest());
}

#[test]
fn multi_arch_index_round_trips_with_all_children() {
    let env = Env::start();
    let index = Index::new(
        Flavor::Oci,
        vec![
            small_image(Flavor::Oci, Platform::new("linux", "amd64", None), 100),
            small_image(Flavor::Oci, Platform::new("linux", "arm64", None), 200),
            small_image(Flavor::Oci, Platform::new("linux", "arm", Some("v7")), 300),
        ],
    );
    let src = env.oci_layout("src", &[("v1", &index)]);
    let remote = env.remote("test/multiarch:v1");

    env.skopeo
        .copy(&format!("oci:{src}:v1"), &remote, &["--multi-arch", "all"]);

    assert_bytes_eq(
        "skopeo inspect --raw (index)",
        &index.index.bytes,
        &env.skopeo.inspect_raw(&remote),
    );
    assert_manifest_served(&env, "test/multiarch", "v1", &index.index);
    assert_manifest_served(&env, "test/multiarch", index.digest(), &index.index);
    for image in &index.images {
        assert_manifest_served(&env, "test/multiarch", image.digest(), &image.manifest);
        assert_blobs_served(&env, "test/multiarch", image);
    }

    let out = env.path("pulled-all");
    let dest = format!("oci:{}:v1", path_str(&out));
    env.skopeo.copy(&remote, &dest, &["--multi-arch", "all"]);
    let layout = read_oci_layout(&out);
    assert_eq!(layout.by_name("v1").digest, index.digest());
    assert_same_blobs("pulled index with --multi-arch all", &index, &layout.blobs);

    // A client on linux/arm/v7 resolves the index to its own child and gets only that.
    let out = env.path("pulled-armv7");
    let dest = format!("dir:{}", path_str(&out));
    #[rustfmt::skip]
    env.skopeo.run(&[
        "--override-os", "linux", "--override-arch", "arm", "--override-variant", "v7",
        "copy", "--preserve-digests", "--src-tls-verify=false", &remote, &dest,
    ]);
    let armv7 = &index.images[2];
    assert_same_blobs(
        "pulled linux/arm/v7",
        armv7,
        &read_dir_layout(&out).all_by_digest(),
    );
}

#[test]
fn docker_schema2_image_round_trips_with_docker_media_types() {
    let env = Env::start();
    let image = ImageBuilder::new(Flavor::Docker)
        .random_layer(7, &[512, 2 << 20])
        .random_layer(8, &[40_000])
        .random_layer(9, &[1, 2, 3, 250_000])
        .build();
    // Pushed from skopeo's dir: transport, which takes any manifest as is: skopeo 1.9's oci:
    // transport finds no image behind an index.json descriptor with a Docker media type.
    let src = env.path("src");
    write_dir_layout(&src, &image);
    let remote = env.remote("test/docker:v1");

    env.skopeo
        .copy(&format!("dir:{}", path_str(&src)), &remote, &[]);

    assert_bytes_eq(
        "skopeo inspect --raw",
        &image.manifest.bytes,
        &env.skopeo.inspect_raw(&remote),
    );
    assert_manifest_served(&env, "test/docker", "v1", &image.manifest);
    assert_manifest_served(&env, "test/docker", image.digest(), &image.manifest);
    assert_blobs_served(&env, "test/docker", &image);

    let out = env.path("pulled");
    env.skopeo
        .copy(&remote, &format!("dir:{}", path_str(&out)), &[]);
    let dir = read_dir_layout(&out);
    assert_bytes_eq("pulled manifest.json", &image.manifest.bytes, &dir.manifest);
    assert_same_blobs("pulled docker image", &image, &dir.all_by_digest());
}

#[test]
fn nested_repository_names_and_tag_lists() {
    let env = Env::start();
    let nginx = small_image(Flavor::Oci, Platform::linux_amd64(), 1000);
    let nginx_old = small_image(Flavor::Oci, Platform::linux_amd64(), 1100);
    let app = small_image(Flavor::Oci, Platform::linux_amd64(), 1200);
    let src = env.oci_layout(
        "src",
        &[("nginx", &nginx), ("nginx-old", &nginx_old), ("app", &app)],
    );
    // Cache names are `<upstream host>/<path>`, a port written `host_port`.
    let pushes = [
        ("nginx", "docker.io/library/nginx", "1.27", &nginx),
        ("nginx", "docker.io/library/nginx", "latest", &nginx),
        ("nginx-old", "docker.io/library/nginx", "1.25", &nginx_old),
        ("app", "ghcr.io/org/team/app", "v1", &app),
        ("app", "registry.example.com_5000/app", "v1", &app),
    ];
    for (src_tag, name, tag, _) in pushes {
        env.skopeo.copy(
            &format!("oci:{src}:{src_tag}"),
            &env.remote(&format!("{name}:{tag}")),
            &[],
        );
    }

    for (_, name, tag, image) in pushes {
        let remote = env.remote(&format!("{name}:{tag}"));
        assert_bytes_eq(
            &format!("skopeo inspect --raw {remote}"),
            &image.manifest.bytes,
            &env.skopeo.inspect_raw(&remote),
        );
        assert_manifest_served(&env, name, tag, &image.manifest);
    }

    let tags = |name: &str| env.skopeo.list_tags(&env.remote(name));
    assert_eq!(tags("docker.io/library/nginx"), ["1.25", "1.27", "latest"]);
    assert_eq!(tags("ghcr.io/org/team/app"), ["v1"]);
    assert_eq!(tags("registry.example.com_5000/app"), ["v1"]);

    let url = env.url("/v2/docker.io/library/nginx/tags/list");
    let r = get(&url, &[]);
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    let body = r.json();
    assert_eq!(body["name"], "docker.io/library/nginx", "GET {url}: {body}");
    let mut listed: Vec<&str> = body["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("GET {url}: no tags array: {body}"))
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, ["1.25", "1.27", "latest"], "GET {url}");

    // Pulled back by the nested name, the image is the one pushed.
    let out = env.path("pulled");
    env.skopeo.copy(
        &env.remote("docker.io/library/nginx:1.25"),
        &format!("dir:{}", path_str(&out)),
        &[],
    );
    assert_same_blobs(
        "pulled nginx:1.25",
        &nginx_old,
        &read_dir_layout(&out).all_by_digest(),
    );
}

#[test]
fn pushing_twice_is_idempotent_and_repositories_share_blobs() {
    let env = Env::start();
    let image = multi_layer_image();
    let big = image.layers.iter().map(|l| l.size()).max().expect("layers") as u64;
    let src = format!("oci:{}:v1", env.oci_layout("src", &[("v1", &image)]));
    let data_dir = env.registry.data_dir().to_path_buf();

    env.skopeo.copy(&src, &env.remote("test/a:v1"), &[]);
    let after_first = disk_usage(&data_dir);

    // The same push again: every blob is found in the repository (HEAD answers 200), so skopeo
    // uploads none of them, and the tag still names the same bytes.
    for blob in image.blobs().into_iter().skip(1) {
        let url = env.url(&format!("/v2/test/a/blobs/{}", blob.digest));
        let r = head(&url, &[]);
        assert_eq!(r.status, 200, "HEAD {url} after the push");
        let length = blob.size().to_string();
        assert_eq!(
            r.header("Content-Length"),
            Some(length.as_str()),
            "HEAD {url}"
        );
    }
    let again = env
        .skopeo
        .copy(&src, &env.remote("test/a:v1"), &["--debug"]);
    for layer in &image.layers {
        // containers/image logs this at debug level when a destination already has the blob.
        let skipped = format!("Skipping blob {}", layer.digest);
        assert!(
            again.stderr.contains(&skipped),
            "second push of test/a:v1 uploaded {} again:\n{}",
            layer.digest,
            again.stderr
        );
    }
    assert_bytes_eq(
        "test/a:v1 after second push",
        &image.manifest.bytes,
        &env.skopeo.inspect_raw(&env.remote("test/a:v1")),
    );
    assert_eq!(env.skopeo.list_tags(&env.remote("test/a")), ["v1"]);
    let after_second = disk_usage(&data_dir);
    assert!(
        after_second < after_first + big / 2,
        "data dir grew from {after_first} to {after_second} bytes on an identical push"
    );

    // Another tag and another repository for the same image reuse the stored blobs.
    env.skopeo.copy(&src, &env.remote("test/a:v2"), &[]);
    let to_b = env
        .skopeo
        .copy(&src, &env.remote("test/b:v1"), &["--debug"]);
    // Whether skopeo mounts from test/a depends on its own blob-info cache, so this is only told.
    let mounted = to_b.stderr.matches("mount OK").count();
    eprintln!("push to test/b: {mounted} blobs mounted from another repository");
    let after_b = disk_usage(&data_dir);
    assert!(
        after_b < after_second + big / 2,
        "data dir grew from {after_second} to {after_b} bytes when the same blobs were pushed \
         to a second repository: blobs are stored per repository, not by content"
    );
    assert_eq!(env.skopeo.list_tags(&env.remote("test/a")), ["v1", "v2"]);
    assert_eq!(env.skopeo.list_tags(&env.remote("test/b")), ["v1"]);

    let out = env.path("pulled-b");
    env.skopeo.copy(
        &env.remote("test/b:v1"),
        &format!("dir:{}", path_str(&out)),
        &[],
    );
    assert_same_blobs(
        "pulled test/b:v1",
        &image,
        &read_dir_layout(&out).all_by_digest(),
    );
    assert_manifest_served(&env, "test/b", image.digest(), &image.manifest);
}

#[test]
fn pushed_image_survives_kill9_and_restart() {
    let mut env = Env::start();
    let image = small_image(Flavor::Oci, Platform::linux_amd64(), 5000);
    let src = env.oci_layout("src", &[("v1", &image)]);
    let remote = env.remote("test/persist:v1");
    env.skopeo.copy(&format!("oci:{src}:v1"), &remote, &[]);

    let metrics = get(&env.registry.metrics_url(), &[]);
    assert_eq!(metrics.status, 200, "GET {}", env.registry.metrics_url());
    assert!(
        metrics.text().contains("kache_registry_"),
        "no kache_registry_* metric in:\n{}",
        metrics.text()
    );

    env.registry.kill9();
    env.registry.restart();

    // Same address, same data dir: the image is still there, byte for byte.
    assert_manifest_served(&env, "test/persist", "v1", &image.manifest);
    let out = env.path("pulled");
    env.skopeo
        .copy(&remote, &format!("dir:{}", path_str(&out)), &[]);
    assert_same_blobs(
        "pulled after restart",
        &image,
        &read_dir_layout(&out).all_by_digest(),
    );
}

#[test]
fn pushing_another_image_to_a_tag_moves_the_tag_only() {
    let env = Env::start();
    let first = small_image(Flavor::Oci, Platform::linux_amd64(), 6000);
    let second = small_image(Flavor::Oci, Platform::linux_amd64(), 6100);
    let src = env.oci_layout("src", &[("first", &first), ("second", &second)]);
    let remote = env.remote("test/moving:v1");

    env.skopeo.copy(&format!("oci:{src}:first"), &remote, &[]);
    assert_manifest_served(&env, "test/moving", "v1", &first.manifest);
    env.skopeo.copy(&format!("oci:{src}:second"), &remote, &[]);
    assert_manifest_served(&env, "test/moving", "v1", &second.manifest);

    // The image the tag named before is still there by digest (tags are mutable, digests not).
    assert_manifest_served(&env, "test/moving", first.digest(), &first.manifest);
    assert_eq!(env.skopeo.list_tags(&env.remote("test/moving")), ["v1"]);
}

/// skopeo remembers where it pushed blobs (root's cache in /var/lib/containers/cache, across runs
/// and ports) and looks there for a cross-repository mount. After a registry lost its data, that
/// memory is stale: the push must still work. A client that asks to mount a blob the registry does
/// not have gets an ordinary upload session (202), as the distribution spec says.
#[test]
fn pushes_work_when_the_clients_blob_locations_are_stale() {
    let mut env = Env::start();
    let image = small_image(Flavor::Oci, Platform::linux_amd64(), 8000);
    let src = format!("oci:{}:v1", env.oci_layout("src", &[("v1", &image)]));
    env.skopeo.copy(&src, &env.remote("test/first:v1"), &[]);

    // Same address, empty store: skopeo's memory of test/first is now wrong.
    env.registry.kill9();
    let data_dir = env.registry.data_dir().to_path_buf();
    std::fs::remove_dir_all(&data_dir).expect("wipe data dir");
    env.registry.restart();

    let layer = &image.layers[0];
    let url = env.url(&format!(
        "/v2/test/probe/blobs/uploads/?mount={}&from=test/first",
        layer.digest
    ));
    let r = support::http::request("POST", &url, &[], &[]);
    assert_eq!(r.status, 202, "POST {url}: {}", r.text());
    assert!(r.header("Location").is_some(), "POST {url}: no Location");

    env.skopeo.copy(&src, &env.remote("test/second:v1"), &[]);
    assert_manifest_served(&env, "test/second", "v1", &image.manifest);
    assert_blobs_served(&env, "test/second", &image);
}

#[test]
fn unknown_manifests_are_errors_skopeo_understands() {
    let env = Env::start();
    let image = small_image(Flavor::Oci, Platform::linux_amd64(), 7000);
    let src = env.oci_layout("src", &[("v1", &image)]);
    env.skopeo
        .copy(&format!("oci:{src}:v1"), &env.remote("test/known:v1"), &[]);

    let missing = env.remote("test/known:missing");
    let out = env
        .skopeo
        .try_run(&["inspect", "--raw", "--tls-verify=false", &missing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "skopeo inspect {missing} succeeded");
    assert!(
        stderr.contains("manifest unknown"),
        "skopeo inspect {missing}: expected 'manifest unknown', got:\n{stderr}"
    );

    // The OCI distribution spec's error codes, as JSON.
    let cases = [
        ("/v2/test/known/manifests/missing", "MANIFEST_UNKNOWN"),
        (
            "/v2/test/known/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "BLOB_UNKNOWN",
        ),
    ];
    for (path, code) in cases {
        let url = env.url(path);
        let r = get(&url, &[("Accept", media_type::ACCEPT_ALL_MANIFESTS)]);
        assert_eq!(r.status, 404, "GET {url}: {}", r.text());
        let body = r.json();
        assert_eq!(body["errors"][0]["code"], code, "GET {url}: {body}");
    }
}
