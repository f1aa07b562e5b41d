//! The admin listener: `/live`, `/ready`, `/metrics`, `GET /tap` (the live stream of records,
//! [`crate::telemetry::tap`]) and `POST /shutdown`.
//!
//! It runs on a thread and runtime of its own: a slow or huge metrics scrape, or an app readiness
//! check waiting on a hung app, never takes CPU time from the data plane's worker.
//!
//! Injected pods bind it on all addresses (kubelet probes need it), so what changes state is
//! refused to everyone but loopback, as Linkerd does: any pod that can reach the pod's IP could
//! otherwise drain its sidecar. So is `/tap`, which shows every request's path and peers.

use crate::text_response::text;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{Either, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::proxy::Shared;
use crate::proxy::drain::Phase;
use crate::telemetry::tap::{MAX_READERS, TapFilter};

const APP_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct AdminState {
    pub(crate) shared: std::sync::Arc<Shared>,
    pub(crate) app_ready_path: Option<String>,
}

pub(crate) fn spawn(listener: std::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            runtime.block_on(serve(listener, state));
        })?;
    Ok(())
}

async fn serve(listener: std::net::TcpListener, state: AdminState) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("admin listener unusable: {e}");
            return;
        }
    };
    let state = std::sync::Arc::new(state);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let loopback = peer.ip().to_canonical().is_loopback();
            let service = service_fn(move |req| route(state.clone(), loopback, req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("admin connection ended: {e}");
            }
        });
    }
}

/// A fixed answer, or the live stream of `/tap`.
type AdminBody = Either<Full<Bytes>, StreamBody<TapStream>>;
type TapStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

async fn route(
    state: std::sync::Arc<AdminState>,
    loopback: bool,
    req: Request<Incoming>,
) -> Result<Response<AdminBody>, Infallible> {
    if req.uri().path() == "/tap" {
        return Ok(tap(&state, loopback, &req));
    }
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => ready(&state).await,
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.shared.telemetry.encode_metrics());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::POST, "/shutdown") if !loopback => text(
            StatusCode::FORBIDDEN,
            "forbidden: /shutdown is only accepted from loopback (exec into the pod, or send SIGTERM)\n",
        ),
        (&Method::POST, "/shutdown") => {
            state.shared.drain.advance(Phase::Draining);
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/shutdown") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: /shutdown takes POST, the others GET\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live, /ready, /metrics, /tap or POST /shutdown\n",
        ),
    };
    Ok(response.map(Either::Left))
}

/// `GET /tap?filters`: the records that pass, one JSON line each, as they happen, until the
/// reader leaves (`amazing-proxy tap` prints them for a person).
fn tap(state: &AdminState, loopback: bool, req: &Request<Incoming>) -> Response<AdminBody> {
    let refused = |status, message: String| text(status, message).map(Either::Left);
    if req.method() != Method::GET {
        return refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: /tap takes GET\n".into(),
        );
    }
    if !loopback {
        return refused(
            StatusCode::FORBIDDEN,
            "forbidden: /tap is only served to loopback (exec into the pod: amazing-proxy tap)\n"
                .into(),
        );
    }
    let filter = match TapFilter::from_query(req.uri().query().unwrap_or("")) {
        Ok(filter) => filter,
        Err(e) => return refused(StatusCode::BAD_REQUEST, format!("bad request: {e}\n")),
    };
    let tap = &state.shared.telemetry.tap;
    let Some(subscription) = tap.subscribe(filter) else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: {MAX_READERS} readers of /tap already; try again later\n"),
        );
    };
    let lines = futures_util::stream::unfold(subscription, |subscription| async move {
        let lines = subscription.next().await;
        let mut chunk = BytesMut::with_capacity(lines.iter().map(Bytes::len).sum());
        for line in lines {
            chunk.extend_from_slice(&line);
        }
        Some((Ok(Frame::data(chunk.freeze())), subscription))
    });
    let stream: TapStream = Box::pin(lines);
    let mut response = Response::new(Either::Right(StreamBody::new(stream)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

async fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    match state.shared.drain.phase() {
        Phase::Starting => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: listeners not bound yet\n",
            );
        }
        Phase::Draining | Phase::Closing => {
            return text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n");
        }
        Phase::Serving => {}
    }
    if let Some(mtls) = &state.shared.mtls
        && let Some(problem) = mtls.identity.problem()
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: workload identity: {problem}\n"),
        );
    }
    let app = state.shared.settings.traffic.app;
    if let Some(path) = &state.app_ready_path
        && let Err(why) = check_app(app, path).await
    {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: app at {app}{path}: {why}\n"),
        );
    }
    match state.shared.routes_problem() {
        // Ready: the last good routes serve; the detail says the file on disk is not them.
        Some(problem) => text(
            StatusCode::OK,
            format!("ready\nroutes: the file on disk is not in force: {problem}\n"),
        ),
        None => text(StatusCode::OK, "ready\n"),
    }
}

/// GET the app's readiness path; ready means a 2xx within a second.
async fn check_app(app: SocketAddr, path: &str) -> Result<(), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(app)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, app.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let status = sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?
            .status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(APP_CHECK_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 1s".into()))
}
