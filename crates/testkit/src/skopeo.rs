//! A skopeo runner with its own signature policy, registries.d, auth file and temp dir, so it
//! needs nothing from /etc/containers. (skopeo 1.9 still reads /etc/containers/registries.conf,
//! and no flag or variable stops that; references to 127.0.0.1:PORT are fully qualified, so only
//! a mirror configured for that very address could change what they reach.)

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

/// Upper bound on one skopeo command (skopeo's own `--command-timeout`).
const COMMAND_TIMEOUT: &str = "300s";

/// What a successful skopeo command printed.
#[derive(Debug)]
pub struct SkopeoOutput {
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl SkopeoOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Runs `skopeo` with a private configuration. Registries are plain HTTP on 127.0.0.1, so the
/// helpers that talk to one turn TLS verification off (skopeo then falls back to HTTP).
#[derive(Debug)]
pub struct Skopeo {
    dir: TempDir,
}

impl Default for Skopeo {
    fn default() -> Self {
        Self::new()
    }
}

impl Skopeo {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-skopeo")
            .tempdir()
            .expect("create skopeo config dir");
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        };
        // skopeo refuses to copy without a signature policy; tests sign nothing.
        write(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        );
        // REGISTRY_AUTH_FILE points here: `skopeo login` in a test writes nowhere else.
        write("auth.json", r#"{"auths":{}}"#);
        for sub in ["registries.d", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create skopeo subdir");
        }
        Skopeo { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `skopeo <global options> args...` and returns its output whatever the exit status.
    pub fn try_run(&self, args: &[&str]) -> Output {
        let mut command = Command::new("skopeo");
        command
            .arg("--policy")
            .arg(self.path("policy.json"))
            .arg("--registries.d")
            .arg(self.path("registries.d"))
            .arg("--tmpdir")
            .arg(self.path("tmp"))
            .arg("--command-timeout")
            .arg(COMMAND_TIMEOUT)
            .args(args)
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .stdin(Stdio::null());
        command.output().unwrap_or_else(|e| {
            panic!("cannot run skopeo (is it installed? apt-get install skopeo): {e}")
        })
    }

    /// Runs skopeo and fails the test, with skopeo's stderr, unless it succeeds.
    pub fn run(&self, args: &[&str]) -> SkopeoOutput {
        let output = self.try_run(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success(),
            "skopeo {} failed with {}\n--- stderr ---\n{stderr}\n--- stdout ---\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
        );
        SkopeoOutput {
            stdout: output.stdout,
            stderr,
        }
    }

    /// `skopeo copy --preserve-digests` with TLS verification off on both sides; `extra` goes
    /// before the references (e.g. `--all`, `--format v2s2`).
    pub fn copy(&self, src: &str, dest: &str, extra: &[&str]) -> SkopeoOutput {
        let mut args = vec![
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[src, dest]);
        self.run(&args)
    }

    /// `skopeo inspect --raw`: the manifest (or index) bytes exactly as served.
    pub fn inspect_raw(&self, reference: &str) -> Vec<u8> {
        self.run(&["inspect", "--raw", "--tls-verify=false", reference])
            .stdout
    }

    /// `skopeo list-tags`, sorted.
    pub fn list_tags(&self, repository: &str) -> Vec<String> {
        let out = self.run(&["list-tags", "--tls-verify=false", repository]);
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("list-tags output is not JSON ({e}): {}", out.stdout_text())
        });
        let mut tags: Vec<String> = value["Tags"]
            .as_array()
            .unwrap_or_else(|| panic!("list-tags output has no Tags array: {value}"))
            .iter()
            .map(|t| t.as_str().expect("tag is a string").to_owned())
            .collect();
        tags.sort();
        tags
    }
}
