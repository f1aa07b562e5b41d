//! The HTTP/1.1 fast path against a hostile client and a hostile or broken app: raw bytes in, what
//! the app and the client received out (as in http_conformance.rs, whose cases are not repeated
//! here). Each test asserts what crossed the proxy, never how long anything took.

use std::time::Duration;

use crate::support::http::ReservedPort;
use crate::support::process::Proxy;
use crate::support::raw::{
    self, Ending, RawApp, RawClient, Received, RecordingApp, Step, answer, find, ok, read_head,
};
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An app answering with `script`, and the proxy in front of it (JSON access log, plus `args`).
async fn start(
    script: impl Fn(&Received) -> Vec<Step> + Send + Sync + 'static,
    args: &[&str],
) -> (RecordingApp, Proxy) {
    let app = RecordingApp::start(script).await;
    let proxy = Proxy::builder(app.addr)
        .args(["--access-log", "json"])
        .args(args.iter().copied())
        .start()
        .await;
    (app, proxy)
}

/// The app's usual answer: 200 with the request's target as the body.
fn echo_target(r: &Received) -> Vec<Step> {
    answer(ok(r.message.target()))
}

fn app_saw(app: &RecordingApp, target: &str) -> bool {
    app.requests().iter().any(|r| r.message.target() == target)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `bytes` one per write (Nagle off, a pause between), as a slow client trickles them.
async fn trickle(stream: &mut TcpStream, bytes: &[u8]) {
    stream.set_nodelay(true).expect("nodelay");
    for b in bytes {
        if stream.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Everything that arrives on `stream` until it ends, and how it ended.
async fn read_until_end(stream: &mut TcpStream) -> (Vec<u8>, Ending) {
    let (got, ending) = raw::read_until_end(stream, WAIT).await;
    let ending =
        ending.unwrap_or_else(|| panic!("timed out after {WAIT:?}: the connection to end"));
    (got, ending)
}

// ---------------------------------------------------------------------------------------------
// --max-header-bytes is the limit, however the head arrives

/// The head buffer grows by doubling: a head over --max-header-bytes that one read brought in
/// whole was forwarded (here 9000 is the limit: the reads end at 4096, then 8192, still partial
/// and under it, then the buffer has room for 16 KiB and takes the 12 KB head at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_gets_431_even_when_one_read_brings_it_whole() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--max-header-bytes", "9000"]).await;
        let head = |path: &str, n: usize| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "b".repeat(n)
            )
        };
        let mut client = RawClient::connect(proxy.inbound).await;
        let under = client.exchange(head("/under", 8000).as_bytes()).await;
        assert_eq!(under.status(), 200, "{}", under.head);

        let mut client = RawClient::connect(proxy.inbound).await;
        let over = client.exchange(head("/over", 12_000).as_bytes()).await;
        app.settled().await;
        assert_eq!(
            over.status(),
            431,
            "a 12 KB head under a 9000-byte limit: {}",
            over.head
        );
        assert!(!app_saw(&app, "/over"), "the app got the oversized head");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A head is parsed as it would be whole, however it trickles in (each one is no longer parsed
// again at every byte: guards for that change)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_heads_get_the_answers_whole_ones_get() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--max-header-bytes", "8192"]).await;
        let cases: [(&[u8], u16); 4] = [
            (b"GET /trickled HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n\r\n", 200),
            (b"\r\n\r\n\nGET /after-empty HTTP/1.1\nHost: t\n\n", 200),
            (
                b"GET /bad HTTP/1.1\r\nHost: t\r\nBad Field: x\r\nX-A: 1\r\n\r\n",
                400,
            ),
            (b"GET /bad-end HTTP/1.1\r\nHost: t\r\n\rX\r\n\r\n", 400),
        ];
        for (request, status) in cases {
            let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            trickle(&mut stream, request).await;
            let got = response_head(&mut stream).await;
            let expected = format!("HTTP/1.1 {status} ");
            assert!(
                got.starts_with(expected.as_bytes()),
                "{:?} trickled got {:?}",
                lossy(request),
                lossy(&got)
            );
        }
        assert!(app_saw(&app, "/trickled") && app_saw(&app, "/after-empty"));
        assert!(!app_saw(&app, "/bad") && !app_saw(&app, "/bad-end"));

        // Empty lines before a request are skipped, and count against the limit. (After a first
        // request: on a new connection, a KiB of them is not HTTP to detection.)
        let mut client = RawClient::connect(proxy.inbound).await;
        let first = client
            .exchange(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        assert_eq!(first.status(), 200, "{}", first.head);
        let mut many = "\r\n".repeat(2000).into_bytes();
        many.extend_from_slice(b"GET /after-many HTTP/1.1\r\nHost: t\r\n\r\n");
        let served = client.exchange(&many).await;
        assert_eq!(served.status(), 200, "{}", served.head);
        let flood = client.exchange("\r\n".repeat(10_000).as_bytes()).await;
        assert_eq!(flood.status(), 431, "{}", flood.head);
    })
    .await;
}

