//! Manifest parsing never panics, whatever the bytes and whatever Content-Type came with them.

#![no_main]

use kache_oci::ParsedManifest;
use kache_oci::media_type::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 5 {
        0 => None,
        1 => Some(OCI_MANIFEST),
        2 => Some(OCI_INDEX),
        3 => Some(DOCKER_MANIFEST),
        _ => Some("application/json; charset=utf-8"),
    };
    if let Ok(m) = ParsedManifest::parse(body, content_type) {
        let _ = m.required_blobs().count();
        let _ = m.references().count();
        let _ = m.effective_artifact_type();
    }
});
