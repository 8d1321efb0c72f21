//! The servers of the run: nginx, the distributions and kache started on 127.0.0.1, where each
//! one serves the blobs, and the pushes that fill them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use http::{HeaderMap, Method};

use super::fixtures::{Blob, Blobs};
use super::link::Link;
use super::push::{push_blob_distribution, push_blob_kache, put_manifest};
use super::{Options, REPO, TAG};
use crate::client::{self, Url};
use crate::procs::{self, Proc};

/// Which server a measurement is about; it picks the URL of a blob or manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KacheProxy,
    KacheRegistry,
    Distribution,
    Nginx,
    Webhook,
}

/// A server under test: a URL prefix and the processes whose CPU and memory count.
#[derive(Debug, Clone)]
pub struct Server {
    pub kind: Kind,
    pub label: &'static str,
    /// `(name, pid)`; CPU includes each one's descendants.
    pub procs: Vec<(&'static str, u32)>,
    /// Peak RSS is tracked for these (kache and distribution; nginx's workers are not).
    pub track_memory: bool,
}

/// The four servers the warm steps compare.
#[derive(Debug)]
pub struct ServersUnderTest {
    /// The kache proxy with the registry behind it: what a node pulls through.
    pub kache_proxy: Server,
    pub kache_registry: Server,
    pub distribution: Server,
    pub nginx: Server,
    /// The caches of the cold step beside kache: distribution's proxy of the upstream, and the
    /// one of the paced link when it runs.
    pub distribution_proxy: Server,
    pub distribution_proxy_paced: Option<Server>,
}

impl ServersUnderTest {
    /// Every one, in the order of the tables: kache proxy, kache registry, distribution, nginx.
    pub fn all(&self) -> [&Server; 4] {
        [
            &self.kache_proxy,
            &self.kache_registry,
            &self.distribution,
            &self.nginx,
        ]
    }
}

/// Addresses of the servers under test.
#[derive(Debug)]
pub struct Urls {
    pub nginx: String,
    pub dist: String,
    pub upstream: String,
    pub dproxy: String,
    pub registry: String,
    /// The kache registry's internal listener, where it takes pushes.
    pub registry_internal: String,
    pub registry_metrics: String,
    pub proxy: String,
    pub proxy_metrics: String,
    /// The repository kache caches the upstream's under: `127.0.0.1_<port>/bench/app`.
    pub kache_repo: String,
    /// The upstream distribution's access log, where upstream requests are counted.
    pub upstream_log: PathBuf,
    /// The same upstream behind a link at `--cold-link-mbs`, for the cold step.
    pub paced: Option<PacedUrls>,
}

/// The upstream behind a paced link ([`Link`]), and the caches in front of it.
#[derive(Debug)]
pub struct PacedUrls {
    /// The link's pace, bytes per second per connection.
    pub bytes_per_s: u64,
    /// The upstream, through the link.
    pub upstream: String,
    /// A distribution proxy of its own whose remote is the link.
    pub dproxy: String,
    /// The repository kache caches the link's under (the kache registry and proxy of the run).
    pub kache_repo: String,
}

impl Urls {
    /// Where `kind` serves `blob`.
    pub fn blob(&self, kind: Kind, blob: &Blob) -> String {
        let (repo, d) = (&self.kache_repo, &blob.digest);
        match kind {
            Kind::KacheProxy => format!("{}/v2/{repo}/blobs/{d}", self.proxy),
            Kind::KacheRegistry => format!("{}/v2/{repo}/blobs/{d}", self.registry),
            Kind::Distribution => format!("{}/v2/{REPO}/blobs/{d}", self.dist),
            // The webhook serves no blobs; it is never asked.
            Kind::Nginx | Kind::Webhook => format!("{}/{}", self.nginx, blob.file_name()),
        }
    }

