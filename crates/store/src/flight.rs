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

use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};
use kache_oci::{Digest, Hasher, RepoName};
use tokio::sync::{mpsc, watch};

use crate::error::StoreError;
use crate::fs::{self, IO_BUF};
use crate::{Store, blocking, read};

/// An error of the source, kept whole so the caller can tell a 404 from a timeout.
pub type FetchError = Arc<dyn std::error::Error + Send + Sync>;

/// A byte stream from the source.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, FetchError>> + Send>>;

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
    Done {
        size: u64,
    },
    /// Failed before the source answered: joiners get the source's error.
    Refused(FetchError),
    /// Failed mid-stream (truncated, reset, wrong digest): readers' streams end in an error.
    Broken(Arc<str>),
}

#[derive(Debug)]
struct Flight {
    tmp: PathBuf,
    state: watch::Sender<State>,
    /// Repositories that asked for the blob: all of them may serve it once it is stored.
    repos: Mutex<Vec<RepoName>>,
}

/// In-progress fetches by digest.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

impl Flights {
    /// The size and temporary file of `digest` if its fetch for `repo` (among others) is
    /// verified and being committed.
    pub(crate) fn verified(&self, repo: &RepoName, digest: &Digest) -> Option<(u64, PathBuf)> {
        let map = self.map.lock().expect("flights poisoned");
        let flight = map.get(digest)?;
        let State::Verified { size } = *flight.state.borrow() else {
            return None;
        };
        let asked = flight.repos.lock().expect("repos poisoned").contains(repo);
        asked.then(|| (size, flight.tmp.clone()))
    }
}

/// A blob to stream to a client: its size when known, and its bytes as they become safe to send.
pub struct FlightStream {
    pub size: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
}

