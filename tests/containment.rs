//! Containment (issue 17): what a hostile workload tries against a sidecar, and what it gets.
//! Two pods in network namespaces, the client pod holding a valid certificate of the mesh, try to
//! reach what pod B serves only to itself (a service bound to loopback, the proxy's admin port)
//! and to get around B's per-port policy (by dialling the inbound port itself); then the proxy
//! alone: bytes that arrive after the detection timeout are still HTTP, silent sockets and idle
//! HBONE connections give their slots back, opaque TCP ends after its idle timeout, and a policy
//! made stricter reaches connections opened before it. Every check here failed on the code before
//! these rules existed; none asserts a time.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amazing_proxy::proxy::Shared;
use amazing_proxy::proxy::listener::Listener;
use http::StatusCode;
use support::http::{H1Conn, TestApp, get_request};
use support::identity::Ca;
use support::in_process::{Captured, run_args};
use support::mesh::{APP_CONTENT, APP_FILE, APP_PORT, Mesh};
use support::netns::Netns;
use support::process::Proxy;
use support::{TEST_TIMEOUT, WAIT, bounded, eventually, eventually_blocking};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ATTACKER_ID: &str = "spiffe://cluster.local/ns/shop/sa/attacker";
const VICTIM_ID: &str = "spiffe://cluster.local/ns/shop/sa/backend";
/// A debug server pod B binds to loopback only, and what it would leak.
const LOOPBACK_PORT: u16 = 9090;
const SECRET: &str = "loopback-only secret\n";

