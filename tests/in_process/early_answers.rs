//! An app that answers before it has read the request's body (a 413 to an upload, say), then
//! closes, waits without reading, or reads on: on both paths, the client gets the answer, the app
//! gets what it reads, and nothing is left holding the client's connection (docs/http.md,
//! "An app may answer before it has read the request's body").

use std::time::Duration;

use crate::support::process::Proxy;
use crate::support::raw::{RawApp, find, read_head};
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BODY: usize = 64 << 20;
const REFUSAL_CLOSE: &[u8] =
    b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n";

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The app answers `answer` right after the head, then closes (`wait`: false; its kernel resets
/// the connection, the body unread) or holds the connection without reading (`wait`: true).
async fn app(answer: &'static [u8], wait: bool) -> RawApp {
    RawApp::start(move |mut stream, _| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        if stream.write_all(answer).await.is_err() {
            return;
        }
        if wait {
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
    })
    .await
}

/// hyper's path (an `Expect: 100-continue` client, or HTTP/1.0): the app answers 413 with
/// `Connection: close` at once, then holds its connection without reading. The client gets the
/// 413, and then its connection ends (the request gives its app connection up when the response
/// is done: `exchange::GiveUp`); before, it stayed open, its body untaken, for as long as the app
/// held its connection.
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
            let (mut reader, mut writer) = stream.into_split();
            let sending = tokio::spawn(async move {
                let chunk = vec![b'x'; 1 << 20];
                writer.write_all(head.as_bytes()).await.ok()?;
                for _ in 0..BODY / chunk.len() {
                    writer.write_all(&chunk).await.ok()?;
                }
                Some(writer)
            });
            let mut got = Vec::new();
            let ended = tokio::time::timeout(WAIT, async {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match reader.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await
            .is_ok();
            let body_taken = sending.is_finished();
            sending.abort();
            let text = lossy(&got);
            assert!(text.contains(" 413 ") && text.ends_with("too big\n"), "{text:?}");
            assert!(
                ended || body_taken,
                "the client's connection neither ended nor had its body read: {text:?}"
            );
        }
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
        let app = RawApp::start(|mut stream, _| async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i + 4;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstarted ")
                .await
                .is_err()
            {
                return;
            }
            let mut body = buf.len() - head_end;
            while body < SMALL {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body += n,
                }
            }
            let _ = stream.write_all(format!("got {body}").as_bytes()).await;
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let head = format!("POST /stream HTTP/1.1\r\nHost: t\r\nContent-Length: {SMALL}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("head");
        // The body after a pause: streamed, not in hand with the head.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (mut reader, mut writer) = stream.into_split();
        let sending = tokio::spawn(async move {
            let _ = writer.write_all(&vec![b'x'; SMALL]).await;
            writer
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        sending.abort();
        let text = lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200 ") && text.ends_with(&format!("started got {SMALL}")),
            "{text:?}"
        );
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
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let _connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post(format!("http://{}/upload", proxy.inbound))
            .header("content-length", BODY)
            .body(())
            .expect("a request");
        let (response, mut body) = client.send_request(request, false).expect("send");
        let sending = tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
            for _ in 0..BODY / chunk.len() {
                body.reserve_capacity(chunk.len());
                match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    _ => return "ended by the proxy",
                }
                if body.send_data(chunk.clone(), false).is_err() {
                    return "ended by the proxy";
                }
            }
            "all sent"
        });
        let response = bounded("the answer", WAIT, response)
            .await
            .expect("a response");
        assert_eq!(response.status(), 413);
        let mut recv = response.into_body();
        while let Some(chunk) = bounded("the body", WAIT, recv.data()).await {
            chunk.expect("the body");
        }
        let ended = tokio::time::timeout(WAIT, sending).await;
        assert!(
            ended.is_ok(),
            "after the 413, the stream's request side was neither reset nor read"
        );
    })
    .await;
}

