//! `kache-bench suite`: every row of BENCHMARKS.md in one run.
//!
//! Starts on 127.0.0.1: nginx (sendfile) serving the blob files; CNCF distribution holding the
//! same blobs (the warm peer); a second distribution as the upstream of the cold pulls, with
//! its access log counting upstream requests; distribution in proxy mode in front of that
//! upstream; `kache registry` with the same blobs pushed through its internal listener; and
//! `kache proxy` in front of it. Then measures each step on every server back to back, so the
//! ratios come from one machine in one state, and prints Markdown on stdout (progress on
//! stderr).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use sha2::{Digest as _, Sha256};

use crate::client::{self, Url};
use crate::load::{self, ColdResult, LoadResult, LoadSpec, StreamResult};
use crate::parse_duration;
use crate::procs::{self, Proc};

mod gc;
mod pod;

const MIB: u64 = 1 << 20;
/// The repository of the blobs in distribution, and the upstream path kache caches.
const REPO: &str = "bench/app";
const TAG: &str = "v1";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// What containerd sends when it resolves a tag.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// The kache binary, built with --release.
    #[arg(long, default_value = "target/release/kache")]
    kache: PathBuf,
    /// Scratch directory for blobs, stores and logs (about 12 GiB at the default sizes).
    #[arg(long)]
    work: PathBuf,
    /// Length of each load step (1 MiB blob, manifests).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Length of each download-throughput step.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    stream_duration: Duration,
    /// Connections of the 1 MiB blob and manifest steps.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Size of the large blob, MiB.
    #[arg(long, default_value_t = 512)]
    big_mib: u64,
    /// Size of the blob of the memory run, MiB.
    #[arg(long, default_value_t = 2048)]
    huge_mib: u64,
    /// Clients of the concurrent cold pull.
    #[arg(long, default_value_t = 32)]
    cold_clients: usize,
    /// Size of the blob of the concurrent cold pull, MiB.
    #[arg(long, default_value_t = 64)]
    cold_clients_mib: u64,
    /// Rounds of each warm step (servers interleaved in every round); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Manifests of the garbage-collection step's store (each with a config and 9 layers: ten
    /// blobs a manifest).
    #[arg(long, default_value_t = 10_000)]
    gc_manifests: usize,
    /// Size of the image of the pod step, MiB.
    #[arg(long, default_value_t = 100)]
    pod_image_mib: u64,
    /// Only these steps (comma-separated): blob, stream, manifest, cold, memory, webhook, gc,
    /// pod.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The whole run is stopped after this long.
    #[arg(long, value_parser = parse_duration, default_value = "15m")]
    max_time: Duration,
    /// Start and fill the servers, print their addresses, keep them up this long, then stop
    /// without measuring (for profiling one of them by hand).
    #[arg(long, value_parser = parse_duration)]
    hold: Option<Duration>,
    /// Also write the report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// The kache proxy's `--http-server` (`kache` or `hyper`); its own default when not given.
    #[arg(long, alias = "proxy-relay")]
    proxy_http_server: Option<String>,
    /// The kache registry's `--http-server` (`kache` or `hyper`); its own default when not given.
    #[arg(long, alias = "registry-server")]
    registry_http_server: Option<String>,
}

impl Options {
    fn wants(&self, step: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == step)
    }
}

pub async fn run(o: Options) -> Result<()> {
    std::fs::create_dir_all(&o.work)?;
    let started = Instant::now();
    // Ctrl-C, SIGTERM and --max-time all drop the suite, and with it every server it started.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = tokio::select! {
        r = tokio::time::timeout(o.max_time, suite(&o)) => match r {
            Ok(r) => r?,
            Err(_) => bail!(
                "stopped after --max-time {:?}; servers were stopped",
                o.max_time
            ),
        },
        _ = tokio::signal::ctrl_c() => bail!("interrupted; servers were stopped"),
        _ = term.recv() => bail!("terminated; servers were stopped"),
    };
    let report = format!(
        "{report}\nWhole run: {:.0} s.\n",
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    std::io::stdout().flush()?;
    if let Some(p) = &o.out {
        std::fs::write(p, &report).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- blobs

#[derive(Debug, Clone)]
struct Blob {
    path: PathBuf,
    size: u64,
    digest: String,
}

impl Blob {
    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Writes `size` pseudo-random bytes (xorshift, distinct per seed) and hashes them on the way.
fn make_blob(path: &Path, size: u64, seed: u64) -> Result<Blob> {
    let mut f = std::fs::File::create(path)?;
    let mut h = Sha256::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        h.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(Blob {
        path: path.to_owned(),
        size,
        digest: format!("sha256:{}", hex::encode(h.finalize())),
    })
}

fn write_blob(path: &Path, bytes: &[u8]) -> Result<Blob> {
    std::fs::write(path, bytes)?;
    Ok(Blob {
        path: path.to_owned(),
        size: bytes.len() as u64,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(bytes))),
    })
}

#[derive(Debug)]
struct Blobs {
    config: Blob,
    small: Blob,
    big: Blob,
    huge: Blob,
    cold: Blob,
    cold_many: Blob,
    manifest: Bytes,
    manifest_digest: String,
}

async fn make_blobs(o: &Options, dir: &Path) -> Result<Blobs> {
    std::fs::create_dir_all(dir)?;
    let mk = |name: &str, mib: u64, seed: u64| {
        let p = dir.join(name);
        async move {
            tokio::task::spawn_blocking(move || make_blob(&p, mib * MIB, seed))
                .await
                .map_err(|e| anyhow!("{e}"))?
        }
    };
    let small = mk("small.bin", 1, 1).await?;
    let big = mk("big.bin", o.big_mib, 2).await?;
    let huge = if o.wants("memory") {
        mk("huge.bin", o.huge_mib, 3).await?
    } else {
        write_blob(&dir.join("huge.bin"), b"not measured")?
    };
    let cold = mk("cold.bin", o.big_mib, 4).await?;
    let cold_many = mk("cold-many.bin", o.cold_clients_mib, 5).await?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [&small.digest, &big.digest]},
    });
    let config = write_blob(&dir.join("config.json"), &serde_json::to_vec(&config)?)?;
    let layer = |b: &Blob| {
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": b.digest,
            "size": b.size,
        })
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.size,
        },
        "layers": [layer(&small), layer(&big)],
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest)?);
    let manifest_digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    Ok(Blobs {
        config,
        small,
        big,
        huge,
        cold,
        cold_many,
        manifest,
        manifest_digest,
    })
}

// ---------------------------------------------------------------- servers

fn distribution_config(root: &Path, port: u16, access_log: bool, remote: Option<&str>) -> String {
    let mut y = format!(
        "version: 0.1
log:
  level: {level}
  formatter: text
  accesslog:
    disabled: {no_access}
storage:
  filesystem:
    rootdirectory: {root}/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: kache-bench-secret
",
        level = if access_log { "info" } else { "warn" },
        no_access = !access_log,
        root = root.display(),
    );
    if let Some(r) = remote {
        let _ = write!(y, "proxy:\n  remoteurl: {r}\n");
    }
    y
}

fn start_distribution(
    name: &str,
    work: &Path,
    pids: &Path,
    access_log: bool,
    remote: Option<&str>,
) -> Result<(Proc, String)> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let port = procs::free_port()?;
    let config = dir.join("config.yml");
    std::fs::write(&config, distribution_config(&dir, port, access_log, remote))?;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&config);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("REGISTRY_") {
            cmd.env_remove(k);
        }
    }
    // Its access log is on stdout: <name>.out.
    let p = Proc::spawn(name, cmd, &dir, pids)?;
    Ok((p, format!("http://127.0.0.1:{port}")))
}

