//! An app that answers before it has read the request's body (a 413 to an upload, say), then
//! closes, waits without reading, or reads on: on both paths, the client gets the answer, the app
//! gets what it reads, and nothing is left holding the client's connection (docs/http.md,
//! "An app may answer before it has read the request's body").

use std::time::Duration;

use crate::support::http::{h2_client, h2_post, h2_response, h2_upload};
use crate::support::process::Proxy;
use crate::support::raw::{
    RawApp, find, read_count, read_head, read_head_and_more, read_until_end, upload,
};
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// More than loopback's socket buffers take in: such a body cannot all be sent to an app that
/// does not read it.
const BODY: usize = 64 << 20;
const REFUSAL_CLOSE: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n";

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The app answers `answer` right after the head, then closes (`wait`: false; its kernel resets
/// the connection, the body unread) or holds the connection without reading (`wait`: true, or
/// a head that begins `POST /wait `).
async fn app(answer: &'static [u8], wait: bool) -> RawApp {
    RawApp::start(move |mut stream, _| async move {
        let Some(head) = read_head(&mut stream).await else {
            return;
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        if wait || head.starts_with(b"POST /wait ") {
            // Longer than any test waits.
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
    })
    .await
}

/// An app that answers `answer` at once, then reads the request's body (`length` bytes) and
/// ends its answer with `last(bytes read)`.
async fn reading_on_app(answer: &'static [u8], length: usize, last: fn(usize) -> String) -> RawApp {
    RawApp::start(move |mut stream, _| async move {
        let Some((_, more)) = read_head_and_more(&mut stream).await else {
            return;
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        let body = read_count(&mut stream, more, length).await;
        let _ = stream.write_all(last(body).as_bytes()).await;
    })
    .await
}

/// The app answers before it has read the request's body (413 to an upload too large, say), then
/// either closes (`/close`: its kernel resets the connection, the body unread) or waits without
/// reading (`/wait`). Either way the client gets that answer, not a 502 or a timeout: the proxy
/// stops sending the body, forwards the answer, and ends the client's connection after it (the
/// rest of the body was never read, so nothing after it could be told apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_app_gives_before_reading_the_body_reaches_the_client() {
    bounded("test", TEST_TIMEOUT, async {
        let app = app(REFUSAL_CLOSE, false).await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        for path in ["/close", "/wait"] {
            let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            let (mut reader, writer) = stream.into_split();
            let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
            let sending = upload(writer, head, BODY);
            let (got, ending) = read_until_end(&mut reader, WAIT).await;
            assert!(ending.is_some(), "{path}: the connection did not end");
            sending.abort();
            let text = lossy(&got);
            assert!(
                text.starts_with("HTTP/1.1 413 ") && text.ends_with("too big\n"),
                "{path}: {text:?} ({ending:?})"
            );
            assert!(
                text.to_ascii_lowercase().contains("connection: close\r\n"),
                "{path}: {text:?}"
            );
            proxy
                .wait_record(|r| {
                    r["status"] == 413
                        && r["original_url"]
                            .as_str()
                            .is_some_and(|u| u.ends_with(path))
                })
                .await;
        }
    })
    .await;
}

/// The same early answer to a client on HTTP/2 (hyper's path, HTTP/1.1 to the app): the client
/// gets the 413, and the stream ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_app_gives_before_reading_the_body_reaches_an_http2_client() {
    bounded("test", TEST_TIMEOUT, async {
        let app = app(REFUSAL_CLOSE, false).await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/upload", proxy.inbound);
        let (response, body) = h2_post(&mut client, &url, BODY);
        let sending = tokio::spawn(h2_upload(body, BODY, 1 << 20));
        let (status, got) = h2_response(response).await;
        assert_eq!(status, 413);
        assert_eq!(lossy(&got), "too big\n");
        sending.abort();
        proxy
            .wait_record(|r| {
                r["status"] == 413
                    && r["original_url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("/upload"))
            })
            .await;
    })
    .await;
}

/// hyper's path (an `Expect: 100-continue` client, or HTTP/1.0): the app answers 413 with
/// `Connection: close` at once, then holds its connection without reading. The client gets the
/// 413, and then its connection ends (the request gives its app connection up when the response
/// is done: `exchange::ConnControl`); before, it stayed open, its body untaken, for as long as the
/// app held its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_hypers_path_an_app_that_answers_early_and_waits_lets_the_client_go() {
    bounded("test", TEST_TIMEOUT, async {
        let app = app(REFUSAL_CLOSE, true).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        for head in [
            format!("POST /expect HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {BODY}\r\n\r\n"),
            format!("POST /h10 HTTP/1.0\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n"),
        ] {
            let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            let (mut reader, writer) = stream.into_split();
            let sending = upload(writer, head, BODY);
            let (got, ending) = read_until_end(&mut reader, WAIT).await;
            let body_taken = sending.is_finished();
            sending.abort();
            let text = lossy(&got);
            assert!(text.contains(" 413 ") && text.ends_with("too big\n"), "{text:?}");
            assert!(
                ending.is_some() || body_taken,
                "the client's connection neither ended nor had its body read: {text:?}"
            );
        }
    })
    .await;
}

/// hyper's path, an HTTP/2 client: the app answers 413 with `Connection: close` at once and
/// holds its connection without reading. The client gets the 413, and then its stream's request
/// side ends (reset by the proxy); before, the stream stayed open, its body blocked on flow
/// control, for as long as the app held its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_clients_stream_ends_after_an_early_answer_from_a_waiting_app() {
    bounded("test", TEST_TIMEOUT, async {
        let app = app(REFUSAL_CLOSE, true).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/upload", proxy.inbound);
        let (response, body) = h2_post(&mut client, &url, BODY);
        let sending = tokio::spawn(h2_upload(body, BODY, 1 << 20));
        let (status, _) = h2_response(response).await;
        assert_eq!(status, 413);
        let ended = tokio::time::timeout(WAIT, sending).await;
        assert!(
            ended.is_ok(),
            "after the 413, the stream's request side was neither reset nor read"
        );
    })
    .await;
}

/// The fast path: an app that answers at once with a success that says close (a streamed answer
/// it will end with a close) and reads the whole body before finishing it gets the whole body.
/// Only an error that says close shows the app does not want the body (RFC 9112 9.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_that_says_close_early_still_gets_the_whole_body() {
    const SMALL: usize = 256 * 1024;
    bounded("test", TEST_TIMEOUT, async {
        let answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstarted ";
        let app = reading_on_app(answer, SMALL, |n| format!("got {n}")).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let head = format!("POST /stream HTTP/1.1\r\nHost: t\r\nContent-Length: {SMALL}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("head");
        // The body after a pause: streamed, not in hand with the head.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut reader, writer) = stream.into_split();
        let sending = upload(writer, String::new(), SMALL);
        let (got, _) = read_until_end(&mut reader, WAIT).await;
        sending.abort();
        let text = lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200 ") && text.ends_with(&format!("started got {SMALL}")),
            "{text:?}"
        );
    })
    .await;
}

