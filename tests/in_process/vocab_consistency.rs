//! One vocabulary: every value `inject` accepts (as an annotation or as a flag), the injected pod's
//! `init` and `run` accept too, so an injected pod never fails at start on a value `kubectl apply`
//! took. Property-style over a table of values, valid and not: each one `inject` accepts is
//! injected, and the environment it writes into the init container and the sidecar is parsed by
//! `init`'s and `run`'s own clap parsers (each variable turned into the flag that reads it) and
//! then checked the way each job checks it at start (`Policy::new`, `RunArgs::validate`).

use amazing_proxy::config::RunArgs;
use amazing_proxy::inject::InjectDefaults;
use amazing_proxy::inject::patch::{INIT_NAME, Options, Outcome, SIDECAR_NAME, inject_object};
use amazing_proxy::netfilter::InitArgs;
use amazing_proxy::netfilter::rules::Policy;
use clap::{CommandFactory, Parser};
use serde_json::{Value, json};

#[derive(Parser)]
struct InitCli {
    #[command(flatten)]
    init: InitArgs,
}

#[derive(Parser)]
struct RunCli {
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Parser)]
struct InjectCli {
    #[command(flatten)]
    defaults: InjectDefaults,
}

/// Annotation (and, unless `app-port` or `disable-outbound`, flag) names with values to try.
const VALUES: &[(&str, &[&str])] = &[
    (
        "inbound-ports",
        &["80", "443, 80,80", "", "0", "65536", "http", "80,,81", "-1"],
    ),
    ("exclude-inbound-ports", &["9100", "1,65535", "0", "9100,x"]),
    ("exclude-outbound-ports", &["3306, 5432", "", "70000"]),
    (
        "exclude-outbound-cidrs",
        &[
            "10.0.0.0/8",
            "10.1.2.3/8",
            "1.2.3.4",
            "169.254.169.254/32",
            "fd00::/8",
            "fd00::1/8",
            "::1",
            "0.0.0.0/0",
            "10.0.0.0/33",
            "10.0.0.0/8, fd00::/8,10.0.0.0/8",
            "banana",
            "10.0.0.0/8,",
        ],
    ),
    ("opaque-ports", &["3306", "5432,3306", "0"]),
    (
        "app-port",
        &["8080", "9090", "0", "8000", "15000", "15001", "x"],
    ),
    ("access-log", &["seed", "json", "off", "yes", "JSON"]),
    (
        "drain-delay",
        &[
            "0s",
            "5s",
            "500ms",
            "1h",
            "1m 30s",
            "61m",
            "2h",
            "-1s",
            "5 parsecs",
            "1y",
        ],
    ),
    ("disable-outbound", &["true", "false", "yes"]),
];

fn pod(annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "grpc-api", "containerPort": 9090},
            {"name": "metrics", "containerPort": 9100}]}]}})
}

fn default_options() -> Options {
    InjectCli::parse_from(["inject"]).defaults.options()
}

/// The container named `name` among the pod's init containers and containers.
fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| pod["spec"][key].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {pod}"))
}

/// A container's environment as the command line of the job it runs: each variable becomes the
/// flag that reads it, found through clap's own metadata, so a variable nobody reads fails here.
fn as_args(container: &Value, command: &clap::Command, job: &str) -> Vec<String> {
    let mut args = vec![job.to_string()];
    for var in container["env"].as_array().expect("env") {
        let (name, value) = (
            var["name"].as_str().expect("name"),
            var["value"].as_str().expect("value"),
        );
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .unwrap_or_else(|| panic!("{job} has no option for {name}, which inject writes"));
        let long = arg.get_long().expect("long flag");
        if arg.get_action().takes_values() {
            args.push(format!("--{long}={value}"));
        } else {
            assert!(
                value == "true" || value == "false",
                "{name}={value}: not a boolean"
            );
            if value == "true" {
                args.push(format!("--{long}"));
            }
        }
    }
    args
}