fn start_nginx(work: &Path, pids: &Path, root: &Path) -> Result<(Proc, String)> {
    let dir = work.join("nginx");
    std::fs::create_dir_all(dir.join("tmp"))?;
    let port = procs::free_port()?;
    let d = dir.display();
    let conf = format!(
        "user root;
worker_processes auto;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type application/octet-stream;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
  }}
}}
",
        root = root.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf_path);
    let p = Proc::spawn("nginx", cmd, &dir, pids)?;
    Ok((p, format!("http://127.0.0.1:{port}")))
}

fn kache_command(kache: &Path) -> Command {
    let mut cmd = Command::new(kache);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KACHE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Polls `url` until it answers anything but a connection error.
async fn wait_ready(p: &mut Proc, url: &str) -> Result<()> {
    wait_ready_tls(p, url, None).await
}

async fn wait_ready_tls(p: &mut Proc, url: &str, cacert: Option<&Path>) -> Result<()> {
    let url = Url::parse(url, cacert)?;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        p.check_alive()?;
        if client::fetch(&url, Method::GET, &HeaderMap::new(), client::empty())
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{} did not answer {url} within 20 s", p.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- webhook

/// A CA and a serving certificate for 127.0.0.1, as the webhook's cert-manager would make:
/// `(ca.pem, tls.crt, tls.key)` written into `dir`.
fn webhook_pki(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kache-bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "kache-bench webhook");
    let cert = leaf.signed_by(&key, &issuer)?;
    let paths = (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&paths.0, ca_cert.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    Ok(paths)
}

/// What the API server sends when a Deployment's pod is created: four images to rewrite
/// (Docker Hub short name, a nested Docker Hub name, ghcr.io, registry.k8s.io), one of them an
/// init container.
fn admission_review() -> Result<Bytes> {
    let container = |name: &str, image: &str| {
        serde_json::json!({
            "name": name,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "env": [{"name": "LOG_LEVEL", "value": "info"}],
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
        })
    };
    let review = serde_json::json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"],
            },
            "object": {
                "kind": "Pod",
                "apiVersion": "v1",
                "metadata": {
                    "generateName": "web-7d9c8b6f5-",
                    "namespace": "shop",
                    "labels": {"app": "web", "pod-template-hash": "7d9c8b6f5"},
                    "ownerReferences": [{
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": "web-7d9c8b6f5",
                        "uid": "6f1e1f57-8c4d-4b8e-9a55-2f1d1f7b9c11",
                        "controller": true,
                        "blockOwnerDeletion": true,
                    }],
                },
                "spec": {
                    "initContainers": [container("migrate", "ghcr.io/shop/migrate:2.3.1")],
                    "containers": [
                        container("web", "nginx:1.27"),
                        container("app", "bitnami/redis:7.2"),
                        container("pause", "registry.k8s.io/pause:3.9"),
                    ],
                    "restartPolicy": "Always",
                    "dnsPolicy": "ClusterFirst",
                    "serviceAccountName": "default",
                    "enableServiceLinks": true,
                },
                "status": {},
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    });
    Ok(Bytes::from(serde_json::to_vec(&review)?))
}

// ---------------------------------------------------------------- pushes

fn content_length(n: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h
}

/// One request, bounded: uploads of the large blobs take seconds, not minutes.
async fn call(
    url: &str,
    method: Method,
    headers: &HeaderMap,
    body: client::ReqBody,
) -> Result<(StatusCode, HeaderMap, Bytes)> {
    let u = Url::parse(url, None)?;
    tokio::time::timeout(
        Duration::from_secs(180),
        client::fetch(&u, method.clone(), headers, body),
    )
    .await
    .map_err(|_| anyhow!("{method} {url}: no answer in 180 s"))?
}

