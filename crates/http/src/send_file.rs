//! File bodies with sendfile(2): page cache → socket, no copy through user space.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

/// How far a file that is still being written may be sent. Called with the offset sent up to,
/// it waits until bytes past it may go and answers the offset they may go up to (exclusive),
/// or `None` when the file will not be completed: the rest of the answer then comes from the
/// response's body, after the bytes already sent.
pub type Growth = Arc<
    dyn Fn(u64) -> Pin<Box<dyn Future<Output = std::io::Result<Option<u64>>> + Send>> + Send + Sync,
>;

/// A response extension: the body is `len` bytes of `file` from `start`. kache's server sends
/// them with sendfile(2) and drops the response's body unread; another server (hyper, for
/// HTTP/2) streams the body instead, so the body must be those same bytes.
#[derive(Clone)]
pub struct SendFile {
    file: Arc<std::fs::File>,
    start: u64,
    len: u64,
    sent: Option<Counter>,
    growth: Option<Growth>,
}

impl std::fmt::Debug for SendFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendFile")
            .field("start", &self.start)
            .field("len", &self.len)
            .field("growing", &self.growth.is_some())
            .finish_non_exhaustive()
    }
}

impl SendFile {
    pub fn new(file: Arc<std::fs::File>, start: u64, len: u64) -> SendFile {
        SendFile {
            file,
            start,
            len,
            sent: None,
            growth: None,
        }
    }

    /// Counts the bytes sent into `counter`, as the body's stream would have.
    pub fn counting(mut self, counter: Counter) -> SendFile {
        self.sent = Some(counter);
        self
    }

    /// The file is still being written (a blob fetched as it is served): each stretch is sent
    /// once `growth` says it may be.
    pub fn growing(mut self, growth: Growth) -> SendFile {
        self.growth = Some(growth);
        self
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::unix::fs::FileExt;

    use rustix::io::{IoSliceMut, ReadWriteFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::SendFile;

    /// Bytes looked up in the page cache at a time. sendfile(2) blocks its thread while it
    /// reads what the cache lacks, which must not happen on a runtime worker: such a stretch is
    /// read on the blocking pool instead (and written the ordinary way).
    pub(super) const STRETCH: u64 = 1024 * 1024;

    impl SendFile {
        /// Writes the bytes to `dst`; how many it wrote, short of [`SendFile::len`] only when a
        /// growing file will not be completed (the caller sends the rest from the body). An
        /// error after some of them leaves the client with a short body: the caller closes
        /// the connection.
        pub(crate) async fn send(&self, dst: &TcpStream) -> io::Result<u64> {
            self.send_as(dst, cached).await
        }

        /// [`SendFile::send`], with `cached` deciding which stretches go which way.
        pub(super) async fn send_as(
            &self,
            dst: &TcpStream,
            cached: impl Fn(&std::fs::File, u64, u64) -> bool,
        ) -> io::Result<u64> {
            let end = self.start + self.len;
            let mut pos = self.start;
            // Where the bytes that may be sent end: the file's growth says, when it grows.
            let mut ready = if self.growth.is_some() { pos } else { end };
            while pos < end {
                if pos >= ready {
                    let growth = self.growth.as_ref().expect("only a growing file waits");
                    match growth(pos).await? {
                        Some(limit) if limit > pos => ready = limit.min(end),
                        Some(_) => {
                            return Err(io::Error::other(format!(
                                "the file's growth answered no byte past {pos}"
                            )));
                        }
                        None => return Ok(pos - self.start),
                    }
                }
                let want = (ready - pos).min(STRETCH);
                let n = if cached(&self.file, pos, want) {
                    self.sendfile(dst, pos, want).await?
                } else {
                    self.read_and_write(dst, pos, want).await?
                };
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the file ended {} bytes short", end - pos),
                    ));
                }
                pos += n;
                if let Some(c) = &self.sent {
                    c.inc_by(n);
                }
            }
            Ok(self.len)
        }

