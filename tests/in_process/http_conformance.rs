//! HTTP/1.1 conformance of the data plane, byte for byte (issue 9): raw requests from a raw client,
//! the real proxy, and a recording app that keeps every byte it received and answers with scripted
//! bytes. Each test is one defect of the list (or one bounded wait), written from the issue
//! and RFC 9110/9112 rather than from what the proxy does today; it asserts what the app received
//! and what the client got, never how long anything took.
//!
//! The smuggling probes put a complete request (`GET /smuggled`) where only body bytes belong: the
//! app parses leniently, as nginx or Werkzeug would, so whatever the proxy lets through as a
//! request shows up in its record.

use std::time::Duration;

use crate::support::http::ReservedPort;
use crate::support::metrics::metric;
use crate::support::process::Proxy;
use crate::support::raw::{
    End, Message, RawClient, Received, RecordingApp, Step, answer, find, ok,
};
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A complete request, used as the payload of every smuggling attempt.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
/// A complete response the app slips in after its real one (and in [`EXTRA_BYTES`]).
const INJECTED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected";

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

/// Sends `request` through a proxy (with `args`) to an app echoing targets: the client must get a
/// 200 and the app exactly one request. Returns the proxy, the client's response and the request
/// as the app received it.
async fn forwarded_once(args: &[&str], request: &[u8]) -> (Proxy, Message, Message) {
    let (app, proxy) = start(echo_target, args).await;
    let mut client = RawClient::connect(proxy.inbound).await;
    let response = client.exchange(request).await;
    assert_eq!(response.status(), 200, "{}", lossy(&response.raw));
    let mut requests = app.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    (proxy, response, requests.remove(0).message)
}

/// The app's usual answer: 200 with the request's target as the body.
fn echo_target(r: &Received) -> Vec<Step> {
    answer(ok(r.message.target()))
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").into_bytes()
}

