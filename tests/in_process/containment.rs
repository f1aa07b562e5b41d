//! Containment (issue 17), the proxy alone: bytes that arrive after the detection timeout are still
//! HTTP, silent sockets and idle HBONE connections give their slots back, opaque TCP ends after its
//! idle timeout, and a policy made stricter reaches connections opened before it. What a hostile
//! pod of the mesh tries against a sidecar is in the netns suite's `containment`. Every check here
//! failed on the code before these rules existed; none asserts a time.

use crate::support;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::support::http::{H1Conn, TestApp, get_request};
use crate::support::identity::{CLIENT_ID, Ca, SERVER_ID};
use crate::support::in_process::{Captured, run_args};
use crate::support::process::Proxy;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::listener::Listener;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client that says nothing for longer than --detect-timeout and then sends a request is served
/// as HTTP (the app did not speak first): the proxy's own headers, a record with its method and
/// path, the client's forged X-Forwarded-For not taken as the proxy's word.
#[tokio::test]
async fn a_request_sent_after_the_detection_timeout_is_still_http() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--detect-timeout", "100ms"]).await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        // Past the detection timeout: the proxy connects to the app, which stays silent.
        proxy
            .wait_metric(
                "amazing_proxy_open_connections",
                &["direction=\"inbound\""],
                1.0,
            )
            .await;
        eventually(
            "the app connection the proxy made to ask it",
            WAIT,
            || async { (app.connections() >= 1).then_some(()) },
        )
        .await;
        stream
            .write_all(b"GET /echo?late=1 HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        bounded("the answer", WAIT, stream.read_to_end(&mut answer))
            .await
            .expect("read");
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("server: amazing-proxy"), "{answer}");
        let record = proxy
            .wait_record(|r| {
                r["method"] == "GET"
                    && r["original_url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("/echo?late=1"))
            })
            .await;
        assert_eq!(record["status"], 200, "{record}");
    })
    .await;
}

/// Silent sockets (past the detection timeout, the app silent too) are idle connections: at
/// --max-connections the proxy sheds one to serve a real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_shed_at_the_connection_limit() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(
            app.addr,
            &["--detect-timeout", "100ms", "--max-connections", "3"],
        )
        .await;
        let mut silent = Vec::new();
        for _ in 0..3 {
            silent.push(TcpStream::connect(proxy.inbound).await.expect("connect"));
        }
        proxy
            .wait_metric(
                "amazing_proxy_open_connections",
                &["direction=\"inbound\""],
                3.0,
            )
            .await;
        eventually("the silent sockets to be past detection", WAIT, || async {
            (app.connections() >= 3).then_some(())
        })
        .await;
        let reply = proxy.get("/echo?room=1").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let metrics = proxy.metrics().await;
        let shed = support::metrics::metric(&metrics, "amazing_proxy_shed_connections_total", &[]);
        assert!(shed.unwrap_or(0.0) >= 1.0, "{metrics}");
    })
    .await;
}

/// An opaque TCP connection on which nothing moves either way is closed after
/// --tcp-idle-timeout, and its record says so.
#[tokio::test]
async fn an_idle_opaque_connection_is_closed_after_the_tcp_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let port = app.addr.port().to_string();
        let proxy = Proxy::start(
            app.addr,
            &["--opaque-ports", &port, "--tcp-idle-timeout", "300ms"],
        )
        .await;
        let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut byte = [0u8; 1];
        let read = bounded(
            "the proxy to close the idle stream",
            WAIT,
            stream.read(&mut byte),
        )
        .await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let record = proxy.wait_record(|r| r["protocol"] == "TCP").await;
        assert_eq!(record["error"], "tcp_idle_timeout", "{record}");
    })
    .await;
}

