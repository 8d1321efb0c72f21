//! docker-compose.yml run by Debian's podman and PyPI's podman-compose, in a podman of its own:
//! its image store, volumes and network configuration live in a temp dir, so nothing of the
//! machine's podman is read or changed, and what the stack leaves behind is plain to see.
//!
//! Two things of this machine are set in that podman's containers.conf, not in the compose file:
//! - ulimits: podman asks runc for nofile and nproc limits above what this sandbox lets a
//!   process set, and every container fails to start with "error setting rlimits"; the ones
//!   given here are below them.
//! - healthchecks: podman schedules them with systemd timers, and no systemd runs here, so a
//!   container's health stays `starting` until `podman healthcheck run` runs its check, which
//!   [`Stack::wait_healthy`] does in the timer's place.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{Ran, run_bounded};

/// The podman-compose that `scripts/compose-test-peers` installs (a virtualenv in the test bed's
/// cache), unless `KACHE_PODMAN_COMPOSE` names another.
pub fn podman_compose() -> Option<PathBuf> {
    peer(
        "KACHE_PODMAN_COMPOSE",
        "podman-compose-1.6.0/bin/podman-compose",
    )
}

/// compose-go's loader (what docker compose parses files with) as `scripts/compose-test-peers`
/// builds it, unless `KACHE_COMPOSE_CONFIG` names another.
pub fn compose_config() -> Option<PathBuf> {
    peer(
        "KACHE_COMPOSE_CONFIG",
        "compose-go-2.16.2/bin/compose-config",
    )
}

/// The program `var` names, or `cached` under ~/.cache/kache if it was built.
fn peer(var: &str, cached: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(&std::env::var_os("HOME")?)
        .join(".cache/kache")
        .join(cached);
    p.is_file().then_some(p)
}

/// The repository's docker-compose.yml.
pub fn compose_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker-compose.yml")
}

/// Upper bound on one podman or podman-compose command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// A compose project in a private podman.
#[derive(Debug)]
pub struct Stack {
    dir: TempDir,
    compose: PathBuf,
    project: String,
    env: Vec<(String, String)>,
    up: bool,
}

