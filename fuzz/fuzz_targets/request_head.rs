//! plan_request on arbitrary bytes: never panics, and what it accepts it writes as a head that
//! parses again to the same framing and target.
#![no_main]

use amazing_proxy::proxy::http1::framing::{Rewrite, plan_request};
use amazing_proxy::telemetry::trace::Sampler;
use libfuzzer_sys::fuzz_target;

const FIRST: Rewrite<'static> = Rewrite {
    lowercase_names: false,
    host: None,
    client_ip: "198.18.0.1",
    via: "amazing-proxy-fuzz1",
    normalize_path: true,
    trusted_hops: 0,
    client_cert: None,
    // The trace phase reads the caller's context and writes its own traceparent.
    sampler: Some(&Sampler::ALWAYS),
    tunnel_parent: None,
};
/// A second proxy instance: the first one's output must not look like a loop to it.
const SECOND: Rewrite<'static> = Rewrite {
    lowercase_names: true,
    via: "amazing-proxy-fuzz2",
    ..FIRST
};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut out = Vec::new();
    let Ok(plan) = plan_request(&mut buf, &FIRST, &mut out) else {
        return;
    };
    assert!(plan.head_len <= data.len());
    assert!(out.ends_with(b"\r\n\r\n"));
    if data
        .windows(SECOND.via.len())
        .any(|w| w.eq_ignore_ascii_case(SECOND.via.as_bytes()))
    {
        // A loop to the second instance, rightly.
        return;
    }
    let mut again = out.clone();
    let mut out2 = Vec::new();
    let replan = plan_request(&mut again, &SECOND, &mut out2)
        .unwrap_or_else(|v| panic!("our own head is {v:?}: {}", String::from_utf8_lossy(&out)));
    assert_eq!(replan.head_len, out.len());
    assert_eq!(replan.framing, plan.framing);
    assert_eq!(replan.path, plan.path);
    assert_eq!(replan.method, plan.method);
});
