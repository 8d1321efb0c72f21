//! The server's stop signal as each connection sees it: its own module, so that the server,
//! its connections and the hand-off to hyper all use it without using each other.

use tokio::sync::watch;

/// The server's stop signal, as seen by a connection.
pub(crate) struct Stop(pub(crate) watch::Receiver<bool>);

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
