//! Traffic policy from a routes file (issue 19, docs/routes.md), black-box against the binary: a
//! pod's app calls a service of three endpoints through its sidecar's outbound listener (real
//! HTTP/1.1, h2c and grpcio servers in their own namespace, a static list or dnsmasq's answer for
//! a headless-Service-like name), and each behaviour is shown by what the clients get, what each
//! endpoint logged, the access log and the metrics. Layout: `support::routes`. Apps:
//! tests/fixtures/routes_apps.
//!
//! Needs root, iptables, curl, dnsmasq (the DNS test) and the venv with grpcio and h2
//! (`scripts/deps.sh --tests`); otherwise each test says SKIP. No assertion compares a duration:
//! rates are counts over a window the client measured, absences are counts after an event.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::identity::{CLIENT_ID, Ca};
use crate::support::routes::{
    DNS_NAME, GRPC_PORT, HTTP_PORT, LAB_WAIT, Lab, Mode, endpoint_id, tally,
};
use crate::support::{eventually_blocking, skip};

/// The lab, or `None` after reporting `test` skipped.
fn lab(test: &str) -> Option<Lab> {
    Lab::new().map_err(|why| skip(test, &why)).ok()
}

/// `["ip:port", ...]` of the lab's endpoints `which` on `port`, for a routes file.
fn list(lab: &Lab, which: &[usize], port: u16) -> String {
    let all: Vec<String> = which
        .iter()
        .map(|&i| format!("\"{}\"", lab.addr(i, port)))
        .collect();
    format!("[{}]", all.join(", "))
}

/// The summary line of http_client.py.
fn load(lab: &Lab, host: &str, path: &str, how: &[&str]) -> Value {
    let (ip, port, authority) = (
        lab.vip.to_string(),
        HTTP_PORT.to_string(),
        format!("{host}:{HTTP_PORT}"),
    );
    let mut args = vec![ip.as_str(), port.as_str(), authority.as_str(), path];
    args.extend_from_slice(how);
    serde_json::from_str(lab.app("http_client.py", &args).trim()).expect("the client's summary")
}

fn count(v: &Value, status: &str) -> u64 {
    v["statuses"][status].as_u64().unwrap_or(0)
}

fn names(values: &[Value], field: &str) -> BTreeMap<String, usize> {
    tally(values.iter().map(|v| v[field].as_str().unwrap_or("<none>")))
}

// 1 -------------------------------------------------------------------------------------------