/// Pod B's debug server: bound to 127.0.0.1 only, serving `SECRET`.
fn serve_loopback_secret(mesh: &mut Mesh) {
    let root = mesh.path("secret-root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("secret.txt"), SECRET).expect("write");
    let python = support::tools::venv()
        .expect("the venv")
        .join("bin/python3");
    let port = LOOPBACK_PORT.to_string();
    let root = root.display().to_string();
    let python = python.display().to_string();
    let server = [
        &python,
        "-m",
        "http.server",
        &port,
        "--bind",
        "127.0.0.1",
        "--directory",
        &root,
    ];
    mesh.spawn_in("b", &server, "secret.log");
    eventually_blocking("the loopback-only server", WAIT, || {
        let url = format!("http://127.0.0.1:{LOOPBACK_PORT}/secret.txt");
        let out = mesh.ns_b().exec(&["curl", "-fsS", "-m", "1", &url]);
        (String::from_utf8_lossy(&out.stdout) == SECRET)
            .then_some(())
            .ok_or_else(|| mesh.read("secret.log"))
    });
}

/// Pod A (the attacker: a valid identity of the mesh) against pod B, whose policy lets any
/// authenticated peer reach its app port and no one else, and whose loopback-only debug server and
/// admin port must stay the pod's own. Through A's sidecar (an HBONE tunnel naming any port of B)
/// and around it (plaintext as the proxy's uid, which A's rules let out), A reaches the app and
/// nothing else; B keeps serving.
#[test]
fn a_mesh_peer_reaches_only_what_the_pod_serves_on_its_own_address() {
    let test = "a_mesh_peer_reaches_only_what_the_pod_serves_on_its_own_address";
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "default: all-unauthenticated\nports:\n  - port: {APP_PORT}\n    allow:\n      - authenticated: true\n"
        ),
    )
    .expect("write the policy");
    let policy = policy.display().to_string();
    let ca = Ca::new("mesh CA");
    let victim_args: &[&str] = &["--policy", &policy];
    let mut mesh = match Mesh::start(&ca, (ATTACKER_ID, &[]), (VICTIM_ID, victim_args)) {
        Ok(mesh) => mesh,
        Err(why) => return support::skip(test, &why),
    };
    serve_loopback_secret(&mut mesh);
    let b = mesh.b_ip;
    let app = |uid: &str| mesh.curl_in_a(uid, &[&format!("http://{b}:{APP_PORT}/{APP_FILE}")]);

    // The control: A's app reaches B's app through the tunnel.
    assert_eq!(
        app("1000").as_deref(),
        Ok(APP_CONTENT),
        "{}",
        mesh.read("b-proxy.log")
    );

    // B's loopback-only server: neither in a tunnel (CONNECT b:9090) nor in plaintext.
    let secret_url = format!("http://{b}:{LOOPBACK_PORT}/secret.txt");
    for uid in ["1000", "1337"] {
        let got = mesh.curl_in_a(uid, &["-o", "-", "-w", "%{http_code}", &secret_url]);
        assert!(
            !got.as_deref().unwrap_or_default().contains(SECRET.trim()),
            "uid {uid} read B's loopback-only server: {got:?}"
        );
    }

    // B's admin port: POST /shutdown in a tunnel (CONNECT b:15000) or plaintext drains nothing.
    let shutdown = format!("http://{b}:15000/shutdown");
    for uid in ["1000", "1337"] {
        let got = mesh.curl_in_a(
            uid,
            &["-X", "POST", "-o", "-", "-w", "%{http_code}", &shutdown],
        );
        assert!(
            !got.as_deref().unwrap_or_default().ends_with("200"),
            "uid {uid} drained B: {got:?}"
        );
    }
    // The tunnel to B's inbound port itself is refused too (it would loop).
    let inbound_url = format!("http://{b}:8000/{APP_FILE}");
    let got = mesh.curl_in_a("1000", &["-o", "-", "-w", "%{http_code}", &inbound_url]);
    assert!(
        !got.as_deref()
            .unwrap_or_default()
            .contains(APP_CONTENT.trim()),
        "a tunnel to B's inbound port reached the app: {got:?}"
    );
    // Plaintext to B's inbound port stands for the app's port, and its rule wants a peer identity.
    let got = mesh.curl_in_a("1337", &["-o", "-", "-w", "%{http_code}", &inbound_url]);
    assert!(
        !got.as_deref()
            .unwrap_or_default()
            .contains(APP_CONTENT.trim()),
        "plaintext to B's inbound port skipped the app port's rule: {got:?}"
    );
    // And plaintext to the app port itself is refused by that rule (the control).
    assert!(
        app("1337").is_err(),
        "plaintext passed a rule for authenticated peers"
    );

    let ready = mesh
        .ns_b()
        .exec(&["curl", "-fsS", "-m", "2", "http://127.0.0.1:15000/ready"]);
    assert!(
        ready.status.success(),
        "B no longer ready: {}",
        mesh.read("b-proxy.log")
    );
    let metrics = mesh
        .ns_b()
        .exec(&["curl", "-fsS", "-m", "2", "http://127.0.0.1:15000/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("proxy_port"),
        "the refusals are counted: {metrics}"
    );
    assert_eq!(app("1000").as_deref(), Ok(APP_CONTENT), "B still serves");
}

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

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";

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
    ca.write_dir(&dirs.path().join("server"), &ca.issue(VICTIM_ID));
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
        mtls.pool.open(client, mtls, hbone, target, from),
    )
    .await
}

/// Sockets that connect to the HBONE port and never finish a handshake are shed for a peer that
/// does; an HBONE connection left without a stream is closed after --idle-timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

