//! Mutual TLS over HBONE between two pods in network namespaces (`support::mesh`), each with its
//! proxy and `init` rules: the app of one calls the other by address, in a tunnel, and a capture on
//! the link never sees the request in clear; peers of another CA or trust domain, fallbacks and
//! pins. The same data planes in process, on loopback, are the in-process suite's `mtls`.

use crate::support;
use crate::support::WAIT;
use crate::support::identity::{CLIENT_ID, Ca, PARTNER_ID, SERVER_ID, bundle_dir};
use crate::support::mesh::{APP_CONTENT, APP_FILE, APP_PORT, Mesh, Pod};

/// Two pods, or `None` after reporting `test` skipped (not root, no venv).
fn mesh(test: &str, a: (&str, &[&str]), b: (&str, &[&str])) -> Option<Mesh> {
    let ca = Ca::new("mesh CA");
    Mesh::start(&ca, a, b)
        .map_err(|why| support::skip(test, &why))
        .ok()
}

/// Pod A's app (curl, as uid 1000) calls pod B by address: the request leaves A in an HBONE tunnel
/// (--outbound-mtls strict), B's log names A's identity, A's log names B's, and a capture on the
/// link between them sees TLS to 15008 and never the request line.
#[test]
fn pod_to_pod_traffic_is_tunnelled_and_never_in_clear_on_the_wire() {
    let test = "pod_to_pod_traffic_is_tunnelled_and_never_in_clear_on_the_wire";
    if !support::tools::have("tcpdump") {
        support::skip(
            test,
            "tcpdump is not installed (scripts/deps.sh --tests installs it)",
        );
        return;
    }
    let strict: &[&str] = &["--outbound-mtls", "strict", "--inbound-mtls", "strict"];
    let Some(mut mesh) = mesh(test, (CLIENT_ID, strict), (SERVER_ID, strict)) else {
        return;
    };
    mesh.start_capture();
    let url = format!("http://{}:{}/{}", mesh.b_ip, APP_PORT, APP_FILE);
    let answer = mesh.curl_in_a("1000", &[&url]).unwrap_or_else(|e| {
        panic!(
            "curl in pod A failed: {e}\n--- A:\n{}\n--- B:\n{}",
            mesh.read("a-proxy.log"),
            mesh.read("b-proxy.log")
        )
    });
    assert_eq!(answer, APP_CONTENT);

    let inbound = mesh.record("b", "inbound");
    assert_eq!(inbound["peer"], CLIENT_ID, "{inbound}");
    assert_eq!(inbound["status"], 200, "{inbound}");
    assert!(
        inbound["original_url"]
            .as_str()
            .is_some_and(|u| u.ends_with(APP_FILE)),
        "B's proxy saw the HTTP request inside the tunnel: {inbound}"
    );
    let outbound = mesh.record("a", "outbound");
    assert_eq!(outbound["peer"], SERVER_ID, "{outbound}");
    // Both ends name the tunnel by the traceparent A sent on CONNECT.
    assert!(outbound["tunnel_traceparent"].is_string(), "{outbound}");
    assert_eq!(
        outbound["tunnel_traceparent"], inbound["tunnel_traceparent"],
        "A's record and B's name different tunnels"
    );

    // Read while tcpdump still writes (each packet as it comes).
    let seen = mesh.captured();
    let hbone = format!("{}.15008", mesh.b_ip);
    assert!(seen.contains(&hbone), "no HBONE packets captured:\n{seen}");
    assert!(
        !seen.contains("GET /"),
        "the request line crossed the link in clear:\n{seen}"
    );
    assert!(
        !seen.contains(APP_CONTENT.trim()),
        "the response crossed in clear"
    );

    // Plaintext from A's side of the link (as the proxy's uid, which A's rules do not redirect)
    // is refused by strict B.
    let plain = mesh.curl_in_a("1337", &[&url]);
    assert!(plain.is_err(), "strict B answered plaintext: {plain:?}");
}

