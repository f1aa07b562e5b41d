//! Mutual TLS over HBONE, in process on loopback: identities validated as they load, tunnels
//! between two data planes built by `Shared::new` (the server's HBONE listener, the client's
//! pooled HBONE client), refusals (another CA, another trust domain, an unexpected peer), the
//! inbound plaintext modes, and a certificate rotated under open connections. Two pods in network
//! namespaces calling each other are the netns suite's `mtls`.

use crate::support;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::support::http::{BlackHole, TestApp};
use crate::support::identity::{CLIENT_ID, Ca, Leaf, PARTNER_ID, SERVER_ID, bundle_dir};
use crate::support::in_process::{Captured, run_args};
use crate::support::raw::{RecordingApp, answer, ok};
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use amazing_proxy::identity::bundles::{Authorities, BundleSet};
use amazing_proxy::identity::leaf::LeafProblem;
use amazing_proxy::identity::material::{Files, MaterialError, load};
use amazing_proxy::identity::tls;
use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::hbone::outbound::{OpenError, Tunnel};
use amazing_proxy::proxy::listener::Listener;
use amazing_proxy::telemetry::metrics::Direction;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A data plane with `identity` (an `--identity-dir`) and `extra` flags.
fn data_plane(app: SocketAddr, identity: &Path, extra: &[&str]) -> (Arc<Shared>, Captured) {
    let app = app.to_string();
    let dir = identity.display().to_string();
    let mut args = vec!["--app", &app, "--proxy-mark", "0", "--identity-dir", &dir];
    args.extend_from_slice(extra);
    let args = run_args(&args);
    args.validate().expect("valid flags");
    let log = Captured::default();
    (
        Shared::new(&args.proxy_config(), Box::new(log.clone())),
        log,
    )
}

/// Starts the HBONE listener of `shared` on loopback; returns its address.
async fn hbone_listener(shared: &Arc<Shared>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(Listener::hbone(shared.clone(), listener).run());
    addr
}

/// Opens a tunnel from `client` through the HBONE listener at `hbone` to `target`.
async fn open(client: &Shared, hbone: SocketAddr, target: SocketAddr) -> Result<Tunnel, OpenError> {
    let mtls = client.mtls.as_ref().expect("the client has an identity");
    let from: SocketAddr = "127.0.0.1:40000".parse().expect("address");
    bounded(
        "opening a tunnel",
        WAIT,
        mtls.pool.open(client, mtls, hbone, target, Some(from)),
    )
    .await
}

/// GET `path` over `tunnel` (HTTP/1.1); returns the status.
async fn get(
    tunnel: Tunnel,
    path: &str,
) -> (u16, hyper::client::conn::http1::SendRequest<Empty<Bytes>>) {
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tunnel.io))
            .await
            .expect("HTTP/1.1 in the tunnel");
    tokio::spawn(async move {
        let _slot = tunnel.slot;
        let _ = conn.await;
    });
    let status = send_status(&mut sender, path).await;
    (status, sender)
}

async fn send_status(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> u16 {
    send_with(sender, path, &[]).await
}

/// GET `path` with `fields` on `sender`; returns the status.
async fn send_with(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    fields: &[(&str, &str)],
) -> u16 {
    let mut req = http::Request::get(path).header("host", "backend");
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::new()).expect("request");
    let response = bounded("a response", WAIT, sender.send_request(req))
        .await
        .expect("a response through the tunnel");
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

struct Pair {
    app: TestApp,
    server: Arc<Shared>,
    server_log: Captured,
    hbone: SocketAddr,
    client: Arc<Shared>,
    _dirs: tempfile::TempDir,
}

/// A server data plane (identity SERVER_ID) and a client one (CLIENT_ID) from the same CA.
async fn pair(ca: &Ca, client_ca: &Ca, client_id: &str, client_flags: &[&str]) -> Pair {
    let dirs = tempfile::tempdir().expect("temp dir");
    ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
    client_ca.write_dir(&dirs.path().join("client"), &client_ca.issue(client_id));
    let app = TestApp::start().await;
    let (server, server_log) = data_plane(app.addr, &dirs.path().join("server"), &[]);
    let hbone = hbone_listener(&server).await;
    let (client, _) = data_plane(app.addr, &dirs.path().join("client"), client_flags);
    Pair {
        app,
        server,
        server_log,
        hbone,
        client,
        _dirs: dirs,
    }
}

/// The access-log record of the request whose original URL ends with `path`.
async fn record_of(log: &Captured, path: &str) -> serde_json::Value {
    log.record(|r| {
        r["original_url"]
            .as_str()
            .is_some_and(|u| u.ends_with(path))
    })
    .await
}

/// A server data plane (SERVER_ID, `server_flags`, its HBONE listener) and a client one
/// (CLIENT_ID) from one CA, both in front of the app at `app`.
struct Planes {
    server: Arc<Shared>,
    server_log: Captured,
    hbone: SocketAddr,
    client: Arc<Shared>,
    _dirs: tempfile::TempDir,
}

async fn planes(app: SocketAddr, server_flags: &[&str]) -> Planes {
    let ca = Ca::new("mesh CA");
    let dirs = tempfile::tempdir().expect("temp dir");
    ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
    ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
    let (server, server_log) = data_plane(app, &dirs.path().join("server"), server_flags);
    let hbone = hbone_listener(&server).await;
    let (client, _) = data_plane(app, &dirs.path().join("client"), &[]);
    Planes {
        server,
        server_log,
        hbone,
        client,
        _dirs: dirs,
    }
}

#[tokio::test]
async fn a_tunnel_carries_http_to_the_app_and_the_log_names_the_client() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let p = pair(&ca, &ca, CLIENT_ID, &[]).await;
        let tunnel = open(&p.client, p.hbone, p.app.addr).await.expect("tunnel");
        assert_eq!(&*tunnel.peer, SERVER_ID, "the client verified the server");
        let traceparent = tunnel.traceparent.clone();
        let (status, _sender) = get(tunnel, "/status/201").await;
        assert_eq!(status, 201);
        let record = record_of(&p.server_log, "/status/201").await;
        assert_eq!(record["peer"], CLIENT_ID, "{record}");
        assert_eq!(record["direction"], "inbound");
        assert_eq!(record["status"], 201);
        // The traceparent the client sent on CONNECT ties the server's record to the tunnel.
        assert_eq!(
            record["tunnel_traceparent"],
            traceparent.as_str(),
            "{record}"
        );
        let metrics = p.server.telemetry.metrics.encode();
        let peer_label = format!("peer=\"{CLIENT_ID}\"");
        let streams = support::metrics::metric(
            &metrics,
            "amazing_proxy_hbone_streams_total",
            &["direction=\"inbound\"", &peer_label],
        );
        assert_eq!(streams, Some(1.0), "{metrics}");
    })
    .await;
}

