//! CNCF distribution 2.8 (Debian's `docker-registry`) as a real upstream registry: open, behind
//! htpasswd Basic auth, behind a token server, or as a pull-through proxy of another registry.
//!
//! Each instance has a temp dir with its generated `config.yml`, its filesystem storage, and two
//! logs: distribution writes its access log (Apache combined format, one line per request, after
//! the response) to stdout and its application log to stderr, and has no setting to write either
//! to a file, so the child's stdout goes to `access.log` and stderr to `registry.log`.

use crate::process::{self, NotServing};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Debian's package installs the binary under this name.
const BINARY: &str = "docker-registry";
/// How long a started registry has to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// bcrypt's minimum cost: distribution only needs a bcrypt entry, and tests should not spend
/// a quarter second per login hashing.
const BCRYPT_COST: u32 = 4;

/// What distribution needs to trust a token server (see `support::token::TokenServer`).
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM file with the certificates that token signing chains must lead to.
    pub root_cert_bundle: PathBuf,
}

/// Which distribution to run.
#[derive(Clone, Debug)]
pub enum DistributionKind {
    /// No authentication: anyone pulls and pushes.
    Open,
    /// `auth.htpasswd`: HTTP Basic with these (user, password) pairs.
    Htpasswd { users: Vec<(String, String)> },
    /// `auth.token`: Bearer tokens from a token server.
    Token(TokenAuth),
    /// `proxy.remoteurl`: a read-only pull-through cache of `remote_url` (e.g. another
    /// Distribution's `base_url()`), with credentials for it if it needs them.
    Proxy {
        remote_url: String,
        credentials: Option<(String, String)>,
    },
}

impl DistributionKind {
    /// `Htpasswd` with one user.
    pub fn htpasswd(user: &str, password: &str) -> Self {
        DistributionKind::Htpasswd {
            users: vec![(user.to_owned(), password.to_owned())],
        }
    }

    /// `Proxy` of `remote_url` without credentials.
    pub fn proxy(remote_url: &str) -> Self {
        DistributionKind::Proxy {
            remote_url: remote_url.to_owned(),
            credentials: None,
        }
    }
}

/// One line of distribution's access log:
/// `127.0.0.1 - - [22/Nov/2026:04:35:59 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogLine {
    /// The client's IP address (no port).
    pub remote: String,
    /// Always `-`: the logger reads users from the URL, never from Authorization.
    pub user: String,
    /// As logged, e.g. `22/Nov/2026:04:35:59 +0000`.
    pub time: String,
    pub method: String,
    /// Path and query as the client sent them.
    pub uri: String,
    pub protocol: String,
    pub status: u16,
    /// Body bytes written.
    pub size: u64,
    pub referer: String,
    pub user_agent: String,
}

impl AccessLogLine {
    /// Parses one line; `None` if it is not in the combined format.
    pub fn parse(line: &str) -> Option<Self> {
        let (remote, rest) = line.split_once(' ')?;
        let (_ident, rest) = rest.split_once(' ')?;
        let (user, rest) = rest.split_once(' ')?;
        let rest = rest.strip_prefix('[')?;
        let (time, rest) = rest.split_once("] ")?;
        let (request, rest) = quoted(rest)?;
        let mut parts = request.splitn(3, ' ');
        let method = parts.next()?.to_owned();
        let uri = parts.next()?.to_owned();
        let protocol = parts.next().unwrap_or_default().to_owned();
        let rest = rest.trim_start();
        let (status, rest) = rest.split_once(' ')?;
        let (size, rest) = rest.split_once(' ')?;
        let (referer, rest) = quoted(rest)?;
        let (user_agent, _) = quoted(rest.trim_start())?;
        Some(AccessLogLine {
            remote: remote.to_owned(),
            user: user.to_owned(),
            time: time.to_owned(),
            method,
            uri,
            protocol,
            status: status.parse().ok()?,
            // `-` when nothing was written.
            size: size.parse().unwrap_or(0),
            referer,
            user_agent,
        })
    }
}

