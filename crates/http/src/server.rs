//! The server: accepting, and stopping gracefully. Each connection is a [`Conn`] (`conn.rs`);
//! one that pushes or speaks HTTP/2 goes to hyper (`handoff.rs`).

use std::future::Future;
use std::io;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::conn::{Bodies, Conn, Intercept, NoIntercept};
use crate::stop::Stop;

/// Which HTTP server answers a role's clients (`--http-server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum ServerKind {
    /// kache's own HTTP/1.1 server ([`Server`]): blob bodies never cross user space, the
    /// registry's go page cache → socket with sendfile(2), the proxy's registry socket → pipe →
    /// client socket with splice(2). A connection that sends a request body (a push), or speaks
    /// HTTP/2, is handed to hyper. (`splice` is the proxy's old name for it.)
    #[default]
    #[cfg_attr(feature = "clap", value(alias = "splice"))]
    Kache,
    /// hyper for everything ([`crate::serve_hyper`]); every body byte is copied through user
    /// space.
    Hyper,
}

/// The server for one router.
#[derive(Debug, Clone)]
pub struct Server<I = NoIntercept> {
    app: Router,
    intercept: I,
    bodies: Bodies,
    kind: ServerKind,
}

impl Server {
    /// Serves `app`, request bodies refused.
    pub fn new(app: Router) -> Server {
        Server {
            app,
            intercept: NoIntercept,
            bodies: Bodies::Refuse,
            kind: ServerKind::Kache,
        }
    }
}

impl<I: Intercept> Server<I> {
    /// Lets `intercept` answer requests first.
    pub fn intercept<J: Intercept>(self, intercept: J) -> Server<J> {
        Server {
            app: self.app,
            intercept,
            bodies: self.bodies,
            kind: self.kind,
        }
    }

    /// Which server runs: with [`ServerKind::Hyper`], hyper serves the router alone (no
    /// intercept, bodies taken).
    pub fn kind(mut self, kind: ServerKind) -> Self {
        self.kind = kind;
        self
    }

    /// What to do with request bodies.
    pub fn bodies(mut self, bodies: Bodies) -> Self {
        self.bodies = bodies;
        self
    }

    /// Serves on `listener` until `shutdown` resolves; then stops accepting, closes idle
    /// connections, and returns once every open request has been answered.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        if self.kind == ServerKind::Hyper {
            return crate::serve_hyper(listener, self.app, shutdown).await;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every connection holds a sender; recv() ends when the last one is gone.
        let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                a = crate::net::accept(&listener) => a,
                () = &mut shutdown => break,
            };
            let conn = Conn::new(self.app.clone(), self.bodies, tcp);
            let intercept = self.intercept.clone();
            let stop = Stop(stop_rx.clone());
            let alive = alive_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.run(intercept, stop).await {
                    tracing::trace!(%peer, error = %e, "connection ended with an error");
                }
                drop(alive);
            });
        }
        drop(listener);
        let _ = stop_tx.send(true);
        drop(alive_tx);
        let _ = alive_rx.recv().await;
        Ok(())
    }
}
