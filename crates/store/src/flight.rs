//! Single flight for blobs fetched from elsewhere (pull-through).
//!
//! However many requests ask for one uncached blob, one fetch runs. It is a task of its own,
//! so it completes for the others (and for the cache) when the client that started it goes
//! away. It writes to a temporary file in batches and publishes how much is on disk; every
//! requester follows that file as it grows. Nobody receives the last byte before the whole
//! blob has been verified against its digest, so a lying source never completes a response.
//!
//! Readers get their last byte as soon as the digest matches; the fsync, the rename into
//! `blobs/` and the index commit come after (an fsync of a large blob takes a noticeable share
//! of a cold pull). The blob is visible to other requests only once it is renamed and indexed,
//! so a crash in between leaves a temporary file, as before.
//!
//! A cache that cannot keep a blob degrades to a proxy, never to a failed pull: when the blob
//! does not fit (its announced size is larger than the free space) or writing it fails (disk
//! full, an I/O error), every reader goes on with a stream of its own from the source, whose
//! bytes it hashes together with those it already had, so its last byte still waits for the
//! digest to match. Nothing is kept; the [`Observer`](crate::Observer) hears of it.
//!
//! Here are the flights and how a request joins one; the fetch task is in fetch.rs, what a
//! requester reads in reader.rs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream};
use kache_oci::{Digest, RepoName};
use tokio::sync::watch;

use crate::Store;
use crate::error::StoreError;

mod fetch;
mod reader;

use fetch::run;
use reader::{Reader, relay};

/// An error of the source, kept whole so the caller can tell a 404 from a timeout.
pub type FetchError = Arc<dyn std::error::Error + Send + Sync>;

/// A byte stream from the source.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

/// Asks the source for the whole blob: once per flight, and once more per reader if the store
/// cannot keep it.
pub type SourceFn = Arc<dyn Fn() -> BoxFuture<'static, Result<Source, FetchError>> + Send + Sync>;

/// What a source hands back once it answers: the size it announced, if any, and the bytes.
pub struct Source {
    pub size: Option<u64>,
    pub body: ByteStream,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Why a fetch gave nothing to stream.
#[derive(Debug)]
pub enum FetchFailure {
    /// The source refused or failed before sending a byte (its own error, e.g. 404 or 401).
    Source(FetchError),
    Store(StoreError),
}

impl From<StoreError> for FetchFailure {
    fn from(e: StoreError) -> Self {
        FetchFailure::Store(e)
    }
}

#[derive(Clone, Debug)]
enum State {
    Starting,
    Running {
        size: Option<u64>,
        written: u64,
    },
    /// Every byte is written and the digest matches: readers may finish; the blob is being
    /// fsynced, renamed and indexed.
    Verified {
        size: u64,
    },
    /// Finished; `stored` is false when it was verified and served but could not be kept
    /// (readers holding the file read it to the end all the same).
    Done {
        size: u64,
        stored: bool,
    },
    /// Failed before the source answered: joiners get the source's error.
    Refused(FetchError),
    /// Failed mid-stream (truncated, reset, wrong digest): readers' streams end in an error.
    Broken(Arc<str>),
    /// The store could not keep what the source sends: readers switch to a source stream of
    /// their own.
    Unstored,
}

struct Flight {
    key: FlightKey,
    tmp: PathBuf,
    source: SourceFn,
    state: watch::Sender<State>,
    /// Repositories that asked for the blob: all of them may serve it once it is stored.
    repos: Mutex<Vec<RepoName>>,
}

impl std::fmt::Debug for Flight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flight")
            .field("tmp", &self.tmp)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

/// Who may join a fetch: what a fetch reads with decides who may share its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// Any repository asking for the digest joins it: the source is read as anyone could read
    /// it (anonymously, or with credentials the whole cluster uses).
    #[default]
    Any,
    /// Only requests for the same repository join it: the source is read with a caller's own
    /// credentials, or for a private repository, and another repository's request must ask its
    /// own origin rather than get these bytes. Such a fetch may itself join an `Any` one: what
    /// anyone could read, a private repository may too.
    Repository,
}

/// A flight's key: the digest, and the one repository it is for when it may not be shared.
type FlightKey = (Digest, Option<RepoName>);

/// In-progress fetches by digest (and repository, for those not shared).
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<FlightKey, Arc<Flight>>>,
}

impl Flights {
    /// The size and temporary file of `digest` if its fetch for `repo` (among others) is
    /// verified and being committed.
    pub(crate) fn verified(&self, repo: &RepoName, digest: &Digest) -> Option<(u64, PathBuf)> {
        let map = self.map.lock().expect("flights poisoned");
        [(digest.clone(), None), (digest.clone(), Some(repo.clone()))]
            .iter()
            .filter_map(|key| map.get(key))
            .find_map(|flight| {
                let State::Verified { size } = *flight.state.borrow() else {
                    return None;
                };
                let asked = flight.repos.lock().expect("repos poisoned").contains(repo);
                asked.then(|| (size, flight.tmp.clone()))
            })
    }
}

/// A blob to stream to a client: its size when known, and its bytes as they become safe to send.
pub struct FlightStream {
    pub size: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
    /// The same bytes as the flight's file grows, for a server that sends files itself;
    /// `None` when they come from the source instead (the store could not keep the blob).
    pub follow: Option<Follow>,
}

