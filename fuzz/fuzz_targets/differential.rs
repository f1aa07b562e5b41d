//! Differential oracle: our planner and chunked tracker against hyper's HTTP/1 server parser.
//!
//! The input is what a client sends. Where ours finds a complete first request ending at byte
//! `n`, hyper is fed exactly those `n` bytes followed by a sentinel request, and must see the same
//! first request (same body length) and then the sentinel: so both agree on where the first
//! message ends. Where ours rejects, hyper may accept (ours is the stricter); where ours accepts,
//! hyper rejecting is a failure. Hyper gets the bytes after our in-place `HTTP/1.2`..`1.9`
//! rewrite (httparse, under both, rejects those versions) and a field limit as large as ours.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use amazing_proxy::proxy::http1::chunked::ChunkedTracker;
use amazing_proxy::proxy::http1::framing::{Framing, Rewrite, plan_request};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;

const REWRITE: Rewrite<'static> = Rewrite {
    lowercase_names: false,
    host: None,
    client_ip: "198.18.0.1",
    via: "amazing-proxy-fuzz",
    normalize_path: true,
    trusted_hops: 0,
    client_cert: None,
    sampler: None,
    tunnel_parent: None,
};
const SENTINEL_PATH: &str = "/__sentinel";
const SENTINEL: &[u8] = b"GET /__sentinel HTTP/1.1\r\nHost: s\r\n\r\n";

/// What hyper's service saw of one request: its path and its body's length (or an error).
type Seen = (String, Result<u64, String>);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Serves `input` with hyper's HTTP/1 server; the requests its service saw, in order.
fn hyper_sees(input: Vec<u8>) -> Vec<Seen> {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let io = tokio::io::join(std::io::Cursor::new(input), tokio::io::sink());
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let path = req.uri().path().to_owned();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len() as u64)
                .map_err(|e| e.to_string());
            record.lock().expect("not poisoned").push((path, body));
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }
    });
    runtime().block_on(async {
        // Errors are the verdicts compared below, through what the service saw.
        let _ = hyper::server::conn::http1::Builder::new()
            .max_headers(10_000)
            // The input ends (EOF) before hyper has answered the pipelined requests in it.
            .half_close(true)
            .serve_connection(TokioIo::new(io), service)
            .await;
    });
    let seen = seen.lock().expect("not poisoned").clone();
    seen
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut out = Vec::new();
    let Ok(plan) = plan_request(&mut buf, &REWRITE, &mut out) else {
        // Partial, Invalid (ours may be stricter), Fallback (hyper's).
        return;
    };
    if plan.looped || !plan.authority_valid {
        // Read whole, then refused by the driver (508, 400): ours may be stricter.
        return;
    }
    let body = &buf[plan.head_len..];
    let (end, payload) = match plan.framing {
        Framing::None => (plan.head_len, 0),
        Framing::Length(n) => match usize::try_from(n) {
            Ok(n) if n <= body.len() => (plan.head_len + n, n as u64),
            _ => return,
        },
        Framing::Chunked => {
            let mut tracker = ChunkedTracker::default();
            match tracker.advance(body) {
                Ok(Some(n)) => (plan.head_len + n, tracker.payload()),
                _ => return,
            }
        }
        Framing::UntilClose => unreachable!("requests have no until-close framing"),
    };
    let mut input = buf[..end].to_vec();
    input.extend_from_slice(SENTINEL);
    let seen = hyper_sees(input.clone());
    let shown = String::from_utf8_lossy(&input);
    let Some((_, first_body)) = seen.first() else {
        panic!("hyper rejects a request we accept: {shown:?}");
    };
    assert_eq!(
        first_body,
        &Ok(payload),
        "hyper reads another body than ours: {shown:?}"
    );
    if plan.keep_alive {
        assert_eq!(
            seen.get(1).map(|(path, _)| path.as_str()),
            Some(SENTINEL_PATH),
            "hyper ends the first request elsewhere: {shown:?}, saw {seen:?}"
        );
    }
});
