//! The one kache binary: `kache registry|proxy|webhook|controller|dev|gc|fsck|certs|health|crds`.
//! It parses configuration (typed at the edge: flags.rs) and wires the crates together;
//! behaviour lives in the crates.

mod certs;
mod control;
mod flags;
mod health;
mod prepull;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use flags::{parse_duration, parse_share, parse_size};
use kache_http::ServerKind;

#[derive(Parser, Debug)]
#[command(
    name = "kache",
    version,
    about = "Keeps every container image a Kubernetes cluster runs inside the cluster"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "KACHE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Once every listener is bound, write their addresses here (JSON, `{"listen": "ADDR",
    /// ...}`): with a `:0` address, where the system put it.
    #[arg(long, global = true, env = "KACHE_READY_FILE")]
    ready_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OCI registry and pull-through cache over the store in --data-dir.
    Registry(RegistryArgs),
    /// Serve pulls on a node: the registry first, the upstream when the registry cannot answer.
    Proxy(ProxyArgs),
    /// Serve the admission webhook that points pod images at the node proxy (HTTPS).
    Webhook(WebhookArgs),
    /// Run the controllers: CachedImages for pods and workloads, caching, expiry.
    Controller(ControllerArgs),
    /// Print the CustomResourceDefinitions (YAML) of the kache.io API.
    Crds,
    /// Run registry and proxy on 127.0.0.1, with data in ./kache-data: what a newcomer runs first.
    Dev(DevArgs),
    /// Run one garbage collection now on a running registry, and print what it removed.
    Gc(GcArgs),
    /// Make a local CA and the webhook's serving certificate (clusters without cert-manager).
    Certs(certs::CertsArgs),
    /// Exit 0 when a listener answers 2xx: the healthcheck of containers run by an engine.
    Health(health::HealthArgs),
    /// Node pre-pull: the programs its pods run; a NodeImageSet from an image-puller's settings.
    Prepull(prepull::PrepullArgs),
    /// Re-hash every blob in a (stopped) store and report what does not verify, with its
    /// progress on stderr.
    Fsck {
        #[arg(long, env = "KACHE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// How kache reaches upstream registries (registry and proxy alike).
#[derive(clap::Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// A docker config.json (the format of kubernetes.io/dockerconfigjson Secrets) with
    /// credentials per registry.
    #[arg(long, env = "KACHE_DOCKER_CONFIG")]
    docker_config: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted for upstream registries; repeatable.
    #[arg(long = "ca-file", env = "KACHE_CA_FILES", value_delimiter = ',')]
    ca_files: Vec<PathBuf>,
    /// Registries reached over plain HTTP (`host:port`); repeatable.
    #[arg(
        long = "insecure-registry",
        env = "KACHE_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    insecure_registries: Vec<String>,
    /// Longest wait for an upstream's response headers.
    #[arg(long, env = "KACHE_UPSTREAM_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    upstream_timeout: Duration,
}

/// When cached tags are asked again upstream (registry and dev alike).
#[derive(clap::Args, Debug, Clone)]
pub struct FreshnessFlags {
    /// A cached tag older than this is re-validated upstream (served from cache if that fails).
    #[arg(long, env = "KACHE_TAG_TTL", value_parser = parse_duration, default_value = "5m")]
    tag_ttl: Duration,
    /// The longest a pull waits for that re-validation; past it the cached manifest is served
    /// and the check goes on (keep it below the proxies' --registry-timeout).
    #[arg(long, env = "KACHE_REVALIDATE_WAIT", value_parser = parse_duration, default_value = "2s")]
    revalidate_wait: Duration,
}

impl FreshnessFlags {
    fn freshness(&self) -> kache_registry::Freshness {
        kache_registry::Freshness {
            tag_ttl: self.tag_ttl,
            revalidate_wait: self.revalidate_wait,
        }
    }
}