#[test]
fn static_endpoints_take_each_request_of_one_connection_in_turn() {
    const TEST: &str = "routes::static_endpoints_take_each_request_of_one_connection_in_turn";
    let Some(mut lab) = lab(TEST) else { return };
    for (i, name) in ["ep-1", "ep-2", "ep-3"].into_iter().enumerate() {
        lab.endpoint(i, name, Mode::Ok);
    }
    lab.start_proxy(&format!(
        "outbound:\n  - name: web\n    match: {{host: web, port: {HTTP_PORT}}}\n    \
         endpoints: {{static: {}}}\n    balance: round-robin\n",
        list(&lab, &[0, 1, 2], HTTP_PORT)
    ));

    // HTTP/1.1: nine URLs on one curl command, one keep-alive connection.
    let resolve = format!("web:{HTTP_PORT}:{}", lab.vip);
    let mut args = vec![
        "--resolve".to_string(),
        resolve,
        "-w".into(),
        "|%{num_connects}\n".into(),
    ];
    args.extend((0..9).map(|i| format!("http://web:{HTTP_PORT}/h1/{i}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.curl_raw(&args);
    let stdout = crate::support::tools::text(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {stdout}{}",
        crate::support::tools::text(&out.stderr)
    );
    // Each transfer prints "<name>\n|<connections opened>\n".
    let transfers: Vec<(&str, &str)> = stdout
        .lines()
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| (c[0], c.get(1).copied().unwrap_or("")))
        .collect();
    assert_eq!(transfers.len(), 9, "{stdout}");
    let opened: u32 = transfers
        .iter()
        .map(|(_, n)| n.trim_start_matches('|').parse::<u32>().unwrap_or(99))
        .sum();
    assert_eq!(opened, 1, "one connection for the nine requests: {stdout}");
    let h1 = tally(transfers.iter().map(|(name, _)| *name));
    let want: BTreeMap<String, usize> = [("ep-1", 3), ("ep-2", 3), ("ep-3", 3)]
        .map(|(n, c)| (n.to_string(), c))
        .into();
    assert_eq!(
        h1, want,
        "round-robin over one keep-alive connection: {stdout}"
    );

    // HTTP/2 (prior knowledge): nine streams on one connection.
    let (ip, port) = (lab.vip.to_string(), HTTP_PORT.to_string());
    let authority = format!("web:{HTTP_PORT}");
    let out = lab.app("h2_client.py", &[&ip, &port, &authority, "/h2", "9"]);
    let lines = crate::support::tools::json_records(&out);
    let streams: Vec<&Value> = lines.iter().filter(|l| l.get("stream").is_some()).collect();
    assert_eq!(streams.len(), 9, "{out}");
    for s in &streams {
        assert_eq!(s["status"], 200, "{out}");
        assert_eq!(s["server"], "amazing-proxy", "{out}");
    }
    let h2 = tally(streams.iter().map(|s| s["body"].as_str().unwrap_or("")));
    assert_eq!(
        h2, want,
        "round-robin over one HTTP/2 connection's streams: {out}"
    );

    // Each endpoint saw its share of both, and the log names it as the upstream.
    for name in ["ep-1", "ep-2", "ep-3"] {
        let seen = lab.seen(name);
        assert_eq!(seen.len(), 6, "{name}: {seen:?}");
    }
    let records = lab.route_records("web", 18);
    assert_eq!(records.len(), 18, "{records:?}");
    let upstreams = names(&records, "upstream");
    let want_up: BTreeMap<String, usize> = (0..3).map(|i| (lab.addr(i, HTTP_PORT), 6)).collect();
    assert_eq!(upstreams, want_up, "{records:?}");
    for r in &records {
        assert_eq!(r["attempts"], 1, "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["direction"], "outbound", "{r}");
    }
    for i in 0..3 {
        let label = format!("endpoint=\"{}\"", lab.addr(i, HTTP_PORT));
        assert_eq!(
            lab.metric("endpoint_requests_total", &["route=\"web\"", &label]),
            6.0
        );
    }
    let route = ["direction=\"outbound\"", "route=\"web\""];
    assert_eq!(lab.metric("route_requests_total", &route), 18.0);
}

// 2 -------------------------------------------------------------------------------------------

#[test]
fn dns_endpoints_from_dnsmasq_spread_http1_http2_and_grpc() {
    const TEST: &str = "routes::dns_endpoints_from_dnsmasq_spread_http1_http2_and_grpc";
    let Some(mut lab) = lab(TEST) else { return };
    if let Err(why) = lab.with_dns() {
        return skip(TEST, &why);
    }
    for (i, name) in ["dns-1", "dns-2", "dns-3"].into_iter().enumerate() {
        lab.endpoint(i, name, Mode::Ok);
        lab.grpc_endpoint(i, &format!("g{name}"), false);
    }
    // HTTP by the name alone (the request's port), gRPC by name:port; round-robin, since one
    // client asking one request at a time gives p2c-ewma no reason to try an endpoint whose
    // estimate is still the initial 30 ms (p2c is shown with concurrent calls, below).
    lab.start_proxy(&format!(
        "outbound:\n  - name: web-dns\n    match: {{host: web, port: {HTTP_PORT}}}\n    \
         endpoints: {{dns: {DNS_NAME}}}\n    balance: round-robin\n  - name: greeter-dns\n    \
         match: {{host: greeter, grpcService: svc.S}}\n    \
         endpoints: {{dns: \"{DNS_NAME}:{GRPC_PORT}\"}}\n    balance: round-robin\n  \
         - name: nowhere\n    match: {{host: nowhere, port: {HTTP_PORT}}}\n    \
         endpoints: {{dns: nothing.rt.test}}\n"
    ));
    // Until the first answer the route has no endpoint.
    eventually_blocking("the route to have its endpoints", LAB_WAIT, || {
        let got = lab.get("web", "/first");
        (got.status == 200)
            .then_some(())
            .ok_or_else(|| format!("{got:?}"))
    });

    // HTTP/1.1 keep-alive: 60 requests on one connection reach all three.
    let h1 = load(&lab, "web", "/h1", &["--count", "60"]);
    assert_eq!(count(&h1, "200"), 60, "{h1}");
    let bodies: Vec<&str> = h1["bodies"]
        .as_array()
        .expect("bodies")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let spread = tally(bodies);
    assert_eq!(
        spread.len(),
        3,
        "every endpoint got some of one connection's requests: {spread:?}"
    );

    // HTTP/2: 60 streams on one connection.
    let (ip, port) = (lab.vip.to_string(), HTTP_PORT.to_string());
    let out = lab.app(
        "h2_client.py",
        &[&ip, &port, &format!("web:{HTTP_PORT}"), "/h2", "60"],
    );
    let streams: Vec<Value> = crate::support::tools::json_records(&out)
        .into_iter()
        .filter(|l| l.get("stream").is_some())
        .collect();
    assert!(streams.iter().all(|s| s["status"] == 200), "{out}");
    let spread = names(&streams, "body");
    assert_eq!(
        spread.len(),
        3,
        "every endpoint got some of one connection's streams: {spread:?}"
    );

    // gRPC: one channel, 30 calls, ten to each (round-robin).
    let calls = lab.grpc_calls(&format!("greeter:{GRPC_PORT}"), 30, &[]);
    assert!(calls.iter().all(|c| c["code"] == "OK"), "{calls:?}");
    let replies = names(&calls, "reply");
    let want: BTreeMap<String, usize> = ["gdns-1", "gdns-2", "gdns-3"]
        .map(|n| (n.to_string(), 10))
        .into();
    assert_eq!(replies, want, "{calls:?}");

    let records = lab.route_records("web-dns", 121);
    let upstreams = names(&records, "upstream");
    let want_up: Vec<String> = (0..3).map(|i| lab.addr(i, HTTP_PORT)).collect();
    assert_eq!(
        upstreams.keys().cloned().collect::<Vec<_>>(),
        want_up,
        "{upstreams:?}"
    );
    let grpc = lab.route_records("greeter-dns", 30);
    let upstreams = names(&grpc, "upstream");
    let want_up: BTreeMap<String, usize> = (0..3).map(|i| (lab.addr(i, GRPC_PORT), 10)).collect();
    assert_eq!(upstreams, want_up, "{grpc:?}");
    let dnsmasq = lab.read("dnsmasq.log");
    assert!(
        dnsmasq.contains(&format!("query[A] {DNS_NAME}")),
        "the proxy asked dnsmasq: {dnsmasq}"
    );

    // A name with no address (NXDOMAIN): the route has no endpoint, and says so.
    let got = lab.get("nowhere", "/");
    assert!(got.status >= 500, "{got:?}");
    assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
    let rec = lab.error_records("no_endpoints", 1);
    assert_eq!(rec[0]["route"], "nowhere", "{}", rec[0]);
}

// 3 -------------------------------------------------------------------------------------------

#[test]
fn one_grpc_channel_is_spread_over_three_endpoints() {
    const TEST: &str = "routes::one_grpc_channel_is_spread_over_three_endpoints";
    let Some(mut lab) = lab(TEST) else { return };
    for (i, name) in ["grpc-1", "grpc-2", "grpc-3"].into_iter().enumerate() {
        lab.grpc_endpoint(i, name, false);
    }
    let endpoints = list(&lab, &[0, 1, 2], GRPC_PORT);
    lab.start_proxy(&format!(
        "outbound:\n  - name: greeter-rr\n    match: {{host: greeter, grpcService: svc.S}}\n    \
         endpoints: {{static: {endpoints}}}\n    balance: round-robin\n  - name: greeter-p2c\n    \
         match: {{host: greeter-p2c, grpcMethod: M}}\n    endpoints: {{static: {endpoints}}}\n"
    ));
    let calls = lab.grpc_calls(&format!("greeter:{GRPC_PORT}"), 30, &[]);
    assert_eq!(calls.len(), 30);
    assert!(calls.iter().all(|c| c["code"] == "OK"), "{calls:?}");
    let want: BTreeMap<String, usize> = ["grpc-1", "grpc-2", "grpc-3"]
        .map(|n| (n.to_string(), 10))
        .into();
    assert_eq!(names(&calls, "reply"), want, "{calls:?}");
    for name in ["grpc-1", "grpc-2", "grpc-3"] {
        assert_eq!(lab.seen(name).len(), 10, "{name}");
    }
    let records = lab.route_records("greeter-rr", 30);
    // One channel: every record names the same client connection.
    let clients = names(&records, "client");
    assert_eq!(clients.len(), 1, "one client connection: {clients:?}");
    let want_up: BTreeMap<String, usize> = (0..3).map(|i| (lab.addr(i, GRPC_PORT), 10)).collect();
    assert_eq!(names(&records, "upstream"), want_up, "{records:?}");

    // p2c-ewma (the default) on a channel of 60 concurrent calls: all three get some.
    let calls = lab.grpc_calls(&format!("greeter-p2c:{GRPC_PORT}"), 60, &["--parallel"]);
    assert!(calls.iter().all(|c| c["code"] == "OK"), "{calls:?}");
    let spread = names(&calls, "reply");
    assert_eq!(spread.len(), 3, "{spread:?}");
}

// 4 -------------------------------------------------------------------------------------------

#[test]
fn a_post_the_app_read_is_never_retried_a_get_is_and_refused_connections_are() {
    const TEST: &str =
        "routes::a_post_the_app_read_is_never_retried_a_get_is_and_refused_connections_are";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "resetter", Mode::Reset);
    lab.endpoint(1, "live", Mode::Ok);
    let dead = format!("{}:{HTTP_PORT}", lab.dead);
    lab.start_proxy(&format!(
        "outbound:\n  - name: reset-route\n    match: {{host: resetter, port: {HTTP_PORT}}}\n    \
         retry: {{on: [reset, connect-failure, \"503\"], attempts: 2, backoff: 5ms}}\n    \
         endpoints: {{static: {}}}\n  - name: refused-route\n    \
         match: {{host: refuser, port: {HTTP_PORT}}}\n    \
         retry: {{on: [connect-failure], attempts: 2, backoff: 5ms}}\n    \
         endpoints: {{static: [\"{dead}\", \"{}\"]}}\n    balance: round-robin\n",
        list(&lab, &[0], HTTP_PORT),
        lab.addr(1, HTTP_PORT)
    ));
    let resolve = format!("resetter:{HTTP_PORT}:{}", lab.vip);
    let url = format!("http://resetter:{HTTP_PORT}");

    // A POST the app read whole, then reset: not retried, whatever the route says.
    let post = lab.curl(&["--resolve", &resolve, "-d", "once", &format!("{url}/post")]);
    assert!(post.status >= 500, "{post:?}");
    assert_eq!(post.header("server"), Some("amazing-proxy"), "{post:?}");
    let rec = lab.route_records("reset-route", 1);
    assert_eq!(rec[0]["attempts"], 1, "{rec:?}");
    let posts = lab.seen("resetter");
    assert_eq!(posts.len(), 1, "the app got the POST once: {posts:?}");
    assert_eq!(posts[0]["method"], "POST");

    // A GET: retried twice (three attempts), all to the one endpoint.
    let get = lab.curl(&["--resolve", &resolve, &format!("{url}/get")]);
    assert!(get.status >= 500, "{get:?}");
    let rec = lab.route_records("reset-route", 2);
    assert_eq!(rec[1]["attempts"], 3, "{rec:?}");
    assert_eq!(
        rec[1]["upstream"],
        lab.addr(0, HTTP_PORT).as_str(),
        "{rec:?}"
    );
    let gets: Vec<Value> = lab
        .seen("resetter")
        .into_iter()
        .filter(|r| r["method"] == "GET")
        .collect();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert_eq!(lab.seen("resetter").len(), 4, "still one POST");

    // An endpoint that refuses connections never got the POST: retried on the live one.
    let resolve = format!("refuser:{HTTP_PORT}:{}", lab.vip);
    for i in 0..6 {
        let got = lab.curl(&[
            "--resolve",
            &resolve,
            "-d",
            &format!("post-{i}"),
            &format!("http://refuser:{HTTP_PORT}/post/{i}"),
        ]);
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.body, "live\n", "{got:?}");
    }
    let live: Vec<Value> = lab.seen("live");
    assert_eq!(live.len(), 6, "each POST once: {live:?}");
    assert!(live.iter().all(|r| r["method"] == "POST"), "{live:?}");
    let rec = lab.route_records("refused-route", 6);
    assert!(
        rec.iter()
            .all(|r| r["upstream"] == lab.addr(1, HTTP_PORT).as_str()),
        "{rec:?}"
    );
    let retried = rec.iter().filter(|r| r["attempts"] == 2).count();
    assert!(
        retried >= 3,
        "round-robin puts the refusing endpoint first for half of them: {rec:?}"
    );
    assert!(
        rec.iter().all(|r| r["attempts"] == 1 || r["attempts"] == 2),
        "{rec:?}"
    );
    let retries = lab.metric(
        "route_retries_total",
        &["direction=\"outbound\"", "route=\"refused-route\""],
    );
    assert_eq!(retries, retried as f64);
}

// 5 -------------------------------------------------------------------------------------------

#[test]
fn the_retry_budget_holds_retries_to_its_ratio_against_an_app_that_always_fails() {
    const TEST: &str =
        "routes::the_retry_budget_holds_retries_to_its_ratio_against_an_app_that_always_fails";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "failing", Mode::Fail503);
    lab.start_proxy(&format!(
        "retryBudget: {{ratio: 0.2, minPerSecond: 1}}\noutbound:\n  - name: failing\n    \
         match: {{host: failing, port: {HTTP_PORT}}}\n    \
         retry: {{on: [\"503\"], attempts: 3, backoff: 1ms}}\n    endpoints: {{static: {}}}\n",
        list(&lab, &[0], HTTP_PORT)
    ));
    const N: u64 = 200;
    let summary = load(&lab, "failing", "/", &["--count", &N.to_string()]);
    assert_eq!(
        count(&summary, "503"),
        N,
        "the client gets the app's 503: {summary}"
    );
    let elapsed = summary["elapsed"].as_f64().expect("elapsed");
    let records = lab.route_records("failing", N as usize);
    let attempts: u64 = records
        .iter()
        .map(|r| r["attempts"].as_u64().unwrap_or(0))
        .sum();
    let seen = lab.seen("failing").len() as u64;
    assert_eq!(attempts, seen, "the log's attempts are what the app got");
    let retries = seen - N;
    // ratio * N, plus the floor: a window's worth (10 s * 1/s) at once, then 1/s; and slack.
    let bound = 0.2 * N as f64 + 10.0 + elapsed.ceil() + 1.0 + 0.05 * N as f64;
    assert!(retries > 0, "some retries were made: {summary}");
    assert!(
        (retries as f64) <= bound,
        "{retries} retries for {N} requests in {elapsed:.2}s: more than {bound} (unbounded: {})",
        3 * N
    );
    assert!(seen < 4 * N);
    let route = ["direction=\"outbound\"", "route=\"failing\""];
    assert_eq!(lab.metric("route_retries_total", &route), retries as f64);
    assert!(lab.metric("route_retry_budget_exhausted_total", &route) > 0.0);
    assert_eq!(lab.metric("route_requests_total", &route), N as f64);
}