/// kache takes a monolithic upload in one request: `POST .../uploads/?digest=`.
async fn push_blob_kache(base: &str, repo: &str, blob: &Blob) -> Result<()> {
    let (body, len) = client::file_body(&blob.path).await?;
    let url = format!("{base}/v2/{repo}/blobs/uploads/?digest={}", blob.digest);
    let (status, _, text) = call(&url, Method::POST, &content_length(len), body).await?;
    if status != StatusCode::CREATED {
        bail!("POST {url}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

/// distribution 2.8 ignores the body of `POST ?digest=` (it opens a session), so: POST, then
/// the whole blob in the closing PUT.
async fn push_blob_distribution(base: &str, repo: &str, blob: &Blob) -> Result<()> {
    let (body, len) = client::file_body(&blob.path).await?;
    push_body_distribution(base, repo, &blob.digest, body, len).await
}

/// [`push_blob_distribution`] of a body already at hand.
async fn push_body_distribution(
    base: &str,
    repo: &str,
    digest: &str,
    body: client::ReqBody,
    len: u64,
) -> Result<()> {
    let url = format!("{base}/v2/{repo}/blobs/uploads/");
    let (status, headers, _) = call(&url, Method::POST, &HeaderMap::new(), client::empty()).await?;
    if status != StatusCode::ACCEPTED {
        bail!("POST {url}: {status}");
    }
    let loc = headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("upload without Location")?;
    // Location may be absolute: keep path and query.
    let path = match loc.find("/v2/") {
        Some(i) => &loc[i..],
        None => loc,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let put = format!("{base}{path}{sep}digest={digest}");
    let (status, _, text) = call(&put, Method::PUT, &content_length(len), body).await?;
    if status != StatusCode::CREATED {
        bail!("PUT {put}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

async fn put_manifest(base: &str, repo: &str, manifest: &Bytes) -> Result<()> {
    let url = format!("{base}/v2/{repo}/manifests/{TAG}");
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_MANIFEST));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(manifest.len()));
    let (status, _, text) = call(&url, Method::PUT, &h, client::full(manifest.clone())).await?;
    if status != StatusCode::CREATED {
        bail!("PUT {url}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

// ---------------------------------------------------------------- measuring

/// A server under test: a URL prefix and the processes whose CPU and memory count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    KacheProxy,
    KacheRegistry,
    Distribution,
    Nginx,
    Webhook,
}

#[derive(Debug, Clone)]
struct Server {
    kind: Kind,
    label: &'static str,
    /// `(name, pid)`; CPU includes each one's descendants.
    procs: Vec<(&'static str, u32)>,
    /// Peak RSS is tracked for these (kache and distribution; nginx's workers are not).
    track_memory: bool,
}

#[derive(Debug, Clone, Default)]
struct Usage {
    /// CPU seconds per process, in `Server::procs` order.
    cpu: Vec<f64>,
    /// Peak RSS per process during the step, bytes.
    peak: Vec<u64>,
}

impl Usage {
    fn cpu_total(&self) -> f64 {
        self.cpu.iter().sum()
    }
}

struct Meter {
    ticks_per_s: f64,
}

impl Meter {
    fn start(&self, s: &Server) -> Vec<u64> {
        if s.track_memory {
            for (_, pid) in &s.procs {
                let _ = procs::reset_peak(*pid);
            }
        }
        s.procs.iter().map(|(_, p)| procs::tree_ticks(*p)).collect()
    }

    fn end(&self, s: &Server, before: Vec<u64>) -> Usage {
        let cpu = s
            .procs
            .iter()
            .zip(before)
            .map(|((_, p), b)| procs::tree_ticks(*p).saturating_sub(b) as f64 / self.ticks_per_s)
            .collect();
        let peak = if s.track_memory {
            s.procs
                .iter()
                .map(|(_, p)| procs::memory(*p).map_or(0, |m| m.1))
                .collect()
        } else {
            Vec::new()
        };
        Usage { cpu, peak }
    }
}

fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = v.len() / 2;
    v.swap_remove(mid)
}

/// Samples VmRSS of some processes every 50 ms until stopped.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Vec<u64>>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            // Bounded: 180 s of samples at most.
            for _ in 0..3600 {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                samples.push(
                    pids.iter()
                        .map(|p| procs::memory(*p).map_or(0, |m| m.0))
                        .collect(),
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> Vec<Vec<u64>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Addresses of the servers under test.
#[derive(Debug)]
struct Urls {
    nginx: String,
    dist: String,
    upstream: String,
    dproxy: String,
    registry: String,
    registry_metrics: String,
    proxy: String,
    proxy_metrics: String,
    /// The repository kache caches the upstream's under: `127.0.0.1_<port>/bench/app`.
    kache_repo: String,
    /// The upstream distribution's access log, where upstream requests are counted.
    upstream_log: PathBuf,
}

impl Urls {
    fn blob(&self, kind: Kind, blob: &Blob) -> String {
        let (repo, d) = (&self.kache_repo, &blob.digest);
        match kind {
            Kind::KacheProxy => format!("{}/v2/{repo}/blobs/{d}", self.proxy),
            Kind::KacheRegistry => format!("{}/v2/{repo}/blobs/{d}", self.registry),
            Kind::Distribution => format!("{}/v2/{REPO}/blobs/{d}", self.dist),
            // The webhook serves no blobs; it is never asked.
            Kind::Nginx | Kind::Webhook => format!("{}/{}", self.nginx, blob.file_name()),
        }
    }

    fn manifest(&self, kind: Kind, reference: &str) -> String {
        let repo = &self.kache_repo;
        match kind {
            Kind::KacheProxy => format!("{}/v2/{repo}/manifests/{reference}", self.proxy),
            Kind::KacheRegistry => format!("{}/v2/{repo}/manifests/{reference}", self.registry),
            Kind::Distribution | Kind::Nginx | Kind::Webhook => {
                format!("{}/v2/{REPO}/manifests/{reference}", self.dist)
            }
        }
    }
}

/// What every step shares: options, servers, blobs, and the report being written.
struct Bench<'a> {
    o: &'a Options,
    work: PathBuf,
    kache: PathBuf,
    /// Where started processes are noted (for `bench/run` to stop if this one dies).
    pids: PathBuf,
    b: Blobs,
    urls: Urls,
    meter: Meter,
    kproxy: Server,
    kreg: Server,
    sdist: Server,
    snginx: Server,
    md: String,
    notes: Vec<String>,
    budgets: Vec<Budget>,
    /// Each kache process's peak RSS per step, for the memory table.
    memory_rows: Vec<MemRow>,
}

/// Counts access-log lines of the upstream distribution; waits until the log stops growing
/// (a line is written once its response is complete).
fn count_log(path: &Path, method: &str, needle: &str) -> usize {
    let count = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"{method} ")) && l.contains(needle))
            .count()
    };
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = count();
    let mut stable_since = Instant::now();
    while Instant::now() < until && stable_since.elapsed() < Duration::from_millis(700) {
        std::thread::sleep(Duration::from_millis(100));
        let n = count();
        if n != last {
            last = n;
            stable_since = Instant::now();
        }
    }
    last
}

/// Sum of the samples of `metric` whose labels include every `k="v"` of `labels`.
async fn metric(url: &str, metric: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let (_, _, text) = call(url, Method::GET, &HeaderMap::new(), client::empty()).await?;
    let text = String::from_utf8_lossy(&text);
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (labels_text, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if labels
            .iter()
            .all(|(k, v)| labels_text.contains(&format!("{k}=\"{v}\"")))
        {
            sum += value
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Ok(sum)
}

fn mb(bps: f64) -> String {
    format!("{:.0}", bps / 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let neg = s.starts_with('-');
    let digits: Vec<char> = s.trim_start_matches('-').chars().collect();
    let mut out = String::new();
    for (i, c) in digits.iter().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(*c);
    }
    if neg { format!("-{out}") } else { out }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemStep {
    Blob,
    Stream1,
    Stream4,
    Huge,
}

/// Peak RSS of the two kache processes in one step.
#[derive(Debug)]
struct MemRow {
    step: String,
    key: MemStep,
    proxy: u64,
    registry: u64,
}

impl MemRow {
    /// From the usage of the kache proxy server (proxy first, registry second).
    fn of(step: String, key: MemStep, u: &Usage) -> Self {
        MemRow {
            step,
            key,
            proxy: u.peak.first().copied().unwrap_or(0),
            registry: u.peak.get(1).copied().unwrap_or(0),
        }
    }
}

/// One budget line: what DESIGN.md asks, what was measured, whether it holds.
struct Budget {
    what: String,
    measured: String,
    met: Option<bool>,
}

fn budget(what: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Budget {
    Budget {
        what: what.into(),
        measured: measured.into(),
        met,
    }
}

// ---------------------------------------------------------------- the run

fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    format!("{cores} cores ({model}), {mem} memory, Linux {kernel}")
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

fn git_rev() -> String {
    let rev = version("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{rev} with uncommitted changes")
    } else {
        rev
    }
}

fn note_errors(notes: &mut Vec<String>, what: &str, errors: u64, first: &Option<String>) {
    if errors > 0 {
        notes.push(format!(
            "{what}: {errors} errors, the first: {}",
            first.as_deref().unwrap_or("?")
        ));
    }
}

async fn suite(o: &Options) -> Result<String> {
    let work = std::fs::canonicalize(&o.work)?;
    let kache = std::fs::canonicalize(&o.kache).with_context(|| {
        format!(
            "{} (build it: cargo build --release -p kache)",
            o.kache.display()
        )
    })?;
    let pids = work.join("pids");
    let blob_dir = work.join("blobs");
    let mut md = String::new();

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(md, "Machine: {}.  ", machine());
    let _ = writeln!(
        md,
        "Servers: kache {} ({}), {}, {}.  ",
        version(&kache.to_string_lossy(), &["--version"]).trim_start_matches("kache "),
        git_rev(),
        version("docker-registry", &["--version"]),
        version("nginx", &["-v"]),
    );
    let _ = writeln!(
        md,
        "Client: kache-bench on the same cores; {} connections; load steps {:?}, stream steps {:?}, {} round(s), median reported.\n",
        o.connections, o.duration, o.stream_duration, o.rounds
    );

    eprintln!("making blobs in {}", blob_dir.display());
    let b = make_blobs(o, &blob_dir).await?;

    eprintln!("starting servers");
    let (mut nginx, nginx_url) = start_nginx(&work, &pids, &blob_dir)?;
    let (mut dist, dist_url) = start_distribution("distribution", &work, &pids, false, None)?;
    let (mut upstream, upstream_url) = start_distribution("upstream", &work, &pids, true, None)?;
    // distribution's proxy mode pings its remote when it starts, and exits if it cannot.
    wait_ready(&mut upstream, &format!("{upstream_url}/v2/")).await?;
    let (mut dproxy, dproxy_url) = start_distribution(
        "distribution-proxy",
        &work,
        &pids,
        true,
        Some(&upstream_url),
    )?;
    let upstream_host = upstream_url.trim_start_matches("http://").to_owned();
    let upstream_log = work.join("upstream").join("upstream.out");
    let kache_repo = format!("{}/{REPO}", upstream_host.replace(':', "_"));

    let (reg_port, reg_internal, reg_metrics) = (
        procs::free_port()?,
        procs::free_port()?,
        procs::free_port()?,
    );
    let reg_dir = work.join("kache-registry");
    std::fs::create_dir_all(&reg_dir)?;
    let mut cmd = kache_command(&kache);
    cmd.arg("registry")
        .arg("--listen")
        .arg(format!("127.0.0.1:{reg_port}"))
        .arg("--internal-listen")
        .arg(format!("127.0.0.1:{reg_internal}"))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{reg_metrics}"))
        .arg("--data-dir")
        .arg(reg_dir.join("data"))
        .arg("--insecure-registry")
        .arg(&upstream_host)
        // Longer than the run: a warm tag is never re-validated in the middle of it.
        .arg("--tag-ttl")
        .arg("1h");
    if let Some(server) = &o.registry_http_server {
        cmd.arg("--http-server").arg(server);
    }
    let mut registry = Proc::spawn("kache-registry", cmd, &reg_dir, &pids)?;
    let registry_url = format!("http://127.0.0.1:{reg_port}");
    let registry_internal = format!("http://127.0.0.1:{reg_internal}");
    let registry_metrics = format!("http://127.0.0.1:{reg_metrics}/metrics");

    let (px_port, px_metrics) = (procs::free_port()?, procs::free_port()?);
    let px_dir = work.join("kache-proxy");
    std::fs::create_dir_all(&px_dir)?;
    let mut cmd = kache_command(&kache);
    cmd.arg("proxy")
        .arg("--listen")
        .arg(format!("127.0.0.1:{px_port}"))
        .arg("--registry")
        .arg(&registry_url)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{px_metrics}"))
        .arg("--insecure-registry")
        .arg(&upstream_host);
    if let Some(server) = &o.proxy_http_server {
        cmd.arg("--http-server").arg(server);
    }
    let mut proxy = Proc::spawn("kache-proxy", cmd, &px_dir, &pids)?;
    let proxy_url = format!("http://127.0.0.1:{px_port}");
    let proxy_metrics = format!("http://127.0.0.1:{px_metrics}/metrics");

    wait_ready(&mut nginx, &format!("{nginx_url}/{}", b.small.file_name())).await?;
    wait_ready(&mut dist, &format!("{dist_url}/v2/")).await?;
    wait_ready(&mut dproxy, &format!("{dproxy_url}/v2/")).await?;
    wait_ready(&mut registry, &format!("{registry_url}/v2/")).await?;
    wait_ready(&mut proxy, &format!("{proxy_url}/v2/")).await?;

    eprintln!("pushing blobs");
    let t = Instant::now();
    for blob in [&b.config, &b.small, &b.big, &b.cold, &b.cold_many] {
        push_blob_distribution(&upstream_url, REPO, blob).await?;
    }
    put_manifest(&upstream_url, REPO, &b.manifest).await?;
    for blob in [&b.config, &b.small, &b.big] {
        push_blob_distribution(&dist_url, REPO, blob).await?;
    }
    put_manifest(&dist_url, REPO, &b.manifest).await?;
    for blob in [&b.config, &b.small, &b.big, &b.huge] {
        push_blob_kache(&registry_internal, &kache_repo, blob).await?;
    }
    put_manifest(&registry_internal, &kache_repo, &b.manifest).await?;
    eprintln!("  pushed in {:.1} s", t.elapsed().as_secs_f64());

    if let Some(hold) = o.hold {
        let env = format!(
            "nginx {nginx_url}/{small} (pid {np})\ndistribution {dist_url}/v2/{REPO}/blobs/{sd} (pid {dp})\nupstream {upstream_url} (pid {up}), access log {log}\ndistribution proxy {dproxy_url} (pid {pp})\nkache registry {registry_url}/v2/{kache_repo}/blobs/{sd} (pid {rp}), internal {registry_internal}, metrics {registry_metrics}\nkache proxy {proxy_url}/v2/{kache_repo}/blobs/{sd} (pid {xp}), metrics {proxy_metrics}\nblobs: small {sd}, big {bd}, huge {hd}, cold {cd}, cold-many {cmd}; manifest {md} (tag {TAG})\n",
            small = b.small.file_name(),
            np = nginx.pid,
            dp = dist.pid,
            up = upstream.pid,
            pp = dproxy.pid,
            rp = registry.pid,
            xp = proxy.pid,
            log = upstream_log.display(),
            sd = b.small.digest,
            bd = b.big.digest,
            hd = b.huge.digest,
            cd = b.cold.digest,
            cmd = b.cold_many.digest,
            md = b.manifest_digest,
        );
        std::fs::write(work.join("servers.txt"), &env)?;
        eprintln!(
            "{env}holding the servers for {hold:?} (also in {})",
            work.join("servers.txt").display()
        );
        tokio::time::sleep(hold).await;
        return Ok(String::new());
    }

    let meter = Meter {
        ticks_per_s: procs::clock_ticks() as f64,
    };
    let kproxy = Server {
        kind: Kind::KacheProxy,
        label: "kache proxy → registry",
        procs: vec![("proxy", proxy.pid), ("registry", registry.pid)],
        track_memory: true,
    };
    let kreg = Server {
        kind: Kind::KacheRegistry,
        label: "kache registry",
        procs: vec![("registry", registry.pid)],
        track_memory: true,
    };
    let sdist = Server {
        kind: Kind::Distribution,
        label: "distribution 2.8",
        procs: vec![("distribution", dist.pid)],
        track_memory: true,
    };
    let snginx = Server {
        kind: Kind::Nginx,
        label: "nginx (sendfile)",
        procs: vec![("nginx", nginx.pid)],
        track_memory: false,
    };

    let mut bench = Bench {
        o,
        work,
        kache,
        pids,
        b,
        urls: Urls {
            nginx: nginx_url,
            dist: dist_url,
            upstream: upstream_url,
            dproxy: dproxy_url,
            registry: registry_url,
            registry_metrics,
            proxy: proxy_url,
            proxy_metrics,
            kache_repo,
            upstream_log,
        },
        meter,
        kproxy,
        kreg,
        sdist,
        snginx,
        md,
        notes: Vec::new(),
        budgets: Vec::new(),
        memory_rows: Vec::new(),
    };
    blob_step(&mut bench).await?;
    stream_step(&mut bench).await?;
    manifest_step(&mut bench).await?;
    cold_step(&mut bench).await?;
    memory_step(&mut bench).await?;
    webhook_step(&mut bench).await?;
    gc::gc_step(&mut bench).await?;
    pod::pod_step(&mut bench).await?;
    let Bench {
        mut md,
        mut notes,
        budgets,
        ..
    } = bench;
    // ---------------------------------------------------------------- summary
    let mut summary = String::new();
    let _ = writeln!(summary, "### Budgets (DESIGN.md) in this run\n");
    let _ = writeln!(summary, "| budget | measured | met |");
    let _ = writeln!(summary, "| --- | --- | --- |");
    for bgt in &budgets {
        let _ = writeln!(
            summary,
            "| {} | {} | {} |",
            bgt.what,
            bgt.measured,
            match bgt.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            }
        );
    }
    let _ = writeln!(summary);
    md.push_str(&summary);
    if !notes.is_empty() {
        let _ = writeln!(md, "Errors:\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
        let _ = writeln!(md);
    }

    for p in [
        &mut nginx,
        &mut dist,
        &mut upstream,
        &mut dproxy,
        &mut registry,
        &mut proxy,
    ] {
        if let Err(e) = p.check_alive() {
            notes.push(format!("{e:#}"));
            let _ = writeln!(md, "- a server died during the run: {e:#}");
        }
    }
    Ok(md)
}

/// Warm 1 MiB blob at N connections on every server: req/s, latency, CPU, peak RSS.
async fn blob_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        b,
        urls,
        meter,
        kproxy,
        kreg,
        sdist,
        snginx,
        md,
        notes,
        budgets,
        memory_rows,
        ..
    } = bench;
    let all_blob_servers = [&*kproxy, &*kreg, &*sdist, &*snginx];
    let mut blob1m: Vec<(Server, LoadResult, Usage)> = Vec::new();
    if o.wants("blob") {
        eprintln!("warm 1 MiB blob, {} connections", o.connections);
        let mut rounds: Vec<Vec<(LoadResult, Usage)>> = vec![Vec::new(); 4];
        for round in 0..o.rounds {
            for (i, s) in all_blob_servers.iter().enumerate() {
                let url = Url::parse(&urls.blob(s.kind, &b.small), None)?;
                let spec = LoadSpec {
                    url,
                    method: Method::GET,
                    headers: HeaderMap::new(),
                    body: Bytes::new(),
                    connections: o.connections,
                    duration: o.duration,
                    requests: None,
                    rate: None,
                };
                // Warm-up: open the connections, fill caches.
                let _ = load::load(LoadSpec {
                    requests: Some(o.connections as u64 * 4),
                    duration: Duration::from_secs(5),
                    ..spec.clone()
                })
                .await?;
                let before = meter.start(s);
                let r = load::load(spec).await?;
                let u = meter.end(s, before);
                eprintln!(
                    "  round {}: {}: {:.0} req/s, p99 {:.1} ms, cpu {:.2} s",
                    round + 1,
                    s.label,
                    r.rps(),
                    r.ms(0.99),
                    u.cpu_total()
                );
                rounds[i].push((r, u));
            }
        }
        for (s, v) in all_blob_servers.iter().zip(rounds) {
            let (r, u) = median_by(v, |(r, _)| r.rps());
            blob1m.push(((*s).clone(), r, u));
        }

        let _ = writeln!(
            md,
            "### Warm 1 MiB blob, {} connections, {:?}\n",
            o.connections, o.duration
        );
        let _ = writeln!(
            md,
            "| server | req/s | MB/s | p50 ms | p99 ms | max ms | errors | server CPU (cores) | CPU ms/req | peak RSS |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for (s, r, u) in &blob1m {
            let cores = u.cpu_total() / r.elapsed.as_secs_f64();
            let cpu_detail = if u.cpu.len() > 1 {
                format!(
                    "{cores:.2} ({})",
                    s.procs
                        .iter()
                        .zip(&u.cpu)
                        .map(|((n, _), c)| format!("{n} {:.2}", c / r.elapsed.as_secs_f64()))
                        .collect::<Vec<_>>()
                        .join(" + ")
                )
            } else {
                format!("{cores:.2}")
            };
            let peak = if u.peak.is_empty() {
                "—".into()
            } else {
                s.procs
                    .iter()
                    .zip(&u.peak)
                    .map(|((n, _), p)| format!("{n} {}", mib(*p)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.3} | {} |",
                s.label,
                thousands(r.rps()),
                mb(r.bps()),
                r.ms(0.5),
                r.ms(0.99),
                r.max_ms(),
                r.errors,
                cpu_detail,
                u.cpu_total() * 1000.0 / r.ok.max(1) as f64,
                peak
            );
            note_errors(
                notes,
                &format!("1 MiB, {}", s.label),
                r.errors,
                &r.first_error,
            );
        }
        let (kp, kr, d, n) = (&blob1m[0], &blob1m[1], &blob1m[2], &blob1m[3]);
        let _ = writeln!(
            md,
            "\nRatios: kache proxy req/s {} of nginx, {} of distribution; p99 {} of distribution's. kache registry alone: {} of nginx, {} of distribution.\n",
            ratio(kp.1.rps(), n.1.rps()),
            ratio(kp.1.rps(), d.1.rps()),
            ratio(kp.1.ms(0.99), d.1.ms(0.99)),
            ratio(kr.1.rps(), n.1.rps()),
            ratio(kr.1.rps(), d.1.rps()),
        );
        budgets.push(budget(
            "1 MiB ×32: proxy req/s ≥ 2× distribution",
            ratio(kp.1.rps(), d.1.rps()),
            Some(kp.1.rps() >= 2.0 * d.1.rps()),
        ));
        budgets.push(budget(
            "1 MiB ×32: proxy req/s ≥ 0.8× nginx",
            ratio(kp.1.rps(), n.1.rps()),
            Some(kp.1.rps() >= 0.8 * n.1.rps()),
        ));
        budgets.push(budget(
            "1 MiB ×32: registry req/s ≥ 0.8× nginx (the form BENCHMARKS.md holds)",
            ratio(kr.1.rps(), n.1.rps()),
            Some(kr.1.rps() >= 0.8 * n.1.rps()),
        ));
        budgets.push(budget(
            "1 MiB ×32: proxy p99 < 1/3 of distribution's",
            format!(
                "{:.1} ms vs {:.1} ms ({})",
                kp.1.ms(0.99),
                d.1.ms(0.99),
                ratio(kp.1.ms(0.99), d.1.ms(0.99))
            ),
            Some(kp.1.ms(0.99) * 3.0 < d.1.ms(0.99)),
        ));
        memory_rows.push(MemRow {
            step: format!(
                "1 MiB blob, {} connections (proxy step; registry: max of both kache steps)",
                o.connections
            ),
            key: MemStep::Blob,
            proxy: kp.2.peak.first().copied().unwrap_or(0),
            registry: kp
                .2
                .peak
                .get(1)
                .copied()
                .unwrap_or(0)
                .max(kr.2.peak.first().copied().unwrap_or(0)),
        });
    }

    Ok(())
}

/// Warm large blob, 1 and 4 download streams on every server: MB/s and CPU per GB.
async fn stream_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        b,
        urls,
        meter,
        kproxy,
        kreg,
        sdist,
        snginx,
        md,
        notes,
        budgets,
        memory_rows,
        ..
    } = bench;
    let all_blob_servers = [&*kproxy, &*kreg, &*sdist, &*snginx];
    if o.wants("stream") {
        let _ = writeln!(
            md,
            "### Warm {} MiB blob: download throughput, {:?} per cell\n",
            o.big_mib, o.stream_duration
        );
        let _ = writeln!(
            md,
            "| server | 1 stream MB/s | CPU s/GB | 4 streams MB/s | CPU s/GB | peak RSS (1 / 4 streams) |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | --- |");
        let mut cells: Vec<Vec<(StreamResult, Usage)>> = Vec::new();
        for streams in [1usize, 4] {
            eprintln!("warm {} MiB blob, {streams} stream(s)", o.big_mib);
            let mut rounds: Vec<Vec<(StreamResult, Usage)>> = vec![Vec::new(); 4];
            for round in 0..o.rounds {
                for (i, s) in all_blob_servers.iter().enumerate() {
                    let url = Url::parse(&urls.blob(s.kind, &b.big), None)?;
                    if round == 0 && streams == 1 {
                        // Warm-up: the file in the page cache, the connection paths hot.
                        let _ =
                            load::stream(&url, 1, Duration::ZERO, Duration::from_secs(120)).await?;
                    }
                    let before = meter.start(s);
                    let r =
                        load::stream(&url, streams, o.stream_duration, Duration::from_secs(120))
                            .await?;
                    let u = meter.end(s, before);
                    eprintln!(
                        "  round {}: {}: {:.0} MB/s, cpu {:.2} s",
                        round + 1,
                        s.label,
                        r.bps() / 1e6,
                        u.cpu_total()
                    );
                    note_errors(
                        notes,
                        &format!("{} MiB ×{streams}, {}", o.big_mib, s.label),
                        r.errors,
                        &r.first_error,
                    );
                    rounds[i].push((r, u));
                }
            }
            cells.push(
                rounds
                    .into_iter()
                    .map(|v| median_by(v, |(r, _)| r.bps()))
                    .collect(),
            );
        }
        let cpu_per_gb = |(r, u): &(StreamResult, Usage)| u.cpu_total() / (r.bytes as f64 / 1e9);
        for (i, s) in all_blob_servers.iter().enumerate() {
            let (one, four) = (&cells[0][i], &cells[1][i]);
            let peak = if s.track_memory {
                let p = |u: &Usage| u.peak.iter().copied().max().unwrap_or(0);
                format!("{} / {}", mib(p(&one.1)), mib(p(&four.1)))
            } else {
                "—".into()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {} | {:.2} | {} |",
                s.label,
                mb(one.0.bps()),
                cpu_per_gb(one),
                mb(four.0.bps()),
                cpu_per_gb(four),
                peak
            );
        }
        let (p1, n1) = (cells[0][0].0.bps(), cells[0][3].0.bps());
        let (p4, d4) = (cells[1][0].0.bps(), cells[1][2].0.bps());
        let (pc, dc) = (cpu_per_gb(&cells[1][0]), cpu_per_gb(&cells[1][2]));
        let _ = writeln!(
            md,
            "\nRatios: kache proxy, 1 stream: {} of nginx, {} of distribution; 4 streams: {} of nginx, {} of distribution; CPU per GB (4 streams, proxy + registry): {} of distribution's. kache registry alone, 1 stream: {} of nginx.\n",
            ratio(p1, n1),
            ratio(p1, cells[0][2].0.bps()),
            ratio(p4, cells[1][3].0.bps()),
            ratio(p4, d4),
            ratio(pc, dc),
            ratio(cells[0][1].0.bps(), n1),
        );
        budgets.push(budget(
            format!("{} MiB, 1 stream: proxy ≥ 0.9× nginx", o.big_mib),
            format!("{} ({} vs {} MB/s)", ratio(p1, n1), mb(p1), mb(n1)),
            Some(p1 >= 0.9 * n1),
        ));
        let r1 = cells[0][1].0.bps();
        budgets.push(budget(
            format!(
                "{} MiB, 1 stream: registry ≥ 0.9× nginx (the form BENCHMARKS.md holds)",
                o.big_mib
            ),
            format!("{} ({} vs {} MB/s)", ratio(r1, n1), mb(r1), mb(n1)),
            Some(r1 >= 0.9 * n1),
        ));
        budgets.push(budget(
            format!("{} MiB, 4 streams: proxy ≥ distribution", o.big_mib),
            format!("{} ({} vs {} MB/s)", ratio(p4, d4), mb(p4), mb(d4)),
            Some(p4 >= d4),
        ));
        budgets.push(budget(
            format!(
                "{} MiB, 4 streams: less CPU than distribution (proxy + registry, per GB)",
                o.big_mib
            ),
            format!("{pc:.2} vs {dc:.2} CPU s/GB ({})", ratio(pc, dc)),
            Some(pc < dc),
        ));
        memory_rows.push(MemRow::of(
            format!("{} MiB blob through the proxy, 1 stream", o.big_mib),
            MemStep::Stream1,
            &cells[0][0].1,
        ));
        memory_rows.push(MemRow::of(
            format!("{} MiB blob through the proxy, 4 streams", o.big_mib),
            MemStep::Stream4,
            &cells[1][0].1,
        ));
    }

    Ok(())
}

/// Warm manifest by tag and by digest: req/s, latency, and whether kache asked upstream.
async fn manifest_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        b,
        urls,
        meter,
        kproxy,
        kreg,
        sdist,
        md,
        notes,
        budgets,
        ..
    } = bench;
    let (registry_metrics, proxy_metrics, upstream_log) = (
        &urls.registry_metrics,
        &urls.proxy_metrics,
        &urls.upstream_log,
    );
    let mut accept = HeaderMap::new();
    accept.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
    if o.wants("manifest") {
        let servers = [&*kproxy, &*kreg, &*sdist];
        let up_before = count_log(upstream_log, "GET", "/manifests/")
            + count_log(upstream_log, "HEAD", "/manifests/");
        let m = |outcome: &'static str| {
            let url = registry_metrics.clone();
            async move {
                metric(
                    &url,
                    "kache_registry_cache_requests_total",
                    &[("kind", "manifest"), ("outcome", outcome)],
                )
                .await
            }
        };
        let fallback = || {
            let url = proxy_metrics.clone();
            async move {
                metric(
                    &url,
                    "kache_proxy_requests_total",
                    &[("result", "fallback")],
                )
                .await
            }
        };
        let (hit0, miss0, stale0, fb0) = (
            m("hit").await?,
            m("miss").await?,
            m("stale").await?,
            fallback().await?,
        );
        let mut kache_requests = 0u64;
        let mut rows: Vec<Vec<(LoadResult, Usage)>> = vec![Vec::new(); 3];
        for (col, reference) in [TAG, b.manifest_digest.as_str()].into_iter().enumerate() {
            eprintln!(
                "warm manifest by {}, {} connections",
                if col == 0 { "tag" } else { "digest" },
                o.connections
            );
            let mut rounds: Vec<Vec<(LoadResult, Usage)>> = vec![Vec::new(); 3];
            for round in 0..o.rounds {
                for (i, s) in servers.iter().enumerate() {
                    let url = Url::parse(&urls.manifest(s.kind, reference), None)?;
                    let spec = LoadSpec {
                        url,
                        method: Method::GET,
                        headers: accept.clone(),
                        body: Bytes::new(),
                        connections: o.connections,
                        duration: o.duration,
                        requests: None,
                        rate: None,
                    };
                    let w = load::load(LoadSpec {
                        requests: Some(o.connections as u64 * 4),
                        duration: Duration::from_secs(5),
                        ..spec.clone()
                    })
                    .await?;
                    let before = meter.start(s);
                    let r = load::load(spec).await?;
                    let u = meter.end(s, before);
                    if i < 2 {
                        kache_requests += w.ok + w.errors + r.ok + r.errors;
                    }
                    eprintln!(
                        "  round {}: {}: {:.0} req/s, p99 {:.2} ms, cpu {:.2} s",
                        round + 1,
                        s.label,
                        r.rps(),
                        r.ms(0.99),
                        u.cpu_total()
                    );
                    note_errors(
                        notes,
                        &format!(
                            "manifest by {}, {}",
                            if col == 0 { "tag" } else { "digest" },
                            s.label
                        ),
                        r.errors,
                        &r.first_error,
                    );
                    rounds[i].push((r, u));
                }
            }
            for (i, v) in rounds.into_iter().enumerate() {
                rows[i].push(median_by(v, |(r, _)| r.rps()));
            }
        }
        let up_after = count_log(upstream_log, "GET", "/manifests/")
            + count_log(upstream_log, "HEAD", "/manifests/");
        let (hit1, miss1, stale1, fb1) = (
            m("hit").await?,
            m("miss").await?,
            m("stale").await?,
            fallback().await?,
        );
        let upstream_requests = up_after - up_before;

        let _ = writeln!(
            md,
            "### Warm manifest GET, {} connections, {:?} per cell\n",
            o.connections, o.duration
        );
        let _ = writeln!(
            md,
            "| server | by tag req/s | p50 ms | p99 ms | CPU (cores) | by digest req/s | p50 ms | p99 ms | CPU (cores) | errors |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (s, cells) in servers.iter().zip(&rows) {
            let (t, d) = (&cells[0], &cells[1]);
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} |",
                s.label,
                thousands(t.0.rps()),
                t.0.ms(0.5),
                t.0.ms(0.99),
                t.1.cpu_total() / t.0.elapsed.as_secs_f64(),
                thousands(d.0.rps()),
                d.0.ms(0.5),
                d.0.ms(0.99),
                d.1.cpu_total() / d.0.elapsed.as_secs_f64(),
                t.0.errors + d.0.errors,
            );
        }
        let _ = writeln!(
            md,
            "\nRatios to distribution: kache proxy by tag {}, by digest {}; kache registry by tag {}, by digest {}.  ",
            ratio(rows[0][0].0.rps(), rows[2][0].0.rps()),
            ratio(rows[0][1].0.rps(), rows[2][1].0.rps()),
            ratio(rows[1][0].0.rps(), rows[2][0].0.rps()),
            ratio(rows[1][1].0.rps(), rows[2][1].0.rps()),
        );
        let _ = writeln!(
            md,
            "Upstream requests during the kache manifest steps: {upstream_requests} in the upstream's access log, for {} requests to kache; registry cache outcomes: hit {:.0}, miss {:.0}, stale {:.0}; proxy fallbacks {:.0}.\n",
            thousands(kache_requests as f64),
            hit1 - hit0,
            miss1 - miss0,
            stale1 - stale0,
            fb1 - fb0,
        );
        for (col, what) in [(0, "tag"), (1, "digest")] {
            budgets.push(budget(
                format!("manifest by {what}: proxy req/s ≥ 5× distribution"),
                ratio(rows[0][col].0.rps(), rows[2][col].0.rps()),
                Some(rows[0][col].0.rps() >= 5.0 * rows[2][col].0.rps()),
            ));
            budgets.push(budget(
                format!("manifest by {what}: proxy p99 < 10 ms"),
                format!("{:.2} ms", rows[0][col].0.ms(0.99)),
                Some(rows[0][col].0.ms(0.99) < 10.0),
            ));
        }
        let upstream_touched =
            upstream_requests as f64 + (miss1 - miss0) + (stale1 - stale0) + (fb1 - fb0);
        budgets.push(budget(
            "warm manifests: no upstream request at all",
            format!("{upstream_requests} upstream requests"),
            Some(upstream_touched == 0.0),
        ));
    }

    Ok(())
}

