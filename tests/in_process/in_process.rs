//! The data plane in process: `Shared::new` (the constructor `run` uses) and a `Listener` on
//! loopback, with no child process, as linkerd2-proxy and ztunnel test theirs.
//!
//! The parity table: each header case goes through both protocol adapters, the HTTP/1.1 fast path
//! and the hyper path (the same request with `Expect: 100-continue`, which the fast path hands to
//! hyper), and the app and the client must receive the same fields either way: the phases are
//! decided once, whichever adapter applies them.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::support::in_process::{Captured, run_args};
use crate::support::raw::{End, Message, RawClient, Received, RecordingApp, Step};
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::listener::Listener;
use amazing_proxy::telemetry::metrics::Direction;
use tokio::net::TcpListener;

/// A data plane on 127.0.0.1:0 forwarding to `app`; returns its address.
async fn data_plane(app: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<Shared>) {
    let args = run_args(&[
        "--app",
        &app.to_string(),
        "--proxy-mark",
        "0",
        "--access-log",
        "off",
    ]);
    let shared = Shared::new(&args.proxy_config(), Box::new(Captured::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(Listener::new(shared.clone(), listener, Direction::Inbound).run());
    (addr, shared)
}

/// The app answers every request with a response carrying hop-by-hop fields and its own Server.
fn app_answer(_: &Received) -> Vec<Step> {
    vec![Step::Write(
        b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nConnection: keep-alive, X-App-Hop\r\nX-App-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: yes\r\nContent-Length: 2\r\n\r\nok"
            .to_vec(),
    )]
}

/// Fields as a comparable map: lower-case names, repeated fields joined, and the values that
/// legitimately differ per request (a generated request id) or per framing reduced to presence.
fn normalised(message: &Message) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &message.fields {
        let name = name.to_ascii_lowercase();
        if name == "expect" || name == "date" {
            continue;
        }
        let value = if name == "x-request-id" && value.len() == 36 {
            "<generated>".to_owned()
        } else {
            value.clone()
        };
        map.entry(name)
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    map
}

/// The header cases: extra request fields, each sent with a 2-byte body.
const CASES: &[(&str, &str)] = &[
    ("plain", ""),
    ("forwarded-for replaced", "X-Forwarded-For: 203.0.113.9\r\n"),
    (
        "forwarded-for fields joined",
        "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 203.0.113.10\r\n",
    ),
    ("forwarded-proto replaced", "X-Forwarded-Proto: https\r\n"),
    (
        "forwarded removed",
        "Forwarded: for=203.0.113.9;proto=https\r\n",
    ),
    (
        "client cert removed",
        "X-Forwarded-Client-Cert: URI=spiffe://td/ns/a/sa/b\r\n",
    ),
    ("request id kept", "X-Request-Id: given-id\r\n"),
    ("request id replaced", "X-Request-Id: given id\r\n"),
    (
        "connection options removed",
        "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\n",
    ),
    (
        "connection never removes framing or host",
        "Connection: content-length, host\r\n",
    ),
    (
        "hop-by-hop fields removed",
        "Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n",
    ),
    ("te trailers kept", "TE: trailers\r\n"),
    ("via appended", "Via: 1.0 upstream-cache\r\n"),
];

async fn through(proxy: std::net::SocketAddr, extra: &str, expect: bool) -> Message {
    let expect = if expect {
        "Expect: 100-continue\r\n"
    } else {
        ""
    };
    let request = format!(
        "POST /parity HTTP/1.1\r\nHost: app.test\r\n{extra}{expect}Content-Length: 2\r\n\r\nhi"
    );
    let mut client = RawClient::connect(proxy).await;
    let mut response = client.exchange(request.as_bytes()).await;
    // A 100 Continue before the answer belongs to the hyper path's protocol, not to the answer.
    while response.status() == 100 {
        response = client.response().await.expect("the final response");
    }
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_adapters_apply_the_same_phases() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(app_answer).await;
        let (proxy, _shared) = data_plane(app.addr).await;
        for (case, extra) in CASES {
            let fast = through(proxy, extra, false).await;
            let hyper = through(proxy, extra, true).await;
            let requests = app.requests();
            let (at_app_fast, at_app_hyper) = (
                &requests[requests.len() - 2].message,
                &requests[requests.len() - 1].message,
            );
            assert_eq!(at_app_fast.body_text(), "hi", "{case}");
            assert_eq!(at_app_hyper.body_text(), "hi", "{case}");
            assert_eq!(
                normalised(at_app_fast),
                normalised(at_app_hyper),
                "{case}: the app received different fields from the two adapters\nfast path:\n{}\nhyper path:\n{}",
                at_app_fast.head,
                at_app_hyper.head
            );
            assert_eq!(fast.status(), 200, "{case}");
            assert_eq!(
                normalised(&fast),
                normalised(&hyper),
                "{case}: the client received different fields\nfast path:\n{}\nhyper path:\n{}",
                fast.head,
                hyper.head
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phases_decide_what_the_app_and_the_client_see() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(app_answer).await;
        let (proxy, shared) = data_plane(app.addr).await;
        let response = through(
            proxy,
            "X-Forwarded-For: 203.0.113.9\r\nConnection: X-Secret, content-length\r\nX-Secret: 1\r\n",
            false,
        )
        .await;
        let at_app = app.requests().remove(0).message;
        assert_eq!(at_app.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(at_app.header("content-length"), Some("2"));
        assert_eq!(at_app.header("x-secret"), None);
        let via = format!("1.1 {}", shared.settings.via.pseudonym());
        assert_eq!(at_app.header("via"), Some(via.as_str()));
        assert_eq!(response.header("server"), Some("amazing-proxy"));
        assert_eq!(response.header("x-app"), Some("yes"));
        assert_eq!(response.header("x-app-hop"), None);
        assert_eq!(response.header("keep-alive"), None);
        // Our own names in canonical case, the app's as it wrote them.
        assert!(response.head.contains("\r\nServer: amazing-proxy\r\n"), "{}", response.head);
        assert!(response.head.contains("\r\nX-App: yes\r\n"), "{}", response.head);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What a request may say: one table through the fast path, hyper's HTTP/1.1 and HTTP/2

/// How a case's request reaches the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// HTTP/1.1 as it comes: the fast path.
    FastPath,
    /// HTTP/1.1 with `Expect: 100-continue`, which the fast path hands to hyper.
    HyperHttp1,
    /// HTTP/2 with prior knowledge: hyper.
    Http2,
}

const TRANSPORTS: [Transport; 3] = [Transport::FastPath, Transport::HyperHttp1, Transport::Http2];
/// HTTP/1.1 only: connection-specific fields (`Connection`, `Upgrade`), request-line forms.
const HTTP1: &[Transport] = &[Transport::FastPath, Transport::HyperHttp1];
/// HTTP/2 only: rules of RFC 9113 that HTTP/1.1's syntax cannot express.
const HTTP2: &[Transport] = &[Transport::Http2];

/// What the app (or the client, when the proxy refuses) gets.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    App(AtApp),
    /// Answered by the proxy: status, the access log's `error` and the path it logs (`None`: the
    /// target as it came).
    Refused(u16, &'static str, Option<&'static str>),
}

/// A forwarded request: the target the app receives, and its forwarding fields (`None`: absent).
#[derive(Clone, Copy, Debug)]
struct AtApp {
    target: &'static str,
    forwarded_for: &'static str,
    forwarded_proto: &'static str,
    forwarded: Option<&'static str>,
    /// The request id the app gets: the client's (`Some`), else the one the case sent, or a new
    /// UUID when the case sent one not well formed.
    request_id: Option<&'static str>,
    /// The Host the app gets.
    host: &'static str,
    /// Other fields the app gets, each with its values line by line.
    fields: &'static [(&'static str, &'static [&'static str])],
}

struct Case {
    name: &'static str,
    target: &'static str,
    /// Extra request fields. Without an X-Request-Id among them, the case sends a unique valid
    /// one, by which its access-log record is found. A `Host` among them replaces HTTP/1.1's
    /// `Host: app.test` and joins HTTP/2's `:authority` (always `app.test`). `VIA_US` in a value
    /// stands for this proxy's own `Via` entry.
    fields: &'static [(&'static str, &'static str)],
    trusted_hops: u8,
    /// The paths the case runs through.
    transports: &'static [Transport],
    outcome: Outcome,
}

/// Stands for `1.1 <this proxy's pseudonym>` in a case's field value.
const VIA_US: &str = "<via us>";

/// Forwarded to `target` with the proxy's own forwarding fields.
const fn at_app(target: &'static str) -> AtApp {
    AtApp {
        target,
        forwarded_for: "127.0.0.1",
        forwarded_proto: "http",
        forwarded: None,
        request_id: None,
        host: "app.test",
        fields: &[],
    }
}

const fn app(target: &'static str) -> Outcome {
    Outcome::App(at_app(target))
}

const AMBIGUOUS: Outcome = Outcome::Refused(400, "ambiguous_path", None);

const fn case(name: &'static str, target: &'static str, outcome: Outcome) -> Case {
    Case {
        name,
        target,
        fields: &[],
        trusted_hops: 0,
        transports: &TRANSPORTS,
        outcome,
    }
}

const UNTRUSTED_FIELDS: &[(&str, &str)] = &[
    ("X-Forwarded-For", "203.0.113.1, 203.0.113.2"),
    ("X-Forwarded-For", "203.0.113.3"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=203.0.113.3;proto=https"),
    (
        "X-Forwarded-Client-Cert",
        "By=spiffe://cluster.local/ns/shop/sa/backend;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
    ),
];

/// The table. The data plane's policy allows `/public` (and below) only.
const PATH_AND_HEADER_CASES: &[Case] = &[
    case("a plain allowed path", "/public/a", app("/public/a")),
    case("dot segments removed", "/public/./a/../b", app("/public/b")),
    case(
        "unreserved characters decoded",
        "/public/%7Euser%2d1",
        app("/public/~user-1"),
    ),
    case(
        "reserved escapes kept, upper-cased",
        "/public/a%3bb%20c",
        app("/public/a%3Bb%20c"),
    ),
    case(
        "the query as it came",
        "/public/a?next=/../admin%2f",
        app("/public/a?next=/../admin%2f"),
    ),
    case(
        "judged as resolved",
        "/public/../admin",
        Outcome::Refused(403, "policy_denied", Some("/admin")),
    ),
    case(
        "parameter on a dot-dot segment",
        "/public/..;/admin",
        AMBIGUOUS,
    ),
    case("parameter on a dot segment", "/public/.;/admin", AMBIGUOUS),
    case(
        "encoded parameter on a dot-dot segment",
        "/public/..%3B/admin",
        AMBIGUOUS,
    ),
    case("encoded dots", "/public/%2e%2e/admin", AMBIGUOUS),
    case("double encoding", "/public/%252e%252e/admin", AMBIGUOUS),
    case("overlong utf-8", "/public/%c0%ae%c0%ae/admin", AMBIGUOUS),
    case("invalid utf-8", "/public/%ff", AMBIGUOUS),
    case("%u escapes", "/public/%u002e%u002e/admin", AMBIGUOUS),
    case(
        "encoded control character",
        "/public/..%09/admin",
        AMBIGUOUS,
    ),
    case("encoded nul", "/public/a%00", AMBIGUOUS),
    case("encoded delete", "/public/a%7F", AMBIGUOUS),
    case("encoded slash", "/public%2Fadmin", AMBIGUOUS),
    case("encoded backslash", "/public/%5c../admin", AMBIGUOUS),
    case("backslash", "/public\\..\\admin", AMBIGUOUS),
    case("malformed escape", "/public/%zz", AMBIGUOUS),
    case("above the root", "/../public/a", AMBIGUOUS),
    Case {
        fields: UNTRUSTED_FIELDS,
        ..case(
            "forwarding fields of an untrusted client replaced",
            "/public/h",
            app("/public/h"),
        )
    },
    Case {
        fields: UNTRUSTED_FIELDS,
        trusted_hops: 2,
        ..case(
            "two trusted hops",
            "/public/h",
            Outcome::App(AtApp {
                forwarded_for: "203.0.113.2, 203.0.113.3, 127.0.0.1",
                forwarded_proto: "https",
                forwarded: Some("for=203.0.113.3;proto=https"),
                ..at_app("/public/h")
            }),
        )
    },
    Case {
        fields: &[("X-Request-Id", "trace-1.a_b:c")],
        ..case(
            "a well-formed request id kept",
            "/public/r",
            Outcome::App(AtApp {
                request_id: Some("trace-1.a_b:c"),
                ..at_app("/public/r")
            }),
        )
    },
    Case {
        fields: &[("X-Request-Id", "<script>alert(1)</script>")],
        ..case(
            "a request id not well formed replaced",
            "/public/r",
            app("/public/r"),
        )
    },
    Case {
        fields: &[("X-Request-Id", "one"), ("X-Request-Id", "two")],
        ..case("two request ids replaced", "/public/r", app("/public/r"))
    },
    Case {
        fields: &[
            (
                "Connection",
                "x-forwarded-for, forwarded, x-forwarded-client-cert, x-forwarded-proto",
            ),
            ("X-Forwarded-For", "203.0.113.9"),
            ("Forwarded", "for=203.0.113.9"),
            ("X-Forwarded-Proto", "https"),
        ],
        trusted_hops: 2,
        transports: HTTP1,
        ..case(
            "connection options cannot remove the owned fields",
            "/public/c",
            Outcome::App(AtApp {
                forwarded_for: "203.0.113.9, 127.0.0.1",
                forwarded_proto: "https",
                forwarded: Some("for=203.0.113.9"),
                ..at_app("/public/c")
            }),
        )
    },
    Case {
        fields: &[
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
        ],
        transports: HTTP1,
        ..case(
            "an h2c upgrade is not passed on",
            "/public/u",
            app("/public/u"),
        )
    },
    Case {
        fields: &[("Via", VIA_US)],
        ..case(
            "a request that came round again",
            "/public/l",
            Outcome::Refused(508, "loop_detected", None),
        )
    },
    Case {
        fields: &[("Via", VIA_US), ("Content-Type", "application/grpc")],
        ..case(
            "a gRPC call that came round again, answered the gRPC way",
            "/public/l",
            Outcome::Refused(200, "loop_detected", None),
        )
    },
    Case {
        fields: &[("Content-Type", "application/grpc+proto")],
        ..case(
            "a gRPC call the policy refuses, answered the gRPC way",
            "/admin",
            Outcome::Refused(200, "policy_denied", None),
        )
    },
    Case {
        fields: &[("Host", "app.test"), ("Host", "app.test")],
        ..case(
            "two Host fields",
            "/public/h",
            Outcome::Refused(400, "bad_request", None),
        )
    },
    Case {
        fields: &[("Host", "app test")],
        ..case(
            "a Host that is no authority",
            "/public/h",
            Outcome::Refused(400, "bad_request", None),
        )
    },
    Case {
        fields: &[("Host", "other.test")],
        transports: HTTP2,
        ..case(
            "a host field that disagrees with :authority",
            "/public/h",
            Outcome::Refused(400, "bad_request", None),
        )
    },
    Case {
        fields: &[("Host", "other.test")],
        transports: HTTP1,
        ..case(
            "the Host of HTTP/1.1",
            "/public/h",
            Outcome::App(AtApp {
                host: "other.test",
                ..at_app("/public/h")
            }),
        )
    },
    Case {
        transports: HTTP1,
        ..case(
            "an absolute-form target's authority is the Host",
            "http://abs.test/public/h",
            Outcome::App(AtApp {
                host: "abs.test",
                ..at_app("/public/h")
            }),
        )
    },
    Case {
        fields: &[("X-Padded", " x ")],
        transports: HTTP2,
        ..case(
            "an HTTP/2 field value with whitespace around it",
            "/public/w",
            Outcome::Refused(400, "bad_request", None),
        )
    },
    Case {
        fields: &[("X-Padded", " x ")],
        transports: HTTP1,
        ..case(
            "HTTP/1.1's whitespace around a value is no part of it",
            "/public/w",
            Outcome::App(AtApp {
                fields: &[("x-padded", &["x"])],
                ..at_app("/public/w")
            }),
        )
    },
    Case {
        fields: &[("Cookie", "a=1"), ("Cookie", "b=2")],
        transports: HTTP2,
        ..case(
            "HTTP/2 cookie fields joined for an HTTP/1.1 app",
            "/public/c",
            Outcome::App(AtApp {
                fields: &[("cookie", &["a=1; b=2"])],
                ..at_app("/public/c")
            }),
        )
    },
];

/// A data plane whose policy allows every client `/public` only, with `--trusted-hops`; its
/// address and its access log.
async fn judged_plane(
    app: std::net::SocketAddr,
    trusted_hops: u8,
    dir: &std::path::Path,
) -> (std::net::SocketAddr, Captured, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let policy = dir.join(format!("policy-{}.yaml", addr.port()));
    std::fs::write(
        &policy,
        format!(
            "default: deny\nports:\n  - port: {}\n    allow:\n      - unauthenticated: true\n        paths:\n          - prefix: /public\n",
            // A connection to the listener itself stands for --app: the app's port is judged.
            app.port()
        ),
    )
    .expect("write the policy");
    let args = run_args(&[
        "--app",
        &app.to_string(),
        "--proxy-mark",
        "0",
        "--access-log",
        "json",
        "--trusted-hops",
        &trusted_hops.to_string(),
        "--policy",
        &policy.display().to_string(),
    ]);
    let log = Captured::default();
    let shared = Shared::new(&args.proxy_config(), Box::new(log.clone()));
    let via_us = format!("1.1 {}", shared.settings.via.pseudonym());
    tokio::spawn(Listener::new(shared, listener, Direction::Inbound).run());
    (addr, log, via_us)
}

/// Sends `POST target` with `fields` and a 2-byte body; returns the status and the `Server`.
async fn send(
    proxy: std::net::SocketAddr,
    transport: Transport,
    target: &str,
    fields: &[(&str, String)],
) -> (u16, Option<String>) {
    if transport == Transport::Http2 {
        return send_http2(proxy, target, fields).await;
    }
    let mut head = format!("POST {target} HTTP/1.1\r\n");
    if !fields
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        head.push_str("Host: app.test\r\n");
    }
    for (name, value) in fields {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if transport == Transport::HyperHttp1 {
        head.push_str("Expect: 100-continue\r\n");
    }
    head.push_str("Content-Length: 2\r\n\r\nhi");
    let mut client = RawClient::connect(proxy).await;
    let mut response = client.exchange(head.as_bytes()).await;
    while response.status() == 100 {
        response = client.response().await.expect("the final response");
    }
    (
        response.status(),
        response.header("server").map(str::to_owned),
    )
}

async fn send_http2(
    proxy: std::net::SocketAddr,
    target: &str,
    fields: &[(&str, String)],
) -> (u16, Option<String>) {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    let mut request = http::Request::post(format!("http://app.test{target}"))
        .body(Full::new(bytes::Bytes::from_static(b"hi")))
        .unwrap_or_else(|e| panic!("a request for {target:?}: {e}"));
    for (name, value) in fields {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("a name"),
            http::HeaderValue::from_str(value).expect("a value"),
        );
    }
    let response = bounded("an HTTP/2 response", WAIT, sender.send_request(request))
        .await
        .expect("a response");
    let status = response.status().as_u16();
    let server = response
        .headers()
        .get("server")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = bounded("the body", WAIT, response.into_body().collect()).await;
    (status, server)
}

/// Each case through each path: the status, what the app received (target, X-Forwarded-For,
/// X-Forwarded-Proto, Forwarded, x-forwarded-client-cert, X-Request-Id, no h2c upgrade) and the
/// one access-log record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_request_may_say_is_the_same_on_every_path() {
    bounded("test", TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let app = RecordingApp::start(app_answer).await;
        let mut planes = BTreeMap::new();
        for hops in [0, 2] {
            planes.insert(hops, judged_plane(app.addr, hops, dir.path()).await);
        }
        for (n, case) in PATH_AND_HEADER_CASES.iter().enumerate() {
            let (proxy, log, via_us) = &planes[&case.trusted_hops];
            for transport in TRANSPORTS {
                if !case.transports.contains(&transport) {
                    continue;
                }
                let what = format!("{} ({transport:?}, {:?})", case.name, case.target);
                let our_id = format!("case-{n}-{transport:?}");
                let mut fields: Vec<(&str, String)> = case
                    .fields
                    .iter()
                    .map(|(k, v)| (*k, v.replace(VIA_US, via_us)))
                    .collect();
                if !case
                    .fields
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("x-request-id"))
                {
                    fields.push(("X-Request-Id", our_id.clone()));
                }
                let before = app.requests().len();
                let (status, server) = send(*proxy, transport, case.target, &fields).await;
                assert_eq!(server.as_deref(), Some("amazing-proxy"), "{what}");
                let requests = app.requests();
                let record_id = match case.outcome {
                    Outcome::Refused(want, error, logged) => {
                        assert_eq!(status, want, "{what}");
                        assert_eq!(requests.len(), before, "{what}: the app got the request");
                        let record = log.record(|r| r["request_id"] == our_id.as_str()).await;
                        assert_eq!(record["error"], error, "{what}: {record}");
                        assert_eq!(record["method"], "POST", "{what}: {record}");
                        assert_eq!(record["status"], want, "{what}: {record}");
                        let url = record["original_url"].as_str().unwrap_or_default();
                        let logged = logged.unwrap_or(case.target);
                        assert!(url.ends_with(logged), "{what}: {record}");
                        continue;
                    }
                    Outcome::App(AtApp {
                        target,
                        forwarded_for,
                        forwarded_proto,
                        forwarded,
                        request_id,
                        host,
                        fields: fields_at_app,
                    }) => {
                        assert_eq!(status, 200, "{what}");
                        assert_eq!(requests.len(), before + 1, "{what}");
                        let at_app = &requests[before].message;
                        let head = &at_app.head;
                        assert_eq!(at_app.target(), target, "{what}\n{head}");
                        let joined = |name| at_app.headers(name).join(", ");
                        assert_eq!(joined("x-forwarded-for"), forwarded_for, "{what}\n{head}");
                        assert_eq!(
                            joined("x-forwarded-proto"),
                            forwarded_proto,
                            "{what}\n{head}"
                        );
                        assert_eq!(at_app.header("forwarded"), forwarded, "{what}\n{head}");
                        assert_eq!(at_app.headers("host"), [host], "{what}\n{head}");
                        for (name, values) in fields_at_app {
                            assert_eq!(at_app.headers(name), *values, "{what}\n{head}");
                        }
                        for absent in ["x-forwarded-client-cert", "upgrade", "http2-settings"] {
                            assert_eq!(at_app.header(absent), None, "{what}\n{head}");
                        }
                        let ids = at_app.headers("x-request-id");
                        assert_eq!(ids.len(), 1, "{what}\n{head}");
                        let id = ids[0].to_owned();
                        match request_id {
                            Some(kept) => assert_eq!(id, kept, "{what}"),
                            None if fields.iter().any(|(_, v)| *v == our_id) => {
                                assert_eq!(id, our_id, "{what}");
                            }
                            None => assert!(
                                id.len() == 36 && fields.iter().all(|(_, v)| *v != id),
                                "{what}: {id}"
                            ),
                        }
                        id
                    }
                };
                let record = log.record(|r| r["request_id"] == record_id.as_str()).await;
                assert_eq!(record["status"], 200, "{what}: {record}");
                assert!(record.get("error").is_none(), "{what}: {record}");
            }
        }
    })
    .await;
}