// 6 -------------------------------------------------------------------------------------------

#[test]
fn a_rate_limit_admits_its_rate_and_refuses_the_rest_with_429() {
    const TEST: &str = "routes::a_rate_limit_admits_its_rate_and_refuses_the_rest_with_429";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "limited", Mode::Ok);
    lab.start_proxy(&format!(
        "outbound:\n  - name: limited\n    match: {{host: limited, port: {HTTP_PORT}}}\n    \
         rateLimit: {{requestsPerSecond: 20, burst: 1}}\n    endpoints: {{static: {}}}\n",
        list(&lab, &[0], HTTP_PORT)
    ));
    let summary = load(&lab, "limited", "/", &["--seconds", "3"]);
    let (admitted, refused) = (count(&summary, "200"), count(&summary, "429"));
    let total = summary["requests"].as_u64().expect("requests");
    assert_eq!(admitted + refused, total, "only 200 and 429: {summary}");
    assert!(
        summary["errors"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );
    assert!(
        summary["no_retry_after"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{summary}"
    );
    assert_eq!(summary["server_not_proxy"], 0, "{summary}");
    let elapsed = summary["elapsed"].as_f64().expect("elapsed");
    let expected = 1.0 + 20.0 * elapsed;
    assert!(
        (admitted as f64 - expected).abs() <= 0.1 * expected + 1.0,
        "{admitted} admitted in {elapsed:.2}s, want {expected:.1} within 10 %: {total} sent"
    );
    assert!(
        refused > admitted,
        "the client asked far faster than 20/s: {summary}"
    );
    assert_eq!(lab.seen("limited").len() as u64, admitted);
    let route = ["direction=\"outbound\"", "route=\"limited\""];
    lab.wait_metric("route_rate_limited_total", &route, refused as f64);
    let limited = lab.error_records("rate_limited", refused as usize);
    assert!(
        limited.iter().all(|r| r["route"] == "limited"),
        "a refused request's record names the route it took: {}",
        limited[0]
    );
}

// 7 -------------------------------------------------------------------------------------------

#[test]
fn past_max_concurrency_requests_get_503_with_retry_after() {
    const TEST: &str = "routes::past_max_concurrency_requests_get_503_with_retry_after";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "slow", Mode::Ok);
    lab.start_proxy(&format!(
        "outbound:\n  - name: two-at-once\n    match: {{host: slow, port: {HTTP_PORT}}}\n    \
         concurrency: {{max: 2, queue: 0}}\n    endpoints: {{static: {}}}\n",
        list(&lab, &[0], HTTP_PORT)
    ));
    let resolve = format!("slow:{HTTP_PORT}:{}", lab.vip);
    for i in 0..2 {
        let url = format!("http://slow:{HTTP_PORT}/sleep/4000?held={i}");
        lab.spawn_app(
            "curl",
            &[
                "-sS",
                "-m",
                "20",
                "--resolve",
                &resolve,
                "-w",
                "\nstatus=%{http_code}\n",
                &url,
            ],
            &format!("held-{i}.log"),
        );
    }
    eventually_blocking("the app to hold two requests", LAB_WAIT, || {
        (lab.seen("slow").len() == 2)
            .then_some(())
            .ok_or_else(|| lab.read("slow.log"))
    });
    for i in 0..2 {
        let got = lab.get("slow", &format!("/sleep/4000?refused={i}"));
        assert_eq!(got.status, 503, "{got:?}");
        assert!(got.header("retry-after").is_some(), "{got:?}");
        assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
    }
    for i in 0..2 {
        eventually_blocking("the held requests to finish", LAB_WAIT, || {
            let log = lab.read(&format!("held-{i}.log"));
            log.contains("status=").then_some(log.clone()).ok_or(log)
        });
        let log = lab.read(&format!("held-{i}.log"));
        assert!(log.contains("status=200"), "{log}");
    }
    assert_eq!(
        lab.seen("slow").len(),
        2,
        "the refused ones never reached the app"
    );
    let route = ["direction=\"outbound\"", "route=\"two-at-once\""];
    assert_eq!(lab.metric("route_concurrency_rejected_total", &route), 2.0);
    // Slots are given back: another request is admitted.
    assert_eq!(lab.get("slow", "/after").status, 200);
    let refused = lab.error_records("concurrency_limited", 2);
    assert!(
        refused.iter().all(|r| r["route"] == "two-at-once"),
        "a refused request's record names the route it took: {}",
        refused[0]
    );
}

