//! Issue 6, opaque TCP and detection, with real servers started by the test:
//! - an echo server that answers only after EOF: half-close crosses the proxy both ways;
//! - Redis (`redis-server`): RESP through detection (`not_http`), an 8 MiB value, `redis-cli`,
//!   and inline commands that look like HTTP methods (`GET key`);
//! - MariaDB (`mariadbd`), a server-speaks-first protocol: through `--opaque-ports` (reason
//!   `opaque_port`) and through detection (reason `timeout`), the greeting arrives and the `mariadb`
//!   client works;
//! - a fake banner server for a client that sends nothing and half-closes at once.
//!
//! Redis and MariaDB come from Debian (`scripts/deps.sh` installs them).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::http::{ReservedPort, payload, wait_listening};
use crate::support::metrics::metric;
use crate::support::process::{Background, Proxy};
use crate::support::tools::{have, missing};
use crate::support::{WAIT, bounded, skip};

const REDIS: &[&str] = &["redis-server", "redis-cli"];
const MARIADB: &[&str] = &["mariadb-install-db", "mariadb"];

/// A proxy whose app's port is its only opaque port.
async fn opaque_proxy(app: SocketAddr, extra: &[&str]) -> Proxy {
    // A connection to the inbound port itself stands for --app: the app's port is what is opaque.
    Proxy::builder(app)
        .args(["--opaque-ports", &app.port().to_string()])
        .args(extra.iter().copied())
        .start()
        .await
}

// ---------------------------------------------------------------------------------------------
// Half-close

/// Reads to EOF, then writes everything back and closes.
async fn start_echo_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    let _ = s.write_all(&all).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn half_close_round_trip(proxy: &Proxy, data: &[u8]) {
    let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await.expect("write");
        // Only our write half closes: the server sees EOF and must still be able to answer.
        w.shutdown().await.expect("shutdown(Write)");
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.expect("read the echo");
        back
    };
    let ((), back) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
        .await
        .expect("echo timed out");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echo differs");
}

#[tokio::test]
async fn half_close_through_an_opaque_port() {
    bounded("test", Duration::from_secs(120), async {
        let app = start_echo_after_eof().await;
        let proxy = opaque_proxy(app, &[]).await;
        // Starts like HTTP: on an opaque port it must not matter.
        let mut data = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        data.extend(payload(2 * 1024 * 1024));
        half_close_round_trip(&proxy, &data).await;

        let n = data.len() as u64;
        let r = proxy.wait_record(|r| r["protocol"] == "TCP").await;
        assert_eq!(r["request_bytes"], n, "{r}");
        assert_eq!(r["response_bytes"], n, "{r}");
        assert_eq!(r["upstream"], app.to_string(), "{r}");
        assert!(r.get("error").is_none(), "{r}");
        let inbound = "direction=\"inbound\"";
        proxy
            .wait_metric("amazing_proxy_tcp_read_bytes_total", &[inbound], n as f64)
            .await;
        proxy
            .wait_metric("amazing_proxy_tcp_write_bytes_total", &[inbound], n as f64)
            .await;
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"opaque\"", "reason=\"opaque_port\""],
                1.0,
            )
            .await;
    })
    .await;
}

#[tokio::test]
async fn half_close_through_detection() {
    bounded("test", Duration::from_secs(120), async {
        let app = start_echo_after_eof().await;
        let proxy = Proxy::start(app, &[]).await;
        let mut data = b"\x00\x01binary hello".to_vec();
        data.extend(payload(1024 * 1024));
        half_close_round_trip(&proxy, &data).await;
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"opaque\"", "reason=\"not_http\""],
                1.0,
            )
            .await;
        let r = proxy.wait_record(|r| r["protocol"] == "TCP").await;
        assert_eq!(r["request_bytes"], data.len() as u64, "{r}");
    })
    .await;
}