        /// One sendfile(2) once the socket takes bytes; what it sent (0: the file ended).
        async fn sendfile(&self, dst: &TcpStream, pos: u64, want: u64) -> io::Result<u64> {
            loop {
                crate::unless_stalled(dst.writable(), "the client").await?;
                let mut offset = pos;
                let sent = dst.try_io(Interest::WRITABLE, || {
                    rustix::fs::sendfile(dst, &*self.file, Some(&mut offset), want as usize)
                        .map_err(io::Error::from)
                });
                match sent {
                    Ok(n) => return Ok(n as u64),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }

        /// A stretch the page cache lacks: read on the blocking pool, then written.
        async fn read_and_write(&self, dst: &TcpStream, pos: u64, want: u64) -> io::Result<u64> {
            let file = self.file.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; want as usize];
                let n = file.read_at(&mut buf, pos)?;
                buf.truncate(n);
                Ok::<_, io::Error>(buf)
            })
            .await
            .map_err(io::Error::other)??;
            let mut rest = &buf[..];
            while !rest.is_empty() {
                crate::unless_stalled(dst.writable(), "the client").await?;
                match dst.try_write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(buf.len() as u64)
        }
    }

    /// Whether the first and last byte of `[pos, pos + len)` are in the page cache (read
    /// ahead fills what lies between). A filesystem that cannot tell says no.
    fn cached(file: &std::fs::File, pos: u64, len: u64) -> bool {
        let probe = |at: u64| {
            let mut byte = [0u8; 1];
            matches!(
                rustix::io::preadv2(
                    file,
                    &mut [IoSliceMut::new(&mut byte)],
                    at,
                    ReadWriteFlags::NOWAIT,
                ),
                Ok(1)
            )
        };
        probe(pos) && probe(pos + len - 1)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write as _;
    use std::sync::Arc;

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::AsyncReadExt;

    use super::SendFile;

    /// Whether a stretch is in the page cache cannot be arranged from a test (the probe itself
    /// may start a read ahead that a fast disk finishes at once), so the tests decide it.
    #[tokio::test]
    async fn stretches_go_by_sendfile_or_by_the_pool_and_arrive_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..3 * 1024 * 1024 + 4099)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let none_cached = |_: &std::fs::File, _: u64, _: u64| false;
        let every_other =
            |_: &std::fs::File, pos: u64, _: u64| (pos / super::linux::STRETCH).is_multiple_of(2);
        for (name, decide) in [
            (
                "none cached",
                &none_cached as &dyn Fn(&std::fs::File, u64, u64) -> bool,
            ),
            ("every other stretch cached", &every_other),
        ] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
            let (client, server) = tokio::join!(client, l.accept());
            let (mut client, (server, _)) = (client.unwrap(), server.unwrap());
            let counter = Counter::default();
            let send =
                SendFile::new(file.clone(), 7, data.len() as u64 - 7).counting(counter.clone());
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            });
            send.send_as(&server, decide).await.unwrap();
            drop(server);
            let got = reader.await.unwrap();
            assert!(
                got == data[7..],
                "{name}: {} bytes, not the file's",
                got.len()
            );
            assert_eq!(counter.get(), data.len() as u64 - 7, "{name}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let len = 64 * 1024 * 1024;
        // Sparse: all of it reads from the page cache without touching the disk.
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (client, server) = tokio::join!(client, l.accept());
        let (_client, (server, _)) = (client.unwrap(), server.unwrap());
        let counter = Counter::default();
        let send = SendFile::new(file, 0, len).counting(counter.clone());
        // Time is paused and jumps ahead whenever everything waits: without a limit of its
        // own, the send would hang the test.
        let err = tokio::time::timeout(std::time::Duration::from_secs(600), send.send(&server))
            .await
            .expect("given up within 10 minutes")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(counter.get() < len);
    }
}