// 8 -------------------------------------------------------------------------------------------

#[test]
fn a_failing_endpoint_is_ejected_then_comes_back() {
    const TEST: &str = "routes::a_failing_endpoint_is_ejected_then_comes_back";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "good-1", Mode::Ok);
    lab.endpoint(1, "good-2", Mode::Ok);
    lab.endpoint(2, "bad", Mode::Fail503);
    lab.start_proxy(&format!(
        "outbound:\n  - name: ejecting\n    match: {{host: pool, port: {HTTP_PORT}}}\n    \
         endpoints: {{static: {}}}\n    balance: round-robin\n    \
         outlier: {{consecutiveFailures: 2, ejectFor: 5s, maxEjectedPercent: 50}}\n",
        list(&lab, &[0, 1, 2], HTTP_PORT)
    ));
    let bad = format!("endpoint=\"{}\"", lab.addr(2, HTTP_PORT));
    let labels = ["route=\"ejecting\"", bad.as_str()];
    // Round-robin gives the bad one every third request: its second failure ejects it.
    for _ in 0..12 {
        if lab.seen("bad").len() >= 2 {
            break;
        }
        lab.get("pool", "/warm");
    }
    assert_eq!(lab.seen("bad").len(), 2, "two failures in a row");
    lab.wait_metric("endpoint_ejections_total", &labels, 1.0);

    // Ejected: the next 30 requests all reach the other two.
    let summary = load(&lab, "pool", "/while-ejected", &["--count", "30"]);
    assert_eq!(count(&summary, "200"), 30, "{summary}");
    assert_eq!(
        lab.seen("bad").len(),
        2,
        "the ejected endpoint got nothing: {summary}"
    );
    let spread = tally(
        summary["bodies"]
            .as_array()
            .expect("bodies")
            .iter()
            .filter_map(Value::as_str),
    );
    assert_eq!(spread.len(), 2, "{spread:?}");

    // After ejectFor it is tried again.
    eventually_blocking(
        "the ejected endpoint to get a request again",
        LAB_WAIT,
        || {
            lab.get("pool", "/later");
            (lab.seen("bad").len() > 2)
                .then_some(())
                .ok_or_else(|| lab.read("bad.log"))
        },
    );
    // The log names the bad endpoint as the upstream of exactly the requests it got.
    let bad = lab.addr(2, HTTP_PORT);
    eventually_blocking(
        "the log to show each request the bad one got",
        LAB_WAIT,
        || {
            let to_bad = (lab.records().iter())
                .filter(|r| r["route"] == "ejecting" && r["upstream"] == bad.as_str())
                .count();
            let seen = lab.seen("bad").len();
            (to_bad == seen)
                .then_some(())
                .ok_or_else(|| format!("{to_bad} records, {seen} requests"))
        },
    );
}