/// A recording app answering 200, the two data planes in front of it, and a tunnel through them
/// that carried `GET /first` (answered 200); the tunnel's HTTP/1.1 sender for more.
async fn first_request_in_a_tunnel() -> (
    RecordingApp,
    Planes,
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) {
    let app = RecordingApp::start(|_| answer(ok("ok"))).await;
    let p = planes(app.addr, &[]).await;
    let tunnel = open(&p.client, p.hbone, app.addr).await.expect("tunnel");
    let (status, sender) = get(tunnel, "/first").await;
    assert_eq!(status, 200);
    (app, p, sender)
}

/// x-forwarded-client-cert is the proxy's: the app behind the server learns the verified peer in
/// Envoy's format, `By=<server>;URI=<client>`, and never what the client wrote there; the other
/// forwarding fields the client wrote do not pass either.
#[tokio::test]
async fn the_app_learns_the_verified_peer_and_never_a_forged_one() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, _planes, mut sender) = first_request_in_a_tunnel().await;
        let forged = [
            (
                "x-forwarded-client-cert",
                "By=spiffe://cluster.local/ns/shop/sa/backend;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
            ),
            ("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/kube-system/sa/admin"),
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ];
        assert_eq!(send_with(&mut sender, "/second", &forged).await, 200);
        let ours = format!("By={SERVER_ID};URI={CLIENT_ID}");
        let requests = app.requests();
        assert_eq!(requests.len(), 2);
        for received in requests {
            let at_app = received.message;
            assert_eq!(at_app.headers("x-forwarded-client-cert"), [ours.as_str()], "{}", at_app.head);
            assert_eq!(at_app.header("forwarded"), None, "{}", at_app.head);
            let forwarded_for = at_app.header("x-forwarded-for").unwrap_or_default();
            assert!(!forwarded_for.contains("203.0.113.9"), "{}", at_app.head);
        }
    })
    .await;
}

/// A tunnel's HTTP/1.1 is served like a plaintext client's: its requests go on the app connection
/// the CONNECT dialled (one connection at the app, not a second dialled for the requests), and a
/// request the fast path hands to hyper (HTTP/1.0) still gets its answer, nothing of it lost.
#[tokio::test]
async fn a_tunnels_requests_go_on_the_app_connection_its_connect_opened() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, p, mut sender) = first_request_in_a_tunnel().await;
        assert_eq!(send_status(&mut sender, "/second").await, 200);
        let requests = app.requests();
        let on: Vec<(usize, String)> = (requests.iter())
            .map(|r| (r.connection, r.message.target().to_string()))
            .collect();
        assert_eq!(on, [(1, "/first".into()), (1, "/second".into())]);
        assert_eq!(
            app.connections(),
            1,
            "no connection dialled beside the CONNECT's"
        );
        let old = http::Request::get("/old")
            .version(http::Version::HTTP_10)
            .header("host", "backend")
            .body(Empty::new())
            .expect("request");
        let response = bounded("a response", WAIT, sender.send_request(old))
            .await
            .expect("an answer to HTTP/1.0 through the tunnel");
        assert_eq!(response.status(), 200);
        let requests = app.requests();
        assert_eq!(requests.len(), 3, "{requests:?}");
        assert_eq!(requests[2].message.target(), "/old");
        let record = record_of(&p.server_log, "/old").await;
        assert_eq!(record["peer"], CLIENT_ID, "{record}");
    })
    .await;
}

/// An HBONE server of the test's own (TLS with SERVER_ID's material, HTTP/2) that answers 200 to
/// every CONNECT and hands over the request headers of the first.
async fn recording_hbone_server(
    server: &Path,
) -> (SocketAddr, tokio::sync::oneshot::Receiver<http::HeaderMap>) {
    let material = load(
        &Files::Dir(server.to_owned()),
        "cluster.local",
        None,
        SystemTime::now(),
    )
    .expect("server material");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(material.server.clone())
            .accept(tcp)
            .await
            .expect("TLS");
        let tx = std::sync::Mutex::new(Some(tx));
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                if let Some(tx) = tx.lock().expect("lock").take() {
                    let _ = tx.send(req.headers().clone());
                }
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
                }
            });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .await;
    });
    (addr, rx)
}

#[tokio::test]
async fn every_connect_carries_traceparent_baggage_and_forwarded() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let (hbone, headers) = recording_hbone_server(&dirs.path().join("server")).await;
        let target: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let (client, _) = data_plane(target, &dirs.path().join("client"), &[]);
        let tunnel = open(&client, hbone, target).await.expect("tunnel");
        let headers = bounded("the CONNECT's headers", WAIT, headers)
            .await
            .expect("the server saw a CONNECT");
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_else(|| panic!("no {name} header: {headers:?}"))
                .to_owned()
        };

        let traceparent = text("traceparent");
        assert_eq!(
            traceparent, tunnel.traceparent,
            "the tunnel knows what it sent"
        );
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3].len()),
            ("00", 32, 16, 2)
        );
        let hex = |s: &str| {
            s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        };
        assert!(parts.iter().all(|p| hex(p)), "{traceparent}");
        assert!(parts[1].bytes().any(|c| c != b'0') && parts[2].bytes().any(|c| c != b'0'));

        assert_eq!(text("forwarded"), "for=\"127.0.0.1:40000\"");

        // The client's own namespace (from its identity, or the downward API's POD_NAMESPACE).
        let baggage = text("baggage");
        if std::env::var_os("POD_NAME").is_none() && std::env::var_os("POD_NAMESPACE").is_none() {
            assert_eq!(baggage, "k8s.namespace.name=shop");
        } else {
            eprintln!(
                "SKIP exact baggage check: POD_NAME/POD_NAMESPACE are set in this environment"
            );
            assert!(baggage.starts_with("k8s.namespace.name="), "{baggage}");
        }

        // A second tunnel on the same pooled connection starts a trace of its own.
        drop(tunnel);
        let again = open(&client, hbone, target).await.expect("second tunnel");
        assert_ne!(again.traceparent, traceparent);
    })
    .await;
}

/// What an HBONE peer of the test's own saw its client send on one connection: every plaintext
/// byte after the TLS handshake, and whether the stream ended with TLS's close_notify (a clean
/// end of file) rather than a bare TCP close.
#[derive(Clone, Default)]
struct Heard {
    bytes: Arc<std::sync::Mutex<Vec<u8>>>,
    close_notify: Arc<std::sync::atomic::AtomicBool>,
}

impl Heard {
    /// The HTTP/2 frames heard, as (type, stream, payload), after the client's preface.
    fn frames(&self) -> Vec<(u8, u32, Vec<u8>)> {
        let bytes = self.bytes.lock().expect("lock").clone();
        let mut rest = bytes
            .strip_prefix(amazing_proxy::proxy::detect::H2_PREFACE)
            .unwrap_or_else(|| panic!("no HTTP/2 preface in {} bytes", bytes.len()));
        let mut frames = Vec::new();
        while rest.len() >= 9 {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            let end = (9 + len).min(rest.len());
            frames.push((rest[3], stream, rest[9..end].to_vec()));
            rest = &rest[end..];
        }
        frames
    }
}

