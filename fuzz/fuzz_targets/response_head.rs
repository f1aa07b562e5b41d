//! plan_response on arbitrary bytes: never panics, and what it accepts it writes as a head that
//! parses again to the same framing.
#![no_main]

use amazing_proxy::proxy::http1::framing::{Framing, plan_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, head)) = data.split_first() else {
        return;
    };
    let (head_request, keep_alive, lower) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let mut out = Vec::new();
    let Ok(Some(plan)) = plan_response(head, head_request, keep_alive, lower, &mut out) else {
        return;
    };
    assert!(plan.head_len <= head.len());
    if plan.interim {
        return;
    }
    if plan.framing == Framing::UntilClose {
        assert!(!plan.upstream_reusable && !plan.keep_alive);
    }
    let mut out2 = Vec::new();
    let replan = plan_response(&out, head_request, keep_alive, lower, &mut out2)
        .unwrap_or_else(|e| panic!("our own head is {e:?}: {}", String::from_utf8_lossy(&out)))
        .expect("our own head is complete");
    assert_eq!(replan.head_len, out.len());
    assert_eq!(replan.status, plan.status);
    assert_eq!(replan.framing, plan.framing);
    assert_eq!(replan.keep_alive, plan.keep_alive);
    assert_eq!(out2, out, "planning our own head changes it");
});
