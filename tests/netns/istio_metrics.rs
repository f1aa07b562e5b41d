//! `--metrics-compat istio` read by a real Prometheus (Debian's `prometheus`, started by the test
//! in pod B's namespace on loopback, scraping B's admin listener every second): pod A's app calls
//! pod B over mutual TLS, and PromQL over Prometheus' HTTP API returns the request rate from
//! workload `frontend` to workload `backend` with Istio's labels, and the count of requests.
//!
//! Needs root, the venv (`support::mesh`) and prometheus (`scripts/deps.sh --tests`); otherwise
//! the test says SKIP.

use serde_json::Value;

use crate::support::identity::{CLIENT_ID, Ca, SERVER_ID};
use crate::support::mesh::{APP_FILE, APP_PORT, Mesh, Pod};
use crate::support::netns::POD_WAIT;
use crate::support::tools::{have, text};
use crate::support::{eventually_blocking, skip};

/// A PromQL query in pod B, against the test's Prometheus: its `data.result`.
fn query(mesh: &Mesh, promql: &str) -> Result<Vec<Value>, String> {
    let out = mesh.ns_b().exec(&[
        "curl",
        "-sS",
        "-m",
        "3",
        "-G",
        "http://127.0.0.1:19090/api/v1/query",
        "--data-urlencode",
        &format!("query={promql}"),
    ]);
    let body = text(&out.stdout);
    let value: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    value["data"]["result"]
        .as_array()
        .cloned()
        .ok_or_else(|| format!("no result: {body}"))
}

/// Pods A (`frontend`) and B (`backend`, exporting Istio's metrics), in strict mutual TLS; `None`
/// after reporting `test` skipped.
fn pods(test: &str) -> Option<Mesh> {
    let ca = Ca::new("mesh CA");
    let strict = ["--outbound-mtls", "strict", "--inbound-mtls", "strict"];
    let b_args = [&strict[..], &["--metrics-compat", "istio"]].concat();
    let pods = [
        Pod {
            id: CLIENT_ID,
            trusts: &[&ca],
            args: &strict,
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
    Mesh::start_pods(pods).map_err(|why| skip(test, &why)).ok()
}

/// Prometheus in pod B, scraping B's admin listener every second, its API on 127.0.0.1:19090.
fn start_prometheus(mesh: &mut Mesh) {
    let config = mesh.path("prometheus.yml");
    std::fs::write(
        &config,
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n\
         scrape_configs:\n  - job_name: pod-b\n    static_configs:\n      \
         - targets: ['127.0.0.1:15000']\n",
    )
    .expect("the Prometheus configuration");
    let (config, data) = (
        format!("--config.file={}", config.display()),
        format!(
            "--storage.tsdb.path={}",
            mesh.path("prometheus-data").display()
        ),
    );
    mesh.spawn_in(
        "b",
        &[
            "prometheus",
            &config,
            &data,
            "--web.listen-address=127.0.0.1:19090",
        ],
        "prometheus.log",
    );
}

/// The first series of `promql` with a positive value, once there is one.
fn positive(mesh: &Mesh, promql: &str) -> Value {
    eventually_blocking("a positive rate", POD_WAIT, || {
        let result = query(mesh, promql)?;
        let found = result.into_iter().find(|s| {
            let value = s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok());
            value.is_some_and(|v| v > 0.0)
        });
        found.ok_or_else(|| {
            format!(
                "none yet: {:?}; the counter: {:?}",
                query(mesh, promql),
                query(mesh, "istio_requests_total[20s]"),
            )
        })
    })
}

#[test]
fn prometheus_sees_the_request_rate_between_two_workloads_with_istios_labels() {
    const TEST: &str =
        "istio_metrics::prometheus_sees_the_request_rate_between_two_workloads_with_istios_labels";
    if !have("prometheus") {
        skip(
            TEST,
            "prometheus is not installed (scripts/deps.sh --tests installs Debian's package)",
        );
        return;
    }
    let Some(mut mesh) = pods(TEST) else { return };
    start_prometheus(&mut mesh);
    // One request makes the series; once Prometheus has scraped it, the rest raise it across
    // several scrapes (a series first seen at its final value has no rate).
    let url = format!("http://{}:{APP_PORT}/{APP_FILE}", mesh.b_ip);
    let call = |mesh: &Mesh| {
        mesh.curl_in_a("1000", &[&url])
            .unwrap_or_else(|e| panic!("curl in pod A: {e}\n{}", mesh.read("b-proxy.log")))
    };
    call(&mesh);
    eventually_blocking("Prometheus to scrape the first request", POD_WAIT, || {
        let result = query(&mesh, "istio_requests_total")
            .map_err(|e| format!("{e}\n{}", mesh.read("prometheus.log")))?;
        if result.is_empty() {
            Err("not yet".to_string())
        } else {
            Ok(())
        }
    });
    const REQUESTS: usize = 30;
    for _ in 1..REQUESTS {
        call(&mesh);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let series = positive(
        &mesh,
        "sum by (reporter, source_workload, source_workload_namespace, source_principal, \
         destination_workload, destination_workload_namespace, destination_principal, \
         response_code, request_protocol, connection_security_policy) \
         (rate(istio_requests_total[15s]))",
    );
    let labels = &series["metric"];
    for (name, want) in [
        ("reporter", "destination"),
        ("source_workload", "frontend"),
        ("source_workload_namespace", "shop"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "backend"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", SERVER_ID),
        ("response_code", "200"),
        ("request_protocol", "http"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(labels[name], want, "{name} in {series}");
    }
    let total = "sum(istio_requests_total{source_workload=\"frontend\",\
                 destination_workload=\"backend\",response_code=\"200\"})";
    eventually_blocking("every request counted", POD_WAIT, || {
        let result = query(&mesh, total)?;
        let count = result
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if count == Some(REQUESTS as f64) {
            Ok(())
        } else {
            Err(format!("{count:?} of {REQUESTS}"))
        }
    });
}
