//! Traffic policy under a hostile client (issue 19's phases, adversarially): what a client can
//! make the proxy hold (a route's concurrency slot, its queue) comes back when it leaves and is
//! bounded by the route's deadline, a `grpc-timeout` the client writes cannot stretch a route's
//! deadline (garbage, overflow), and each phase holds on every path. Outbound retries need
//! redirected connections: the retry rule's attacks are unit tests of `proxy::driver` (a retrying
//! route keeps a request's body streaming once its response is forwarded; a client's stalled body
//! is no mark against an endpoint; the backoff's ceiling) and the netns suite's `routes`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;

use crate::routes_phases::{self, Answer, proxy_with_routes};
use crate::support::http::{TestApp, echoed_header};
use crate::support::process::Proxy;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};

/// The body of a gRPC call's answer: the app's echo of the request.
fn echo(answer: &Answer) -> serde_json::Value {
    serde_json::from_slice(&answer.body)
        .unwrap_or_else(|e| panic!("the echo ({e}): {:?}", answer.body))
}

/// One request over a new connection ([`routes_phases::ask_with_body`]): a POST with a small body
/// when `fields` name a content type, else a GET.
async fn ask(proxy: &Proxy, http2: bool, target: &str, fields: &[(&str, &str)]) -> Answer {
    let grpc_call = fields.iter().any(|(name, _)| *name == "content-type");
    let body = grpc_call.then(|| Bytes::from_static(b"\0\0\0\0\0"));
    routes_phases::ask_with_body(proxy, http2, target, fields, body).await
}

/// `grpc-timeout` as gRPC writes it.
fn parse_grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("{value:?}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("{value:?}"),
    }
}

/// The one `grpc-timeout` the app was told.
fn told(answer: &Answer) -> Duration {
    let echo = echo(answer);
    let told = echoed_header(&echo, "grpc-timeout");
    assert_eq!(told.len(), 1, "one grpc-timeout at the app: {echo}");
    parse_grpc_timeout(&told[0])
}

/// A client writes whatever `grpc-timeout` it likes: on a route with a timeout, garbage (which
/// gRPC treats as no deadline) and the largest value the field can hold (8 digits of hours,
/// 11,000 years) leave the route's deadline in force, and the app is told at most that; on a
/// route without one, the largest value is taken without overflow; `0n` is already past.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_timeout_cannot_stretch_a_routes_deadline() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: capped\n    match: {pathPrefix: /capped}\n    timeout: 5s\n  - name: open\n    match: {pathPrefix: /open}\n    rateLimit: {requestsPerSecond: 1000}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let grpc = ("content-type", "application/grpc");
        for value in [
            "99999999H",
            "99999999M",
            "123456789S",
            "1x",
            "-1S",
            "1.5S",
            "S",
            "+5S",
            "18446744073709551615n",
        ] {
            let answer = ask(&proxy, true, "/capped", &[grpc, ("grpc-timeout", value)]).await;
            assert_eq!(answer.status, 200, "grpc-timeout: {value}");
            let told = told(&answer);
            assert!(
                told <= Duration::from_secs(5),
                "grpc-timeout {value:?}: the app was told {told:?}"
            );
        }
        let answer = ask(&proxy, true, "/open", &[grpc, ("grpc-timeout", "99999999H")]).await;
        assert_eq!(answer.status, 200);
        assert!(told(&answer) <= Duration::from_secs(99_999_999 * 3600));
        let past = ask(&proxy, true, "/capped", &[grpc, ("grpc-timeout", "0n")]).await;
        assert_eq!(past.header("grpc-status"), Some("4"), "DEADLINE_EXCEEDED");
        let record = proxy
            .wait_record(|r| r["route"] == "capped" && r["error"] == "route_timeout")
            .await;
        assert_eq!(record["grpc_status"], 4, "{record}");
    })
    .await;
}

/// GET over a new HTTP/1.1 connection: the status.
async fn raw_get(proxy: std::net::SocketAddr, target: &str) -> u16 {
    let tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect to the proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("an HTTP/1.1 connection");
    tokio::spawn(conn);
    let request = http::Request::get(target)
        .header("host", "app.test")
        .body(Full::new(Bytes::new()))
        .expect("a request");
    let response = bounded("a response", WAIT, sender.send_request(request))
        .await
        .expect("a response");
    let status = response.status().as_u16();
    let _ = bounded("the body", WAIT, response.into_body().collect()).await;
    status
}

/// A route's only slot, held by a request the app never answers, comes back when its client
/// leaves: over HTTP/1.1 (the fast path notices the client gone while it waits for the app's
/// head) and over HTTP/2 (the connection closed under the stream). Until then the route refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_slot_comes_back_when_its_client_leaves() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: one\n    concurrency: {max: 1}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let started = || app.state.started.load(Ordering::SeqCst);

        // HTTP/1.1: the slot taken, then the client gone.
        let mut client = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        client
            .write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("the request");
        eventually("the request at the app", WAIT, || async {
            (started() == 1).then_some(())
        })
        .await;
        assert_eq!(raw_get(proxy.inbound, "/slow?ms=1").await, 503, "one slot");
        drop(client);
        eventually("the slot back after HTTP/1.1", WAIT, || async {
            (raw_get(proxy.inbound, "/slow?ms=1").await == 200).then_some(())
        })
        .await;

        // HTTP/2: the same, the connection closed under the stream.
        let tcp = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("an HTTP/2 connection");
        let conn = tokio::spawn(conn);
        let request = http::Request::get("http://app.test/hang")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        let before = started();
        let hanging = tokio::spawn(async move { sender.send_request(request).await });
        eventually("the HTTP/2 request at the app", WAIT, || async {
            (started() > before).then_some(())
        })
        .await;
        assert_eq!(raw_get(proxy.inbound, "/slow?ms=1").await, 503, "one slot");
        hanging.abort();
        conn.abort();
        eventually("the slot back after HTTP/2", WAIT, || async {
            (raw_get(proxy.inbound, "/slow?ms=1").await == 200).then_some(())
        })
        .await;
        let refused = proxy
            .wait_metric(
                "amazing_proxy_route_concurrency_rejected_total",
                &["route=\"one\""],
                2.0,
            )
            .await;
        assert!(refused >= 2.0);
    })
    .await;
}

