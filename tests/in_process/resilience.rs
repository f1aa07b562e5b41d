//! Under load, attack and bad configuration the sidecar holds (issue 10), as behaviour: hostile
//! sockets at the connection limit, the keep-alive race, configurations that loop or overflow, a
//! request cut by the drain, idle clients and running out of descriptors, and (already holding) an app crash and restart, HTTP/2 rapid reset, the
//! in-flight limit, a large download to a slow reader and the drain delay under load; HTTP/2
//! connections that only idle are shed at the limit and closed after `--idle-timeout`. Counts,
//! statuses and memory bounds, never time thresholds; every socket and process is bounded and goes
//! away with the test. The figures (bytes and descriptors per idle client, recovery time) belong
//! in `bench/reliability.sh`, not here. The admin port reached from another address is the netns
//! suite's `resilience`.

use crate::support;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::http::{
    AbortOnDrop, H1Conn, ReservedPort, TestApp, get_request, wait_listening,
};
use crate::support::metrics::metric;
use crate::support::process::{Background, Proxy, rejected_at_start, run};
use crate::support::raw::{RawApp, RawClient, RecordingApp, Step, answer, ok};
use crate::support::tools::{missing, text};
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually, skip};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// 1. Slowloris at the connection limit

/// Opens a connection that sends a request head one byte every `every`, never finishing it, until
/// the returned guard is dropped or the proxy closes it.
async fn slowloris(addr: SocketAddr, every: Duration) -> Option<AbortOnDrop> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let task = tokio::spawn(async move {
        if stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            .await
            .is_err()
        {
            return;
        }
        // At most a minute of trickle; the test ends long before.
        for _ in 0..(60_000 / every.as_millis().max(1)) {
            tokio::time::sleep(every).await;
            if stream.write_all(b"s").await.is_err() {
                return;
            }
        }
    });
    Some(AbortOnDrop(task))
}