/// The TLS stream an HBONE peer of the test's own reads its client through, noting what it heard.
struct Listening<T> {
    io: T,
    heard: Heard,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Listening<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            let new = &buf.filled()[before..];
            if new.is_empty() {
                // tokio-rustls ends a stream cleanly only on close_notify; a bare TCP close is an
                // error (UnexpectedEof).
                (self.heard.close_notify).store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.heard
                .bytes
                .lock()
                .expect("lock")
                .extend_from_slice(new);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Listening<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HBONE peer of the test's own (TLS with `server`'s material, HTTP/2 by the `h2` crate) that
/// answers 200 to every CONNECT on its first connection and ends the tunnels at once. Resolves,
/// once that connection has ended, to what it heard on it.
async fn listening_hbone_server(server: &Path) -> (SocketAddr, tokio::task::JoinHandle<Heard>) {
    let material = load(
        &Files::Dir(server.to_owned()),
        "cluster.local",
        None,
        SystemTime::now(),
    )
    .expect("server material");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let ended = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let tls = tokio_rustls::TlsAcceptor::from(material.server.clone())
            .accept(tcp)
            .await
            .expect("TLS");
        let heard = Heard::default();
        let io = Listening {
            io: tls,
            heard: heard.clone(),
        };
        let mut conn = h2::server::handshake(io).await.expect("HTTP/2");
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            let _ = respond.send_response(http::Response::new(()), true);
        }
        heard
    });
    (addr, ended)
}

#[tokio::test]
async fn an_idle_pooled_connection_ends_with_goaway_and_close_notify() {
    bounded("test", TEST_TIMEOUT, async {
        const GOAWAY: u8 = 0x7;
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let (hbone, ended) = listening_hbone_server(&dirs.path().join("server")).await;
        let target: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let flags = ["--pool-idle-timeout", "200ms"];
        let (client, _) = data_plane(target, &dirs.path().join("client"), &flags);
        drop(open(&client, hbone, target).await.expect("tunnel"));

        // The pool closes the connection once it has been idle: politely, so that the peer
        // knows no stream was cut (RFC 9113 6.8) and TLS was not truncated (RFC 8446 6.1).
        let heard = bounded("the idle connection's end", WAIT, ended)
            .await
            .expect("the peer's task");
        let goaways: Vec<_> = heard
            .frames()
            .into_iter()
            .filter(|(kind, _, _)| *kind == GOAWAY)
            .map(|(_, stream, payload)| (stream, payload.get(4..8).map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            goaways,
            [(0, Some(vec![0, 0, 0, 0]))],
            "one GOAWAY (NO_ERROR) on stream 0"
        );
        assert!(
            heard.close_notify.load(std::sync::atomic::Ordering::SeqCst),
            "TLS ended with close_notify"
        );
    })
    .await;
}

/// Accepts TCP connections on loopback and counts them; with `to`, relays each to it.
async fn counting_relay(
    to: Option<SocketAddr>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                match to {
                    Some(to) => {
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }
                    // Holds the connection without a word: a TLS handshake that never completes.
                    None => {
                        let mut sink = Vec::new();
                        let _ = inbound.read_to_end(&mut sink).await;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn a_burst_of_new_connections_to_a_peer_shares_one_handshake() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let p = pair(&ca, &ca, CLIENT_ID, &[]).await;
        let (relay, dials) = counting_relay(Some(p.hbone)).await;
        let burst: Vec<_> = (0..20)
            .map(|_| open(&p.client, relay, p.app.addr))
            .collect();
        let tunnels = futures_util::future::join_all(burst).await;
        assert!(tunnels.iter().all(Result::is_ok), "every tunnel opened");
        assert_eq!(
            dials.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "20 tunnels opened at once to one peer share one HBONE connection"
        );
    })
    .await;
}

#[tokio::test]
async fn a_burst_waiting_on_a_failing_dial_shares_its_failure() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let (silent, dials) = counting_relay(None).await;
        let target: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        let (client, _) = data_plane(
            target,
            &dirs.path().join("client"),
            &["--connect-timeout", "1s"],
        );
        let burst: Vec<_> = (0..10).map(|_| open(&client, silent, target)).collect();
        let results = futures_util::future::join_all(burst).await;
        for result in &results {
            let error = result
                .as_ref()
                .err()
                .expect("no tunnel through a silent peer");
            assert!(error.to_string().contains("TLS handshake"), "{error}");
        }
        assert_eq!(
            dials.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the callers that waited for the one dial took its failure instead of dialling again"
        );
    })
    .await;
}

#[tokio::test]
async fn opaque_bytes_cross_the_tunnel_with_the_peer_logged() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        // An echo server that speaks first-less binary: the stream is opaque.
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(&buf[..n]).await.expect("write");
        });
        let port = echo_addr.port().to_string();
        let (server, log) = data_plane(
            echo_addr,
            &dirs.path().join("server"),
            &["--opaque-ports", &port],
        );
        let hbone = hbone_listener(&server).await;
        let (client, _) = data_plane(echo_addr, &dirs.path().join("client"), &[]);
        let mut tunnel = open(&client, hbone, echo_addr).await.expect("tunnel");
        let traceparent = tunnel.traceparent.clone();
        tunnel.io.write_all(b"\x00\x01binary").await.expect("write");
        let mut back = [0u8; 8];
        bounded("the echo", WAIT, tunnel.io.read_exact(&mut back))
            .await
            .expect("echo");
        assert_eq!(&back, b"\x00\x01binary");
        drop(tunnel);
        let record = log.record(|r| r["protocol"] == "TCP").await;
        assert_eq!(record["peer"], CLIENT_ID, "{record}");
        assert_eq!(
            record["tunnel_traceparent"],
            traceparent.as_str(),
            "{record}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_both_ways() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let rogue = Ca::new("rogue CA");
        // The client's certificate is the rogue's: the server refuses it (and the client, trusting
        // only the rogue, refuses the server).
        let p = pair(&ca, &rogue, CLIENT_ID, &[]).await;
        let refused = open(&p.client, p.hbone, p.app.addr).await;
        assert!(
            matches!(refused, Err(OpenError::Failed { .. })),
            "{:?}",
            refused.err()
        );
        assert_eq!(p.app.connections(), 0, "nothing reached the app");
    })
    .await;
}

