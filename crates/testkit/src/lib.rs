//! What kache's end-to-end tests (`tests/`) and its benchmark share: a `kache registry` child process, a
//! hermetic skopeo runner, an OCI image builder with layout readers and writers, and a small
//! plain-HTTP client for looking at what the registry serves; and for pull-through tests, real
//! upstreams (CNCF distribution, open or behind Basic or token auth, and its token server), an
//! upstream that fails on demand, and a private containerd pulling through hosts.toml mirrors;
//! and the OCI clients users reach for (crane, regctl, oras).
//!
//! The crates' own async tests use the in-process tier: [`parts`] (kache's registry and node
//! proxy on free ports of this process) and [`inproc`] (a router on a free port, a client,
//! pushes).
//!
//! The tests use it as `support` (`use kache_testkit as support;`).

pub mod background;
pub mod clients;
pub mod compose;
pub mod containerd;
pub mod distribution;
pub mod faulty;
pub mod gc;
pub mod helm;
pub mod http;
pub mod image;
pub mod inproc;
pub mod kube;
pub mod metrics;
pub mod node;
pub mod parts;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod pull;
pub mod registry;
pub mod skopeo;
pub mod token;
pub mod webhook;

pub use clients::OciClients;
pub use containerd::Containerd;
pub use distribution::{Distribution, DistributionKind};
pub use faulty::{Fault, FaultyUpstream};
pub use http::{Response, get, head};
pub use image::{Blob, Content, Flavor, Image, ImageBuilder, Index, Platform};
pub use proxy::KacheProxy;
pub use registry::KacheRegistry;
pub use skopeo::Skopeo;
pub use token::TokenServer;

/// The `kache` binary under test: `KACHE_BIN` when set, else the one cargo built beside the
/// running test (`target/<profile>/deps/<test>` → `target/<profile>/kache`).
pub fn kache_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("KACHE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the running test's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("kache");
    assert!(
        bin.exists(),
        "{} is not built: run the tests of the kache package (cargo test -p kache), which build it, or set KACHE_BIN",
        bin.display()
    );
    bin
}