/// Private-image scoping (registry).
#[derive(clap::Args, Debug, Clone)]
pub struct ScopingFlags {
    /// A directory of pull-token keys, one file per key named by its id (a mounted Secret;
    /// re-read every 15 s). With it, a private repository is served only to namespaces granted
    /// it; without it, every cached image is served to every pod.
    #[arg(long, env = "KACHE_PULL_TOKEN_KEYS")]
    pull_token_keys: Option<PathBuf>,
    /// How long a grant holds once the upstream accepted a namespace's credentials.
    #[arg(long, env = "KACHE_GRANT_TTL", value_parser = parse_duration, default_value = "24h")]
    grant_ttl: Duration,
    /// A registry (`host[:port]`) whose images, fetched with the chart-wide credentials, are
    /// private rather than the whole cluster's; repeatable.
    #[arg(
        long = "private-registry",
        env = "KACHE_PRIVATE_REGISTRIES",
        value_delimiter = ','
    )]
    private_registries: Vec<String>,
}

impl ScopingFlags {
    fn scoping(&self) -> anyhow::Result<Option<kache_registry::Scoping>> {
        use anyhow::Context as _;
        let Some(dir) = &self.pull_token_keys else {
            return Ok(None);
        };
        let keys = kache_registry::KeyRing::from_dir(dir.clone())
            .with_context(|| format!("reading the pull-token keys in {}", dir.display()))?;
        anyhow::ensure!(
            !self.grant_ttl.is_zero(),
            "--grant-ttl must be longer than 0s"
        );
        Ok(Some(kache_registry::Scoping {
            keys,
            grant_ttl: self.grant_ttl,
            private_registries: self.private_registries.clone(),
        }))
    }
}

/// When and how the registry collects garbage (registry and dev alike).
#[derive(clap::Args, Debug, Clone)]
pub struct GcFlags {
    /// When garbage collection runs: a five-field cron expression in UTC (minute hour
    /// day-of-month month day-of-week; a leading seconds field is allowed), or `off`.
    #[arg(long, env = "KACHE_GC_SCHEDULE", default_value = "0 3 * * *")]
    gc_schedule: kache_registry::Schedule,
    /// Blobs and manifests written or used more recently than this are never collected: longer
    /// than any client takes between uploading layers and pushing their manifest.
    #[arg(long, env = "KACHE_GC_GRACE", value_parser = parse_duration, default_value = "1h")]
    gc_grace: Duration,
    /// The most the store may hold (`200GiB`, `500MB`, `200Gi`); above it, whole images go,
    /// least recently pulled first, never one a CachedImage retains or a live pod uses.
    #[arg(long, env = "KACHE_MAX_SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Free space kept on the data directory's filesystem (`5%` or a size): below it, images
    /// are evicted the same way, before writes start failing.
    #[arg(long, env = "KACHE_MIN_FREE", default_value = "5%")]
    min_free: kache_store::MinFree,
    /// The share of one core a scheduled or requested collection may take (`10%`); it works
    /// in slices and rests between them, so pulls keep their latency. A collection that the
    /// limits start takes what it needs.
    #[arg(long, env = "KACHE_GC_CPU", value_parser = parse_share, default_value = "10%")]
    gc_cpu: f64,
    /// Blobs removed per index transaction during a sweep.
    #[arg(long, env = "KACHE_GC_BATCH", hide = true)]
    gc_batch: Option<usize>,
}

/// Where the registry's writes go (the controller and `kache gc`).
#[derive(clap::Args, Debug)]
struct WriteRegistryArgs {
    /// The registry's internal listener (the one that takes warm calls, deletes and admin calls).
    #[arg(
        long,
        env = "KACHE_REGISTRY",
        default_value = "http://kache-registry-internal:5001"
    )]
    registry: String,
    /// A file holding the registry's write token, when its writes need one.
    #[arg(long, env = "KACHE_REGISTRY_TOKEN_FILE")]
    registry_token_file: Option<PathBuf>,
}

impl WriteRegistryArgs {
    fn token(&self) -> anyhow::Result<Option<String>> {
        self.registry_token_file
            .as_deref()
            .map(serve::read_token)
            .transpose()
    }
}