/// A `"..."` field with backslash escapes at the start of `s`, and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// A running `docker-registry serve config.yml` on 127.0.0.1; killed when dropped, and its
/// logs printed if that happens during a panic.
#[derive(Debug)]
pub struct Distribution {
    kind: DistributionKind,
    addr: SocketAddr,
    child: Option<Child>,
    /// Kept (not deleted) when dropped during a panic, for reading the logs and config.
    dir: Option<TempDir>,
    root: PathBuf,
}

impl Distribution {
    /// Writes the configuration for `kind`, starts distribution on a free port and waits until
    /// `GET /v2/` answers (401 counts for the auth kinds).
    pub fn start(kind: DistributionKind) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kache-distribution")
            .tempdir()
            .expect("create distribution dir");
        let root = dir.path().to_path_buf();
        if let DistributionKind::Htpasswd { users } = &kind {
            write_htpasswd(&root.join("htpasswd"), users);
        }
        let mut registry = Distribution {
            kind,
            addr: free_addr(),
            child: None,
            dir: Some(dir),
            root,
        };
        // The port is free when picked but not held: another process may take it before
        // distribution binds it, so a start that loses that race tries another port.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            registry.write_config();
            match registry.spawn() {
                Ok(()) => return registry,
                Err(e) if e.contains("address already in use") && attempt < ATTEMPTS => {
                    registry.note(&format!(
                        "port {} was taken; picking another",
                        registry.addr
                    ));
                    registry.addr = free_addr();
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    pub fn kind(&self) -> &DistributionKind {
        &self.kind
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`: the registry host of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The filesystem storage's root directory.
    pub fn storage_dir(&self) -> PathBuf {
        self.root.join("storage")
    }

    /// Whether the storage holds the blob `digest` (`sha256:...`): for a proxy, whether it has
    /// finished caching it.
    pub fn has_blob(&self, digest: &str) -> bool {
        let (algorithm, hex) = digest
            .split_once(':')
            .unwrap_or_else(|| panic!("not a digest: {digest}"));
        // Filesystem driver layout: docker/registry/v2/blobs/<alg>/<2 hex>/<hex>/data.
        self.storage_dir()
            .join("docker/registry/v2/blobs")
            .join(algorithm)
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
            .is_file()
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.yml")
    }

    pub fn access_log_path(&self) -> PathBuf {
        self.root.join("access.log")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join("registry.log")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills distribution (SIGKILL) and reaps it; storage and logs stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::kill(&mut child);
            self.note("killed with SIGKILL");
        }
    }

    /// Starts distribution again on the same port, configuration and storage (stopping it
    /// first if it still runs), and waits until it answers.
    pub fn start_again(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// The application log (stderr) so far, across restarts.
    pub fn logs(&self) -> String {
        read_lossy(&self.log_path())
    }

    /// Every access log line so far, across restarts. A request's line is written once its
    /// response is complete, so a client may see its answer a moment before the line appears:
    /// see [`wait_for_requests`](Self::wait_for_requests).
    pub fn access_log_lines(&self) -> Vec<AccessLogLine> {
        read_lossy(&self.access_log_path())
            .lines()
            .filter_map(AccessLogLine::parse)
            .collect()
    }

    /// How many logged requests had this method and `uri_substring` in their path and query.
    pub fn count_requests(&self, method: &str, uri_substring: &str) -> usize {
        self.access_log_lines()
            .iter()
            .filter(|l| l.method.eq_ignore_ascii_case(method) && l.uri.contains(uri_substring))
            .count()
    }

    /// Polls the access log until [`count_requests`](Self::count_requests) reaches `at_least`
    /// or `timeout` passes, and returns the last count.
    pub fn wait_for_requests(
        &self,
        method: &str,
        uri_substring: &str,
        at_least: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count_requests(method, uri_substring);
            if n >= at_least || Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_config(&self) {
        let storage = self.storage_dir();
        let q = |s: &str| serde_json::to_string(s).expect("quote YAML string");
        let path = |p: &Path| q(p.to_str().expect("temp paths are UTF-8"));
        let mut yaml = format!(
            "version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {addr}
  secret: {secret}
  headers:
    X-Content-Type-Options: [nosniff]
",
            storage = path(&storage),
            addr = q(&self.addr.to_string()),
            // Fixed, so upload sessions stay valid across a restart (and no warning is logged).
            secret = q("kache-test-upstream-secret"),
        );
        match &self.kind {
            DistributionKind::Open => {}
            DistributionKind::Htpasswd { .. } => {
                yaml.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: {}\n    path: {}\n",
                    q("kache-test"),
                    path(&self.root.join("htpasswd")),
                ));
            }
            DistributionKind::Token(auth) => {
                yaml.push_str(&format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                     rootcertbundle: {}\n",
                    q(&auth.realm),
                    q(&auth.service),
                    q(&auth.issuer),
                    path(&auth.root_cert_bundle),
                ));
            }
            DistributionKind::Proxy {
                remote_url,
                credentials,
            } => {
                yaml.push_str(&format!("proxy:\n  remoteurl: {}\n", q(remote_url)));
                if let Some((user, password)) = credentials {
                    yaml.push_str(&format!(
                        "  username: {}\n  password: {}\n",
                        q(user),
                        q(password)
                    ));
                }
            }
        }
        std::fs::write(self.config_path(), yaml).expect("write distribution config");
    }

    /// Starts the child and waits for it; `Err` with a message (log included) on failure.
    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "distribution already running");
        let append = |p: &Path| -> File {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        };
        let mut command = Command::new(BINARY);
        command
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(append(&self.access_log_path()))
            .stderr(append(&self.log_path()));
        // REGISTRY_* variables override the config file: none from the caller may leak in.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REGISTRY_") {
                command.env_remove(name);
            }
        }
        self.note(&format!("starting {command:?}"));
        let child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot run {BINARY} (is it installed? apt-get install docker-registry): {e}")
        });
        self.child = Some(child);
        self.wait_ready()
    }

    /// Polls `GET /v2/` until it answers 200 or 401, the child exits, or the timeout passes.
    fn wait_ready(&mut self) -> Result<(), String> {
        let url = format!("{}/v2/", self.base_url());
        let child = self.child.as_mut().expect("child is running");
        match process::wait_serving(child, &url, READY_TIMEOUT, |s| s == 200 || s == 401) {
            Ok(()) => Ok(()),
            Err(NotServing::Exited(status)) => {
                self.child = None;
                Err(format!(
                    "distribution exited with {status} before serving {url}:\n{}",
                    self.log_tail()
                ))
            }
            Err(NotServing::Silent(last)) => {
                self.stop();
                Err(format!(
                    "distribution did not answer on {url} within {READY_TIMEOUT:?} (last: {last}):\n{}",
                    self.log_tail()
                ))
            }
        }
    }

    /// Marks an event in the application log, so restarts are visible when reading it.
    fn note(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(f, "===== test harness: {what}");
        }
    }

    /// The ends of both logs and the configuration, framed for test output.
    fn log_tail(&self) -> String {
        let tail = |s: String| {
            let mut start = s.len().saturating_sub(32 * 1024);
            while !s.is_char_boundary(start) {
                start += 1;
            }
            s[start..].to_owned()
        };
        format!(
            "----- distribution {} config ({}) -----\n{}\n\
             ----- distribution log ({}) -----\n{}\n\
             ----- distribution access log ({}) -----\n{}\n----- end of logs -----",
            self.addr,
            self.config_path().display(),
            read_lossy(&self.config_path()),
            self.log_path().display(),
            tail(self.logs()),
            self.access_log_path().display(),
            tail(read_lossy(&self.access_log_path())),
        )
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
            if let Some(dir) = self.dir.take() {
                eprintln!("(distribution dir kept in {})", dir.keep().display());
            }
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// An htpasswd file with a bcrypt (`$2y$`) entry per user: the only kind distribution accepts.
fn write_htpasswd(path: &Path, users: &[(String, String)]) {
    let mut text = String::new();
    for (user, password) in users {
        assert!(
            !user.contains(':'),
            "htpasswd user names cannot hold ':': {user}"
        );
        let hash = bcrypt::hash_with_result(password, BCRYPT_COST)
            .expect("bcrypt hash")
            .format_for_version(bcrypt::Version::TwoY);
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