/// A server that reads 1000 bytes and then resets the connection (SO_LINGER 0): the copy fails,
/// and what crossed before the reset must still be logged and counted.
#[tokio::test]
async fn bytes_are_counted_when_the_server_resets() {
    bounded("test", Duration::from_secs(120), async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 1000];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.set_zero_linger();
                    drop(s);
                }
            }
        });
        let proxy = opaque_proxy(app, &[]).await;
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        s.write_all(&payload(1000)).await.expect("write");
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
            .await
            .expect("the proxy kept the connection open after the reset");
        let r = proxy.wait_record(|r| r["protocol"] == "TCP").await;
        assert_eq!(r["request_bytes"], 1000, "{r}");
        assert_eq!(r["error"], "tcp_io", "{r}");
        proxy
            .wait_metric(
                "amazing_proxy_tcp_read_bytes_total",
                &["direction=\"inbound\""],
                1000.0,
            )
            .await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Server speaks first: a fake banner server

/// Sends a banner on accept, then echoes lines prefixed with `> ` until EOF.
async fn start_banner_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"220 banner.test ESMTP ready\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let mut reply = b"> ".to_vec();
                            reply.extend_from_slice(&buf[..n]);
                            if s.write_all(&reply).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn read_exact_bounded(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

#[tokio::test]
async fn server_first_banner_after_the_detect_timeout() {
    bounded("test", Duration::from_secs(120), async {
        let app = start_banner_server().await;
        let proxy = Proxy::start(app, &["--detect-timeout", "200ms"]).await;
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        let banner = read_exact_bounded(&mut s, 29).await;
        assert_eq!(banner, b"220 banner.test ESMTP ready\r\n");
        s.write_all(b"EHLO client\r\n").await.expect("write");
        let reply = read_exact_bounded(&mut s, 15).await;
        assert_eq!(reply, b"> EHLO client\r\n");
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"opaque\"", "reason=\"server_first\""],
                1.0,
            )
            .await;
    })
    .await;
}