// 9 -------------------------------------------------------------------------------------------

#[test]
fn a_reload_under_load_loses_nothing_and_a_broken_file_keeps_the_last_good_routes() {
    const TEST: &str =
        "routes::a_reload_under_load_loses_nothing_and_a_broken_file_keeps_the_last_good_routes";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "ep-a", Mode::Ok);
    lab.endpoint(1, "ep-b", Mode::Ok);
    let routes: Vec<String> = (0..2)
        .map(|which| {
            format!(
                "outbound:\n  - name: moving\n    match: {{host: moving, port: {HTTP_PORT}}}\n    \
                 endpoints: {{static: {}}}\n",
                list(&lab, &[which], HTTP_PORT)
            )
        })
        .collect();
    lab.start_proxy(&routes[0]);
    let stop = lab.path("stop");
    let (ip, port) = (lab.vip.to_string(), HTTP_PORT.to_string());
    let authority = format!("moving:{HTTP_PORT}");
    let stop_arg = stop.display().to_string();
    lab.spawn_app(
        "http_client.py",
        &[
            &ip,
            &port,
            &authority,
            "/load",
            "--seconds",
            "25",
            "--stop-file",
            &stop_arg,
        ],
        "load.log",
    );
    eventually_blocking("the load to reach A", LAB_WAIT, || {
        (lab.seen("ep-a").len() >= 50)
            .then_some(())
            .ok_or_else(|| lab.read("load.log"))
    });
    lab.write_routes(&routes[1]);
    eventually_blocking("the load to reach B after the reload", LAB_WAIT, || {
        (lab.seen("ep-b").len() >= 50)
            .then_some(())
            .ok_or_else(|| lab.proxy_log())
    });
    std::fs::write(&stop, "").expect("the stop file");
    let summary: Value = eventually_blocking("the client's summary", LAB_WAIT, || {
        let log = lab.read("load.log");
        serde_json::from_str::<Value>(log.trim()).map_err(|e| format!("{e}: {log}"))
    });
    assert!(
        summary["errors"].as_array().is_some_and(Vec::is_empty),
        "{summary}"
    );
    let total = summary["requests"].as_u64().expect("requests");
    assert_eq!(
        count(&summary, "200"),
        total,
        "no request failed: {}",
        summary["statuses"]
    );
    let bodies: Vec<&str> = summary["bodies"]
        .as_array()
        .expect("bodies")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let switch = bodies
        .iter()
        .position(|b| *b == "ep-b")
        .expect("B answered");
    assert!(
        bodies[..switch].iter().all(|b| *b == "ep-a"),
        "before: A only"
    );
    assert!(
        bodies[switch..].iter().all(|b| *b == "ep-b"),
        "after the reload: B only, {:?}",
        tally(bodies[switch..].iter().copied())
    );

    a_broken_file_keeps_the_last_good_routes(&lab, &routes[0]);
}

/// After the reload to B: a file that does not validate leaves B in force (the gauge is 1, `/ready`
/// stays 200 and names the problem); fixed (`good`: back to A), it is taken and the gauge is 0.
fn a_broken_file_keeps_the_last_good_routes(lab: &Lab, good: &str) {
    // A broken file: the last good routes stay, the gauge and /ready say so.
    std::fs::write(
        lab.path("routes.yaml.new"),
        "outbound:\n  - name: moving\n    match: {hots: moving}\n",
    )
    .expect("write");
    std::fs::rename(lab.path("routes.yaml.new"), lab.path("routes.yaml")).expect("rename");
    lab.wait_metric("routes_reload_failed", &[], 1.0);
    let (status, body) = lab.admin("/ready");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("routes") || body.contains("hots"),
        "/ready names the problem: {body}"
    );
    let got = lab.get("moving", "/while-broken");
    assert_eq!((got.status, got.body.as_str()), (200, "ep-b\n"), "{got:?}");
    // Fixed: taken, and the gauge goes back to 0.
    lab.write_routes(good);
    lab.wait_metric("routes_reload_failed", &[], 0.0);
    eventually_blocking("the fixed file to be used", LAB_WAIT, || {
        let got = lab.get("moving", "/fixed");
        (got.body == "ep-a\n")
            .then_some(())
            .ok_or_else(|| format!("{got:?}"))
    });
}

// 10 ------------------------------------------------------------------------------------------

