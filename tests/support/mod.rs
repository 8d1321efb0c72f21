//! Shared helpers for the end-to-end tests in `tests/`: a `kache registry` child process, a
//! hermetic skopeo runner, an OCI image builder with layout readers and writers, and a small
//! plain-HTTP client for looking at what the registry serves; and for pull-through tests, real
//! upstreams (CNCF distribution, open or behind Basic or token auth, and its token server), an
//! upstream that fails on demand, and a private containerd pulling through hosts.toml mirrors.
//!
//! Every test binary compiles this module whole but uses only part of it, hence the allows.
#![allow(dead_code, unused_imports)]

pub mod background;
pub mod compose;
pub mod containerd;
pub mod distribution;
pub mod faulty;
pub mod gc;
pub mod helm;
pub mod http;
pub mod image;
pub mod kube;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod pull;
pub mod registry;
pub mod skopeo;
pub mod token;
pub mod webhook;

pub use containerd::Containerd;
pub use distribution::{Distribution, DistributionKind};
pub use faulty::{Fault, FaultyUpstream};
pub use http::{Response, get, head};
pub use image::{Blob, Content, Flavor, Image, ImageBuilder, Index, Platform};
pub use proxy::KacheProxy;
pub use registry::KacheRegistry;
pub use skopeo::Skopeo;
pub use token::TokenServer;
