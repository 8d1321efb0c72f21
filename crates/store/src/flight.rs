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

use std::collections::HashMap;
use std::io::{IoSlice, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream, StreamExt};
use kache_oci::{Digest, Hasher, RepoName};
use tokio::sync::{mpsc, watch};

use crate::error::{StoreError, is_no_space};
use crate::fs::{self, IO_BUF};
use crate::{Store, blocking, read};

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
    /// `source` is called once per flight (and once per reader if the store cannot keep the
    /// blob); whatever arrives is verified before it is stored and before any reader sees its end.
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
        let source: SourceFn = Arc::new(move || source().boxed());
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
                        source,
                        state: watch::channel(State::Starting).0,
                        repos: Mutex::new(vec![repo.clone()]),
                    });
                    map.insert(digest.clone(), f.clone());
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
                // Finished between our join and now: it is an ordinary stored blob.
                self.mount_blob(repo, digest, None).await?;
                let blob = self.open_blob(repo, digest).await?;
                let reader = Reader::new(blob.file.into_std().await, rx, &flight, digest);
                return Ok(FlightStream {
                    size: Some(blob.size),
                    body: Box::pin(reader.done_at(blob.size).stream()),
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
        let reader = Reader::new(file.into_std().await, rx, &flight, digest);
        Ok(FlightStream {
            size,
            body: Box::pin(reader.stream()),
        })
    }
}

/// A reader following the flight's file as it grows.
struct Reader {
    file: Arc<std::fs::File>,
    pos: u64,
    rx: watch::Receiver<State>,
    done: Option<u64>,
    size: Option<u64>,
    source: SourceFn,
    digest: Digest,
}

impl Reader {
    fn new(file: std::fs::File, rx: watch::Receiver<State>, f: &Flight, digest: &Digest) -> Self {
        Reader {
            file: Arc::new(file),
            pos: 0,
            rx,
            done: None,
            size: None,
            source: f.source.clone(),
            digest: digest.clone(),
        }
    }

    /// The file is complete already, with `size` bytes.
    fn done_at(mut self, size: u64) -> Self {
        self.done = Some(size);
        self
    }

    fn stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        enum Step {
            Follow(Reader),
            Relay(Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>),
        }
        futures_util::stream::unfold(Some(Step::Follow(self)), |step| async move {
            match step? {
                Step::Relay(mut s) => s.next().await.map(|item| (item, Some(Step::Relay(s)))),
                Step::Follow(r) => match r.next().await {
                    Next::Item(item, r) => Some((item, Some(Step::Follow(r)))),
                    Next::End => None,
                    Next::Fail(e) => Some((Err(e), None)),
                    Next::Switch(r) => {
                        // The store gave up: the rest comes from the source, hashed together
                        // with what this reader already sent.
                        let mut s = Box::pin(relay(
                            Some((r.file.clone(), r.pos)),
                            r.source.clone(),
                            r.digest.clone(),
                            r.size,
                        ));
                        s.next().await.map(|item| (item, Some(Step::Relay(s))))
                    }
                },
            }
        })
    }
}

enum Next {
    Item(std::io::Result<Bytes>, Reader),
    End,
    Fail(std::io::Error),
    Switch(Reader),
}

impl Reader {
    async fn next(self) -> Next {
        let mut r = self;
        loop {
            let (limit, done) = match r.done {
                Some(size) => (size, true),
                None => {
                    let state = r.rx.borrow_and_update().clone();
                    match state {
                        State::Verified { size } | State::Done { size, .. } => (size, true),
                        // Everything but the last byte may go before verification.
                        State::Running { written, size } => {
                            r.size = size;
                            (written.saturating_sub(1), false)
                        }
                        State::Starting => (0, false),
                        State::Refused(e) => {
                            return Next::Fail(std::io::Error::other(e.to_string()));
                        }
                        State::Broken(m) => {
                            return Next::Fail(std::io::Error::other(m.to_string()));
                        }
                        State::Unstored => return Next::Switch(r),
                    }
                }
            };
            if done {
                r.done = Some(limit);
            }
            if r.pos < limit {
                let want = (limit - r.pos).min(IO_BUF as u64) as usize;
                return match read::read_at(&r.file, r.pos, want).await {
                    Ok(chunk) if chunk.is_empty() => {
                        Next::Fail(std::io::Error::other("blob file ended early"))
                    }
                    Ok(chunk) => {
                        r.pos += chunk.len() as u64;
                        Next::Item(Ok(chunk), r)
                    }
                    Err(e) => Next::Fail(e),
                };
            }
            if done {
                return Next::End;
            }
            if r.rx.changed().await.is_err()
                && !matches!(
                    &*r.rx.borrow(),
                    State::Verified { .. }
                        | State::Done { .. }
                        | State::Broken(_)
                        | State::Unstored
                )
            {
                return Next::Fail(std::io::Error::other("fetch ended without a result"));
            }
        }
    }
}

