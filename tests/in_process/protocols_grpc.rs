//! Issue 6, HTTP/2 and gRPC: a tonic server behind the proxy (h2c to the app), a tonic client in
//! front of it (h2c prior knowledge to the proxy). Every call kind, error statuses in a
//! trailers-only response and in real trailers, large messages both ways, and a cancelled call that
//! must reach the server. No codegen: messages derive `prost::Message`, the service is routed by
//! hand onto `tonic::server::Grpc`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::support::http::payload;
use crate::support::process::Proxy;
use crate::support::{WAIT, bounded};

const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(bytes = "vec", tag = "2")]
    data: Vec<u8>,
    #[prost(uint32, tag = "3")]
    count: u32,
    #[prost(uint64, tag = "4")]
    size: u64,
}

fn msg(text: &str) -> Msg {
    Msg {
        text: text.into(),
        ..Msg::default()
    }
}

type Codec = tonic_prost::ProstCodec<Msg, Msg>;

/// A closure as the `tower_service::Service` that tonic's call-kind traits are implemented for.
struct Svc<F>(F);

impl<F, R, T, Fut> tower_service::Service<R> for Svc<F>
where
    F: FnMut(R) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    type Response = T;
    type Error = Status;
    type Future = Fut;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: R) -> Fut {
        (self.0)(req)
    }
}

type MsgStream = ReceiverStream<Result<Msg, Status>>;

/// The test service, `test.Echo`:
/// - `Unary`: echoes; `text == "fail"` answers NOT_FOUND with an `x-detail` metadata entry;
/// - `Collect` (client streaming): concatenates texts and data, counts messages;
/// - `Stream` (server streaming): `count` messages of `size` bytes; with `text == "fail-after"`,
///   then RESOURCE_EXHAUSTED in the trailers with `x-trailer`;
/// - `Chat` (bidirectional): answers each message as it arrives;
/// - `Forever` (server streaming): a message every 20 ms until the call is cancelled, which it
///   reports on `cancelled`.
#[derive(Clone)]
struct Server {
    cancelled: mpsc::UnboundedSender<()>,
}