/// Waits until `open` inbound connections hold the limit, then makes `requests` normal requests,
/// each on a new connection: every one must be answered 200 (the proxy made room for it).
async fn served_at_the_limit(proxy: &Proxy, open: u32, requests: usize) {
    proxy
        .wait_metric(
            "amazing_proxy_open_connections",
            &["direction=\"inbound\""],
            f64::from(open),
        )
        .await;
    for i in 0..requests {
        let reply = proxy.get(&format!("/echo?normal={i}")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "normal request {i}: {}",
            reply.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_at_the_connection_limit_does_not_lock_clients_out() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-connections", "50"]).await;
        let mut attackers = Vec::new();
        for _ in 0..60 {
            attackers.extend(slowloris(proxy.inbound, Duration::from_millis(500)).await);
        }
        served_at_the_limit(&proxy, 50, 5).await;
        drop(attackers);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. The keep-alive race never reaches a client

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_closing_after_every_response_loses_no_idempotent_request() {
    bounded("test", Duration::from_secs(120), async {
        // Answers, then closes 1 ms later whatever arrived meanwhile.
        let app = RecordingApp::start(|r| {
            let mut steps = answer(ok(r.message.target()));
            steps.extend([Step::Sleep(Duration::from_millis(1)), Step::Close]);
            steps
        })
        .await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let errors = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for c in 0..4 {
            let (inbound, errors) = (proxy.inbound, errors.clone());
            clients.push(tokio::spawn(async move {
                let mut client = RawClient::connect(inbound).await;
                for i in 0..1250 {
                    let path = format!("/race/{c}/{i}");
                    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
                    let response = client.exchange(request.as_bytes()).await;
                    if response.status() != 200 || response.body_text() != path {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for client in clients {
            client.await.expect("a client task");
        }
        assert_eq!(errors.load(Ordering::SeqCst), 0, "requests lost in 5000");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Configuration that loops, overflows or is misread is refused at start, by name

#[test]
fn app_equal_to_inbound_is_refused() {
    rejected_at_start(
        &["--inbound", "HELD", "--app", "HELD"],
        &[],
        &["--app", "--inbound"],
    );
}

#[test]
fn duration_beyond_its_bound_is_refused() {
    rejected_at_start(
        &[
            "--app",
            "127.0.0.1:9",
            "--response-timeout",
            "300000000000y",
        ],
        &[],
        &["--response-timeout"],
    );
}

#[test]
fn negative_duration_is_reported_as_its_value() {
    let stderr = rejected_at_start(
        &["--app", "127.0.0.1:9", "--drain-timeout", "-1s"],
        &[],
        &["--drain-timeout", "-1s"],
    );
    assert!(!stderr.contains("unexpected argument"), "{stderr}");
}

#[test]
fn invalid_environment_variable_is_named() {
    rejected_at_start(
        &["--app", "127.0.0.1:9"],
        &[("AMAZING_PROXY_ACCESS_LOG", "xml")],
        &["AMAZING_PROXY_ACCESS_LOG"],
    );
}

#[test]
fn bind_error_names_the_os_error_once() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let addr = held.local_addr().expect("held address").to_string();
    let out = run(support::process::command().args([
        "run",
        "--inbound",
        &addr,
        "--admin",
        "127.0.0.1:0",
        "--outbound",
        "off",
        "--app",
        "127.0.0.1:9",
    ]));
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let os_error = std::io::Error::from(std::io::ErrorKind::AddrInUse).to_string();
    let mentions = stderr
        .matches("os error 98")
        .count()
        .max(stderr.matches(&os_error).count());
    assert_eq!(mentions, 1, "{stderr}");
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// 4. A request that loops back to the proxy is stopped

/// A TCP relay on 127.0.0.1 to `target`, for at most `cap` connections (so a loop cannot run away
/// in the test).
async fn relay(target: Arc<std::sync::Mutex<Option<SocketAddr>>>, cap: usize) -> RawApp {
    RawApp::start(move |mut inbound, n| {
        let to = *target.lock().unwrap_or_else(|p| p.into_inner());
        async move {
            let (Some(to), true) = (to, n <= cap) else {
                return;
            };
            if let Ok(mut outbound) = TcpStream::connect(to).await {
                let _ = tokio::time::timeout(
                    Duration::from_secs(20),
                    tokio::io::copy_bidirectional(&mut inbound, &mut outbound),
                )
                .await;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_looping_back_to_the_proxy_is_stopped() {
    bounded("test", TEST_TIMEOUT, async {
        // The app is a relay back to the proxy itself: no configuration check can see the loop.
        let target = Arc::new(std::sync::Mutex::new(None));
        let relay = relay(target.clone(), 50).await;
        let proxy = Proxy::start(relay.addr, &[]).await;
        *target.lock().unwrap_or_else(|p| p.into_inner()) = Some(proxy.inbound);

        // The request goes out once, comes back through the relay carrying the proxy's own Via,
        // and is refused there with 508, which the first hop passes back to the client.
        let reply = proxy.get("/loop").await;
        assert_eq!(reply.status, StatusCode::LOOP_DETECTED, "{}", reply.text());
        let inbound = ["direction=\"inbound\"", "status=\"508\""];
        let handled = proxy
            .wait_metric("amazing_proxy_requests_total", &inbound, 2.0)
            .await;
        assert_eq!(handled, 2.0, "the loop went {handled} requests deep");
        assert_eq!(
            relay.connections.load(Ordering::SeqCst),
            1,
            "the loop went more than one connection deep"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. A request cut by the drain timeout is on the record

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cut_by_the_drain_timeout_is_logged() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let mut proxy = Proxy::start(
            app.addr,
            &["--drain-delay", "0s", "--drain-timeout", "500ms"],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client
            .send(b"GET /hang HTTP/1.1\r\nHost: t\r\nX-Request-Id: cut-1\r\n\r\n")
            .await;
        eventually("the request to reach the app", WAIT, || async {
            (app.state.started.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await;
        proxy.signal("TERM");
        proxy.wait_exit(WAIT).await;
        let record = proxy.json_record("cut-1").await;
        assert_eq!(record["error"], "drain_timeout", "{record}");
        let stderr = proxy.stderr();
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            last.contains("cut") && last.contains('1'),
            "final line: {last:?}"
        );
        drop(client);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Idle clients cost no app connection; running out of descriptors spares the admin port

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_clients_give_their_app_connection_back() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(|r| answer(ok(r.message.target()))).await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut idle = Vec::new();
        for i in 0..5 {
            let mut client = RawClient::connect(proxy.inbound).await;
            let request = format!("GET /idle/{i} HTTP/1.1\r\nHost: t\r\n\r\n");
            let response = client.exchange(request.as_bytes()).await;
            assert_eq!(response.status(), 200, "{}", response.head);
            // The client stays connected and idle. The pause lets the proxy finish the exchange
            // (give the app connection back) before the next client asks for one.
            idle.push(client);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            app.connections(),
            1,
            "5 idle clients held {} app connections",
            app.connections()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_admin_port_still_answers() {
    const TEST: &str = "out_of_descriptors_the_admin_port_still_answers";
    bounded("test", TEST_TIMEOUT, async {
        if let Some(why) = missing(&["prlimit", "ss"]) {
            return skip(TEST, &why);
        }
        let app = TestApp::start().await;
        let proxy = Proxy::builder(app.addr)
            .under(&["prlimit", "--nofile=64"])
            .start()
            .await;
        // More clients than the proxy has descriptors, each with half a request head (so none is
        // finished, tunnelled or closed): the kernel queues what the proxy cannot accept.
        let mut held = Vec::new();
        for _ in 0..100 {
            if let Ok(mut client) = TcpStream::connect(proxy.inbound).await {
                let _ = client.write_all(b"GET /held HTTP/1.1\r\n").await;
                held.push(client);
            }
        }
        // The proxy keeps its connections within what its descriptors allow: it sheds the slow
        // heads (or, out of descriptors after all, leaves clients queued in the backlog), and
        // never spends the descriptors the admin port needs.
        eventually("the proxy to shed, refuse or back off", WAIT, || async {
            let metrics = proxy.metrics().await;
            let count = |name: &str| metric(&metrics, name, &[]).unwrap_or(0.0);
            let pushed_back = count("amazing_proxy_shed_connections_total")
                + count("amazing_proxy_rejected_connections_total")
                + count("amazing_proxy_accept_errors_total");
            (pushed_back > 0.0).then_some(())
        })
        .await;
        let scrape = proxy.admin_get("/metrics").await;
        assert_eq!(scrape.status, StatusCode::OK, "{}", scrape.text());
        drop(held);
        proxy.wait_no_open_connections().await;
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What already holds: an app crash and restart

/// `python3 -m http.server` on the reserved `port`, serving an empty directory; killed on drop.
async fn python_app(port: &ReservedPort, dir: &std::path::Path) -> Background {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "http.server",
        &port.port().to_string(),
        "--bind",
        "127.0.0.1",
    ])
    .current_dir(dir)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let app = Background::spawn(&mut cmd);
    wait_listening(port.addr, WAIT).await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_crash_gives_502s_and_its_restart_200s() {
    const TEST: &str = "app_crash_gives_502s_and_its_restart_200s";
    bounded("test", TEST_TIMEOUT, async {
        if let Some(why) = missing(&["python3"]) {
            return skip(TEST, &why);
        }
        let dir = tempfile::tempdir().expect("a temp dir");
        // The port stays reserved while the app is down: the restarted app gets it back.
        let port = ReservedPort::new();
        let app = python_app(&port, dir.path()).await;
        let proxy = Proxy::start(port.addr, &[]).await;
        assert_eq!(proxy.get("/").await.status, StatusCode::OK);

        drop(app);
        for _ in 0..3 {
            assert_eq!(proxy.get("/").await.status, StatusCode::BAD_GATEWAY);
        }

        let _app = python_app(&port, dir.path()).await;
        assert_eq!(
            proxy.get("/").await.status,
            StatusCode::OK,
            "the first request after the restart"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What already holds: HTTP/2 rapid reset

/// An HTTP/2 frame header: 24-bit length, type, flags, stream id.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = len.to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

const H2_HEADERS: u8 = 0x1;
const H2_RST_STREAM: u8 = 0x3;
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;
const H2_GOAWAY: u8 = 0x7;
const H2_ACK: u8 = 0x1;
const H2_CANCEL: u32 = 0x8;
const H2_ENHANCE_YOUR_CALM: u32 = 0xb;

/// `GET /` with END_STREAM and END_HEADERS, in HPACK: `:method GET`, `:scheme http`, `:path /`
/// from the static table, `:authority t` as a literal.
fn h2_get(stream: u32) -> Vec<u8> {
    h2_frame(
        H2_HEADERS,
        0x5,
        stream,
        &[0x82, 0x86, 0x84, 0x01, 0x01, b't'],
    )
}

/// Reads frames until the connection ends (or [`WAIT`] runs out); returns the GOAWAY error codes
/// seen and whether the connection ended.
async fn h2_goaways(stream: &mut TcpStream) -> (Vec<u32>, bool) {
    let mut goaways = Vec::new();
    let read = h2_frames(stream, |kind, _, payload| {
        if kind == H2_GOAWAY && payload.len() >= 8 {
            let code = &payload[4..8];
            goaways.push(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
    });
    let ended = tokio::time::timeout(WAIT, read).await.is_ok();
    (goaways, ended)
}

/// Reads HTTP/2 frames from `stream` until the connection ends, giving each one's type, flags and
/// payload to `frame`.
async fn h2_frames(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    mut frame: impl FnMut(u8, u8, &[u8]),
) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            frame(buf[3], buf[4], &buf[9..9 + len]);
            buf.drain(..9 + len);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_before_it_reaches_the_app() {
    bounded("test", TEST_TIMEOUT, async {
        const STREAMS: u32 = 1000;
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let mut attack = amazing_proxy::proxy::detect::H2_PREFACE.to_vec();
        attack.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
        for i in 0..STREAMS {
            let stream = 2 * i + 1;
            attack.extend(h2_get(stream));
            attack.extend(h2_frame(H2_RST_STREAM, 0, stream, &H2_CANCEL.to_be_bytes()));
        }
        let mut conn = TcpStream::connect(proxy.inbound).await.expect("connect");
        // The proxy may close the connection before it has read everything: not an error here.
        let _ = conn.write_all(&attack).await;
        let (goaways, ended) = h2_goaways(&mut conn).await;
        assert!(ended, "the connection was left open after {STREAMS} resets");
        assert_eq!(goaways, [H2_ENHANCE_YOUR_CALM], "GOAWAY error codes");
        drop(conn);
        proxy.wait_no_open_connections().await;

        // The flood stayed at the proxy: the streams hyper accepted before the cut may have been
        // forwarded (its pending-reset allowance is 20), never the rest.
        let forwarded = app.state.requests.load(Ordering::SeqCst);
        assert!(
            forwarded <= 50,
            "{forwarded} of {STREAMS} reset streams reached the app"
        );
        assert_eq!(proxy.get("/after-the-flood").await.status, StatusCode::OK);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 connections that only idle: shed at the limit, closed after --idle-timeout

/// An HTTP/2 (prior knowledge) connection through the proxy that has had one answered request and
/// stays open: hyper's client answers the proxy's PINGs. `closed` ends when the proxy closes it.
struct IdleH2 {
    _sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    closed: tokio::task::JoinHandle<()>,
}

async fn idle_h2(addr: SocketAddr, path: &str) -> IdleH2 {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("HTTP/2 handshake");
    let closed = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = http::Request::get(format!("http://{addr}{path}"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("HTTP/2 response");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("body");
    IdleH2 {
        _sender: sender,
        closed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_make_room_at_the_connection_limit() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-connections", "10"]).await;
        let mut idle = Vec::new();
        for i in 0..10 {
            idle.push(idle_h2(proxy.inbound, &format!("/echo?h2={i}")).await);
        }
        served_at_the_limit(&proxy, 10, 3).await;
        // The room came from idle HTTP/2 connections, which the proxy closed.
        eventually("a shed HTTP/2 connection to close", WAIT, || async {
            idle.iter().any(|c| c.closed.is_finished()).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_http2_connection_that_ignores_pings_closes_at_once() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        // A head timeout (hence PING timeout) far beyond WAIT: a graceful close that waited for
        // the silent client's PING answer would outlast the test's patience.
        let proxy = Proxy::start(
            app.addr,
            &["--max-connections", "3", "--header-timeout", "5m"],
        )
        .await;
        // HTTP/2 prefaces and nothing else: no request, no SETTINGS ack, no PING answer. Each
        // connection's frames are read as they come: the acknowledgements of our own PINGs are
        // kept, and the channel closes with the connection.
        let mut silent = Vec::new();
        for _ in 0..3 {
            let mut conn = TcpStream::connect(proxy.inbound).await.expect("connect");
            let mut hello = amazing_proxy::proxy::detect::H2_PREFACE.to_vec();
            hello.extend(h2_frame(H2_SETTINGS, 0, 0, &[]));
            conn.write_all(&hello).await.expect("preface");
            let (read, write) = conn.into_split();
            let (acks, acked) = tokio::sync::mpsc::unbounded_channel();
            let reader = tokio::spawn(h2_frames(read, move |kind, flags, payload| {
                if kind == H2_PING && flags & H2_ACK != 0 {
                    let _ = acks.send(payload.to_vec());
                }
            }));
            silent.push((write, acked, AbortOnDrop(reader)));
        }
        served_at_the_limit(&proxy, 3, 1).await;
        // One of the silent connections made the room and was closed outright.
        let ends = silent
            .iter_mut()
            .map(|(_, acked, _)| Box::pin(async move { while acked.recv().await.is_some() {} }))
            .collect::<Vec<_>>();
        let ((), shed, others) = bounded(
            "a shed HTTP/2 connection that ignores PINGs to close",
            WAIT,
            futures_util::future::select_all(ends),
        )
        .await;
        drop(others);
        // The others stay: each still answers a PING of ours.
        for (i, (write, acked, _)) in silent.iter_mut().enumerate() {
            if i == shed {
                continue;
            }
            let payload = [u8::try_from(i).expect("three connections"); 8];
            write
                .write_all(&h2_frame(H2_PING, 0, 0, &payload))
                .await
                .expect("a PING on a connection that was not shed");
            let ack = bounded("the PING's acknowledgement", WAIT, acked.recv()).await;
            assert_eq!(
                ack.as_deref(),
                Some(&payload[..]),
                "a connection that was not shed closed too"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--idle-timeout", "1s"]).await;
        let h2 = idle_h2(proxy.inbound, "/echo").await;
        bounded(
            "the proxy to close an HTTP/2 connection idle for --idle-timeout",
            WAIT,
            h2.closed,
        )
        .await
        .expect("the client's connection task");
        proxy.wait_no_open_connections().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What already holds: the in-flight limit is exact and gives its slots back

/// Sends `GET /hang` on a new connection and waits until `started` requests reached the app.
async fn hang(proxy: &Proxy, app: &TestApp, started: usize) -> RawClient {
    let mut client = RawClient::connect(proxy.inbound).await;
    client.send(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n").await;
    eventually("the hanging request to reach the app", WAIT, || async {
        (app.state.started.load(Ordering::SeqCst) == started).then_some(())
    })
    .await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_max_in_flight_requests_are_served_and_no_slot_leaks() {
    bounded("test", TEST_TIMEOUT, async {
        const LIMIT: usize = 5;
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--max-in-flight", &LIMIT.to_string()]).await;
        for round in 1..=2 {
            let mut held = Vec::new();
            for i in 1..=LIMIT {
                held.push(hang(&proxy, &app, (round - 1) * LIMIT + i).await);
            }
            for extra in 0..7 {
                let refused = proxy
                    .get(&format!("/echo?round={round}&extra={extra}"))
                    .await;
                assert_eq!(
                    refused.status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "round {round}, request {extra} over the limit: {}",
                    refused.text()
                );
                assert!(
                    refused.header("retry-after").is_some(),
                    "{:?}",
                    refused.headers
                );
            }
            // The refused requests never reached the app; the held ones all did.
            assert_eq!(app.state.requests.load(Ordering::SeqCst), round * LIMIT);
            // Clients leaving give their slots back: the next round gets all LIMIT of them again.
            drop(held);
            eventually(
                "the app to see the hanging requests cancelled",
                WAIT,
                || async {
                    (app.state.cancelled.load(Ordering::SeqCst) == round * LIMIT).then_some(())
                },
            )
            .await;
            proxy.wait_no_open_connections().await;
        }
        assert_eq!(proxy.get("/echo?after=all").await.status, StatusCode::OK);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What already holds: a large download to a slow reader holds no more than a buffer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_to_a_slow_reader_keeps_memory_flat() {
    bounded("test", TEST_TIMEOUT, async {
        const TOTAL: u64 = 200 * 1024 * 1024;
        // Generous: a copy buffer and socket bookkeeping, not the 200 MB the app sends.
        const GROWTH_BOUND: u64 = 16 * 1024 * 1024;
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        assert_eq!(proxy.get("/echo?warm=up").await.status, StatusCode::OK);
        let before = proxy.peak_rss_bytes();

        let mut conn = H1Conn::<Empty<Bytes>>::connect(proxy.inbound).await;
        let response = bounded(
            "the download's head",
            WAIT,
            conn.request(get_request(
                proxy.inbound,
                &format!("/stream?bytes={TOTAL}"),
            )),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut received = 0u64;
        let mut slow_peak = before;
        // About 1 MB/s for the first 3 MB: the app is far ahead, the proxy must hold it back
        // rather than buffer it. Then the rest as fast as it comes.
        while let Some(frame) = bounded("a body frame", WAIT, body.frame()).await {
            let frame = frame.expect("a body frame");
            if let Some(data) = frame.data_ref() {
                let slow = received < 3 * 1024 * 1024;
                received += data.len() as u64;
                if slow {
                    tokio::time::sleep(Duration::from_millis(data.len() as u64 / 1024)).await;
                    slow_peak = proxy.peak_rss_bytes();
                }
            }
        }
        assert_eq!(received, TOTAL, "bytes received");
        let peak = proxy.peak_rss_bytes();
        assert!(
            slow_peak.saturating_sub(before) < GROWTH_BOUND,
            "peak RSS grew by {} bytes while the client read slowly",
            slow_peak.saturating_sub(before)
        );
        assert!(
            peak.saturating_sub(before) < GROWTH_BOUND,
            "peak RSS grew by {} bytes over the download",
            peak.saturating_sub(before)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What already holds: the drain delay under load loses nothing

/// What a load client saw: 200s, other statuses, requests that got no response, and responses
/// that said `Connection: close`.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    other: AtomicUsize,
    lost: AtomicUsize,
    closed: AtomicUsize,
}

impl Tally {
    fn count(&self, response: Option<support::raw::Message>) {
        let Some(response) = response else {
            self.lost.fetch_add(1, Ordering::SeqCst);
            return;
        };
        if response.status() == 200 {
            self.ok.fetch_add(1, Ordering::SeqCst);
        } else {
            self.other.fetch_add(1, Ordering::SeqCst);
        }
        if response
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn total(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
            + self.other.load(Ordering::SeqCst)
            + self.lost.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delay_under_load_loses_no_request() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        // The delay is long enough that the whole load below falls inside it (it is never waited
        // out: the test ends with the proxy still draining, and kills it).
        let proxy = Proxy::start(app.addr, &["--drain-delay", "50s"]).await;
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut clients = Vec::new();
        // Four keep-alive clients and two that open a connection per request.
        for c in 0..6 {
            let (inbound, tally, stop) = (proxy.inbound, tally.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let request = format!("GET /echo?client={c} HTTP/1.1\r\nHost: t\r\n\r\n");
                let mut conn = RawClient::connect(inbound).await;
                while !stop.load(Ordering::SeqCst) {
                    if c >= 4 {
                        conn = RawClient::connect(inbound).await;
                    }
                    conn.send(request.as_bytes()).await;
                    tally.count(conn.response().await);
                }
            }));
        }
        eventually("the load to get going", WAIT, || async {
            (tally.total() >= 100).then_some(())
        })
        .await;
        proxy.signal("TERM");
        eventually("/ready to answer 503", WAIT, || async {
            (proxy.admin_get("/ready").await.status == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(())
        })
        .await;
        let at_drain = tally.total();
        eventually(
            "300 requests during the drain delay",
            TEST_TIMEOUT,
            || async { (tally.total() >= at_drain + 300).then_some(()) },
        )
        .await;
        stop.store(true, Ordering::SeqCst);
        for client in clients {
            client.await.expect("a load client");
        }
        assert_eq!(tally.lost.load(Ordering::SeqCst), 0, "requests lost");
        assert_eq!(tally.other.load(Ordering::SeqCst), 0, "requests not 200");
        assert_eq!(
            tally.closed.load(Ordering::SeqCst),
            0,
            "connections closed during the delay"
        );
        assert_eq!(
            proxy.get("/echo?still=serving").await.status,
            StatusCode::OK
        );
    })
    .await;
}
