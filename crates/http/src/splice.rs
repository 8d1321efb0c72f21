//! Socket to socket without a user-space copy: splice(2) from the source socket into a pipe, and
//! from the pipe into the client's socket.

use std::io;
use std::os::fd::OwnedFd;

use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe's capacity: each round moves up to this much from one socket to the other.
/// Linux's default is 64 KiB; 1 MiB (the default `pipe-max-size`) means fewer system calls.
/// A pipe that cannot grow (a lower limit, the per-user budget) keeps what it has.
const PIPE_SIZE: usize = 1024 * 1024;

/// A pipe for splice(2), reused by the requests of one client connection.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Why a body relay stopped short.
#[derive(Debug)]
pub enum Broken {
    /// The source side: it closed or failed before the last byte.
    Source(io::Error),
    /// The client's side: it went away.
    Client(io::Error),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Source(e) => write!(f, "source: {e}"),
            Broken::Client(e) => write!(f, "client: {e}"),
        }
    }
}

/// Moves exactly `len` bytes from `src` to `dst` through `pipe`, counting what reaches `dst`
/// into every counter of `sent`.
///
/// The pipe is empty whenever bytes are spliced into it, so an `EAGAIN` there can only come from
/// the source socket, never from a full pipe: a full pipe mistaken for an empty socket would
/// clear the socket's readiness and wait forever. The pipe is empty again when this returns Ok.
pub(crate) async fn relay(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    len: u64,
    sent: &[&Counter],
) -> Result<(), Broken> {
    let mut remaining = len;
    while remaining > 0 {
        let want = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(pipe.capacity);
        let n = loop {
            crate::unless_stalled(src.readable(), "the source")
                .await
                .map_err(Broken::Source)?;
            let moved = src.try_io(Interest::READABLE, || {
                rustix::pipe::splice(
                    src,
                    None,
                    &pipe.write,
                    None,
                    want,
                    SpliceFlags::NONBLOCK | SpliceFlags::MOVE,
                )
                .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => {
                    return Err(Broken::Source(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed with {remaining} of {len} body bytes to go"),
                    )));
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Broken::Source(e)),
            }
        };
        remaining -= n as u64;
        let mut in_pipe = n;
        let flags = if remaining > 0 {
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE | SpliceFlags::MORE
        } else {
            SpliceFlags::NONBLOCK | SpliceFlags::MOVE
        };
        while in_pipe > 0 {
            crate::unless_stalled(dst.writable(), "the client")
                .await
                .map_err(Broken::Client)?;
            let moved = dst.try_io(Interest::WRITABLE, || {
                rustix::pipe::splice(&pipe.read, None, dst, None, in_pipe, flags)
                    .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => {
                    return Err(Broken::Client(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the client socket took nothing",
                    )));
                }
                Ok(k) => {
                    in_pipe -= k;
                    for c in sent {
                        c.inc_by(k as u64);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Broken::Client(e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Time is paused and jumps ahead whenever everything waits, so a wait without a limit
    /// would hang the test: this makes it fail instead.
    async fn within_10_minutes<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(600), f)
            .await
            .expect("given up within 10 minutes")
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_that_stops_sending_is_given_up() {
        let (mut src_far, src) = pair().await;
        let (_dst_far, dst) = pair().await;
        src_far.write_all(b"12345").await.unwrap();
        let pipe = Pipe::new().unwrap();
        let counter = Counter::default();
        let err = within_10_minutes(relay(&src, &dst, &pipe, 10, &[&counter]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Broken::Source(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(counter.get(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_given_up() {
        let (mut src_far, src) = pair().await;
        let (_dst_far, dst) = pair().await;
        let len = 64 * 1024 * 1024;
        let feed = tokio::spawn(async move {
            let chunk = vec![7u8; 1024 * 1024];
            for _ in 0..64 {
                if src_far.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let pipe = Pipe::new().unwrap();
        let counter = Counter::default();
        let err = within_10_minutes(relay(&src, &dst, &pipe, len, &[&counter]))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Broken::Client(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(counter.get() < len);
        drop(src);
        feed.await.unwrap();
    }
}
