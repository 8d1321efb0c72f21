//! Blob bodies for responses, read without a thread hop when the page cache has them.
//!
//! `tokio::fs` sends every read to the blocking pool and copies its buffer once more on the way
//! back; profiled under load that hand-off was a quarter of the registry's CPU (see
//! BENCHMARKS.md). A warm blob is in the page cache, so each chunk is first read with
//! `preadv2(RWF_NOWAIT)`, which returns at once with what the cache holds or says it would
//! block; only then does a read go to the blocking pool.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use rustix::io::{Errno, IoSliceMut, ReadWriteFlags};

/// Bytes per chunk: large enough that per-chunk costs vanish, small enough to bound the memory
/// of many concurrent responses.
const CHUNK: u64 = 256 * 1024;

/// The bytes `[start, start + len)` of `file`, in chunks.
pub fn read_range(
    file: Arc<std::fs::File>,
    start: u64,
    len: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let end = start.saturating_add(len);
    futures_util::stream::unfold(Some((file, start)), move |state| async move {
        let (file, pos) = state?;
        if pos >= end {
            return None;
        }
        let want = (end - pos).min(CHUNK) as usize;
        match read_at(&file, pos, want).await {
            Ok(chunk) if chunk.is_empty() => Some((
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file ended early",
                )),
                None,
            )),
            Ok(chunk) => {
                let next = pos + chunk.len() as u64;
                Some((Ok(chunk), Some((file, next))))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

pub(crate) async fn read_at(file: &Arc<std::fs::File>, pos: u64, want: usize) -> io::Result<Bytes> {
    let mut buf = vec![0u8; want];
    match rustix::io::preadv2(
        &**file,
        &mut [IoSliceMut::new(&mut buf)],
        pos,
        ReadWriteFlags::NOWAIT,
    ) {
        // A short read is what the cache holds; the next chunk continues from there.
        Ok(n) if n > 0 => {
            buf.truncate(n);
            return Ok(Bytes::from(buf));
        }
        // Not cached (or the filesystem cannot tell without blocking): read on the pool below.
        Ok(_)
        | Err(Errno::AGAIN)
        | Err(Errno::OPNOTSUPP)
        | Err(Errno::NOSYS)
        | Err(Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        let n = file.read_at(&mut buf, pos)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    async fn collect(file: std::fs::File, start: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let s = read_range(Arc::new(file), start, len);
        let mut s = std::pin::pin!(s);
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn ranges_of_a_file_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let open = || std::fs::File::open(&p).unwrap();
        assert_eq!(collect(open(), 0, data.len() as u64).await.unwrap(), data);
        assert_eq!(
            collect(open(), 262_100, 300_000).await.unwrap(),
            &data[262_100..562_100]
        );
        assert_eq!(collect(open(), 5, 0).await.unwrap(), Vec::<u8>::new());
        // Asking past the end is an error, never a silently short body.
        let err = collect(open(), 600_000, 200_000).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
