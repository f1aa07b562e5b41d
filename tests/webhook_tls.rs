//! `amazing-proxy webhook` end to end: the real binary on 127.0.0.1 (port 0, the bound address read
//! from its stdout), real AdmissionReview JSON over TLS from a client trusting a test CA made with
//! rcgen. The returned JSONPatch is applied to the pod and the result compared with what
//! `amazing-proxy inject` writes for the same pod. Every test is bounded in time and kills its server.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

mod support;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::TEST_TIMEOUT;
use support::bounded;
use support::process::{command, run, run_with_input};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA cert"),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A serving certificate for localhost: (cert PEM, key PEM, cert DER).
    fn leaf(&self) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }
}

/// Writes like kubelet updates a mounted Secret: a new file renamed over the old one.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, extra: &[&str]) -> Server {
    let mut child = command()
        .arg("webhook")
        .arg("--listen=127.0.0.1:0")
        .arg(format!("--tls-cert={}", dir.join("tls.crt").display()))
        .arg(format!("--tls-key={}", dir.join("tls.key").display()))
        .args(extra)
        .env("AMAZING_PROXY_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the webhook");
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!("the webhook did not report its address within 20s");
        }
    };
    let addr = line
        .trim()
        .strip_prefix("amazing-proxy webhook: listening on https://")
        .and_then(|rest| rest.strip_suffix("/mutate"))
        .and_then(|a| a.parse().ok());
    match addr {
        Some(addr) => Server { child, addr },
        None => {
            let _ = child.kill();
            panic!("unexpected first line from the webhook: {line:?}");
        }
    }
}

fn setup(ca: &Ca) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key, _) = ca.leaf();
    std::fs::write(dir.path().join("tls.crt"), cert).expect("write cert");
    std::fs::write(dir.path().join("tls.key"), key).expect("write key");
    dir
}

struct Reply {
    status: u16,
    body: Vec<u8>,
    peer_cert: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One request on a new TLS connection (so each call is a new handshake) to `localhost`.
async fn send(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Reply {
    send_to(addr, ca, "localhost", method, path, body).await
}

/// The same, checking the server's certificate for `server_name`.
async fn send_to(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    server_name: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Reply {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("add CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let peer_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, server_name)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        body,
        peer_cert,
    }
}

fn review(
    uid: &str,
    namespace: &str,
    kind: (&str, &str, &str),
    resource: &str,
    object: &Value,
) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": kind.0, "version": kind.1, "kind": kind.2},
            "resource": {"group": kind.0, "version": kind.1, "resource": resource},
            "requestKind": {"group": kind.0, "version": kind.1, "kind": kind.2},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "test"},
            "object": object,
            "dryRun": false,
        }
    })
    .to_string()
    .into_bytes()
}

fn pod_review(uid: &str, pod: &Value) -> Vec<u8> {
    review(uid, "default", ("", "v1", "Pod"), "pods", pod)
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("YAML")
}

/// What `amazing-proxy inject` writes for this pod (through stdin, as JSON).
fn inject_cli(pod: &Value, args: &[&str]) -> Value {
    let mut cmd = command();
    cmd.arg("inject").args(args);
    let out = run_with_input(&mut cmd, pod.to_string().as_bytes());
    assert!(out.status.success(), "inject failed");
    serde_json::from_slice(&out.stdout).expect("inject writes JSON for JSON")
}

/// Applies the response's patch to `pod`; `None` if the response carries no patch.
fn apply(response: &Value, pod: &Value) -> Option<Value> {
    let patch = response["response"]["patch"].as_str()?;
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .expect("base64 patch");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("JSONPatch");
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    Some(patched)
}

fn tutorial_pod() -> Value {
    yaml(&std::fs::read_to_string("tests/fixtures/inject/pod.yaml").expect("fixture"))
}

/// The pod template of the fixture with every annotation, as a Pod.
fn annotated_pod() -> Value {
    let deployment = yaml(
        &std::fs::read_to_string("tests/fixtures/inject/annotations-all.yaml").expect("fixture"),
    );
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod"});
    pod["metadata"] = deployment["spec"]["template"]["metadata"].clone();
    pod["metadata"]["generateName"] = json!("everything-");
    pod["spec"] = deployment["spec"]["template"]["spec"].clone();
    pod
}

