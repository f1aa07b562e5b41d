//! `amazing-proxy inject` end to end: the real binary on every fixture in tests/fixtures/inject/,
//! compared with tests/golden/inject/, re-injected to check idempotency, and validated against the
//! Kubernetes schema with `kubernetes-validate` (as is everything in deploy/, and what
//! `amazing-proxy install` prints).
//!
//! `UPDATE_GOLDENS=1 cargo test` rewrites the goldens from the current output.
//! kubernetes-validate is found through `AMAZING_PROXY_KUBERNETES_VALIDATE`, then
//! `$AMAZING_PROXY_TEST_VENV/bin`, then `PATH`; the tests fail if it is nowhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::golden;
use crate::support::process::{bin, run_with_input};
use serde_json::Value;

const FIXTURES: &str = "tests/fixtures/inject";
const GOLDENS: &str = "tests/golden/inject";
/// The oldest and newest Kubernetes schemas kubernetes-validate ships that have native sidecars GA.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];
/// The oldest and newest that have Pod Certificates (`podCertificate` projected volume sources:
/// kubernetes-validate 1.37's schemas have them from 1.34 on, not in 1.33).
const POD_CERTIFICATE_VERSIONS: [&str; 2] = ["1.34.0", "1.37.0"];

struct Case {
    fixture: &'static str,
    args: &'static [&'static str],
    /// Strict validation rejects unknown fields, which one fixture keeps on purpose.
    strict: bool,
    /// The Kubernetes schemas the output is validated against.
    kubernetes: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        fixture: "pod.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "deployment.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "statefulset.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "daemonset.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "replicaset.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "job.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "cronjob.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "multi-doc.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "list.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "deployment.json",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "annotations-all.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "disable-outbound.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "legacy-sidecar.yaml",
        args: &["--legacy-sidecar"],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "flags.yaml",
        args: &[
            "--image=registry.example.com/amazing-proxy:dev",
            "--inbound-ports=80",
            "--exclude-inbound-ports=9100",
            "--exclude-outbound-ports=3306",
            "--exclude-outbound-cidrs=169.254.169.254/32",
            "--opaque-ports=3306",
            "--access-log=off",
            "--drain-delay=2s",
            "--proxy-cpu-request=5m",
            "--proxy-memory-request=",
            "--proxy-cpu-limit=200m",
            "--proxy-memory-limit=64Mi",
        ],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "opted-out.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "passthrough.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "unknown-fields.yaml",
        args: &[],
        strict: false,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "reinject.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "named-ports.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "identity-csi-spiffe.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "identity-pod-certificate.yaml",
        args: &[],
        strict: true,
        kubernetes: &POD_CERTIFICATE_VERSIONS,
    },
    Case {
        fixture: "identity-spire.yaml",
        args: &["--identity=spire"],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "peer-identities.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
    Case {
        fixture: "routes.yaml",
        args: &[],
        strict: true,
        kubernetes: &KUBERNETES_VERSIONS,
    },
];

const ERROR_CASES: &[&str] = &[
    "err-not-kubernetes.yaml",
    "err-port-conflict.yaml",
    "err-name-taken.yaml",
    "err-bad-annotation.yaml",
    "err-inbound-excluded.yaml",
    "err-yaml-syntax.yaml",
    "err-identity-signer.yaml",
    "err-proxy-uid.yaml",
    "err-proxy-gid-pod.yaml",
    "err-routes-name.yaml",
];

/// Runs the binary with a time bound; `stdin` is fed to it.
fn run(args: &[&str], stdin: &[u8]) -> Output {
    run_with_input(Command::new(bin()).args(args), stdin)
}

fn inject(fixture_path: &str, args: &[&str]) -> Output {
    let mut all = vec!["inject", "-f", fixture_path];
    all.extend_from_slice(args);
    run(&all, b"")
}

/// How files are validated: strictly or not, against which Kubernetes versions.
type Validation = (bool, &'static [&'static str]);

/// Compares with the golden file, or rewrites it under `UPDATE_GOLDENS=1`.
fn check_golden(name: &str, actual: &str) {
    golden::check(GOLDENS, name, actual);
}

fn golden_name(fixture: &str) -> String {
    golden_name_for(fixture, "out")
}

