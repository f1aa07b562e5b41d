//! path::normalize on arbitrary text: never panics; what it accepts is a fixed point, free of the
//! ambiguous forms, still a valid request target when the input was one, and means to apps that
//! decode before resolving (and to those that strip `;` parameters first) what the input meant.
#![no_main]

use amazing_proxy::proxy::path::{normalize, reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(normal) = normalize(target) else {
        return;
    };
    assert_eq!(
        normalize(&normal).as_deref(),
        Ok(&*normal),
        "not a fixed point"
    );
    if normal != "*" {
        let path = normal.split('?').next().unwrap_or_default();
        assert!(path.starts_with('/'));
        for segment in path.split('/') {
            assert!(
                segment != "." && segment != "..",
                "a dot segment in {normal:?}"
            );
        }
        let upper = path.to_ascii_uppercase();
        for escape in ["%2F", "%2E", "%25", "%5C", "%00", "%7F"] {
            assert!(!upper.contains(escape), "{escape} in {normal:?}");
        }
    }
    for app in [reference::decoding_app, reference::parameter_stripping_app] {
        assert_eq!(app(target), app(&normal), "{target:?} became {normal:?}");
    }
    // A fragment is no part of a request target: the fast path refuses `#`, and `http::Uri`
    // drops it before the hyper path sees the path (so its bytes are never checked).
    if !target.contains('#') && http::uri::PathAndQuery::try_from(target).is_ok() {
        assert!(
            http::uri::PathAndQuery::try_from(&*normal).is_ok(),
            "{normal:?} is not a valid target"
        );
    }
});