#[tokio::test]
async fn patch_equals_inject_output() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        for (extra, inject_args) in [
            (&[][..], &[][..]),
            (
                &["--legacy-sidecar", "--access-log=off"][..],
                &["--legacy-sidecar", "--access-log=off"][..],
            ),
        ] {
            let server = start(dir.path(), extra);
            for pod in [tutorial_pod(), annotated_pod()] {
                let reply = send(
                    server.addr,
                    &ca.der(),
                    "POST",
                    "/mutate",
                    pod_review("uid-1", &pod),
                )
                .await;
                assert_eq!(
                    reply.status,
                    200,
                    "{}",
                    String::from_utf8_lossy(&reply.body)
                );
                let answer = reply.json();
                assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
                assert_eq!(answer["kind"], "AdmissionReview");
                assert_eq!(answer["response"]["uid"], "uid-1");
                assert_eq!(answer["response"]["allowed"], true);
                let patched = apply(&answer, &pod).expect("a patch");
                assert_eq!(
                    patched,
                    inject_cli(&pod, inject_args),
                    "webhook and inject disagree for {extra:?}"
                );
                // An already injected pod needs no patch.
                let again = send(
                    server.addr,
                    &ca.der(),
                    "POST",
                    "/mutate",
                    pod_review("uid-2", &patched),
                )
                .await
                .json();
                assert_eq!(again["response"], json!({"uid": "uid-2", "allowed": true}));
            }
        }
    })
    .await;
}

#[tokio::test]
async fn opt_outs_and_other_kinds_are_allowed_unpatched() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let server = start(dir.path(), &["--skip-namespaces=kube-system,amazing-proxy-system"]);
        let mut opted_out = tutorial_pod();
        opted_out["metadata"]["annotations"] = json!({"amazing-proxy.io/inject": "false"});
        let mut labelled = tutorial_pod();
        labelled["metadata"]["labels"]["amazing-proxy.io/inject"] = json!("disabled");
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        let requests = [
            pod_review("a", &opted_out),
            pod_review("b", &labelled),
            review("c", "kube-system", ("", "v1", "Pod"), "pods", &tutorial_pod()),
            review("d", "amazing-proxy-system", ("", "v1", "Pod"), "pods", &tutorial_pod()),
            review("e", "default", ("", "v1", "Service"), "services", &service),
            review("f", "default", ("apps", "v1", "Deployment"), "deployments", &yaml(&std::fs::read_to_string("tests/fixtures/inject/deployment.yaml").expect("fixture"))),
        ];
        for (uid, body) in ["a", "b", "c", "d", "e", "f"].into_iter().zip(requests) {
            let reply = send(server.addr, &ca.der(), "POST", "/mutate", body).await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.json()["response"], json!({"uid": uid, "allowed": true}), "request {uid}");
        }
    })
    .await;
}

#[tokio::test]
async fn injection_errors_warn_or_deny() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let mut clash = tutorial_pod();
        clash["spec"]["containers"][0]["ports"] = json!([{"containerPort": 15001}]);

        let allow = start(dir.path(), &[]);
        let answer = send(
            allow.addr,
            &ca.der(),
            "POST",
            "/mutate",
            pod_review("w", &clash),
        )
        .await
        .json();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(
            answer["response"].get("patch").is_none(),
            "patched despite the error"
        );
        let warning = answer["response"]["warnings"][0]
            .as_str()
            .expect("a warning");
        assert!(
            warning.contains("spec.containers[0].ports[0].containerPort")
                && warning.contains("15001"),
            "{warning}"
        );

        let deny = start(dir.path(), &["--on-error=deny"]);
        let answer = send(
            deny.addr,
            &ca.der(),
            "POST",
            "/mutate",
            pod_review("d", &clash),
        )
        .await
        .json();
        assert_eq!(answer["response"]["uid"], "d");
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"]
            .as_str()
            .expect("a message");
        assert!(
            message.contains("pod default/httpbin") && message.contains("outbound port"),
            "{message}"
        );
    })
    .await;
}

#[tokio::test]
async fn malformed_requests_and_other_routes() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let server = start(dir.path(), &[]);
        let bad = send(
            server.addr,
            &ca.der(),
            "POST",
            "/mutate",
            b"{not json".to_vec(),
        )
        .await;
        assert_eq!(bad.status, 400);
        assert!(String::from_utf8_lossy(&bad.body).contains("not JSON"));
        let no_uid =
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}"#
                .to_vec();
        let bad = send(server.addr, &ca.der(), "POST", "/mutate", no_uid).await;
        assert_eq!(bad.status, 400);
        assert!(String::from_utf8_lossy(&bad.body).contains("request.uid"));
        let wrong_version =
            br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}"#.to_vec();
        assert_eq!(
            send(server.addr, &ca.der(), "POST", "/mutate", wrong_version)
                .await
                .status,
            400
        );
        assert_eq!(
            send(server.addr, &ca.der(), "GET", "/mutate", Vec::new())
                .await
                .status,
            405
        );
        assert_eq!(
            send(server.addr, &ca.der(), "POST", "/validate", Vec::new())
                .await
                .status,
            404
        );
        // The Deployment's probes (deploy/install.yaml).
        for probe in ["/healthz", "/readyz"] {
            let reply = send(server.addr, &ca.der(), "GET", probe, Vec::new()).await;
            assert_eq!(reply.status, 200, "{probe}");
        }
        // Still serving after all that.
        let ok = send(
            server.addr,
            &ca.der(),
            "POST",
            "/mutate",
            pod_review("x", &tutorial_pod()),
        )
        .await;
        assert_eq!(ok.status, 200);
    })
    .await;
}