/// An app that answers at once but keeps its connection (full duplex: a `200` head, then it reads
/// the body) gets the whole body: only an answer that says close ends the sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_that_keeps_the_connection_still_gets_the_whole_body() {
    const BODY: usize = 16 << 20;
    bounded("test", TEST_TIMEOUT, async {
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n";
        let app = reading_on_app(answer, BODY, |n| format!("{n:>20}")).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (mut reader, writer) = stream.into_split();
        let head = format!("POST /duplex HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
        let sending = upload(writer, head, BODY);
        let mut got = Vec::new();
        bounded("the answer", WAIT, async {
            let mut chunk = [0u8; 16 * 1024];
            while !got.ends_with(format!("{BODY:>20}").as_bytes()) {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let text = lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200 ") && text.ends_with(&format!("{BODY:>20}")),
            "{text:?}"
        );
        let sent = sending.await.expect("the sender");
        assert!(sent.is_some(), "the whole body was sent");
    })
    .await;
}

/// An app that stops reading a request's body and never answers: on both paths the proxy's
/// writes to it are bounded (twice `--request-body-timeout`, as for a client that takes no
/// response), and the client gets a 502, where hyper's path waited for good before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_reading_the_body_and_never_answers_gets_a_bounded_wait() {
    bounded("test", TEST_TIMEOUT, async {
        let app = app(b"", true).await;
        let proxy = Proxy::start(app.addr, &["--request-body-timeout", "1s"]).await;
        // HTTP/1.1 (the fast path).
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (mut reader, writer) = stream.into_split();
        let head = format!("POST /fast HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
        let sending = upload(writer, head, BODY);
        let mut got = Vec::new();
        bounded("the answer on the fast path", WAIT, async {
            let mut chunk = [0u8; 16 * 1024];
            while find(&got, b"\r\n\r\n").is_none() {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        sending.abort();
        assert!(
            lossy(&got).starts_with("HTTP/1.1 502 "),
            "{:?}",
            lossy(&got)
        );
        // HTTP/2 (hyper's path).
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/hyper", proxy.inbound);
        let (response, body) = h2_post(&mut client, &url, BODY);
        let sending = tokio::spawn(h2_upload(body, BODY, 1 << 20));
        let response = bounded("the answer on hyper's path", WAIT, response)
            .await
            .expect("a response");
        sending.abort();
        assert_eq!(response.status(), 502);
    })
    .await;
}
