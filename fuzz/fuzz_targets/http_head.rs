//! Whatever a client sends as a request head, kache's HTTP/1.1 server parses it without
//! panicking; a complete head is the first `used` bytes of the buffer and parses alone to the
//! same head (what follows is the next request, never part of this one); and what it says about
//! a body and the connection reads without panicking.

#![no_main]

use kache_http::{parse_head, request_body, wants_keep_alive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, used))) = parse_head(data) {
        assert!(used > 0 && used <= data.len());
        let alone = parse_head(&data[..used]).expect("a complete head parses alone");
        assert_eq!(alone, Some((head.clone(), used)));
        let _ = request_body(&head.headers);
        let _ = wants_keep_alive(head.version, &head.headers);
    }
});
