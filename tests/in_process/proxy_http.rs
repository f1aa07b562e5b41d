//! Forwarding: what reaches the app, what comes back, header rewriting, streaming, h2c, and the
//! access log formats.

use std::time::Duration;

use crate::support::http::*;
use crate::support::metrics::metric;
use crate::support::process::*;
use crate::support::raw::*;
use crate::support::tools::*;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_method_path_query_headers_and_body() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let req = Request::builder()
            .method("PUT")
            .uri("/some/path?a=1&b=two")
            .header("host", "example.test:8080")
            .header("x-custom", "custom value")
            .body(Full::new(Bytes::from_static(b"hello, app")))
            .expect("request");
        let reply = send(proxy.inbound, req).await;
        assert_eq!(reply.status, StatusCode::OK);
        let echo = reply.json();
        assert_eq!(echo["method"], "PUT");
        assert_eq!(echo["uri"], "/some/path?a=1&b=two");
        assert_eq!(echo["body"], "hello, app");
        assert_eq!(echo["body_len"], 10);
        assert_eq!(echoed_header(&echo, "x-custom"), ["custom value"]);
        assert_eq!(echoed_header(&echo, "content-length"), ["10"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_one_pooled_app_connection_for_sequential_requests() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut seen = Vec::new();
        for i in 0..5 {
            // A new client connection each time: reuse must come from the proxy's pool.
            let reply = proxy.get(&format!("/echo?i={i}")).await;
            assert_eq!(reply.status, StatusCode::OK);
            seen.push(reply.json()["connection"].as_u64().expect("connection id"));
            // The client connection's end hands its app connection back to the pool: wait for it,
            // or the next client may race it and dial a new one.
            eventually("the client connection to close", WAIT, || async {
                let open = metric(
                    &proxy.metrics().await,
                    "amazing_proxy_open_connections",
                    &["direction=\"inbound\""],
                );
                (open == Some(0.0)).then_some(())
            })
            .await;
        }
        assert_eq!(seen, [1, 1, 1, 1, 1], "app connection used by each request");
        assert_eq!(app.connections(), 1);
    })
    .await;
}

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_1gib_each_way_with_flat_memory() {
    bounded("test", Duration::from_secs(240), async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--access-log", "off"]).await;

        let upload = Request::post("/upload")
            .header("host", "app.test")
            .body(pattern_body(GIB))
            .expect("upload request");
        let mut conn = H1Conn::connect(proxy.inbound).await;
        let response = bounded(
            "1 GiB upload",
            Duration::from_secs(120),
            conn.request(upload),
        )
        .await;
        let reply = read_reply(response).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["body_len"], GIB, "bytes the app received");

        let mut conn = H1Conn::connect(proxy.inbound).await;
        let download = get_request(proxy.inbound, &format!("/stream?bytes={GIB}"));
        let response = bounded("download head", WAIT, conn.request(download)).await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let received = bounded("1 GiB download", Duration::from_secs(120), async {
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("download frame");
                if let Some(data) = frame.data_ref() {
                    n += data.len() as u64;
                }
            }
            n
        })
        .await;
        assert_eq!(received, GIB, "bytes the client received");

        let peak = proxy.peak_rss_bytes();
        eprintln!("proxy peak RSS after 2 GiB: {} KiB", peak >> 10);
        assert!(
            peak < 64 << 20,
            "the proxy's peak RSS was {} MiB after 2 GiB went through it",
            peak >> 20
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_body_reaches_the_app_whole() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        // A streamed body without a length goes out chunked.
        let total = 300_000u64;
        let req = Request::post("/echo")
            .header("host", "app.test")
            .body(pattern_body(total))
            .expect("chunked request");
        let reply = send(proxy.inbound, req).await;
        assert_eq!(reply.status, StatusCode::OK);
        let echo = reply.json();
        assert_eq!(echo["body_len"], total);
        let mut expected = Fnv::default();
        let mut left = total as usize;
        while left > 0 {
            let chunk = pattern();
            let n = left.min(chunk.len());
            expected.update(&chunk[..n]);
            left -= n;
        }
        assert_eq!(echo["body_hash"], format!("{:016x}", expected.0));
        assert_eq!(echoed_header(&echo, "transfer-encoding"), ["chunked"]);
        assert!(echoed_header(&echo, "content-length").is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_body_reaches_the_client_whole() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = proxy.get("/stream?bytes=200000").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
        assert_eq!(reply.body.len(), 200_000);
        let pattern = pattern();
        assert_eq!(&reply.body[..pattern.len()], &pattern[..]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_gets_the_headers_without_a_body() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let req = Request::head("/echo")
            .header("host", "app.test")
            .body(Empty::<Bytes>::new())
            .expect("HEAD request");
        let mut conn = H1Conn::connect(proxy.inbound).await;
        let reply = conn.send(req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.is_empty(), "HEAD response had a body");
        let length: usize = reply
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("content-length on the HEAD response");
        assert!(length > 0);
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        // The connection is still usable: the proxy did not wait for a body that never comes.
        let next = conn.send(get_request(proxy.inbound, "/echo")).await;
        assert_eq!(next.status, StatusCode::OK);
        assert_eq!(next.json()["method"], "GET");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_100_then_the_response() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        stream
            .write_all(
                b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\
                  Expect: 100-continue\r\n\r\n",
            )
            .await
            .expect("write the head");
        let interim = bounded("100 Continue", WAIT, read_head(&mut stream))
            .await
            .expect("a 100 Continue before the body is sent");
        let interim = String::from_utf8_lossy(&interim);
        assert!(interim.starts_with("HTTP/1.1 100 "), "got {interim}");
        stream.write_all(b"hello").await.expect("write the body");
        let (head, body) = raw_read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "got {head}");
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        assert_eq!(echo["body"], "hello");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removes_hop_by_hop_request_headers() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        stream
            .write_all(
                b"POST /echo HTTP/1.1\r\nHost: app.test\r\n\
                  Connection: keep-alive, X-Named-By-Connection\r\n\
                  X-Named-By-Connection: secret\r\nKeep-Alive: timeout=5\r\n\
                  Proxy-Connection: keep-alive\r\nTE: trailers, deflate\r\n\
                  Upgrade: websocket\r\nX-End-To-End: kept\r\n\
                  Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            )
            .await
            .expect("write the request");
        let (head, body) = raw_read_response(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "got {head}");
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
        let seen = echoed_headers(&echo);
        for gone in [
            "connection",
            "x-named-by-connection",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(!seen.contains_key(gone), "{gone} reached the app: {seen:?}");
        }
        assert_eq!(
            echoed_header(&echo, "te"),
            ["trailers"],
            "TE keeps only trailers"
        );
        assert_eq!(echoed_header(&echo, "x-end-to-end"), ["kept"]);
        // The body is re-framed for the app's hop: one chunked coding, not the client's plus ours.
        assert_eq!(echoed_header(&echo, "transfer-encoding"), ["chunked"]);
        assert_eq!(echo["body"], "hello");

        // TE without `trailers` goes entirely.
        let req = Request::get("/echo")
            .header("host", "app.test")
            .header("te", "deflate")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let echo = send(proxy.inbound, req).await.json();
        assert!(
            echoed_header(&echo, "te").is_empty(),
            "TE: deflate reached the app"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removes_hop_by_hop_response_headers() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = proxy.get("/hop-headers").await;
        assert_eq!(reply.status, StatusCode::OK);
        for gone in [
            "connection",
            "x-app-hop",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(
                !reply.headers.contains_key(gone),
                "{gone} reached the client: {:?}",
                reply.headers
            );
        }
        assert_eq!(reply.header("x-app"), Some("yes"));
        assert_eq!(reply.text(), "hop\n");
    })
    .await;
}

/// A raw app that records each request head and answers with a mixed-case header.
async fn case_recording_app() -> (RawApp, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    let app = RawApp::start(move |mut stream, _| {
        let seen = seen.clone();
        async move {
            while let Some(head) = read_head(&mut stream).await {
                seen.lock()
                    .expect("heads lock")
                    .push(String::from_utf8_lossy(&head).into_owned());
                let answer = b"HTTP/1.1 200 OK\r\nX-App-Header: Yes\r\nContent-Length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (app, heads)
}

const CASE_REQUEST: &[u8] =
    b"GET /case HTTP/1.1\r\nHost: app.test\r\nX-Custom-Header: v\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_keep_their_case_both_ways_by_default() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, heads) = case_recording_app().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let response = raw_exchange(proxy.inbound, CASE_REQUEST).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "got {response}");
        assert!(
            response.contains("\r\nX-App-Header: Yes\r\n"),
            "client saw {response}"
        );
        let head = heads.lock().expect("heads lock")[0].clone();
        assert!(
            head.contains("\r\nX-Custom-Header: v\r\n"),
            "app saw {head}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_are_lower_case_with_lowercase_header_names() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, heads) = case_recording_app().await;
        let proxy = Proxy::start(app.addr, &["--lowercase-header-names"]).await;
        let response = raw_exchange(proxy.inbound, CASE_REQUEST).await;
        assert!(
            response.contains("\r\nx-app-header: Yes\r\n"),
            "client saw {response}"
        );
        let head = heads.lock().expect("heads lock")[0].clone();
        assert!(
            head.contains("\r\nx-custom-header: v\r\n"),
            "app saw {head}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_the_clients_host_by_default() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let req = Request::get("/echo")
            .header("host", "shop.example.test:8080")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let echo = send(proxy.inbound, req).await.json();
        assert_eq!(echoed_header(&echo, "host"), ["shop.example.test:8080"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_host_sends_the_apps_address() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--rewrite-host"]).await;
        let req = Request::get("/echo")
            .header("host", "shop.example.test:8080")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let echo = send(proxy.inbound, req).await.json();
        assert_eq!(echoed_header(&echo, "host"), [app.addr.to_string()]);
    })
    .await;
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_forwarding_headers_and_a_request_id() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let req = Request::get("/echo")
            .header("host", "app.test")
            .header("traceparent", TRACEPARENT)
            .body(Empty::<Bytes>::new())
            .expect("request");
        let echo = send(proxy.inbound, req).await.json();
        assert_eq!(echoed_header(&echo, "x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(echoed_header(&echo, "x-forwarded-proto"), ["http"]);
        assert_eq!(echoed_header(&echo, "traceparent"), [TRACEPARENT]);
        let ids = echoed_header(&echo, "x-request-id");
        assert_eq!(ids.len(), 1, "one x-request-id: {ids:?}");
        assert_eq!(ids[0].len(), 36, "a UUID: {}", ids[0]);

        let again = send(proxy.inbound, get_request(proxy.inbound, "/echo"))
            .await
            .json();
        assert_ne!(
            echoed_header(&again, "x-request-id"),
            ids,
            "request ids differ"
        );
    })
    .await;
}

/// A well-formed request id is kept; a client's X-Forwarded-For is replaced, unless
/// --trusted-hops says a proxy in front of the pod set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_a_given_request_id_and_x_forwarded_for_only_from_trusted_hops() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        for (flags, forwarded_for) in [
            (&[][..], "127.0.0.1"),
            (&["--trusted-hops", "1"][..], "203.0.113.9, 127.0.0.1"),
        ] {
            let proxy = Proxy::start(app.addr, flags).await;
            let req = Request::get("/echo")
                .header("host", "app.test")
                .header("x-request-id", "given-id-42")
                .header("x-forwarded-for", "203.0.113.8, 203.0.113.9")
                .body(Empty::<Bytes>::new())
                .expect("request");
            let echo = send(proxy.inbound, req).await.json();
            assert_eq!(echoed_header(&echo, "x-request-id"), ["given-id-42"]);
            assert_eq!(
                echoed_header(&echo, "x-forwarded-for"),
                [forwarded_for],
                "{flags:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_the_apps_status_headers_and_body_with_our_server() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = proxy.get("/status/418").await;
        assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        assert_eq!(reply.text(), "status 418\n");

        let reply = proxy.get("/echo").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        assert_eq!(reply.header("x-app"), Some("echo"));
        assert_eq!(reply.header("content-type"), Some("application/json"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_http2_prior_knowledge_on_the_same_port() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let req = Request::get(format!("http://{}/echo?h2=1", proxy.inbound))
            .body(Empty::<Bytes>::new())
            .expect("h2 request");
        let response = bounded("h2 response", WAIT, sender.send_request(req))
            .await
            .expect("h2 request sent");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let reply = read_reply(response).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        let echo = reply.json();
        assert_eq!(echo["uri"], "/echo?h2=1");
        assert_eq!(
            echo["version"], "HTTP/1.1",
            "the app is spoken to over HTTP/1.1"
        );
        assert_eq!(echoed_header(&echo, "host"), [proxy.inbound.to_string()]);

        // The same port still speaks HTTP/1.1.
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_record_per_request() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await; // json is the default
        let req = Request::post("/echo?log=json")
            .header("host", "app.test")
            .header("x-request-id", "json-record-1")
            .body(Full::new(Bytes::from_static(b"twelve bytes")))
            .expect("request");
        let reply = send(proxy.inbound, req).await;
        assert_eq!(reply.status, StatusCode::OK);

        let record = proxy.json_record("json-record-1").await;
        assert_eq!(record["method"], "POST");
        assert_eq!(record["protocol"], "HTTP/1.1");
        assert_eq!(record["direction"], "inbound");
        assert_eq!(
            record["original_url"],
            format!("http://{}/echo?log=json", proxy.inbound)
        );
        assert_eq!(
            record["proxy_url"],
            format!("http://{}/echo?log=json", app.addr)
        );
        assert_eq!(record["status"], 200);
        assert_eq!(record["request_bytes"], 12);
        assert_eq!(record["response_bytes"], reply.body.len());
        assert_eq!(record["upstream"], app.addr.to_string());
        let client = record["client"].as_str().expect("client address");
        assert!(client.starts_with("127.0.0.1:"), "client {client}");
        assert!(record["duration_ms"].as_f64().expect("duration_ms") >= 0.0);
        assert!(record["time"].as_str().expect("time").ends_with('Z'));
        assert!(record.get("error").is_none(), "no error: {record}");
        assert!(record.get("fault").is_none(), "no fault: {record}");
        assert_eq!(proxy.json_records().len(), 1, "one line per request");
    })
    .await;
}

/// `1.503ms`, `250µs`, `2.5s`: Go's `time.Duration` text.
fn is_go_duration(text: &str) -> bool {
    ["ns", "µs", "ms", "s"].iter().any(|unit| {
        text.strip_suffix(unit)
            .is_some_and(|n| !n.is_empty() && n.parse::<f64>().is_ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_access_log_prints_the_tutorials_block() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--access-log", "seed"]).await;
        let reply = send(
            proxy.inbound,
            full_request("POST", proxy.inbound, "/echo?log=seed", "hello"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);

        let text = proxy
            .wait_for_log(
                |t| t.contains("Response Status:") && t.ends_with("\n\n"),
                WAIT,
            )
            .await;
        let blocks = seed_records(&text);
        assert_eq!(blocks.len(), 1, "one block per request:\n{text}");
        let block = &blocks[0];
        assert_eq!(block.len(), 6, "six lines then a blank one:\n{text}");
        assert_eq!(
            block[0],
            format!("Original URL: http://{}/echo?log=seed", proxy.inbound)
        );
        assert_eq!(
            block[1],
            format!("Proxy URL: http://{}/echo?log=seed", app.addr)
        );
        let duration = block[2]
            .strip_prefix("Request Duration: ")
            .expect("Request Duration line");
        assert!(is_go_duration(duration), "duration {duration:?}");
        assert_eq!(block[3], "Request Size: 5");
        assert_eq!(block[4], format!("Response Size: {}", reply.body.len()));
        assert_eq!(block[5], "Response Status: 200");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_off_prints_nothing() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let mut proxy =
            Proxy::start(app.addr, &["--access-log", "off", "--drain-delay", "0s"]).await;
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        assert_eq!(proxy.get("/status/500").await.status, 500);
        // The access log is flushed at exit: after it, stdout is complete.
        assert_eq!(
            proxy.admin_post("/shutdown").await.status,
            StatusCode::ACCEPTED
        );
        assert!(proxy.wait_exit(WAIT).await.success());
        assert_eq!(proxy.stdout(), "", "nothing on stdout");
    })
    .await;
}
