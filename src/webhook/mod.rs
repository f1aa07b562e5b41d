//! `amazing-proxy webhook`: sidecar injection as a mutating admission webhook.
//!
//! An HTTPS server (hyper 1 over tokio-rustls) answering `AdmissionReview` v1 requests for pods on
//! `POST /mutate`, with `GET /healthz` (the process serves) and `GET /readyz` (the certificate is
//! loaded and the listener bound) for the Deployment's probes. The patch is computed by running the very same pure
//! injection as `amazing-proxy inject` ([`crate::inject::patch::inject_template`]) on the pod and
//! diffing the result against the original (`json_patch::diff`), so the webhook and `inject` agree
//! by construction; the cost is a patch that may replace whole list elements rather than the
//! smallest possible one, which the API server does not mind.
//!
//! Opt-in: which pods reach the webhook is decided by the MutatingWebhookConfiguration's selectors
//! (deploy/install.yaml: namespaces labelled `amazing-proxy.io/inject: enabled`, and pods labelled so
//! elsewhere), since an AdmissionReview carries no namespace labels; `--skip-namespaces` is a second
//! fence for the system namespaces and the webhook's own. A pod's opt-out (label or annotation
//! `amazing-proxy.io/inject: "false"`) is honoured here, and the label also by the objectSelector.
//!
//! Failures never pass silently: a pod we cannot inject is, by `--on-error`, either admitted
//! unchanged with a warning (shown by kubectl) and an error log line, or denied with the reason.
//!
//! Limits ([`connection`]): handshake, head, body and answer timeouts, an idle timeout, a
//! connection limit that makes room by closing the connection stalled the longest, a 3 MiB body
//! cap and a total on the bytes held across connections, so that no client can make the webhook
//! unavailable.
//!
//! Certificates: a rustls `ResolvesServerCert` checks the certificate and key files' modification
//! time, size and inode at each TLS handshake and re-reads them when they changed, so a rotated
//! Secret (kubelet swaps the mounted files atomically) is served from the next connection on, with
//! no restart and no timer. A pair that does not load (half-written, key not matching) is logged
//! and the previous one kept.

pub(crate) mod connection;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures_util::FutureExt as _;
use http::{Method, Request, Response, StatusCode, Version, header};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::inject::patch::{Options, Outcome, inject_template};
use crate::inject::{InjectDefaults, PatchError};
use crate::text_response::text;
use connection::{
    Admitted, BODY_TIMEOUT, BodyError, Budget, CLOSE_GRACE, Connections, Due, H1_MAX_BUF,
    H2_CONNECTION_WINDOW, H2_MAX_SEND_BUF, H2_MAX_STREAMS, H2_STREAM_WINDOW, HANDSHAKE_TIMEOUT,
    Held, MAX_BUFFERED, Reply, RequestMark, Watched, read_body,
};

/// How long the in-flight reviews get after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OnError {
    /// Admit the pod unchanged, with a warning in the response and an error in the log.
    Allow,
    /// Refuse the pod, with the reason in the response.
    Deny,
}

#[derive(Args, Clone, Debug)]
pub struct WebhookArgs {
    /// Address to serve HTTPS on; port 0 picks one (the bound address is printed on stdout).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub(crate) listen: SocketAddr,
    /// PEM certificate chain, leaf first; re-read when the file changes.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); re-read when the file changes.
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_key: PathBuf,
    /// What to do with a pod that cannot be injected (conflicting ports, bad annotation).
    #[arg(long, value_enum, default_value = "allow")]
    pub(crate) on_error: OnError,
    /// Namespaces whose pods are never injected (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub(crate) skip_namespaces: Vec<String>,
    /// Connections at once; at the limit the one stalled the longest (in its handshake, head,
    /// body, answer, or idle) is closed to make room.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) max_connections: u32,
    #[command(flatten)]
    pub(crate) defaults: InjectDefaults,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(
        "cannot load the TLS certificate {cert} and key {key}: {message}; check --tls-cert and --tls-key"
    )]
    Tls {
        cert: String,
        key: String,
        message: String,
    },
    #[error("cannot listen on {addr}: {source}; check --listen")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// What the request handler needs.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) options: Options,
    pub(crate) on_error: OnError,
    pub(crate) skip_namespaces: Vec<String>,
}

pub fn main(args: WebhookArgs) -> Result<(), WebhookError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WebhookError::Runtime)?;
    runtime.block_on(serve(args))
}

/// What every connection shares.
struct Server {
    config: Config,
    acceptor: tokio_rustls::TlsAcceptor,
    connections: Arc<Connections>,
    budget: Budget,
    /// Chosen by ALPN: `h2`, else HTTP/1.1.
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
}

