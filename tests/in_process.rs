//! The data plane in process: `Shared::new` (the constructor `run` uses) and a `Listener` on
//! loopback, with no child process, as linkerd2-proxy and ztunnel test theirs.
//!
//! The parity table: each header case goes through both protocol adapters, the HTTP/1.1 fast path
//! and the hyper path (the same request with `Expect: 100-continue`, which the fast path hands to
//! hyper), and the app and the client must receive the same fields either way: the phases are
//! decided once, whichever adapter applies them.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::listener::Listener;
use amazing_proxy::telemetry::metrics::Direction;
use support::in_process::{Captured, run_args};
use support::raw::{Message, RawClient, Received, RecordingApp, Step};
use support::{TEST_TIMEOUT, bounded};
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
    let shared = Shared::new(&args, Box::new(Captured::default()));
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
    ("forwarded-for appended", "X-Forwarded-For: 203.0.113.9\r\n"),
    ("forwarded-proto kept", "X-Forwarded-Proto: https\r\n"),
    ("request id kept", "X-Request-Id: given-id\r\n"),
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
        assert_eq!(at_app.header("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
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
