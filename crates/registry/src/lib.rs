//! The OCI Distribution API (v1.1) served by axum over the kache store, with pull-through
//! from upstream registries for repositories named `<upstream host>/<path>`.
//!
//! Every request is routed by [`Route::parse`] from its raw path, then handled in
//! [`api`]; every failure is an [`error::Error`] with the spec's code and JSON body.
//!
//! A registry over a store of its own, asked in process (a listener is served with
//! [`serve`]):
//!
//! ```
//! use axum::body::Body;
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use kache_registry::{Metrics, Registry};
//! use tower::ServiceExt;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let mut prom = prometheus_client::registry::Registry::default();
//! let (registry, _recovered) = Registry::open(dir.path(), Metrics::new(&mut prom), None)
//!     .await
//!     .unwrap();
//!
//! let digest = kache_oci::Digest::sha256(b"a layer");
//! let push = Request::post(format!("/v2/demo/blobs/uploads/?digest={digest}"))
//!     .body(Body::from("a layer"))
//!     .unwrap();
//! let answer = registry.router().oneshot(push).await.unwrap();
//! assert_eq!(answer.status(), StatusCode::CREATED);
//!
//! let pull = Request::get(format!("/v2/demo/blobs/{digest}")).body(Body::empty()).unwrap();
//! let answer = registry.router().oneshot(pull).await.unwrap();
//! assert_eq!(answer.into_body().collect().await.unwrap().to_bytes(), "a layer");
//! registry.close().await.unwrap();
//! # });
//! ```

mod admin;
pub mod content;
pub mod error;
mod flights;
pub mod gc;
mod grants;
mod handlers;
pub mod metrics;
pub mod plan;
pub mod pull;
pub mod role;
pub mod tenancy;
pub mod warm;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use kache_http::ServerKind;
use kache_oci::distribution::{Intent, Route};
use kache_store::{Recovery, Storage, Store};
use kache_upstream::Upstream;
use kache_wire::pull_token::{self, TOKEN_PATH};
use kache_wire::{GC_PATH, GRANTS_PATH, IMAGES_PATH, WARM_PATH};

pub use content::{Blob, Content, Purpose, Requester, Served, Want};
pub use gc::{Collector, GcConfig, Schedule, Trigger};
pub use metrics::Metrics;
pub use plan::Freshness;
pub use pull::PullThrough;
pub use role::{RegistryRole, RoleConfig};
pub use tenancy::{Caller, KeyRing, Scoping};

use error::{Code, Error};

/// Serves a registry router (from [`Registry::router_for`]) on `listener` with the server
/// asked for. With kache's own, blob bodies go page cache → socket with sendfile(2), and a
/// connection that pushes (sends a request body) or speaks HTTP/2 is handed to hyper. Returns
/// after `shutdown` resolves and the requests in progress are answered.
pub async fn serve(
    app: Router,
    listener: tokio::net::TcpListener,
    kind: ServerKind,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    kache_http::Server::new(app)
        .kind(kind)
        .bodies(kache_http::Bodies::Hyper)
        .serve(listener, shutdown)
        .await
}

/// The registry service: a store, its metrics and optional pull-through; cheap to clone.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Storage>,
    metrics: Metrics,
    /// What the API reads: the store's, or pulled through.
    content: Content,
    gc: Arc<Collector>,
}

/// Who may change the cache through a listener. Whatever is cached runs on every node and any
/// pod can reach the registry Service, so writes (push, delete, warm) are privileged.
#[derive(Clone, Debug)]
pub enum Access {
    /// Reads and writes (`kache dev`, the internal listener).
    ReadWrite,
    /// Reads only: writes answer 405.
    ReadOnly,
    /// Writes need `Authorization: Bearer <token>`; without it they answer 401.
    Token(Arc<str>),
}

#[derive(Clone, Debug)]
struct Endpoint {
    registry: Registry,
    access: Access,
}

impl Registry {
    /// A registry over `store` that serves what it holds.
    pub fn new(store: Arc<dyn Storage>, metrics: Metrics) -> Self {
        Self::with(store, metrics, None, Freshness::tags(Duration::ZERO))
    }