/// A TLS client of ours with `material`'s certificate that accepts any server of `server_domain`
/// issued by `server_ca`: it reaches the server's own checks of the client.
async fn handshake_then_read(
    hbone: SocketAddr,
    material: &amazing_proxy::identity::material::Material,
    server_domain: &str,
    server_ca: &Ca,
) -> std::io::Result<usize> {
    let bundles = BundleSet::new(
        server_domain,
        vec![server_ca.der().into()],
        "the server's CA",
        Authorities::new(),
        "",
    )
    .expect("bundle set");
    let config =
        tls::client_config(material.key.clone(), Arc::new(bundles), None).expect("client config");
    let tcp = TcpStream::connect(hbone).await?;
    let name = rustls_pki_types::ServerName::IpAddress(hbone.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    // TLS 1.3: the server judges the client's certificate after the client's handshake ends, and
    // says so with an alert that this read receives.
    tls.write_all(amazing_proxy::proxy::detect::H2_PREFACE)
        .await?;
    let mut buf = [0u8; 64];
    tls.read(&mut buf).await
}

#[tokio::test]
async fn an_identity_of_another_trust_domain_is_refused() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        let foreign = "spiffe://other.example/ns/shop/sa/frontend";
        ca.write_dir(&dirs.path().join("foreign"), &ca.issue(foreign));
        let p = pair(&ca, &ca, CLIENT_ID, &[]).await;
        let material = load(
            &Files::Dir(dirs.path().join("foreign")),
            "other.example",
            None,
            SystemTime::now(),
        )
        .expect("valid in its own trust domain");
        let read = bounded(
            "the refusal",
            WAIT,
            handshake_then_read(p.hbone, &material, "cluster.local", &ca),
        )
        .await;
        assert!(
            read.is_err() || read.as_ref().is_ok_and(|n| *n == 0),
            "the server kept a client of another trust domain: {read:?}"
        );
        // The same client with a certificate of our trust domain gets through the handshake.
        let ours = p
            .client
            .mtls
            .as_ref()
            .and_then(|m| m.identity.material())
            .expect("material");
        let read = bounded(
            "the handshake",
            WAIT,
            handshake_then_read(p.hbone, &ours, "cluster.local", &ca),
        )
        .await;
        assert!(
            read.is_ok_and(|n| n > 0),
            "our own trust domain must pass (the server's SETTINGS)"
        );
        assert_eq!(p.app.connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_identity_is_refused() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        let peers = dirs.path().join("peers");
        std::fs::write(
            &peers,
            "127.0.0.0/8 spiffe://cluster.local/ns/shop/sa/payments\n",
        )
        .expect("write");
        let peers = peers.display().to_string();
        let p = pair(&ca, &ca, CLIENT_ID, &["--peer-identities", &peers]).await;
        let refused = open(&p.client, p.hbone, p.app.addr).await;
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("expected spiffe://cluster.local/ns/shop/sa/payments"),
            "{message}"
        );
        assert_eq!(p.app.connections(), 0);
    })
    .await;
}

#[tokio::test]
async fn the_authority_must_be_this_pod_and_the_app_must_answer() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let p = pair(&ca, &ca, CLIENT_ID, &[]).await;
        // The TLS connection arrives on 127.0.0.1: another address is not this pod's.
        let elsewhere: SocketAddr = format!("127.0.0.2:{}", p.app.addr.port())
            .parse()
            .expect("address");
        let message = open(&p.client, p.hbone, elsewhere)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("answered 400"), "{message}");
        let closed = support::http::ReservedPort::new();
        let nothing = closed.addr;
        let message = open(&p.client, p.hbone, nothing)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("answered 502"), "{message}");
    })
    .await;
}

/// A port whose dials hang: its accept queue is full and never drained, so the kernel drops their
/// SYNs. Checked here: were they refused or accepted instead, a dial to it would end at once, and a
/// test that needs one held open would tell nothing.
async fn hanging_port() -> BlackHole {
    let hole = BlackHole::new();
    let probe = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        TcpStream::connect(hole.addr),
    )
    .await;
    assert!(
        probe.is_err(),
        "a connect to {} (a full accept queue) must hang with its SYN dropped, but it ended: \
         {probe:?}. This kernel does not drop SYNs to a full accept queue \
         (net.ipv4.tcp_abort_on_overflow=1?), so this test cannot hold a dial open",
        hole.addr
    );
    hole
}

/// A peer of the mesh (`client`'s certificate) speaking raw HTTP/2 to the HBONE listener at
/// `hbone`: it sends what the test wants, where our own client would not.
async fn raw_hbone_peer(hbone: SocketAddr, client: &Shared) -> h2::client::SendRequest<Bytes> {
    let tls = tls_to(hbone, client).await;
    let (sender, conn) = bounded("the HTTP/2 handshake", WAIT, h2::client::handshake(tls))
        .await
        .expect("HTTP/2");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Whether `want` inbound connections are open in `server` (the gauge), and what is otherwise.
fn open_inbound(server: &Shared, want: usize) -> Result<(), String> {
    let now = counted(
        server,
        "amazing_proxy_open_connections",
        &["direction=\"inbound\""],
    );
    (now == want as f64).then_some(()).ok_or_else(|| {
        format!(
            "{now} inbound connections open, expected {want}; --max-connections counts {}",
            server.limits.open_connections()
        )
    })
}

/// An attacker peer that opens a CONNECT with a stream window of 0 (legal: `SETTINGS_INITIAL_WINDOW_SIZE`
/// 0, and never a WINDOW_UPDATE) so that nothing can be written back, then sends requests the
/// proxy refuses: an ambiguous path (400 from the driver, the slot already busy) and a malformed
/// head (400 before any exchange). Each refusal's write is bounded (twice
/// --response-body-timeout), so each stream gives its --max-connections slot back instead of
/// holding it for good; PINGs keep the HBONE connection itself alive meanwhile.
#[tokio::test]
async fn a_peer_that_never_opens_its_window_cannot_hold_a_refused_streams_slot() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let flags = ["--response-body-timeout", "300ms", "--idle-timeout", "60s"];
        let p = planes(app.addr, &flags).await;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tls_to(p.hbone, &p.client).await)
            .await
            .expect("HTTP/2");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut streams = Vec::new();
        for head in [
            &b"GET /%2e%2e/admin HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
        ] {
            let mut sender = bounded("ready", WAIT, sender.clone().ready())
                .await
                .expect("ready");
            let connect = http::Request::connect(app.addr.to_string())
                .body(())
                .expect("request");
            let (response, mut send) = sender.send_request(connect, false).expect("CONNECT");
            let response = bounded("the CONNECT's answer", WAIT, response)
                .await
                .expect("an answer");
            assert_eq!(response.status(), 200);
            send.send_data(Bytes::from_static(head), false)
                .expect("the request");
            streams.push((send, response));
        }
        // The HBONE connection's own slot stays; the two streams' are given back.
        eventually(
            "the refused streams to give their slots back",
            WAIT,
            || async { open_inbound(&p.server, 1) },
        )
        .await;
        drop(streams);
    })
    .await;
}