/// docs/security.md: "A route's `timeout` bounds the whole exchange, queueing and retries' waits
/// included; a client's `grpc-timeout` can shorten it". A request queued for a concurrency slot
/// waited out `queueTimeout` (5 s here) whatever its deadline (200 ms): then refused UNAVAILABLE
/// as if the route were full, or, had a slot come free, sent to the app past its deadline to be
/// cut at once. The deadline ends the wait: DEADLINE_EXCEEDED, and the app never sees the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_waits_no_longer_than_its_deadline() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: one-at-a-time\n    concurrency: {max: 1, queue: 4, queueTimeout: 5s}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let started = || app.state.started.load(Ordering::SeqCst);
        // The only slot, held by a request the app never answers.
        let mut holder = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        holder
            .write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("the request");
        eventually("the first request at the app", WAIT, || async {
            (started() == 1).then_some(())
        })
        .await;
        let fields = [
            ("content-type", "application/grpc"),
            ("grpc-timeout", "200m"),
        ];
        let queued = ask(&proxy, true, "/slow?ms=10", &fields).await;
        assert_eq!(
            queued.header("grpc-status"),
            Some("4"),
            "DEADLINE_EXCEEDED, not the queue's timeout (UNAVAILABLE)"
        );
        assert_eq!(started(), 1, "the app saw a call past its deadline");
        let record = proxy
            .wait_record(|r| r["route"] == "one-at-a-time" && r["error"].is_string())
            .await;
        assert_eq!(record["error"], "route_timeout", "{record}");
        assert_eq!(record["grpc_status"], 4, "{record}");
        proxy
            .wait_metric(
                "amazing_proxy_route_timeouts_total",
                &["route=\"one-at-a-time\""],
                1.0,
            )
            .await;
        drop(holder);
    })
    .await;
}

/// docs/routes.md: "an HTTP/1.1 [request queued for a concurrency slot] waits its turn (or
/// queueTimeout) and is then dropped with its connection". A queued request whose client has
/// gone is still sent to the app when its turn comes (the fast path only notices the client gone
/// once the request is written and it waits for the app's answer): an app already at its limit
/// does the work of a client that left, a POST included. HTTP/2 holds (the stream's reset takes
/// it out of the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_http1_request_whose_client_left_never_reaches_the_app() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: one-at-a-time\n    match: {pathPrefix: /slow}\n    concurrency: {max: 1, queue: 2, queueTimeout: 20s}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let started = || app.state.started.load(Ordering::SeqCst);
        let queued = "amazing_proxy_route_queued_total";
        let label = ["route=\"one-at-a-time\""];

        let holder = tokio::spawn(raw_get(proxy.inbound, "/slow?ms=1500"));
        eventually("the first request at the app", WAIT, || async {
            (started() == 1).then_some(())
        })
        .await;
        // Queued, then its client goes away.
        let mut gone = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        gone.write_all(b"POST /slow?ms=11 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .expect("the request");
        proxy.wait_metric(queued, &label, 1.0).await;
        drop(gone);
        // A live one queued behind it: served once the gone one's turn has passed.
        let behind = tokio::spawn(raw_get(proxy.inbound, "/slow?ms=300"));
        proxy.wait_metric(queued, &label, 2.0).await;
        assert_eq!(holder.await.expect("the first request"), 200);
        assert_eq!(behind.await.expect("the live queued request"), 200);
        assert_eq!(
            started(),
            2,
            "the app saw the request of a client that had gone while it was queued"
        );
    })
    .await;
}

/// docs/routes.md: "A gRPC request's `grpc-timeout` is honoured on a route and capped by the
/// route's `timeout`, and the app is sent the time left: every gRPC call on a route with a
/// deadline carries `grpc-timeout`". The proxy takes `application/grpc-web` as gRPC (its refusals
/// are gRPC's), and gRPC-Web comes over HTTP/1.1: on the fast path as on HTTP/2, a client asking
/// for an hour where the route allows 5 s is told at most 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_over_http1_is_told_the_routes_deadline() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes =
            "inbound:\n  - name: capped\n    match: {pathPrefix: /capped}\n    timeout: 5s\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let fields = [
            ("content-type", "application/grpc-web+proto"),
            ("grpc-timeout", "1H"),
        ];
        for http2 in [true, false] {
            let answer = ask(&proxy, http2, "/capped", &fields).await;
            assert_eq!(answer.status, 200, "http2: {http2}");
            let told = told(&answer);
            assert!(
                told <= Duration::from_secs(5),
                "http2: {http2}: the app was told {told:?}"
            );
        }
    })
    .await;
}
