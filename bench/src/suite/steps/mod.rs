//! The measurements that compare kache with nginx and distribution on the servers the suite
//! started, in the order they run.

mod blob;
mod cold;
mod manifest;
pub mod memory;
mod stream;
mod webhook;

pub use blob::blob_step;
pub use cold::cold_step;
pub use manifest::manifest_step;
pub use memory::memory_step;
pub use stream::stream_step;
pub use webhook::webhook_step;