/// `pod.yaml` -> `pod.{what}.yaml`
fn golden_name_for(fixture: &str, what: &str) -> String {
    match fixture.rsplit_once('.') {
        Some((stem, ext)) => format!("{stem}.{what}.{ext}"),
        None => format!("{fixture}.{what}"),
    }
}

/// The documents of a YAML or JSON stream, to compare content regardless of layout.
fn documents(text: &str) -> Vec<Value> {
    if text.trim_start().starts_with('{') {
        serde_json::Deserializer::from_str(text)
            .into_iter()
            .map(|d| d.expect("JSON"))
            .collect()
    } else {
        serde_saphyr::from_multiple(text).expect("YAML")
    }
}

fn utf8(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

#[test]
fn goldens_idempotent_and_valid() {
    let validate_dir = tempfile::tempdir().expect("temp dir");
    let mut groups: Vec<(Validation, Vec<PathBuf>)> = Vec::new();
    for case in CASES {
        let path = format!("{FIXTURES}/{}", case.fixture);
        let out = inject(&path, case.args);
        let stdout = utf8(&out.stdout);
        assert!(
            out.status.success(),
            "inject {} failed: {}",
            case.fixture,
            utf8(&out.stderr)
        );
        check_golden(&golden_name(case.fixture), &stdout);

        // inject(inject(x)) == inject(x), through stdin this time.
        let mut args = vec!["inject"];
        args.extend_from_slice(case.args);
        let again = run(&args, stdout.as_bytes());
        assert!(
            again.status.success(),
            "re-injecting {} failed: {}",
            case.fixture,
            utf8(&again.stderr)
        );
        assert!(
            utf8(&again.stdout) == stdout,
            "re-injecting {} changed it:\n{}",
            case.fixture,
            utf8(&again.stdout)
        );

        let files = split_for_validation(&stdout, case.fixture, validate_dir.path());
        let how = (case.strict, case.kubernetes);
        match groups.iter_mut().find(|(h, _)| *h == how) {
            Some((_, group)) => group.extend(files),
            None => groups.push((how, files)),
        }
    }
    for ((strict, versions), files) in &groups {
        validate(files, *strict, versions);
    }
}

/// `uninject` removes exactly what `inject` added: uninject(inject(x)) == x for every fixture
/// that was not injected already (and == uninject(x) for the one that was), and the uninjected
/// text is pinned by a golden too.
#[test]
fn uninject_undoes_inject() {
    for case in CASES {
        let path = format!("{FIXTURES}/{}", case.fixture);
        let injected = inject(&path, case.args);
        assert!(injected.status.success(), "inject {}", case.fixture);
        let out = run(&["uninject"], &injected.stdout);
        assert!(
            out.status.success(),
            "uninject {} failed: {}",
            case.fixture,
            utf8(&out.stderr)
        );
        let stdout = utf8(&out.stdout);
        check_golden(&golden_name_for(case.fixture, "uninjected"), &stdout);
        let original = std::fs::read_to_string(&path).expect("fixture");
        let expected = if original.contains("amazing-proxy.io/injected") {
            let once = run(&["uninject", "-f", &path], b"");
            assert!(once.status.success(), "uninject {}", case.fixture);
            documents(&utf8(&once.stdout))
        } else {
            documents(&original)
        };
        assert!(
            documents(&stdout) == expected,
            "uninject(inject({})) differs from the fixture:\n{stdout}",
            case.fixture
        );
        // Uninjecting what is not injected changes nothing.
        let again = run(&["uninject"], stdout.as_bytes());
        assert!(again.status.success(), "uninject twice {}", case.fixture);
        assert_eq!(
            utf8(&again.stdout),
            stdout,
            "uninject twice {}",
            case.fixture
        );
    }
}

#[test]
fn errors_name_the_document_and_field_and_write_nothing() {
    for fixture in ERROR_CASES {
        let out = inject(&format!("{FIXTURES}/{fixture}"), &[]);
        assert!(!out.status.success(), "{fixture} was accepted");
        assert!(
            out.stdout.is_empty(),
            "{fixture} wrote to stdout: {}",
            utf8(&out.stdout)
        );
        let stderr = utf8(&out.stderr);
        assert!(
            stderr.contains(fixture),
            "{fixture}: the error does not name the file: {stderr}"
        );
        check_golden(
            &format!("{}.err.txt", fixture.trim_end_matches(".yaml")),
            &stderr,
        );
    }
}

#[test]
fn stdin_with_and_without_dash() {
    let input = std::fs::read(format!("{FIXTURES}/pod.yaml")).expect("fixture");
    let from_file = inject(&format!("{FIXTURES}/pod.yaml"), &[]);
    for args in [&["inject"][..], &["inject", "-f", "-"][..]] {
        let out = run(args, &input);
        assert!(out.status.success(), "{args:?}: {}", utf8(&out.stderr));
        assert_eq!(out.stdout, from_file.stdout, "{args:?}");
    }
    let missing = inject("tests/fixtures/inject/no-such-file.yaml", &[]);
    assert!(!missing.status.success());
    assert!(utf8(&missing.stderr).contains("cannot read tests/fixtures/inject/no-such-file.yaml"));
}

#[test]
fn skipped_pods_are_reported_on_stderr() {
    let out = inject(&format!("{FIXTURES}/opted-out.yaml"), &[]);
    assert!(out.status.success());
    let stderr = utf8(&out.stderr);
    for doc in [
        "document 1 (Pod \"by-annotation\")",
        "document 2 (Deployment \"by-label\")",
        "document 3 (DaemonSet \"host-network\")",
    ] {
        assert!(stderr.contains(doc), "{doc} not reported: {stderr}");
    }
    let input = std::fs::read_to_string(format!("{FIXTURES}/opted-out.yaml")).expect("fixture");
    assert_eq!(
        documents(&input),
        documents(&utf8(&out.stdout)),
        "opted-out documents changed"
    );
}

#[test]
fn deploy_manifests_are_valid() {
    let mut files = Vec::new();
    collect_yaml(Path::new("deploy"), &mut files);
    assert!(
        files.iter().any(|f| f.ends_with("pod.yaml")),
        "deploy/pod.yaml missing"
    );
    validate(&files, true, &KUBERNETES_VERSIONS);
}

/// deploy/pod.yaml is what the injector writes for the tutorial's pod.
#[test]
fn deploy_pod_is_the_injected_tutorial_pod() {
    let injected = inject(&format!("{FIXTURES}/pod.yaml"), &[]);
    let deploy = std::fs::read_to_string("deploy/pod.yaml").expect("deploy/pod.yaml");
    let parse = |text: &str| -> Value { serde_saphyr::from_str(text).expect("YAML") };
    assert_eq!(
        parse(&deploy),
        parse(&utf8(&injected.stdout)),
        "deploy/pod.yaml is not inject(tests/fixtures/inject/pod.yaml)"
    );
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// One file per object, `List`s expanded: kubernetes-validate has no schema for `List` and would
/// only warn, leaving the items unchecked.
fn split_for_validation(text: &str, fixture: &str, dir: &Path) -> Vec<PathBuf> {
    let mut objects = Vec::new();
    for doc in documents(text) {
        match doc.get("items") {
            Some(Value::Array(items))
                if doc["kind"].as_str().is_some_and(|k| k.ends_with("List")) =>
            {
                objects.extend(items.clone())
            }
            _ if doc.is_null() => {}
            _ => objects.push(doc),
        }
    }
    objects
        .iter()
        .enumerate()
        .map(|(i, object)| {
            let path = dir.join(format!("{}-{i}.json", fixture.replace('.', "-")));
            std::fs::write(&path, serde_json::to_vec_pretty(object).expect("JSON")).expect("write");
            path
        })
        .collect()
}

fn kubernetes_validate() -> PathBuf {
    if let Some(path) = std::env::var_os("AMAZING_PROXY_KUBERNETES_VALIDATE") {
        return PathBuf::from(path);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(venv) = std::env::var_os("AMAZING_PROXY_TEST_VENV") {
        dirs.push(Path::new(&venv).join("bin"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join("kubernetes-validate")).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "kubernetes-validate not found: install it (pip install kubernetes-validate==1.37.0, as scripts/deps.sh does) \
             and put it on PATH or set AMAZING_PROXY_KUBERNETES_VALIDATE to its path"
        )
    })
}

fn validate(files: &[PathBuf], strict: bool, versions: &[&str]) {
    if files.is_empty() {
        return;
    }
    let tool = kubernetes_validate();
    for version in versions {
        let mut cmd = Command::new(&tool);
        cmd.arg("--quiet").arg("--kubernetes-version").arg(version);
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd
            .args(files)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
        let report = format!("{}{}", utf8(&out.stdout), utf8(&out.stderr));
        assert!(
            out.status.success() && !report.contains("ERROR"),
            "kubernetes-validate (Kubernetes {version}, strict: {strict}) rejected:\n{report}"
        );
    }
}

/// `amazing-proxy install` prints deploy/install.yaml, whose cert-manager objects (which have no
/// schema in kubernetes-validate) agree with the objects that use them.
#[test]
fn install_prints_the_bundle_and_its_parts_agree() {
    let out = run(&["install"], b"");
    assert!(out.status.success(), "{}", utf8(&out.stderr));
    let bundle = std::fs::read_to_string("deploy/install.yaml").expect("deploy/install.yaml");
    assert!(
        utf8(&out.stdout) == bundle,
        "`amazing-proxy install` differs from deploy/install.yaml: rebuild"
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&bundle)
        .expect("YAML")
        .into_iter()
        .collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in deploy/install.yaml"))
    };
    let (issuer, cert, deployment, service, config) = (
        find("Issuer"),
        find("Certificate"),
        find("Deployment"),
        find("Service"),
        find("MutatingWebhookConfiguration"),
    );
    let namespace = &find("Namespace")["metadata"]["name"];
    for doc in [issuer, cert, deployment, service] {
        assert_eq!(&doc["metadata"]["namespace"], namespace, "{doc}");
    }
    assert_eq!(
        cert["spec"]["issuerRef"]["name"],
        issuer["metadata"]["name"]
    );
    assert_eq!(cert["spec"]["issuerRef"]["kind"], "Issuer");
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["secret"]["secretName"],
        cert["spec"]["secretName"]
    );
    let service_dns = format!(
        "{}.{}.svc",
        service["metadata"]["name"].as_str().expect("service name"),
        namespace.as_str().expect("namespace name")
    );
    let dns_names = cert["spec"]["dnsNames"].as_array().expect("dnsNames");
    assert!(
        dns_names.iter().any(|n| n == service_dns.as_str()),
        "{dns_names:?}"
    );
    assert_eq!(
        config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        format!(
            "{}/{}",
            namespace.as_str().expect("namespace name"),
            cert["metadata"]["name"].as_str().expect("certificate name")
        )
    );
    for webhook in config["webhooks"].as_array().expect("webhooks") {
        assert_eq!(
            webhook["clientConfig"]["service"]["name"],
            service["metadata"]["name"]
        );
        assert_eq!(webhook["clientConfig"]["service"]["namespace"], *namespace);
    }
}

/// `install --self-signed`: the golden with the generated material blanked out, and valid.
#[test]
fn install_self_signed_golden_and_valid() {
    let out = run(&["install", "--self-signed"], b"");
    assert!(out.status.success(), "{}", utf8(&out.stderr));
    let text = utf8(&out.stdout);
    // The keys, certificates and the CA in the caBundles are new at every run; a long value may
    // continue on more indented lines.
    let mut normalised = String::new();
    let mut generated_indent: Option<usize> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if generated_indent.is_some_and(|key_indent| indent > key_indent) {
            continue;
        }
        generated_indent = None;
        let generated = ["ca.crt: ", "tls.crt: ", "tls.key: ", "caBundle: "]
            .iter()
            .find(|key| trimmed.starts_with(**key));
        match generated {
            Some(key) => {
                normalised.push_str(&format!("{}{key}<generated>\n", &line[..indent]));
                generated_indent = Some(indent);
            }
            None => normalised.push_str(&format!("{line}\n")),
        }
    }
    check_golden("install-self-signed.out.yaml", &normalised);
    let dir = tempfile::tempdir().expect("temp dir");
    validate(
        &split_for_validation(&text, "install-self-signed", dir.path()),
        true,
        &KUBERNETES_VERSIONS,
    );
}