/// A reader's own stream from the source, for a blob the store could not keep: `prefix` is the
/// file and the number of its bytes the reader already sent. Those are hashed from the file, the
/// source's first bytes up to there are skipped, and the last byte goes only once the whole
/// hashes to `digest` (and matches `size`, when known).
fn relay(
    prefix: Option<(Arc<std::fs::File>, u64)>,
    source: SourceFn,
    digest: Digest,
    size: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(2);
    tokio::spawn(async move {
        if let Err(e) = relay_into(prefix, source, &digest, size, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

async fn relay_into(
    prefix: Option<(Arc<std::fs::File>, u64)>,
    source: SourceFn,
    digest: &Digest,
    size: Option<u64>,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> std::io::Result<()> {
    let mut hasher = digest.algorithm().hasher();
    let mut skip = 0u64;
    if let Some((file, sent)) = prefix {
        while skip < sent {
            let want = (sent - skip).min(IO_BUF as u64) as usize;
            let chunk = read::read_at(&file, skip, want).await?;
            if chunk.is_empty() {
                return Err(std::io::Error::other("blob file ended early"));
            }
            hasher.update(&chunk);
            skip += chunk.len() as u64;
        }
    }
    let src = source()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut body = src.body;
    let expected = size.or(src.size);
    let mut pos = 0u64;
    // The last chunk waits for the next one (or the end, and the digest's verdict).
    let mut held: Option<Bytes> = None;
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()))?;
        let start = pos;
        pos += chunk.len() as u64;
        if pos <= skip {
            continue;
        }
        if start < skip {
            chunk = chunk.slice((skip - start) as usize..);
        }
        hasher.update(&chunk);
        if let Some(prev) = held.replace(chunk)
            && tx.send(Ok(prev)).await.is_err()
        {
            return Ok(());
        }
    }
    if let Some(n) = expected
        && pos != n
    {
        return Err(std::io::Error::other(format!(
            "source sent {pos} of the {n} bytes of the blob"
        )));
    }
    let actual = hasher.finish();
    if actual != *digest {
        return Err(std::io::Error::other(format!(
            "source sent bytes hashing to {actual}, not {digest}"
        )));
    }
    if let Some(last) = held {
        let _ = tx.send(Ok(last)).await;
    }
    Ok(())
}

/// The fetch task: source → temp file (hashing) → verify → Verified → fsync, install, index →
/// Done.
async fn run(store: Arc<Store>, flight: Arc<Flight>, digest: Digest) {
    let outcome = fetch(&store, &flight, &digest).await;
    let mut linked = None;
    let final_state = match outcome {
        Ok(f) => {
            linked = f.linked;
            State::Done {
                size: f.size,
                stored: f.linked.is_some(),
            }
        }
        Err(FetchEnd::Refused(e)) => State::Refused(e),
        Err(FetchEnd::Broken(m)) => {
            tracing::warn!(%digest, error = %m, "pull-through fetch failed; nothing kept");
            let _ = tokio::fs::remove_file(&flight.tmp).await;
            State::Broken(m.into())
        }
        Err(FetchEnd::Unstored(m)) => {
            tracing::warn!(%digest, reason = %m, "the store cannot keep this blob: its readers get it from the source, uncached");
            let _ = tokio::fs::remove_file(&flight.tmp).await;
            store.observer().blob_not_stored(&digest, &m);
            State::Unstored
        }
    };
    // Publish under the map lock, so nobody joins a flight that has already ended.
    let late: Vec<RepoName> = {
        let mut map = store.flights.map.lock().expect("flights poisoned");
        flight.state.send_replace(final_state);
        map.remove(&digest);
        let repos = flight.repos.lock().expect("repos poisoned");
        match linked {
            Some(n) => repos[n..].to_vec(),
            None => Vec::new(),
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
    /// The source failed or lied.
    Broken(String),
    /// The store failed: the source may be fine.
    Unstored(String),
}

struct Fetched {
    size: u64,
    /// `None` when the blob was verified and served but could not be kept.
    linked: Option<usize>,
}

async fn fetch(
    store: &Arc<Store>,
    flight: &Arc<Flight>,
    digest: &Digest,
) -> Result<Fetched, FetchEnd> {
    let src = (flight.source)().await.map_err(FetchEnd::Refused)?;
    let unstored = |e: &dyn std::fmt::Display| FetchEnd::Unstored(e.to_string());
    // Room for what the source announced, before a byte is written.
    let mut claim = match src.size {
        Some(size) => match store.space.claim(size) {
            Ok((claim, low)) => {
                if low {
                    store.observer().pressure();
                }
                Some(claim)
            }
            Err(why) => {
                store.observer().pressure();
                return Err(FetchEnd::Unstored(why));
            }
        },
        None => None,
    };
    let file = tokio::fs::File::create(&flight.tmp)
        .await
        .map_err(|e| unstored(&e))?
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
    let written = writer.await.map_err(|e| unstored(&e))?;
    let received = received?;
    let (file, hasher, written) = match written {
        Ok(w) => w,
        Err(e) => {
            if is_no_space(&e) {
                store.observer().pressure();
            }
            return Err(FetchEnd::Unstored(format!("writing the blob failed: {e}")));
        }
    };
    if let Some(c) = claim.as_mut() {
        c.written(written);
    }
    if written != received {
        return Err(FetchEnd::Unstored(format!(
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
    drop(claim);
    // Every reader may finish now; what follows only decides whether the blob is kept.
    let _hold = store.gate.write(digest).await;
    let repos = flight.repos.lock().expect("repos poisoned").clone();
    let (layout, index, tmp, d) = (
        store.layout.clone(),
        store.index.clone(),
        flight.tmp.clone(),
        digest.clone(),
    );
    let count = repos.len();
    let committed = blocking(move || {
        file.sync_all()?;
        drop(file);
        fs::install(&layout, &tmp, &d)?;
        let mut new = false;
        for repo in &repos {
            new |= index.add_blob(Some(repo), &d, written)?;
        }
        Ok(new)
    })
    .await;
    match committed {
        Ok(new) => {
            store.added(new, written);
            Ok(Fetched {
                size: written,
                linked: Some(count),
            })
        }
        Err(e) => {
            tracing::warn!(%digest, error = %e, "a verified blob was served but could not be kept");
            if e.is_no_space() {
                store.observer().pressure();
            }
            store.observer().blob_not_stored(digest, &e.to_string());
            let _ = tokio::fs::remove_file(&flight.tmp).await;
            Ok(Fetched {
                size: written,
                linked: None,
            })
        }
    }
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