/// `Upgrade: h2c` on an allowed request never turns the app's connection into a tunnel: an app
/// that would switch protocols is not asked to, and the next request on the client's connection
/// is judged and logged like the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_never_lets_later_requests_skip_the_policy() {
    bounded("test", TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        // An app that switches whenever asked (and then reads on as before, as a tunnel would
        // carry whatever the client sends next).
        let app = RecordingApp::start(|r: &Received| {
            if r.message.header("upgrade").is_some() {
                vec![Step::Write(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                        .to_vec(),
                )]
            } else {
                app_answer(r)
            }
        })
        .await;
        let (proxy, log, _) = judged_plane(app.addr, 0, dir.path()).await;
        for expect in ["", "Expect: 100-continue\r\n"] {
            let mut client = RawClient::connect(proxy).await;
            let upgrade = format!(
                "POST /public/a HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n{expect}Content-Length: 2\r\n\r\nhi"
            );
            let mut first = client.exchange(upgrade.as_bytes()).await;
            while first.status() == 100 {
                first = client.response().await.expect("the final response");
            }
            assert_eq!(first.status(), 200, "{expect:?}: {}", first.head);
            let at_app = app.requests().pop().expect("the first request").message;
            assert_eq!(at_app.header("upgrade"), None, "{}", at_app.head);
            let second = client
                .exchange(b"GET /admin HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: after-h2c\r\n\r\n")
                .await;
            assert_eq!(second.status(), 403, "{expect:?}: {}", second.head);
            assert!(
                app.requests().iter().all(|r| r.message.target() != "/admin"),
                "the app got a request the policy refuses"
            );
            let record = log.record(|r| r["request_id"] == "after-h2c").await;
            assert_eq!(record["error"], "policy_denied", "{record}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// One retry rule on every path

/// A client connection on one of the paths, carrying requests one after the other.
enum Client {
    Http1(RawClient, bool),
    Http2(hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>),
}

impl Client {
    async fn open(proxy: std::net::SocketAddr, transport: Transport) -> Client {
        match transport {
            Transport::FastPath => Client::Http1(RawClient::connect(proxy).await, false),
            Transport::HyperHttp1 => Client::Http1(RawClient::connect(proxy).await, true),
            Transport::Http2 => {
                let tcp = tokio::net::TcpStream::connect(proxy)
                    .await
                    .expect("connect");
                let (sender, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await
                .expect("an HTTP/2 connection");
                tokio::spawn(conn);
                Client::Http2(sender)
            }
        }
    }

    /// `method target` with `id` as its X-Request-Id and `body` (empty: none); the status.
    async fn send(&mut self, method: &str, target: &str, id: &str, body: &str) -> u16 {
        match self {
            Client::Http1(raw, expect) => {
                let mut head = format!(
                    "{method} {target} HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: {id}\r\n"
                );
                if *expect {
                    head.push_str("Expect: 100-continue\r\n");
                }
                if !body.is_empty() {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                head.push_str("\r\n");
                head.push_str(body);
                let mut response = raw.exchange(head.as_bytes()).await;
                while response.status() == 100 {
                    response = raw.response().await.expect("the final response");
                }
                response.status()
            }
            Client::Http2(sender) => {
                use http_body_util::BodyExt;
                let request = http::Request::builder()
                    .method(method)
                    .uri(format!("http://app.test{target}"))
                    .header("x-request-id", id)
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_owned(),
                    )))
                    .expect("a request");
                let response = bounded("an HTTP/2 response", WAIT, sender.send_request(request))
                    .await
                    .expect("a response");
                let status = response.status().as_u16();
                let _ = bounded("the body", WAIT, response.into_body().collect()).await;
                status
            }
        }
    }
}

/// The app answers the first request of each connection and closes any later one without an
/// answer (the keep-alive race, every time); `/fresh-fail` it closes always.
fn closes_reused_connections(r: &Received) -> Vec<Step> {
    if r.nth >= 2 || r.message.target().starts_with("/fresh-fail") {
        vec![Step::Close]
    } else {
        app_answer(r)
    }
}

/// The same requests retry on the fast path, hyper's HTTP/1.1 and HTTP/2, by one rule
/// (`driver::may_retry`): once, on a fresh connection, only after a reused connection failed
/// without a byte of response, and only an idempotent request without a body. Judged from what the
/// app saw: each attempt's place on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_requests_retry_on_every_path() {
    bounded("test", TEST_TIMEOUT, async {
        let cases = [
            ("GET", "/public/get", "", true),
            ("DELETE", "/public/delete", "", true),
            ("POST", "/public/post", "", false),
            ("PUT", "/public/put-with-body", "hi", false),
            ("GET", "/fresh-fail", "", true),
        ];
        for transport in TRANSPORTS {
            let app = RecordingApp::start(closes_reused_connections).await;
            let (proxy, _shared) = data_plane(app.addr).await;
            // The data plane's first request goes on a fresh connection: its failure is the app's
            // answer, never retried.
            let mut client = Client::open(proxy, transport).await;
            let status = client.send("GET", "/fresh-fail", "first", "").await;
            let attempts = app.requests().len();
            assert_eq!(
                (status, attempts),
                (502, 1),
                "{transport:?}: a fresh connection's failure"
            );
            for (n, (method, target, body, retried_when_reused)) in cases.iter().enumerate() {
                let what = format!("{method} {target} ({transport:?})");
                let mut client = Client::open(proxy, transport).await;
                // The first request opens an app connection, which the next one may reuse.
                let warm = format!("warm-{n}-{transport:?}");
                assert_eq!(
                    client.send("GET", "/public/warm", &warm, "").await,
                    200,
                    "{what}"
                );
                let id = format!("retry-{n}-{transport:?}");
                let status = client.send(method, target, &id, body).await;
                let attempts: Vec<(usize, usize)> = app
                    .requests()
                    .iter()
                    .filter(|r| r.message.header("x-request-id") == Some(id.as_str()))
                    .map(|r| (r.connection, r.nth))
                    .collect();
                assert!(!attempts.is_empty(), "{what}: the app never saw it");
                let first_reused = attempts[0].1 >= 2;
                if transport == Transport::FastPath {
                    // The fast path keeps its app connection for the client's next request.
                    assert!(first_reused, "{what}: {attempts:?}");
                }
                let want_attempts = if first_reused && *retried_when_reused {
                    2
                } else {
                    1
                };
                assert_eq!(attempts.len(), want_attempts, "{what}: {attempts:?}");
                if want_attempts == 2 {
                    assert_eq!(
                        attempts[1].1, 1,
                        "{what}: not retried on a fresh connection: {attempts:?}"
                    );
                }
                let answered = attempts.last().is_some_and(|&(_, nth)| nth == 1)
                    && !target.starts_with("/fresh-fail");
                let want = if answered { 200 } else { 502 };
                assert_eq!(status, want, "{what}: {attempts:?}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Extended CONNECT (RFC 8441) towards an HTTP/1.1 app

/// An HTTP/1.1 app that accepts a WebSocket handshake, greets, and then waits.
fn accepts_websockets(r: &Received) -> Vec<Step> {
    if r.message.header("upgrade") == Some("websocket") {
        vec![
            Step::Write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello"
                    .to_vec(),
            ),
            Step::Hang,
        ]
    } else {
        app_answer(r)
    }
}

/// An HTTP/2 client connection to `addr` (prior knowledge), driven by a task of its own.
async fn h2_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    sender
}

/// An extended CONNECT (RFC 8441) for `/public/ws` with this `:protocol`.
fn websocket_connect(protocol: &'static str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://app.test/public/ws")
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("a request");
    (request.extensions_mut()).insert(hyper::ext::Protocol::from_static(protocol));
    request
}

/// An HTTP/1.1 app that answers a WebSocket handshake 200 has not switched protocols: the
/// client's extended CONNECT gets 502, the app's fault in the record (its stream was reset and the
/// client blamed, as if it had gone away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_to_an_http1_app_that_does_not_switch_is_502() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(app_answer).await;
        let proxy =
            crate::support::process::Proxy::start(app.addr, &["--access-log", "json"]).await;
        let mut sender = h2_client(proxy.inbound).await;
        let response = bounded(
            "an answer",
            WAIT,
            sender.send_request(websocket_connect("websocket")),
        )
        .await
        .expect("a response, not a reset");
        assert_eq!(response.status(), 502);
        let record = proxy.wait_record(|r| r["method"] == "CONNECT").await;
        assert_eq!(record["fault"], "app", "{record}");
    })
    .await;
}

/// A WebSocket opened over HTTP/2 reaches an HTTP/1.1 app as RFC 6455's handshake (a GET with
/// `Upgrade: websocket` and a key of the proxy's), the app's 101 reaches the client as the 200
/// RFC 8441 asks for, and bytes flow; a `:protocol` with no HTTP/1.1 form is refused (400) and
/// never reaches the app (on 019271f it went as a bare CONNECT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_connect_reaches_an_http1_app_as_a_websocket_handshake() {
    use tokio::io::AsyncReadExt;
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(accepts_websockets).await;
        let (proxy, _shared) = data_plane(app.addr).await;
        let mut sender = h2_client(proxy).await;
        let connect = websocket_connect;

        let refused = bounded(
            "a refusal",
            WAIT,
            sender.send_request(connect("connect-udp")),
        )
        .await
        .expect("a response");
        assert_eq!(refused.status(), 400);
        assert!(app.requests().is_empty(), "{:?}", app.requests());

        let mut response = bounded("the 200", WAIT, sender.send_request(connect("websocket")))
            .await
            .expect("a response");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers().get("sec-websocket-accept"), None);
        assert_eq!(response.headers().get("upgrade"), None);
        let at_app = app.requests().remove(0).message;
        let head = &at_app.head;
        assert!(head.starts_with("GET /public/ws HTTP/1.1\r\n"), "{head}");
        assert_eq!(at_app.header("upgrade"), Some("websocket"), "{head}");
        assert_eq!(at_app.header("connection"), Some("upgrade"), "{head}");
        assert_eq!(at_app.header("sec-websocket-version"), Some("13"), "{head}");
        let key = at_app.header("sec-websocket-key").unwrap_or_default();
        assert_eq!(key.len(), 24, "a base64 16-byte key: {head}");
        let upgraded = bounded("the tunnel", WAIT, hyper::upgrade::on(&mut response))
            .await
            .expect("the stream turns into a tunnel");
        let mut tunnel = hyper_util::rt::TokioIo::new(upgraded);
        let mut greeting = [0u8; 5];
        bounded("the app's bytes", WAIT, tunnel.read_exact(&mut greeting))
            .await
            .expect("read");
        assert_eq!(&greeting, b"hello");
    })
    .await;
}

