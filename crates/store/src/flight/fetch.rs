//! The fetch task: the source's bytes written to a temporary file, verified, then kept.

use std::io::{IoSlice, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use kache_oci::{Digest, Hasher, RepoName};
use tokio::sync::mpsc;

use super::{ByteStream, FetchError, Flight, State};
use crate::error::is_no_space;
use crate::fs::{self, IO_BUF};
use crate::{Store, blocking};

/// The fetch task: source → temp file (hashing) → verify → Verified → fsync, install, index →
/// Done.
pub(super) async fn run(store: Arc<Store>, flight: Arc<Flight>, digest: Digest) {
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
        map.remove(&flight.key);
        let repos = flight.repos.lock().expect("repos poisoned");
        match linked {
            Some(n) => repos[n..].to_vec(),
            None => Vec::new(),
        }
    };
    // Repositories that joined while the blob was being committed: linked as the one that
    // started the fetch is (a mount naming no source refuses a private repository's blob).
    let first = flight.repos.lock().expect("repos poisoned")[0].clone();
    for repo in late {
        if let Err(e) = store.mount_blob(&repo, &digest, Some(&first)).await {
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
    // Writing and hashing run side by side, each on a thread of its own, each with one batch
    // queued while it works on another: readers follow what is written, and only the last
    // byte waits for the hash, so a cold pull goes at the pace of the slower of the two
    // rather than of both in turn.
    let (to_writer, writer_rx) = mpsc::channel(1);
    let (to_hasher, hasher_rx) = mpsc::channel(1);
    let writer = {
        let (flight, size) = (flight.clone(), src.size);
        tokio::task::spawn_blocking(move || write_batches(writer_rx, file, &flight, size))
    };
    let hashing = {
        let hasher = digest.algorithm().hasher();
        tokio::task::spawn_blocking(move || hash_batches(hasher_rx, hasher))
    };
    let received = receive(src.body, src.size, to_writer, to_hasher).await;
    // Ended either way: the senders are gone, so both stop after what they have.
    let written = writer.await.map_err(|e| unstored(&e))?;
    let hasher = hashing.await.map_err(|e| unstored(&e))?;
    let received = received?;
    let (file, written) = match written {
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

/// Receives the source's body in batches of about [`IO_BUF`] for the writer and the hasher; the
/// number of bytes received. Stops early (Ok) if the writer has stopped: its error is the one
/// to report.
async fn receive(
    mut body: ByteStream,
    size: Option<u64>,
    to_writer: mpsc::Sender<Vec<Bytes>>,
    to_hasher: mpsc::Sender<Vec<Bytes>>,
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
            // The chunks are shared, not copied: the hasher and the writer read the same bytes.
            // The hasher only ends when its sender goes, so its send cannot fail first.
            if to_hasher.send(batch.clone()).await.is_err() || to_writer.send(batch).await.is_err()
            {
                break;
            }
        }
    }
    Ok(received)
}

/// The writer, on a blocking thread: writes each batch, then publishes how much is on disk.
/// Ends when the receiving side is done (or gone).
fn write_batches(
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    mut file: std::fs::File,
    flight: &Flight,
    size: Option<u64>,
) -> std::io::Result<(std::fs::File, u64)> {
    let mut written = 0u64;
    while let Some(batch) = rx.blocking_recv() {
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
    Ok((file, written))
}

/// The hasher, on a blocking thread of its own: hashes each batch as it comes.
fn hash_batches(mut rx: mpsc::Receiver<Vec<Bytes>>, mut hasher: Hasher) -> Hasher {
    while let Some(batch) = rx.blocking_recv() {
        for chunk in &batch {
            hasher.update(chunk);
        }
    }
    hasher
}
