//! Issue 19, the inbound route phases through the proxy binary, on both HTTP paths (the HTTP/1.1
//! fast path, and hyper's HTTP/2): a rate limit answers 429 with `Retry-After` (gRPC:
//! RESOURCE_EXHAUSTED), a full concurrency limit 503 with `Retry-After` (gRPC: UNAVAILABLE) and
//! its queue waits, a route's timeout 504 (gRPC: DEADLINE_EXCEEDED, `grpc-timeout` honoured and
//! the app told what is left), the record names the route, and the file is reloaded (a broken
//! one keeps the last good routes and says so on `/ready` and in a metric). Outbound routes
//! (retries, endpoints, balancing) need redirected connections: the netns suite's `routes`.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::http::TestApp;
use crate::support::process::Proxy;
use crate::support::{WAIT, bounded, eventually};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A proxy in front of `app` with this routes file (kept in `dir`), speaking HTTP/1.1 to the app
/// whatever the client speaks (retry_attacks.rs uses it too).
pub(crate) async fn proxy_with_routes(
    app: &TestApp,
    dir: &tempfile::TempDir,
    routes: &str,
) -> Proxy {
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, routes).expect("write the routes file");
    Proxy::builder(app.addr)
        .args(["--app-protocol", "http1"])
        .args(["--routes", path.to_str().expect("a UTF-8 path")])
        .start()
        .await
}

/// What a response said.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One GET over a new connection: HTTP/1.1 (the fast path) or HTTP/2 prior knowledge.
async fn ask(proxy: &Proxy, http2: bool, target: &str, fields: &[(&str, &str)]) -> Answer {
    ask_with_body(proxy, http2, target, fields, None).await
}

/// One request over a new connection, as [`ask`]: a POST of `body` when there is one, else a GET.
pub(crate) async fn ask_with_body(
    proxy: &Proxy,
    http2: bool,
    target: &str,
    fields: &[(&str, &str)],
    body: Option<Bytes>,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(proxy.inbound)
        .await
        .expect("connect to the proxy");
    // HTTP/2 has `:authority`; HTTP/1.1 an origin-form target and Host.
    let uri = if http2 {
        format!("http://app.test{target}")
    } else {
        target.to_owned()
    };
    let method = if body.is_some() {
        http::Method::POST
    } else {
        http::Method::GET
    };
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "app.test")
        .body(Full::new(body.unwrap_or_default()))
        .unwrap_or_else(|e| panic!("a request for {target:?}: {e}"));
    if http2 {
        request.headers_mut().remove("host");
    }
    for (name, value) in fields {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).expect("a name"),
            http::HeaderValue::from_str(value).expect("a value"),
        );
    }
    let response = if http2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("an HTTP/2 connection");
        tokio::spawn(conn);
        bounded("an HTTP/2 response", WAIT, sender.send_request(request)).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("an HTTP/1.1 connection");
        tokio::spawn(conn);
        bounded("an HTTP/1.1 response", WAIT, sender.send_request(request)).await
    }
    .expect("a response");
    let (parts, body) = response.into_parts();
    let collected = bounded("the body", WAIT, body.collect())
        .await
        .expect("the body");
    let mut headers = parts.headers;
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    Answer {
        status: parts.status.as_u16(),
        headers,
        body: collected.to_bytes(),
    }
}

