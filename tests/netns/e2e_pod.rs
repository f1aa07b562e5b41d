//! End to end: a pod on this machine (network namespaces, veth pairs, httpbin under gunicorn,
//! `amazing-proxy run` and `amazing-proxy init` inside it), driven from outside with the
//! tutorial's requests, and calling a peer through the proxy. See `support::netns` for the layout.
//!
//! Needs root (to create namespaces): otherwise each test reports itself skipped (`support::skip`).
//! Needs gunicorn and httpbin in `$AMAZING_PROXY_TEST_VENV` or `target/venv` (scripts/test.sh).

use crate::support;
use crate::support::netns::{
    PEER_CONTENT, PEER_FILE, PEER_PORT, PEER_TCP_PORT, Pod, PodOptions, Response,
};
use crate::support::skip;
use crate::support::tools::{have, json_records, seed_records};

/// The pod, or `None` after reporting `test` skipped (not root, no venv).
fn start(test: &str, access_log: &str, run_args: &[&str], proxy_user: Option<u32>) -> Option<Pod> {
    let started = Pod::start(&PodOptions {
        access_log,
        run_args,
        proxy_user,
    });
    started.map_err(|why| skip(test, &why)).ok()
}

#[test]
fn tutorial_requests_reach_httpbin_through_the_proxy() {
    let Some(pod) = start(
        "tutorial_requests_reach_httpbin_through_the_proxy",
        "seed",
        &[],
        None,
    ) else {
        return;
    };
    // Someone else's rule in the pod's nat table: it must survive init and --clean.
    pod.ns_pod().ok(&[
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
    ]);
    let before = pod.nat_state();
    pod.init(&["--exclude-inbound-ports", "81"]);
    let ip = pod.pod_ip;

    let get = pod.curl_from_outside(&[&format!("http://{ip}/get?query=param")]);
    assert_eq!(get.status, 200, "{get:?}");
    assert_eq!(get.header("server"), Some("amazing-proxy"), "{get:?}");
    let echo = get.json();
    assert_eq!(echo["args"], serde_json::json!({"query": "param"}));
    // The app sees the client's Host, and its address in X-Forwarded-For (httpbin's "origin").
    assert_eq!(echo["headers"]["Host"], ip.to_string().as_str(), "{echo}");
    assert_eq!(
        echo["origin"],
        pod.outside_ip.to_string().as_str(),
        "{echo}"
    );

    let post = pod.curl_from_outside(&[
        "-X",
        "POST",
        "-d",
        "body=parameters",
        &format!("http://{ip}/post"),
    ]);
    assert_eq!(post.status, 200, "{post:?}");
    assert_eq!(post.header("server"), Some("amazing-proxy"), "{post:?}");
    assert_eq!(
        post.json()["form"],
        serde_json::json!({"body": "parameters"})
    );

    let status = pod.curl_from_outside(&[&format!("http://{ip}/status/429")]);
    assert_eq!(status.status, 429, "{status:?}");
    assert_eq!(status.header("server"), Some("amazing-proxy"), "{status:?}");

    let log = pod.access_log_when("three records", |l| seed_records(l).len() >= 3);
    let records = seed_records(&log);
    assert_eq!(records.len(), 3, "{log}");
    for (record, (path, status)) in records.iter().map(|r| r.join("\n")).zip([
        ("/get?query=param", 200),
        ("/post", 200),
        ("/status/429", 429),
    ]) {
        let urls =
            format!("Original URL: http://{ip}:80{path}\nProxy URL: http://127.0.0.1:80{path}\n");
        assert!(record.starts_with(&urls), "want {urls:?} in:\n{log}");
        assert!(
            record.ends_with(&format!("Response Status: {status}")),
            "{log}"
        );
    }
    assert!(
        records[1].join("\n").contains("\nRequest Size: 15\n"),
        "the form's 15 bytes: {log}"
    );

    // An excluded port reaches the app itself: gunicorn answers, and the proxy logs nothing.
    let direct = pod.curl_from_outside(&[&format!("http://{ip}:81/get?via=excluded")]);
    assert_eq!(direct.status, 200, "{direct:?}");
    let server = direct.header("server").unwrap_or_default();
    assert!(server.starts_with("gunicorn"), "{direct:?}");
    assert_eq!(
        direct.json()["args"],
        serde_json::json!({"via": "excluded"})
    );
    // A request through the proxy after it: once it is logged, a record for :81 would be too.
    let marker = pod.curl_from_outside(&[&format!("http://{ip}/get?marker=after")]);
    assert_eq!(marker.status, 200, "{marker:?}");
    let log = pod.access_log_when("the marker's record", |l| l.contains("marker=after"));
    assert_eq!(seed_records(&log).len(), 4, "{log}");
    assert!(!log.contains("excluded"), "{log}");

    // --clean puts the nat table back as it was, and traffic reaches the app directly again.
    pod.init(&["--clean"]);
    assert_eq!(pod.nat_state(), before);
    let after = pod.curl_from_outside(&[&format!("http://{ip}/get?query=param")]);
    assert_eq!(after.status, 200, "{after:?}");
    assert!(
        after
            .header("server")
            .unwrap_or_default()
            .starts_with("gunicorn"),
        "{after:?}"
    );
}

