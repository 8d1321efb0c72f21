//! What a requester reads: the flight's file as it grows, or a stream of its own from the source.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kache_oci::Digest;
use tokio::sync::{mpsc, watch};

use super::{Flight, SourceFn, State};
use crate::fs::IO_BUF;
use crate::read;

/// A reader following the flight's file as it grows.
pub(super) struct Reader {
    file: Arc<std::fs::File>,
    pos: u64,
    rx: watch::Receiver<State>,
    done: Option<u64>,
    size: Option<u64>,
    source: SourceFn,
    digest: Digest,
}

impl Reader {
    pub(super) fn new(
        file: Arc<std::fs::File>,
        rx: watch::Receiver<State>,
        f: &Flight,
        digest: &Digest,
    ) -> Self {
        Reader {
            file,
            pos: 0,
            rx,
            done: None,
            size: None,
            source: f.source.clone(),
            digest: digest.clone(),
        }
    }

    /// The file is complete already, with `size` bytes.
    pub(super) fn done_at(mut self, size: u64) -> Self {
        self.done = Some(size);
        self
    }

    pub(super) fn stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
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
pub(super) fn relay(
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
