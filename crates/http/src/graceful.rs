//! Serving a router with hyper alone: every body byte through user space, HTTP/1.1 and h2c (or
//! HTTP/2 over TLS), graceful stop. The registry and the proxy use it when asked
//! (`--http-server hyper`); the metrics listeners and the webhook always do.

use std::future::Future;
use std::io;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// What `axum::serve(..).with_graceful_shutdown(..)` does (HTTP/1.1 and h2c, upgrades; on
/// shutdown stop accepting, let open connections finish), with hyper's buffers capped at
/// [`crate::MAX_BUF`] and Nagle off on every connection.
pub async fn serve_hyper(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(crate::MAX_BUF);
    builder.http2().enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = crate::net::accept(&listener) => a,
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(feature = "tls")]
pub use tls::serve_tls;

#[cfg(feature = "tls")]
mod tls {
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::ServerConfig;
    use tokio_rustls::TlsAcceptor;

    use super::*;

    /// A TLS handshake that takes longer than this is dropped, so idle sockets cannot pile up.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// Open connections get this long to finish after shutdown is asked for.
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

    /// Serves `app` over TLS on `listener` until `shutdown` resolves, then lets open
    /// connections finish (for a while). HTTP/1.1 and HTTP/2 (ALPN). A failed handshake only
    /// drops that connection.
    pub async fn serve_tls(
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        app: Router,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let acceptor = TlsAcceptor::from(tls);
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                a = crate::net::accept(&listener) => a,
                () = &mut shutdown => break,
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!("connections still open after the drain timeout; closing them");
        }
        Ok(())
    }
}
