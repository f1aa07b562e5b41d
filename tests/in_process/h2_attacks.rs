//! A hostile client on the HTTP/2 surfaces: the plaintext inbound listener's h2c (hyper's server)
//! and HBONE (h2 directly, in mutual TLS). Each test is an attacker speaking raw frames, and
//! checks what it can hold (app connections, --max-in-flight slots, --max-connections slots,
//! memory) and for how long, by counts and states, never by time thresholds.
//!
//! Already covered elsewhere (not repeated here): rapid reset, idle HTTP/2 connections at the
//! connection limit and after --idle-timeout (resilience.rs), a client that never opens its window
//! (in_process.rs), a tunnel peer that never opens its window on a refused stream and one that
//! resets its streams before their answer (mtls.rs).
//!
//! The graceful close of an HTTP/2 connection (GOAWAY 2^31-1, then a PING; the last GOAWAY only
//! once the PING is answered) is a wait whose end the client decides: hyper and h2 bound it with
//! nothing. So the listeners keep what bounded the connection before it (a response not taken)
//! and drop a closing connection with no request open for --header-timeout.

use crate::support;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::http::{AbortOnDrop, TestApp};
use crate::support::identity::{CLIENT_ID, Ca, SERVER_ID};
use crate::support::in_process::run_args;
use crate::support::metrics::metric;
use crate::support::process::Proxy;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use amazing_proxy::identity::tls;
use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::detect::H2_PREFACE;
use amazing_proxy::proxy::listener::Listener;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// Raw HTTP/2 frames

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The last stream id of the first GOAWAY of a graceful close (RFC 9113, 6.8).
const GRACEFUL: u32 = (1 << 31) - 1;

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a frame's length");
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// A request's header block in HPACK, every field a literal without indexing (or the static
/// table's `:method GET` and `:scheme http`), so that blocks are independent of each other.
fn request_block(method: &str, path: &str) -> Vec<u8> {
    let literal = |index: u8, value: &str| {
        let mut field = vec![index, u8::try_from(value.len()).expect("a short value")];
        field.extend_from_slice(value.as_bytes());
        field
    };
    let mut block = match method {
        "GET" => vec![0x82],
        other => literal(0x02, other),
    };
    block.push(0x86);
    block.extend(literal(0x04, path));
    block.extend(literal(0x01, "t"));
    block
}

/// A whole bodiless request on `stream`.
fn request(stream: u32, method: &str, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        stream,
        &request_block(method, path),
    )
}

/// What a raw peer has seen of the proxy.
#[derive(Default, Debug)]
struct Seen {
    /// GOAWAY frames: last stream id and error code.
    goaways: Vec<(u32, u32)>,
    /// PINGs of the proxy's it left unanswered (sent after its first GOAWAY).
    unanswered_pings: usize,
    /// DATA bytes received.
    data: usize,
    /// The connection ended (end of stream or error reading).
    ended: bool,
    /// Response HEADERS frames: the stream, and the block's first byte (`:status` from HPACK's
    /// static table: 0x88 is 200, 0x8c 400).
    heads: Vec<(u32, u8)>,
    /// Streams the proxy reset.
    resets: Vec<u32>,
}

impl Seen {
    fn graceful_close_began(&self) -> bool {
        self.goaways.iter().any(|&(last, _)| last == GRACEFUL)
    }
}

/// A raw HTTP/2 client over `io`: a writer task sends what [`RawPeer::send`] is given; a reader
/// task reads every frame, acknowledges SETTINGS, and answers the proxy's PINGs until its first
/// GOAWAY: the PING of a graceful close (sent with it) is never answered, so the close never
/// completes by the client's doing.
struct RawPeer {
    out: mpsc::UnboundedSender<Vec<u8>>,
    seen: Arc<Mutex<Seen>>,
    _tasks: [AbortOnDrop; 2],
}