/// A peer with a valid certificate that opens CONNECT streams and resets them before their answer
/// (HEADERS then RST_STREAM, the "rapid reset" pattern) holds nothing once it has reset them: each
/// stream's task gives back its app dial and its --max-connections slot at once, not at
/// --connect-timeout. h2 forgets a stream its peer resets, so the 200-stream limit never stops
/// such a peer: more than 200 are sent here, and the last rounds' streams are dialled too.
#[tokio::test]
async fn a_peer_resetting_streams_before_their_answer_holds_no_slot() {
    // Five rounds of 50: 250 streams, more than the server's 200 concurrent streams.
    const ROUNDS: usize = 5;
    const STREAMS: usize = 50;
    bounded("test", TEST_TIMEOUT, async {
        // The streams' target: their dials hang until the server gives them up.
        let hole = hanging_port().await;
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let app = TestApp::start().await;
        // A --connect-timeout longer than the whole test: without the fix, a reset stream's dial
        // and slot outlive every wait below.
        let (server, _) = data_plane(
            app.addr,
            &dirs.path().join("server"),
            &["--connect-timeout", "120s"],
        );
        let hbone = hbone_listener(&server).await;
        let (client, _) = data_plane(app.addr, &dirs.path().join("client"), &[]);

        let mut attacker = raw_hbone_peer(hbone, &client).await;
        // The HBONE connection holds a slot of its own, and nothing else does.
        eventually("the attacker's connection to be admitted", WAIT, || async {
            open_inbound(&server, 1)
        })
        .await;
        // The authority: this pod's address (the connection arrived on 127.0.0.1) at the hole.
        let target = format!("127.0.0.1:{}", hole.addr.port());
        for round in 1..=ROUNDS {
            let mut streams = Vec::with_capacity(STREAMS);
            for _ in 0..STREAMS {
                attacker = bounded("room for a stream", WAIT, attacker.ready())
                    .await
                    .expect("the attacker's connection is open");
                let request = http::Request::builder()
                    .method(http::Method::CONNECT)
                    .uri(target.as_str())
                    .body(())
                    .expect("request");
                let (_response, send) = attacker.send_request(request, false).expect("CONNECT");
                streams.push(send);
            }
            // Every stream's task took its slot and is dialling the hole: the server accepted
            // them all (h2 would close the connection for resets of streams never accepted), and
            // in the rounds past 200 streams, the earlier ones' tasks have ended.
            eventually(
                &format!("round {round}'s {STREAMS} streams to be dialling"),
                WAIT,
                || async { open_inbound(&server, 1 + STREAMS) },
            )
            .await;
            for send in &mut streams {
                send.send_reset(h2::Reason::CANCEL);
            }
            // The point: the reset streams' slots come back while their dials would still hang.
            eventually(
                &format!("round {round}'s {STREAMS} reset streams to give back their slots"),
                WAIT,
                || async { open_inbound(&server, 1) },
            )
            .await;
        }

        // The server still serves a well-behaved peer (another HBONE connection) meanwhile.
        let tunnel = open(&client, hbone, app.addr).await.expect("a tunnel");
        assert_eq!(get(tunnel, "/status/200").await.0, 200);
    })
    .await;
}

/// A plaintext inbound listener of `shared` on loopback.
async fn plaintext_listener(shared: &Arc<Shared>, listener: TcpListener) {
    tokio::spawn(Listener::new(shared.clone(), listener, Direction::Inbound).run());
}

/// A plaintext HTTP/1.1 GET to `addr`: the status, or None when the connection is closed unanswered.
async fn plaintext_get(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /status/200 HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = Vec::new();
    bounded(
        "the plaintext answer",
        WAIT,
        stream.read_to_end(&mut answer),
    )
    .await
    .ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn permissive_accepts_plaintext_and_strict_refuses_it_except_on_plaintext_ports() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(dirs.path(), &ca.issue(SERVER_ID));
        let app = TestApp::start().await;

        let (permissive, _) = data_plane(app.addr, dirs.path(), &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        plaintext_listener(&permissive, listener).await;
        assert_eq!(
            plaintext_get(addr).await,
            Some(200),
            "permissive (the default) accepts plaintext"
        );

        // A connection to the inbound port itself stands for --app: the app's port is judged.
        let strict_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let probe_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let strict_addr = strict_listener.local_addr().expect("address");
        let probe_addr = probe_listener.local_addr().expect("address");
        let app_port = app.addr.port().to_string();
        let (strict, _) = data_plane(app.addr, dirs.path(), &["--inbound-mtls", "strict"]);
        let (probed, _) = data_plane(
            app.addr,
            dirs.path(),
            &["--inbound-mtls", "strict", "--plaintext-ports", &app_port],
        );
        plaintext_listener(&strict, strict_listener).await;
        plaintext_listener(&probed, probe_listener).await;
        assert_eq!(
            plaintext_get(strict_addr).await,
            None,
            "strict refuses plaintext"
        );
        assert_eq!(
            plaintext_get(probe_addr).await,
            Some(200),
            "--plaintext-ports pass (probes)"
        );
    })
    .await;
}

/// A fresh TLS connection to `hbone` with `client`'s certificate (ALPN h2, as HBONE's).
async fn tls_to(hbone: SocketAddr, client: &Shared) -> tokio_rustls::client::TlsStream<TcpStream> {
    let material = client
        .mtls
        .as_ref()
        .and_then(|m| m.identity.material())
        .expect("material");
    let config = tls::client_config(material.key.clone(), material.bundles.clone(), None)
        .expect("client config");
    let tcp = TcpStream::connect(hbone).await.expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(hbone.ip().into());
    bounded(
        "a handshake",
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake")
}

/// The certificate a fresh TLS connection to `hbone` is shown.
async fn served_certificate(hbone: SocketAddr, client: &Shared) -> Vec<u8> {
    let tls = tls_to(hbone, client).await;
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_open_ones_keep_working() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let p = pair(&ca, &ca, CLIENT_ID, &[]).await;
        let server_dir = p._dirs.path().join("server");
        let mtls = p.server.mtls.as_ref().expect("mtls");
        tokio::spawn(
            mtls.identity
                .clone()
                .watch_forever(prometheus_client::metrics::gauge::Gauge::default()),
        );
        let before = served_certificate(p.hbone, &p.client).await;

        let tunnel = open(&p.client, p.hbone, p.app.addr).await.expect("tunnel");
        let (status, mut open_conn) = get(tunnel, "/status/200").await;
        assert_eq!(status, 200);

        let rotated: Leaf = ca.issue(SERVER_ID);
        ca.write_dir(&server_dir, &rotated);
        let mut changes = mtls.identity.subscribe();
        // The watcher's poll is the timer here: with the clock paused, the wait jumps to its next
        // tick instead of sleeping through it. Real time again for the connections after.
        tokio::time::pause();
        bounded(
            "the reload",
            WAIT,
            changes.wait_for(|state| {
                state
                    .material
                    .as_ref()
                    .is_some_and(|m| m.key.cert[0].as_ref() == rotated.der.as_slice())
            }),
        )
        .await
        .expect("reloaded");
        tokio::time::resume();
        assert_eq!(mtls.identity.problem(), None);

        assert_eq!(
            send_status(&mut open_conn, "/status/202").await,
            202,
            "the open tunnel keeps working"
        );
        let after = served_certificate(p.hbone, &p.client).await;
        assert_ne!(after, before);
        assert_eq!(
            after, rotated.der,
            "a new connection gets the new certificate"
        );
        // And a new tunnel, on a new client's connection, works with it.
        let (client2, _) = data_plane(p.app.addr, &p._dirs.path().join("client"), &[]);
        let tunnel = open(&client2, p.hbone, p.app.addr)
            .await
            .expect("tunnel after rotation");
        assert_eq!(get(tunnel, "/status/203").await.0, 203);
    })
    .await;
}