    /// A registry that fetches what it lacks from upstream registries, re-validating cached
    /// tags as `freshness` says.
    pub fn with_pull_through(
        store: Arc<dyn Storage>,
        metrics: Metrics,
        upstream: Upstream,
        freshness: Freshness,
    ) -> Self {
        Self::with(store, metrics, Some(PullThrough::new(upstream)), freshness)
    }

    fn with(
        store: Arc<dyn Storage>,
        metrics: Metrics,
        pull: Option<PullThrough>,
        freshness: Freshness,
    ) -> Self {
        Registry {
            inner: Arc::new(Inner {
                gc: Collector::new(store.clone(), metrics.clone()),
                content: Content::new(store.clone(), pull, freshness, metrics.clone()),
                store,
                metrics,
            }),
        }
    }

    /// Turns private-image scoping on (see [`tenancy`]). Call it on a registry just made,
    /// before it is cloned or served.
    pub fn scoped(mut self, scoping: Scoping) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("scoping is set before the registry is shared")
            .content
            .set_scoping(Arc::new(scoping));
        self
    }

    /// What the registry's repositories hold, read as the API reads them.
    pub fn content(&self) -> &Content {
        &self.inner.content
    }

    /// Opens the store in `data_dir`, recovering what a crash left there (off the async
    /// runtime: recovery reads the whole index), and a registry over it; with `pull`, one that
    /// fetches what it lacks. Run [`Self::maintain`] beside it, and [`Self::close`] at the end.
    pub async fn open(
        data_dir: &Path,
        metrics: Metrics,
        pull: Option<(Upstream, Freshness)>,
    ) -> kache_store::Result<(Self, Recovery)> {
        let dir = data_dir.to_owned();
        let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let store = Arc::new(store);
        let registry = match pull {
            Some((upstream, freshness)) => {
                Self::with_pull_through(store, metrics, upstream, freshness)
            }
            None => Self::new(store, metrics),
        };
        Ok((registry, recovery))
    }

    /// Writes what the registry holds only in memory (access times, which decide what expires)
    /// to the store. Call it when the servers have stopped, before the process ends.
    pub async fn close(&self) -> kache_store::Result<()> {
        self.inner.store.flush_access().await.map(drop)
    }

    pub fn store(&self) -> &Arc<dyn Storage> {
        &self.inner.store
    }

    /// The garbage collector of this registry's store.
    pub fn collector(&self) -> &Arc<Collector> {
        &self.inner.gc
    }

    /// Sets how the registry collects (schedule, grace, limits). Call before [`Self::maintain`].
    pub fn configure_gc(&self, config: GcConfig) {
        self.inner.gc.configure(config);
    }

    /// Brings the store gauges up to date (before a scrape).
    pub fn refresh_gauges(&self) {
        let m = &self.inner.metrics;
        m.store_bytes.set(self.inner.store.total_bytes() as i64);
        if let Ok(free) = self.inner.store.free_bytes() {
            m.store_free_bytes.set(free as i64);
        }
        if self.inner.content.scoping().is_some()
            && let Ok(grants) = self.inner.store.grants()
        {
            let now = content::now();
            m.grants
                .set(grants.iter().filter(|g| g.expires_at > now).count() as i64);
        }
    }

    /// The API with reads and writes, as `kache dev` and tests serve it.
    pub fn router(&self) -> Router {
        self.router_for(Access::ReadWrite)
    }

    /// The API as one listener serves it.
    pub fn router_for(&self, access: Access) -> Router {
        Router::new().fallback(handle).with_state(Endpoint {
            registry: self.clone(),
            access,
        })
    }

    /// Background upkeep: flushes access times, expires abandoned uploads, refreshes the
    /// store gauges, and collects garbage on the schedule and under pressure. Runs until the
    /// task is dropped.
    pub async fn maintain(self, upload_timeout: Duration) {
        let collector = tokio::spawn(self.inner.gc.clone().run());
        let _stop = AbortOnDrop(collector);
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        loop {
            tick.tick().await;
            let store = &self.inner.store;
            if let Err(e) = store.flush_access().await {
                tracing::warn!(error = %e, "flushing access times failed");
            }
            match store.expire_uploads(upload_timeout).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(expired = n, "removed abandoned uploads"),
                Err(e) => tracing::warn!(error = %e, "expiring uploads failed"),
            }
            if let Some(s) = self.inner.content.scoping() {
                match s.keys.reload() {
                    Ok(true) => tracing::info!(keys = ?s.keys.keys(), "pull-token keys changed"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "re-reading the pull-token keys failed; the keys held stay")
                    }
                }
            }
            self.refresh_gauges();
        }
    }
}