impl RawPeer {
    fn start<I>(io: I, hello: Vec<u8>) -> RawPeer
    where
        I: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut read, mut write) = tokio::io::split(io);
        let (out, mut queue) = mpsc::unbounded_channel::<Vec<u8>>();
        out.send(hello).expect("the writer's queue");
        let writer = tokio::spawn(async move {
            while let Some(bytes) = queue.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (answers, state) = (out.clone(), seen.clone());
        let reader = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    let (kind, flags, payload) = (buf[3], buf[4], buf[9..9 + len].to_vec());
                    let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & GRACEFUL;
                    buf.drain(..9 + len);
                    let mut seen = state.lock().expect("the peer's state");
                    match kind {
                        SETTINGS if flags & ACK == 0 => {
                            let _ = answers.send(frame(SETTINGS, ACK, 0, &[]));
                        }
                        PING if flags & ACK == 0 && seen.goaways.is_empty() => {
                            let _ = answers.send(frame(PING, ACK, 0, &payload));
                        }
                        PING if flags & ACK == 0 => seen.unanswered_pings += 1,
                        GOAWAY if payload.len() >= 8 => {
                            let word = |at: usize| {
                                u32::from_be_bytes([
                                    payload[at],
                                    payload[at + 1],
                                    payload[at + 2],
                                    payload[at + 3],
                                ])
                            };
                            seen.goaways.push((word(0) & GRACEFUL, word(4)));
                        }
                        DATA => seen.data += payload.len(),
                        HEADERS if !payload.is_empty() => seen.heads.push((stream, payload[0])),
                        RST_STREAM => seen.resets.push(stream),
                        _ => {}
                    }
                }
            }
            state.lock().expect("the peer's state").ended = true;
        });
        RawPeer {
            out,
            seen,
            _tasks: [AbortOnDrop(writer), AbortOnDrop(reader)],
        }
    }

    fn send(&self, bytes: Vec<u8>) {
        // The writer is gone once the connection is: what is sent then is lost, as on a socket.
        let _ = self.out.send(bytes);
    }

    fn seen<T>(&self, look: impl FnOnce(&Seen) -> T) -> T {
        look(&self.seen.lock().expect("the peer's state"))
    }

    /// Waits for the proxy's graceful close to begin (GOAWAY with last stream 2^31-1).
    async fn wait_graceful_close(&self, what: &str) {
        eventually(what, WAIT, || async {
            self.seen(|s| {
                s.graceful_close_began()
                    .then_some(())
                    .ok_or_else(|| format!("{s:?}"))
            })
        })
        .await;
    }
}

/// The proxy's open inbound connections, by its own count.
async fn open_inbound(proxy: &Proxy) -> f64 {
    let text = proxy.metrics().await;
    metric(
        &text,
        "amazing_proxy_open_connections",
        &["direction=\"inbound\""],
    )
    .expect("the open connections gauge")
}

/// The proxy's resident set now (VmRSS), in bytes.
fn rss_bytes(proxy: &Proxy) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", proxy.pid)).expect("/proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

// ---------------------------------------------------------------------------------------------
// h2c: a graceful close must keep the bounds the connection had before it