/// A (the attacker), B (a pod: `init`, `run`, a loopback-only server) and C (a host only B
/// reaches), in a line. Returns them with A's, B's and C's addresses.
fn relay_hosts() -> Option<(Netns, Netns, Netns, [String; 3])> {
    let (Ok(a), Ok(mut b), Ok(mut c)) = (
        Netns::unique("ap-relay-a"),
        Netns::unique("ap-relay-b"),
        Netns::unique("ap-relay-c"),
    ) else {
        return None;
    };
    // A /30 each for A-B and B-C, from the pid, inside 198.18.0.0/15.
    let base = u32::from(std::net::Ipv4Addr::new(198, 19, 0, 0)) + (std::process::id() % 8192) * 8;
    let ip = |n: u32| std::net::Ipv4Addr::from(base + n).to_string();
    let (a_ip, b_ip, b_c_ip, c_ip) = (ip(1), ip(2), ip(5), ip(6));
    let link = |x: &Netns, y: &Netns, x_if: &str| {
        support::process::must(std::process::Command::new("ip").args([
            "-n", &x.name, "link", "add", x_if, "type", "veth", "peer", "name", "eth0", "netns",
            &y.name,
        ]));
    };
    link(&a, &b, "eth0");
    link(&b, &c, "eth1");
    for (ns, ifname, addr) in [
        (&a, "eth0", &a_ip),
        (&b, "eth0", &b_ip),
        (&b, "eth1", &b_c_ip),
        (&c, "eth0", &c_ip),
    ] {
        ns.ok(&["ip", "addr", "add", &format!("{addr}/30"), "dev", ifname]);
        ns.ok(&["ip", "link", "set", ifname, "up"]);
    }
    let banner = |addr: &str, port: u16, text: &str| {
        format!(
            "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{addr}',{port}));s.listen()\nwhile True:\n  c,_=s.accept();c.sendall(b'{text}');c.close()\n"
        )
    };
    c.spawn(&["python3", "-c", &banner(&c_ip, 7777, "only-B-reaches-C")]);
    b.spawn(&[
        "python3",
        "-c",
        &banner("127.0.0.1", LOOPBACK_PORT, "loopback-secret"),
    ]);
    let bin = support::process::bin();
    b.ok(&[bin, "init"]);
    b.spawn(&[
        bin,
        "run",
        "--app",
        "127.0.0.1:8080",
        "--detect-timeout",
        "100ms",
    ]);
    eventually_blocking("B's proxy and servers", WAIT, || {
        let ready = b.exec(&["curl", "-fsS", "-m", "1", "http://127.0.0.1:15000/ready"]);
        let lo = b.exec(&[
            "python3",
            "-c",
            &format!("import socket;socket.create_connection(('127.0.0.1',{LOOPBACK_PORT}),1)"),
        ]);
        let c_up = b.exec(&[
            "python3",
            "-c",
            &format!("import socket;socket.create_connection(('{c_ip}',7777),1)"),
        ]);
        (ready.status.success() && lo.status.success() && c_up.status.success())
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    Some((a, b, c, [a_ip, b_ip, c_ip]))
}

/// A peer that is root in its own namespace routes packets for other addresses to pod B: for a
/// host only B can reach, and for 127.0.0.1 (with `route_localnet`). B's inbound rules redirect
/// them like any other; its sidecar must not relay them to where they were addressed (B's
/// loopback-only server, or another host as B), only to what B serves on its own address.
#[test]
fn a_peer_routing_other_destinations_through_the_pod_reaches_neither() {
    let test = "a_peer_routing_other_destinations_through_the_pod_reaches_neither";
    let Some((a, b, c, [a_ip, b_ip, c_ip])) = relay_hosts() else {
        return support::skip(test, "cannot create network namespaces (not root?)");
    };
    let read_from_a = |addr: &str, port: u16| {
        let code = format!(
            "import socket\ntry:\n  s=socket.create_connection(('{addr}',{port}),3);s.settimeout(3);print(s.recv(100))\nexcept Exception as e:\n  print('refused:',e)\n"
        );
        String::from_utf8_lossy(&a.exec(&["python3", "-c", &code]).stdout).into_owned()
    };
    // C through B: A has no route to C, so it routes C's address to B.
    a.ok(&["ip", "route", "add", &format!("{c_ip}/32"), "via", &b_ip]);
    let got = read_from_a(&c_ip, 7777);
    assert!(
        !got.contains("only-B-reaches-C"),
        "B's sidecar relayed A to C: {got}"
    );
    // 127.0.0.1 through B: A's own kernel must be told to send loopback out of eth0.
    for cmd in [
        vec!["ip", "rule", "add", "pref", "10", "lookup", "local"],
        vec!["ip", "rule", "del", "pref", "0"],
        vec![
            "ip",
            "rule",
            "add",
            "pref",
            "5",
            "to",
            "127.0.0.1/32",
            "ipproto",
            "tcp",
            "lookup",
            "100",
        ],
        vec![
            "ip",
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            &b_ip,
            "dev",
            "eth0",
            "src",
            &a_ip,
            "table",
            "100",
        ],
        vec![
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.route_localnet=1",
            "net.ipv4.conf.eth0.route_localnet=1",
        ],
    ] {
        a.ok(&cmd);
    }
    let got = read_from_a("127.0.0.1", LOOPBACK_PORT);
    assert!(
        !got.contains("loopback-secret"),
        "A read B's loopback-only server: {got}"
    );
    drop((a, b, c));
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
