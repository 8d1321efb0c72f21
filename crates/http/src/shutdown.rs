//! When a server stops: on SIGTERM (the kubelet) or Ctrl-C.

use std::time::Duration;

/// Resolves when the process is asked to stop (SIGTERM, or Ctrl-C).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Resolves `delay` after the process is asked to stop: a server behind a Service keeps
/// answering while its endpoint is withdrawn, so that no caller meets a closed port.
pub async fn signal_then(delay: Duration) {
    signal().await;
    if !delay.is_zero() {
        tracing::info!(?delay, "serving on until endpoints are withdrawn");
        tokio::time::sleep(delay).await;
    }
}