/// Whether any request the app parsed, on any connection, has `target`.
fn app_saw(app: &RecordingApp, target: &str) -> bool {
    app.requests().iter().any(|r| r.message.target() == target)
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends each of `requests` on a new connection to a new proxy: each must get 400, and the app
/// must receive nothing at all (not a byte: a malformed request is refused before it is
/// forwarded, and never tunnelled).
async fn all_refused<R: AsRef<[u8]>>(requests: &[R]) {
    let (app, proxy) = start(echo_target, &[]).await;
    for request in requests {
        let request = request.as_ref();
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client.exchange(request).await;
        assert_eq!(
            response.status(),
            400,
            "{:?} got {}",
            lossy(request),
            response.head
        );
        app.settled().await;
        assert!(
            app.all_bytes().is_empty(),
            "{:?} reached the app as {:?}",
            lossy(request),
            lossy(&app.all_bytes())
        );
    }
}

/// The client's second request on the same connection gets its own answer.
async fn next_request_gets_its_own_response(client: &mut RawClient) {
    let second = client.exchange(&get("/second")).await;
    assert_eq!(second.status(), 200, "{}", second.head);
    assert_eq!(second.body_text(), "/second");
}

// ---------------------------------------------------------------------------------------------
// 1. A connection option never removes framing or Host

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_content_length_keeps_the_body_as_a_body() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let request = format!(
            "POST /a HTTP/1.1\r\nHost: t\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
            SMUGGLED.len()
        );
        let first = client.exchange(request.as_bytes()).await;
        assert_eq!(first.status(), 200, "{}", first.head);
        assert_eq!(first.body_text(), "/a");
        next_request_gets_its_own_response(&mut client).await;
        let requests = app.requests();
        let post = requests.iter().find(|r| r.message.target() == "/a");
        let post = post.unwrap_or_else(|| panic!("no POST /a at the app: {requests:?}"));
        assert_eq!(post.message.body_text(), SMUGGLED, "the body, intact");
        assert!(!app_saw(&app, "/smuggled"), "{requests:?}");
        assert_eq!(requests.len(), 2, "POST /a and GET /second: {requests:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_transfer_encoding_keeps_the_chunked_body() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let request = format!(
            "POST /a HTTP/1.1\r\nHost: t\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
            SMUGGLED.len()
        );
        let first = client.exchange(request.as_bytes()).await;
        assert_eq!(first.status(), 200, "{}", first.head);
        next_request_gets_its_own_response(&mut client).await;
        let requests = app.requests();
        let post = requests.iter().find(|r| r.message.target() == "/a");
        let post = post.unwrap_or_else(|| panic!("no POST /a at the app: {requests:?}"));
        assert_eq!(post.message.body_text(), SMUGGLED, "the body, intact");
        assert!(!app_saw(&app, "/smuggled"), "{requests:?}");
        assert_eq!(requests.len(), 2, "POST /a and GET /second: {requests:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_host_keeps_the_host() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"GET /a HTTP/1.1\r\nHost: example.test\r\nConnection: host\r\n\r\n";
        let (_, _, at_app) = forwarded_once(&[], request).await;
        assert_eq!(at_app.headers("host"), ["example.test"], "{}", at_app.head);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Chunked framing is strict, both ways

/// Chunked bodies that each break RFC 9112 §7.1 at one point, with what follows that point.
const BAD_CHUNKED: &[(&str, &str)] = &[
    ("last chunk line ends in a bare LF", "5\r\nhello\r\n0\r\n\n"),
    (
        "chunk extension ends in a bare LF",
        "5\r\nhello\r\n0;\n\r\n",
    ),
    (
        "trailer line ends in a bare LF",
        "5\r\nhello\r\n0\r\nX-Trailer: 1\n\r\n",
    ),
    ("junk after the chunk size", "5 junk\r\nhello\r\n0\r\n\r\n"),
    ("NUL in a chunk extension", "5;a=\0\r\nhello\r\n0\r\n\r\n"),
    (
        "chunk extension without a name",
        "5;=x\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "chunk extension with a space in its value",
        "5;a=b c\r\nhello\r\n0\r\n\r\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_chunked_request_gets_400_and_nothing_after_it_reaches_the_app() {
    bounded("test", TEST_TIMEOUT, async {
        // The app takes its time answering a POST: a proxy that forwarded the body would let it
        // parse the smuggled request first.
        let (app, proxy) = start(|r| {
            if r.message.method() == "POST" {
                vec![Step::Sleep(Duration::from_millis(500)), Step::Write(ok("post"))]
            } else {
                echo_target(r)
            }
        }, &[]).await;
        let mut failures = Vec::new();
        for (what, body) in BAD_CHUNKED {
            let before = app.all_bytes().len();
            let mut client = RawClient::connect(proxy.inbound).await;
            let request = format!(
                "POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{body}{SMUGGLED}"
            );
            client.send(request.as_bytes()).await;
            let status = client.response().await.map(|r| r.status());
            app.settled().await;
            let after = app.all_bytes()[before..].to_vec();
            if status != Some(400) || find(&after, b"/smuggled").is_some() {
                failures.push(format!(
                    "{what}: client got {status:?}, app received {:?}",
                    lossy(&after)
                ));
            }
        }
        assert!(!app_saw(&app, "/smuggled"), "{:?}", app.requests());
        assert!(failures.is_empty(), "{failures:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenient_chunked_response_is_cut_and_its_connection_not_reused() {
    bounded("test", TEST_TIMEOUT, async {
        // Request /bad/N gets bad body N followed by an injected response; anything else is echoed.
        let (app, proxy) = start(|r| {
            let target = r.message.target().to_owned();
            match target.strip_prefix("/bad/").and_then(|n| n.parse::<usize>().ok()) {
                Some(n) => {
                    let mut bytes =
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    bytes.extend_from_slice(BAD_CHUNKED[n].1.as_bytes());
                    bytes.extend_from_slice(INJECTED);
                    answer(bytes)
                }
                None => answer(ok(&target)),
            }
        }, &[])
        .await;
        let mut failures = Vec::new();
        for (n, (what, _)) in BAD_CHUNKED.iter().enumerate() {
            let mut client = RawClient::connect(proxy.inbound).await;
            client.send(&get(&format!("/bad/{n}"))).await;
            let (bytes, end) = client.rest(WAIT).await;
            // Cut: either a 502 before anything was sent, or a body without its last chunk.
            let complete = find(&bytes, b"\r\n0\r\n\r\n").is_some();
            let bad_gateway = bytes.starts_with(b"HTTP/1.1 502");
            if end != End::Closed || (complete && !bad_gateway) || find(&bytes, b"injected").is_some()
            {
                failures.push(format!("{what}: {end:?} after {:?}", lossy(&bytes)));
            }
            // The next request must not go out on the connection that carried the bad body.
            let bad_connection = connection_of(&app, &format!("/bad/{n}"));
            let mut next = RawClient::connect(proxy.inbound).await;
            let check = next.exchange(&get(&format!("/after/{n}"))).await;
            let after = connection_of(&app, &format!("/after/{n}"));
            if check.body_text() != format!("/after/{n}") || after == bad_connection {
                failures.push(format!(
                    "{what}: the next request got {:?} on app connection {after:?} (bad one {bad_connection:?})",
                    check.body_text()
                ));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_response_head_gets_502() {
    bounded("test", TEST_TIMEOUT, async {
        let heads: &[&[u8]] = &[
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nthis line is not a field\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
        ];
        let (_app, proxy) = start(
            |r| {
                let n: usize = r.message.target()[1..].parse().unwrap_or(0);
                vec![Step::Write(heads[n].to_vec()), Step::Close]
            },
            &[],
        )
        .await;
        for (n, head) in heads.iter().enumerate() {
            let mut client = RawClient::connect(proxy.inbound).await;
            let response = client.exchange(&get(&format!("/{n}"))).await;
            assert_eq!(
                response.status(),
                502,
                "{:?} gave {}",
                lossy(head),
                response.head
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. What begins like HTTP is HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_after_an_empty_line_is_http() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"\r\nGET /after-crlf HTTP/1.1\r\nHost: t\r\nX-Request-Id: crlf-1\r\n\r\n";
        let (proxy, _, at_app) = forwarded_once(&[], request).await;
        assert!(
            at_app.header("x-forwarded-for").is_some(),
            "handled as HTTP: {}",
            at_app.head
        );
        let record = proxy.json_record("crlf-1").await;
        assert_eq!(record["status"], 200, "{record}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_lines_get_400_not_a_tunnel() {
    bounded("test", TEST_TIMEOUT, async {
        all_refused(&["G<T /a HTTP/1.1\r\nHost: t\r\n\r\n"]).await;
    })
    .await;
}

/// Any token is a method (RFC 9110 9.1), whatever its case or length: such requests are HTTP,
/// forwarded with the forwarding fields, never tunnelled as opaque bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_methods_are_http_not_a_tunnel() {
    bounded("test", TEST_TIMEOUT, async {
        for request in [
            "get /a HTTP/1.1\r\nHost: t\r\n\r\n",
            "ABCDEFGHIJKLMNOPQ /a HTTP/1.1\r\nHost: t\r\n\r\n",
        ] {
            let (_, _, at_app) = forwarded_once(&[], request.as_bytes()).await;
            assert_eq!(at_app.target(), "/a");
            assert!(
                at_app.header("x-forwarded-for").is_some(),
                "{}",
                at_app.head
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_request_on_an_http_port_is_http() {
    bounded("test", TEST_TIMEOUT, async {
        let app = RecordingApp::start(echo_target).await;
        // Without interception the port the client dialled is the listener's own: known before
        // the proxy starts, and held for it.
        let inbound = ReservedPort::new();
        let port = inbound.port().to_string();
        let proxy = Proxy::builder(app.addr)
            .inbound(&inbound.addr.to_string())
            .args(["--detect-timeout", "1s", "--http-ports", &port])
            .start()
            .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let response = client.exchange(&get("/late")).await;
        assert_eq!(response.status(), 200, "{}", response.head);
        let requests = app.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        let at_app = &requests[0].message;
        assert!(
            at_app.header("x-forwarded-for").is_some(),
            "{}",
            at_app.head
        );
        assert!(at_app.header("x-request-id").is_some(), "{}", at_app.head);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. The app's extra bytes never reach the next request

/// Answers to `/first` (by method) that carry bytes beyond the response.
const EXTRA_BYTES: &[(&str, &str, &[u8])] = &[
    (
        "bytes after a 304",
        "GET",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected",
    ),
    (
        "a body in the answer to HEAD",
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 45\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected",
    ),
    (
        "surplus after Content-Length",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n/firstinjected surplus bytes\r\n\r\n",
    ),
    (
        "an unsolicited second response",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n/firstHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected",
    ),
];

/// The app connection that carried the request for `target`.
fn connection_of(app: &RecordingApp, target: &str) -> Option<usize> {
    app.requests()
        .iter()
        .find(|r| r.message.target() == target)
        .map(|r| r.connection)
}

/// `/first` gets `first` (the genuine answer followed by extra bytes); every other request is
/// echoed. The client's second request on the same connection must get its own answer, from
/// another app connection, and the injected bytes must never reach the client.
async fn extra_bytes_are_dropped(method: &str, first: &'static [u8]) -> Result<(), String> {
    let (app, proxy) = start(
        move |r| {
            if r.message.target() == "/first" {
                answer(first)
            } else {
                echo_target(r)
            }
        },
        &[],
    )
    .await;
    let mut client = RawClient::connect(proxy.inbound).await;
    client
        .send(format!("{method} /first HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await;
    let response = if method == "HEAD" {
        client.head_response().await
    } else {
        client.response().await
    };
    let response = response.ok_or("no response to the first request")?;
    if find(&response.raw, b"injected").is_some() {
        return Err(format!("first response: {}", lossy(&response.raw)));
    }
    client.send(&get("/second")).await;
    let second = client
        .response()
        .await
        .ok_or("no response to the second request")?;
    if second.status() != 200 || second.body_text() != "/second" {
        return Err(format!("second response: {}", lossy(&second.raw)));
    }
    if connection_of(&app, "/first") == connection_of(&app, "/second") {
        return Err("the app connection that carried extra bytes was reused".into());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_bytes_from_the_app_never_reach_the_next_request() {
    bounded("test", TEST_TIMEOUT, async {
        let mut failures = Vec::new();
        for (what, method, first) in EXTRA_BYTES {
            if let Err(why) = extra_bytes_are_dropped(method, first).await {
                failures.push(format!("{what}: {why}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_with_content_length_and_chunked_loses_content_length() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(|_| answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                ), &[]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client.exchange(&get("/both")).await;
        assert_eq!(response.status(), 200, "{}", response.head);
        assert_eq!(response.header("content-length"), None, "{}", response.head);
        assert_eq!(response.body_text(), "hello");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_content_length_with_a_sign_gets_502() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(
            |_| answer(b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
            &[],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client.exchange(&get("/signed")).await;
        assert_eq!(response.status(), 502, "{}", lossy(&response.raw));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_connection_content_length_keeps_its_framing() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(
            |r| {
                answer(format!(
                    "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: {}\r\n\r\n{}",
                    r.message.target().len(),
                    r.message.target()
                ))
            },
            &[],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        // Without its framing the response would run to the close: the client reads the whole
        // response by whatever framing it has, then looks at the head.
        let response = client.exchange(&get("/first")).await;
        let head = response.head.to_ascii_lowercase();
        assert!(
            head.contains("content-length: 6") || head.contains("transfer-encoding: chunked"),
            "the response lost its framing: {:?}",
            lossy(&response.raw)
        );
        assert_eq!(response.body_text(), "/first");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. A POST is never sent twice

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_the_app_dropped_is_not_sent_again() {
    bounded("test", TEST_TIMEOUT, async {
        // The app answers the warm-up GET (its connection goes to the pool), and reads any POST
        // whole and closes without answering, on whatever connection it comes.
        let (app, proxy) = start(
            |r| match r.message.method() {
                "POST" => vec![Step::Close],
                _ => echo_target(r),
            },
            &[],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let warm = client.exchange(&get("/warm")).await;
        assert_eq!(warm.status(), 200, "{}", warm.head);
        let response = client
            .exchange(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\namount")
            .await;
        assert_eq!(response.status(), 502, "{}", lossy(&response.raw));
        // A second attempt would have been written before the 502.
        app.settled().await;
        let posts: Vec<Received> = app
            .requests()
            .into_iter()
            .filter(|r| r.message.method() == "POST")
            .collect();
        assert_eq!(
            posts.len(),
            1,
            "the POST reached the app {} times",
            posts.len()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_get_survives_the_keep_alive_race() {
    bounded("test", TEST_TIMEOUT, async {
        // Every connection answers once and closes, without saying so.
        let (_app, proxy) = start(
            |r| {
                let mut steps = echo_target(r);
                steps.push(Step::Close);
                steps
            },
            &[],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        for i in 0..30 {
            let response = client.exchange(&get(&format!("/race/{i}"))).await;
            assert_eq!(
                response.status(),
                200,
                "request {i}: {}",
                lossy(&response.raw)
            );
            assert_eq!(response.body_text(), format!("/race/{i}"));
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Content-Length is 1*DIGIT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_that_is_not_digits_gets_400() {
    bounded("test", TEST_TIMEOUT, async {
        let values: [&[u8]; 7] = [
            b"+5",
            b"5\xa0",
            b"\xc2\xa05",
            b"5\x85",
            b"0x5",
            b"5 5",
            b"-5",
        ];
        let requests: Vec<Vec<u8>> = values
            .iter()
            .map(|value| {
                let mut request = b"POST /cl HTTP/1.1\r\nHost: t\r\nContent-Length: ".to_vec();
                request.extend_from_slice(value);
                request.extend_from_slice(b"\r\n\r\nhello");
                request
            })
            .collect();
        all_refused(&requests).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_spaces_and_tabs_around_it_is_accepted() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"POST /cl HTTP/1.1\r\nHost: t\r\nContent-Length: \t5 \t\r\n\r\nhello";
        let (_, _, at_app) = forwarded_once(&[], request).await;
        assert_eq!(at_app.body_text(), "hello");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Host

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_repeated_or_invalid_host_gets_400() {
    bounded("test", TEST_TIMEOUT, async {
        all_refused(&[
            "GET /h HTTP/1.1\r\n\r\n",
            "GET /h HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET /h HTTP/1.1\r\nHost: a b\r\n\r\n",
        ])
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_is_sent_in_origin_form_with_the_targets_host() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"GET http://example.test/p?q HTTP/1.1\r\nHost: other\r\n\r\n";
        let (_, _, at_app) = forwarded_once(&[], request).await;
        assert_eq!(at_app.start, "GET /p?q HTTP/1.1", "{}", at_app.head);
        assert_eq!(at_app.headers("host"), ["example.test"], "{}", at_app.head);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Codings are never dropped

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_reach_the_app_whole() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"POST /coded HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n7\r\ngzipped\r\n0\r\n\r\n";
        let (_, _, at_app) = forwarded_once(&[], request).await;
        let codings = at_app.headers("transfer-encoding").join(", ");
        assert_eq!(codings.to_ascii_lowercase(), "gzip, chunked", "{}", at_app.head);
        assert_eq!(at_app.body_text(), "gzipped");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Interoperability

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_fields_are_limited_by_bytes_not_by_count() {
    bounded("test", TEST_TIMEOUT, async {
        let fields: String = (0..150).map(|i| format!("X-F{i}: {i}\r\n")).collect();
        let request = format!("GET /many HTTP/1.1\r\nHost: t\r\n{fields}\r\n");
        let limit = ["--max-header-bytes", "8192"];
        let (proxy, _, at_app) = forwarded_once(&limit, request.as_bytes()).await;
        let forwarded = at_app
            .fields
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix("X-F")
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .count();
        assert_eq!(forwarded, 150);

        let big = format!(
            "GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "b".repeat(9000)
        );
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client.exchange(big.as_bytes()).await;
        assert_eq!(response.status(), 431, "{}", response.head);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_2_is_served_as_http_1_1() {
    bounded("test", TEST_TIMEOUT, async {
        let request = b"GET /v12 HTTP/1.2\r\nHost: t\r\n\r\n";
        let (_, response, at_app) = forwarded_once(&[], request).await;
        assert!(response.start.starts_with("HTTP/1.1 "), "{}", response.head);
        assert_eq!(at_app.start, "GET /v12 HTTP/1.1");
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Every wait is bounded, each by its own flag

/// Writes `bytes` one at a time, `every` apart, until done or the proxy stops taking them.
fn trickle(mut client: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, every: Duration) {
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt as _;
        for b in bytes {
            if client.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// Reads until the proxy closes the connection, within `limit`; `None` if it is still open.
async fn until_closed(
    mut read: tokio::net::tcp::OwnedReadHalf,
    limit: Duration,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut out = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_head_gets_408_after_the_header_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--header-timeout", "1s"]).await;
        let stream = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        let (read, write) = stream.into_split();
        // 50 header bytes, one every 200 ms: 10 s of head if nobody stops it.
        let head = format!(
            "GET /slow HTTP/1.1\r\nHost: t\r\nX-Slow: {}",
            "s".repeat(20)
        );
        trickle(write, head.into_bytes(), Duration::from_millis(200));
        let got = until_closed(read, Duration::from_secs(10)).await;
        let got = got.expect("the proxy kept a trickling head open");
        assert!(got.starts_with(b"HTTP/1.1 408"), "{:?}", lossy(&got));
        assert!(app.all_bytes().is_empty(), "{:?}", lossy(&app.all_bytes()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_client_is_closed_after_the_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(echo_target, &["--idle-timeout", "500ms"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        assert_eq!(client.exchange(&get("/once")).await.status(), 200);
        let (rest, end) = client.rest(Duration::from_secs(10)).await;
        assert_eq!(end, End::Closed, "the idle client was kept");
        assert!(rest.is_empty(), "{:?}", lossy(&rest));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_gets_408_and_the_app_connection_closes() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--request-body-timeout", "500ms"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client
            .send(b"POST /stall HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
            .await;
        let (got, end) = client.rest(Duration::from_secs(10)).await;
        assert!(got.starts_with(b"HTTP/1.1 408"), "{:?}", lossy(&got));
        assert_eq!(end, End::Closed);
        eventually("the app's connection to be closed", WAIT, || async {
            (app.connections() == 0 || app.saw_eof(1)).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_timeout_counts_from_the_end_of_the_request_body() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--response-timeout", "2s"]).await;
        let stream = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        let (read, mut write) = stream.into_split();
        use tokio::io::AsyncWriteExt as _;
        write
            .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
            .await
            .expect("head");
        // A 4 s upload in 4 pieces: the app answers as soon as it has the last one.
        trickle(write, b"abcd".to_vec(), Duration::from_secs(1));
        let got = until_closed(read, Duration::from_secs(15)).await;
        let got = got.expect("no end to the response");
        assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", lossy(&got));
        assert_eq!(app.requests().len(), 1);
        assert_eq!(app.requests()[0].message.body_text(), "abcd");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_silent_after_the_body_gets_504() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(|_| vec![Step::Hang], &["--response-timeout", "500ms"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        let response = client
            .exchange(b"POST /silent HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        assert_eq!(response.status(), 504, "{}", response.head);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_response_body_is_cut_after_the_response_body_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(
            |_| {
                vec![
                    Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello".to_vec()),
                    Step::Hang,
                ]
            },
            &["--response-body-timeout", "500ms"],
        )
        .await;
        let mut client = RawClient::connect(proxy.inbound).await;
        client.send(&get("/stall")).await;
        let (got, end) = client.rest(Duration::from_secs(10)).await;
        assert_eq!(end, End::Closed, "the client was held: {:?}", lossy(&got));
        assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", lossy(&got));
        assert!(got.ends_with(b"hello"), "{:?}", lossy(&got));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_app_connection_is_closed_after_the_pool_idle_timeout() {
    bounded("test", TEST_TIMEOUT, async {
        let (app, proxy) = start(echo_target, &["--pool-idle-timeout", "500ms"]).await;
        let mut client = RawClient::connect(proxy.inbound).await;
        assert_eq!(client.exchange(&get("/pooled")).await.status(), 200);
        // The client stays connected: the pool, not the client's leaving, must close it.
        eventually(
            "the app to see its idle connection closed",
            WAIT,
            || async { app.saw_eof(1).then_some(()) },
        )
        .await;
        drop(client);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Proxy-made answers to gRPC are gRPC

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_request_to_a_down_app_gets_grpc_unavailable() {
    bounded("test", TEST_TIMEOUT, async {
        let down = ReservedPort::new();
        let proxy = Proxy::start(down.addr, &["--app-protocol", "http2"]).await;
        let tcp = tokio::net::TcpStream::connect(proxy.inbound)
            .await
            .expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let request = http::Request::post(format!("http://{}/pkg.Svc/Call", proxy.inbound))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            // One empty message: no compression, length 0.
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("request");
        let response = bounded("the response", WAIT, sender.send_request(request))
            .await
            .expect("a response");
        assert_eq!(response.status(), http::StatusCode::OK);
        let (parts, body) = response.into_parts();
        let collected = bounded("the body", WAIT, body.collect())
            .await
            .expect("the body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            parts
                .headers
                .get(name)
                .or_else(|| trailers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            field("grpc-status").as_deref(),
            Some("14"),
            "{parts:?} {trailers:?}"
        );
        assert!(
            field("grpc-message").is_some_and(|m| !m.is_empty()),
            "{parts:?} {trailers:?}"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Every exchange leaves one record and its metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_are_logged_and_counted() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(echo_target, &["--max-header-bytes", "8192"]).await;
        let big = format!(
            "GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "b".repeat(20_000)
        );
        let exchanges: [(&[u8], u16); 3] = [
            (b"GET /bad HTTP/1.1\r\nHost: t\r\nnot a field\r\n\r\n", 400),
            (big.as_bytes(), 431),
            (b"GET /good HTTP/1.1\r\nHost: t\r\n\r\n", 200),
        ];
        for (request, status) in exchanges {
            let mut client = RawClient::connect(proxy.inbound).await;
            let response = client.exchange(request).await;
            assert_eq!(response.status(), status, "{}", response.head);
        }
        // No record may follow: the connections are over, and one more exchange (whose record is
        // written after anything they left) closes the log.
        proxy.wait_no_open_connections().await;
        let barrier = proxy.get("/barrier").await;
        assert_eq!(barrier.status, 200);
        proxy
            .wait_record(|r| {
                r["original_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/barrier"))
            })
            .await;
        let log = proxy.stdout();
        let records: Vec<_> = proxy
            .json_records()
            .into_iter()
            .take_while(|r| {
                !r["original_url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("/barrier"))
            })
            .collect();
        let statuses: Vec<u64> = records
            .iter()
            .filter_map(|r| r["status"].as_u64())
            .collect();
        assert_eq!(records.len(), 3, "one record per exchange:\n{log}");
        for status in [400, 431, 200] {
            assert!(statuses.contains(&status), "{status} not logged:\n{log}");
        }
        let text = proxy.metrics().await;
        for status in ["400", "431"] {
            let counted = metric(
                &text,
                "amazing_proxy_requests_total",
                &[&format!("status=\"{status}\"")],
            );
            assert_eq!(counted, Some(1.0), "{status} not counted:\n{text}");
        }
    })
    .await;
}

/// A head hyper refuses itself (on a connection the fast path handed it: here after an HTTP/1.0
/// keep-alive request) is answered in the proxy's words, as the fast path answers it: `Server`,
/// the one-line body, `Connection: close`; not hyper's bare status line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_refuses_get_the_proxys_answer() {
    bounded("test", TEST_TIMEOUT, async {
        let (_app, proxy) = start(echo_target, &["--max-header-bytes", "8192"]).await;
        let big = format!(
            "GET /big HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
            "b".repeat(20_000)
        );
        let cases: [(&[u8], u16, &str); 2] = [
            (
                b"GET /bad HTTP/1.1\r\nHost: t\r\nnot a field\r\n\r\n",
                400,
                "malformed request",
            ),
            (big.as_bytes(), 431, "request headers too large"),
        ];
        for (request, status, words) in cases {
            let mut client = RawClient::connect(proxy.inbound).await;
            let first = client
                .exchange(b"GET /first HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n")
                .await;
            assert_eq!(first.status(), 200, "{}", first.head);
            let refused = client.exchange(request).await;
            assert_eq!(refused.status(), status, "{}", refused.head);
            assert_eq!(
                refused.header("server"),
                Some("amazing-proxy"),
                "{}",
                refused.head
            );
            assert_eq!(
                refused.header("connection"),
                Some("close"),
                "{}",
                refused.head
            );
            assert!(
                refused.body_text().contains(words),
                "{}: {:?}",
                refused.head,
                refused.body_text()
            );
        }
    })
    .await;
}
