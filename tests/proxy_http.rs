//! Forwarding: what reaches the app, what comes back, header rewriting, streaming, h2c, and the
//! access log formats.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