/// A client that only listens (`nc host port < /dev/null`): it half-closes before sending
/// anything, and the server's banner must still come back.
#[tokio::test]
async fn client_that_sends_nothing_and_half_closes_still_gets_the_banner() {
    bounded("test", Duration::from_secs(120), async {
        let app = start_banner_server().await;
        let proxy = Proxy::start(app, &["--detect-timeout", "200ms"]).await;
        let mut s = TcpStream::connect(proxy.inbound).await.expect("connect");
        s.shutdown().await.expect("shutdown(Write)");
        let mut all = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut all))
            .await
            .expect("read timed out")
            .expect("read");
        assert_eq!(all, b"220 banner.test ESMTP ready\r\n");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Redis

/// Fields drop in order: the server is killed before its port is released.
struct Redis {
    _child: Background,
    _port: ReservedPort,
    addr: SocketAddr,
}

async fn start_redis() -> Redis {
    let port = ReservedPort::new();
    let addr = port.addr;
    let child = Background::spawn(
        Command::new("redis-server")
            .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_listening(addr, Duration::from_secs(60)).await;
    Redis {
        _child: child,
        _port: port,
        addr,
    }
}

fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one RESP reply: a simple line (`+OK`) or a bulk string's contents.
async fn resp_reply(s: &mut tokio::io::BufReader<TcpStream>) -> Vec<u8> {
    use tokio::io::AsyncBufReadExt;
    let read = async {
        let mut line = Vec::new();
        s.read_until(b'\n', &mut line).await.expect("reply line");
        match line.first() {
            Some(b'$') => {
                let len: usize = std::str::from_utf8(&line[1..line.len() - 2])
                    .expect("utf8")
                    .parse()
                    .expect("bulk length");
                let mut body = vec![0u8; len + 2];
                s.read_exact(&mut body).await.expect("bulk body");
                body.truncate(len);
                body
            }
            _ => line,
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("reply timed out")
}

#[tokio::test]
async fn redis_through_detection_with_a_large_value() {
    bounded("test", Duration::from_secs(120), async {
        if let Some(why) = missing(REDIS) {
            return skip("redis_through_detection_with_a_large_value", &why);
        }
        let redis = start_redis().await;
        let proxy = Proxy::start(redis.addr, &[]).await;
        let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
        let mut s = tokio::io::BufReader::new(stream);
        let value = payload(8 * 1024 * 1024);
        s.get_mut()
            .write_all(&resp_command(&[b"SET", b"big", &value]))
            .await
            .expect("SET");
        assert_eq!(resp_reply(&mut s).await, b"+OK\r\n");
        s.get_mut()
            .write_all(&resp_command(&[b"GET", b"big"]))
            .await
            .expect("GET");
        let got = resp_reply(&mut s).await;
        assert_eq!(got.len(), value.len());
        assert!(got == value, "value differs");
        drop(s);

        // redis-cli, a real client, through the proxy.
        let port = proxy.inbound.port().to_string();
        let cli = move |args: &[&str]| {
            let out = Command::new("timeout")
                .args(["20", "redis-cli", "-h", "127.0.0.1", "-p", &port])
                .args(args)
                .output()
                .expect("redis-cli");
            assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let (set, strlen, get) = tokio::task::spawn_blocking(move || {
            (
                cli(&["SET", "greeting", "hello redis"]),
                cli(&["STRLEN", "big"]),
                cli(&["GET", "greeting"]),
            )
        })
        .await
        .expect("redis-cli");
        assert_eq!(set, "OK");
        assert_eq!(strlen, (8 * 1024 * 1024).to_string());
        assert_eq!(get, "hello redis");

        let r = proxy
            .wait_record(|r| {
                r["protocol"] == "TCP" && r["request_bytes"].as_u64() > Some(8_000_000)
            })
            .await;
        assert!(r["response_bytes"].as_u64() > Some(8_000_000), "{r}");
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"opaque\"", "reason=\"not_http\""],
                4.0,
            )
            .await;
    })
    .await;
}

/// Redis' inline protocol (`SET key value\r\n`, what `nc` and `telnet` users and some health checks
/// type) starts with an upper-case word and a space, like an HTTP request line. It is not HTTP and
/// must reach Redis.
#[tokio::test]
async fn redis_inline_commands_are_not_mistaken_for_http() {
    bounded("test", Duration::from_secs(120), async {
        if let Some(why) = missing(&REDIS[..1]) {
            return skip("redis_inline_commands_are_not_mistaken_for_http", &why);
        }
        let redis = start_redis().await;
        let proxy = Proxy::start(redis.addr, &[]).await;
        for (command, want) in [
            (&b"SET inline yes\r\n"[..], &b"+OK\r\n"[..]),
            (b"GET inline\r\n", b"yes"),
            (b"PING\r\n", b"+PONG\r\n"),
        ] {
            let stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            let mut s = tokio::io::BufReader::new(stream);
            s.get_mut().write_all(command).await.expect("write");
            assert_eq!(
                String::from_utf8_lossy(&resp_reply(&mut s).await),
                String::from_utf8_lossy(want),
                "{}",
                String::from_utf8_lossy(command)
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// MariaDB: a server-speaks-first protocol

/// Fields drop in order: the server is killed before its port and directory go.
struct Mariadb {
    _child: Background,
    _port: ReservedPort,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn mariadbd() -> &'static str {
    if have("mariadbd") {
        "mariadbd"
    } else {
        "/usr/sbin/mariadbd"
    }
}

async fn start_mariadb() -> Mariadb {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // Two bootstraps at once (tests run in parallel) sometimes fail: one at a time.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let out = {
        let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        Command::new("timeout")
            .args(["60", "mariadb-install-db", "--no-defaults"])
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .expect("mariadb-install-db")
    };
    assert!(
        out.status.success(),
        "mariadb-install-db failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = ReservedPort::new();
    let addr = port.addr;
    let child = Background::spawn(
        Command::new(mariadbd())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.path().join("s").display()))
            .arg(format!("--port={}", addr.port()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--user=root",
            ])
            .args(["--skip-log-bin", "--innodb-buffer-pool-size=16M"])
            .args(["--max-allowed-packet=64M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_listening(addr, Duration::from_secs(60)).await;
    Mariadb {
        _child: child,
        _port: port,
        addr,
        _dir: dir,
    }
}

/// Reads the server's initial handshake packet (MySQL protocol v10) without sending anything.
async fn read_greeting(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let header = read_exact_bounded(&mut s, 4).await;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    assert_eq!(header[3], 0, "first packet's sequence id");
    let body = read_exact_bounded(&mut s, len).await;
    assert_eq!(body[0], 10, "protocol version 10");
    let end = body[1..].iter().position(|&b| b == 0).expect("version") + 1;
    String::from_utf8_lossy(&body[1..end]).into_owned()
}

/// Runs SQL with the `mariadb` client through `port`; returns its tab-separated output.
async fn mariadb_sql(port: u16, sql: String) -> String {
    tokio::task::spawn_blocking(move || {
        let out = Command::new("timeout")
            .args(["30", "mariadb", "--no-defaults", "--protocol=TCP"])
            .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "root"])
            .args(["--batch", "--skip-column-names", "--max-allowed-packet=64M"])
            .args(["-e", &sql])
            .output()
            .expect("mariadb client");
        assert!(out.status.success(), "mariadb -e {sql:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .await
    .expect("mariadb client")
}

async fn mariadb_round_trip(port: u16) {
    let sql = "CREATE DATABASE IF NOT EXISTS t; \
               CREATE TABLE IF NOT EXISTS t.blobs (id INT PRIMARY KEY, v LONGBLOB); \
               REPLACE INTO t.blobs VALUES (1, REPEAT('abcdefgh', 1024 * 1024)); \
               SELECT LENGTH(v), MD5(v) = MD5(REPEAT('abcdefgh', 1024 * 1024)) FROM t.blobs WHERE id = 1; \
               SELECT v FROM t.blobs WHERE id = 1;";
    let out = mariadb_sql(port, sql.into()).await;
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("8388608\t1"),
        "{}",
        &out[..out.len().min(200)]
    );
    // The 8 MiB value itself came back through the proxy.
    assert_eq!(lines.next().map(str::len), Some(8 * 1024 * 1024));
}

#[tokio::test]
async fn mariadb_through_an_opaque_port() {
    bounded("test", Duration::from_secs(120), async {
        if let Some(why) = missing(MARIADB).or_else(|| missing(&[mariadbd()])) {
            return skip("mariadb_through_an_opaque_port", &why);
        }
        let db = start_mariadb().await;
        let proxy = opaque_proxy(db.addr, &[]).await;
        let version = read_greeting(proxy.inbound).await;
        assert!(version.contains("MariaDB"), "{version}");
        mariadb_round_trip(proxy.inbound.port()).await;
        // No detection happened: every connection was opaque by its port.
        let text = proxy.metrics().await;
        let by_port = metric(
            &text,
            "amazing_proxy_protocol_detections_total",
            &["reason=\"opaque_port\""],
        )
        .unwrap_or(0.0);
        assert!(by_port >= 2.0, "{text}");
        let detected = metric(
            &text,
            "amazing_proxy_protocol_detections_total",
            &["reason=\"server_first\""],
        )
        .unwrap_or(0.0);
        assert_eq!(detected, 0.0, "{text}");
    })
    .await;
}

#[tokio::test]
async fn mariadb_through_detection_after_the_timeout() {
    bounded("test", Duration::from_secs(120), async {
        if let Some(why) = missing(MARIADB).or_else(|| missing(&[mariadbd()])) {
            return skip("mariadb_through_detection_after_the_timeout", &why);
        }
        let db = start_mariadb().await;
        let proxy = Proxy::start(db.addr, &["--detect-timeout", "200ms"]).await;
        let version = read_greeting(proxy.inbound).await;
        assert!(version.contains("MariaDB"), "{version}");
        mariadb_round_trip(proxy.inbound.port()).await;
        proxy
            .wait_metric(
                "amazing_proxy_protocol_detections_total",
                &["protocol=\"opaque\"", "reason=\"server_first\""],
                2.0,
            )
            .await;
    })
    .await;
}
