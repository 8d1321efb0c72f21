//! What is being fetched upstream, and lists the upstream gave: one owner for every fetch the
//! registry makes (the store's blob flights aside, which the content layer alone starts).
//!
//! - [`Flights`]: everyone asking for a key while it is fetched joins the one request, which runs
//!   as a task of its own (it completes, and fills the cache, when its client leaves).
//! - [`Listings`]: tag lists and referrers by key, kept for a TTL and served stale when the
//!   upstream cannot answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use kache_wire::CacheOutcome;
use prometheus_client::metrics::counter::Counter;

use crate::pull::PullError;

/// The most listings kept (tag lists, referrers); past it the oldest goes.
const MAX_LISTINGS: usize = 10_000;

type Flight<T> = Shared<BoxFuture<'static, Result<T, PullError>>>;

/// What is being fetched upstream, by key: everyone asking for a key while it is joins the one
/// request, which runs as a task of its own (it completes, and fills the cache, when its client
/// leaves).
pub(crate) struct Flights<T> {
    map: Mutex<HashMap<String, Flight<T>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Mutex::default(),
        }
    }
}

impl<T> std::fmt::Debug for Flights<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.lock().map_or(0, |m| m.len());
        f.debug_struct("Flights").field("in_flight", &n).finish()
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    pub(crate) async fn join(
        &self,
        key: String,
        fut: impl Future<Output = Result<T, PullError>> + Send + 'static,
        errors: &Counter,
    ) -> Result<T, PullError> {
        let flight = {
            let mut map = self.map.lock().expect("flights poisoned");
            map.entry(key.clone())
                .or_insert_with(|| {
                    let errors = errors.clone();
                    let task = tokio::spawn(async move {
                        let r = fut.await;
                        if r.is_err() {
                            errors.inc();
                        }
                        r
                    });
                    async move {
                        task.await
                            .unwrap_or_else(|e| Err(PullError::Store(e.to_string().into())))
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        let result = flight.clone().await;
        let mut map = self.map.lock().expect("flights poisoned");
        if map.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            map.remove(&key);
        }
        result
    }
}

/// Lists the upstream gives (tags, referrers) by key: kept for a TTL and served stale when the
/// upstream cannot answer; one upstream request per key however many ask at once.
pub(crate) struct Listings<T> {
    kept: Mutex<HashMap<String, (Instant, Arc<T>)>>,
    flights: Flights<Arc<T>>,
}

impl<T> Default for Listings<T> {
    fn default() -> Self {
        Listings {
            kept: Mutex::default(),
            flights: Flights::default(),
        }
    }
}

impl<T> std::fmt::Debug for Listings<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock().map_or(0, |k| k.len());
        f.debug_struct("Listings").field("kept", &kept).finish()
    }
}

impl<T: Send + Sync + 'static> Listings<T> {
    pub(crate) async fn get(
        &self,
        key: String,
        ttl: Duration,
        fetch: impl Future<Output = Result<T, PullError>> + Send + 'static,
        errors: &Counter,
    ) -> Result<(Arc<T>, CacheOutcome), PullError> {
        let kept = self
            .kept
            .lock()
            .expect("listings poisoned")
            .get(&key)
            .cloned();
        if let Some((at, v)) = &kept
            && at.elapsed() < ttl
        {
            return Ok((v.clone(), CacheOutcome::Hit));
        }
        let fetch = async move { fetch.await.map(Arc::new) };
        match self.flights.join(key.clone(), fetch, errors).await {
            Ok(v) => {
                let mut kept = self.kept.lock().expect("listings poisoned");
                if kept.len() >= MAX_LISTINGS
                    && !kept.contains_key(&key)
                    && let Some(oldest) = kept
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    kept.remove(&oldest);
                }
                kept.insert(key, (Instant::now(), v.clone()));
                Ok((v, CacheOutcome::Miss))
            }
            Err(e) => match kept {
                Some((_, v)) => {
                    tracing::warn!(%key, error = ?e, "upstream could not list; serving the kept list");
                    Ok((v, CacheOutcome::Stale))
                }
                None => Err(e),
            },
        }
    }
}