/// A client idle for --idle-timeout gets the graceful close (GOAWAY 2^31-1 and a PING). It never
/// answers that PING, so hyper never sends the last GOAWAY, and the first one still admits new
/// streams: it opens two whose responses it never takes (window 0), and keeps hyper's keep-alive
/// from timing out by sending a new request head more often than the keep-alive interval (HEAD
/// with an ambiguous path: refused before the app, holding nothing). A response not taken for
/// twice --response-body-timeout closes the connection while it is open, and must still once it
/// is closing: else the two streams would hold their app connections and both --max-in-flight
/// slots, and every other client would get 503 (as it did before `listener::closed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_ignoring_the_graceful_close_cannot_hold_responses_it_never_takes() {
    bounded("test", TEST_TIMEOUT, async {
        const HELD: u32 = 2;
        let app = TestApp::start().await;
        let flags = [
            "--idle-timeout",
            "2s",
            "--response-body-timeout",
            "200ms",
            "--max-in-flight",
            "2",
        ];
        let proxy = Proxy::start(app.addr, &flags).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]));
        let peer = RawPeer::start(tcp, hello);
        peer.wait_graceful_close("the graceful close after --idle-timeout")
            .await;

        let mut next = 1;
        for _ in 0..HELD {
            peer.send(request(next, "GET", "/stream?bytes=16777216"));
            next += 2;
        }
        // Hyper's keep-alive counts request heads as signs of life: one every 100 ms (the
        // keep-alive interval is --idle-timeout).
        let feeder = {
            let out = peer.out.clone();
            tokio::spawn(async move {
                for _ in 0..300 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if out.send(request(next, "HEAD", "/%2e%2e/x")).is_err() {
                        return;
                    }
                    next += 2;
                }
            })
        };
        let _feeder = AbortOnDrop(feeder);
        eventually("the held requests to reach the app", WAIT, || async {
            (app.state.requests.load(std::sync::atomic::Ordering::SeqCst) >= HELD as usize)
                .then_some(())
        })
        .await;

        // Twice --response-body-timeout is 400 ms: the slots must come back long before WAIT.
        eventually(
            "a response never taken to give its --max-in-flight slot back",
            WAIT,
            || async {
                let reply = proxy.get("/echo?after=held").await;
                (reply.status == StatusCode::OK)
                    .then_some(())
                    .ok_or_else(|| format!("{}: {}", reply.status, reply.text()))
            },
        )
        .await;
        assert!(
            peer.seen(|s| s.unanswered_pings) >= 1,
            "the graceful close's PING was left unanswered"
        );
    })
    .await;
}

/// A client floods PINGs without ever reading: the proxy's answers fill the socket, and the proxy
/// stops reading (h2 keeps one answer pending). The client then says nothing more and holds no
/// request. Neither hyper's graceful close after --idle-timeout (it writes a GOAWAY into the full
/// socket and waits for it) nor its keep-alive (its abrupt close flushes the same socket first)
/// ends it; the proxy drops it after --header-timeout without a request (`listener::closed`).
/// Before that, the connection, its descriptor and its --max-connections slot were held for
/// as long as the client likes (only the shedder at the limit takes it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_pings_and_never_reads_is_closed_after_the_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let flags = ["--idle-timeout", "1s", "--header-timeout", "1s"];
        let proxy = Proxy::start(app.addr, &flags).await;
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut tcp = socket.connect(proxy.inbound).await.expect("connect");
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(settings(&[]));
        tcp.write_all(&hello).await.expect("the preface");
        let pings: Vec<u8> = (0..1000)
            .flat_map(|_| frame(PING, 0, 0, b"flooding"))
            .collect();
        // Until the proxy stops reading (its answers have nowhere to go): at most 5 million PINGs.
        let mut stopped_reading = false;
        for _ in 0..5000 {
            let write = tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&pings));
            match write.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    stopped_reading = true;
                    break;
                }
            }
        }
        assert!(
            stopped_reading,
            "the proxy kept reading PINGs never answered"
        );
        assert_eq!(open_inbound(&proxy).await, 1.0, "the flooder's connection");
        // No request was ever open: --idle-timeout (1 s), then a bounded close.
        proxy.wait_no_open_connections().await;
        drop(tcp);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// h2c: what one connection may make the proxy buffer