/// Cold pulls: one client of the large blob, then N clients of one blob at once.
async fn cold_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        b,
        urls,
        md,
        notes,
        budgets,
        ..
    } = bench;
    let (upstream_url, proxy_url, dproxy_url, kache_repo, upstream_log) = (
        &urls.upstream,
        &urls.proxy,
        &urls.dproxy,
        &urls.kache_repo,
        &urls.upstream_log,
    );
    if o.wants("cold") {
        // The upstream's files into the page cache first: every path then reads them from
        // memory, and none pays for a disk read the others skip.
        for blob in [&b.cold, &b.cold_many] {
            let hex = blob.digest.trim_start_matches("sha256:");
            let data = work
                .join("upstream/storage/docker/registry/v2/blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .join("data");
            let mut f = std::fs::File::open(&data)
                .with_context(|| format!("the upstream's copy of {}", blob.digest))?;
            std::io::copy(&mut f, &mut std::io::sink())?;
        }
        eprintln!("cold {} MiB blob", o.big_mib);
        let get_count = |d: &str| count_log(upstream_log, "GET", &format!("/blobs/{d}"));
        let head_count = |d: &str| count_log(upstream_log, "HEAD", &format!("/blobs/{d}"));
        let limit = Duration::from_secs(180);
        let cold_paths: [(&str, String); 3] = [
            (
                "straight from the upstream distribution",
                format!("{upstream_url}/v2/{REPO}/blobs/{}", b.cold.digest),
            ),
            (
                "kache proxy → kache registry → upstream",
                format!("{proxy_url}/v2/{kache_repo}/blobs/{}", b.cold.digest),
            ),
            (
                "distribution proxy → upstream",
                format!("{dproxy_url}/v2/{REPO}/blobs/{}", b.cold.digest),
            ),
        ];
        let _ = writeln!(md, "### Cold pulls (the cache does not hold the blob)\n");
        let _ = writeln!(
            md,
            "One client, {} MiB blob:\n\n| path | first byte | complete | MB/s | upstream GETs (HEADs) |",
            o.big_mib
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        let mut single: Vec<ColdResult> = Vec::new();
        for (label, url) in &cold_paths {
            let (g0, h0) = (get_count(&b.cold.digest), head_count(&b.cold.digest));
            let r = load::cold(&Url::parse(url, None)?, 1, limit).await?;
            let (g1, h1) = (get_count(&b.cold.digest), head_count(&b.cold.digest));
            note_errors(notes, &format!("cold, {label}"), r.errors, &r.first_error);
            if r.min_bytes() != b.cold.size && r.errors == 0 {
                notes.push(format!(
                    "cold, {label}: got {} bytes of {}",
                    r.min_bytes(),
                    b.cold.size
                ));
            }
            eprintln!(
                "  {label}: first byte {}, complete {}",
                secs(r.ttfb(0.5)),
                secs(r.total(0.5))
            );
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} ({}) |",
                secs(r.ttfb(0.5)),
                secs(r.total(0.5)),
                mb(b.cold.size as f64 / r.total(0.5).as_secs_f64().max(1e-9)),
                g1 - g0,
                h1 - h0
            );
            single.push(r);
        }
        eprintln!(
            "{} concurrent cold pulls of one {} MiB blob",
            o.cold_clients, o.cold_clients_mib
        );
        let _ = writeln!(
            md,
            "\n{} clients at once, one {} MiB blob:\n\n| path | first byte p50 | first byte max | complete p50 | complete max | errors | upstream GETs (HEADs) |",
            o.cold_clients, o.cold_clients_mib
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        let mut many_gets = Vec::new();
        for (label, url) in [
            (
                "kache proxy → kache registry → upstream",
                format!("{proxy_url}/v2/{kache_repo}/blobs/{}", b.cold_many.digest),
            ),
            (
                "distribution proxy → upstream",
                format!("{dproxy_url}/v2/{REPO}/blobs/{}", b.cold_many.digest),
            ),
        ] {
            let d = &b.cold_many.digest;
            let (g0, h0) = (get_count(d), head_count(d));
            let r = load::cold(&Url::parse(&url, None)?, o.cold_clients, limit).await?;
            let (g1, h1) = (get_count(d), head_count(d));
            note_errors(
                notes,
                &format!("cold ×{}, {label}", o.cold_clients),
                r.errors,
                &r.first_error,
            );
            eprintln!(
                "  {label}: complete max {}, upstream GETs {}",
                secs(r.total(1.0)),
                g1 - g0
            );
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} ({}) |",
                secs(r.ttfb(0.5)),
                secs(r.ttfb(1.0)),
                secs(r.total(0.5)),
                secs(r.total(1.0)),
                r.errors,
                g1 - g0,
                h1 - h0
            );
            many_gets.push(g1 - g0);
        }
        let _ = writeln!(md);
        let (k, dp, up) = (&single[1], &single[2], &single[0]);
        budgets.push(budget(
            "cold: the first byte leaves before the blob is complete",
            format!(
                "first byte {} of {} (upstream alone: {})",
                secs(k.ttfb(0.5)),
                secs(k.total(0.5)),
                secs(up.total(0.5))
            ),
            Some(k.errors == 0 && k.ttfb(0.5) < k.total(0.5) / 2),
        ));
        budgets.push(budget(
            format!(
                "cold {} MiB: no slower than distribution's proxy",
                o.big_mib
            ),
            format!(
                "{} vs {} ({})",
                secs(k.total(0.5)),
                secs(dp.total(0.5)),
                ratio(k.total(0.5).as_secs_f64(), dp.total(0.5).as_secs_f64())
            ),
            Some(k.errors == 0 && k.total(0.5) <= dp.total(0.5)),
        ));
        budgets.push(budget(
            format!(
                "{} concurrent cold pulls: exactly 1 upstream GET",
                o.cold_clients
            ),
            format!(
                "kache {}, distribution proxy {}",
                many_gets[0], many_gets[1]
            ),
            Some(many_gets[0] == 1),
        ));
    }

    Ok(())
}