#[test]
fn material_is_validated_as_it_loads() {
    let ca = Ca::new("mesh CA");
    let dirs = tempfile::tempdir().expect("temp dir");
    let now = SystemTime::now();
    let dir = |name: &str| dirs.path().join(name);
    let load_dir = |name: &str| load(&Files::Dir(dir(name)), "cluster.local", None, now);

    let good = ca.issue(SERVER_ID);
    ca.write_dir(&dir("good"), &good);
    let material = load_dir("good").expect("valid material");
    assert_eq!(material.id.to_string(), SERVER_ID);

    // Pod certificates: the key and the chain in one file, the bundle in another.
    let bundle = dir("bundle.pem");
    std::fs::write(&bundle, format!("{}{}", good.key_pem, good.cert_pem)).expect("write");
    let trust = dir("trust.pem");
    std::fs::write(&trust, ca.pem()).expect("write");
    let pod = load(
        &Files::PodCertificate {
            credential: bundle,
            trust,
        },
        "cluster.local",
        None,
        now,
    );
    assert_eq!(pod.expect("pod certificate").id.to_string(), SERVER_ID);

    assert!(matches!(
        load_dir("missing"),
        Err(MaterialError::Read { .. })
    ));

    let other = ca.issue(SERVER_ID);
    ca.write_dir(
        &dir("mismatch"),
        &Leaf {
            key_pem: other.key_pem,
            ..ca.issue(SERVER_ID)
        },
    );
    assert!(
        matches!(load_dir("mismatch"), Err(MaterialError::KeyMismatch { .. })),
        "{:?}",
        load_dir("mismatch").err()
    );

    let past = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    ca.write_dir(
        &dir("expired"),
        &ca.issue_valid(SERVER_ID, past, past + time::Duration::days(1)),
    );
    let expired = load_dir("expired")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(expired.contains("expired at"), "{expired}");

    ca.write_dir(
        &dir("foreign"),
        &ca.issue("spiffe://other.example/ns/a/sa/b"),
    );
    assert!(matches!(
        load_dir("foreign"),
        Err(MaterialError::Leaf {
            problem: LeafProblem::ForeignTrustDomain { .. },
            ..
        })
    ));

    ca.write_dir(
        &dir("not-workload"),
        &ca.issue("spiffe://cluster.local/something/else"),
    );
    assert!(matches!(
        load_dir("not-workload"),
        Err(MaterialError::Leaf {
            problem: LeafProblem::NotWorkload(_),
            ..
        })
    ));

    // Signed by one CA, trusting another.
    let rogue = Ca::new("rogue CA");
    rogue.write_dir(&dir("untrusted"), &rogue.issue(SERVER_ID));
    std::fs::write(dir("untrusted").join("ca.crt"), ca.pem()).expect("write");
    assert!(matches!(
        load_dir("untrusted"),
        Err(MaterialError::Untrusted { .. })
    ));
}

/// The binary: /ready answers 503 naming the identity problem until the material arrives (the
/// watcher picks it up), then 200, and /metrics shows the time left.
#[tokio::test]
async fn ready_waits_for_the_identity_and_metrics_show_its_expiry() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let identity = dir.path().join("identity");
        let flag = identity.display().to_string();
        let proxy = support::process::Proxy::start(
            app.addr,
            &["--identity-dir", &flag, "--hbone", "127.0.0.1:0"],
        )
        .await;
        let waiting = proxy.admin_get("/ready").await;
        assert_eq!(waiting.status, http::StatusCode::SERVICE_UNAVAILABLE);
        let text = waiting.text();
        assert!(
            text.contains("workload identity") && text.contains("tls.crt"),
            "{text}"
        );

        let ca = Ca::new("mesh CA");
        ca.write_dir(&identity, &ca.issue(SERVER_ID));
        support::eventually("/ready to answer 200", WAIT, || async {
            (proxy.admin_get("/ready").await.status == http::StatusCode::OK).then_some(())
        })
        .await;
        let metrics = proxy.admin_get("/metrics").await.text();
        let left = support::metrics::metric(&metrics, "amazing_proxy_identity_expiry_seconds", &[])
            .unwrap_or_default();
        assert!(left > 0.0 && left <= 3600.0, "{metrics}");
    })
    .await;
}

#[tokio::test]
async fn missing_material_is_reported_and_the_expiry_gauge_counts_down() {
    let dirs = tempfile::tempdir().expect("temp dir");
    let app: SocketAddr = "127.0.0.1:9".parse().expect("address");
    let (shared, _) = data_plane(app, &dirs.path().join("absent"), &[]);
    let problem = shared
        .mtls
        .as_ref()
        .and_then(|m| m.identity.problem())
        .unwrap_or_default();
    assert!(
        problem.contains("tls.crt") && problem.contains("cannot read"),
        "{problem}"
    );
    assert_eq!(shared.telemetry.metrics.identity_expiry_seconds.get(), 0);

    let ca = Ca::new("mesh CA");
    ca.write_dir(dirs.path(), &ca.issue(SERVER_ID));
    let (shared, _) = data_plane(app, dirs.path(), &[]);
    assert_eq!(
        shared.mtls.as_ref().and_then(|m| m.identity.problem()),
        None
    );
    let left = shared.telemetry.metrics.identity_expiry_seconds.get();
    assert!(left > 0 && left <= 3600, "an hour at most is left: {left}");
}

/// `--identity-spire-socket`: the server's identity comes from a SPIFFE Workload API server (the
/// SPIRE agent's protocol); /ready-style problem until the first SVID, then tunnels work, and a
/// rotated SVID serves new connections while the open tunnel keeps working.
#[tokio::test]
async fn an_identity_from_the_workload_api_serves_tunnels_and_rotates() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        let socket = dirs.path().join("agent.sock");
        let (_agent, mut calls) = support::workload_api::start_agent(&socket);
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let app = TestApp::start().await;
        let args = run_args(&[
            "--app",
            &app.addr.to_string(),
            "--proxy-mark",
            "0",
            "--identity-spire-socket",
            &socket.display().to_string(),
        ]);
        args.validate().expect("valid flags");
        let server = Shared::new(&args.proxy_config(), Box::new(Captured::default()));
        let mtls = server.mtls.as_ref().expect("mtls");
        let waiting = mtls.identity.problem().unwrap_or_default();
        assert!(waiting.contains("Workload API"), "{waiting}");
        tokio::spawn(
            mtls.identity
                .clone()
                .watch_forever(prometheus_client::metrics::gauge::Gauge::default()),
        );
        let stream = bounded("the Workload API call", WAIT, calls.recv())
            .await
            .expect("a FetchX509SVID call");
        let send = |leaf: &Leaf| {
            support::workload_api::svid_response(SERVER_ID, &leaf.der, &leaf.key_der, &ca.der())
        };
        let mut changes = mtls.identity.subscribe();
        let first = ca.issue(SERVER_ID);
        stream.send(Ok(send(&first))).await.expect("send the SVID");
        let holds = |state: &amazing_proxy::identity::source::State, leaf: &Leaf| {
            state
                .material
                .as_ref()
                .is_some_and(|m| m.key.cert[0].as_ref() == leaf.der.as_slice())
        };
        let got = tokio::time::timeout(WAIT, changes.wait_for(|s| holds(s, &first)))
            .await
            .is_ok();
        assert!(got, "no material: {:?}", mtls.identity.problem());
        assert_eq!(mtls.identity.problem(), None);

        let hbone = hbone_listener(&server).await;
        let (client, _) = data_plane(app.addr, &dirs.path().join("client"), &[]);
        let tunnel = open(&client, hbone, app.addr).await.expect("tunnel");
        assert_eq!(&*tunnel.peer, SERVER_ID);
        let (status, mut open_conn) = get(tunnel, "/status/200").await;
        assert_eq!(status, 200);

        let rotated = ca.issue(SERVER_ID);
        stream
            .send(Ok(send(&rotated)))
            .await
            .expect("send the rotated SVID");
        bounded(
            "the rotated SVID",
            WAIT,
            changes.wait_for(|s| holds(s, &rotated)),
        )
        .await
        .expect("material");
        assert_eq!(send_status(&mut open_conn, "/status/202").await, 202);
        assert_eq!(served_certificate(hbone, &client).await, rotated.der);
    })
    .await;
}