/// A client opens the flow-control windows wide (2^31-1 for the connection and every stream),
/// asks for a large response on each of its 200 streams, and never reads its socket. The proxy
/// takes from the app whatever fits in its per-stream send buffer (64 KiB, plus the chunk in hand
/// and the app's side) and holds it for the client until twice --response-body-timeout. With
/// hyper's default of 400 KiB that was about 1 MB of RSS per stream, 190 MB for one connection
/// (one in 10,000 allowed; measured on 2026-12-07); with 64 KiB, about 50 MB. The bound here is
/// 64 MiB for the 200 streams, about 320 KiB each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_opens_its_windows_and_never_reads_buffers_little_per_connection() {
    bounded("test", TEST_TIMEOUT, async {
        const STREAMS: u32 = 200;
        const GROWTH_BOUND: u64 = 64 * 1024 * 1024;
        let app = TestApp::start().await;
        // The stall bound far beyond the test: the buffers are measured while they are held.
        let proxy = Proxy::start(app.addr, &["--response-body-timeout", "5m"]).await;
        assert_eq!(proxy.get("/echo?warm=up").await.status, StatusCode::OK);
        let before = rss_bytes(&proxy);

        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut tcp = socket.connect(proxy.inbound).await.expect("connect");
        let mut attack = H2_PREFACE.to_vec();
        attack.extend(settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, GRACEFUL)]));
        attack.extend(frame(
            WINDOW_UPDATE,
            0,
            0,
            &(GRACEFUL - 65_535).to_be_bytes(),
        ));
        for i in 0..STREAMS {
            attack.extend(request(2 * i + 1, "GET", "/stream?bytes=67108864"));
        }
        tcp.write_all(&attack).await.expect("the requests");
        eventually("every stream to reach the app", WAIT, || async {
            (app.state.requests.load(std::sync::atomic::Ordering::SeqCst) > STREAMS as usize)
                .then_some(())
        })
        .await;
        // Until the proxy has taken all it will take (its resident set unchanged for 2 s), or has
        // gone past the bound; at most 20 s.
        let mut peak = rss_bytes(&proxy);
        let mut unchanged = 0;
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = rss_bytes(&proxy);
            unchanged = if now == peak { unchanged + 1 } else { 0 };
            peak = peak.max(now);
            if unchanged == 8 || peak.saturating_sub(before) >= GROWTH_BOUND {
                break;
            }
        }
        let growth = peak.saturating_sub(before);
        assert!(
            growth < GROWTH_BOUND,
            "one connection that never reads made the proxy hold {growth} bytes for {STREAMS} streams"
        );
        drop(tcp);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// h2c: what already holds (paths no other test covers)

/// A header block never finished: CONTINUATION frames without END_HEADERS, as many as the client
/// likes. h2 counts them against the header list limit and closes the connection with GOAWAY
/// ENHANCE_YOUR_CALM ("too_many_continuations") after a handful; the proxy holds nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_off_with_enhance_your_calm() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut attack = H2_PREFACE.to_vec();
        attack.extend(settings(&[]));
        attack.extend(frame(HEADERS, END_STREAM, 1, &request_block("GET", "/")));
        for _ in 0..10_000 {
            attack.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        let peer = RawPeer::start(tcp, attack);
        eventually("the proxy to end the flooding connection", WAIT, || async {
            peer.seen(|s| s.ended.then_some(()).ok_or_else(|| format!("{s:?}")))
        })
        .await;
        let goaways = peer.seen(|s| s.goaways.clone());
        assert_eq!(
            goaways.iter().map(|g| g.1).collect::<Vec<_>>(),
            [ENHANCE_YOUR_CALM],
            "{goaways:?}"
        );
        proxy.wait_no_open_connections().await;
        assert_eq!(
            app.state.requests.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(proxy.get("/echo?after=flood").await.status, StatusCode::OK);
    })
    .await;
}

