//! Golden files pinning what the HTTP/1.1 fast path's planners make of request and response heads:
//! the verdict, the framing and the exact head sent on, for the cases of issue 9 and the usual ones.
//!
//! `UPDATE_GOLDENS=1 cargo test --test in_process http1_golden` rewrites tests/golden/http1/ from the current
//! planners; review the diff before committing.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;
use std::path::PathBuf;

use amazing_proxy::proxy::http1::chunked::ChunkedTracker;
use amazing_proxy::proxy::http1::framing::{Framing, Rewrite, plan_request, plan_response};

const REWRITE: Rewrite<'static> = Rewrite {
    lowercase_names: false,
    host: None,
    client_ip: "198.18.0.1",
    via: "amazing-proxy-1a2b3c4d",
    normalize_path: true,
    trusted_hops: 0,
    client_cert: None,
    sampler: None,
    tunnel_parent: None,
};

/// Bytes as readable text: CRLF and LF shown escaped, each followed by a real line break.
fn show(bytes: &[u8]) -> String {
    let mut s = String::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' if bytes.get(i + 1) == Some(&b'\n') => {
                s.push_str("\\r\\n\n");
                i += 1;
            }
            b'\n' => s.push_str("\\n\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            b @ 0x20..=0x7e => s.push(b as char),
            b => write!(s, "\\x{b:02x}").unwrap(),
        }
        i += 1;
    }
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Requests: (name, rewrite options, head bytes). Each names the rule it pins.
fn request_cases() -> Vec<(&'static str, Rewrite<'static>, &'static [u8])> {
    let lower = Rewrite {
        lowercase_names: true,
        ..REWRITE
    };
    let rewrite_host = Rewrite {
        host: Some("127.0.0.1:8080"),
        ..REWRITE
    };
    let outbound = Rewrite {
        normalize_path: false,
        ..REWRITE
    };
    let trusted = Rewrite {
        trusted_hops: 2,
        ..REWRITE
    };
    let peer = Rewrite {
        client_cert: Some(b"By=spiffe://cluster.local/ns/shop/sa/backend;URI=spiffe://cluster.local/ns/shop/sa/frontend"),
        ..REWRITE
    };
    const OWNED: &[u8] = b"GET / HTTP/1.1\r\nHost: pod\r\nX-Forwarded-For: 203.0.113.1, 203.0.113.2\r\nX-Forwarded-For: 203.0.113.3\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.3;proto=https\r\nX-Forwarded-Client-Cert: URI=spiffe://cluster.local/ns/kube-system/sa/admin\r\nX-Request-Id: r1\r\n\r\n";
    vec![
        ("plain get", REWRITE, b"GET /a?b=c HTTP/1.1\r\nHost: pod\r\nUser-Agent: curl\r\nAccept: */*\r\n\r\n"),
        ("names lower-cased", lower, b"GET / HTTP/1.1\r\nHost: pod\r\nX-Mixed-Case: 1\r\nX-Request-Id: r1\r\n\r\n"),
        ("rewrite host", rewrite_host, b"GET / HTTP/1.1\r\nX-A: 1\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("hop-by-hop removed, te trailers kept", REWRITE, b"POST /s/M HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, TE, X-Secret\r\nKeep-Alive: 5\r\nProxy-Connection: x\r\nTE: trailers, deflate\r\nX-Secret: s\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\n"),
        ("connection content-length does not drop framing", REWRITE, b"POST /a HTTP/1.1\r\nHost: pod\r\nConnection: content-length, host, transfer-encoding\r\nContent-Length: 35\r\nX-Request-Id: r1\r\n\r\n"),
        ("forwarding fields of an untrusted client replaced", REWRITE, b"GET / HTTP/1.1\r\nHost: pod\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 203.0.113.10\r\nX-Forwarded-Proto: https\r\nVia: 1.1 edge\r\nX-Request-Id: r1\r\n\r\n"),
        ("via loop", REWRITE, b"GET / HTTP/1.1\r\nHost: pod\r\nVia: 1.1 edge, 1.1 amazing-proxy-1a2b3c4d\r\n\r\n"),
        ("chunked with codings kept", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\nX-Request-Id: r1\r\n\r\n"),
        ("chunked not final", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
        ("chunked twice", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("content-length with transfer-encoding", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("content-length twice, equal", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n"),
        ("content-length plus sign", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: +5\r\n\r\n"),
        ("content-length no-break space", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 5\xc2\xa0\r\n\r\n"),
        ("content-length nel", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length: 5\x85\r\n\r\n"),
        ("content-length with ows", REWRITE, b"POST / HTTP/1.1\r\nHost: pod\r\nContent-Length:\t 5 \r\nX-Request-Id: r1\r\n\r\n"),
        ("no host", REWRITE, b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"),
        ("two hosts", REWRITE, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("host with a space", REWRITE, b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        ("host ipv6 with port", REWRITE, b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\nX-Request-Id: r1\r\n\r\n"),
        ("absolute form", REWRITE, b"GET http://x:8080/p?q HTTP/1.1\r\nHost: other\r\nX-Request-Id: r1\r\n\r\n"),
        ("absolute form options empty path", REWRITE, b"OPTIONS http://x HTTP/1.1\r\nHost: x\r\nX-Request-Id: r1\r\n\r\n"),
        ("absolute form other scheme", REWRITE, b"GET ftp://x/p HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("http 1.2 as 1.1", REWRITE, b"GET / HTTP/1.2\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("http 2.0 request line", REWRITE, b"GET / HTTP/2.0\r\nHost: pod\r\n\r\n"),
        ("http 1.0 to hyper", REWRITE, b"GET / HTTP/1.0\r\n\r\n"),
        ("http 1.0 with transfer-encoding", REWRITE, b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("leading empty lines", REWRITE, b"\r\n\r\nGET / HTTP/1.1\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("lower-case method", REWRITE, b"get / HTTP/1.1\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("method not a token", REWRITE, b"G<T /a HTTP/1.1\r\nHost: pod\r\n\r\n"),
        ("upgrade to hyper", REWRITE, b"GET /ws HTTP/1.1\r\nHost: pod\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
        ("path in the form the app resolves", REWRITE, b"GET /public/./a/../%7Eb?x=/../y HTTP/1.1\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("path parameter on a dot segment", REWRITE, b"GET /public/..;/admin HTTP/1.1\r\nHost: pod\r\n\r\n"),
        ("path double encoded", REWRITE, b"GET /public/%252e%252e/admin HTTP/1.1\r\nHost: pod\r\n\r\n"),
        ("path overlong utf-8", REWRITE, b"GET /public/%c0%ae%c0%ae/admin HTTP/1.1\r\nHost: pod\r\n\r\n"),
        ("path above the root", REWRITE, b"GET /../admin HTTP/1.1\r\nHost: pod\r\n\r\n"),
        ("outbound path as written", outbound, b"GET /a%2Fb/../c HTTP/1.1\r\nHost: pod\r\nX-Request-Id: r1\r\n\r\n"),
        ("h2c upgrade not passed on", REWRITE, b"GET /public HTTP/1.1\r\nHost: pod\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Request-Id: r1\r\n\r\n"),
        ("owned fields from an untrusted client", REWRITE, OWNED),
        ("owned fields with two trusted hops", trusted, OWNED),
        ("owned fields for a verified peer", peer, OWNED),
        ("request id not well formed", REWRITE, b"GET / HTTP/1.1\r\nHost: pod\r\nX-Request-Id: <script>\r\n\r\n"),
        ("obs-fold", REWRITE, b"GET / HTTP/1.1\r\nHost: pod\r\nX-A: 1\r\n 2\r\n\r\n"),
        ("partial head", REWRITE, b"GET / HTTP/1.1\r\nHost: pod\r\n"),
    ]
}

fn response_cases() -> Vec<(&'static str, bool, &'static [u8])> {
    vec![
        ("plain", false, b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"),
        ("hop-by-hop removed", false, b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n"),
        ("chunked", false, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("content-length with transfer-encoding", false, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        ("final coding not chunked", false, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("no length", false, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"),
        ("connection content-length", false, b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n"),
        ("content-length plus sign", false, b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n"),
        ("content-length differing", false, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"),
        ("content-length repeated", false, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n"),
        ("http 1.0", false, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n"),
        ("connection close", false, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n"),
        ("head answer", true, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
        ("not modified", false, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ("continue", false, b"HTTP/1.1 100 Continue\r\n\r\n"),
        ("grpc status", false, b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\ngrpc-status: 14\r\nContent-Length: 0\r\n\r\n"),
    ]
}

fn chunked_cases() -> Vec<(&'static str, &'static [u8])> {
    vec![
        (
            "two chunks then the next request",
            b"4\r\nWiki\r\n5;ext=\"v\"\r\npedia\r\n0\r\n\r\nGET / HTTP/1.1\r\n",
        ),
        ("trailers", b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n"),
        ("bare lf after last chunk", b"0\r\n\n"),
        ("bare lf in extension", b"0;\n\r\n"),
        ("junk after size", b"5 junk\r\nhello\r\n0\r\n\r\n"),
        ("nul in extension", b"5;a\x00\r\nhello\r\n0\r\n\r\n"),
        ("trailer with bare lf", b"0\r\nx: y\n\r\n"),
        ("incomplete", b"5\r\nab"),
    ]
}

fn render_requests() -> String {
    let mut s = String::new();
    for (name, rw, input) in request_cases() {
        let mut buf = input.to_vec();
        let mut out = Vec::new();
        write!(s, "=== {name}\n--- in\n{}--- ", show(input)).unwrap();
        match plan_request(&mut buf, &rw, &mut out) {
            // Answered 400 by the caller: the head is never sent.
            Ok(plan) if plan.ambiguous.is_some() => writeln!(
                s,
                "ambiguous path {}: {}",
                plan.path,
                plan.ambiguous.map(|a| a.to_string()).unwrap_or_default()
            )
            .unwrap(),
            // Answered 508 by the driver: the head is never sent.
            Ok(plan) if plan.looped => {
                writeln!(s, "looped: {} {}", plan.method, plan.path).unwrap()
            }
            // Answered 400 by the driver: the head is never sent.
            Ok(plan) if !plan.authority_valid => {
                writeln!(s, "no valid authority: {} {}", plan.method, plan.path).unwrap()
            }
            Ok(plan) => {
                // A generated request id differs each run.
                let id = plan.request_id.to_str().unwrap();
                let mut head = String::from_utf8_lossy(&out).into_owned();
                if !show(input).contains(id) {
                    head = head.replace(id, "<generated>");
                }
                write!(
                    s,
                    "plan: head_len {} method {} path {} framing {:?} keep_alive {} grpc {}\n--- out\n{}",
                    plan.head_len,
                    plan.method,
                    plan.path,
                    plan.framing,
                    plan.keep_alive,
                    plan.grpc,
                    show(head.as_bytes())
                )
                .unwrap();
            }
            Err(verdict) => writeln!(s, "verdict: {verdict:?}").unwrap(),
        }
    }
    s
}

fn render_responses() -> String {
    let mut s = String::new();
    for (name, head_request, input) in response_cases() {
        let mut out = Vec::new();
        write!(
            s,
            "=== {name}{}\n--- in\n{}--- ",
            if head_request { " (to HEAD)" } else { "" },
            show(input)
        )
        .unwrap();
        match plan_response(input, head_request, true, false, &mut out) {
            Ok(Some(p)) => write!(
                s,
                "plan: head_len {} status {} interim {} framing {:?} upstream_reusable {} keep_alive {} grpc_status {:?}\n--- out\n{}",
                p.head_len,
                p.status,
                p.interim,
                p.framing,
                p.upstream_reusable,
                p.keep_alive,
                p.grpc_status,
                show(&out)
            )
            .unwrap(),
            Ok(None) => writeln!(s, "partial").unwrap(),
            Err(e) => writeln!(s, "{e:?}").unwrap(),
        }
    }
    s
}

fn render_chunked() -> String {
    let mut s = String::new();
    for (name, input) in chunked_cases() {
        let mut tracker = ChunkedTracker::default();
        let result = tracker.advance(input);
        write!(
            s,
            "=== {name}\n--- in\n{}--- end: {result:?}, payload {}\n",
            show(input),
            tracker.payload()
        )
        .unwrap();
    }
    s
}

fn check(name: &str, actual: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/http1");
    let path = dir.join(name);
    if std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden {}: {e}; run `UPDATE_GOLDENS=1 cargo test --test in_process http1_golden` to create it",
            path.display()
        )
    });
    if let Some((n, (e, a))) = expected
        .lines()
        .zip(actual.lines())
        .enumerate()
        .find(|(_, (e, a))| e != a)
    {
        panic!(
            "golden {} differs at line {}:\n- {e}\n+ {a}\nif the change is intended, run `UPDATE_GOLDENS=1 cargo test --test in_process http1_golden` and review the diff",
            path.display(),
            n + 1
        );
    }
    assert_eq!(
        expected.lines().count(),
        actual.lines().count(),
        "golden {} has a different number of lines; run `UPDATE_GOLDENS=1 cargo test --test in_process http1_golden` if intended",
        path.display()
    );
}

#[test]
fn request_goldens() {
    check("requests.txt", &render_requests());
}

#[test]
fn response_goldens() {
    check("responses.txt", &render_responses());
}

#[test]
fn chunked_goldens() {
    check("chunked.txt", &render_chunked());
}

/// The goldens hold what the planners say: a sanity check that they are not all verdicts.
#[test]
fn goldens_cover_every_framing() {
    let requests = render_requests();
    for framing in [Framing::None, Framing::Length(35), Framing::Chunked] {
        assert!(
            requests.contains(&format!("framing {framing:?}")),
            "{framing:?}"
        );
    }
    let responses = render_responses();
    assert!(responses.contains("framing UntilClose"));
}