/// The multi-GiB stream through the proxy, and the memory table of every step.
async fn memory_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        b,
        urls,
        meter,
        kproxy,
        md,
        notes,
        budgets,
        memory_rows,
        ..
    } = bench;
    let mut flat: Option<(Vec<(u64, u64)>, usize)> = None;
    if o.wants("memory") {
        eprintln!("{} MiB blob through the proxy, 1 stream", o.huge_mib);
        let url = Url::parse(&urls.blob(kproxy.kind, &b.huge), None)?;
        let before = meter.start(kproxy);
        let sampler = RssSampler::start(kproxy.procs.iter().map(|(_, p)| *p).collect());
        let r = load::stream(&url, 1, Duration::ZERO, Duration::from_secs(180)).await?;
        let samples = sampler.stop().await;
        let u = meter.end(kproxy, before);
        // Flat: what the processes hold after the first quarter of the transfer is all they
        // ever hold; a blob buffered whole would grow with every byte.
        let quarter = samples.len() / 4;
        let growth: Vec<(u64, u64)> = (0..kproxy.procs.len())
            .map(|i| {
                let max = |s: &[Vec<u64>]| s.iter().map(|v| v[i]).max().unwrap_or(0);
                (
                    max(&samples[..quarter.max(1).min(samples.len())]),
                    max(&samples),
                )
            })
            .collect();
        flat = Some((growth, samples.len()));
        note_errors(
            notes,
            &format!("{} MiB, kache proxy", o.huge_mib),
            r.errors,
            &r.first_error,
        );
        memory_rows.push(MemRow::of(
            format!(
                "{} MiB blob through the proxy, 1 stream ({} MB/s)",
                o.huge_mib,
                mb(r.bps())
            ),
            MemStep::Huge,
            &u,
        ));
    }
    if !memory_rows.is_empty() {
        let _ = writeln!(
            md,
            "### Memory: peak RSS (VmHWM, reset before each step) of the kache processes\n"
        );
        let _ = writeln!(md, "| step | kache proxy | kache registry |");
        let _ = writeln!(md, "| --- | ---: | ---: |");
        for r in memory_rows.iter() {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                r.step,
                mib(r.proxy),
                mib(r.registry)
            );
        }
        let _ = writeln!(md);
        let find = |k: MemStep| memory_rows.iter().find(|r| r.key == k);
        if let Some(p) = find(MemStep::Blob) {
            budgets.push(budget(
                "memory: proxy and registry RSS < 32 MiB under the 1 MiB ×32 load",
                format!("proxy {}, registry {}", mib(p.proxy), mib(p.registry)),
                Some(p.proxy < 32 * MIB && p.registry < 32 * MIB),
            ));
        }
        if let Some((g, n)) = &flat {
            let _ = writeln!(
                md,
                "While the {} MiB blob streamed ({n} samples of VmRSS, every 50 ms): proxy {} after the first quarter, {} at most; registry {} after the first quarter, {} at most.\n",
                o.huge_mib,
                mib(g[0].0),
                mib(g[0].1),
                mib(g[1].0),
                mib(g[1].1),
            );
            let grew = |(x, y): (u64, u64)| y.saturating_sub(x) <= 4 * MIB;
            budgets.push(budget(
                format!(
                    "memory: flat while streaming {} MiB (RSS after the first quarter vs the rest, within 4 MiB)",
                    o.huge_mib
                ),
                format!(
                    "proxy {} → {}, registry {} → {}",
                    mib(g[0].0),
                    mib(g[0].1),
                    mib(g[1].0),
                    mib(g[1].1)
                ),
                Some(*n >= 8 && grew(g[0]) && grew(g[1])),
            ));
        }
    }

    Ok(())
}