impl Stack {
    /// A project named `project` (so its objects are `<project>_<service>_1`, `<project>_data`)
    /// whose compose variables are `env` (images, ports).
    pub fn new(compose: PathBuf, project: &str, env: &[(&str, String)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-compose")
            .tempdir()
            .expect("create the stack's dir");
        let root = dir.path();
        for sub in ["storage", "run", "cni", "tmp"] {
            std::fs::create_dir(root.join(sub)).expect("create podman dirs");
        }
        std::fs::write(
            root.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                root.join("storage").display(),
                root.join("run").display()
            ),
        )
        .expect("write storage.conf");
        std::fs::write(
            root.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=4096:4096\"]\n\
                 [network]\nnetwork_backend = \"netavark\"\nnetwork_config_dir = \"{}\"\n\
                 [engine]\ntmp_dir = \"{}\"\n",
                root.join("cni").display(),
                root.join("tmp").display()
            ),
        )
        .expect("write containers.conf");
        Stack {
            compose,
            project: project.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            dir,
            up: false,
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `podman args...`, in the stack's podman.
    pub fn podman(&self, args: &[&str]) -> Ran {
        let mut c = self.command(Path::new("podman"));
        c.args(args);
        run_bounded(c, self.dir.path(), COMMAND_TIMEOUT)
    }

    /// Like [`Stack::podman`], failing the test unless it succeeds; its stdout.
    pub fn podman_ok(&self, args: &[&str]) -> String {
        let r = self.podman(args);
        assert!(r.success(), "podman {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout
    }

    /// `podman-compose -f docker-compose.yml -p <project> args...`.
    pub fn compose(&self, args: &[&str]) -> Ran {
        let program = podman_compose().expect("podman-compose is installed");
        let mut c = self.command(&program);
        c.arg("-f").arg(&self.compose).args(["-p", &self.project]);
        c.args(args);
        run_bounded(c, self.dir.path(), COMMAND_TIMEOUT)
    }

    /// Like [`Stack::compose`], failing the test unless it succeeds; its stdout.
    pub fn compose_ok(&self, args: &[&str]) -> String {
        let r = self.compose(args);
        assert!(
            r.success(),
            "podman-compose {args:?}: {}{}",
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// The compose file as docker compose loads it (`compose-config`, compose-go), with the
    /// stack's variables.
    pub fn docker_compose_config(&self) -> Ran {
        let program = compose_config().expect("compose-config is built");
        let mut c = self.command(&program);
        c.arg(&self.compose)
            .env("COMPOSE_PROJECT_NAME", &self.project);
        run_bounded(c, self.dir.path(), COMMAND_TIMEOUT)
    }

    /// Loads an image archive (`podman load`) into the stack's podman.
    pub fn load(&self, archive: &Path) {
        self.podman_ok(&["load", "-i", archive.to_str().expect("a UTF-8 path")]);
    }

    /// `up -d`: every service created and started.
    pub fn up(&mut self) {
        self.up = true;
        self.compose_ok(&["up", "-d"]);
    }

    /// `down -v`: containers, networks and named volumes removed.
    pub fn down(&mut self) {
        self.compose_ok(&["down", "-v"]);
        self.up = false;
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// The container of `service`, by the label podman-compose gives it.
    pub fn container(&self, service: &str) -> String {
        let out = self.podman_ok(&[
            "ps",
            "-a",
            "--filter",
            &format!("label=io.podman.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.Names}}",
        ]);
        let names: Vec<&str> = out.lines().collect();
        assert_eq!(names.len(), 1, "one container for {service}: {out}");
        names[0].to_owned()
    }

    /// A container's state as `podman inspect` tells it (`running`, `exited`...) and its exit
    /// code.
    pub fn state(&self, container: &str) -> (String, i32) {
        let out = self.podman_ok(&[
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
            container,
        ]);
        let (status, code) = out.trim().rsplit_once(' ').expect("status and exit code");
        (status.to_owned(), code.parse().expect("an exit code"))
    }

    /// Runs `service`'s healthcheck (the compose file's command, in its container) until it
    /// passes; fails the test with the last result and the container's log if it never does.
    pub fn wait_healthy(&self, service: &str, within: Duration) {
        let container = self.container(service);
        let deadline = Instant::now() + within;
        loop {
            let r = self.podman(&["healthcheck", "run", &container]);
            if r.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{service} never became healthy: {}{}\n--- log ---\n{}",
                    r.stdout,
                    r.stderr,
                    self.logs(&container)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for a one-shot service's container to exit; its exit code.
    pub fn wait_exited(&self, service: &str, within: Duration) -> i32 {
        let container = self.container(service);
        let deadline = Instant::now() + within;
        loop {
            let (status, code) = self.state(&container);
            if status == "exited" {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "{service} still {status} after {within:?}\n--- log ---\n{}",
                self.logs(&container)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A container's log, stdout and stderr.
    pub fn logs(&self, container: &str) -> String {
        let r = self.podman(&["logs", container]);
        format!("{}{}", r.stdout, r.stderr)
    }

    /// Where a named volume of the project keeps its files on this machine.
    pub fn volume_path(&self, volume: &str) -> PathBuf {
        let out = self.podman_ok(&[
            "volume",
            "inspect",
            "--format",
            "{{.Mountpoint}}",
            &format!("{}_{volume}", self.project),
        ]);
        PathBuf::from(out.trim())
    }

    /// Everything the stack's podman holds besides images: containers, pods, volumes, networks
    /// (but the built-in `podman`), and CNI network files.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for (what, args) in [
            ("container", &["ps", "-a", "--format", "{{.Names}}"][..]),
            ("pod", &["pod", "ls", "--format", "{{.Name}}"][..]),
            ("volume", &["volume", "ls", "--format", "{{.Name}}"][..]),
            ("network", &["network", "ls", "--format", "{{.Name}}"][..]),
        ] {
            let out = self.podman_ok(args);
            left.extend(
                out.lines()
                    .filter(|l| !l.is_empty())
                    .filter(|l| what != "network" || *l != "podman")
                    .map(|l| format!("{what} {l}")),
            );
        }
        let cni = self.dir.path().join("cni");
        for e in std::fs::read_dir(&cni).expect("read the CNI dir") {
            let name = e.expect("a CNI dir entry").file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".conflist") {
                left.push(format!("network file {name}"));
            }
        }
        left
    }
}

impl Drop for Stack {
    /// A failed test still takes its stack down, so no container keeps a port or a mount.
    fn drop(&mut self) {
        if self.up {
            let r = self.compose(&["down", "-v", "-t", "1"]);
            if !r.success() {
                eprintln!("podman-compose down: {}{}", r.stdout, r.stderr);
            }
        }
        // Images are files under the dir; their overlay mounts go with `podman system reset`.
        let _ = self.podman(&["system", "reset", "--force"]);
    }
}
