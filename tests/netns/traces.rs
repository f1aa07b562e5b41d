//! Traces across two pods, decoded by a real OTLP receiver (`tests/fixtures/otlp_receiver.py`, on
//! the OpenTelemetry project's `opentelemetry-proto` package), running in pod B.
//!
//! Pod A's app calls pod B in strict mutual TLS through a route with endpoints, so that A's proxy
//! sees each request (a client span) and carries it in an HBONE stream of its own (a tunnel span).
//! A exports over OTLP/gRPC to B's address (its socket marked, so that A's rules let it out), at
//! sampling 1; B exports over OTLP/HTTP to loopback at sampling 0, so that B's spans exist only
//! because A's decision travelled with the request. One trace holds A's client span and, as its
//! child, B's server span, with the method, route, status and each side's peer identity; the
//! tunnel's two spans are parent and child too, and B's request span links to A's tunnel span.
//!
//! Needs root and the venv with opentelemetry-proto (`scripts/deps.sh --tests`); otherwise SKIP.

use std::process::Command;

use serde_json::Value;

use crate::support::eventually_blocking;
use crate::support::identity::{CLIENT_ID, Ca, SERVER_ID};
use crate::support::mesh::{APP_CONTENT, APP_FILE, APP_PORT, Mesh, Pod, addresses};
use crate::support::netns::POD_WAIT;
use crate::support::process::{bin, run};
use crate::support::skip;
use crate::support::tools::{json_records, text, venv};

const RECEIVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/otlp_receiver.py"
);

/// The venv's python when it has opentelemetry-proto and grpcio.
fn python() -> Result<String, String> {
    let python = venv()?.join("bin/python3");
    let out = run(Command::new(&python).args(["-c", "import grpc, opentelemetry.proto"]));
    if !out.status.success() {
        return Err(format!(
            "opentelemetry-proto and grpcio not in the test venv ({}): run scripts/deps.sh --tests",
            text(&out.stderr).trim()
        ));
    }
    Ok(python.display().to_string())
}

/// The spans received so far.
fn spans(mesh: &Mesh) -> Vec<Value> {
    json_records(&mesh.read("otlp.log"))
        .into_iter()
        .filter(|s| s.get("span_id").is_some())
        .collect()
}

/// The first span `pick` finds, once the receiver has it.
fn span(mesh: &Mesh, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    eventually_blocking(what, POD_WAIT, || {
        spans(mesh).into_iter().find(|s| pick(s)).ok_or_else(|| {
            format!(
                "not yet; received:\n{}\n--- a:\n{}\n--- b:\n{}",
                mesh.read("otlp.log"),
                mesh.read("a-proxy.log"),
                mesh.read("b-proxy.log")
            )
        })
    })
}

