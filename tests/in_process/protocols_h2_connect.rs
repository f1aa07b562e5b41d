//! Issue 6, HTTP/2 extended CONNECT (RFC 8441, WebSocket over HTTP/2) where the app supports it:
//! an h2c client sends `CONNECT` with `:protocol = websocket` to the proxy, the proxy forwards it to
//! an h2c app that enabled the extended CONNECT protocol, the 200 comes back and WebSocket frames
//! (tokio-tungstenite on the raw streams) flow both ways until the client closes.

use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::ext::Protocol;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::support::process::Proxy;
use crate::support::{TEST_TIMEOUT, WAIT, bounded};

/// An h2c app with extended CONNECT enabled: `CONNECT :protocol=websocket` is answered 200 and
/// the stream becomes a WebSocket echo.
async fn start_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|mut req: Request<_>| async move {
                    let is_ws = req.method() == Method::CONNECT
                        && req
                            .extensions()
                            .get::<Protocol>()
                            .is_some_and(|p| p.as_str() == "websocket");
                    if !is_ws {
                        let mut r = Response::new(Empty::<Bytes>::new());
                        *r.status_mut() = StatusCode::BAD_REQUEST;
                        return Ok::<_, std::convert::Infallible>(r);
                    }
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let mut ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            None,
                        )
                        .await;
                        while let Some(Ok(m)) = ws.next().await {
                            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                                break;
                            }
                        }
                    });
                    Ok(Response::new(Empty::<Bytes>::new()))
                });
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.enable_connect_protocol();
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An h2c connection to the proxy and a WebSocket opened on it with extended CONNECT (200
/// asserted); the sender stays usable for more streams on the same connection.
async fn websocket_over_h2(
    proxy: &Proxy,
) -> (
    hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
) {
    let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{}/ws", proxy.inbound))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .expect("request");
    req.extensions_mut()
        .insert(Protocol::from_static("websocket"));
    let mut res = bounded("the CONNECT response", WAIT, sender.send_request(req))
        .await
        .expect("response");
    assert_eq!(res.status(), StatusCode::OK);
    let upgraded = bounded("the upgrade", WAIT, hyper::upgrade::on(&mut res))
        .await
        .expect("upgrade");
    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    (sender, ws)
}

#[tokio::test]
async fn websocket_over_h2_extended_connect() {
    bounded("test", TEST_TIMEOUT, async {
        let app = start_app().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let (_sender, mut ws) = websocket_over_h2(&proxy).await;
        for m in [Message::text("over h2"), Message::binary(vec![1u8, 2, 3])] {
            ws.send(m.clone()).await.expect("send");
            let back = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("no echo in time")
                .expect("stream ended")
                .expect("frame");
            assert_eq!(back, m);
        }
        ws.close(None).await.expect("close");

        let r = proxy.wait_record(|r| r["method"] == "CONNECT").await;
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["protocol"], "HTTP/2.0", "{r}");
    })
    .await;
}

/// A WebSocket carried on an HTTP/2 stream is a request in progress: its connection is busy, so
/// the connection limit refuses a new client rather than shedding (GOAWAY) the tunnel's connection.
#[tokio::test]
async fn an_open_websocket_over_h2_keeps_its_connection_busy() {
    bounded("test", TEST_TIMEOUT, async {
        let app = start_app().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2", "--max-connections", "1"]).await;
        let (mut sender, mut ws) = websocket_over_h2(&proxy).await;

        let refused = proxy.get("/").await;
        assert_eq!(
            refused.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "at the limit with only a busy connection, a new client is refused: {}",
            refused.text()
        );
        // The tunnel's connection was not told to go away: it still takes a new stream.
        let again = Request::get(format!("http://{}/", proxy.inbound))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = bounded("a second stream", WAIT, sender.send_request(again))
            .await
            .expect("the tunnel's connection still takes streams");
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "the app's answer"
        );
        let m = Message::text("still here");
        ws.send(m.clone()).await.expect("send");
        let back = bounded("the echo", WAIT, ws.next())
            .await
            .expect("stream ended")
            .expect("frame");
        assert_eq!(back, m);
        ws.close(None).await.expect("close");
    })
    .await;
}