/// A header block begun and never finished (HEADERS without END_HEADERS, then silence) is no
/// request: the connection is idle, and --idle-timeout closes it even though the client answers
/// the graceful close's PING with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_never_finished_is_closed_after_the_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let flags = ["--idle-timeout", "1s", "--header-timeout", "1s"];
        let proxy = Proxy::start(app.addr, &flags).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut attack = H2_PREFACE.to_vec();
        attack.extend(settings(&[]));
        let block = request_block("GET", "/echo");
        attack.extend(frame(HEADERS, END_STREAM, 1, &block[..3]));
        let peer = RawPeer::start(tcp, attack);
        eventually("the proxy to end the connection", WAIT, || async {
            peer.seen(|s| s.ended.then_some(()).ok_or_else(|| format!("{s:?}")))
        })
        .await;
        proxy.wait_no_open_connections().await;
        assert_eq!(
            app.state.requests.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HBONE: a peer ignoring the graceful close

/// A data plane with `identity` (an `--identity-dir`) and `extra` flags.
fn data_plane(app: SocketAddr, identity: &Path, extra: &[&str]) -> Arc<Shared> {
    let app = app.to_string();
    let dir = identity.display().to_string();
    let mut args = vec!["--app", &app, "--proxy-mark", "0", "--identity-dir", &dir];
    args.extend_from_slice(extra);
    let args = run_args(&args);
    args.validate().expect("valid flags");
    Shared::new(&args.proxy_config(), Box::new(std::io::sink()))
}

/// A TLS connection to `hbone` with `client`'s certificate (ALPN h2, as HBONE's).
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

/// A mesh peer with a valid certificate, idle for --idle-timeout, gets the graceful close
/// (GOAWAY 2^31-1 and a PING). It never answers that PING but sends a PING of its own every
/// 200 ms: the keep-alive never pings a peer it hears from, and h2 sends the last GOAWAY only
/// once its PING is answered, so the connection (and its --max-connections slot) would stay for
/// good, still admitting new CONNECT streams under the first GOAWAY. The listener drops a
/// closing connection with no stream open for --header-timeout.
#[tokio::test]
async fn an_hbone_peer_ignoring_the_graceful_close_is_closed_all_the_same() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let ca = Ca::new("mesh CA");
        let dirs = tempfile::tempdir().expect("temp dir");
        ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
        ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
        let flags = ["--idle-timeout", "1s", "--header-timeout", "1s"];
        let server = data_plane(app.addr, &dirs.path().join("server"), &flags);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let hbone = listener.local_addr().expect("address");
        let _listener = AbortOnDrop(tokio::spawn(
            Listener::hbone(server.clone(), listener).run(),
        ));
        let client = data_plane(app.addr, &dirs.path().join("client"), &[]);

        let mut hello = H2_PREFACE.to_vec();
        hello.extend(settings(&[]));
        let peer = RawPeer::start(tls_to(hbone, &client).await, hello);
        let chatter = {
            let out = peer.out.clone();
            tokio::spawn(async move {
                for _ in 0..300 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if out.send(frame(PING, 0, 0, b"chatter!")).is_err() {
                        return;
                    }
                }
            })
        };
        let _chatter = AbortOnDrop(chatter);
        peer.wait_graceful_close("the graceful close after --idle-timeout")
            .await;
        eventually(
            "the proxy to end a connection whose graceful close is ignored",
            WAIT,
            || async { peer.seen(|s| s.ended.then_some(()).ok_or_else(|| format!("{s:?}"))) },
        )
        .await;
        let open = support::metrics::metric(
            &server.telemetry.metrics.encode(),
            "amazing_proxy_open_connections",
            &["direction=\"inbound\""],
        );
        assert_eq!(open, Some(0.0), "the peer's connection slot");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Request trailers

/// An HTTP/2 app (h2c) that reads each request's body to its end and answers with the names of
/// the trailer fields it received, comma-separated, in `x-trailers`.
async fn trailer_echo_app() -> (SocketAddr, AbortOnDrop) {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the app");
    let app = listener.local_addr().expect("app address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let collected = req.into_body().collect().await;
                        let names = collected
                            .ok()
                            .and_then(|body| body.trailers().cloned())
                            .map(|trailers| {
                                trailers
                                    .keys()
                                    .map(|name| name.as_str().to_owned())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            })
                            .unwrap_or_default();
                        let response = http::Response::builder()
                            .header("x-trailers", names)
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .expect("a response");
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    (app, AbortOnDrop(task))
}

/// A client's HTTP/2 request trailers cannot carry the fields the proxy owns or that frame and
/// route a message (`phases::forbidden_in_request_trailers`): the head's rules replace them in
/// the header section, and trailers came after it, past those rules. hyper's path drops them
/// (the head has gone to the app by then); other trailers pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_fields_in_http2_request_trailers_never_reach_the_app() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, _app_task) = trailer_echo_app().await;
        let proxy = Proxy::start(app, &["--app-protocol", "http2"]).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let _connection = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::post(format!("http://{}/upload", proxy.inbound))
            .body(())
            .expect("a request");
        let (response, mut body) = client.send_request(request, false).expect("send");
        body.send_data(bytes::Bytes::from_static(b"hello"), false)
            .expect("data");
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("5d41402a"));
        trailers.insert(
            "x-forwarded-client-cert",
            http::HeaderValue::from_static("By=spiffe://cluster.local/ns/x/sa/forged"),
        );
        trailers.insert(
            "x-forwarded-for",
            http::HeaderValue::from_static("10.9.9.9"),
        );
        trailers.insert("x-request-id", http::HeaderValue::from_static("chosen"));
        body.send_trailers(trailers).expect("trailers");
        let response = response.await.expect("a response");
        assert_eq!(response.status(), StatusCode::OK);
        let seen = response
            .headers()
            .get("x-trailers")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_owned();
        assert_eq!(
            seen, "x-checksum",
            "the app saw these trailer fields: {seen}"
        );
    })
    .await;
}

