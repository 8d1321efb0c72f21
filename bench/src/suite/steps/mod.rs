//! The measurements that compare kache with nginx and distribution on the servers the suite
//! started, in the order they run.

mod blob;
mod cold;
mod manifest;
pub mod memory;
mod private;
mod stream;
mod webhook;

pub use blob::blob_step;
pub use cold::cold_step;
pub use manifest::manifest_step;
pub use memory::memory_step;
pub use private::private_step;
pub use stream::stream_step;
pub use webhook::webhook_step;

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::{HeaderMap, Method};

use super::Options;
use super::meter::median_by;
use super::servers::Server;
use crate::client::Url;
use crate::load::{self, LoadResult, LoadSpec};

/// Measures each server `rounds` times and keeps its median round by `key`. The servers take
/// turns within a round, so that the machine drifting over a step touches them all alike.
async fn median_rounds<T>(
    servers: &[&Server],
    rounds: usize,
    mut measure: impl AsyncFnMut(usize, &Server) -> Result<T>,
    key: impl Fn(&T) -> f64,
) -> Result<Vec<T>> {
    let mut all: Vec<Vec<T>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, s) in servers.iter().enumerate() {
            all[i].push(measure(round, s).await?);
        }
    }
    Ok(all.into_iter().map(|v| median_by(v, &key)).collect())
}

/// The load steps' load: `--connections` sending GETs of `url` back to back for `--duration`.
fn get_load(o: &Options, url: Url, headers: HeaderMap) -> LoadSpec {
    LoadSpec {
        url,
        method: Method::GET,
        headers,
        body: Bytes::new(),
        connections: o.connections,
        duration: o.duration,
        requests: None,
        rate: None,
    }
}

/// A few requests of `spec` before it is measured: the connections open, the caches fill.
async fn warm_up(spec: &LoadSpec) -> Result<LoadResult> {
    load::load(LoadSpec {
        requests: Some(spec.connections as u64 * 4),
        duration: Duration::from_secs(5),
        ..spec.clone()
    })
    .await
}
