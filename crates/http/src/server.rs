//! The server: accepting, and stopping gracefully. Each connection is a [`Conn`] (`conn.rs`);
//! one that pushes or speaks HTTP/2 goes to hyper (`handoff.rs`).

use std::future::Future;
use std::io;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::codec::Head;
use crate::conn::Conn;

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

/// What the server does with a request that has a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bodies {
    /// Refused without being read (a node proxy only pulls): a GET or HEAD with a body is
    /// answered 400; anything else is answered by the router, and the connection closes.
    Refuse,
    /// The connection goes to hyper, that request first, for the rest of its life (a registry
    /// takes pushes; pulling clients never send a body, so they stay here).
    Hyper,
}

/// Answers some requests before the router sees them, on the raw connection (the proxy's
/// spliced blobs).
pub trait Intercept: Clone + Send + Sync + 'static {
    /// `Some(Ok(keep))` when `head` was answered on `conn`, `None` to leave it to the router.
    /// `keep` says whether the client wants the connection kept open.
    fn intercept(
        &self,
        conn: &mut Conn,
        head: &Head,
        keep: bool,
    ) -> impl Future<Output = Option<io::Result<bool>>> + Send;
}

/// Leaves every request to the router.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoIntercept;

impl Intercept for NoIntercept {
    fn intercept(
        &self,
        _: &mut Conn,
        _: &Head,
        _: bool,
    ) -> impl Future<Output = Option<io::Result<bool>>> + Send {
        std::future::ready(None)
    }
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

/// The server's stop signal, as seen by a connection.
pub(crate) struct Stop(watch::Receiver<bool>);

impl Stop {
    pub(crate) fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    pub(crate) async fn wait(&mut self) {
        loop {
            if *self.0.borrow_and_update() {
                return;
            }
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}