#[test]
fn a_route_timeout_answers_504_and_caps_grpc_deadlines() {
    const TEST: &str = "routes::a_route_timeout_answers_504_and_caps_grpc_deadlines";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "sleepy", Mode::Ok);
    lab.grpc_endpoint(0, "gsleepy", false);
    let one = |port| list(&lab, &[0], port);
    lab.start_proxy(&format!(
        "outbound:\n  - name: timed\n    match: {{host: timed, port: {HTTP_PORT}}}\n    timeout: 500ms\n    \
         endpoints: {{static: {}}}\n  - name: grpc-timed\n    match: {{host: greeter, grpcService: svc.S}}\n    \
         timeout: 2s\n    endpoints: {{static: {}}}\n",
        one(HTTP_PORT),
        one(GRPC_PORT)
    ));
    let got = lab.get("timed", "/sleep/5000");
    assert_eq!(got.status, 504, "{got:?}");
    assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
    let rec = lab.route_records("timed", 1);
    assert_eq!(rec[0]["error"], "route_timeout", "{rec:?}");
    assert_eq!(lab.get("timed", "/fast").status, 200);

    let authority = format!("greeter:{GRPC_PORT}");
    // A longer deadline of the client's is capped to the route's; a shorter one is honoured.
    let calls = lab.grpc_calls(&authority, 1, &["--timeout", "30"]);
    assert_eq!(calls[0]["code"], "OK", "{calls:?}");
    let calls = lab.grpc_calls(&authority, 1, &["--timeout", "0.8"]);
    assert_eq!(calls[0]["code"], "OK", "{calls:?}");
    // No deadline of its own: the route's 2 s ends the call.
    let calls = lab.grpc_calls(&authority, 1, &["--payload", "sleep:8000"]);
    let seen = lab.seen("gsleepy");
    assert_eq!(seen.len(), 3, "{seen:?}");
    // grpc-timeout travels in whole units (grpcio rounds up): 50 ms of slack, far from 2 s.
    for (call, max) in seen.iter().zip([2.0, 0.8]) {
        let remaining = call["time_remaining"].as_f64();
        assert!(
            remaining.is_some_and(|r| r > 0.0 && r <= max + 0.05),
            "the app sees a deadline of at most {max} s: {call}"
        );
    }
    let rec = lab.error_records("route_timeout", 2);
    assert_eq!(rec[1]["route"], "grpc-timed", "{}", rec[1]);
    assert_eq!(rec[1]["grpc_status"], 4, "{}", rec[1]);
    // The app was told the route's deadline too (grpc-timeout added, as capping an absent one).
    let remaining = seen[2]["time_remaining"].as_f64();
    assert!(
        remaining.is_some_and(|r| r > 0.0 && r <= 2.05),
        "a call without grpc-timeout: the app sees the route's 2 s deadline: {}",
        seen[2]
    );
    // A refusal a grpcio client reads: a Trailers-Only response (one HEADERS frame that ends the
    // stream), else grpcio reports UNKNOWN "Stream removed".
    assert_eq!(calls[0]["code"], "DEADLINE_EXCEEDED", "{calls:?}");
}

// Refusals in gRPC's own words --------------------------------------------------------------

/// A gRPC route over its rate: RESOURCE_EXHAUSTED, which a grpcio client can read.
#[test]
fn grpc_past_a_rate_limit_gets_resource_exhausted() {
    const TEST: &str = "routes::grpc_past_a_rate_limit_gets_resource_exhausted";
    let Some(mut lab) = lab(TEST) else { return };
    lab.grpc_endpoint(0, "gapp", false);
    lab.start_proxy(&format!(
        "outbound:\n  - name: g-rate\n    match: {{host: g-rate, grpcService: svc.S}}\n    \
         rateLimit: {{requestsPerSecond: 1, burst: 1}}\n    endpoints: {{static: {}}}\n",
        list(&lab, &[0], GRPC_PORT)
    ));
    let calls = lab.grpc_calls(&format!("g-rate:{GRPC_PORT}"), 6, &[]);
    assert_eq!(calls[0]["code"], "OK", "{calls:?}");
    let refused = eventually_blocking("a record for each refusal", LAB_WAIT, || {
        let n = (lab.records().iter())
            .filter(|r| r["error"] == "rate_limited")
            .count();
        let admitted = lab.seen("gapp").len();
        (n + admitted == 6)
            .then_some(n)
            .ok_or(format!("{n} refused + {admitted} admitted of 6"))
    });
    assert!(refused >= 4, "six calls at once against 1/s: {calls:?}");
    let route = ["direction=\"outbound\"", "route=\"g-rate\""];
    lab.wait_metric("route_rate_limited_total", &route, refused as f64);
    let codes = names(&calls, "code");
    assert_eq!(codes.get("RESOURCE_EXHAUSTED"), Some(&refused), "{calls:?}");
}

/// Three concurrent calls on one channel against `max: 1`: one admitted, two UNAVAILABLE.
#[test]
fn grpc_past_a_concurrency_limit_gets_unavailable() {
    const TEST: &str = "routes::grpc_past_a_concurrency_limit_gets_unavailable";
    let Some(mut lab) = lab(TEST) else { return };
    lab.grpc_endpoint(0, "gapp", false);
    lab.start_proxy(&format!(
        "outbound:\n  - name: g-conc\n    match: {{host: g-conc, grpcService: svc.S}}\n    \
         concurrency: {{max: 1}}\n    endpoints: {{static: {}}}\n",
        list(&lab, &[0], GRPC_PORT)
    ));
    let calls = lab.grpc_calls(
        &format!("g-conc:{GRPC_PORT}"),
        3,
        &["--parallel", "--payload", "sleep:3000"],
    );
    assert_eq!(lab.seen("gapp").len(), 1, "one call reached the app");
    let route = ["direction=\"outbound\"", "route=\"g-conc\""];
    lab.wait_metric("route_concurrency_rejected_total", &route, 2.0);
    let ok = calls.iter().filter(|c| c["code"] == "OK").count();
    assert_eq!(ok, 1, "{calls:?}");
    let want: BTreeMap<String, usize> = [("OK", 1), ("UNAVAILABLE", 2)]
        .map(|(c, n)| (c.to_string(), n))
        .into();
    assert_eq!(names(&calls, "code"), want, "{calls:?}");
}

// The authority an endpoint sees ------------------------------------------------------------

/// A route's endpoint is a pod of the Service the app named: it gets the authority the app wrote,
/// as `Host` over HTTP/1.1 and as `:authority` over HTTP/2, and never a `Host` beside
/// `:authority` that says otherwise (RFC 9113 8.3.1 forbids it, and strict servers refuse such a
/// request).
#[test]
fn an_endpoint_sees_the_authority_the_app_wrote() {
    const TEST: &str = "routes::an_endpoint_sees_the_authority_the_app_wrote";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "named", Mode::Ok);
    lab.start_proxy(&format!(
        "outbound:\n  - name: named\n    match: {{host: web, port: {HTTP_PORT}}}\n    \
         endpoints: {{static: {}}}\n",
        list(&lab, &[0], HTTP_PORT)
    ));
    assert_eq!(lab.get("web", "/h1").status, 200);
    let (ip, port) = (lab.vip.to_string(), HTTP_PORT.to_string());
    let authority = format!("web:{HTTP_PORT}");
    lab.app("h2_client.py", &[&ip, &port, &authority, "/h2", "1"]);
    let seen = lab.seen("named");
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        assert_eq!(request["authority"], authority, "{request}");
        assert!(
            request["host"].is_null() || request["host"] == request["authority"],
            "a Host beside :authority that differs from it: {request}"
        );
    }
}

