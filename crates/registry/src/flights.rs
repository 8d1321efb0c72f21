//! What is being fetched upstream, and lists the upstream gave: one owner for every fetch the
//! registry makes (the store's blob flights aside, which the content layer alone starts).
//!
//! - [`Flights`]: everyone asking for a key while it is fetched joins the one request, which runs
//!   as a task of its own (it completes, and fills the cache, when its client leaves).
//! - [`Listings`]: tag lists and referrers by key, kept for a TTL and served stale when the
//!   upstream cannot answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use kache_wire::CacheOutcome;
use prometheus_client::metrics::counter::Counter;

use crate::plan::Freshness;
use crate::pull::PullError;

/// The most listings kept (tag lists, referrers); past it the oldest goes.
const MAX_LISTINGS: usize = 10_000;

type Flight<T> = Shared<BoxFuture<'static, Result<T, PullError>>>;

/// Each flight by key, with its number.
type FlightMap<T> = Arc<Mutex<HashMap<String, (u64, Flight<T>)>>>;

/// Each list by key, with when it was fetched.
type Kept<T> = Arc<Mutex<HashMap<String, (Instant, Arc<T>)>>>;

/// What is being fetched upstream, by key: everyone asking for a key while it is joins the one
/// request, which runs as a task of its own (it completes, and fills the cache, when its client
/// leaves).
pub(crate) struct Flights<T> {
    /// Each flight with its number: the task removes its own entry when it ends, and only its
    /// own, so that a flight every client left is not joined after it ended.
    map: FlightMap<T>,
    next: AtomicU64,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Arc::default(),
            next: AtomicU64::new(0),
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
    /// Joins the flight for `key`, starting it with `fut` if there is none.
    pub(crate) fn join(
        &self,
        key: String,
        fut: impl Future<Output = Result<T, PullError>> + Send + 'static,
        errors: &Counter,
    ) -> impl Future<Output = Result<T, PullError>> + Send + 'static {
        let mut map = self.map.lock().expect("flights poisoned");
        let (_, flight) = map.entry(key.clone()).or_insert_with(|| {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let errors = errors.clone();
            let flights = Arc::downgrade(&self.map);
            let task = tokio::spawn(async move {
                let r = fut.await;
                if r.is_err() {
                    errors.inc();
                }
                if let Some(map) = flights.upgrade() {
                    let mut map = map.lock().expect("flights poisoned");
                    if map.get(&key).is_some_and(|(n, _)| *n == id) {
                        map.remove(&key);
                    }
                }
                r
            });
            let flight = async move {
                task.await
                    .unwrap_or_else(|e| Err(PullError::Store(e.to_string().into())))
            }
            .boxed()
            .shared();
            (id, flight)
        });
        flight.clone()
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.map.lock().expect("flights poisoned").len()
    }
}

/// Lists the upstream gives (tags, referrers) by key: kept for a TTL and served stale when the
/// upstream cannot answer, or not within the re-validation wait; one upstream request per key
/// however many ask at once.
pub(crate) struct Listings<T> {
    kept: Kept<T>,
    flights: Flights<Arc<T>>,
}

impl<T> Default for Listings<T> {
    fn default() -> Self {
        Listings {
            kept: Arc::default(),
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
        freshness: Freshness,
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
            && at.elapsed() < freshness.tag_ttl
        {
            return Ok((v.clone(), CacheOutcome::Hit));
        }
        // The flight keeps what it fetched itself: it lands even when nobody waits for it.
        let keep = Arc::downgrade(&self.kept);
        let k = key.clone();
        let fetch = async move {
            let v = Arc::new(fetch.await?);
            if let Some(kept) = keep.upgrade() {
                let mut kept = kept.lock().expect("listings poisoned");
                if kept.len() >= MAX_LISTINGS
                    && !kept.contains_key(&k)
                    && let Some(oldest) = kept
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(k, _)| k.clone())
                {
                    kept.remove(&oldest);
                }
                kept.insert(k, (Instant::now(), v.clone()));
            }
            Ok(v)
        };
        let flight = self.flights.join(key.clone(), fetch, errors);
        let Some((_, stale)) = kept else {
            return flight.await.map(|v| (v, CacheOutcome::Miss));
        };
        match tokio::time::timeout(freshness.revalidate_wait, flight).await {
            Ok(Ok(v)) => Ok((v, CacheOutcome::Miss)),
            Ok(Err(e)) => {
                tracing::warn!(%key, error = ?e, "upstream could not list; serving the kept list");
                Ok((stale, CacheOutcome::Stale))
            }
            Err(_) => {
                tracing::warn!(%key, wait = ?freshness.revalidate_wait, "upstream did not list in time; serving the kept list");
                Ok((stale, CacheOutcome::Stale))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flight every client left still ends, and takes its entry with it: the next client
    /// starts a new fetch rather than joining one that ended (with what was true then).
    #[tokio::test]
    async fn a_flight_its_clients_left_ends_and_is_not_joined_after() {
        let flights = Flights::<u32>::default();
        let errors = Counter::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (ended, end) = tokio::sync::oneshot::channel::<()>();
        let first = flights.join(
            "k".into(),
            async move {
                let _ = released.await;
                let _ = ended.send(());
                Err(PullError::Store("the upstream was down".into()))
            },
            &errors,
        );
        drop(first);
        assert_eq!(flights.in_flight(), 1, "it runs on without its client");
        release.send(()).unwrap();
        // On this one-thread runtime the task, once its future sent this, runs to its end in
        // the same poll: the entry is gone when the test runs again.
        end.await.unwrap();
        let second = flights.join("k".into(), async { Ok(2) }, &errors);
        assert_eq!(second.await.unwrap(), 2, "a new fetch, not the ended one");
        assert_eq!(flights.in_flight(), 0);
        assert_eq!(errors.get(), 1, "the left flight's failure was counted");
    }
}