impl std::fmt::Debug for FlightStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightStream")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Streams `digest` for `repo`, fetching it from `source` unless a fetch of it already runs.
    /// `source` is called at most once per flight; whatever arrives is verified before it is
    /// stored and before any reader sees its end.
    pub async fn fetch_blob<F, Fut>(
        self: &Arc<Self>,
        repo: &RepoName,
        digest: &Digest,
        source: F,
    ) -> Result<FlightStream, FetchFailure>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Source, FetchError>> + Send + 'static,
    {
        let flight = {
            let mut map = self.flights.map.lock().expect("flights poisoned");
            match map.get(digest) {
                Some(f) => {
                    f.repos.lock().expect("repos poisoned").push(repo.clone());
                    f.clone()
                }
                None => {
                    let f = Arc::new(Flight {
                        tmp: self.layout.tmp().join(uuid::Uuid::new_v4().to_string()),
                        state: watch::channel(State::Starting).0,
                        repos: Mutex::new(vec![repo.clone()]),
                    });
                    map.insert(digest.clone(), f.clone());
                    tokio::spawn(run(self.clone(), f.clone(), digest.clone(), source));
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
        let size = match state {
            State::Refused(e) => return Err(FetchFailure::Source(e)),
            State::Broken(m) => {
                return Err(FetchFailure::Store(StoreError::Io(std::io::Error::other(
                    m.to_string(),
                ))));
            }
            State::Done { .. } => {
                // Finished between our join and now: it is an ordinary stored blob.
                self.mount_blob(repo, digest, None).await?;
                let blob = self.open_blob(repo, digest).await?;
                return Ok(FlightStream {
                    size: Some(blob.size),
                    body: Box::pin(follow(blob.file.into_std().await, rx, Some(blob.size))),
                });
            }
            State::Running { size, .. } => size,
            State::Verified { size } => Some(size),
            State::Starting => unreachable!("waited for a state other than Starting"),
        };
        let file = match tokio::fs::File::open(&flight.tmp).await {
            Ok(f) => f,
            // Renamed into place a moment ago.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tokio::fs::File::open(self.layout.blob(digest))
                    .await
                    .map_err(StoreError::from)?
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        Ok(FlightStream {
            size,
            body: Box::pin(follow(file.into_std().await, rx, None)),
        })
    }
}

/// Reads `file` as the flight writes it. With `known_done`, the file is complete already.
fn follow(
    file: std::fs::File,
    rx: watch::Receiver<State>,
    known_done: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    struct Reader {
        file: Arc<std::fs::File>,
        pos: u64,
        rx: watch::Receiver<State>,
        done: Option<u64>,
    }
    let r = Reader {
        file: Arc::new(file),
        pos: 0,
        rx,
        done: known_done,
    };
    futures_util::stream::unfold(Some(r), |r| async move {
        let mut r = r?;
        loop {
            let (limit, done) = match r.done {
                Some(size) => (size, true),
                None => match &*r.rx.borrow_and_update() {
                    State::Verified { size } | State::Done { size } => (*size, true),
                    // Everything but the last byte may go before verification.
                    State::Running { written, .. } => (written.saturating_sub(1), false),
                    State::Starting => (0, false),
                    State::Refused(e) => {
                        return Some((Err(std::io::Error::other(e.to_string())), None));
                    }
                    State::Broken(m) => {
                        return Some((Err(std::io::Error::other(m.to_string())), None));
                    }
                },
            };
            if done {
                r.done = Some(limit);
            }
            if r.pos < limit {
                let want = (limit - r.pos).min(IO_BUF as u64) as usize;
                return match read::read_at(&r.file, r.pos, want).await {
                    Ok(chunk) if chunk.is_empty() => {
                        Some((Err(std::io::Error::other("blob file ended early")), None))
                    }
                    Ok(chunk) => {
                        r.pos += chunk.len() as u64;
                        Some((Ok(chunk), Some(r)))
                    }
                    Err(e) => Some((Err(e), None)),
                };
            }
            if done {
                return None;
            }
            if r.rx.changed().await.is_err()
                && !matches!(
                    &*r.rx.borrow(),
                    State::Verified { .. } | State::Done { .. } | State::Broken(_)
                )
            {
                return Some((
                    Err(std::io::Error::other("fetch ended without a result")),
                    None,
                ));
            }
        }
    })
}

/// The fetch task: source → temp file (hashing) → verify → Verified → fsync, install, index →
/// Done.
async fn run<F, Fut>(store: Arc<Store>, flight: Arc<Flight>, digest: Digest, source: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Source, FetchError>> + Send + 'static,
{
    let outcome = fetch(&store, &flight, &digest, source).await;
    let linked = match &outcome {
        Ok((_, linked)) => linked.len(),
        Err(_) => 0,
    };
    let final_state = match outcome {
        Ok((size, _)) => State::Done { size },
        Err(FetchEnd::Refused(e)) => State::Refused(e),
        Err(FetchEnd::Broken(m)) => {
            tracing::warn!(%digest, error = %m, "pull-through fetch failed; nothing kept");
            let _ = tokio::fs::remove_file(&flight.tmp).await;
            State::Broken(m.into())
        }
    };
    // Publish under the map lock, so nobody joins a flight that has already ended.
    let late: Vec<RepoName> = {
        let mut map = store.flights.map.lock().expect("flights poisoned");
        let done = matches!(final_state, State::Done { .. });
        flight.state.send_replace(final_state);
        map.remove(&digest);
        let repos = flight.repos.lock().expect("repos poisoned");
        if done {
            repos[linked..].to_vec()
        } else {
            Vec::new()
        }
    };
    // Repositories that joined while the blob was being committed.
    for repo in late {
        if let Err(e) = store.mount_blob(&repo, &digest, None).await {
            tracing::warn!(%digest, %repo, error = %e, "linking a fetched blob failed");
        }
    }
}

enum FetchEnd {
    Refused(FetchError),
    Broken(String),
}

async fn fetch<F, Fut>(
    store: &Arc<Store>,
    flight: &Arc<Flight>,
    digest: &Digest,
    source: F,
) -> Result<(u64, Vec<RepoName>), FetchEnd>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Source, FetchError>>,
{
    let src = source().await.map_err(FetchEnd::Refused)?;
    let broken = |e: &dyn std::fmt::Display| FetchEnd::Broken(e.to_string());
    let file = tokio::fs::File::create(&flight.tmp)
        .await
        .map_err(|e| broken(&e))?
        .into_std()
        .await;
    flight.state.send_replace(State::Running {
        size: src.size,
        written: 0,
    });
    // One batch queued while one is hashed and written: the next one is received meanwhile.
    let (tx, rx) = mpsc::channel(1);
    let writer = {
        let (flight, size, hasher) = (flight.clone(), src.size, digest.algorithm().hasher());
        tokio::task::spawn_blocking(move || write_batches(rx, file, hasher, &flight, size))
    };
    let received = receive(src.body, src.size, tx).await;
    // Ended either way: the sender is gone, so the writer stops after what it has.
    let written = writer.await.map_err(|e| broken(&e))?;
    let received = received?;
    let (file, hasher, written) = written.map_err(|e| broken(&e))?;
    if written != received {
        return Err(FetchEnd::Broken(format!(
            "wrote {written} of the {received} bytes received"
        )));
    }
    if let Some(size) = src.size
        && written != size
    {
        return Err(FetchEnd::Broken(format!(
            "source sent {written} of the {size} bytes it announced"
        )));
    }
    let actual = hasher.finish();
    if actual != *digest {
        return Err(FetchEnd::Broken(format!(
            "source sent bytes hashing to {actual}, not {digest}"
        )));
    }
    flight.state.send_replace(State::Verified { size: written });
    let repos = flight.repos.lock().expect("repos poisoned").clone();
    let (layout, index, tmp, d) = (
        store.layout.clone(),
        store.index.clone(),
        flight.tmp.clone(),
        digest.clone(),
    );
    let linked = repos.clone();
    let new = blocking(move || {
        file.sync_all()?;
        drop(file);
        fs::install(&layout, &tmp, &d)?;
        let mut new = false;
        for repo in &repos {
            new |= index.add_blob(Some(repo), &d, written)?;
        }
        Ok(new)
    })
    .await
    .map_err(|e| broken(&e))?;
    store.added(new, written);
    Ok((written, linked))
}

/// Receives the source's body in batches of about [`IO_BUF`] for the writer; the number of bytes
/// received. Stops early (Ok) if the writer has stopped: its error is the one to report.
async fn receive(
    mut body: ByteStream,
    size: Option<u64>,
    tx: mpsc::Sender<Vec<Bytes>>,
) -> Result<u64, FetchEnd> {
    let mut received = 0u64;
    let mut ended = false;
    while !ended {
        let mut batch = Vec::new();
        let mut len = 0usize;
        // Wait for one chunk, then take whatever else is ready without waiting, so a fast
        // source is written in large batches and a slow one is published chunk by chunk.
        let mut next = Some(body.next().await);
        loop {
            match next {
                Some(Some(Ok(chunk))) => {
                    if !chunk.is_empty() {
                        len += chunk.len();
                        batch.push(chunk);
                    }
                }
                Some(Some(Err(e))) => return Err(FetchEnd::Broken(e.to_string())),
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
            if len >= IO_BUF {
                break;
            }
            next = body.next().now_or_never();
        }
        if let Some(size) = size
            && received + len as u64 > size
        {
            return Err(FetchEnd::Broken(format!(
                "source sent more than the {size} bytes it announced"
            )));
        }
        if !batch.is_empty() {
            received += len as u64;
            if tx.send(batch).await.is_err() {
                break;
            }
        }
    }
    Ok(received)
}

/// The writer, on a blocking thread: hashes and writes each batch, then publishes how much is on
/// disk. Ends when the receiving side is done (or gone).
fn write_batches(
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    mut file: std::fs::File,
    mut hasher: Hasher,
    flight: &Flight,
    size: Option<u64>,
) -> std::io::Result<(std::fs::File, Hasher, u64)> {
    let mut written = 0u64;
    while let Some(batch) = rx.blocking_recv() {
        for chunk in &batch {
            hasher.update(chunk);
        }
        // The received buffers as they are: no copy into one.
        let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|c| IoSlice::new(c)).collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match file.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n as u64;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        flight.state.send_replace(State::Running { size, written });
    }
    Ok((file, hasher, written))
}

#[cfg(test)]
#[path = "flight_tests.rs"]
mod tests;
