//! An upstream at a network's pace: a TCP relay on 127.0.0.1 in front of the upstream that
//! sends the upstream's answers on at a set rate per connection, as a registry's CDN or a
//! WAN link does.
//!
//! On loopback the upstream sends at memory speed and its CPU comes out of the same cores as
//! the cache's, so "as fast as the upstream" there measures how much work a cache does per byte
//! on a shared machine. Behind this relay the upstream is the limit, as it is for a cluster
//! pulling from a public registry: there a cache must cost its client almost nothing.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest read of the upstream's answer at a time: at 250 MB/s a quarter of a millisecond.
const CHUNK: usize = 64 * 1024;

/// The most sending time a connection may bank while it waits, and spend at once: enough to
/// make up for the timer's millisecond, not enough to let a kept-alive connection that sat idle
/// send its next answer at memory speed.
const BURST: Duration = Duration::from_millis(5);

/// A running relay; it stops, with every connection through it, when dropped.
#[derive(Debug)]
pub struct Link {
    pub addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Link {
    /// Relays connections to `upstream`, each one's answers at `bytes_per_s`.
    pub async fn start(upstream: SocketAddr, bytes_per_s: u64) -> Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        conns.spawn(async move {
                            if let Err(e) = relay(client, upstream, bytes_per_s).await {
                                eprintln!("  link: a connection ended: {e}");
                            }
                        });
                    }
                    // Reap finished connections so the set stays as large as the open ones.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Link { addr, tasks })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// One connection: requests go to the upstream as they come, answers come back at the pace.
async fn relay(client: TcpStream, upstream: SocketAddr, bytes_per_s: u64) -> Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let requests = async {
        tokio::io::copy(&mut client_rx, &mut server_tx).await?;
        server_tx.shutdown().await
    };
    let answers = async {
        let mut buf = vec![0u8; CHUNK];
        // When the link is free again: each chunk holds it for its length at the pace.
        let mut free = Instant::now();
        loop {
            let n = server_rx.read(&mut buf).await?;
            if n == 0 {
                return client_tx.shutdown().await;
            }
            free = free.max(Instant::now() - BURST);
            client_tx.write_all(&buf[..n]).await?;
            free += Duration::from_secs_f64(n as f64 / bytes_per_s as f64);
            tokio::time::sleep_until(free).await;
        }
    };
    // A side that ends ends the connection: both halves drop with it.
    tokio::select! {
        r = requests => r?,
        r = answers => r?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers each connection with `len` bytes of 7, waits `pause`, sends `len`
    /// bytes of 8 on the same connection, then closes: a kept-alive connection's two answers.
    async fn sender(len: usize, pause: Duration) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(&vec![7u8; len]).await;
                    tokio::time::sleep(pause).await;
                    let _ = s.write_all(&vec![8u8; len]).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_arrive_whole_and_no_faster_than_the_pace_even_after_a_pause() {
        let len = 2 << 20;
        let upstream = sender(len, Duration::from_millis(300)).await;
        // 2 MiB at 16 MiB/s: an eighth of a second each, however long the connection sat idle.
        let link = Link::start(upstream, 16 << 20).await.unwrap();
        let mut c = TcpStream::connect(link.addr).await.unwrap();
        let mut first = vec![0u8; len];
        let t = std::time::Instant::now();
        c.read_exact(&mut first).await.unwrap();
        let first_took = t.elapsed();
        // The second answer is timed from its first byte: the pause before it is not credit.
        let mut second = vec![0u8; 1];
        c.read_exact(&mut second).await.unwrap();
        let t = std::time::Instant::now();
        c.read_to_end(&mut second).await.unwrap();
        let second_took = t.elapsed();
        assert!(first.iter().all(|&b| b == 7));
        assert_eq!(second.len(), len);
        assert!(second.iter().all(|&b| b == 8));
        let at_least = Duration::from_millis(110);
        assert!(
            first_took >= at_least,
            "the first 2 MiB took {first_took:?}"
        );
        assert!(
            second_took >= at_least,
            "the second 2 MiB took {second_took:?}"
        );
    }
}
