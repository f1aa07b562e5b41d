//! Issue 6, upgrades: WebSocket (HTTP/1.1 `Upgrade`) through the proxy with tokio-tungstenite on
//! both ends. The 101 comes back, text and binary frames echo, a close from either side ends the
//! tunnel on both, and an idle connection outlives `--response-timeout`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::http::payload;
use crate::support::process::Proxy;
use crate::support::{TEST_TIMEOUT, WAIT, bounded};

/// How a server-side WebSocket ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The client sent a Close frame.
    ClosedByClient(Option<u16>),
    /// The server closed (after `close-me`) and the stream then ended.
    ClosedByServer,
    /// The stream ended without a Close frame, or failed.
    Dropped(String),
}

/// An echo server: text and binary frames come back as they are; the text `close-me` makes the
/// server close with code 4000 "bye". Each connection's end is reported on the channel.
async fn start_echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<Ended>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let ended = match tokio_tungstenite::accept_async(stream).await {
                    Ok(ws) => echo(ws).await,
                    Err(e) => Ended::Dropped(format!("handshake: {e}")),
                };
                let _ = tx.send(ended);
            });
        }
    });
    (addr, rx)
}

async fn echo(mut ws: WebSocketStream<TcpStream>) -> Ended {
    while let Some(message) = ws.next().await {
        match message {
            Ok(Message::Text(t)) if t.as_str() == "close-me" => {
                let frame = CloseFrame {
                    code: CloseCode::Library(4000),
                    reason: "bye".into(),
                };
                if let Err(e) = ws.close(Some(frame)).await {
                    return Ended::Dropped(format!("close: {e}"));
                }
                // Wait for the client's answering Close and the end of the stream.
                while let Some(Ok(_)) = ws.next().await {}
                return Ended::ClosedByServer;
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if let Err(e) = ws.send(m).await {
                    return Ended::Dropped(format!("send: {e}"));
                }
            }
            Ok(Message::Close(frame)) => {
                // tungstenite answers the Close itself; drain until the stream ends.
                while let Some(Ok(_)) = ws.next().await {}
                return Ended::ClosedByClient(frame.map(|f| u16::from(f.code)));
            }
            Ok(_) => {}
            Err(e) => return Ended::Dropped(e.to_string()),
        }
    }
    Ended::Dropped("stream ended without a Close".into())
}

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(proxy: &Proxy) -> Client {
    let url = format!("ws://{}/chat?room=1", proxy.inbound);
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response
            .headers()
            .get("upgrade")
            .and_then(|v| v.to_str().ok()),
        Some("websocket")
    );
    ws
}

async fn next(ws: &mut Client) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no frame in time")
        .expect("stream ended")
        .expect("frame")
}

async fn ended(rx: &mut mpsc::UnboundedReceiver<Ended>) -> Ended {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("the server never saw the end")
        .expect("report")
}

#[tokio::test]
async fn websocket_echoes_text_and_binary_and_client_close_reaches_server() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, mut ends) = start_echo_server().await;
        let proxy = Proxy::start(app, &[]).await;
        let mut ws = connect(&proxy).await;

        ws.send(Message::text("hello")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("hello"));
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .expect("send");
        assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 2, 255]));
        // A large binary frame (several TCP segments, several reads in the tunnel).
        let big = payload(3 * 1024 * 1024);
        ws.send(Message::binary(big.clone())).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::binary(big));

        // Close from the client: the server sees it, answers, and the client's stream ends.
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        }))
        .await
        .expect("close");
        // Frames until the stream ends (the server's answering Close included).
        while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next()).await.expect("end") {}
        assert_eq!(ended(&mut ends).await, Ended::ClosedByClient(Some(1000)));

        let r = proxy
            .wait_record(|r| {
                r["original_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/chat?room=1"))
            })
            .await;
        assert_eq!(r["status"], 101, "{r}");
        assert_eq!(r["method"], "GET", "{r}");
    })
    .await;
}

#[tokio::test]
async fn websocket_close_from_the_server_reaches_the_client() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, mut ends) = start_echo_server().await;
        let proxy = Proxy::start(app, &[]).await;
        let mut ws = connect(&proxy).await;
        ws.send(Message::text("close-me")).await.expect("send");
        match next(&mut ws).await {
            Message::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 4000);
                assert_eq!(frame.reason.as_str(), "bye");
            }
            other => panic!("expected the server's Close, got {other:?}"),
        }
        // tungstenite answered the Close; the tunnel then ends on both sides.
        let end = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the client's stream never ended");
        assert!(
            !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
            "{end:?}"
        );
        assert_eq!(ended(&mut ends).await, Ended::ClosedByServer);
    })
    .await;
}

#[tokio::test]
async fn idle_websocket_outlives_the_response_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, mut ends) = start_echo_server().await;
        let proxy = Proxy::start(app, &["--response-timeout", "300ms"]).await;
        let mut ws = connect(&proxy).await;
        ws.send(Message::text("before")).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::text("before"));
        // Idle for several response timeouts: an idle WebSocket is a healthy one.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ws.send(Message::text("after the idle time"))
            .await
            .expect("send");
        assert_eq!(next(&mut ws).await, Message::text("after the idle time"));
        ws.send(Message::binary(vec![7u8; 10])).await.expect("send");
        assert_eq!(next(&mut ws).await, Message::binary(vec![7u8; 10]));
        ws.close(None).await.expect("close");
        assert!(matches!(ended(&mut ends).await, Ended::ClosedByClient(_)));
    })
    .await;
}