fn http_builders() -> (auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>) {
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1.http1().max_buf_size(H1_MAX_BUF);
    let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    http2
        .http2()
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    (http1, http2)
}

async fn serve(args: WebhookArgs) -> Result<(), WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::new(&args.tls_cert, &args.tls_key, provider.clone())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Tls {
            cert: String::new(),
            key: String::new(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: args.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| WebhookError::Bind {
        addr: args.listen,
        source,
    })?;
    // On stdout so that scripts and tests that asked for port 0 can find the port.
    println!("amazing-proxy webhook: listening on https://{local}/mutate");
    tracing::info!(%local, max_connections = args.max_connections, "webhook listening");

    let (http1, http2) = http_builders();
    let server = Arc::new(Server {
        config: Config {
            options: args.defaults.options(),
            on_error: args.on_error,
            skip_namespaces: args.skip_namespaces,
        },
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        connections: Connections::new(usize::try_from(args.max_connections).unwrap_or(usize::MAX)),
        budget: Budget::new(MAX_BUFFERED),
        http1,
        http2,
    });
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(admitted) = server.connections.admit() else {
            // Every other connection is already being closed to make room: drop this one.
            tracing::debug!(%peer, "at --max-connections with nothing left to close: closed");
            continue;
        };
        tokio::spawn(serve_connection(server.clone(), tcp, peer, admitted));
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight reviews");
    server.connections.close_all();
    if tokio::time::timeout(SHUTDOWN_GRACE, server.connections.all_closed())
        .await
        .is_err()
    {
        tracing::warn!("in-flight reviews still running after {SHUTDOWN_GRACE:?}; closing them");
    }
    Ok(())
}

/// One client connection, from the TLS handshake to its close: every phase bounded (see
/// [`connection`]), and closed at once when the limit or the byte budget needs it.
async fn serve_connection(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
) {
    let conn = admitted.conn().clone();
    let tls = tokio::select! {
        biased;
        () = conn.evicted() => return tracing::debug!(%peer, "closed during the TLS handshake to make room"),
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, server.acceptor.accept(tcp)) => match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
        },
    };
    let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    conn.handshake_done(!http2);
    let service = {
        let (server, conn) = (server.clone(), conn.clone());
        hyper::service::service_fn(move |req| handle(req, server.clone(), conn.start()))
    };
    let builder = if http2 { &server.http2 } else { &server.http1 };
    let serving = builder.serve_connection(TokioIo::new(Watched::new(tls, conn.clone())), service);
    let mut serving = std::pin::pin!(serving);
    let why = loop {
        let (at, due) = conn.next();
        if at <= Instant::now() {
            match due {
                Due::Late(what) => {
                    let limit = if what.starts_with("no request head") {
                        connection::HEADER_TIMEOUT
                    } else {
                        connection::EXCHANGE_TIMEOUT
                    };
                    return tracing::debug!(%peer, "{what} {limit:?}: closed");
                }
                Due::Idle => break "idle",
            }
        }
        tokio::select! {
            biased;
            () = conn.evicted() => return tracing::debug!(%peer, "closed to make room (--max-connections, or the bytes it held)"),
            result = serving.as_mut() => return connection_ended(peer, result),
            () = conn.closing() => break "shutting down",
            () = conn.head_started() => {}
            () = tokio::time::sleep_until(at) => {}
        }
    };
    tracing::debug!(%peer, "closing ({why})");
    serving.as_mut().graceful_shutdown();
    tokio::select! {
        biased;
        () = conn.evicted() => {}
        result = serving.as_mut() => connection_ended(peer, result),
        () = tokio::time::sleep(CLOSE_GRACE) => tracing::debug!(%peer, "graceful close cut after {CLOSE_GRACE:?}"),
    }
}

fn connection_ended(
    peer: SocketAddr,
    result: Result<(), Box<dyn std::error::Error + Send + Sync>>,
) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A one-line text answer, in the shape the admin's are.
fn plain(status: StatusCode, message: impl Into<String>) -> Response<Bytes> {
    // A `Full` body is ready at once.
    text(status, message).map(|body| {
        body.collect()
            .now_or_never()
            .and_then(Result::ok)
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default()
    })
}

/// Serves one request; the answer's body holds the request open until the client has it.
async fn handle(
    req: Request<Incoming>,
    server: Arc<Server>,
    open: RequestMark,
) -> Result<Response<Reply>, Infallible> {
    let mut held = server.budget.hold(open.conn());
    let answer = route(req, &server, &mut held).await;
    // What a refused or bad request's body held goes back now, not when its answer is taken.
    server.budget.shrink(&mut held, answer.body().len());
    Ok(answer.map(|body| Reply::new(body, held, open)))
}