#[derive(clap::Args, Debug)]
struct GcArgs {
    #[command(flatten)]
    registry: WriteRegistryArgs,
    /// Decide and report, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct RegistryArgs {
    /// Address of the Distribution API the proxies read from. Writes here need --write-token-file.
    #[arg(long, env = "KACHE_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// Address of a listener that also takes writes (push, delete, warm), for the controller.
    #[arg(long, env = "KACHE_INTERNAL_LISTEN")]
    internal_listen: Option<SocketAddr>,
    /// A file holding a bearer token that allows writes on --listen (a mounted Secret).
    #[arg(long, env = "KACHE_WRITE_TOKEN_FILE")]
    write_token_file: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// Where blobs and the index live.
    #[arg(long, env = "KACHE_DATA_DIR", default_value = "/var/lib/kache")]
    data_dir: PathBuf,
    /// Upload sessions untouched for this long are removed.
    #[arg(long, env = "KACHE_UPLOAD_TIMEOUT", value_parser = parse_duration, default_value = "1h")]
    upload_timeout: Duration,
    #[command(flatten)]
    freshness: FreshnessFlags,
    /// Which HTTP server answers: `kache` (its own HTTP/1.1 server for pulls, blob bodies sent
    /// with sendfile; pushes and HTTP/2 go to hyper) or `hyper` (every body through user space).
    #[arg(
        long = "http-server",
        alias = "server",
        env = "KACHE_HTTP_SERVER",
        value_enum,
        default_value = "kache"
    )]
    server: kache_http::ServerKind,
    #[command(flatten)]
    gc: GcFlags,
    #[command(flatten)]
    scoping: ScopingFlags,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

#[derive(clap::Args, Debug)]
struct ProxyArgs {
    /// Addresses to serve the kubelet on. `[::1]` is skipped where the host has no IPv6.
    #[arg(long, env = "KACHE_LISTEN", value_delimiter = ',', default_values_t = [
        "127.0.0.1:7439".parse::<SocketAddr>().expect("valid"),
        "[::1]:7439".parse::<SocketAddr>().expect("valid"),
    ])]
    listen: Vec<SocketAddr>,
    /// Base URL of the registry Service.
    #[arg(
        long,
        env = "KACHE_REGISTRY",
        default_value = "http://kache-registry:5000"
    )]
    registry: kache_proxy::RegistryUrl,
    /// Longest wait for the registry before going upstream.
    #[arg(long, env = "KACHE_REGISTRY_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    registry_timeout: Duration,
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "127.0.0.1:9091")]
    metrics_listen: SocketAddr,
    /// The registry scopes private images (its --pull-token-keys): the ping challenges a
    /// client without credentials, so CRI-O and podman send the namespace's pull token.
    #[arg(long, env = "KACHE_PRIVATE_IMAGES")]
    private_images: bool,
    /// Which HTTP server answers: `kache` (its own HTTP/1.1 server; blob bodies go registry
    /// socket → client socket with splice, never through user space) or `hyper` (copied).
    #[arg(
        long = "http-server",
        alias = "relay",
        env = "KACHE_HTTP_SERVER",
        value_enum,
        default_value = "kache"
    )]
    server: kache_http::ServerKind,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

