//! What every kache server does with its listening socket: binding, and accepting.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// The next connection, with Nagle's algorithm off (answers are written whole).
///
/// A connection that failed before it was accepted (refused, aborted, reset) is skipped at once.
/// Any other error (out of file descriptors and the like) is logged and retried after a second,
/// to give connections time to close instead of spinning on the error.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => {
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Binds `addr` with SO_REUSEPORT, so that during a rolling update (a DaemonSet's surge) the
/// new process listens beside the old one, which then stops accepting and finishes what it
/// serves: a client always finds a listener.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Errors about one connection, not about the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_about_one_connection_are_transient() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
        ] {
            assert!(is_transient(&io::Error::from(kind)), "{kind:?}");
        }
        // EMFILE: the listener's problem, retried after a pause.
        assert!(!is_transient(&io::Error::from_raw_os_error(24)));
    }

    #[tokio::test]
    async fn a_shared_port_takes_a_second_listener() {
        let first = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_shared(addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // An ordinary bind of the same port is still refused.
        assert!(TcpListener::bind(addr).await.is_err());
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (tcp, peer) = accept(&listener).await;
        let client = client.await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(tcp.nodelay().unwrap());
    }
}
