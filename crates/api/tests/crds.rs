//! The CRD YAML users apply (crates/api/crds.yaml, the chart's crds/) is what the Rust types
//! generate.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let want = kache_api::crds_yaml();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for file in ["crates/api/crds.yaml", "helm/kache/crds/kache.io.yaml"] {
        let have =
            std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            have == want,
            "{file} differs from the Rust types in crates/api/src: regenerate it with \
             `cargo run -p kache -- crds > {file}`"
        );
    }
}