/// A policy reloaded to refuse everything refuses the next request on a keep-alive connection
/// opened while the old policy allowed it (the fast path judged it only when the policy named
/// methods or paths).
#[tokio::test]
async fn a_stricter_policy_reaches_open_keep_alive_connections() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, "default: all-unauthenticated\n").expect("write");
        let path = policy.display().to_string();
        let proxy = Proxy::start(app.addr, &["--policy", &path]).await;
        let mut kept: H1Conn<http_body_util::Empty<bytes::Bytes>> =
            H1Conn::connect(proxy.inbound).await;
        let reply = kept
            .send(get_request(proxy.inbound, "/echo?before=1"))
            .await;
        assert_eq!(reply.status, StatusCode::OK);

        let reloads = || proxy.stderr().matches("policy reloaded").count();
        // The watcher reads the file once as it starts.
        eventually("the policy watcher to start", WAIT, || async {
            (reloads() >= 1).then_some(())
        })
        .await;
        std::fs::write(&policy, "# stricter\ndefault: deny\n").expect("rewrite");
        eventually("the stricter policy to be loaded", WAIT, || async {
            (reloads() >= 2).then_some(())
        })
        .await;
        let reply = kept.send(get_request(proxy.inbound, "/echo?after=1")).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// HBONE, in process: the server's connections and streams count, and give their slots back.

fn data_plane(app: SocketAddr, identity: &std::path::Path, extra: &[&str]) -> Arc<Shared> {
    let app = app.to_string();
    let dir = identity.display().to_string();
    let mut args = vec!["--app", &app, "--proxy-mark", "0", "--identity-dir", &dir];
    args.extend_from_slice(extra);
    let args = run_args(&args);
    args.validate().expect("valid flags");
    Shared::new(&args.proxy_config(), Box::new(Captured::default()))
}

/// A server data plane (its HBONE listener on loopback) and a client one, from one CA.
async fn hbone_pair(
    server_flags: &[&str],
) -> (
    Arc<Shared>,
    SocketAddr,
    Arc<Shared>,
    TestApp,
    tempfile::TempDir,
) {
    let ca = Ca::new("mesh CA");
    let dirs = tempfile::tempdir().expect("temp dir");
    ca.write_dir(&dirs.path().join("server"), &ca.issue(SERVER_ID));
    ca.write_dir(&dirs.path().join("client"), &ca.issue(CLIENT_ID));
    let app = TestApp::start().await;
    let server = data_plane(app.addr, &dirs.path().join("server"), server_flags);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hbone = listener.local_addr().expect("address");
    tokio::spawn(Listener::hbone(server.clone(), listener).run());
    let client = data_plane(app.addr, &dirs.path().join("client"), &[]);
    (server, hbone, client, app, dirs)
}

async fn open(
    client: &Shared,
    hbone: SocketAddr,
    target: SocketAddr,
) -> Result<
    amazing_proxy::proxy::hbone::outbound::Tunnel,
    amazing_proxy::proxy::hbone::outbound::OpenError,
> {
    let mtls = client.mtls.as_ref().expect("the client has an identity");
    let from: SocketAddr = "127.0.0.1:40000".parse().expect("address");
    bounded(
        "opening a tunnel",
        WAIT,
        mtls.pool.open(client, mtls, hbone, target, Some(from)),
    )
    .await
}

/// Sockets that connect to the HBONE port and never finish a handshake are shed for a peer that
/// does; an HBONE connection left without a stream is closed after --idle-timeout. The timers are
/// what is tested: once nothing but them is left to happen, the clock is paused and jumps from
/// deadline to deadline (a current-thread runtime, as pausing needs).
#[tokio::test]
async fn hbone_connections_are_shed_and_closed_when_idle() {
    bounded("test", TEST_TIMEOUT, async {
        let (server, hbone, client, app, _dirs) =
            hbone_pair(&["--max-connections", "2", "--idle-timeout", "1s"]).await;
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(hbone).await.expect("connect"));
        }
        eventually("two silent sockets to hold the limit", WAIT, || async {
            (server.limits.open_connections() == 2).then_some(())
        })
        .await;
        let tunnel = open(&client, hbone, app.addr)
            .await
            .expect("a tunnel: a silent socket shed");
        drop(tunnel);
        // The tunnel's connection stays pooled on the client, without a stream: the server closes
        // it after --idle-timeout (and the second silent socket after its handshake timeout).
        eventually(
            "the idle HBONE connection to close",
            Duration::from_secs(30),
            || async { (server.limits.open_connections() == 0).then_some(()) },
        )
        .await;
    })
    .await;
}