/// Reads a response head from a raw stream (up to its blank line), or what came before the end.
async fn response_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    bounded("a response head", WAIT, async {
        let mut chunk = [0u8; 4096];
        while find(&out, b"\r\n\r\n").is_none() {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    out
}

// ---------------------------------------------------------------------------------------------
// A request's trailer section cannot carry what its header section may not

/// The fields the proxy owns (`X-Forwarded-Client-Cert`, `X-Forwarded-For`...) are replaced in
/// the header section, and the framing fields decided there; the trailer section of a chunked
/// request was forwarded byte for byte, so a client could hand the app a forged client
/// certificate or a second `Content-Length` there (hyper's path drops such trailers). Other
/// trailers still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_fields_in_a_requests_trailers_are_refused() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let chunked = |path: &str, trailer: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{trailer}\r\n\r\n"
            )
        };
        let forbidden = [
            "X-Forwarded-Client-Cert: By=spiffe://x;URI=spiffe://cluster.local/ns/prod/sa/admin",
            "x-forwarded-for: 10.0.0.1",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            "Host: elsewhere",
        ];
        for (n, trailer) in forbidden.iter().enumerate() {
            let mut client = RawClient::connect(proxy.inbound).await;
            let path = format!("/forbidden/{n}");
            let response = client.exchange(chunked(&path, trailer).as_bytes()).await;
            app.settled().await;
            assert_eq!(response.status(), 400, "{trailer:?}: {}", response.head);
            assert!(!app_saw(&app, &path), "{trailer:?} reached the app");
        }
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client
            .exchange(chunked("/allowed", "X-Checksum: abc").as_bytes())
            .await;
        assert_eq!(response.status(), 200, "{}", response.head);
        let requests = app.requests();
        let allowed = requests.iter().find(|r| r.message.target() == "/allowed");
        let allowed = allowed.unwrap_or_else(|| panic!("no /allowed at the app: {requests:?}"));
        assert!(
            find(&allowed.message.raw, b"\r\nX-Checksum: abc\r\n").is_some(),
            "{}",
            lossy(&allowed.message.raw)
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The proxy's own answers keep the client's connection in step

/// The proxy's refusal of a HEAD request (here 502: the app is down) kept the client's
/// connection open and carried its one-line body: the client, which reads no body after HEAD
/// (RFC 9112 6.3), took those bytes for the start of its next response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_answer_to_head_has_no_body() {
    bounded("test", TEST_TIMEOUT, async {
        let down = ReservedPort::new();
        let proxy = Proxy::start(down.addr, &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client.send(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let head = client.head_response().await.expect("an answer to HEAD");
        assert_eq!(head.status(), 502, "{}", head.head);
        let next = client.exchange(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(
            next.start.starts_with("HTTP/1.1 502 "),
            "the next response began with {:?}",
            lossy(&next.raw)
        );
    })
    .await;
}

/// Draining, a response in progress says `Connection: close` (docs/http.md): a forwarded one
/// did, the proxy's own (here a 504: the app never answers) did not, so the client could send
/// its next request on a connection about to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_answer_while_draining_says_close() {
    bounded("test", TEST_TIMEOUT, async {
        let flags = [
            "--response-timeout",
            "2s",
            "--drain-delay",
            "0s",
            "--drain-timeout",
            "20s",
        ];
        let (app, proxy) = start(|_| vec![Step::Hang], &flags).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await;
        eventually("the app to get the request", WAIT, || async {
            (!app.requests().is_empty()).then_some(())
        })
        .await;
        let shutdown = proxy.admin_post("/shutdown").await;
        assert!(shutdown.status.is_success(), "{}", shutdown.text());
        let response = client.response().await.expect("the 504");
        assert_eq!(response.status(), 504, "{}", response.head);
        assert_eq!(
            response.header("connection"),
            Some("close"),
            "{}",
            response.head
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A response the app cuts never looks complete to the client

/// The app answers `/close` (no framing: the body runs to the close), `/length` and `/chunked`
/// with a head and part of a body, then resets its connection. The client must be able to tell:
/// a clean close after a close-delimited body is how a complete response ends, so the proxy
/// must end that connection with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_app_cuts_ends_in_a_reset() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            let head = lossy(&head);
            let response: &[u8] = if head.starts_with("GET /close ") {
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial"
            } else if head.starts_with("GET /length ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
            } else {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n"
            };
            let _ = stream.write_all(response).await;
            // Long enough for the proxy to have forwarded the head (not a bound on anything).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--access-log", "json"]).await;
        let mut failures = Vec::new();
        for path in ["/close", "/length", "/chunked"] {
            let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let (got, ending) = read_until_end(&mut stream).await;
            let text = lossy(&got);
            if !text.starts_with("HTTP/1.1 200 ") || !text.contains("partial") {
                failures.push(format!("{path}: not the head and the part sent: {text:?}"));
            }
            if ending != Ending::Reset {
                failures.push(format!(
                    "{path}: the cut response ended {ending:?}, as a complete one would: {text:?}"
                ));
            }
        }
        proxy
            .wait_record(|r| {
                r["error"] == "upstream_body"
                    && r["original_url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("/close"))
            })
            .await;
        assert!(failures.is_empty(), "{failures:#?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The app's interim and slow answers (held: guards)

/// Interim responses (100, 103) before the final one leave the app connection in step: the
/// client gets the final response, and the next request its own answer on the same connection.
/// A 101 nobody asked for is the app breaking HTTP: 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_keep_the_app_connection_in_step() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(
            |r| match r.message.target() {
                "/interim" => {
                    let mut bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n".to_vec();
                    bytes.extend_from_slice(&ok("/interim"));
                    answer(bytes)
                }
                "/switch" => answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"),
                _ => echo_target(r),
            },
            &[],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let first = client
            .exchange(b"GET /interim HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        assert_eq!(first.status(), 200, "{}", lossy(&first.raw));
        assert_eq!(first.body_text(), "/interim");
        let second = client.exchange(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(second.status(), 200, "{}", lossy(&second.raw));
        assert_eq!(second.body_text(), "/next");
        let mut client = RawClient::connect(proxy.inbound).await;
        let switched = client
            .exchange(b"GET /switch HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        assert_eq!(switched.status(), 502, "{}", lossy(&switched.raw));
        let requests = app.requests();
        assert_eq!(requests.len(), 3, "{requests:?}");
    })
    .await;
}

/// An app that answers a byte at a time gets --response-timeout for its whole head, not per byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_trickling_its_head_gets_504() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RawApp::start(|mut stream, _| async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            // 60 bytes, one every 200 ms: 12 s of head if nobody stops it.
            let head = format!("HTTP/1.1 200 OK\r\nX-Slow: {}", "s".repeat(35));
            for b in head.bytes() {
                if stream.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        let proxy = Proxy::start(app.addr, &["--response-timeout", "1s"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client
            .exchange(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        assert_eq!(response.status(), 504, "{}", lossy(&response.raw));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What a lenient app reads as a request is HTTP here, never an opaque tunnel

/// A request line split on tabs, other whitespace or Python's extra separators, or padded before
/// its method, is what lenient servers (Python's http.server and wsgiref, Tomcat) read as a
/// request. Detected as opaque, the whole connection went to the app raw: past the routes, with
/// the client's own `X-Forwarded-Client-Cert`, and every request after it too. Each is now HTTP
/// and gets 400 from the strict parser, on a port no --http-ports or policy makes HTTP-only; and
/// the app receives not a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_a_lenient_app_would_read_are_http_never_a_tunnel() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let mut padded = vec![b' '; 2000];
        padded.extend_from_slice(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n");
        for line in [
            &b"GET\t/admin HTTP/1.1\r\n"[..],
            b"GET\t/admin\tHTTP/1.1\r\n",
            b" GET /admin HTTP/1.1\r\n",
            b"GET  /admin HTTP/1.1\r\n",
            b"GET\xa0/admin\xa0HTTP/1.1\r\n",
            b"GET\x1c/admin\r\n",
            &padded,
        ] {
            let mut request = line.to_vec();
            if !line.ends_with(b"\r\n\r\n") {
                request.extend_from_slice(b"Host: a\r\nX-Forwarded-Client-Cert: By=forged\r\n\r\n");
            }
            request.extend_from_slice(b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut client = RawClient::connect(proxy.inbound).await;
            client.send(&request).await;
            let response = client.response().await.expect("an answer");
            assert_eq!(response.status(), 400, "{}", line.escape_ascii());
        }
        app.settled().await;
        assert_eq!(app.connections(), 0, "{}", lossy(&app.all_bytes()));
    })
    .await;
}

/// CGI, WSGI and Rack read `X_Forwarded_Client_Cert` as `X-Forwarded-Client-Cert`: a client's
/// field spelled with `_` reached the app as the one the proxy owns, past the rule that replaces
/// it. Such spellings of the proxy's fields and the framing are dropped, on the fast path
/// (HTTP/1.1) and hyper's (HTTP/1.0); other names with `_` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_spellings_of_the_proxys_fields_never_reach_the_app() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        for version in ["HTTP/1.1", "HTTP/1.0"] {
            let path = format!("/underscores/{version}");
            let request = format!(
                "GET {path} {version}\r\nHost: a\r\nX_Forwarded_Client_Cert: By=spiffe://x;URI=spiffe://cluster.local/ns/prod/sa/admin\r\n\
                 x_forwarded_for: 6.6.6.6\r\nX-Forwarded_Proto: https\r\nX_REQUEST_ID: chosen\r\nContent_Length: 7\r\nX_Custom: kept\r\n\r\n"
            );
            let mut client = RawClient::connect(proxy.inbound).await;
            let response = client.exchange(request.as_bytes()).await;
            assert_eq!(response.status(), 200, "{version}: {}", response.head);
            app.settled().await;
            let requests = app.requests();
            let seen = requests.iter().find(|r| r.message.target() == path);
            let seen = seen.unwrap_or_else(|| panic!("{version}: not at the app: {requests:?}"));
            let raw = lossy(&seen.message.raw).to_ascii_lowercase();
            for alias in ["x_forwarded", "x_request_id", "content_length", "6.6.6.6", "chosen"] {
                assert!(!raw.contains(alias), "{version}: {alias} reached the app: {raw}");
            }
            assert!(raw.contains("\r\nx_custom: kept\r\n"), "{version}: {raw}");
        }
    })
    .await;
}

/// Content on GET, HEAD or DELETE means nothing (RFC 9110 9.3.1), so many apps never read it, and
/// one that also ignores `Content-Length` reads the content as its next request: smuggled past
/// every phase, and answered to whichever client's request the pooled app connection carries
/// next ("CL.0"). Such a request goes to the app with `Connection: close`, and its app connection
/// carries nothing after it; a GET without content keeps the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_on_a_get_closes_the_app_connection_after_it() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let hidden = "GET /admin HTTP/1.1\r\nHost: a\r\nX: ";
        let requests = [
            "GET /plain HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
            format!("GET /with-content HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{hidden}", hidden.len()),
            "delete /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_owned(),
            "GET /chunked-get HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n".to_owned(),
            "GET /after HTTP/1.1\r\nHost: a\r\n\r\n".to_owned(),
        ];
        for request in &requests {
            let mut client = RawClient::connect(proxy.inbound).await;
            let response = client.exchange(request.as_bytes()).await;
            assert!(response.status() < 500, "{request:?}: {}", response.head);
            app.settled().await;
        }
        let seen = app.requests();
        let closes = |target: &str| {
            let r = seen.iter().find(|r| r.message.target() == target);
            let r = r.unwrap_or_else(|| panic!("no {target} at the app: {seen:?}"));
            r.message.header("connection") == Some("close")
        };
        assert!(!closes("/plain") && !closes("/after"));
        assert!(closes("/with-content") && closes("/chunked") && closes("/chunked-get"));
        assert!(seen.iter().all(|r| r.message.target() != "/admin"), "{seen:?}");
        // Nothing of the content is lost on the way.
        let body = |target: &str| {
            let r = seen.iter().find(|r| r.message.target() == target);
            r.map(|r| r.message.body_text()).unwrap_or_default()
        };
        assert_eq!(body("/with-content"), hidden);
        assert_eq!(body("/chunked"), "abc");
        assert_eq!(body("/chunked-get"), "xyz");
        // /plain's connection carried /with-content (then closed); /chunked, /chunked-get and
        // /after each had a new one.
        assert_eq!(app.connections(), 4);
    })
    .await;
}

/// An HTTP/1.0 request's `Upgrade` is ignored (RFC 9110 7.8): it went to the app as an HTTP/1.1
/// upgrade, and the HTTP/1.0 client was sent a 101, which no 1.0 client may be sent (15.2). The
/// app now gets a plain request, without `Upgrade`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_requests_upgrade_is_ignored() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client
            .exchange(b"GET /ws HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            .await;
        assert_eq!(response.status(), 200, "{}", response.head);
        app.settled().await;
        let seen = app.requests();
        let ws = seen.iter().find(|r| r.message.target() == "/ws");
        let ws = ws.unwrap_or_else(|| panic!("no /ws at the app: {seen:?}"));
        assert_eq!(ws.message.header("upgrade"), None, "{}", lossy(&ws.message.raw));
    })
    .await;
}

/// A plain CONNECT was forwarded with its target turned into the app's own address, and the app's
/// 2xx opened no tunnel: the client saw a 200, then the end of the connection. It is refused, 501,
/// and reaches no app (a forward proxy behind the sidecar is reached on an opaque port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_connect_is_refused_501() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client
            .exchange(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .await;
        assert_eq!(response.status(), 501, "{}", response.head);
        app.settled().await;
        assert_eq!(app.connections(), 0, "{}", lossy(&app.all_bytes()));
        let record = proxy.wait_record(|r| r["method"] == "CONNECT").await;
        assert_eq!(record["error"], "connect_unsupported", "{record}");
    })
    .await;
}

/// Client-first binary protocols (AMQP's header here) are opaque at once: with detection made
/// lenient towards HTTP they waited for the detection timeout and got a 400 (found by review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_first_binary_protocol_is_carried_opaque() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--detect-timeout", "1h"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client.send(b"AMQP\x00\x00\x09\x01").await;
        eventually("the bytes at the app", WAIT, || async {
            (app.all_bytes() == b"AMQP\x00\x00\x09\x01")
                .then_some(())
                .ok_or_else(|| lossy(&app.all_bytes()))
        })
        .await;
    })
    .await;
}