/// An upgraded connection that the client resets is logged as the client's failure
/// (`tcp_client_reset`), as opaque TCP is; on 019271f every failure of an upgraded connection was
/// `tcp_io`, the app's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_reset_by_its_client_is_the_clients_failure() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded("test", TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let app = RecordingApp::start(accepts_websockets).await;
        let (proxy, log, _) = judged_plane(app.addr, 0, dir.path()).await;
        let mut client = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect");
        client
            .write_all(b"GET /public/ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Request-Id: reset-tunnel\r\n\r\n")
            .await
            .expect("write");
        let mut seen = Vec::new();
        bounded("the 101 and the app's bytes", WAIT, async {
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"hello") {
                let n = client.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        assert!(seen.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&seen));
        // A reset, not a close: SO_LINGER 0.
        client.set_zero_linger().expect("linger");
        drop(client);
        let record = log.record(|r| r["request_id"] == "reset-tunnel").await;
        assert_eq!(record["error"], "tcp_client_reset", "{record}");
        assert_eq!(record["status"], 101, "{record}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// One meaning for each timeout flag

/// A data plane with `flags` added, its address and its access log.
async fn plane_with(app: std::net::SocketAddr, flags: &[&str]) -> (std::net::SocketAddr, Captured) {
    let mut args = vec![
        "--app",
        &app.to_string(),
        "--proxy-mark",
        "0",
        "--access-log",
        "json",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    args.extend(flags.iter().map(|f| (*f).to_owned()));
    let args = run_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = Captured::default();
    let shared = Shared::new(&args.proxy_config(), Box::new(log.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(Listener::new(shared, listener, Direction::Inbound).run());
    (addr, log)
}

/// On a connection the hyper path serves (after an `Expect` hand-over) `--idle-timeout` bounds
/// the wait between requests and `--header-timeout` a head from its first byte, as on the fast
/// path: a keep-alive connection idle longer than the head timeout still takes a request (on
/// 019271f hyper's head timer closed it), and a head that trickles is cut and logged as 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hyper_path_bounds_idle_and_heads_as_the_fast_path_does() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(app_answer).await;
        let (proxy, log) =
            plane_with(app.addr, &["--header-timeout", "1s", "--idle-timeout", "30s"]).await;
        let mut client = RawClient::connect(proxy).await;
        let mut first = client
            .exchange(b"POST /a HTTP/1.1\r\nHost: app.test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        while first.status() == 100 {
            first = client.response().await.expect("the final response");
        }
        assert_eq!(first.status(), 200);
        // Idle for longer than --header-timeout, well within --idle-timeout.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let second = client
            .exchange(b"GET /b HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await;
        assert_eq!(second.status(), 200, "{}", second.head);

        // A head that starts and never ends, on the same connection.
        client.send(b"GET /d HTTP/1.1\r\nHost: app").await;
        let (rest, end) = client.rest(WAIT).await;
        assert!(matches!(end, End::Closed), "{}", String::from_utf8_lossy(&rest));
        let record = log
            .record(|r| r["error"] == "request_timeout")
            .await;
        assert_eq!(record["status"], 408, "{record}");
    })
    .await;
}

/// A client that opens its flow-control window at zero and never reads holds a response (and the
/// app connection behind it) no longer than twice `--response-body-timeout`: then its
/// connection is closed, as nginx's send_timeout does (on 019271f it held them for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_lets_go_of_its_response() {
    bounded("test", TEST_TIMEOUT, async {
        let app = crate::support::http::TestApp::start().await;
        let (proxy, log) = plane_with(app.addr, &["--response-body-timeout", "1s"]).await;
        let tcp = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .initial_stream_window_size(0)
                .initial_connection_window_size(65_535)
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                    tcp,
                ))
                .await
                .expect("an HTTP/2 connection");
        let connection = tokio::spawn(conn);
        let request = http::Request::get("http://app.test/stream?bytes=4194304")
            .header("x-request-id", "never-reads")
            .body(http_body_util::Empty::new())
            .expect("a request");
        let response = bounded("the head", WAIT, sender.send_request(request))
            .await
            .expect("a response head");
        assert_eq!(response.status(), 200);
        // The body is never read; the proxy closes the connection.
        let _ = bounded("the proxy closing the connection", WAIT, connection).await;
        let record = log.record(|r| r["request_id"] == "never-reads").await;
        assert_eq!(record["error"], "client_disconnected", "{record}");
        drop(response);
    })
    .await;
}