/// Every stream a peer opens holds an app connection: together with the TLS connections they stay
/// within --max-connections (shedding idle ones, else 503), where before they were not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_streams_count_against_the_connection_limit() {
    bounded("test", TEST_TIMEOUT, async {
        let (server, hbone, client, app, _dirs) = hbone_pair(&["--max-connections", "4"]).await;
        let mut tunnels = Vec::new();
        let mut refused = 0;
        for _ in 0..8 {
            match open(&client, hbone, app.addr).await {
                Ok(tunnel) => tunnels.push(tunnel),
                Err(e) => {
                    assert!(e.to_string().contains("answered 503"), "{e}");
                    refused += 1;
                }
            }
            // A shed connection closes as soon as its task runs: the count comes back to the limit.
            eventually(
                "connections and streams within the limit of 4",
                WAIT,
                || async { (server.limits.open_connections() <= 4).then_some(()) },
            )
            .await;
        }
        let metrics = server.telemetry.metrics.encode();
        let shed = support::metrics::metric(&metrics, "amazing_proxy_shed_connections_total", &[]);
        assert!(
            refused > 0 || shed.unwrap_or(0.0) > 0.0,
            "eight streams at a limit of four, none shed or refused: {metrics}"
        );
    })
    .await;
}

/// An app that accepts every connection and holds it, silent (an opaque server that never speaks).
async fn holding_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Waits until the proxy holds at most `limit` inbound connections.
async fn within_limit(proxy: &Proxy, limit: f64) {
    eventually(
        "the open connections back within the limit",
        WAIT,
        || async {
            let metrics = proxy.metrics().await;
            let labels = ["direction=\"inbound\""];
            let open =
                support::metrics::metric(&metrics, "amazing_proxy_open_connections", &labels);
            open.is_some_and(|open| open <= limit).then_some(())
        },
    )
    .await;
}

/// A connection the shedder chooses while its first bytes are being detected closes at once, even
/// when it then speaks (before, it was only marked, went on to become opaque TCP for good, and
/// every new connection marked another: forty open at a limit of four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_shed_while_detecting_closes_at_once() {
    bounded("test", TEST_TIMEOUT, async {
        let app = holding_app().await;
        let limit = ["--max-connections", "4", "--detect-timeout", "5s"];
        let proxy = Proxy::start(app, &limit).await;
        let mut clients: Vec<TcpStream> = Vec::new();
        for i in 0..12_u32 {
            clients.push(TcpStream::connect(proxy.inbound).await.expect("connect"));
            if i >= 4 {
                // The oldest silent one was chosen to make room: it now speaks, not HTTP.
                let shed = f64::from(i - 3);
                proxy
                    .wait_metric("amazing_proxy_shed_connections_total", &[], shed)
                    .await;
                let oldest = usize::try_from(i - 4).expect("small");
                let _ = clients[oldest].write_all(b"\x00\x01binary").await;
            }
        }
        within_limit(&proxy, 4.0).await;
    })
    .await;
}

/// Silent connections on an HTTP port wait for their head for --header-timeout; chosen by the
/// shedder meanwhile, they close at once rather than overshoot the limit for that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_on_an_http_port_stay_within_the_limit() {
    bounded("test", TEST_TIMEOUT, async {
        let app = holding_app().await;
        let port = app.port().to_string();
        let proxy = Proxy::start(app, &["--max-connections", "4", "--http-ports", &port]).await;
        let mut clients = Vec::new();
        for _ in 0..12 {
            clients.push(TcpStream::connect(proxy.inbound).await.expect("connect"));
        }
        proxy
            .wait_metric("amazing_proxy_shed_connections_total", &[], 8.0)
            .await;
        within_limit(&proxy, 4.0).await;
    })
    .await;
}
