//! The servers of a role, or of a process: the first to end (its shutdown, or a failure) ends
//! them all.

use std::future::Future;
use std::io;

use tokio::task::JoinSet;

/// Servers started together; [`Servers::first_end`] answers how the first of them ended.
#[derive(Debug, Default)]
pub struct Servers(JoinSet<io::Result<()>>);

impl Servers {
    /// Runs `serving` (one listener's server, or a role) in the background.
    pub fn spawn(
        &mut self,
        what: &'static str,
        serving: impl Future<Output = io::Result<()>> + Send + 'static,
    ) {
        self.0.spawn(async move {
            serving
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("{what} failed: {e}")))
        });
    }

    /// Waits for the first server to end. One that failed ends the others at once and is the
    /// answer; one that stopped (its shutdown came) lets the others finish their own graceful
    /// stop, the answers in progress included.
    pub async fn first_end(mut self) -> io::Result<()> {
        match self.0.join_next().await {
            Some(r) => match r.unwrap_or_else(|e| Err(io::Error::other(e))) {
                Ok(()) => self.all_end().await,
                Err(e) => {
                    self.0.abort_all();
                    Err(e)
                }
            },
            None => Ok(()),
        }
    }

    /// Waits for every server to end; the first failure is the answer.
    pub async fn all_end(mut self) -> io::Result<()> {
        let mut first = Ok(());
        while let Some(r) = self.0.join_next().await {
            let r = r.unwrap_or_else(|e| Err(io::Error::other(e)));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