    /// Where `kind` serves the manifest by `reference`, a tag or a digest.
    pub fn manifest(&self, kind: Kind, reference: &str) -> String {
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

/// The processes of the run's servers; each one is stopped when this is dropped, the kache
/// proxy first and nginx last.
#[derive(Debug)]
pub struct Processes {
    kache_proxy: Proc,
    kache_registry: Proc,
    distribution_proxy: Proc,
    upstream: Proc,
    distribution: Proc,
    nginx: Proc,
    /// The paced link and the distribution proxy behind it, when the cold step uses them.
    paced: Option<(Link, Proc)>,
}

impl Processes {
    /// The servers the warm steps measure, with the processes each one runs on.
    pub fn under_test(&self) -> ServersUnderTest {
        ServersUnderTest {
            kache_proxy: Server {
                kind: Kind::KacheProxy,
                label: "kache proxy → registry",
                procs: vec![
                    ("proxy", self.kache_proxy.pid),
                    ("registry", self.kache_registry.pid),
                ],
                track_memory: true,
            },
            kache_registry: Server {
                kind: Kind::KacheRegistry,
                label: "kache registry",
                procs: vec![("registry", self.kache_registry.pid)],
                track_memory: true,
            },
            distribution: Server {
                kind: Kind::Distribution,
                label: "distribution 2.8",
                procs: vec![("distribution", self.distribution.pid)],
                track_memory: true,
            },
            nginx: Server {
                kind: Kind::Nginx,
                label: "nginx (sendfile)",
                procs: vec![("nginx", self.nginx.pid)],
                track_memory: false,
            },
            distribution_proxy: Server {
                kind: Kind::Distribution,
                label: "distribution proxy",
                procs: vec![("distribution proxy", self.distribution_proxy.pid)],
                track_memory: false,
            },
            distribution_proxy_paced: self.paced.as_ref().map(|(_, p)| Server {
                kind: Kind::Distribution,
                label: "distribution proxy (paced link)",
                procs: vec![("distribution proxy", p.pid)],
                track_memory: false,
            }),
        }
    }

    /// Why each server that exited did.
    pub fn deaths(&mut self) -> Vec<anyhow::Error> {
        [
            &mut self.nginx,
            &mut self.distribution,
            &mut self.upstream,
            &mut self.distribution_proxy,
            &mut self.kache_registry,
            &mut self.kache_proxy,
        ]
        .into_iter()
        .chain(self.paced.as_mut().map(|(_, p)| p))
        .filter_map(|p| p.check_alive().err())
        .collect()
    }

    /// Every server's address, pid and blob URL, for `--hold`.
    pub fn describe(&self, urls: &Urls, b: &Blobs) -> String {
        let paced = match (&urls.paced, &self.paced) {
            (Some(u), Some((_, p))) => format!(
                "paced link {} ({} MB/s per connection); distribution proxy behind it {} (pid {}); kache holds it as {}; blobs {}, {}\n",
                u.upstream,
                u.bytes_per_s / 1_000_000,
                u.dproxy,
                p.pid,
                u.kache_repo,
                b.cold_paced.digest,
                b.cold_huge_paced.digest,
            ),
            _ => String::new(),
        };
        paced
            + &format!(
                "nginx {nginx}/{small} (pid {np})\ndistribution {dist}/v2/{REPO}/blobs/{sd} (pid {dp})\nupstream {upstream} (pid {up}), access log {log}\ndistribution proxy {dproxy} (pid {pp})\nkache registry {registry}/v2/{kache_repo}/blobs/{sd} (pid {rp}), internal {registry_internal}, metrics {registry_metrics}\nkache proxy {proxy}/v2/{kache_repo}/blobs/{sd} (pid {xp}), metrics {proxy_metrics}\nblobs: small {sd}, big {bd}, huge {hd}, cold {cd}, cold-many {cmd}; manifest {md} (tag {TAG})\n",
                nginx = urls.nginx,
                dist = urls.dist,
                upstream = urls.upstream,
                dproxy = urls.dproxy,
                registry = urls.registry,
                registry_internal = urls.registry_internal,
                registry_metrics = urls.registry_metrics,
                proxy = urls.proxy,
                proxy_metrics = urls.proxy_metrics,
                kache_repo = urls.kache_repo,
                small = b.small.file_name(),
                np = self.nginx.pid,
                dp = self.distribution.pid,
                up = self.upstream.pid,
                pp = self.distribution_proxy.pid,
                rp = self.kache_registry.pid,
                xp = self.kache_proxy.pid,
                log = urls.upstream_log.display(),
                sd = b.small.digest,
                bd = b.big.digest,
                hd = b.huge.digest,
                cd = b.cold.digest,
                cmd = b.cold_many.digest,
                md = b.manifest_digest,
            )
    }
}

/// Starts every server, empty, and waits until each one answers: nginx serving `blob_dir`,
/// distribution, the upstream distribution and distribution's proxy in front of it, and the
/// kache registry and proxy caching the upstream.
pub async fn start(
    o: &Options,
    work: &Path,
    kache: &Path,
    pids: &Path,
    blob_dir: &Path,
    blobs: &Blobs,
) -> Result<(Processes, Urls)> {
    let (mut nginx, nginx_url) = start_nginx(work, pids, blob_dir)?;
    let (mut dist, dist_url) = start_distribution("distribution", work, pids, false, None)?;
    let (mut upstream, upstream_url) = start_distribution("upstream", work, pids, true, None)?;
    // distribution's proxy mode pings its remote when it starts, and exits if it cannot.
    wait_ready(&mut upstream, &format!("{upstream_url}/v2/")).await?;
    let (mut dproxy, dproxy_url) =
        start_distribution("distribution-proxy", work, pids, true, Some(&upstream_url))?;
    let upstream_host = upstream_url.trim_start_matches("http://").to_owned();
    let upstream_log = work.join("upstream").join("upstream.out");
    let kache_repo = format!("{}/{REPO}", upstream_host.replace(':', "_"));
    // The same upstream at a network's pace, with a distribution proxy of its own.
    let mut paced = None;
    let mut paced_urls = None;
    if o.wants("cold") && o.cold_link_mbs > 0 {
        let bytes_per_s = o.cold_link_mbs * 1_000_000;
        let link = Link::start(upstream_host.parse()?, bytes_per_s).await?;
        let link_url = format!("http://{}", link.addr);
        let (mut dproxy, dproxy_url) = start_distribution(
            "distribution-proxy-paced",
            work,
            pids,
            true,
            Some(&link_url),
        )?;
        wait_ready(&mut dproxy, &format!("{dproxy_url}/v2/")).await?;
        paced_urls = Some(PacedUrls {
            bytes_per_s,
            kache_repo: format!("{}/{REPO}", link.addr.to_string().replace(':', "_")),
            upstream: link_url,
            dproxy: dproxy_url,
        });
        paced = Some((link, dproxy));
    }
    // kache may fetch over plain HTTP from the upstream, and from the link in front of it.
    let insecure = match &paced {
        Some((link, _)) => format!("{upstream_host},{}", link.addr),
        None => upstream_host.clone(),
    };

    let reg_dir = work.join("kache-registry");
    std::fs::create_dir_all(&reg_dir)?;
    let mut cmd = kache_command(kache);
    cmd.arg("registry")
        .args(["--listen", ANY])
        .args(["--internal-listen", ANY])
        .args(["--metrics-listen", ANY])
        .arg("--data-dir")
        .arg(reg_dir.join("data"))
        .arg("--insecure-registry")
        .arg(&insecure)
        // Longer than the run: a warm tag is never re-validated in the middle of it.
        .arg("--tag-ttl")
        .arg("1h");
    if let Some(server) = &o.registry_http_server {
        cmd.arg("--http-server").arg(server);
    }
    let (mut registry, bound) = Proc::spawn_kache("kache-registry", cmd, &reg_dir, pids)?;
    let registry_url = bound.url("listen")?;
    let registry_internal = bound.url("internal")?;
    let registry_metrics = format!("{}/metrics", bound.url("metrics")?);

    let px_dir = work.join("kache-proxy");
    std::fs::create_dir_all(&px_dir)?;
    let mut cmd = kache_command(kache);
    cmd.arg("proxy")
        .args(["--listen", ANY])
        .arg("--registry")
        .arg(&registry_url)
        .args(["--metrics-listen", ANY])
        .arg("--insecure-registry")
        .arg(&insecure);
    if let Some(server) = &o.proxy_http_server {
        cmd.arg("--http-server").arg(server);
    }
    let (mut proxy, bound) = Proc::spawn_kache("kache-proxy", cmd, &px_dir, pids)?;
    let proxy_url = bound.url("proxy")?;
    let proxy_metrics = format!("{}/metrics", bound.url("metrics")?);

    wait_ready(
        &mut nginx,
        &format!("{nginx_url}/{}", blobs.small.file_name()),
    )
    .await?;
    wait_ready(&mut dist, &format!("{dist_url}/v2/")).await?;
    wait_ready(&mut dproxy, &format!("{dproxy_url}/v2/")).await?;
    wait_ready(&mut registry, &format!("{registry_url}/v2/")).await?;
    wait_ready(&mut proxy, &format!("{proxy_url}/v2/")).await?;

    let processes = Processes {
        kache_proxy: proxy,
        kache_registry: registry,
        distribution_proxy: dproxy,
        upstream,
        distribution: dist,
        nginx,
        paced,
    };
    let urls = Urls {
        nginx: nginx_url,
        dist: dist_url,
        upstream: upstream_url,
        dproxy: dproxy_url,
        registry: registry_url,
        registry_internal,
        registry_metrics,
        proxy: proxy_url,
        proxy_metrics,
        kache_repo,
        upstream_log,
        paced: paced_urls,
    };
    Ok((processes, urls))
}

/// Pushes the blobs and the manifest: every blob to the upstream, where the cold pulls go;
/// the warm ones to distribution and to kache, which also holds the one of the memory step.
/// nginx serves the files themselves.
pub async fn fill(urls: &Urls, b: &Blobs) -> Result<()> {
    for blob in [
        &b.config,
        &b.small,
        &b.big,
        &b.cold,
        &b.cold_huge,
        &b.cold_many,
        &b.cold_paced,
        &b.cold_huge_paced,
    ] {
        push_blob_distribution(&urls.upstream, REPO, blob).await?;
    }
    // The cold blobs live on in the upstream only: their files go, which saves a copy of each.
    for blob in [
        &b.cold,
        &b.cold_huge,
        &b.cold_many,
        &b.cold_paced,
        &b.cold_huge_paced,
    ] {
        std::fs::remove_file(&blob.path)?;
    }
    put_manifest(&urls.upstream, REPO, &b.manifest).await?;
    for blob in [&b.config, &b.small, &b.big] {
        push_blob_distribution(&urls.dist, REPO, blob).await?;
    }
    put_manifest(&urls.dist, REPO, &b.manifest).await?;
    for blob in [&b.config, &b.small, &b.big, &b.huge] {
        push_blob_kache(&urls.registry_internal, &urls.kache_repo, blob).await?;
    }
    put_manifest(&urls.registry_internal, &urls.kache_repo, &b.manifest).await
}

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

/// The kache binary, without the `KACHE_*` settings of the caller's environment.
/// Where kache's own processes listen: a port of the system's choosing, read back from the
/// `--ready-file` ([`Proc::spawn_kache`]).
pub const ANY: &str = "127.0.0.1:0";

pub fn kache_command(kache: &Path) -> Command {
    let mut cmd = Command::new(kache);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KACHE_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Polls `url` until it answers anything but a connection error.
pub async fn wait_ready(p: &mut Proc, url: &str) -> Result<()> {
    wait_ready_tls(p, url, None).await
}

/// [`wait_ready`] over TLS, trusting `cacert`.
pub async fn wait_ready_tls(p: &mut Proc, url: &str, cacert: Option<&Path>) -> Result<()> {
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
