//! The kache image, as `scripts/build-image` makes it without a container engine: the same input
//! gives the same digest; it holds the binary (stripped, its debug info beside the image), the
//! libraries it loads and a non-root user, and no shell; containerd imports its archive and runs
//! kache from it as that user.

use kache_testkit as support;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::containerd::{Containerd, skip_unless_root};
use support::node::build_kache_image;

const NAME: &str = "test.invalid/kache:e2e";

/// Packages the test build of kache into `out`; the manifest digest it printed.
fn build_image(out: &Path) -> String {
    build_kache_image(Path::new(env!("CARGO_BIN_EXE_kache")), out, Some(NAME))
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("read a blob of the layout")
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON")
}

/// Every entry of a gzipped tar: path → (mode, uid, whether it is a regular file).
fn entries(layer: &[u8]) -> BTreeMap<String, (u32, u64, bool)> {
    let mut out = BTreeMap::new();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for e in tar.entries().expect("a tar") {
        let e = e.expect("a tar entry");
        let h = e.header();
        // Directories are written with a trailing slash.
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        out.insert(
            path,
            (
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.entry_type().is_file(),
            ),
        );
    }
    out
}

/// The bytes of the regular file at `path` in a gzipped tar.
fn file_of(layer: &[u8], path: &str) -> Vec<u8> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for e in tar.entries().expect("a tar") {
        let mut e = e.expect("a tar entry");
        if e.path().unwrap().to_string_lossy() == path {
            let mut out = Vec::new();
            e.read_to_end(&mut out).unwrap();
            return out;
        }
    }
    panic!("{path} is not in the layer")
}

/// The section names of an ELF file, as readelf lists them.
fn sections(file: &Path) -> Vec<String> {
    let out = Command::new("readelf")
        .args(["--section-headers", "--wide"])
        .arg(file)
        .output()
        .expect("run readelf");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            l.starts_with('[')
                .then(|| l.split_once(']')?.1.split_whitespace().next())
                .flatten()
                .map(str::to_owned)
        })
        .collect()
}

#[test]
fn the_image_is_reproducible_and_holds_only_what_kache_needs() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let first = build_image(&a);
    let second = build_image(&b);
    assert_eq!(first, second, "the same input gives the same digest");
    assert_eq!(
        std::fs::read(a.join("kache-image.tar")).unwrap(),
        std::fs::read(b.join("kache-image.tar")).unwrap(),
        "and the same archive, byte for byte"
    );

    let layout = a.join("layout");
    let index = json(&std::fs::read(layout.join("index.json")).unwrap());
    let entry = &index["manifests"][0];
    assert_eq!(entry["digest"], first.as_str());
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        NAME
    );
    let manifest = json(&blob(&layout, &first));
    let config = json(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(config["config"]["User"], "65532:65532", "not root");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/kache"])
    );
    assert_eq!(config["os"], "linux");
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    let layer = blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let files = entries(&layer);

    // The binary, the libraries ldd names, the user, and nothing that runs but kache.
    let ldd = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_kache"))
        .output()
        .unwrap();
    let libs: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(|w| w.trim_start_matches('/').to_owned())
        .collect();
    assert!(!libs.is_empty(), "the binary links libc dynamically");
    let mut expected: Vec<String> = vec![
        "usr/local/bin/kache".into(),
        "etc/passwd".into(),
        "etc/group".into(),
    ];
    expected.extend(libs);
    let regular: Vec<&String> = files
        .iter()
        .filter(|(_, (_, _, file))| *file)
        .map(|(p, _)| p)
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    expected_sorted.dedup();
    assert_eq!(
        regular,
        expected_sorted.iter().collect::<Vec<_>>(),
        "exactly these files"
    );
    for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
        assert!(!files.contains_key(shell), "{shell} is in the image");
    }
    assert_eq!(files["var/lib/kache"].1, 65532, "the data dir is kache's");
    assert_eq!(files["tmp"].0, 0o1777);

    // The binary is stripped: its symbols and debug info are beside the image, in kache.debug,
    // which the binary names for a symbolizer.
    let binary = dir.path().join("kache-from-image");
    std::fs::write(&binary, file_of(&layer, "usr/local/bin/kache")).unwrap();
    let shipped = sections(&binary);
    // (.debug_gdb_scripts is loaded data, gdb's pretty-printers, not debug info.)
    let debug_info =
        |s: &String| (s.starts_with(".debug") && s != ".debug_gdb_scripts") || s == ".symtab";
    assert!(!shipped.iter().any(debug_info), "{shipped:?}");
    assert!(
        shipped.contains(&".gnu_debuglink".to_owned()),
        "{shipped:?}"
    );
    let debug = sections(&a.join("kache.debug"));
    assert!(
        debug.contains(&".debug_info".to_owned()) && debug.contains(&".symtab".to_owned()),
        "{debug:?}"
    );
    let link = Command::new("readelf")
        .args(["--string-dump=.gnu_debuglink"])
        .arg(&binary)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("kache.debug"),
        "{}",
        String::from_utf8_lossy(&link.stdout)
    );
    let full = std::fs::metadata(env!("CARGO_BIN_EXE_kache"))
        .unwrap()
        .len();
    assert!(
        (std::fs::metadata(&binary).unwrap().len() as f64) < full as f64 / 2.0,
        "stripped, the binary is a fraction of the build's"
    );

    // The image config's diff_id is the uncompressed layer's digest.
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        support::image::sha256_digest(&tar)
    );
}

#[test]
fn containerd_imports_the_archive_and_runs_kache_as_a_user() {
    if skip_unless_root("containerd_imports_the_archive_and_runs_kache_as_a_user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let digest = build_image(dir.path());
    let archive: PathBuf = dir.path().join("kache-image.tar");
    let containerd = Containerd::start();
    let out = containerd.ctr(&["images", "import", archive.to_str().unwrap()]);
    assert!(
        out.success(),
        "ctr images import: {}{}",
        out.stdout,
        out.stderr
    );
    let image = containerd.image(NAME).expect("imported under its name");
    assert_eq!(image.digest, digest);

    let run = |id: &str, args: &[&str]| {
        let mut a = vec!["run", "--rm", NAME, id];
        a.extend_from_slice(args);
        containerd.ctr(&a)
    };
    // Arguments replace the image's command whole, entrypoint included.
    let out = run("kache-version", &["kache", "--version"]);
    assert!(out.success(), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.starts_with("kache "), "{}", out.stdout);
    // As user 65532: its own data dir is writable, the root of the filesystem is not.
    let out = run(
        "kache-fsck-own",
        &["kache", "fsck", "--data-dir", "/var/lib/kache/store"],
    );
    assert!(out.success(), "{}{}", out.stdout, out.stderr);
    let out = run(
        "kache-fsck-root",
        &["kache", "fsck", "--data-dir", "/not-mine"],
    );
    assert!(!out.success(), "a non-root user cannot create /not-mine");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("ermission denied"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn podman_loads_the_archive_under_its_name_and_digest() {
    if skip_unless_root("podman_loads_the_archive_under_its_name_and_digest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let digest = build_image(&dir.path().join("image"));
    // A store of its own: nothing of the machine's podman is read or changed.
    let podman = |args: &[&str]| {
        let o = Command::new("podman")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--runroot")
            .arg(dir.path().join("runroot"))
            .args(args)
            .output()
            .expect("run podman");
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let archive = dir.path().join("image/kache-image.tar");
    let (ok, out) = podman(&["load", "-i", archive.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("Loaded image: {NAME}")), "{out}");
    let (ok, out) = podman(&["images", "--digests", "--format", "{{.Digest}}", NAME]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), digest);
}