impl Server {
    async fn route(
        self,
        req: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<tonic::body::Body>, Infallible> {
        let mut grpc = tonic::server::Grpc::new(Codec::default())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let response = match req.uri().path() {
            "/test.Echo/Unary" => grpc.unary(Svc(unary), req).await,
            "/test.Echo/Collect" => grpc.client_streaming(Svc(collect), req).await,
            "/test.Echo/Stream" => grpc.server_streaming(Svc(stream), req).await,
            "/test.Echo/Chat" => grpc.streaming(Svc(chat), req).await,
            "/test.Echo/Forever" => {
                let cancelled = self.cancelled.clone();
                grpc.server_streaming(Svc(move |r| forever(r, cancelled.clone())), req)
                    .await
            }
            _ => Status::unimplemented("no such method").into_http(),
        };
        Ok(response)
    }
}

async fn unary(req: Request<Msg>) -> Result<Response<Msg>, Status> {
    let m = req.into_inner();
    if m.text == "fail" {
        let mut md = MetadataMap::new();
        md.insert("x-detail", MetadataValue::from_static("greeting-not-found"));
        return Err(Status::with_metadata(
            Code::NotFound,
            "no such greeting",
            md,
        ));
    }
    Ok(Response::new(Msg {
        text: format!("echo {}", m.text),
        ..m
    }))
}

async fn collect(req: Request<Streaming<Msg>>) -> Result<Response<Msg>, Status> {
    let mut incoming = req.into_inner();
    let mut out = Msg::default();
    while let Some(m) = incoming.message().await? {
        out.text.push_str(&m.text);
        out.data.extend_from_slice(&m.data);
        out.count += 1;
    }
    Ok(Response::new(out))
}

async fn stream(req: Request<Msg>) -> Result<Response<MsgStream>, Status> {
    let m = req.into_inner();
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        for i in 0..m.count {
            let item = Msg {
                text: format!("item {i}"),
                data: payload(m.size as usize),
                count: i,
                size: m.size,
            };
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        if m.text == "fail-after" {
            let mut md = MetadataMap::new();
            md.insert("x-trailer", MetadataValue::from_static("kept"));
            let status = Status::with_metadata(Code::ResourceExhausted, "quota used up", md);
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

async fn chat(req: Request<Streaming<Msg>>) -> Result<Response<MsgStream>, Status> {
    let mut incoming = req.into_inner();
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        while let Ok(Some(m)) = incoming.message().await {
            let reply = Msg {
                text: format!("re: {}", m.text),
                ..m
            };
            if tx.send(Ok(reply)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

async fn forever(
    _req: Request<Msg>,
    cancelled: mpsc::UnboundedSender<()>,
) -> Result<Response<MsgStream>, Status> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut i = 0;
        loop {
            tokio::select! {
                sent = tx.send(Ok(Msg { count: i, ..msg("tick") })) => {
                    if sent.is_err() { break; }
                }
                _ = tx.closed() => break,
            }
            i += 1;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tx.closed() => break,
            }
        }
        // The response stream was dropped: the client's cancellation reached this server.
        let _ = cancelled.send(());
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Starts the gRPC server (h2c only) on a free loopback port; returns its address and the
/// cancellation reports.
async fn start_server() -> (SocketAddr, mpsc::UnboundedReceiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (cancelled, cancelled_rx) = mpsc::unbounded_channel();
    let server = Server { cancelled };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let server = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| server.clone().route(req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, cancelled_rx)
}

async fn client(proxy: &Proxy) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", proxy.inbound))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn path(p: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(p)
}

async fn call_unary(c: &mut tonic::client::Grpc<Channel>, m: Msg) -> Result<Msg, Status> {
    c.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    c.unary(Request::new(m), path("/test.Echo/Unary"), Codec::default())
        .await
        .map(Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_all_four_call_kinds_pass_through_h2c() {
    bounded("test", Duration::from_secs(90), async {
        let (app, _cancelled) = start_server().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let mut c = client(&proxy).await;

        // Unary.
        let reply = call_unary(&mut c, msg("hello")).await.expect("unary");
        assert_eq!(reply.text, "echo hello");

        // Client streaming.
        c.ready().await.expect("ready");
        let outgoing = tokio_stream::iter(["a", "b", "c"].map(|t| Msg {
            data: t.as_bytes().to_vec(),
            ..msg(t)
        }));
        let reply = c
            .client_streaming(
                Request::new(outgoing),
                path("/test.Echo/Collect"),
                Codec::default(),
            )
            .await
            .expect("client streaming")
            .into_inner();
        assert_eq!((reply.text.as_str(), reply.count), ("abc", 3));
        assert_eq!(reply.data, b"abc");

        // Server streaming, then the trailers (grpc-status 0) end the stream cleanly.
        c.ready().await.expect("ready");
        let mut items = c
            .server_streaming(
                Request::new(Msg {
                    count: 5,
                    size: 10,
                    ..msg("")
                }),
                path("/test.Echo/Stream"),
                Codec::default(),
            )
            .await
            .expect("server streaming")
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = items.message().await.expect("stream item") {
            got.push(m.count);
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        items.trailers().await.expect("trailers after the stream");

        // Bidirectional, interactively: each answer arrives before the next message is sent, so
        // neither direction is buffered until the other closes.
        c.ready().await.expect("ready");
        let (tx, rx) = mpsc::channel::<Msg>(1);
        let mut replies = c
            .streaming(
                Request::new(ReceiverStream::new(rx)),
                path("/test.Echo/Chat"),
                Codec::default(),
            )
            .await
            .expect("bidi")
            .into_inner();
        for word in ["one", "two", "three"] {
            tx.send(msg(word)).await.expect("send");
            let reply = replies.message().await.expect("reply").expect("a reply");
            assert_eq!(reply.text, format!("re: {word}"));
        }
        drop(tx);
        assert!(replies.message().await.expect("end").is_none());

        // The access log and the metrics carry grpc-status for every call.
        for p in [
            "/test.Echo/Unary",
            "/test.Echo/Collect",
            "/test.Echo/Stream",
            "/test.Echo/Chat",
        ] {
            let r = proxy
                .wait_record(|r| r["original_url"].as_str().is_some_and(|u| u.ends_with(p)))
                .await;
            assert_eq!(r["grpc_status"], 0, "{p}: {r}");
            assert_eq!(r["protocol"], "HTTP/2.0", "{p}: {r}");
            assert_eq!(r["status"], 200, "{p}: {r}");
        }
        proxy
            .wait_metric(
                "amazing_proxy_grpc_responses_total",
                &["direction=\"inbound\"", "grpc_status=\"0\""],
                4.0,
            )
            .await;
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"http\"", "reason=\"http2\""],
                1.0,
            )
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_statuses_and_trailers_are_intact() {
    bounded("test", Duration::from_secs(90), async {
        let (app, _cancelled) = start_server().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let mut c = client(&proxy).await;

        // A trailers-only response: grpc-status in the HEADERS frame that ends the stream.
        let err = call_unary(&mut c, msg("fail"))
            .await
            .expect_err("must fail");
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert_eq!(err.message(), "no such greeting");
        assert_eq!(
            err.metadata().get("x-detail").map(|v| v.to_str().ok()),
            Some(Some("greeting-not-found"))
        );

        // An error after data: grpc-status and custom metadata in real HTTP/2 trailers.
        c.ready().await.expect("ready");
        let mut items = c
            .server_streaming(
                Request::new(Msg {
                    count: 2,
                    size: 100,
                    ..msg("fail-after")
                }),
                path("/test.Echo/Stream"),
                Codec::default(),
            )
            .await
            .expect("server streaming")
            .into_inner();
        assert_eq!(items.message().await.expect("1").map(|m| m.count), Some(0));
        assert_eq!(items.message().await.expect("2").map(|m| m.count), Some(1));
        let err = items.message().await.expect_err("status in the trailers");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert_eq!(err.message(), "quota used up");
        assert_eq!(
            err.metadata().get("x-trailer").map(|v| v.to_str().ok()),
            Some(Some("kept"))
        );

        let r = proxy
            .wait_record(|r| {
                r["original_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/Unary"))
            })
            .await;
        assert_eq!(r["grpc_status"], 5, "{r}");
        let r = proxy
            .wait_record(|r| {
                r["original_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/Stream"))
            })
            .await;
        assert_eq!(r["grpc_status"], 8, "{r}");
        assert!(r["response_bytes"].as_u64() > Some(200), "{r}");
        for code in ["5", "8"] {
            proxy
                .wait_metric(
                    "amazing_proxy_grpc_responses_total",
                    &[&format!("grpc_status=\"{code}\"")],
                    1.0,
                )
                .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_large_messages_stream_both_ways() {
    bounded("test", Duration::from_secs(90), async {
        let (app, _cancelled) = start_server().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let mut c = client(&proxy).await;
        const BIG: usize = 6 * 1024 * 1024;

        // Up: three 6 MiB messages, far beyond HTTP/2's initial flow-control windows.
        c.ready().await.expect("ready");
        let chunk = payload(BIG);
        let outgoing = tokio_stream::iter((0..3).map({
            let chunk = chunk.clone();
            move |_| Msg {
                data: chunk.clone(),
                ..msg("x")
            }
        }));
        let reply = c
            .client_streaming(
                Request::new(outgoing),
                path("/test.Echo/Collect"),
                Codec::default(),
            )
            .await
            .expect("client streaming")
            .into_inner();
        assert_eq!(reply.count, 3);
        assert_eq!(reply.data.len(), 3 * BIG);
        assert!(reply.data.chunks(BIG).all(|c| c == chunk.as_slice()));

        // Down: four 6 MiB messages.
        c.ready().await.expect("ready");
        let mut items = c
            .server_streaming(
                Request::new(Msg {
                    count: 4,
                    size: BIG as u64,
                    ..msg("")
                }),
                path("/test.Echo/Stream"),
                Codec::default(),
            )
            .await
            .expect("server streaming")
            .into_inner();
        let mut n = 0;
        while let Some(m) = items.message().await.expect("item") {
            assert_eq!(m.data, chunk, "item {n} intact");
            n += 1;
        }
        assert_eq!(n, 4);

        // Both ways at once on one stream.
        c.ready().await.expect("ready");
        let outgoing = tokio_stream::iter((0..2).map({
            let chunk = chunk.clone();
            move |i| Msg {
                data: chunk.clone(),
                count: i,
                ..msg("big")
            }
        }));
        let mut replies = c
            .streaming(
                Request::new(outgoing),
                path("/test.Echo/Chat"),
                Codec::default(),
            )
            .await
            .expect("bidi")
            .into_inner();
        let mut n = 0;
        while let Some(m) = replies.message().await.expect("reply") {
            assert_eq!((m.count, m.data.len()), (n, BIG));
            n += 1;
        }
        assert_eq!(n, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_cancelled_call_reaches_the_server() {
    bounded("test", Duration::from_secs(90), async {
        let (app, mut cancelled) = start_server().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let mut c = client(&proxy).await;
        c.ready().await.expect("ready");
        let mut ticks = c
            .server_streaming(
                Request::new(msg("")),
                path("/test.Echo/Forever"),
                Codec::default(),
            )
            .await
            .expect("server streaming")
            .into_inner();
        for i in 0..3 {
            let m = ticks.message().await.expect("tick").expect("a tick");
            assert_eq!(m.count, i);
        }
        // Dropping the response stream resets the HTTP/2 stream (RST_STREAM CANCEL).
        drop(ticks);
        tokio::time::timeout(WAIT, cancelled.recv())
            .await
            .expect("the cancellation never reached the server")
            .expect("report");

        // The connection is still usable afterwards.
        let reply = call_unary(&mut c, msg("after")).await.expect("unary");
        assert_eq!(reply.text, "echo after");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reaches_h2_app_by_port_and_by_auto() {
    bounded("test", Duration::from_secs(90), async {
        let (app, _cancelled) = start_server().await;
        let port = app.port().to_string();
        // The default --app-protocol (http1) with the app's port listed in --http2-ports.
        let by_port = Proxy::start(app, &["--http2-ports", &port]).await;
        // `auto`: an HTTP/2 client reaches the app over HTTP/2.
        let auto = Proxy::start(app, &["--app-protocol", "auto"]).await;
        for proxy in [&by_port, &auto] {
            let mut c = client(proxy).await;
            let reply = call_unary(&mut c, msg("port")).await.expect("unary");
            assert_eq!(reply.text, "echo port");
            let mut items = {
                c.ready().await.expect("ready");
                c.server_streaming(
                    Request::new(Msg {
                        count: 3,
                        ..msg("")
                    }),
                    path("/test.Echo/Stream"),
                    Codec::default(),
                )
                .await
                .expect("server streaming")
                .into_inner()
            };
            let mut n = 0;
            while let Some(item) = items.next().await {
                item.expect("item");
                n += 1;
            }
            assert_eq!(n, 3);
        }
    })
    .await;
}
