//! Any string either fails to parse as an image reference or parses to a value whose printed
//! form parses back to it, and whose cache repository splits back into registry and path.

#![no_main]

use kache_oci::{ImageReference, RepoName, split_cache_repository};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(repo) = s.parse::<RepoName>() {
        let _ = split_cache_repository(&repo);
    }
    let Ok(r) = s.parse::<ImageReference>() else {
        return;
    };
    let shown = r.to_string();
    let again: ImageReference = shown
        .parse()
        .unwrap_or_else(|e| panic!("{shown:?} (from {s:?}) does not parse again: {e}"));
    assert_eq!(again, r, "{s:?} printed as {shown:?}");
    assert!(r.tag.is_some() || r.digest.is_some());
    let _ = r.reference();
    let cache = r.cache_repository();
    assert_eq!(
        split_cache_repository(&cache),
        Some((r.registry.clone(), r.repository.clone())),
        "{s:?} cached as {cache}"
    );
});
