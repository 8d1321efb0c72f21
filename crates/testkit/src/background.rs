//! An axum server inside the test process, on 127.0.0.1, with its own tokio runtime on its own
//! thread: the tests that use it are plain `#[test]` functions driving child processes, and a
//! runtime owned by a thread can be stopped from `Drop` in sync and async tests alike (dropping
//! a runtime inside another one's async context panics).

use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// A running server; stopped (every connection dropped at once) when this is dropped.
#[derive(Debug)]
pub struct ServerThread {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Serves `router` on a free port of 127.0.0.1.
    pub fn start(name: &str, router: axum::Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        Self::serve(name, listener, router)
    }

    /// Serves `router` on `addr` (a port this process used before, for a restart).
    pub fn start_on(name: &str, addr: SocketAddr, router: axum::Router) -> Self {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("{name}: bind {addr} again: {e}"));
        Self::serve(name, listener, router)
    }

    fn serve(name: &str, listener: TcpListener, router: axum::Router) -> Self {
        // Bound here, before the thread starts, so the address is known and already accepting
        // (queued by the kernel) when this returns: no readiness poll is needed.
        let addr = listener.local_addr().expect("local addr");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (tx, rx) = oneshot::channel::<()>();
        let thread_name = format!("{name}-{}", addr.port());
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build server runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    // No graceful shutdown: a stopped upstream vanishes mid-response, like a
                    // killed process, and a slow drip cannot hold the test up.
                    tokio::select! {
                        result = axum::serve(listener, router) => {
                            if let Err(e) = result {
                                eprintln!("test server on {addr} failed: {e}");
                            }
                        }
                        _ = rx => {}
                    }
                });
                // Dropping the runtime cancels every connection task and closes its socket.
            })
            .expect("spawn server thread");
        ServerThread {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drops every open connection and waits for the thread to end.
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}
