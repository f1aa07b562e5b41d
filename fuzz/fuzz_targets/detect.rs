//! classify on arbitrary bytes: never panics, decides by MAX_PEEK bytes, and never changes its
//! mind when more bytes arrive.
#![no_main]

use amazing_proxy::proxy::detect::{MAX_PEEK, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = classify(data);
    if data.len() >= MAX_PEEK {
        assert!(full.is_some());
    }
    for k in [
        1,
        data.len() / 3,
        data.len() / 2,
        data.len().saturating_sub(1),
    ] {
        if k <= data.len()
            && let Some(early) = classify(&data[..k])
        {
            assert_eq!(Some(early), full, "decided at {k} bytes");
        }
    }
});