/// The endpoints' proxies' `--policy`: the pod is admitted on the app's port, not on
/// [`DENIED_PORT`]. Returns the file's path.
fn endpoints_policy(lab: &Lab) -> String {
    let policy = lab.path("ep-policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "default: cluster-authenticated\nports:\n  - port: {DENIED_PORT}\n    allow:\n      \
             - identities: [spiffe://cluster.local/ns/rt/sa/nobody]\n"
        ),
    )
    .expect("the endpoints' policy");
    policy.display().to_string()
}

/// A port the endpoints' proxies refuse the pod ([`endpoints_policy`]).
const DENIED_PORT: u16 = 9090;

/// In strict mutual TLS: an endpoint without a proxy never gets plaintext (502), and a peer's
/// policy refusal is an answer: 403, not retried, and the endpoint `denied` not ejected (a
/// second request reaches its proxy again).
fn strict_refusals(lab: &Lab, denied: &str) {
    assert_eq!(lab.get("bare", "/clear").status, 502);
    assert!(lab.seen("bare").is_empty(), "{}", lab.read("bare.log"));
    for _ in 0..2 {
        assert_eq!(lab.get("denied", "/no").status, 403);
    }
    let refused = lab.route_records("denied", 2);
    for r in &refused {
        assert_eq!(r["attempts"], 1, "{r}");
        assert_eq!(r["error"], "policy_denied", "{r}");
    }
    let label = format!("endpoint=\"{denied}\"");
    assert_eq!(
        lab.metric("endpoint_failures_total", &["route=\"denied\"", &label]),
        0.0
    );
}