/// Requests hyper's path forwarded though the fast path refuses them as ambiguous: two
/// `Content-Length` fields (`5` and `05`, which reached an HTTP/1.1 app as two lines: RFC 9112
/// 6.3), and `GET *` (the asterisk form is OPTIONS' only: RFC 9113 8.3.1). Both are 400 and reach
/// no app. And a request naming no authority (no `:authority`, no `host`) reached the HTTP/1.1
/// app with no `Host`, which HTTP/1.1 requires: it gets an empty one (RFC 9112 3.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_http2_requests_are_refused_and_one_naming_no_authority_gets_an_empty_host() {
    use crate::support::raw::{RecordingApp, answer, ok};
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(|r| answer(ok(r.message.target()))).await;
        let proxy = Proxy::start(app.addr, &["--app-protocol", "http1"]).await;
        let tcp = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(settings(&[]));
        let peer = RawPeer::start(tcp, hello);
        let literal = |name: &str, value: &str| {
            let mut field = vec![0x00, u8::try_from(name.len()).expect("a short name")];
            field.extend_from_slice(name.as_bytes());
            field.push(u8::try_from(value.len()).expect("a short value"));
            field.extend_from_slice(value.as_bytes());
            field
        };
        let mut two_lengths = request_block("POST", "/two-lengths");
        two_lengths.extend(literal("content-length", "5"));
        two_lengths.extend(literal("content-length", "05"));
        peer.send(frame(HEADERS, END_HEADERS, 1, &two_lengths));
        peer.send(frame(DATA, END_STREAM, 1, b"hello"));
        peer.send(request(3, "GET", "*"));
        // :method GET, :scheme http, :path; no :authority.
        let mut no_authority = vec![0x82, 0x86, 0x04, 13];
        no_authority.extend_from_slice(b"/no-authority");
        peer.send(frame(HEADERS, END_STREAM | END_HEADERS, 5, &no_authority));
        eventually("an answer on each stream", WAIT, || async {
            peer.seen(|s| {
                (s.heads.len() + s.resets.len() >= 3)
                    .then_some(())
                    .ok_or_else(|| format!("{s:?}"))
            })
        })
        .await;
        let heads = peer.seen(|s| s.heads.clone());
        assert_eq!(
            heads,
            [(1, 0x8c), (3, 0x8c), (5, 0x88)],
            "200 is 0x88, 400 0x8c"
        );
        app.settled().await;
        let requests = app.requests();
        assert!(
            requests
                .iter()
                .all(|r| r.message.target() != "/two-lengths" && r.message.target() != "*"),
            "{requests:?}"
        );
        let seen = requests
            .iter()
            .find(|r| r.message.target() == "/no-authority");
        let seen = seen.unwrap_or_else(|| panic!("no /no-authority at the app: {requests:?}"));
        let raw = String::from_utf8_lossy(&seen.message.raw).to_ascii_lowercase();
        assert!(raw.contains("\r\nhost: \r\n"), "{raw}");
    })
    .await;
}
