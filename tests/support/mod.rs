//! Shared helpers for the end-to-end tests in `tests/`: a `kache registry` child process, a
//! hermetic skopeo runner, an OCI image builder with layout readers and writers, and a small
//! plain-HTTP client for looking at what the registry serves.
//!
//! Every test binary compiles this module whole but uses only part of it, hence the allows.
#![allow(dead_code, unused_imports)]

pub mod http;
pub mod image;
pub mod registry;
pub mod skopeo;

pub use http::{Response, get, head};
pub use image::{Blob, Content, Flavor, Image, ImageBuilder, Index, Platform};
pub use registry::KacheRegistry;
pub use skopeo::Skopeo;
