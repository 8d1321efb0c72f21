//! How kache serves HTTP: every listener of every role is served from here. Its own HTTP/1.1
//! server for the pull path ([`Server`]), hyper for the rest ([`serve_hyper`], and
//! `serve_tls` for the webhook), the operations endpoints ([`ops_router`]), and the socket
//! and signal handling they share ([`net`], [`shutdown`]).
//!
//! ## The pull path
//!
//! hyper owns its sockets, so every body byte it sends is copied through user space: from a
//! file or a socket into a buffer, then into the client's socket. On the pull path that copy is
//! most of the CPU (BENCHMARKS.md, "Where the time goes"). This server answers requests on the
//! raw socket instead, so that a blob body can leave with sendfile(2) (a file the handler names
//! with a [`SendFile`] response extension) or splice(2) (a socket an [`Intercept`] relays with
//! [`Conn::splice_from`]). Everything else about a request is the axum router's business, so
//! routing, headers and errors are the same whichever server runs it; a connection that speaks
//! HTTP/2, or sends a request body to a server that takes them, is handed to hyper whole.
//!
//! Its wire format is pure ([`parse_head`], [`write_head`]):
//!
//! ```
//! let buf = b"GET /v2/ HTTP/1.1\r\nHost: kache\r\n\r\nGET /v2/ HTTP/1.1\r\n";
//! let (head, used) = kache_http::parse_head(buf).unwrap().expect("a whole head");
//! assert_eq!((head.method.as_str(), head.uri.path()), ("GET", "/v2/"));
//! // The rest of the buffer is the next request, still incomplete.
//! assert!(kache_http::parse_head(&buf[used..]).unwrap().is_none());
//! ```

mod codec;
mod conn;
mod graceful;
mod handoff;
pub mod net;
mod ops;
mod send_file;
mod server;
mod servers;
pub mod shutdown;
#[cfg(target_os = "linux")]
mod splice;
mod stop;

pub use codec::{
    Head, HeadError, has_token, parse_head, request_body, wants_keep_alive, write_head,
};
pub use conn::{Bodies, Conn, Intercept, NoIntercept, oci_error};
pub use graceful::serve_hyper;
#[cfg(feature = "tls")]
pub use graceful::serve_tls;
pub use ops::ops_router;
pub use send_file::{Growth, SendFile};
pub use server::{Server, ServerKind};
pub use servers::Servers;
pub use shutdown::Shutdown;
#[cfg(target_os = "linux")]
pub use splice::Broken;

/// A body that moves no byte for this long is abandoned, and its connection closed: a client
/// that stopped reading, or a source that stopped sending, must not hold a connection, a file
/// and a pipe forever.
#[cfg(target_os = "linux")]
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for a socket to be ready (`ready` is its `readable()` or `writable()`), for at most
/// [`STALL`].
#[cfg(target_os = "linux")]
async fn unless_stalled(
    ready: impl std::future::Future<Output = std::io::Result<()>>,
    side: &str,
) -> std::io::Result<()> {
    match tokio::time::timeout(STALL, ready).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{side} moved no byte for {STALL:?}"),
        )),
    }
}

/// hyper's HTTP/1 read buffer and write queue, per connection. Its default (~400 KiB) lets a
/// blob response queue that much per connection: at 32 connections that was most of the RSS
/// over the memory budget (BENCHMARKS.md, finding 3).
pub const MAX_BUF: usize = 128 * 1024;