/// Pods A and B as the module says, the receiver listening in B, and the directory of A's routes
/// file (kept while A runs: it watches the file); `None` after reporting `test` skipped.
fn mesh_with_receiver(test: &str) -> Option<(Mesh, tempfile::TempDir)> {
    let python = match python() {
        Ok(python) => python,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let [_, b_ip] = addresses();
    let dir = tempfile::tempdir().expect("a temp dir");
    let routes = dir.path().join("routes.yaml");
    std::fs::write(
        &routes,
        format!(
            "outbound:\n  - name: backend\n    match: {{port: {APP_PORT}}}\n    \
             endpoints: {{static: [\"{b_ip}:{APP_PORT}\"]}}\n"
        ),
    )
    .expect("the routes file");
    let routes = routes.display().to_string();
    let collector = format!("http://{b_ip}:4317");
    let ca = Ca::new("mesh CA");
    let strict = ["--outbound-mtls", "strict", "--inbound-mtls", "strict"];
    let a_args = [
        &strict[..],
        &["--routes", &routes, "--otlp-endpoint", &collector],
        &["--trace-sampling", "1", "--pool-idle-timeout", "1s"],
    ]
    .concat();
    let b_args = [
        &strict[..],
        &["--otlp-endpoint", "http://127.0.0.1:4318"],
        &["--otlp-protocol", "http/protobuf", "--trace-sampling", "0"],
    ]
    .concat();
    let pods = [
        Pod {
            id: CLIENT_ID,
            trusts: &[&ca],
            args: &a_args,
            env: &[
                ("POD_NAME", "frontend-7d4f9b6c8-x2x9k"),
                ("POD_NAMESPACE", "shop"),
            ],
        },
        Pod {
            id: SERVER_ID,
            trusts: &[&ca],
            args: &b_args,
            env: &[
                ("POD_NAME", "backend-5f6d7c8b9-qwert"),
                ("POD_NAMESPACE", "shop"),
            ],
        },
    ];
    let mut mesh = match Mesh::start_pods(pods) {
        Ok(mesh) => mesh,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    // The collector in pod B, its gRPC port left out of B's inbound redirection (as a node's
    // collector would be outside the pod).
    let out = mesh
        .ns_b()
        .exec(&[bin(), "init", "--exclude-inbound-ports", "4317"]);
    assert!(
        out.status.success(),
        "init again in pod B: {}",
        text(&out.stderr)
    );
    mesh.spawn_in(
        "b",
        &[&python, RECEIVER, "0.0.0.0:4317", "127.0.0.1:4318"],
        "otlp.log",
    );
    eventually_blocking("the OTLP receiver to listen", POD_WAIT, || {
        let log = mesh.read("otlp.log");
        if log.contains("listening") {
            Ok(())
        } else {
            Err(log)
        }
    });

    Some((mesh, dir))
}

#[test]
fn one_trace_across_two_pods_client_span_parent_of_server_span() {
    const TEST: &str = "traces::one_trace_across_two_pods_client_span_parent_of_server_span";
    let Some((mesh, _routes)) = mesh_with_receiver(TEST) else {
        return;
    };
    let server = request_spans(&mesh);
    tunnel_spans(&mesh, &server);
    counted(&mesh);
}

/// A's client span and B's server span of one request, checked; B's returned.
fn request_spans(mesh: &Mesh) -> Value {
    let [_, b_ip] = addresses();
    let url = format!("http://{b_ip}:{APP_PORT}/{APP_FILE}");
    let body = mesh
        .curl_in_a("1000", &[&url])
        .unwrap_or_else(|e| panic!("curl in pod A: {e}\n{}", mesh.read("a-proxy.log")));
    assert_eq!(body, APP_CONTENT);

    // A's request span: a client span of the route, naming B as its peer.
    let client = span(mesh, "pod A's client span", |s| {
        s["kind"] == "CLIENT" && s["attributes"]["http.request.method"] == "GET"
    });
    let attributes = &client["attributes"];
    assert_eq!(client["name"], "GET backend", "{client}");
    assert_eq!(client["transport"], "grpc", "{client}");
    assert_eq!(attributes["http.route"], "backend", "{client}");
    assert_eq!(attributes["http.response.status_code"], 200, "{client}");
    assert_eq!(attributes["peer.spiffe_id"], SERVER_ID, "{client}");
    assert_eq!(attributes["url.full"], url, "{client}");
    assert_eq!(
        client["parent_span_id"], "",
        "the app sent no context: {client}"
    );
    let resource = &client["resource"];
    assert_eq!(resource["service.name"], "frontend", "{client}");
    assert_eq!(
        resource["k8s.pod.name"], "frontend-7d4f9b6c8-x2x9k",
        "{client}"
    );
    assert_eq!(resource["k8s.namespace.name"], "shop", "{client}");
    assert_eq!(resource["spiffe.id"], CLIENT_ID, "{client}");

    // B's request span: the child of A's, in the same trace, naming A as its peer.
    let server = span(mesh, "pod B's server span", |s| {
        s["kind"] == "SERVER" && s["attributes"]["http.request.method"] == "GET"
    });
    let attributes = &server["attributes"];
    assert_eq!(
        server["trace_id"], client["trace_id"],
        "one trace: {server}"
    );
    assert_eq!(server["parent_span_id"], client["span_id"], "{server}");
    assert_eq!(server["transport"], "http", "{server}");
    assert_eq!(server["name"], "GET", "B has no route: {server}");
    assert_eq!(attributes["http.response.status_code"], 200, "{server}");
    assert_eq!(attributes["url.path"], format!("/{APP_FILE}"), "{server}");
    assert_eq!(attributes["peer.spiffe_id"], CLIENT_ID, "{server}");
    assert_eq!(server["resource"]["service.name"], "backend", "{server}");
    assert_eq!(server["resource"]["spiffe.id"], SERVER_ID, "{server}");

    // The access logs name the same spans.
    let a_record = mesh.record("a", "outbound");
    assert_eq!(a_record["trace_id"], client["trace_id"], "{a_record}");
    assert_eq!(a_record["span_id"], client["span_id"], "{a_record}");
    let b_record = mesh.record("b", "inbound");
    assert_eq!(b_record["span_id"], server["span_id"], "{b_record}");

    server
}

/// The tunnel's spans, checked against B's request span.
fn tunnel_spans(mesh: &Mesh, server: &Value) {
    // The tunnel: A's CONNECT (ended when A's pool let the connection go, after 1 s idle) is the
    // parent of B's, and B's request span links to it.
    let connect_a = span(mesh, "pod A's tunnel span", |s| {
        s["kind"] == "CLIENT" && s["name"] == "CONNECT"
    });
    assert_eq!(
        connect_a["attributes"]["peer.spiffe_id"], SERVER_ID,
        "{connect_a}"
    );
    assert_eq!(
        connect_a["attributes"]["server.port"], APP_PORT,
        "{connect_a}"
    );
    let connect_b = span(mesh, "pod B's tunnel span", |s| {
        s["kind"] == "SERVER" && s["name"] == "CONNECT"
    });
    assert_eq!(connect_b["trace_id"], connect_a["trace_id"], "{connect_b}");
    assert_eq!(
        connect_b["parent_span_id"], connect_a["span_id"],
        "{connect_b}"
    );
    assert_eq!(
        connect_b["attributes"]["peer.spiffe_id"], CLIENT_ID,
        "{connect_b}"
    );
    let link = &server["links"][0];
    assert_eq!(link["trace_id"], connect_a["trace_id"], "{server}");
    assert_eq!(link["span_id"], connect_a["span_id"], "{server}");
}

/// What each pod counted.
fn counted(mesh: &Mesh) {
    // Nothing dropped or failed; what was exported is counted.
    for pod in ["a", "b"] {
        let metrics = mesh.metrics(pod);
        let count = |outcome: &str| {
            crate::support::metrics::metric(
                &metrics,
                "amazing_proxy_trace_spans_total",
                &[&format!("outcome=\"{outcome}\"")],
            )
            .unwrap_or(0.0)
        };
        assert!(count("exported") >= 2.0, "pod {pod}: {metrics}");
        assert_eq!(
            count("dropped") + count("failed"),
            0.0,
            "pod {pod}: {metrics}"
        );
    }
}