/// Which pods and images kache takes: the webhook rewrites them, the controller pre-caches the
/// workloads whose pods it will rewrite. Give both the same values (the chart does).
#[derive(clap::Args, Debug)]
struct PolicyArgs {
    /// The node proxy's port: images become localhost:<port>/<upstream host>/<path>.
    #[arg(long, env = "KACHE_PROXY_PORT", default_value_t = kache_api::policy::DEFAULT_PROXY_PORT)]
    proxy_port: u16,
    /// Leave the pods of this namespace alone; repeatable. Giving any replaces the default.
    #[arg(
        long = "ignore-namespace",
        env = "KACHE_IGNORE_NAMESPACES",
        value_delimiter = ',',
        default_values_t = kache_api::policy::DEFAULT_IGNORED_NAMESPACES.iter().map(|n| n.to_string())
    )]
    ignore_namespaces: Vec<String>,
    /// Take only pods whose labels this selects: the JSON of a label selector, as a
    /// MutatingWebhookConfiguration's objectSelector holds it
    /// (`{"matchExpressions":[{"key":"team","operator":"NotIn","values":["infra"]}]}`).
    #[arg(long, env = "KACHE_OBJECT_SELECTOR", value_parser = parse_selector, default_value = "")]
    object_selector: kache_api::policy::Selector,
    /// Leave images of this registry alone (host, glob like `*.internal`, or `regex:<re>`);
    /// repeatable.
    #[arg(
        long = "ignore-registry",
        env = "KACHE_IGNORE_REGISTRIES",
        value_delimiter = ','
    )]
    ignore_registries: Vec<String>,
    /// Take only images matching one of these (glob like `docker.io/library/*` or
    /// `*.example.com`, or `regex:<re>`); repeatable (the variable holds one pattern).
    #[arg(long, env = "KACHE_ACCEPT")]
    accept: Vec<String>,
    /// Leave mutable images alone: `imagePullPolicy: Always`, or tag `latest` or none, unless
    /// pinned by digest.
    #[arg(long, env = "KACHE_SKIP_MUTABLE")]
    skip_mutable: bool,
    /// With private-image scoping: the Secret holding each namespace's pull token, appended to
    /// the pull secrets of every pod rewritten that has any (the controller keeps it).
    #[arg(long, env = "KACHE_PULL_SECRET", value_parser = parse_secret_name)]
    pull_secret: Option<String>,
}

fn parse_secret_name(s: &str) -> Result<String, String> {
    if kache_api::pod_marks::is_dns_subdomain(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not a Secret name"))
    }
}

fn parse_selector(s: &str) -> Result<kache_api::policy::Selector, String> {
    kache_api::policy::Selector::from_json(s).map_err(|e| e.to_string())
}

impl PolicyArgs {
    fn policy(&self) -> anyhow::Result<kache_api::policy::Policy> {
        use anyhow::Context as _;
        use kache_api::policy::Pattern;
        Ok(kache_api::policy::Policy {
            proxy_port: self.proxy_port,
            ignored_namespaces: self.ignore_namespaces.clone(),
            object_selector: self.object_selector.clone(),
            ignore_registries: self
                .ignore_registries
                .iter()
                .map(|p| Pattern::registry(p))
                .collect::<Result<_, _>>()
                .context("--ignore-registry")?,
            accept: self
                .accept
                .iter()
                .map(|p| Pattern::image(p))
                .collect::<Result<_, _>>()
                .context("--accept")?,
            skip_mutable: self.skip_mutable,
            pull_secret: self.pull_secret.clone(),
        })
    }
}

#[derive(clap::Args, Debug)]
struct WebhookArgs {
    /// Address of the HTTPS admission endpoint (POST /mutate).
    #[arg(long, env = "KACHE_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Serving certificate chain (PEM, cert-manager's tls.crt); reloaded when it changes.
    #[arg(long, env = "KACHE_TLS_CERT")]
    tls_cert: PathBuf,
    /// Its private key (PEM, tls.key).
    #[arg(long, env = "KACHE_TLS_KEY")]
    tls_key: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Address of /metrics, /healthz and /readyz (plain HTTP).
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
    /// On SIGTERM, keep serving this long before stopping: the API server calls the endpoints
    /// it knows, and a pod's is withdrawn only after it starts terminating.
    #[arg(long, env = "KACHE_SHUTDOWN_DELAY", value_parser = parse_duration, default_value = "5s")]
    shutdown_delay: Duration,
}