/// Pod B's app on [`ECHO_PORT`]: answers every GET with its raw target and header fields as JSON.
const ECHO_APP: &str = r#"
import http.server, json, sys
class Echo(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"path": self.path, "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Echo).serve_forever()
"#;
const ECHO_PORT: u16 = 8081;

/// Pod B's policy lets anyone (A in its tunnel, plaintext too) reach `/public` only on the echo
/// app's port. From A's app, in a tunnel: the app learns A's verified identity in
/// `x-forwarded-client-cert` (`By=<B>;URI=<A>`) and never the one A's app forged; paths that an
/// app could resolve to `/admin` are refused with 400 before the policy, `/admin` itself with
/// 403, and a dot segment in an allowed path reaches the app resolved. Plaintext from A's side of
/// the link gets no XFCC at all, whatever it wrote.
#[test]
fn a_mesh_peer_is_named_to_the_app_and_ambiguous_paths_never_reach_it() {
    let test = "a_mesh_peer_is_named_to_the_app_and_ambiguous_paths_never_reach_it";
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "default: all-unauthenticated\nports:\n  - port: {ECHO_PORT}\n    allow:\n      - identities: [{CLIENT_ID}]\n        paths: [{{prefix: /public}}]\n      - unauthenticated: true\n        paths: [{{prefix: /public}}]\n"
        ),
    )
    .expect("write the policy");
    let policy = policy.display().to_string();
    let a_args: &[&str] = &["--outbound-mtls", "strict"];
    let b_args: &[&str] = &["--policy", &policy];
    let Some(mut mesh) = mesh(test, (CLIENT_ID, a_args), (SERVER_ID, b_args)) else {
        return;
    };
    let python = support::tools::venv().expect("the venv (Mesh::start found it)");
    let python = python.join("bin/python3").display().to_string();
    let echo = mesh
        .ns_b()
        .cmd(&[&python, "-c", ECHO_APP, &ECHO_PORT.to_string()]);
    mesh.spawn(echo, "b-echo.log");
    let base = format!("http://{}:{ECHO_PORT}", mesh.b_ip);
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/shop/sa/backend;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    // (status, the app's JSON) of GET `path` from A's app (uid 1000) or, bypassing A's proxy,
    // from its uid 1337 in plaintext.
    let try_get = |uid: &str, path: &str| -> Result<(u16, serde_json::Value), String> {
        let url = format!("{base}{path}");
        let out = mesh.curl_in_a(
            uid,
            &["--path-as-is", "-H", forged, "-w", "\n%{http_code}", &url],
        )?;
        let (body, status) = out.rsplit_once('\n').unwrap_or_default();
        let status = status.trim().parse().unwrap_or(0);
        Ok((
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        ))
    };
    let get = |uid: &str, path: &str| {
        try_get(uid, path)
            .unwrap_or_else(|e| panic!("curl {path}: {e}\n--- B:\n{}", mesh.read("b-proxy.log")))
    };
    support::eventually_blocking(
        "pod B's echo app",
        support::netns::POD_WAIT,
        || match try_get("1000", "/public/ready") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}\n{}", mesh.read("b-echo.log"))),
        },
    );
    let xfcc = |echo: &serde_json::Value| -> Vec<String> {
        echo["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|kv| kv[0] == "x-forwarded-client-cert")
            .map(|kv| kv[1].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    let (status, echo) = get("1000", "/public/hello");
    assert_eq!(status, 200, "{echo}");
    let ours = format!("By={SERVER_ID};URI={CLIENT_ID}");
    assert_eq!(xfcc(&echo), [ours], "{echo}");
    let (status, echo) = get("1000", "/public/a/../b");
    assert_eq!(status, 200, "{echo}");
    let path = &echo["path"];
    assert_eq!(path, "/public/b", "the app got the path it was judged by");

    assert_eq!(get("1000", "/admin").0, 403);
    for path in [
        "/public/..;/admin",
        "/public/.;/admin",
        "/public/%2e%2e/admin",
        "/public/%252e%252e/admin",
        "/public/%c0%ae%c0%ae/admin",
        "/public/%u002e%u002e/admin",
        "/public/..%09/admin",
        "/public%2fadmin",
    ] {
        let (status, echo) = get("1000", path);
        assert_eq!(status, 400, "{path}: {echo}");
    }
    // One record per refusal, naming the peer (the log is written in batches: waited for).
    support::eventually_blocking("B's records of the refusals", WAIT, || {
        let records = support::tools::json_records(&mesh.read("b-access.log"));
        let refused = records
            .iter()
            .filter(|r| r["error"] == "ambiguous_path" && r["peer"] == CLIENT_ID)
            .count();
        (refused == 8)
            .then_some(())
            .ok_or_else(|| format!("{records:?}"))
    });

    let (status, echo) = get("1337", "/public/plain");
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        xfcc(&echo),
        Vec::<String>::new(),
        "plaintext has no verified peer: {echo}"
    );
}

/// B runs no HBONE listener (--inbound-mtls off): A in `auto` sends plaintext (and logs no peer);
/// A in `strict`, or in `auto` with B named in --peer-identities, resets the app's connection and
/// logs the refusal.
#[test]
fn auto_falls_back_to_plaintext_where_nothing_listens_for_hbone_and_strict_never_does() {
    let test = "auto_falls_back_to_plaintext_where_nothing_listens_for_hbone_and_strict_never_does";
    let no_hbone: &[&str] = &["--inbound-mtls", "off"];
    let url = |mesh: &Mesh| format!("http://{}:{}/{}", mesh.b_ip, APP_PORT, APP_FILE);

    let auto: &[&str] = &["--outbound-mtls", "auto"];
    let Some(mesh) = self::mesh(test, (CLIENT_ID, auto), (SERVER_ID, no_hbone)) else {
        return;
    };
    assert_eq!(
        mesh.curl_in_a("1000", &[&url(&mesh)]),
        Ok(APP_CONTENT.to_string())
    );
    let outbound = mesh.record("a", "outbound");
    assert!(
        outbound.get("peer").is_none(),
        "plaintext has no peer: {outbound}"
    );
    assert_eq!(outbound["status"], 200, "{outbound}");
    drop(mesh);

    // A destination with an expected identity must speak HBONE, even under `auto`.
    let dir = tempfile::tempdir().expect("temp dir");
    let peers = dir.path().join("peers");
    std::fs::write(&peers, format!("198.18.0.0/15 {SERVER_ID}\n")).expect("write");
    let peers = peers.display().to_string();
    let strict: &[&str] = &["--outbound-mtls", "strict"];
    let expected: &[&str] = &["--outbound-mtls", "auto", "--peer-identities", &peers];
    for a_args in [strict, expected] {
        let Some(mesh) = self::mesh(test, (CLIENT_ID, a_args), (SERVER_ID, no_hbone)) else {
            return;
        };
        let refused = mesh.curl_in_a("1000", &[&url(&mesh)]);
        assert!(refused.is_err(), "{a_args:?} sent plaintext: {refused:?}");
        let outbound = mesh.record("a", "outbound");
        assert_eq!(outbound["error"], "connect_refused", "{outbound}");
        assert_eq!(
            forwarded(&mesh, "b"),
            Vec::<String>::new(),
            "nothing reached B's app"
        );
    }
}

/// Pods A and B with their own CAs, or `None` after reporting `test` skipped.
fn pods(test: &str, a: Pod<'_>, b: Pod<'_>) -> Option<Mesh> {
    Mesh::start_pods([a, b])
        .map_err(|why| support::skip(test, &why))
        .ok()
}

/// Waits until pod `pod`'s diagnostics (stderr) hold every one of `parts` on one line.
fn logged(mesh: &Mesh, pod: &str, parts: &[&str]) -> String {
    let file = format!("{pod}-proxy.log");
    support::eventually_blocking(&format!("{parts:?} in {file}"), WAIT, || {
        let log = mesh.read(&file);
        log.lines()
            .find(|line| parts.iter().all(|p| line.contains(p)))
            .map(str::to_owned)
            .ok_or(log)
    })
}

/// Pod `pod`'s count of handshakes refused in `direction` for `reason`.
fn refusals(mesh: &Mesh, pod: &str, direction: &str, reason: &str) -> f64 {
    let labels = [
        format!("direction=\"{direction}\""),
        format!("reason=\"{reason}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    support::metrics::metric(
        &mesh.metrics(pod),
        "amazing_proxy_tls_handshake_failures_total",
        &labels,
    )
    .unwrap_or(0.0)
}

/// An attacker's pod holds a certificate of our trust domain minted by a partner's CA (which our
/// pods trust for the partner's domain only, through --trust-bundles). As a client it is refused
/// by B's HBONE server; as a server, A's client refuses it. Each refusal is logged with the check
/// that failed and `fault` peer, and counted.
#[test]
fn an_attacker_pod_with_our_identity_from_a_partner_ca_is_refused_both_ways() {
    let test = "an_attacker_pod_with_our_identity_from_a_partner_ca_is_refused_both_ways";
    let ours = Ca::new("mesh CA");
    let partner = Ca::new("partner CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let bundles = bundle_dir(&dir.path().join("bundles"), "partner.example", &partner);
    let url = |mesh: &Mesh| format!("http://{}:{}/{}", mesh.b_ip, APP_PORT, APP_FILE);

    // The attacker calls: A is the attacker (its ca.crt trusts both CAs, to accept B), B is ours.
    let attacker = Pod {
        id: CLIENT_ID,
        trusts: &[&partner, &ours],
        args: &["--outbound-mtls", "strict"],
        env: &[],
    };
    let victim = Pod {
        id: SERVER_ID,
        trusts: &[&ours],
        args: &["--inbound-mtls", "strict", "--trust-bundles", &bundles],
        env: &[],
    };
    let Some(mesh) = pods(test, attacker, victim) else {
        return;
    };
    let refused = mesh.curl_in_a("1000", &[&url(&mesh)]);
    assert!(refused.is_err(), "the attacker got through: {refused:?}");
    let line = logged(
        &mesh,
        "b",
        &[
            "HBONE handshake refused",
            "error=tls_wrong_trust_domain",
            "fault=peer",
        ],
    );
    assert!(
        line.contains("signed by a CA of trust domain partner.example"),
        "{line}"
    );
    assert_eq!(refusals(&mesh, "b", "inbound", "wrong_trust_domain"), 1.0);
    let refused = mesh.record("b", "inbound");
    assert_eq!(
        refused["error"], "tls_wrong_trust_domain",
        "the refusal's record: {refused}"
    );
    assert_eq!(
        forwarded(&mesh, "b"),
        Vec::<String>::new(),
        "nothing reached B's app"
    );
    let outbound = mesh.record("a", "outbound");
    assert_eq!(outbound["error"], "tls_refused_by_peer", "{outbound}");
    assert_eq!(outbound["fault"], "peer", "{outbound}");
    drop(mesh);

    // The attacker serves: A is ours (with the partner's bundle), B the attacker.
    let victim = Pod {
        id: CLIENT_ID,
        trusts: &[&ours],
        args: &["--outbound-mtls", "strict", "--trust-bundles", &bundles],
        env: &[],
    };
    let attacker = Pod {
        id: SERVER_ID,
        trusts: &[&partner, &ours],
        args: &[],
        env: &[],
    };
    let Some(mesh) = pods(test, victim, attacker) else {
        return;
    };
    let refused = mesh.curl_in_a("1000", &[&url(&mesh)]);
    assert!(
        refused.is_err(),
        "A used the attacker's server: {refused:?}"
    );
    let outbound = mesh.record("a", "outbound");
    assert_eq!(outbound["error"], "tls_wrong_trust_domain", "{outbound}");
    assert_eq!(outbound["fault"], "peer", "{outbound}");
    assert!(outbound.get("peer").is_none(), "{outbound}");
    logged(
        &mesh,
        "a",
        &[
            "outbound connection reset",
            "error=tls_wrong_trust_domain",
            "fault=peer",
        ],
    );
    assert_eq!(refusals(&mesh, "a", "outbound", "wrong_trust_domain"), 1.0);
    assert_eq!(
        forwarded(&mesh, "b"),
        Vec::<String>::new(),
        "nothing reached B's app"
    );
}

/// A pod of a partner trust domain calls ours, its server pinned with the inline form
/// (`AMAZING_PROXY_PEER_IDENTITIES_INLINE`, as `inject` writes it): B's policy decides, reloaded
/// between calls: `cluster-authenticated` refuses it, `all-authenticated` and a `trustDomains`
/// rule admit it, and B's log names the partner's identity.
#[test]
fn a_partner_pod_is_admitted_by_all_authenticated_and_trust_domains_only() {
    let test = "a_partner_pod_is_admitted_by_all_authenticated_and_trust_domains_only";
    let ours = Ca::new("mesh CA");
    let partner = Ca::new("partner CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let partner_bundle = bundle_dir(&dir.path().join("bundles"), "partner.example", &partner);
    let our_bundle = bundle_dir(&dir.path().join("ours"), "cluster.local", &ours);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "default: cluster-authenticated\n").expect("write");
    let policy_flag = policy.display().to_string();
    let pin = format!("198.18.0.0/15 {SERVER_ID}");
    let a = Pod {
        id: PARTNER_ID,
        trusts: &[&partner],
        args: &[
            "--trust-domain",
            "partner.example",
            "--trust-bundles",
            &our_bundle,
            "--outbound-mtls",
            "strict",
        ],
        // As the injected sidecar gets it from amazing-proxy.io/peer-identities.
        env: &[("AMAZING_PROXY_PEER_IDENTITIES_INLINE", &pin)],
    };
    let b = Pod {
        id: SERVER_ID,
        trusts: &[&ours],
        args: &["--trust-bundles", &partner_bundle, "--policy", &policy_flag],
        env: &[],
    };
    let Some(mesh) = pods(test, a, b) else {
        return;
    };
    let url = format!("http://{}:{}/{}", mesh.b_ip, APP_PORT, APP_FILE);
    assert!(
        mesh.curl_in_a("1000", &[&url]).is_err(),
        "cluster-authenticated admitted a partner"
    );
    logged(
        &mesh,
        "b",
        &["spiffe://partner.example/ns/shop/sa/frontend may not connect to port 8080"],
    );

    // Each policy's verdict differs from the one before, so each wait sees its reload.
    let refusing = |rule: &str| {
        format!("default: deny\nports:\n  - port: {APP_PORT}\n    allow:\n      - {rule}\n")
    };
    for (rules, admitted) in [
        ("default: all-authenticated\n".to_string(), true),
        (refusing("namespaces: [shop]"), false),
        (refusing("trustDomains: [partner.example]"), true),
    ] {
        std::fs::write(&policy, &rules).expect("rewrite the policy");
        support::eventually_blocking(&format!("{rules} in force"), WAIT, || {
            match mesh.curl_in_a("1000", &[&url]) {
                Ok(_) if admitted => Ok(()),
                Err(_) if !admitted => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }
    let log = mesh.read("b-proxy.log");
    for reason in [
        " (default cluster-authenticated)",
        ": no rule of the port allows it",
    ] {
        let refusal = format!("{PARTNER_ID} may not connect to port {APP_PORT}{reason}");
        assert!(log.contains(&refusal), "no `{refusal}` in B's log:\n{log}");
    }
    let inbound = mesh.record("b", "inbound");
    assert_eq!(inbound["peer"], PARTNER_ID, "{inbound}");
    // A's records: refused calls (no peer) and tunnelled ones, which name B.
    let outbound = support::tools::json_records(&mesh.read("a-access.log"));
    assert!(
        outbound.iter().any(|r| r["peer"] == SERVER_ID),
        "{outbound:?}"
    );
}

/// `--outbound-mtls strict` with a pin: a server with another valid identity of our trust domain
/// is refused, logged as the peer's fault with the check that refused it.
#[test]
fn strict_with_a_pin_refuses_another_identity_of_our_domain() {
    let test = "strict_with_a_pin_refuses_another_identity_of_our_domain";
    let dir = tempfile::tempdir().expect("temp dir");
    let peers = dir.path().join("peers");
    std::fs::write(
        &peers,
        "198.18.0.0/15 spiffe://cluster.local/ns/shop/sa/payments\n",
    )
    .expect("write");
    let peers = peers.display().to_string();
    let a: &[&str] = &["--outbound-mtls", "strict", "--peer-identities", &peers];
    let Some(mesh) = mesh(test, (CLIENT_ID, a), (SERVER_ID, &[])) else {
        return;
    };
    let url = format!("http://{}:{}/{}", mesh.b_ip, APP_PORT, APP_FILE);
    assert!(
        mesh.curl_in_a("1000", &[&url]).is_err(),
        "A used an unexpected server"
    );
    let outbound = mesh.record("a", "outbound");
    assert_eq!(outbound["error"], "tls_unexpected_identity", "{outbound}");
    assert_eq!(outbound["fault"], "peer", "{outbound}");
    let line = logged(&mesh, "a", &["outbound connection reset", "fault=peer"]);
    assert!(
        line.contains("the server is spiffe://cluster.local/ns/shop/sa/backend, expected spiffe://cluster.local/ns/shop/sa/payments"),
        "{line}"
    );
    assert_eq!(refusals(&mesh, "a", "outbound", "unexpected_identity"), 1.0);
    assert_eq!(
        forwarded(&mesh, "b"),
        Vec::<String>::new(),
        "nothing reached B's app"
    );
}

/// The records of `pod`'s access log for traffic that reached its app (refused connections leave
/// a record too, with no upstream).
fn forwarded(mesh: &Mesh, pod: &str) -> Vec<String> {
    mesh.read(&format!("{pod}-access.log"))
        .lines()
        .filter(|line| !line.contains("\"upstream\":\"-\""))
        .map(str::to_owned)
        .collect()
}
