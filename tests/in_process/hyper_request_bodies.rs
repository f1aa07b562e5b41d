//! hyper's path and its connections to the app, against request bodies that end oddly and apps
//! that answer early or pause: what a request tells its connection (`exchange::ConnControl`, the
//! give-up after an early refusal, the upgrade) and the bound on writes the app takes nothing of
//! (`upstream::PooledIo`) never cut a healthy request, and every wait stays bounded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::http::{h2_client, h2_post, h2_response, h2_upload};
use crate::support::process::Proxy;
use crate::support::raw::{RawApp, find, read_count, read_head_and_more, upload};
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A keep-alive HTTP/1.1 app: reads each request (Content-Length bodies) whole, records
/// `(connection, body length)`, answers `200 ok`; `early`: answers right after the head, then
/// reads the body (full duplex).
async fn keep_alive_app(early: bool, seen: Arc<Mutex<Vec<(usize, usize)>>>) -> RawApp {
    RawApp::start(move |mut stream, conn| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let head_end = loop {
                    if let Some(i) = find(&buf, b"\r\n\r\n") {
                        break i + 4;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap_or(0));
                buf.drain(..head_end);
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if early && stream.write_all(answer).await.is_err() {
                    return;
                }
                while buf.len() < length {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            seen.lock().expect("the record").push((conn, buf.len()));
                            return;
                        }
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock().expect("the record").push((conn, length));
                buf.drain(..length);
                if !early && stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await
}

/// An HTTP/2 client sends a Content-Length body whole, its END_STREAM in a later (empty) frame,
/// as many clients do. hyper writes the body whole to the app (Content-Length reached) and stops
/// polling it: the request's body counts as ended then (`body::Stream`), so the connection goes
/// back to the pool healthy and the next request on it is answered. Before, the body never
/// counted as ended, and a give-up at the response's end broke the pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_whole_but_end_stream_late_does_not_poison_the_pooled_connection() {
    bounded("test", TEST_TIMEOUT, async {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = keep_alive_app(false, seen.clone()).await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/first", proxy.inbound);
        let (response, mut body) = h2_post(&mut client, &url, 5);
        body.send_data(bytes::Bytes::from_static(b"hello"), false)
            .expect("data");
        let (status, got) = h2_response(response).await;
        assert_eq!((status, got.as_slice()), (200, &b"ok"[..]));
        // The END_STREAM, late.
        let _ = body.send_data(bytes::Bytes::new(), true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..3 {
            let mut client = client.clone().ready().await.expect("ready");
            let url = format!("http://{}/next{i}", proxy.inbound);
            let (response, mut body) = h2_post(&mut client, &url, 5);
            body.send_data(bytes::Bytes::from_static(b"world"), true)
                .expect("data");
            let (status, got) = h2_response(response).await;
            assert_eq!(
                (status, String::from_utf8_lossy(&got).into_owned()),
                (200, "ok".to_owned()),
                "request {i} after the first; app saw {:?}",
                seen.lock().expect("the record")
            );
        }
    })
    .await;
}

/// hyper's path (an HTTP/2 client, HTTP/1.1 to the app): an app that answers a `200` at once on
/// a connection it keeps (full duplex) and then reads the body gets the whole body, as on the
/// fast path (early_answers::an_early_answer_that_keeps_the_connection_still_gets_the_whole_body):
/// only an early error that says close gives the connection up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_hypers_path_an_early_success_that_keeps_the_connection_still_gets_the_whole_body() {
    const BODY: usize = 4 << 20;
    bounded("test", TEST_TIMEOUT, async {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = keep_alive_app(true, seen.clone()).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/duplex", proxy.inbound);
        let (response, body) = h2_post(&mut client, &url, BODY);
        let (status, got) = h2_response(response).await;
        assert_eq!((status, got.as_slice()), (200, &b"ok"[..]));
        let sent = bounded("sending", WAIT, h2_upload(body, BODY, 256 * 1024)).await;
        let app_got = bounded("the app's read", WAIT, async {
            loop {
                if let Some(&(_, n)) = seen.lock().expect("the record").first() {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!((sent, app_got), (BODY, BODY), "the body was cut");
    })
    .await;
}

/// A WebSocket whose app pauses reading (busy, applying backpressure) for longer than twice
/// `--request-body-timeout` while its client keeps sending: the bound on a request's writes to
/// the app ends at the upgrade (tunnels are unbounded: an idle WebSocket is a healthy one), and
/// the app gets every byte once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_whose_app_pauses_reading_is_not_cut() {
    const SENT: usize = 32 << 20;
    bounded("test", TEST_TIMEOUT, async {
        let got = Arc::new(Mutex::new(None));
        let record = got.clone();
        let app = RawApp::start(move |mut stream, _| {
            let record = record.clone();
            async move {
                let Some((_, more)) = read_head_and_more(&mut stream).await else {
                    return;
                };
                let accept = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if stream.write_all(accept).await.is_err() {
                    return;
                }
                // Busy: reads nothing for a while (four times the bound under test).
                tokio::time::sleep(Duration::from_secs(4)).await;
                let n = read_count(&mut stream, more, SENT).await;
                *record.lock().expect("the record") = Some(n);
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--request-body-timeout", "1s"]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .await
            .expect("head");
        let mut head = Vec::new();
        bounded("the 101", WAIT, async {
            let mut b = [0u8; 1];
            while find(&head, b"\r\n\r\n").is_none() {
                match stream.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => head.push(b[0]),
                }
            }
        })
        .await;
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101 "), "{:?}", String::from_utf8_lossy(&head));
        let (mut reader, writer) = stream.into_split();
        let sending = upload(writer, String::new(), SENT);
        let app_got = bounded("the app's reads", Duration::from_secs(30), async {
            loop {
                if let Some(n) = *got.lock().expect("the record") {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let mut rest = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_millis(100), reader.read(&mut rest)).await;
        let writer = sending.await.expect("sender");
        assert!(
            app_got == SENT && writer.is_some(),
            "the tunnel was cut: the app got {app_got} of {SENT} (client read {ended:?})"
        );
    })
    .await;
}

/// The same client as in
/// `a_body_whole_but_end_stream_late_does_not_poison_the_pooled_connection`: the body counts as
/// ended once written whole, so `--response-timeout` (which starts at the body's end) starts, and
/// an app that reads the body and never answers gets 504. Before, nothing bounded that wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_whole_but_end_stream_late_still_starts_the_response_timeout() {
    end_stream_late_to_a_silent_app(b"hello").await;
}

/// An HTTP/2 client sends `content-length: 0` without END_STREAM on its HEADERS (the END_STREAM
/// comes in a later, empty DATA frame). hyper's HTTP/1.1 client sees a body with an exact size of
/// 0 that has not ended: it writes `Content-Length: 0` and never polls the body, so
/// `RequestProgress::end` was never called and the response timer (which waits for the body's
/// end) never started: an app that never answered held the request past `--response-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_whose_end_stream_comes_late_still_starts_the_response_timeout() {
    end_stream_late_to_a_silent_app(b"").await;
}

/// An HTTP/2 POST of `body` (its length announced) whose END_STREAM comes 100 ms later in an
/// empty DATA frame, to an app that reads everything and never answers, behind
/// `--response-timeout 1s`: the client must get 504.
async fn end_stream_late_to_a_silent_app(body: &'static [u8]) {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--response-timeout", "1s"]).await;
        let mut client = h2_client(proxy.inbound).await;
        let url = format!("http://{}/silent", proxy.inbound);
        let (response, mut sending) = h2_post(&mut client, &url, body.len());
        if !body.is_empty() {
            sending
                .send_data(bytes::Bytes::from_static(body), false)
                .expect("data");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = sending.send_data(bytes::Bytes::new(), true);
        let response = bounded("the 504", WAIT, response)
            .await
            .expect("a response");
        assert_eq!(response.status(), 504);
    })
    .await;
}
