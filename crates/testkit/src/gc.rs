//! Helpers of the garbage-collection tests: images pushed and pulled over plain HTTP (checked
//! digest by digest, failures returned rather than panicking, so a load can count them), and
//! collections run through the admin route or `kache gc`.

use std::process::{Command, Stdio};

use super::http::try_request;
use super::image::{Content, sha256_digest};

/// Pushes `content` (an image: config and layers, then the manifest) as `<repo>:<tag>`, asking
/// first whether each blob is there, as real clients do. Err says what failed.
pub fn push(base: &str, repo: &str, tag: &str, content: &dyn Content) -> Result<(), String> {
    let blobs = content.blobs();
    for blob in blobs.iter().skip(1) {
        let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
        let r = try_request("HEAD", &url, &[], &[]).map_err(|e| format!("HEAD {url}: {e}"))?;
        if r.status == 200 {
            continue;
        }
        let url = format!("{base}/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
        let r = try_request(
            "POST",
            &url,
            &[("Content-Type", "application/octet-stream")],
            &blob.bytes,
        )
        .map_err(|e| format!("POST {url}: {e}"))?;
        if r.status != 201 {
            return Err(format!("POST {url}: {} {}", r.status, r.text()));
        }
    }
    let top = content.top();
    let url = format!("{base}/v2/{repo}/manifests/{tag}");
    let r = try_request(
        "PUT",
        &url,
        &[("Content-Type", top.media_type.as_str())],
        &top.bytes,
    )
    .map_err(|e| format!("PUT {url}: {e}"))?;
    if r.status != 201 {
        return Err(format!("PUT {url}: {} {}", r.status, r.text()));
    }
    Ok(())
}

/// Pulls `<repo>:<reference>` and checks it is `content`, byte for byte. Err says what failed.
pub fn pull(base: &str, repo: &str, reference: &str, content: &dyn Content) -> Result<(), String> {
    let top = content.top();
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let r = try_request("GET", &url, &[("Accept", top.media_type.as_str())], &[])
        .map_err(|e| format!("GET {url}: {e}"))?;
    if r.status != 200 || r.body != top.bytes {
        return Err(format!("GET {url}: {} {}", r.status, r.text()));
    }
    for blob in content.blobs().iter().skip(1) {
        let url = format!("{base}/v2/{repo}/blobs/{}", blob.digest);
        let r = try_request("GET", &url, &[], &[]).map_err(|e| format!("GET {url}: {e}"))?;
        if r.status != 200 {
            return Err(format!("GET {url}: {} {}", r.status, r.text()));
        }
        if sha256_digest(&r.body) != blob.digest {
            return Err(format!(
                "GET {url}: {} bytes of something else",
                r.body.len()
            ));
        }
    }
    Ok(())
}

/// `POST /kache/v1/gc` on `base` (the internal listener): the report.
pub fn collect(base: &str, dry_run: bool) -> serde_json::Value {
    let url = format!("{base}/kache/v1/gc?dryRun={dry_run}");
    let r = super::http::request("POST", &url, &[], &[]);
    assert_eq!(r.status, 200, "POST {url}: {}", r.text());
    r.json()
}

/// What `kache gc --registry <url> [args]` printed, and whether it succeeded.
pub fn kache_gc(registry: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(crate::kache_bin())
        .arg("gc")
        .arg("--registry")
        .arg(registry)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run kache gc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A tmpfs of `size` mounted on a new directory, unmounted when dropped (needs root).
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-tmpfs")
            .tempdir()
            .expect("create mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs on {}",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
