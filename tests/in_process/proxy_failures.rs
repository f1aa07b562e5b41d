//! Failures are explicit: each has its status, a one-line body, an access-log error kind with
//! whose fault it was, and a metric; none of them crashes or stalls other connections.

use std::sync::atomic::Ordering;

use crate::support::http::*;
use crate::support::metrics::metric;
use crate::support::process::*;
use crate::support::raw::*;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request with a known id, so that its access-log record can be found.
fn tagged(
    proxy: &Proxy,
    path: &str,
    id: &str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = get_request(proxy.inbound, path);
    req.headers_mut()
        .insert("x-request-id", id.parse().expect("request id header"));
    req
}

/// The proxy still serves a normal request.
async fn still_serves(proxy: &Proxy) {
    let reply = proxy.get("/echo?still=serving").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a normal request after the failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_refusing_connections_gives_502_logged_and_counted() {
    bounded("test", TEST_TIMEOUT, async {
        let down = ReservedPort::new();
        let proxy = Proxy::start(down.addr, &[]).await;
        let reply = send(proxy.inbound, tagged(&proxy, "/anything", "refused-1")).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        let body = reply.text();
        assert_eq!(body.lines().count(), 1, "one line: {body:?}");
        assert!(body.contains("refused"), "names the cause: {body:?}");

        let record = proxy.json_record("refused-1").await;
        assert_eq!(record["status"], 502);
        assert_eq!(record["error"], "connect_refused");
        assert_eq!(record["fault"], "app");

        let metrics = proxy.metrics().await;
        let errors = metric(
            &metrics,
            "amazing_proxy_errors_total",
            &[
                "direction=\"inbound\"",
                "kind=\"connect_refused\"",
                "fault=\"app\"",
            ],
        );
        assert_eq!(errors, Some(1.0), "errors counter in\n{metrics}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_closing_pooled_connections_never_reaches_the_client() {
    bounded("test", TEST_TIMEOUT, async {
        // Answers one request per connection, then closes it without saying `Connection: close`.
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_some() {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut conn = H1Conn::connect(proxy.inbound).await;
        for i in 0..100 {
            let reply = conn.send(get_request(proxy.inbound, "/")).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "request {i}: {}",
                reply.text()
            );
            assert_eq!(reply.text(), "ok");
        }
        assert!(app.connections.load(Ordering::SeqCst) >= 100);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_closing_a_pooled_connection_as_a_request_arrives_is_retried() {
    bounded("test", TEST_TIMEOUT, async {
        // The race made deterministic: the app answers a connection's first request, then closes
        // the connection when the next request arrives on it, without answering.
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_some() {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let _ = read_head(&mut stream).await;
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        for i in 0..5 {
            let reply = proxy.get("/").await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "request {i}: {}",
                reply.text()
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_app_gives_504_after_the_response_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--response-timeout", "300ms"]).await;
        let reply = send(proxy.inbound, tagged(&proxy, "/slow?ms=3000", "slow-1")).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            reply.text().contains("--response-timeout"),
            "{}",
            reply.text()
        );
        let record = proxy.json_record("slow-1").await;
        assert_eq!(record["error"], "response_timeout");
        assert_eq!(record["fault"], "app");
        still_serves(&proxy).await;
    })
    .await;
}

/// An app that accepts connections and never reads them, with a small receive buffer: what is
/// written to it stops being taken after a few KiB. Accepted connections stay open with it.
fn deaf_app() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("create a socket");
    // Inherited by the connections it accepts.
    listener.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    listener.bind(&any.into()).expect("bind");
    listener.listen(8).expect("listen");
    let addr = (listener.local_addr().expect("address").as_socket()).expect("an IP address");
    let listener: std::net::TcpListener = listener.into();
    // Ends when the test process does; holds one connection at a time, unread.
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept() {
            held.push(conn);
            if held.len() > 8 {
                held.remove(0);
            }
        }
    });
    (addr, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_never_reads_the_request_gives_504_after_the_response_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, _holder) = deaf_app();
        let flags = [
            "--response-timeout",
            "300ms",
            "--max-header-bytes",
            "16777216",
        ];
        let proxy = Proxy::start(app, &flags).await;
        // A head far larger than both sockets' buffers (8 MiB, under a raised
        // --max-header-bytes): the proxy's write of it has to wait on the app, which never
        // takes it.
        let mut request = tagged(&proxy, "/deaf", "deaf-1");
        let big = "a".repeat(8 * 1024 * 1024);
        request
            .headers_mut()
            .insert("x-big", big.parse().expect("header value"));
        let reply = send(proxy.inbound, request).await;
        assert_eq!(
            reply.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{}",
            reply.text()
        );
        assert!(
            reply.text().contains("--response-timeout"),
            "{}",
            reply.text()
        );
        let record = proxy.json_record("deaf-1").await;
        assert_eq!(record["error"], "response_timeout");
        assert_eq!(record["fault"], "app");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_app_gives_504_after_the_connect_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let hole = BlackHole::new();
        let proxy = Proxy::start(hole.addr, &["--connect-timeout", "300ms"]).await;
        let reply = send(proxy.inbound, tagged(&proxy, "/", "connect-timeout-1")).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            reply.text().contains("--connect-timeout"),
            "{}",
            reply.text()
        );
        let record = proxy.json_record("connect-timeout-1").await;
        assert_eq!(record["error"], "connect_timeout");
        assert_eq!(record["fault"], "app");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_app_gives_502() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_some() {
                let _ = stream.write_all(b"this is not HTTP\r\n\r\n").await;
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = send(proxy.inbound, tagged(&proxy, "/", "garbage-1")).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        let record = proxy.json_record("garbage-1").await;
        assert_eq!(record["error"], "upstream_protocol");
        assert_eq!(record["fault"], "app");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_cancels_the_apps_request_and_leaks_nothing() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-in-flight", "1"]).await;
        let mut client = TcpStream::connect(proxy.inbound).await.expect("connect");
        client
            .write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: gone-1\r\n\r\n")
            .await
            .expect("write the request");
        eventually("the app to get the request", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        drop(client);

        eventually("the app's request to be cancelled", WAIT, || async {
            (app.state.cancelled.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        proxy.wait_no_open_connections().await;
        // The in-flight slot was given back: with --max-in-flight 1, this would get 503 otherwise.
        still_serves(&proxy).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_before_the_response_is_logged_as_499() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut client = TcpStream::connect(proxy.inbound).await.expect("connect");
        client
            .write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\nX-Request-Id: gone-2\r\n\r\n")
            .await
            .expect("write the request");
        eventually("the app to get the request", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        drop(client);
        let record = proxy.json_record("gone-2").await;
        assert_eq!(record["status"], 499);
        assert_eq!(record["error"], "client_disconnected");
        assert_eq!(record["fault"], "client");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let response = raw_exchange(
            proxy.inbound,
            b"GET / HTTP/1.1\r\nHost: app.test\r\nthis line is not a header\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 400 "), "got {response:?}");
        assert_eq!(
            app.state.requests.load(Ordering::SeqCst),
            0,
            "nothing reached the app"
        );
        still_serves(&proxy).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-header-bytes", "8192"]).await;
        let big = "a".repeat(20 * 1024);
        let request = format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\n\r\n");
        let response = raw_exchange(proxy.inbound, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 431 "), "got {response:?}");
        assert_eq!(
            app.state.requests.load(Ordering::SeqCst),
            0,
            "nothing reached the app"
        );
        still_serves(&proxy).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_idle_ones_are_shed_and_busy_ones_refuse_with_503() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-connections", "1"]).await;
        let mut first = TcpStream::connect(proxy.inbound).await.expect("connect");
        first
            .write_all(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        let (head, _) = raw_read_response(&mut first).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");

        // The first connection is idle: a new client takes its place, and the idle one is closed.
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        let mut rest = Vec::new();
        let closed = first.read_to_end(&mut rest).await;
        assert!(matches!(closed, Ok(0)) || closed.is_err(), "{closed:?}");
        let shed = metric(
            &proxy.metrics().await,
            "amazing_proxy_shed_connections_total",
            &[],
        );
        assert_eq!(shed, Some(1.0));

        // A connection busy with a request is never shed: the newcomer gets 503 instead.
        let mut busy = TcpStream::connect(proxy.inbound).await.expect("connect");
        busy.write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write");
        eventually("the app to get the request", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        let refused = proxy.get("/echo").await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            refused.header("retry-after").is_some(),
            "{:?}",
            refused.headers
        );
        assert!(
            refused.text().contains("--max-connections"),
            "{}",
            refused.text()
        );
        drop(busy);
        // Once it is gone, a new connection is served.
        eventually("a new connection to be served", WAIT, || async {
            (proxy.get("/echo").await.status == StatusCode::OK).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_limit_get_503_with_retry_after() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-in-flight", "1"]).await;
        let inbound = proxy.inbound;
        let slow =
            tokio::spawn(async move { send(inbound, get_request(inbound, "/slow?ms=1500")).await });
        eventually("the slow request to reach the app", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;

        let refused = proxy.get("/echo").await;
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            refused.header("retry-after").is_some(),
            "{:?}",
            refused.headers
        );
        assert!(
            refused.text().contains("--max-in-flight"),
            "{}",
            refused.text()
        );

        let slow = bounded("the slow request", WAIT, slow)
            .await
            .expect("slow request task");
        assert_eq!(
            slow.status,
            StatusCode::OK,
            "the request in flight completes"
        );
        still_serves(&proxy).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_app_never_answers_does_not_stall_other_connections() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut stuck = TcpStream::connect(proxy.inbound).await.expect("connect");
        stuck
            .write_all(b"GET /hang HTTP/1.1\r\nHost: app.test\r\n\r\n")
            .await
            .expect("write the request");
        eventually("the hanging request to reach the app", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        for _ in 0..3 {
            still_serves(&proxy).await;
        }
        drop(stuck);
    })
    .await;
}