const GRPC: (&str, &str) = ("content-type", "application/grpc");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_rate_limit_answers_429_with_retry_after_on_every_path() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        // One request, then one per 1000 s: every later request in this test is refused.
        let routes = "inbound:\n  - name: limited\n    match: {pathPrefix: /limited}\n    rateLimit: {requestsPerSecond: 0.001, burst: 1}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;

        let first = ask(&proxy, false, "/limited/a", &[]).await;
        assert_eq!(first.status, 200);
        // Another path takes no route: never limited.
        assert_eq!(ask(&proxy, false, "/other", &[]).await.status, 200);
        for http2 in [false, true] {
            let refused = ask(&proxy, http2, "/limited/b", &[]).await;
            assert_eq!(refused.status, 429, "http2: {http2}");
            assert_eq!(refused.header("server"), Some("amazing-proxy"));
            let retry_after: u64 = (refused.header("retry-after"))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("Retry-After in {:?}", refused.headers));
            // The bucket refills one request per 1000 s.
            assert!(retry_after >= 900, "Retry-After: {retry_after}");
            assert!(
                String::from_utf8_lossy(&refused.body).contains("rate limited"),
                "{:?}",
                refused.body
            );
        }
        let grpc = ask(&proxy, true, "/limited/c", &[GRPC]).await;
        assert_eq!(grpc.status, 200);
        assert_eq!(grpc.header("grpc-status"), Some("8"), "RESOURCE_EXHAUSTED");
        // The app saw the first /limited request and /other only.
        assert_eq!(
            app.state.requests.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
        let record = proxy
            .wait_record(|r| r["path"] == "/limited/b" || r["original_url"].as_str().is_some_and(|u| u.ends_with("/limited/b")))
            .await;
        assert_eq!(record["error"], "rate_limited", "{record}");
        assert_eq!(record["route"], "limited", "{record}");
        let metric = proxy
            .wait_metric(
                "amazing_proxy_route_rate_limited_total",
                &["route=\"limited\""],
                3.0,
            )
            .await;
        assert!(metric >= 3.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_concurrency_limit_answers_503_and_its_queue_waits() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: one-at-a-time\n    match: {path: /slow}\n    concurrency: {max: 1, queue: 1, queueTimeout: 20s}\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        let started = || app.state.started.load(std::sync::atomic::Ordering::SeqCst);

        // One in flight (the app holds it 2 s), one queued behind it: the third is refused, on
        // either path.
        let holder = {
            let proxy_addr = proxy.inbound;
            tokio::spawn(async move { raw_get(proxy_addr, "/slow?ms=2000").await })
        };
        eventually("the first request at the app", WAIT, || async {
            (started() == 1).then_some(())
        })
        .await;
        let queued = {
            let proxy_addr = proxy.inbound;
            tokio::spawn(async move { raw_get(proxy_addr, "/slow?ms=10").await })
        };
        proxy
            .wait_metric(
                "amazing_proxy_route_queued_total",
                &["route=\"one-at-a-time\""],
                1.0,
            )
            .await;
        for (http2, fields) in [(false, &[][..]), (true, &[][..]), (true, &[GRPC][..])] {
            let refused = ask(&proxy, http2, "/slow?ms=10", fields).await;
            if fields.is_empty() {
                assert_eq!(refused.status, 503, "http2: {http2}");
                assert!(refused.header("retry-after").is_some(), "{:?}", refused.headers);
                assert_eq!(refused.header("server"), Some("amazing-proxy"));
            } else {
                assert_eq!(refused.header("grpc-status"), Some("14"), "UNAVAILABLE");
            }
        }
        assert_eq!(holder.await.expect("the first request"), 200);
        // The queued one went once the first was done.
        assert_eq!(queued.await.expect("the queued request"), 200);
        assert_eq!(started(), 2, "the refused requests never reached the app");
        let record = proxy
            .wait_record(|r| r["error"] == "concurrency_limited")
            .await;
        assert_eq!(record["route"], "one-at-a-time", "{record}");
        assert_eq!(record["status"], 503, "{record}");
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
    let response = sender.send_request(request).await.expect("a response");
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_timeout_answers_504_and_grpc_timeout_is_honoured() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: quick\n    match: {pathPrefix: /slow}\n    timeout: 300ms\n  - name: echo\n    match: {pathPrefix: /echo}\n    timeout: 5s\n  - name: drip\n    match: {pathPrefix: /drip}\n    timeout: 500ms\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        for http2 in [false, true] {
            let cut = ask(&proxy, http2, "/slow?ms=5000", &[]).await;
            assert_eq!(cut.status, 504, "http2: {http2}");
            assert_eq!(cut.header("server"), Some("amazing-proxy"));
        }
        let grpc = ask(&proxy, true, "/slow?ms=5000", &[GRPC]).await;
        assert_eq!(grpc.header("grpc-status"), Some("4"), "DEADLINE_EXCEEDED");
        // A grpc-timeout shorter than the route's is the deadline.
        let short = ask(&proxy, true, "/slow?ms=5000", &[GRPC]).await;
        assert_eq!(short.header("grpc-status"), Some("4"));
        let record = proxy.wait_record(|r| r["error"] == "route_timeout").await;
        assert_eq!(record["route"], "quick", "{record}");
        assert_eq!(record["status"], 504, "{record}");

        // A grpc-timeout longer than the route's is capped: the app is told at most 5 s.
        let echoed = ask(&proxy, true, "/echo", &[GRPC, ("grpc-timeout", "60S")]).await;
        assert_eq!(echoed.status, 200);
        let echo: serde_json::Value = serde_json::from_slice(&echoed.body).expect("the echo");
        let told = crate::support::http::echoed_header(&echo, "grpc-timeout");
        let told = told.first().unwrap_or_else(|| panic!("grpc-timeout at the app: {echo}"));
        let told = parse_grpc_timeout(told);
        assert!(
            told <= Duration::from_secs(5) && told > Duration::from_secs(1),
            "the app was told {told:?}"
        );
        // One shorter than the route's is what the app is told (less what has passed).
        let echoed = ask(&proxy, true, "/echo", &[GRPC, ("grpc-timeout", "2S")]).await;
        let echo: serde_json::Value = serde_json::from_slice(&echoed.body).expect("the echo");
        let told = crate::support::http::echoed_header(&echo, "grpc-timeout");
        let told = parse_grpc_timeout(told.first().expect("grpc-timeout at the app"));
        assert!(told <= Duration::from_secs(2), "the app was told {told:?}");

        // The route's timeout covers the body too: a response that drips past it is cut.
        let tcp = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1");
        tokio::spawn(conn);
        let response = sender
            .send_request(
                http::Request::get("/drip?chunks=20&ms=100")
                    .header("host", "app.test")
                    .body(Full::new(Bytes::new()))
                    .expect("a request"),
            )
            .await
            .expect("a head");
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.into_body().collect().await.is_err(),
            "the body was cut"
        );
        let record = proxy
            .wait_record(|r| r["route"] == "drip" && r["error"] == "route_timeout")
            .await;
        assert_eq!(record["status"], 200, "{record}");
    })
    .await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_file_is_reloaded_and_a_broken_one_keeps_the_last_good() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let limited =
            "inbound:\n  - name: closed\n    rateLimit: {requestsPerSecond: 0.001, burst: 1}\n";
        let proxy = proxy_with_routes(&app, &dir, limited).await;
        assert_eq!(ask(&proxy, false, "/a", &[]).await.status, 200);
        assert_eq!(ask(&proxy, false, "/a", &[]).await.status, 429);

        let path = dir.path().join("routes.yaml");
        std::fs::write(&path, "inbound:\n  - name: open\n    timeout: 10s\n").expect("rewrite");
        eventually("the new routes in force", WAIT, || async {
            (ask(&proxy, false, "/a", &[]).await.status == 200).then_some(())
        })
        .await;

        std::fs::write(&path, "inbound:\n  - name: broken\n    timeout: soon\n").expect("break");
        let ready = eventually("the broken file reported", WAIT, || async {
            let ready = proxy.admin_get("/ready").await;
            (ready.text().contains("routes:")).then_some(ready)
        })
        .await;
        assert_eq!(ready.status, StatusCode::OK, "the last good routes serve");
        assert!(ready.text().contains("timeout"), "{}", ready.text());
        let failed = proxy
            .wait_metric("amazing_proxy_routes_reload_failed", &[], 1.0)
            .await;
        assert_eq!(failed, 1.0);
        // Still the last good routes: "open", not limited.
        for _ in 0..3 {
            let answer = ask(&proxy, false, "/a", &[]).await;
            assert_eq!(answer.status, 200);
        }
        let record = proxy.wait_record(|r| r["route"] == "open").await;
        assert_eq!(record["attempts"], 1, "{record}");
    })
    .await;
}

