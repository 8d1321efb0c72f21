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

/// When a role's servers stop: a signal any number of them wait on. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

/// Stops the servers of a [`Shutdown`] made with [`Shutdown::new`].
#[derive(Debug)]
pub struct Trigger(tokio::sync::watch::Sender<bool>);

impl Shutdown {
    /// A shutdown that comes when [`Trigger::stop`] is called (or the trigger dropped).
    pub fn new() -> (Shutdown, Trigger) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (Shutdown(rx), Trigger(tx))
    }

    /// A shutdown that comes `delay` after the process is asked to stop ([`signal_then`]).
    pub fn on_signal(delay: Duration) -> Shutdown {
        let (shutdown, trigger) = Shutdown::new();
        tokio::spawn(async move {
            signal_then(delay).await;
            trigger.stop();
        });
        shutdown
    }

    /// Resolves when the shutdown comes.
    pub async fn wait(self) {
        let mut rx = self.0;
        // An error is a dropped trigger: nobody can stop these servers any more, but a role
        // whose trigger is gone is one being torn down, so it stops too.
        let _ = rx.wait_for(|stopped| *stopped).await;
    }
}

impl Trigger {
    /// Stops every server waiting on the shutdown.
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}