/// Stops a background task when its owner goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Access {
    /// Whether `req` may write through this listener.
    fn check_write(&self, req: &Request) -> Result<(), Error> {
        match self {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::new(
                Code::Unsupported,
                "this listener is read-only: push, delete and warm go to the internal listener",
            )),
            Access::Token(token) => {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                match given {
                    Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
                    _ => Err(Error::new(
                        Code::Unauthorized,
                        "writes need the registry's write token",
                    )
                    .header(header::WWW_AUTHENTICATE, "Bearer realm=\"kache\"")),
                }
            }
        }
    }
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn handle(State(ep): State<Endpoint>, req: Request) -> Response {
    let started = Instant::now();
    let reg = &ep.registry;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let write_check = if is_write(&method) && path != TOKEN_PATH {
        ep.access.check_write(&req)
    } else {
        Ok(())
    };
    let host = pull_token::realm_host(
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok()),
    )
    .to_owned();
    let mut scope_repo = None;
    let (route, mut resp) = match write_check {
        Err(e) => ("denied", e.into_response()),
        Ok(()) if path == WARM_PATH => (
            "warm",
            reg.warm_endpoint(req)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        ),
        Ok(()) if path == GC_PATH => (
            "gc",
            reg.gc_endpoint(req)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        ),
        Ok(()) if path == IMAGES_PATH => (
            "images",
            reg.images_endpoint(req)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        ),
        Ok(()) if path == GRANTS_PATH => (
            "grants",
            reg.grants_endpoint(req)
                .await
                .unwrap_or_else(IntoResponse::into_response),
        ),
        Ok(()) if path == TOKEN_PATH => ("token", token_endpoint(req).await),
        Ok(()) => match Route::parse_request(&path, req.uri().query())
            .map_err(|e| Error::route(e, Intent::of(method.as_str())))
        {
            Ok(route) => {
                let label = route.label();
                scope_repo = route.repo().map(|r| r.to_string());
                let who = Requester::of(reg.caller(req.headers()));
                (
                    label,
                    reg.dispatch(route, req, &who)
                        .await
                        .unwrap_or_else(IntoResponse::into_response),
                )
            }
            Err(e) => ("invalid", e.into_response()),
        },
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    // A refusal of kache's own (not the upstream's, which carries its challenge) points the
    // client at the token endpoint of the address it used.
    if resp.status() == http::StatusCode::UNAUTHORIZED
        && !resp.headers().contains_key(header::WWW_AUTHENTICATE)
        && let Ok(v) = HeaderValue::from_str(&pull_token::challenge(&host, scope_repo.as_deref()))
    {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    let status = resp.status().as_u16();
    let m = &reg.inner.metrics;
    m.requests
        .get_or_create(&metrics::RequestLabels {
            route,
            method: method_label(&method),
            status,
        })
        .inc();
    m.duration
        .get_or_create(&metrics::RouteLabel { route })
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(%method, %path, status, elapsed_ms = started.elapsed().as_millis() as u64, "request");
    resp
}

/// Methods as metric labels; anything unusual is one label, so clients cannot grow the series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    }
}

/// `GET` or `POST` [`TOKEN_PATH`]: trades the credentials a client was given (a namespace's
/// pull token) for the bearer token it sends next, which is that same token: the registry
/// verifies it on every read. Stateless, so the node proxy answers it too.
async fn token_endpoint(req: Request) -> Response {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let form = if req.method() == Method::POST {
        use http_body_util::BodyExt;
        match http_body_util::Limited::new(req.into_body(), 4096)
            .collect()
            .await
        {
            Ok(b) => Some(b.to_bytes()),
            Err(_) => {
                return Error::new(Code::Unsupported, "token request body over 4 KiB")
                    .status(http::StatusCode::BAD_REQUEST)
                    .into_response();
            }
        }
    } else {
        None
    };
    let answer = pull_token::token_answer(authorization.as_deref(), form.as_deref());
    ([(header::CONTENT_TYPE, "application/json")], answer).into_response()
}