/// The app's call to the peer, made as the app's user, as `curl -i` shows it.
fn call_peer(pod: &Pod, query: &str) -> Response {
    let url = format!("http://{}:{PEER_PORT}/{PEER_FILE}?{query}", pod.peer_ip);
    pod.curl_as_app(&[&url])
}

/// With `init INIT_ARGS`, the app's calls to the peer go through the proxy exactly once each and
/// get the answer the peer gives without the proxy; `--clean` then restores the nat table.
fn outbound_goes_through_the_proxy_once(pod: &Pod, init_args: &[&str]) {
    let ip = pod.pod_ip;
    let peer = format!("{}:{PEER_PORT}", pod.peer_ip);
    // Without rules, what the peer answers.
    let direct = call_peer(pod, "call=direct");
    assert_eq!(direct.status, 200, "{direct:?}");
    assert_eq!(direct.body, PEER_CONTENT);
    let before = pod.nat_state();
    // With native nft, --clean deletes our table and nothing is left behind at all.
    let native = init_args.contains(&"nft");
    let before_nft = native.then(|| pod.nft_ruleset());

    let calls = ["call=1", "call=2"];
    pod.init(init_args);
    for query in calls {
        let got = call_peer(pod, query);
        assert_eq!(got.status, direct.status, "{got:?}");
        assert_eq!(got.body, direct.body, "{got:?}");
        assert_eq!(
            got.header("content-type"),
            direct.header("content-type"),
            "{got:?}"
        );
        // It did go through the proxy.
        assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
    }
    // Not HTTP: forwarded as opaque TCP, to the original destination too.
    let opaque = pod.line_as_app("ping-1");
    if let Some(answer) = &opaque {
        assert_eq!(answer, "PING-1\n");
    } else {
        support::skip(
            "outbound_goes_through_the_proxy_once (opaque part)",
            "no /usr/bin/python3 in the pod: opaque TCP not exercised",
        );
    }
    let inbound = pod.curl_from_outside(&[&format!("http://{ip}/get?query=param")]);
    assert_eq!(inbound.status, 200, "{inbound:?}");

    // The inbound request comes after the calls: once it is logged, they all are.
    let log = pod.access_log_when("the inbound record", |l| l.contains("query=param"));
    let records = json_records(&log);
    for query in calls {
        let url = format!("http://{peer}/{PEER_FILE}?{query}");
        let found: Vec<_> = records
            .iter()
            .filter(|r| r["original_url"] == url.as_str())
            .collect();
        assert_eq!(found.len(), 1, "one record for {url}: {log}");
        let r = found[0];
        assert_eq!(r["direction"], "outbound", "{log}");
        assert_eq!(r["upstream"], peer.as_str(), "{log}");
        assert_eq!(r["proxy_url"], url.as_str(), "{log}");
        assert_eq!(r["status"], 200, "{log}");
        // The peer saw it once: the proxy's own connection was not redirected to itself.
        let line = format!("\"GET /{PEER_FILE}?{query} HTTP/1.1\" 200");
        let peer_log = pod.read("peer.log");
        assert_eq!(peer_log.matches(&line).count(), 1, "{peer_log}");
    }
    let tcp_peer = format!("{}:{PEER_TCP_PORT}", pod.peer_ip);
    let tcp: Vec<_> = records.iter().filter(|r| r["protocol"] == "TCP").collect();
    if opaque.is_some() {
        assert_eq!(tcp.len(), 1, "{log}");
        assert_eq!(tcp[0]["direction"], "outbound", "{log}");
        assert_eq!(tcp[0]["original_url"], format!("tcp://{tcp_peer}").as_str());
        assert_eq!(tcp[0]["upstream"], tcp_peer.as_str(), "{log}");
        assert_eq!(tcp[0]["request_bytes"], 7, "{log}");
        assert_eq!(tcp[0]["response_bytes"], 7, "{log}");
        let peer_log = pod.read("peer-tcp.log");
        assert_eq!(peer_log.matches("got ping-1\n").count(), 1, "{peer_log}");
    }
    let outbound = records
        .iter()
        .filter(|r| r["direction"] == "outbound")
        .count();
    assert_eq!(outbound, calls.len() + tcp.len(), "{log}");
    let inbound: Vec<_> = records
        .iter()
        .filter(|r| r["direction"] == "inbound")
        .collect();
    assert_eq!(inbound.len(), 1, "{log}");
    assert_eq!(
        inbound[0]["original_url"],
        format!("http://{ip}:80/get?query=param").as_str(),
        "{log}"
    );
    assert_eq!(
        inbound[0]["proxy_url"], "http://127.0.0.1:80/get?query=param",
        "{log}"
    );

    pod.init(&["--clean"]);
    assert_eq!(pod.nat_state(), before);
    if let Some(before_nft) = before_nft {
        assert_eq!(pod.nft_ruleset(), before_nft);
    }
    let again = call_peer(pod, "call=after-clean");
    assert_ne!(again.header("server"), Some("amazing-proxy"), "{again:?}");
}