#[derive(clap::Args, Debug)]
struct ControllerArgs {
    #[command(flatten)]
    registry: WriteRegistryArgs,
    /// Longest wait for one warm call (a cold multi-GiB image takes a while).
    #[arg(long, env = "KACHE_REGISTRY_TIMEOUT", value_parser = parse_duration, default_value = "30m")]
    registry_timeout: Duration,
    /// An image no pod uses goes this long after its last pod (`30d`, `2h`, `1d12h`).
    #[arg(long, env = "KACHE_EXPIRY_DELAY", value_parser = parse_duration, default_value = "30d")]
    expiry_delay: Duration,
    /// A cached image is confirmed with the registry this often.
    #[arg(long, env = "KACHE_RESYNC", value_parser = parse_duration, default_value = "6h")]
    resync: Duration,
    /// Workload kinds whose pod templates are cached before their pods exist; `none` for none.
    #[arg(
        long,
        env = "KACHE_PRECACHE_KINDS",
        value_delimiter = ',',
        default_value = "deployments,statefulsets,daemonsets,replicasets,jobs,cronjobs"
    )]
    precache_kinds: Vec<String>,
    /// Namespace of the leader-election Lease; without it, no election (one replica only).
    #[arg(long, env = "KACHE_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(long, env = "KACHE_LEASE_NAME", default_value = "kache-controller")]
    lease_name: String,
    /// How long the Lease holds without renewal.
    #[arg(long, env = "KACHE_LEASE_DURATION", value_parser = parse_duration, default_value = "15s")]
    lease_duration: Duration,
    /// This replica's identity (the pod name, from the downward API).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// With private-image scoping: the pull-token keys (the registry's --pull-token-keys
    /// Secret). The controller then keeps the --pull-secret Secret of each namespace whose pods
    /// use pull secrets, and has the registry check each such namespace's access.
    #[arg(long, env = "KACHE_PULL_TOKEN_KEYS", requires = "pull_secret")]
    pull_token_keys: Option<PathBuf>,
    /// How often a namespace's access to a private image is checked again upstream: under the
    /// registry's --grant-ttl.
    #[arg(long, env = "KACHE_GRANT_RENEWAL", value_parser = parse_duration, default_value = "12h")]
    grant_renewal: Duration,
    /// Runs NodeImageSets: their DaemonSets go in this namespace (kache's own). Without it,
    /// NodeImageSets are left alone.
    #[arg(
        long,
        env = "KACHE_NODE_IMAGES_NAMESPACE",
        requires = "node_images_image"
    )]
    node_images_namespace: Option<String>,
    /// The kache image the holder pods run (`kache prepull programs`).
    #[arg(
        long,
        env = "KACHE_NODE_IMAGES_IMAGE",
        requires = "node_images_namespace"
    )]
    node_images_image: Option<String>,
    /// The holder pods' pull policy for the kache image.
    #[arg(long, env = "KACHE_NODE_IMAGES_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    node_images_pull_policy: String,
    /// Secrets in that namespace the kubelet needs to pull the kache image.
    #[arg(long, env = "KACHE_NODE_IMAGES_PULL_SECRETS", value_delimiter = ',')]
    node_images_pull_secrets: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    metrics_listen: SocketAddr,
}