/// In mutual TLS (`--outbound-mtls strict`) each endpoint is its own HBONE peer: the requests of
/// one keep-alive connection and the streams of one HTTP/2 connection go round the three
/// endpoints, each in a tunnel to that endpoint's own proxy. Each endpoint's proxy names the
/// pod's identity, the pod's records name each endpoint's (the one the handshake verified), each
/// app is reached only by its own proxy (never by the pod's address: nothing crossed in clear),
/// and each request still names the authority the app wrote.
#[test]
fn in_mutual_tls_each_endpoint_is_its_own_hbone_peer() {
    const TEST: &str = "routes::in_mutual_tls_each_endpoint_is_its_own_hbone_peer";
    let Some(mut lab) = lab(TEST) else { return };
    for (i, name) in ["ep-1", "ep-2", "ep-3"].into_iter().enumerate() {
        lab.endpoint(i, name, Mode::Ok);
    }
    // An app with no proxy in front (nothing on its HBONE port): strict never sends it plaintext.
    let bare = lab.bare_endpoint("bare");
    let policy = endpoints_policy(&lab);
    let ca = Ca::new("routes CA");
    let identity = lab.mesh_endpoints(&ca, CLIENT_ID, &["--policy", &policy]);
    let denied = lab.addr(0, DENIED_PORT);
    lab.start_proxy_with(
        &format!(
            "outbound:\n  - name: web\n    match: {{host: web, port: {HTTP_PORT}}}\n    \
             endpoints: {{static: {}}}\n    balance: round-robin\n  - name: bare\n    \
             match: {{host: bare, port: {HTTP_PORT}}}\n    \
             endpoints: {{static: [\"{bare}:{HTTP_PORT}\"]}}\n  - name: denied\n    \
             match: {{host: denied, port: {HTTP_PORT}}}\n    \
             retry: {{on: [connect-failure, reset], attempts: 2}}\n    \
             endpoints: {{static: [\"{denied}\"]}}\n    \
             outlier: {{consecutiveFailures: 1, ejectFor: 30s, maxEjectedPercent: 100}}\n",
            list(&lab, &[0, 1, 2], HTTP_PORT)
        ),
        &["--identity-dir", &identity, "--outbound-mtls", "strict"],
    );
    strict_refusals(&lab, &denied);
    // HTTP/1.1: six requests on one keep-alive connection.
    let resolve = format!("web:{HTTP_PORT}:{}", lab.vip);
    let mut args = vec!["--resolve".to_string(), resolve, "-w".into(), "\n".into()];
    args.extend((0..6).map(|i| format!("http://web:{HTTP_PORT}/h1/{i}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.curl_raw(&args);
    let stdout = crate::support::tools::text(&out.stdout);
    assert!(out.status.success(), "curl: {stdout}{}", lab.proxy_log());
    let want: BTreeMap<String, usize> = [("ep-1", 2), ("ep-2", 2), ("ep-3", 2)]
        .map(|(n, c)| (n.to_string(), c))
        .into();
    let h1 = tally(stdout.lines().filter(|l| !l.is_empty()));
    assert_eq!(h1, want, "{stdout}");
    // HTTP/2: six streams on one connection.
    let (ip, port) = (lab.vip.to_string(), HTTP_PORT.to_string());
    let authority = format!("web:{HTTP_PORT}");
    let out = lab.app("h2_client.py", &[&ip, &port, &authority, "/h2", "6"]);
    let lines = crate::support::tools::json_records(&out);
    let streams: Vec<&Value> = lines.iter().filter(|l| l.get("stream").is_some()).collect();
    assert_eq!(streams.len(), 6, "{out}");
    let h2 = tally(streams.iter().map(|s| s["body"].as_str().unwrap_or("")));
    assert_eq!(h2, want, "{out}");

    for (i, name) in ["ep-1", "ep-2", "ep-3"].into_iter().enumerate() {
        let seen = lab.seen(name);
        assert_eq!(seen.len(), 4, "{name}: {seen:?}");
        for request in &seen {
            // The endpoints' proxies share the namespace, whose addresses the kernel picks
            // from: what matters is that the pod's never reaches the app.
            let client = request["client"].as_str().unwrap_or("");
            assert!(
                lab.endpoints.iter().any(|ip| ip.to_string() == client),
                "{name} is reached by the endpoints' proxies only, never by the pod: {request}"
            );
            assert_eq!(request["authority"], authority, "{request}");
        }
        let log = format!("ep-proxy-{i}.log");
        let inbound = eventually_blocking(&format!("4 records in {log}"), LAB_WAIT, || {
            let found: Vec<Value> = crate::support::tools::json_records(&lab.read(&log))
                .into_iter()
                .filter(|r| r["direction"] == "inbound" && r["status"] == 200)
                .collect();
            let why = format!("{found:?}");
            (found.len() == 4).then_some(found).ok_or(why)
        });
        for r in &inbound {
            assert_eq!(r["peer"], CLIENT_ID, "{r}");
        }
    }
    let records = lab.route_records("web", 12);
    assert_eq!(records.len(), 12, "{records:?}");
    for r in &records {
        assert_eq!(r["status"], 200, "{r}");
        let upstream = r["upstream"].as_str().unwrap_or("");
        let i = (0..3)
            .find(|&i| upstream == lab.addr(i, HTTP_PORT))
            .unwrap_or_else(|| panic!("an endpoint's address: {r}"));
        assert_eq!(r["peer"], endpoint_id(i), "{r}");
    }
}

/// `--outbound-mtls auto`: one route over an endpoint with a proxy and one without. The first
/// goes in a tunnel (its record names the endpoint's identity, its proxy the pod's), the second in
/// plaintext (nothing listens on its HBONE port, and nothing expects it to), reaching its app from
/// the pod's own address.
#[test]
fn in_auto_mutual_tls_an_endpoint_without_a_proxy_gets_plaintext() {
    const TEST: &str = "routes::in_auto_mutual_tls_an_endpoint_without_a_proxy_gets_plaintext";
    let Some(mut lab) = lab(TEST) else { return };
    lab.endpoint(0, "meshed", Mode::Ok);
    let bare = lab.bare_endpoint("bare");
    let ca = Ca::new("routes CA");
    let identity = lab.mesh_endpoints(&ca, CLIENT_ID, &[]);
    lab.start_proxy_with(
        &format!(
            "outbound:\n  - name: meshed\n    match: {{host: meshed, port: {HTTP_PORT}}}\n    \
             endpoints: {{static: [\"{}\"]}}\n  - name: bare\n    \
             match: {{host: bare, port: {HTTP_PORT}}}\n    \
             endpoints: {{static: [\"{bare}:{HTTP_PORT}\"]}}\n",
            lab.addr(0, HTTP_PORT)
        ),
        &["--identity-dir", &identity, "--outbound-mtls", "auto"],
    );
    assert_eq!(lab.get("meshed", "/in-tunnel").status, 200);
    assert_eq!(lab.get("bare", "/in-clear").status, 200);
    let meshed = lab.route_records("meshed", 1);
    assert_eq!(meshed[0]["peer"], endpoint_id(0), "{}", meshed[0]);
    let seen = lab.seen("meshed");
    assert_ne!(seen[0]["client"], lab.pod_ip.to_string(), "{}", seen[0]);
    let plain = lab.route_records("bare", 1);
    assert!(
        plain[0]["peer"].is_null(),
        "plaintext has no peer: {}",
        plain[0]
    );
    let seen = lab.seen("bare");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["client"], lab.pod_ip.to_string(), "{}", seen[0]);
}

// Inbound: the pod's own app protected ----------------------------------------------------------

/// An inbound route in front of the pod's app: two clients (two addresses, so two peers) asking
/// as fast as they can for 3 s each get their own `perPeer` rate (within 10 %), neither starving
/// the other, the app sees only what was admitted; and the route's timeout answers 504.
#[test]
fn inbound_limits_give_each_peer_its_rate_and_time_out_slow_answers() {
    const TEST: &str = "routes::inbound_limits_give_each_peer_its_rate_and_time_out_slow_answers";
    let Some(mut lab) = lab(TEST) else { return };
    lab.pod_app("pod-app");
    lab.start_proxy(
        "inbound:\n  - name: slow-api\n    match: {port: 80, pathPrefix: /sleep}\n    \
         timeout: 500ms\n  - name: api\n    match: {port: 80}\n    \
         rateLimit: {requestsPerSecond: 40, burst: 1, perPeer: 10}\n",
    );
    let pod = lab.pod_ip.to_string();
    let authority = format!("{pod}:80");
    let peers = [lab.endpoints[0].to_string(), lab.endpoints[1].to_string()];
    for (i, peer) in peers.iter().enumerate() {
        let args = [
            &pod,
            "80",
            &authority,
            "/api",
            "--seconds",
            "3",
            "--source",
            peer,
        ];
        lab.spawn_app_in_svc("http_client.py", &args, &format!("peer-{i}.log"));
    }
    let mut admitted_all = 0;
    for i in 0..2 {
        let summary = lab.summary(&format!("peer-{i}.log"));
        let (admitted, refused) = (count(&summary, "200"), count(&summary, "429"));
        let total = summary["requests"].as_u64().expect("requests");
        assert_eq!(admitted + refused, total, "only 200 and 429: {summary}");
        assert!(
            summary["errors"].as_array().is_some_and(Vec::is_empty),
            "{summary}"
        );
        assert!(
            summary["no_retry_after"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "{summary}"
        );
        let elapsed = summary["elapsed"].as_f64().expect("elapsed");
        // The peer's bucket: round(burst * perPeer / rps) = 1 at once, then 10 a second.
        let expected = 1.0 + 10.0 * elapsed;
        assert!(
            (admitted as f64 - expected).abs() <= 0.1 * expected + 1.0,
            "peer {i}: {admitted} admitted in {elapsed:.2}s, want {expected:.1} within 10 %"
        );
        admitted_all += admitted;
    }
    assert_eq!(
        lab.seen("pod-app").len() as u64,
        admitted_all,
        "the app got what was admitted"
    );
    let route = ["direction=\"inbound\"", "route=\"api\""];
    assert!(lab.metric("route_rate_limited_total", &route) > 0.0);

    // The route's timeout, from outside the pod.
    let out = lab.svc().exec(&[
        "curl",
        "-sS",
        "-i",
        "-m",
        "15",
        &format!("http://{pod}/sleep/5000"),
    ]);
    let got = crate::support::netns::Response::parse(&crate::support::tools::text(&out.stdout))
        .expect("a response");
    assert_eq!(got.status, 504, "{got:?}");
    assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
    let rec = lab.error_records("route_timeout", 1);
    assert_eq!(rec[0]["route"], "slow-api", "{}", rec[0]);
    assert_eq!(rec[0]["direction"], "inbound", "{}", rec[0]);
}