#[test]
fn app_calls_go_through_the_proxy_once_iptables_proxy_as_root() {
    // The proxy runs as root: only its mark (SO_MARK 1337) keeps it out of the rules.
    let Some(pod) = start(
        "app_calls_go_through_the_proxy_once_iptables_proxy_as_root",
        "json",
        &[],
        None,
    ) else {
        return;
    };
    outbound_goes_through_the_proxy_once(&pod, &["--backend", "iptables"]);
}

#[test]
fn app_calls_go_through_the_proxy_once_nft_proxy_as_its_own_user() {
    // The proxy runs as uid/gid 1337 without the privilege to mark: its uid keeps it out.
    if !have("nft") {
        return skip(
            "app_calls_go_through_the_proxy_once_nft_proxy_as_its_own_user",
            "nft not installed",
        );
    }
    let Some(pod) = start(
        "app_calls_go_through_the_proxy_once_nft_proxy_as_its_own_user",
        "json",
        &[],
        Some(1337),
    ) else {
        return;
    };
    outbound_goes_through_the_proxy_once(&pod, &["--backend", "nft"]);
}

/// Inbound to any app port reaches the same port of the app, and the log shows the pod's
/// address and port as dialled, with the proxy listening on IPv4 or dual-stack (`[::]:8000`,
/// which IPv6 pods need: init redirects IPv6 inbound too).
fn inbound_keeps_the_original_port(test: &str, inbound: &str) {
    let Some(pod) = start(test, "json", &["--inbound", inbound], None) else {
        return;
    };
    pod.init(&[]);
    let ip = pod.pod_ip;
    for port in [80, 81] {
        let got = pod.curl_from_outside(&[&format!("http://{ip}:{port}/get?port={port}")]);
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.header("server"), Some("amazing-proxy"), "{got:?}");
        let origin = pod.outside_ip.to_string();
        assert_eq!(got.json()["origin"], origin.as_str(), "{got:?}");
    }
    let log = pod.access_log_when("two records", |l| json_records(l).len() >= 2);
    let records = json_records(&log);
    assert_eq!(records.len(), 2, "{log}");
    for (r, port) in records.iter().zip([80, 81]) {
        assert_eq!(r["direction"], "inbound", "{log}");
        assert_eq!(
            r["original_url"],
            format!("http://{ip}:{port}/get?port={port}").as_str(),
            "{log}"
        );
        // --app's port goes to --app; any other port to the pod's own address, never loopback
        // (docs/security.md).
        let upstream = if port == 80 {
            "127.0.0.1:80".to_string()
        } else {
            format!("{ip}:{port}")
        };
        assert_eq!(r["upstream"], upstream.as_str(), "{log}");
        let client = r["client"].as_str().unwrap_or_default();
        let outside = format!("{}:", pod.outside_ip);
        assert!(client.starts_with(&outside), "an IPv4 client: {log}");
    }
}

#[test]
fn inbound_keeps_the_original_port_ipv4_listener() {
    inbound_keeps_the_original_port(
        "inbound_keeps_the_original_port_ipv4_listener",
        "0.0.0.0:8000",
    );
}

#[test]
fn inbound_keeps_the_original_port_dual_stack_listener() {
    inbound_keeps_the_original_port(
        "inbound_keeps_the_original_port_dual_stack_listener",
        "[::]:8000",
    );
}

#[test]
fn large_and_chunked_bodies_arrive_intact_both_ways() {
    let Some(pod) = start(
        "large_and_chunked_bodies_arrive_intact_both_ways",
        "json",
        &[],
        None,
    ) else {
        return;
    };
    pod.init(&[]);
    let ip = pod.pod_ip;

    // A large fixed-length response.
    let big = pod.curl_from_outside(&[&format!("http://{ip}/range/100000")]);
    assert_eq!(big.status, 200, "{:?}", big.headers);
    assert_eq!(big.body.len(), 100_000);
    assert!(big.body.starts_with("abcdefghijklmnopqrstuvwxyz"));

    // A chunked response: httpbin streams one JSON object per line.
    let stream = pod.curl_from_outside(&[&format!("http://{ip}/stream/5")]);
    assert_eq!(stream.status, 200, "{stream:?}");
    let lines: Vec<&str> = stream.body.lines().collect();
    assert_eq!(lines.len(), 5, "{stream:?}");
    for line in lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("a line of /stream/5 is not JSON ({e}): {line}"));
    }

    // A large chunked request body, echoed back by httpbin.
    let payload: String = (0..200_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let file = pod.path("payload.txt");
    std::fs::write(&file, &payload).expect("writing the payload");
    let upload = pod.curl_from_outside(&[
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{ip}/anything"),
    ]);
    assert_eq!(upload.status, 200, "{:?}", upload.headers);
    assert_eq!(upload.json()["data"], payload.as_str());

    let log = pod.access_log_when("three records", |l| json_records(l).len() >= 3);
    let records = json_records(&log);
    assert_eq!(records.len(), 3, "{log}");
    assert_eq!(records[0]["response_bytes"], 100_000, "{log}");
    assert_eq!(records[2]["request_bytes"], 200_000, "{log}");
}
