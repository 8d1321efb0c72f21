//! Any request path either names no endpoint or names one whose repository is a valid name:
//! nothing that could leave the data directory (`..`, `%`, a leading `/`) survives parsing.

#![no_main]

use kache_oci::distribution::Route;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(route) = Route::parse(path)
        && let Some(repo) = route.repo()
    {
        let name = repo.as_str();
        assert!(
            !name.starts_with('/') && !name.contains("..") && !name.contains('%'),
            "{name:?} from {path:?}"
        );
        assert!(
            name.split('/').all(|c| !c.is_empty()),
            "{name:?} from {path:?}"
        );
    }
});
