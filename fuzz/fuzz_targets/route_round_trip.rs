//! The Distribution API in both directions: whatever path parses as an endpoint, that
//! endpoint's path parses back as the same endpoint (`parse(&r.path()) == Ok(r)`), so the paths
//! kache builds (Location headers, upstream URLs, the controller's deletes) mean what it meant.

#![no_main]

use kache_oci::distribution::Route;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(route) = Route::parse(path) {
        let built = route.path();
        assert_eq!(
            Route::parse(&built).as_ref(),
            Ok(&route),
            "{path:?} → {built:?}"
        );
    }
});