/// --policy: a peer the port's rules name gets through, another identity of the trust domain gets
/// 403 on its CONNECT, plaintext (unauthenticated) is closed where no rule admits it, and rules
/// limited to methods and paths judge each request (403), on the fast path's port too.
#[tokio::test]
async fn the_policy_admits_named_peers_and_refuses_the_others() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        let app = TestApp::start().await;
        let policy = dirs.path().join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "default: deny\nports:\n  - port: {}\n    allow:\n      - identities: [{CLIENT_ID}]\n",
                app.addr.port()
            ),
        )
        .expect("write");
        let policy = policy.display().to_string();
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        let (server, _) = data_plane(app.addr, &dirs.path().join("server"), &["--policy", &policy]);
        let hbone = hbone_listener(&server).await;

        ca.write_dir(&dirs.path().join("allowed"), &ca.issue(CLIENT_ID));
        let (allowed, _) = data_plane(app.addr, &dirs.path().join("allowed"), &[]);
        let tunnel = open(&allowed, hbone, app.addr).await.expect("tunnel");
        assert_eq!(get(tunnel, "/status/200").await.0, 200);

        let intruder = "spiffe://cluster.local/ns/shop/sa/intruder";
        ca.write_dir(&dirs.path().join("intruder"), &ca.issue(intruder));
        let (other, _) = data_plane(app.addr, &dirs.path().join("intruder"), &[]);
        let refused = open(&other, hbone, app.addr).await.err().map(|e| e.to_string());
        assert!(
            refused.as_deref().is_some_and(|e| e.contains("answered 403")),
            "{refused:?}"
        );

        // Plaintext to the app's port (a connection to the inbound listener itself stands for
        // --app): closed.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let plain_policy = dirs.path().join("plain.yaml");
        std::fs::write(&plain_policy, format!("default: cluster-authenticated\nports:\n  - port: {}\n    allow:\n      - identities: [{CLIENT_ID}]\n", app.addr.port())).expect("write");
        let plain_policy = plain_policy.display().to_string();
        let (plain, _) = data_plane(app.addr, &dirs.path().join("server"), &["--policy", &plain_policy]);
        plaintext_listener(&plain, listener).await;
        assert_eq!(plaintext_get(addr).await, None, "plaintext is unauthenticated");

        // Rules limited to methods and paths judge each request (403), plaintext included.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let http_rules = dirs.path().join("http.yaml");
        std::fs::write(
            &http_rules,
            format!(
                "default: deny\nports:\n  - port: {}\n    allow:\n      - unauthenticated: true\n        methods: [GET]\n        paths:\n          - exact: /status/200\n",
                app.addr.port()
            ),
        )
        .expect("write");
        let http_rules = http_rules.display().to_string();
        let (judged, log) = data_plane(app.addr, &dirs.path().join("server"), &["--policy", &http_rules, "--access-log", "json"]);
        plaintext_listener(&judged, listener).await;
        assert_eq!(plaintext_get(addr).await, Some(200), "the allowed path");
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /status/201 HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        bounded("the refusal", WAIT, stream.read_to_end(&mut answer))
            .await
            .expect("read");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(answer.contains("policy does not allow"), "{answer}");
        let record = log.record(|r| r["status"] == 403).await;
        assert_eq!(record["error"], "policy_denied", "{record}");

        // The policy follows its file: once it allows only /status/201, /status/200 is refused.
        tokio::spawn(judged.clone().watch_policy_forever());
        std::fs::write(
            dirs.path().join("http.yaml"),
            format!(
                "# changed\ndefault: deny\nports:\n  - port: {}\n    allow:\n      - unauthenticated: true\n        paths:\n          - exact: /status/201\n",
                app.addr.port()
            ),
        )
        .expect("rewrite the policy");
        eventually("the changed policy to be in force", WAIT, || async {
            (plaintext_get(addr).await == Some(403)).then_some(())
        })
        .await;

        // And in a tunnel, the peer's identity is what the request rule names.
        let tunnelled = dirs.path().join("tunnelled.yaml");
        std::fs::write(
            &tunnelled,
            format!(
                "default: deny\nports:\n  - port: {}\n    allow:\n      - identities: [{CLIENT_ID}]\n        paths:\n          - prefix: /status/200\n",
                app.addr.port()
            ),
        )
        .expect("write");
        let tunnelled = tunnelled.display().to_string();
        let (server, _) = data_plane(app.addr, &dirs.path().join("server"), &["--policy", &tunnelled]);
        let hbone = hbone_listener(&server).await;
        let tunnel = open(&allowed, hbone, app.addr).await.expect("tunnel");
        let (status, mut sender) = get(tunnel, "/status/200").await;
        assert_eq!(status, 200);
        assert_eq!(send_status(&mut sender, "/status/201").await, 403);
    })
    .await;
}

/// The sum of the samples of metric `name` with `labels` in `shared`'s registry (0 without any).
fn counted(shared: &Shared, name: &str, labels: &[&str]) -> f64 {
    let text = shared.telemetry.metrics.encode();
    support::metrics::metric(&text, name, labels).unwrap_or(0.0)
}

/// Our CA and a partner's (of partner.example), the app, our server's identity (`server/`) and the
/// partner's (`partner/`), and for each side a --trust-bundles directory with the other's CA.
struct Federation {
    ours: Ca,
    partner: Ca,
    dirs: tempfile::TempDir,
    /// Our side's --trust-bundles: `partner.example.pem`.
    partner_bundle: String,
    /// The partner's side's: `cluster.local.pem`.
    our_bundle: String,
    app: TestApp,
}