/// The same bound on HTTP/1.1, on the fast path and on the hyper path: a client that never reads
/// its response lets go of it after twice `--response-body-timeout` (on 019271f the fast path
/// waited on the write for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_never_reads_lets_go_of_its_response() {
    use tokio::io::AsyncWriteExt;
    bounded("test", TEST_TIMEOUT, async {
        let app = crate::support::http::TestApp::start().await;
        let (proxy, log) = plane_with(app.addr, &["--response-body-timeout", "1s"]).await;
        let mut clients = Vec::new();
        for (id, expect) in [("never-reads-fast", ""), ("never-reads-hyper", "Expect: 100-continue\r\nContent-Length: 0\r\n")] {
            let mut client = tokio::net::TcpStream::connect(proxy).await.expect("connect");
            let request = format!(
                "GET /stream?bytes=268435456 HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: {id}\r\n{expect}\r\n"
            );
            client.write_all(request.as_bytes()).await.expect("write");
            // Never read.
            clients.push(client);
        }
        for id in ["never-reads-fast", "never-reads-hyper"] {
            let record = log.record(|r| r["request_id"] == id).await;
            assert_eq!(record["error"], "client_disconnected", "{record}");
        }
        drop(clients);
    })
    .await;
}

/// A gRPC status the app sends in its trailers is the record's on every path (on 019271f the
/// fast path read only the response head's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_status_in_trailers_is_recorded_on_every_path() {
    bounded("test", TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let app = RecordingApp::start(|_: &Received| {
            vec![Step::Write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n2\r\nok\r\n0\r\ngrpc-status: 7\r\ngrpc-message: denied\r\n\r\n"
                    .to_vec(),
            )]
        })
        .await;
        let (proxy, log, _) = judged_plane(app.addr, 0, dir.path()).await;
        for transport in TRANSPORTS {
            let id = format!("trailers-{transport:?}");
            let (status, _) = send(
                proxy,
                transport,
                "/public/grpc",
                &[("X-Request-Id", id.clone()), ("TE", "trailers".to_owned())],
            )
            .await;
            assert_eq!(status, 200, "{transport:?}");
            let record = log.record(|r| r["request_id"] == id.as_str()).await;
            assert_eq!(record["grpc_status"], 7, "{transport:?}: {record}");
        }
    })
    .await;
}