#[tokio::test]
async fn certificate_is_reloaded_when_the_files_change() {
    bounded("test", TEST_TIMEOUT, async {
        let first_ca = Ca::new("first-ca");
        let dir = setup(&first_ca);
        let server = start(dir.path(), &[]);
        let before = send(
            server.addr,
            &first_ca.der(),
            "POST",
            "/mutate",
            pod_review("1", &tutorial_pod()),
        )
        .await;
        assert_eq!(before.status, 200);

        // A broken pair is refused and the old certificate kept.
        replace(&dir.path().join("tls.crt"), "not a certificate");
        let during = send(
            server.addr,
            &first_ca.der(),
            "POST",
            "/mutate",
            pod_review("2", &tutorial_pod()),
        )
        .await;
        assert_eq!(during.peer_cert, before.peer_cert);

        let second_ca = Ca::new("second-ca");
        let (cert, key, der) = second_ca.leaf();
        replace(&dir.path().join("tls.key"), &key);
        replace(&dir.path().join("tls.crt"), &cert);
        let after = send(
            server.addr,
            &second_ca.der(),
            "POST",
            "/mutate",
            pod_review("3", &tutorial_pod()),
        )
        .await;
        assert_eq!(after.status, 200);
        assert_eq!(
            after.peer_cert, der,
            "the new handshake did not present the new certificate"
        );
    })
    .await;
}

#[test]
fn bad_certificate_files_fail_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("tls.crt"), "nothing").expect("write");
    std::fs::write(dir.path().join("tls.key"), "nothing").expect("write");
    // A webhook that started anyway would run until the bound and fail the test.
    let out = run(command()
        .args(["webhook", "--listen=127.0.0.1:0"])
        .arg(format!(
            "--tls-cert={}",
            dir.path().join("tls.crt").display()
        ))
        .arg(format!(
            "--tls-key={}",
            dir.path().join("tls.key").display()
        )));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load the TLS certificate") && stderr.contains("--tls-cert"),
        "{stderr}"
    );
}

/// `amazing-proxy install --self-signed`: the Secret's certificate and key serve the Service's DNS
/// name to a client that trusts only the caBundle, as the API server does.
#[tokio::test]
async fn self_signed_install_material_is_trusted_through_the_ca_bundle() {
    bounded("test", TEST_TIMEOUT, async {
        let out = command()
            .args(["install", "--self-signed"])
            .output()
            .expect("run install");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("UTF-8");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        let decode = |v: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64 text"))
                .expect("base64")
        };
        let secret = docs
            .iter()
            .find(|d| d["kind"] == "Secret")
            .expect("a Secret");
        let config = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .expect("the webhook configuration");
        let ca_pem = decode(&config["webhooks"][0]["clientConfig"]["caBundle"]);
        let ca = CertificateDer::from_pem_slice(&ca_pem).expect("caBundle is a PEM certificate");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("tls.crt"),
            decode(&secret["data"]["tls.crt"]),
        )
        .expect("write cert");
        std::fs::write(
            dir.path().join("tls.key"),
            decode(&secret["data"]["tls.key"]),
        )
        .expect("write key");
        let server = start(dir.path(), &[]);
        let service = config["webhooks"][0]["clientConfig"]["service"].clone();
        let name = format!(
            "{}.{}.svc",
            service["name"].as_str().expect("service name"),
            service["namespace"].as_str().expect("service namespace")
        );
        let ready = send_to(server.addr, &ca, &name, "GET", "/readyz", Vec::new()).await;
        assert_eq!(ready.status, 200);
        let review = send_to(
            server.addr,
            &ca,
            &name,
            "POST",
            "/mutate",
            pod_review("u", &tutorial_pod()),
        )
        .await;
        assert_eq!(review.status, 200);
        assert_eq!(review.json()["response"]["patchType"], "JSONPatch");
    })
    .await;
}
