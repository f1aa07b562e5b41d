//! Issue 20's question for HTTP/2: how much would serving streams on the `h2` crate directly save
//! over hyper, on gRPC unary calls? Two forwarders (h2c in, h2c out to one app address), each on
//! one current-thread runtime, neither logging, routing nor applying any rule, so that what differs
//! is the adapter alone:
//! - `hyper`: hyper's HTTP/2 server and hyper-util's pooled client, the proxy's shape today (a task
//!   per stream, a channel hop to the app connection's task, a task piping each request body).
//! - `h2`: the `h2` crate directly: a task per stream runs the exchange inline (the request's body
//!   piped from that task), one app connection shared by cloning its `SendRequest`.
//!
//! The `h2` forwarder is the plain one on that crate's public API, as the proxy's adapter would
//! be. Measured on 2026-12-07 it made 0.92-0.96x hyper's calls per CPU-second (hyper sits on the
//! same crate, tuned): the adapter would not pay (docs/benchmarks.md).
//!
//! Usage: h2-probe hyper|h2 LISTEN APP   (bench/h2-probe/bench.sh runs it)

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, app] = args.as_slice() else {
        return Err("usage: h2-probe hyper|h2 LISTEN APP".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let app: SocketAddr = app.parse()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        match mode.as_str() {
            "hyper" => via_hyper(listener, app).await,
            "h2" => via_h2(listener, app).await,
            other => Err(format!("unknown mode {other}: hyper or h2").into()),
        }
    })
}

/// The request's URI pointed at the app (what the proxy's `point_at_upstream` does).
fn at_app(uri: &Uri, app: &str) -> Result<Uri, http::Error> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Uri::builder()
        .scheme("http")
        .authority(app)
        .path_and_query(path)
        .build()
}

async fn via_hyper(listener: TcpListener, app: SocketAddr) -> Result<(), Error> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let app: Arc<str> = app.to_string().into();
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let (client, app) = (client.clone(), app.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (client, app) = (client.clone(), app.clone());
                async move {
                    let (mut parts, body) = request.into_parts();
                    parts.uri = at_app(&parts.uri, &app).map_err(std::io::Error::other)?;
                    let response = client.request(Request::from_parts(parts, body)).await;
                    response.map_err(std::io::Error::other)
                }
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(socket), service)
                .await;
            if let Err(e) = served {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn via_h2(listener: TcpListener, app: SocketAddr) -> Result<(), Error> {
    let upstream = TcpStream::connect(app).await?;
    upstream.set_nodelay(true)?;
    let (sender, connection) = h2::client::handshake(upstream).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("app connection: {e}");
        }
    });
    let app: Arc<str> = app.to_string().into();
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let (sender, app) = (sender.clone(), app.clone());
        tokio::spawn(async move {
            let mut connection = match h2::server::handshake(socket).await {
                Ok(c) => c,
                Err(e) => return eprintln!("handshake: {e}"),
            };
            while let Some(Ok((request, respond))) = connection.accept().await {
                let (sender, app) = (sender.clone(), app.clone());
                tokio::spawn(async move {
                    if let Err(e) = exchange(request, respond, sender, &app).await {
                        eprintln!("stream: {e}");
                    }
                });
            }
        });
    }
}

/// One call: the head to the app, the body after it, the answer's head back, then its body and
/// trailers. Sequential, which a unary call allows (its body is whole before its answer).
async fn exchange(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    sender: h2::client::SendRequest<Bytes>,
    app: &str,
) -> Result<(), Error> {
    let (mut parts, mut body) = request.into_parts();
    parts.uri = at_app(&parts.uri, app)?;
    let mut sender = sender.ready().await?;
    let ended = body.is_end_stream();
    let (response, mut upload) = sender.send_request(Request::from_parts(parts, ()), ended)?;
    if !ended {
        pipe(&mut body, &mut upload).await?;
    }
    let (head, mut answer) = response.await?.into_parts();
    let ended = answer.is_end_stream();
    let mut download = respond.send_response(Response::from_parts(head, ()), ended)?;
    if !ended {
        pipe(&mut answer, &mut download).await?;
    }
    Ok(())
}

/// Copies one stream's DATA (within the receiver's window) and trailers to another, END_STREAM
/// on the last frame as it came.
async fn pipe(from: &mut RecvStream, to: &mut SendStream<Bytes>) -> Result<(), Error> {
    while let Some(data) = from.data().await {
        let mut data = data?;
        from.flow_control().release_capacity(data.len())?;
        let ended = from.is_end_stream();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let mut room = to.capacity();
            while room == 0 {
                room = poll_fn(|cx| to.poll_capacity(cx))
                    .await
                    .ok_or("the stream closed")??;
            }
            let chunk = data.split_to(room.min(data.len()));
            to.send_data(chunk, ended && data.is_empty())?;
        }
        if ended {
            return Ok(());
        }
    }
    match from.trailers().await? {
        Some(trailers) => to.send_trailers(trailers)?,
        None => to.send_data(Bytes::new(), true)?,
    }
    Ok(())
}