async fn route(req: Request<Incoming>, server: &Server, held: &mut Held) -> Response<Bytes> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => return plain(StatusCode::OK, "ok"),
        // The listener is bound only once the certificate has loaded, so answering at all means
        // ready; a rotated certificate that does not load leaves the previous one in service.
        (&Method::GET, "/readyz") => return plain(StatusCode::OK, "ready: certificate loaded"),
        (_, "/mutate") => {}
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: this server answers POST /mutate, GET /healthz and GET /readyz",
            );
        }
    }
    if req.method() != Method::POST {
        let mut resp = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: /mutate takes POST",
        );
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return resp;
    }
    let version = req.version();
    let deadline = Instant::now() + BODY_TIMEOUT;
    let declared = req.body().size_hint().exact();
    let body = match read_body(req.into_body(), declared, &server.budget, held, deadline).await {
        Ok(body) => body,
        Err(e) => return body_refused(&e, version),
    };
    let answer = review(&body, &server.config);
    drop(body);
    match answer {
        Ok(answer) => {
            let answer = Bytes::from(answer.to_string());
            if !server.budget.resize(held, answer.len(), deadline).await {
                return body_refused(&BodyError::Busy, version);
            }
            let mut resp = Response::new(answer);
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(message) => {
            tracing::warn!(%message, "bad admission request");
            plain(StatusCode::BAD_REQUEST, message)
        }
    }
}

/// The answer to a request whose body was not read whole. On HTTP/1.1 the rest of the body is
/// still in the connection, so it closes after the answer (HTTP/2 resets just the stream).
fn body_refused(error: &BodyError, version: Version) -> Response<Bytes> {
    let mut resp = match error {
        BodyError::TooLarge => {
            tracing::warn!("request body over the 3 MiB limit: refused");
            plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body larger than 3 MiB: the API server sends no AdmissionReview that large for an object it can store",
            )
        }
        BodyError::Busy => {
            tracing::warn!(
                "{} MiB of requests and responses already held: 503",
                MAX_BUFFERED >> 20
            );
            let mut resp = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the webhook holds as many request bytes as it may at once; retry",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            resp
        }
        BodyError::Timeout => {
            tracing::debug!("request body not in within {BODY_TIMEOUT:?}");
            plain(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {BODY_TIMEOUT:?}"),
            )
        }
        BodyError::Read(e) => plain(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        ),
    };
    if version < Version::HTTP_2 {
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Answers one AdmissionReview (the request body) with another; `Err` is a malformed request
/// (HTTP 400 with this message).
pub(crate) fn review(body: &[u8], config: &Config) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not JSON: {e}; expected an AdmissionReview"))?;
    let api_version = review.get("apiVersion").and_then(Value::as_str);
    let kind = review.get("kind").and_then(Value::as_str);
    if api_version != Some("admission.k8s.io/v1") || kind != Some("AdmissionReview") {
        return Err(format!(
            "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview, got {} {}; configure admissionReviewVersions: [v1]",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ));
    }
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or("the AdmissionReview has no `request` object")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or("request.uid is missing: it must be echoed in the response")?;
    let mut response = json!({"uid": uid, "allowed": true});
    match decide(request, config) {
        Decision::Allow => {}
        Decision::Patch(patch) => {
            let patch =
                serde_json::to_vec(&patch).map_err(|e| format!("cannot encode the patch: {e}"))?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Decision::Failed(what, error) => {
            tracing::error!(pod = %what, error = %error, on_error = ?config.on_error, "cannot inject pod");
            match config.on_error {
                OnError::Allow => {
                    response["warnings"] = json!([format!(
                        "amazing-proxy: {what} admitted without the sidecar: {error}"
                    )]);
                }
                OnError::Deny => {
                    response["allowed"] = json!(false);
                    response["status"] = json!({
                        "code": 400,
                        "reason": "BadRequest",
                        "message": format!("amazing-proxy: cannot inject {what}: {error}"),
                    });
                }
            }
        }
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

enum Decision {
    Allow,
    Patch(json_patch::Patch),
    Failed(String, PatchError),
}

fn decide(request: &Value, config: &Config) -> Decision {
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(request, |v, k| v.get(*k))
            .and_then(Value::as_str)
    };
    let is_pod = field(&["kind", "group"]) == Some("")
        && field(&["kind", "version"]) == Some("v1")
        && field(&["kind", "kind"]) == Some("Pod")
        && field(&["resource", "resource"]) == Some("pods")
        && field(&["subResource"]).is_none_or(str::is_empty);
    // Only new pods: an UPDATE cannot add containers, and a CONNECT or DELETE carries no pod to change.
    if !is_pod || field(&["operation"]) != Some("CREATE") {
        return Decision::Allow;
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return Decision::Allow;
    };
    let namespace = field(&["namespace"])
        .or_else(|| {
            pod.get("metadata")
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
        })
        .unwrap_or("default");
    if config.skip_namespaces.iter().any(|n| n == namespace) {
        return Decision::Allow;
    }
    let name = pod.get("metadata").and_then(|m| {
        m.get("name")
            .and_then(Value::as_str)
            .map(String::from)
            .or_else(|| {
                // Pods of a Deployment have only generateName at admission time.
                m.get("generateName")
                    .and_then(Value::as_str)
                    .map(|g| format!("{g}*"))
            })
    });
    let what = format!("pod {namespace}/{}", name.as_deref().unwrap_or("(unnamed)"));
    let mut patched = pod.clone();
    match inject_template(&mut patched, "", &config.options) {
        Ok(Outcome::Injected) => {
            let patch = json_patch::diff(pod, &patched);
            if patch.0.is_empty() {
                Decision::Allow
            } else {
                Decision::Patch(patch)
            }
        }
        Ok(outcome) => {
            tracing::debug!(pod = %what, ?outcome, "not injected");
            Decision::Allow
        }
        Err(error) => Decision::Failed(what, error),
    }
}

/// The certificate, re-read at a handshake when its files changed.
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Stamp, Arc<CertifiedKey>)>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

/// What tells that a file changed: modification time, size and inode (an atomic rename may keep
/// the mtime of a copied file, but not the inode).
type Stamp = [Option<(SystemTime, u64, u64)>; 2];

fn stamp(cert: &Path, key: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [cert, key].map(|p| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
    })
}