/// The flight's file, from the blob's first byte, and how much of it may be sent: everything
/// written but the last byte until the whole blob is verified, as [`FlightStream::body`] does.
#[derive(Clone)]
pub struct Follow {
    pub file: Arc<std::fs::File>,
    rx: watch::Receiver<State>,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("state", &*self.rx.borrow())
            .finish_non_exhaustive()
    }
}

impl Follow {
    /// Waits until bytes past `sent` may be sent, and answers how many may. `None` when the
    /// store gave up on the blob: the rest of it comes from [`FlightStream::body`], which
    /// switches to the source. An error when the fetch failed (the client must not get a
    /// complete body).
    pub async fn ready(&self, sent: u64) -> std::io::Result<Option<u64>> {
        let mut rx = self.rx.clone();
        loop {
            let limit = match &*rx.borrow_and_update() {
                State::Verified { size } | State::Done { size, .. } => return Ok(Some(*size)),
                State::Running { written, .. } => written.saturating_sub(1),
                State::Starting => 0,
                State::Unstored => return Ok(None),
                State::Refused(e) => return Err(std::io::Error::other(e.to_string())),
                State::Broken(m) => return Err(std::io::Error::other(m.to_string())),
            };
            if limit > sent {
                return Ok(Some(limit));
            }
            if rx.changed().await.is_err() {
                return Err(std::io::Error::other("fetch ended without a result"));
            }
        }
    }
}

impl std::fmt::Debug for FlightStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Streams `digest` for `repo`, fetching it from `source` unless a fetch of it already runs
    /// that anyone may share ([`Sharing::Any`]).
    pub async fn fetch_blob<F, Fut>(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        source: F,
    ) -> Result<FlightStream, FetchFailure>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Source, FetchError>> + Send + 'static,
    {
        self.fetch_blob_shared(repo, digest, Sharing::Any, source)
            .await
    }

    /// Streams `digest` for `repo`, fetching it from `source` unless a fetch of it already runs
    /// that `repo` may join (`sharing` says which). `source` is called once per flight (and once
    /// per reader if the store cannot keep the blob); whatever arrives is verified before it is
    /// stored and before any reader sees its end.
    pub async fn fetch_blob_shared<F, Fut>(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        sharing: Sharing,
        source: F,
    ) -> Result<FlightStream, FetchFailure>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Source, FetchError>> + Send + 'static,
    {
        let source: SourceFn = Arc::new(move || source().boxed());
        let own: FlightKey = match sharing {
            Sharing::Any => (digest.clone(), None),
            Sharing::Repository => (digest.clone(), Some(repo.clone())),
        };
        let flight = {
            let mut map = self.flights.map.lock().expect("flights poisoned");
            let shared = (digest.clone(), None);
            match map.get(&own).or_else(|| map.get(&shared)) {
                Some(f) => {
                    f.repos.lock().expect("repos poisoned").push(repo.clone());
                    f.clone()
                }
                None => {
                    let f = Arc::new(Flight {
                        key: own.clone(),
                        tmp: self.layout.tmp().join(uuid::Uuid::new_v4().to_string()),
                        source,
                        state: watch::channel(State::Starting).0,
                        repos: Mutex::new(vec![repo.clone()]),
                    });
                    map.insert(own, f.clone());
                    tokio::spawn(run(self.clone(), f.clone(), digest.clone()));
                    f
                }
            }
        };
        let mut rx = flight.state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, State::Starting))
            .await
            .map(|s| s.clone())
            .unwrap_or_else(|_| State::Broken("fetch ended without a result".into()));
        let relay = |size| FlightStream {
            size,
            body: Box::pin(relay(None, flight.source.clone(), digest.clone(), size)),
            follow: None,
        };
        let size = match state {
            State::Refused(e) => return Err(FetchFailure::Source(e)),
            State::Broken(m) => {
                return Err(FetchFailure::Store(StoreError::Io(std::io::Error::other(
                    m.to_string(),
                ))));
            }
            State::Unstored => return Ok(relay(None)),
            State::Done {
                size,
                stored: false,
            } => return Ok(relay(Some(size))),
            State::Done { stored: true, .. } => {
                // Finished between our join and now: it is an ordinary stored blob, linked
                // here as in the repository that started the fetch.
                let first = flight.repos.lock().expect("repos poisoned")[0].clone();
                self.mount_blob(repo, digest, Some(&first)).await?;
                let blob = self.open_blob(repo, digest).await?;
                let file = Arc::new(blob.file.into_std().await);
                let follow = Follow {
                    file: file.clone(),
                    rx: rx.clone(),
                };
                let reader = Reader::new(file, rx, &flight, digest);
                return Ok(FlightStream {
                    size: Some(blob.size),
                    body: Box::pin(reader.done_at(blob.size).stream()),
                    follow: Some(follow),
                });
            }
            State::Running { size, .. } => size,
            State::Verified { size } => Some(size),
            State::Starting => unreachable!("waited for a state other than Starting"),
        };
        let file = match tokio::fs::File::open(&flight.tmp).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match tokio::fs::File::open(self.layout.blob(digest)).await {
                    // Renamed into place a moment ago.
                    Ok(f) => f,
                    // Given up on in the meantime: nothing on disk to follow.
                    Err(_) => return Ok(relay(size)),
                }
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        let file = Arc::new(file.into_std().await);
        let follow = Follow {
            file: file.clone(),
            rx: rx.clone(),
        };
        let reader = Reader::new(file, rx, &flight, digest);
        Ok(FlightStream {
            size,
            body: Box::pin(reader.stream()),
            follow: Some(follow),
        })
    }
}

#[cfg(test)]
#[path = "flight_tests.rs"]
mod tests;