impl Federation {
    async fn new() -> Federation {
        let ours = Ca::new("mesh CA");
        let partner = Ca::new("partner CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        let partner_bundle = bundle_dir(&dirs.path().join("bundles"), "partner.example", &partner);
        let our_bundle = bundle_dir(&dirs.path().join("ours"), "cluster.local", &ours);
        ours.write_dir(&dirs.path().join("server"), &ours.issue(SERVER_ID));
        let partner_dir = dirs.path().join("partner");
        support::identity::write_identity(&partner_dir, &partner.issue(PARTNER_ID), &[&partner]);
        Federation {
            ours,
            partner,
            dirs,
            partner_bundle,
            our_bundle,
            app: TestApp::start().await,
        }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dirs.path().join(name)
    }

    /// A data plane of ours with the identity in `name/` and the partner's bundle, and `extra`.
    fn ours(&self, name: &str, extra: &[&str]) -> (Arc<Shared>, Captured) {
        let mut flags = vec!["--trust-bundles", &self.partner_bundle];
        flags.extend_from_slice(extra);
        data_plane(self.app.addr, &self.path(name), &flags)
    }

    /// The partner's data plane (PARTNER_ID, with our CA as a bundle), and `extra`.
    fn theirs(&self, extra: &[&str]) -> Arc<Shared> {
        let mut flags = vec![
            "--trust-domain",
            "partner.example",
            "--trust-bundles",
            &self.our_bundle,
        ];
        flags.extend_from_slice(extra);
        data_plane(self.app.addr, &self.path("partner"), &flags).0
    }
}

/// A client whose certificate claims our trust domain but was minted by a partner's CA (its
/// `ca.crt` trusts both, as an attacker's would) is refused by a server that trusts that CA for the
/// partner's domain only; the refusal is the peer's fault and names the check, in the metrics.
/// A server of the partner domain is refused by our client unless --peer-identities names it.
#[tokio::test]
async fn a_partner_ca_cannot_mint_our_identities() {
    bounded("test", TEST_TIMEOUT, async {
        let f = Federation::new().await;
        let (server, _) = f.ours("server", &[]);
        let hbone = hbone_listener(&server).await;

        let forged = f.path("forged");
        let leaf = f.partner.issue(CLIENT_ID);
        support::identity::write_identity(&forged, &leaf, &[&f.partner, &f.ours]);
        let (attacker, _) = data_plane(f.app.addr, &forged, &[]);
        let refused = open(&attacker, hbone, f.app.addr).await.err();
        assert!(
            matches!(refused, Some(OpenError::Failed { .. })),
            "{refused:?}"
        );
        // The attacker's proxy learns it was refused, after its side of the TLS 1.3 handshake.
        let failures = "amazing_proxy_tls_handshake_failures_total";
        let theirs = ["direction=\"outbound\"", "reason=\"refused_by_peer\""];
        assert_eq!(counted(&attacker, failures, &theirs), 1.0, "{refused:?}");
        let inbound = ["direction=\"inbound\"", "reason=\"wrong_trust_domain\""];
        eventually("the server to count the refusal", WAIT, || async {
            (counted(&server, failures, &inbound) == 1.0).then_some(())
        })
        .await;
        let errors = [
            "direction=\"inbound\"",
            "kind=\"tls_wrong_trust_domain\"",
            "fault=\"peer\"",
        ];
        assert_eq!(counted(&server, "amazing_proxy_errors_total", &errors), 1.0);
        assert_eq!(f.app.connections(), 0, "nothing reached the app");

        // The partner's own server, in the partner's domain: our client (which has the partner's
        // bundle) accepts it only where --peer-identities names it.
        let partner_hbone = hbone_listener(&f.theirs(&[])).await;
        f.ours
            .write_dir(&f.path("client"), &f.ours.issue(CLIENT_ID));
        let (client, _) = f.ours("client", &[]);
        let message = open(&client, partner_hbone, f.app.addr)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("of trust domain partner.example")
                && message.contains("--peer-identities"),
            "{message}"
        );
        let outbound = ["direction=\"outbound\"", "reason=\"wrong_trust_domain\""];
        assert_eq!(counted(&client, failures, &outbound), 1.0);
        let pin = format!("127.0.0.0/8 {PARTNER_ID}");
        let (pinned, _) = f.ours("client", &["--peer-identities-inline", &pin]);
        let tunnel = open(&pinned, partner_hbone, f.app.addr)
            .await
            .expect("a pinned partner server");
        assert_eq!(&*tunnel.peer, PARTNER_ID);
    })
    .await;
}

/// A peer of a partner trust domain (its CA given by --trust-bundles) is a peer like ours to the
/// HBONE server; the policy decides: `all-authenticated` and `trustDomains` admit it,
/// `cluster-authenticated` and `namespaces` (ours only) do not. Without the partner's bundle the
/// handshake itself is refused.
#[tokio::test]
async fn a_partner_domain_peer_is_admitted_only_by_rules_for_other_domains() {
    bounded("test", TEST_TIMEOUT, async {
        let f = Federation::new().await;
        let port = f.app.addr.port();
        let pin = format!("127.0.0.0/8 {SERVER_ID}");
        let client = f.theirs(&["--peer-identities-inline", &pin]);
        let rules = |rule: &str| {
            format!("default: deny\nports:\n  - port: {port}\n    allow:\n      - {rule}\n")
        };
        // (policy, admitted)
        let cases = [
            ("default: cluster-authenticated".to_string(), false),
            ("default: all-authenticated".to_string(), true),
            (rules("trustDomains: [partner.example]"), true),
            (rules("namespaces: [shop]"), false),
        ];
        for (i, (policy, admitted)) in cases.iter().enumerate() {
            let file = f.path(&format!("policy-{i}.yaml"));
            std::fs::write(&file, policy).expect("write");
            let file = file.display().to_string();
            let (server, log) = f.ours("server", &["--policy", &file]);
            let hbone = hbone_listener(&server).await;
            let opened = open(&client, hbone, f.app.addr).await;
            if *admitted {
                let tunnel = opened.unwrap_or_else(|e| panic!("{policy}: {e}"));
                assert_eq!(&*tunnel.peer, SERVER_ID);
                assert_eq!(get(tunnel, "/status/200").await.0, 200, "{policy}");
                let record = log.record(|r| r["status"] == 200).await;
                assert_eq!(record["peer"], PARTNER_ID, "{record}");
            } else {
                let message = opened.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(message.contains("answered 403"), "{policy}: {message}");
            }
        }

        // A server without the partner's bundle refuses the handshake itself.
        let (strict, _) = data_plane(f.app.addr, &f.path("server"), &[]);
        let hbone = hbone_listener(&strict).await;
        assert!(open(&client, hbone, f.app.addr).await.is_err());
        let inbound = ["direction=\"inbound\"", "reason=\"unknown_trust_domain\""];
        eventually("the refusal to be counted", WAIT, || async {
            let failures = "amazing_proxy_tls_handshake_failures_total";
            (counted(&strict, failures, &inbound) == 1.0).then_some(())
        })
        .await;
    })
    .await;
}