fn load(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, WebhookError> {
    let err = |message: String| WebhookError::Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(err("no CERTIFICATE block in the certificate file".into()));
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| err(format!("private key: {e}")))?;
    CertifiedKey::from_der(chain, private, provider)
        .map(Arc::new)
        .map_err(|e| err(format!("{e} (does the key belong to the certificate?)")))
}

impl ReloadingCert {
    fn new(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, WebhookError> {
        let before = stamp(cert, key);
        let loaded = load(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert: cert.into(),
            key: key.into(),
            provider,
            current: Mutex::new((before, loaded)),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamp(&self.cert, &self.key);
        if now != current.0 {
            // Remember the stamp even on failure: one log line per change, not one per handshake.
            current.0 = now;
            match load(&self.cert, &self.key, &self.provider) {
                Ok(key) => {
                    current.1 = key;
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate changed but does not load; serving the previous one")
                }
            }
        }
        Some(current.1.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::annotations::Settings;

    fn config(on_error: OnError) -> Config {
        Config {
            options: Options {
                defaults: Settings {
                    cpu_request: None,
                    memory_request: None,
                    ..Settings::example()
                },
                legacy_sidecar: false,
            },
            on_error,
            skip_namespaces: vec!["kube-system".into()],
        }
    }

    fn request(namespace: &str, pod: Value) -> Vec<u8> {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": "CREATE", "object": pod}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn patches_pods_and_skips_namespaces() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let answer =
            review(&request("default", pod.clone()), &config(OnError::Allow)).expect("valid");
        assert_eq!(answer["response"]["uid"], "u1");
        assert_eq!(answer["response"]["patchType"], "JSONPatch");
        let answer = review(&request("kube-system", pod), &config(OnError::Allow)).expect("valid");
        assert_eq!(answer["response"], json!({"uid": "u1", "allowed": true}));
    }

    #[test]
    fn errors_follow_on_error() {
        let pod =
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "amazing-proxy"}]}});
        let allowed =
            review(&request("default", pod.clone()), &config(OnError::Allow)).expect("valid");
        assert_eq!(allowed["response"]["allowed"], true);
        assert!(
            allowed["response"]["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("spec.containers[0].name"))
        );
        let denied = review(&request("default", pod), &config(OnError::Deny)).expect("valid");
        assert_eq!(denied["response"]["allowed"], false);
        assert_eq!(denied["response"]["status"]["code"], 400);
    }

    #[test]
    fn a_pod_running_as_the_proxy_is_denied_with_the_field() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"securityContext": {"runAsGroup": 1337},
            "containers": [{"name": "app"}]}});
        let denied = review(&request("default", pod), &config(OnError::Deny)).expect("valid");
        assert_eq!(denied["response"]["allowed"], false);
        let message = denied["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(
            message.starts_with(
                "amazing-proxy: cannot inject pod default/p: spec.securityContext.runAsGroup: 1337 is the proxy's gid, which applies to spec.containers[0];"
            ),
            "{message}"
        );
    }

    #[test]
    fn malformed_requests_are_rejected() {
        assert!(review(b"{", &config(OnError::Allow)).is_err());
        assert!(
            review(
                br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}"#,
                &config(OnError::Allow)
            )
            .is_err()
        );
        assert!(review(br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}"#, &config(OnError::Allow)).is_err());
    }
}