/// The app answers before it has read the request's body (413 to an upload too large, say), then
/// either closes (`/close`: its kernel resets the connection, the body unread) or waits without
/// reading (`/wait`). Either way the client gets that answer, not a 502 or a timeout: the proxy
/// stops sending the body, forwards the answer, and ends the client's connection after it (the
/// rest of the body was never read, so nothing after it could be told apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_app_gives_before_reading_the_body_reaches_the_client() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let refusal = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n";
            if stream.write_all(refusal).await.is_err() {
                return;
            }
            if lossy(&head).starts_with("POST /wait ") {
                // Holds the connection without reading, longer than the test waits.
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        // More than loopback's socket buffers take in, so the body cannot all be sent.
        const BODY: usize = 64 << 20;
        for path in ["/close", "/wait"] {
            let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            let (mut reader, mut writer) = stream.into_split();
            let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
            let sending = tokio::spawn(async move {
                let chunk = vec![b'x'; 1 << 20];
                if writer.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..BODY / chunk.len() {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let mut got = Vec::new();
            let ending = bounded("the answer", WAIT, async {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match reader.read(&mut chunk).await {
                        Ok(0) => return "clean",
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                        Err(_) => return "reset",
                    }
                }
            })
            .await;
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
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let refusal = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n";
            let _ = stream.write_all(refusal).await;
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let _connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        const BODY: usize = 64 << 20;
        let request = http::Request::post(format!("http://{}/upload", proxy.inbound))
            .header("content-length", BODY)
            .body(())
            .expect("a request");
        let (response, mut body) = client.send_request(request, false).expect("send");
        let sending = tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
            for _ in 0..BODY / chunk.len() {
                body.reserve_capacity(chunk.len());
                if std::future::poll_fn(|cx| body.poll_capacity(cx)).await.is_none() {
                    return;
                }
                if body.send_data(chunk.clone(), false).is_err() {
                    return;
                }
            }
        });
        let response = bounded("the answer", WAIT, response).await.expect("a response");
        assert_eq!(response.status(), 413);
        let mut got = Vec::new();
        let mut recv = response.into_body();
        while let Some(chunk) = bounded("the body", WAIT, recv.data()).await {
            got.extend_from_slice(&chunk.expect("the body"));
        }
        assert_eq!(lossy(&got), "too big\n");
        sending.abort();
        proxy
            .wait_record(|r| r["status"] == 413 && r["original_url"].as_str().is_some_and(|u| u.ends_with("/upload")))
            .await;
    })
    .await;
}

/// An app that answers at once but keeps its connection (full duplex: a `200` head, then it reads
/// the body) gets the whole body: only an answer that says close ends the sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_that_keeps_the_connection_still_gets_the_whole_body() {
    const BODY: usize = 16 << 20;
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i + 4;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let mut body = buf.len() - head_end;
            while body < BODY {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body += n,
                }
            }
            let _ = stream.write_all(format!("{body:>20}").as_bytes()).await;
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        let head = format!("POST /duplex HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
        let sending = tokio::spawn(async move {
            writer.write_all(head.as_bytes()).await.expect("head");
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..BODY / chunk.len() {
                writer.write_all(&chunk).await.expect("body");
            }
            writer
        });
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
        let _writer = sending.await.expect("the whole body was sent");
    })
    .await;
}

/// An app that stops reading a request's body and never answers: on both paths the proxy's
/// writes to it are bounded (twice `--request-body-timeout`, as for a client that takes no
/// response), and the client gets a 502, where hyper's path waited for good before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_stops_reading_the_body_and_never_answers_gets_a_bounded_wait() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            // Holds the connection without reading or answering, longer than the test waits.
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--request-body-timeout", "1s"]).await;
        // HTTP/1.1 (the fast path).
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        let head = format!("POST /fast HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
        let sending = tokio::spawn(async move {
            let chunk = vec![b'x'; 1 << 20];
            writer.write_all(head.as_bytes()).await.ok()?;
            for _ in 0..BODY / chunk.len() {
                writer.write_all(&chunk).await.ok()?;
            }
            Some(writer)
        });
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
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let _connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post(format!("http://{}/hyper", proxy.inbound))
            .header("content-length", BODY)
            .body(())
            .expect("a request");
        let (response, mut body) = client.send_request(request, false).expect("send");
        let sending = tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
            for _ in 0..BODY / chunk.len() {
                body.reserve_capacity(chunk.len());
                match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    _ => return,
                }
                if body.send_data(chunk.clone(), false).is_err() {
                    return;
                }
            }
        });
        let response = bounded("the answer on hyper's path", WAIT, response)
            .await
            .expect("a response");
        sending.abort();
        assert_eq!(response.status(), 502);
    })
    .await;
}