/// With HTTP/2 to the app, clients that stop reading cannot take the window of the app connection
/// they share with others: a client with eight streams whose windows it keeps at zero, each
/// asking for a large body, and then another client's request over the same app connection gets
/// its whole response (on f5f54ef hyper's 5 MiB connection window went to the eight stalled
/// streams and the other client waited until they were cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_leave_the_shared_app_connection_to_the_others() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const STALLED: usize = 8;
    bounded("test", TEST_TIMEOUT, async {
        let started = Arc::new(AtomicUsize::new(0));
        let (app, _app) = http2_streaming_app(started.clone()).await;
        let (proxy, _log) = plane_with(
            app,
            &["--app-protocol", "http2", "--response-body-timeout", "120s"],
        )
        .await;
        let h2 = |window: u32| async move {
            let tcp = tokio::net::TcpStream::connect(proxy)
                .await
                .expect("connect");
            let (sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(window)
                    .handshake::<_, http_body_util::Empty<bytes::Bytes>>(
                        hyper_util::rt::TokioIo::new(tcp),
                    )
                    .await
                    .expect("an HTTP/2 connection");
            (
                sender,
                crate::support::http::AbortOnDrop(tokio::spawn(async move {
                    let _ = conn.await;
                })),
            )
        };
        let get = |path: &str| {
            http::Request::get(format!("http://app.test{path}"))
                .body(http_body_util::Empty::new())
                .expect("a request")
        };
        let (mut stalled, _stalled_conn) = h2(0).await;
        let mut heads = Vec::new();
        for _ in 0..STALLED {
            let response = bounded(
                "a stalled stream's head",
                WAIT,
                stalled.send_request(get("/stream?bytes=4194304")),
            )
            .await
            .expect("a response head");
            heads.push(response);
        }
        while started.load(Ordering::SeqCst) < STALLED {
            tokio::task::yield_now().await;
        }
        let (mut other, _other_conn) = h2(1024 * 1024).await;
        let response = bounded(
            "the other client's head",
            WAIT,
            other.send_request(get("/stream?bytes=1048576")),
        )
        .await
        .expect("a response head");
        assert_eq!(response.status(), 200);
        let body = bounded(
            "the other client's body",
            WAIT,
            response.into_body().collect(),
        )
        .await
        .expect("the body")
        .to_bytes();
        assert_eq!(body.len(), 1024 * 1024);
        drop(heads);
    })
    .await;
}

/// An HTTP/2-only app: `/stream?bytes=N` answers N bytes; `started` counts the requests answered.
async fn http2_streaming_app(
    started: Arc<std::sync::atomic::AtomicUsize>,
) -> (std::net::SocketAddr, crate::support::http::AbortOnDrop) {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the app");
    let app = listener.local_addr().expect("app address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let started = started.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let started = started.clone();
                        async move {
                            let bytes: u64 = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("bytes="))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            started.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                crate::support::http::pattern_body(bytes),
                            ))
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (app, crate::support::http::AbortOnDrop(task))
}