#[derive(clap::Args, Debug)]
struct DevArgs {
    /// The registry (reads and writes).
    #[arg(long, env = "KACHE_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// The node proxy.
    #[arg(long, env = "KACHE_PROXY_LISTEN", default_value = "127.0.0.1:7439")]
    proxy_listen: SocketAddr,
    #[arg(long, env = "KACHE_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    #[arg(long, env = "KACHE_DATA_DIR", default_value = "kache-data")]
    data_dir: PathBuf,
    #[command(flatten)]
    freshness: FreshnessFlags,
    #[command(flatten)]
    gc: GcFlags,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

impl GcFlags {
    fn config(&self, upload_timeout: Duration) -> kache_registry::GcConfig {
        if self.gc_grace < Duration::from_secs(60) {
            tracing::warn!(
                grace = ?self.gc_grace,
                "a garbage-collection grace period under a minute can remove the layers of a push in progress"
            );
        }
        kache_registry::GcConfig {
            schedule: self.gc_schedule.clone(),
            grace: self.gc_grace,
            upload_timeout,
            limits: kache_store::Limits {
                max_size: self.max_size,
                min_free: self.min_free,
            },
            batch: self.gc_batch,
            duty: self.gc_cpu,
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    // The one TLS provider of the binary; two would panic at the first TLS configuration.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // Needs no runtime.
    if let Command::Prepull(a) = &cli.command {
        return prepull::run(a);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ready = cli.ready_file.as_deref();
    rt.block_on(async {
        match cli.command {
            Command::Registry(a) => {
                let write_token = match &a.write_token_file {
                    Some(p) => Some(serve::read_token(p)?),
                    None => None,
                };
                serve::registry(
                    serve::RegistryOptions {
                        listen: a.listen,
                        internal_listen: a.internal_listen,
                        write_token,
                        open_writes: false,
                        metrics_listen: a.metrics_listen,
                        data_dir: a.data_dir,
                        upload_timeout: a.upload_timeout,
                        freshness: a.freshness.freshness(),
                        server: a.server,
                        gc: a.gc.config(a.upload_timeout),
                        scoping: a.scoping.scoping()?,
                        upstream: serve::upstream_config(&a.upstream)?,
                    },
                    ready,
                )
                .await
            }
            Command::Proxy(a) => {
                serve::proxy(
                    serve::ProxyOptions {
                        listen: a.listen,
                        registry: a.registry,
                        registry_timeout: a.registry_timeout,
                        metrics_listen: a.metrics_listen,
                        upstream: serve::upstream_config(&a.upstream)?,
                        server: a.server,
                        private_images: a.private_images,
                    },
                    ready,
                )
                .await
            }
            Command::Webhook(a) => {
                serve::webhook(
                    serve::WebhookOptions {
                        listen: a.listen,
                        tls_cert: a.tls_cert,
                        tls_key: a.tls_key,
                        policy: a.policy.policy()?,
                        shutdown_delay: a.shutdown_delay,
                        metrics_listen: a.metrics_listen,
                    },
                    ready,
                )
                .await
            }
            Command::Dev(a) => {
                let upstream = serve::upstream_config(&a.upstream)?;
                let registry = serve::RegistryOptions {
                    listen: a.listen,
                    internal_listen: None,
                    write_token: None,
                    open_writes: true,
                    metrics_listen: a.metrics_listen,
                    data_dir: a.data_dir,
                    upload_timeout: Duration::from_secs(3600),
                    freshness: a.freshness.freshness(),
                    server: ServerKind::Kache,
                    gc: a.gc.config(Duration::from_secs(3600)),
                    scoping: None,
                    upstream: upstream.clone(),
                };
                let proxy = serve::ProxyOptions {
                    listen: vec![a.proxy_listen],
                    registry: format!("http://{}", a.listen).parse()?,
                    registry_timeout: Duration::from_secs(5),
                    metrics_listen: a.metrics_listen,
                    upstream,
                    server: ServerKind::Kache,
                    private_images: false,
                };
                serve::dev(registry, proxy, ready).await
            }
            Command::Controller(a) => control::controller(a, ready).await,
            Command::Crds => {
                print!("{}", kache_api::crds_yaml());
                Ok(())
            }
            Command::Gc(a) => {
                let token = a.registry.token()?;
                control::gc(&a.registry.registry, token, a.dry_run, a.json).await
            }
            Command::Fsck { data_dir } => serve::fsck(&data_dir).await,
            Command::Certs(a) => certs::run(&a),
            Command::Health(a) => health::run(&a).await,
            Command::Prepull(_) => unreachable!("run before the runtime"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_http_server_flag_and_the_old_names_still_parse() {
        let server = |args: &[&str]| -> Result<ServerKind, String> {
            let cli =
                Cli::try_parse_from(["kache"].iter().chain(args)).map_err(|e| e.to_string())?;
            match cli.command {
                Command::Registry(a) => Ok(a.server),
                Command::Proxy(a) => Ok(a.server),
                _ => unreachable!(),
            }
        };
        use ServerKind::{Hyper, Kache};
        assert_eq!(server(&["registry"]), Ok(Kache));
        assert_eq!(server(&["proxy"]), Ok(Kache));
        assert_eq!(server(&["registry", "--http-server", "hyper"]), Ok(Hyper));
        assert_eq!(server(&["proxy", "--http-server", "hyper"]), Ok(Hyper));
        assert_eq!(server(&["registry", "--server", "hyper"]), Ok(Hyper));
        assert_eq!(server(&["proxy", "--relay", "splice"]), Ok(Kache));
        assert_eq!(server(&["proxy", "--relay", "hyper"]), Ok(Hyper));
        let e = server(&["proxy", "--http-server", "copy"]).unwrap_err();
        assert!(e.contains("possible values: kache, hyper"), "{e}");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