/// Starts `init` and `run` as far as their checks go, on what inject wrote.
fn check_pod_starts(injected: &Value, what: &str) {
    let init_args = as_args(container(injected, INIT_NAME), &InitCli::command(), "init");
    let init = InitCli::try_parse_from(&init_args)
        .unwrap_or_else(|e| panic!("{what}: init refuses {init_args:?}: {e}"))
        .init;
    for ipv6 in [false, true] {
        Policy::new(&init.policy_options(), ipv6)
            .unwrap_or_else(|e| panic!("{what}: init refuses {init_args:?}: {e}"));
    }
    let run_args = as_args(container(injected, SIDECAR_NAME), &RunCli::command(), "run");
    let run = RunCli::try_parse_from(&run_args)
        .unwrap_or_else(|e| panic!("{what}: run refuses {run_args:?}: {e}"))
        .run;
    run.validate()
        .unwrap_or_else(|e| panic!("{what}: run refuses {run_args:?}: {e}"));
}

#[test]
fn every_annotation_inject_accepts_starts() {
    let (mut accepted, mut refused) = (0, 0);
    for (key, values) in VALUES {
        for value in *values {
            let what = format!("annotation amazing-proxy.io/{key}: {value:?}");
            let input = pod(json!({ format!("amazing-proxy.io/{key}"): value }));
            match inject_object(&input, &default_options()) {
                Ok((injected, Outcome::Injected)) => {
                    check_pod_starts(&injected, &what);
                    accepted += 1;
                }
                Ok((_, outcome)) => panic!("{what}: {outcome:?}"),
                Err(_) => refused += 1,
            }
        }
    }
    // The table exercises both sides.
    assert!(
        accepted >= 20 && refused >= 20,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn every_flag_inject_accepts_starts() {
    let mut accepted = 0;
    for (key, values) in VALUES {
        if ["app-port", "disable-outbound"].contains(key) {
            continue;
        }
        for value in *values {
            let what = format!("inject --{key}={value:?}");
            let Ok(cli) = InjectCli::try_parse_from(["inject", &format!("--{key}={value}")]) else {
                continue;
            };
            let (injected, outcome) = inject_object(&pod(json!({})), &cli.defaults.options())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(outcome, Outcome::Injected, "{what}");
            check_pod_starts(&injected, &what);
            accepted += 1;
        }
    }
    assert!(accepted >= 20, "{accepted} accepted");
}

/// The bug this vocabulary fixes: inject took `10.1.2.3/8`, init refused it, the pod never
/// started. Now both refuse it and say what to write.
#[test]
fn host_bits_are_refused_by_inject_and_init_alike() {
    let input = pod(json!({"amazing-proxy.io/exclude-outbound-cidrs": "10.1.2.3/8"}));
    let err = inject_object(&input, &default_options())
        .expect_err("inject refuses")
        .to_string();
    assert!(
        err.contains("write the network address `10.0.0.0/8`"),
        "{err}"
    );
    let err = InitCli::try_parse_from(["init", "--exclude-outbound-cidrs=10.1.2.3/8"])
        .err()
        .expect("init refuses")
        .to_string();
    assert!(
        err.contains("write the network address `10.0.0.0/8`"),
        "{err}"
    );
}

/// Container ports named after HTTP reach `run` as its HTTP (and HTTP/2) port lists.
#[test]
fn named_container_ports_become_run_http_ports() {
    let (injected, _) = inject_object(&pod(json!({})), &default_options()).expect("injects");
    let run_args = as_args(
        container(&injected, SIDECAR_NAME),
        &RunCli::command(),
        "run",
    );
    let run = RunCli::try_parse_from(&run_args).expect("run parses").run;
    assert_eq!(run.http_ports.0, [8080, 9090]);
    assert_eq!(run.http2_ports.0, [9090]);
    assert_eq!(run.app.port(), 8080);
}