/// One row of the webhook table.
fn webhook_row(md: &mut String, label: &str, r: &LoadResult, u: &Usage) {
    let _ = writeln!(
        md,
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.0} | {} |",
        thousands(r.rps()),
        r.ms(0.5),
        r.ms(0.99),
        r.max_ms(),
        r.errors,
        u.cpu_total() / r.elapsed.as_secs_f64(),
        u.cpu_total() * 1e6 / r.ok.max(1) as f64,
        mib(u.peak.first().copied().unwrap_or(0)),
    );
}

/// The webhook budget's rate: its p99 is measured there.
const WEBHOOK_RATE: f64 = 5000.0;

/// AdmissionReviews over TLS against `kache webhook`.
async fn webhook_step(bench: &mut Bench<'_>) -> Result<()> {
    let Bench {
        o,
        work,
        kache,
        pids,
        meter,
        md,
        notes,
        budgets,
        ..
    } = bench;
    if o.wants("webhook") {
        let dir = work.join("kache-webhook");
        std::fs::create_dir_all(&dir)?;
        let (ca, cert, key) = webhook_pki(&dir)?;
        let (port, metrics_port) = (procs::free_port()?, procs::free_port()?);
        let mut cmd = kache_command(kache);
        cmd.arg("webhook")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"));
        let mut hook = Proc::spawn("kache-webhook", cmd, &dir, pids)?;
        let url = format!("https://127.0.0.1:{port}/mutate");
        wait_ready_tls(&mut hook, &url, Some(&ca)).await?;
        let body = admission_review()?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        // One answer checked by hand: a patch that points the images at the node proxy.
        let u = Url::parse(&url, Some(&ca))?;
        let (status, _, answer) =
            client::fetch(&u, Method::POST, &headers, client::full(body.clone())).await?;
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        let patched = answer
            .pointer("/response/patch")
            .and_then(|p| p.as_str())
            .is_some_and(|p| !p.is_empty());
        if !status.is_success() || !patched {
            notes.push(format!(
                "webhook: the review was answered {status} without a patch: {answer}"
            ));
        }
        let server = Server {
            kind: Kind::Webhook,
            label: "kache webhook",
            procs: vec![("webhook", hook.pid)],
            track_memory: true,
        };
        eprintln!(
            "webhook AdmissionReviews over TLS, {} connections",
            o.connections
        );
        let spec = LoadSpec {
            url: u,
            method: Method::POST,
            headers,
            body: body.clone(),
            connections: o.connections,
            duration: o.duration,
            requests: None,
            rate: None,
        };
        let _ = load::load(LoadSpec {
            requests: Some(o.connections as u64 * 4),
            duration: Duration::from_secs(5),
            ..spec.clone()
        })
        .await?;
        let mut rounds = Vec::new();
        for round in 0..o.rounds {
            let before = meter.start(&server);
            let r = load::load(spec.clone()).await?;
            let u = meter.end(&server, before);
            eprintln!(
                "  round {}: {:.0} reviews/s, p99 {:.2} ms, cpu {:.2} s",
                round + 1,
                r.rps(),
                r.ms(0.99),
                u.cpu_total()
            );
            rounds.push((r, u));
        }
        let (r, u) = median_by(rounds, |(r, _)| r.rps());
        note_errors(notes, "webhook", r.errors, &r.first_error);
        // Back to back, 32 connections keep the server saturated, and p99 is then the queue
        // they make (Little's law: 32 in flight at 10,000/s is 3.2 ms on average). The budget's
        // p99 is the latency at its own rate, so it is measured again at 5,000/s, open loop.
        let mut paced_rounds = Vec::new();
        for round in 0..o.rounds {
            let before = meter.start(&server);
            let p = load::load(LoadSpec {
                rate: Some(WEBHOOK_RATE),
                ..spec.clone()
            })
            .await?;
            let u = meter.end(&server, before);
            eprintln!(
                "  paced round {}: {:.0} reviews/s, p99 {:.2} ms, cpu {:.2} s",
                round + 1,
                p.rps(),
                p.ms(0.99),
                u.cpu_total()
            );
            paced_rounds.push((p, u));
        }
        let (p, pu) = median_by(paced_rounds, |(p, _)| p.ms(0.99));
        note_errors(notes, "webhook (paced)", p.errors, &p.first_error);
        let _ = writeln!(
            md,
            "### Webhook: AdmissionReview POST /mutate over TLS (kept-alive connections), {} connections, {:?}\n",
            o.connections, o.duration
        );
        let _ = writeln!(
            md,
            "| review | reviews/s | p50 ms | p99 ms | max ms | errors | server CPU (cores) | CPU µs/review | peak RSS |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        let review = format!(
            "pod of a ReplicaSet, 4 images ({} bytes){}",
            body.len(),
            if patched {
                ", answered with a patch"
            } else {
                ", **no patch**"
            }
        );
        webhook_row(md, &review, &r, &u);
        let paced = format!(
            "the same, paced at {} reviews/s (open loop; a request sent late counts from its scheduled time)",
            thousands(WEBHOOK_RATE)
        );
        webhook_row(md, &paced, &p, &pu);
        md.push('\n');
        budgets.push(budget(
            "webhook: ≥ 5,000 AdmissionReviews/s over TLS, p99 < 5 ms (at 5,000/s)",
            format!(
                "{} reviews/s back to back; at {} reviews/s p99 {:.2} ms (back to back: {:.2} ms)",
                thousands(r.rps()),
                thousands(p.rps()),
                p.ms(0.99),
                r.ms(0.99)
            ),
            Some(
                patched
                    && r.rps() >= WEBHOOK_RATE
                    && p.rps() >= 0.98 * WEBHOOK_RATE
                    && p.ms(0.99) < 5.0,
            ),
        ));
        hook.stop();
    }

    Ok(())
}