/// A port an inbound route names is HTTP only, as one the policy judges by path is: bytes that
/// are no request line get 400 instead of a tunnel past the route to the app (ports no route
/// names keep detection: Redis through it, protocols_tcp.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_an_inbound_route_names_carries_only_http() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let port = app.addr.port();
        let routes = format!(
            "inbound:\n  - name: limited\n    match: {{port: {port}, pathPrefix: /admin}}\n    rateLimit: {{requestsPerSecond: 0.001, burst: 1}}\n"
        );
        let proxy = proxy_with_routes(&app, &dir, &routes).await;
        let mut client = crate::support::raw::RawClient::connect(proxy.inbound).await;
        client.send(b"SET key value\r\n").await;
        let response = client.response().await.expect("an answer, not a tunnel");
        assert_eq!(response.status(), 400);
    })
    .await;
}

/// A route's path is matched as lenient apps resolve it: `//admin` and `/admin;jsessionid=1` are
/// `/admin` to Python's http.server, Tomcat and Spring, and took the catch-all route past a
/// stricter one for `/admin` (found by an adversarial review). Now each meets `/admin`'s limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_path_cannot_be_walked_around_by_another_spelling() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let routes = "inbound:\n  - name: admin\n    match: {pathPrefix: /admin}\n    rateLimit: {requestsPerSecond: 0.001, burst: 1}\n  - name: rest\n    timeout: 5s\n";
        let proxy = proxy_with_routes(&app, &dir, routes).await;
        assert_eq!(ask(&proxy, false, "/admin", &[]).await.status, 200);
        for http2 in [false, true] {
            for spelling in ["/admin", "//admin", "/admin;jsessionid=1", "/;/admin/x"] {
                let answer = ask(&proxy, http2, spelling, &[]).await;
                assert_eq!(answer.status, 429, "{spelling} (http2: {http2})");
            }
        }
        assert_eq!(ask(&proxy, false, "/administrator", &[]).await.status, 200);
    })
    .await;
}
