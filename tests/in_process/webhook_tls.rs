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

use crate::support::TEST_TIMEOUT;
use crate::support::bounded;
use crate::support::process::{command, run, run_with_input};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

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

/// A TLS connection to `addr` checked for `server_name` against `ca`, offering one ALPN protocol.
async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    server_name: &str,
    alpn: &[u8],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("add CA");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    connector.connect(name, tcp).await
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
    let tls = tls_connect(addr, ca, server_name, b"http/1.1")
        .await
        .expect("TLS handshake");
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

/// Reads what the server sends until it closes the connection (an error counts as closed: a
/// reset, or a TLS alert); `None` if it was still open after `limit`.
async fn until_closed<S>(stream: &mut S, limit: Duration) -> Option<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| got)
}

/// Longer than the webhook's longest timeout (10 s) with room for a busy machine: every wait
/// for the server to close a connection is bounded by it.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Sends `bytes` on a new HTTP/1.1 connection and returns the status and the text of what the
/// webhook answers before it closes the connection (which it must, within [`CLOSE_WAIT`]).
async fn until_answered_and_closed(
    mut tls: TlsStream<TcpStream>,
    bytes: &[u8],
) -> (Option<u16>, String) {
    tls.write_all(bytes).await.expect("write");
    tls.flush().await.expect("flush");
    let answer = until_closed(&mut tls, CLOSE_WAIT)
        .await
        .expect("the webhook closes the connection");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    (status, text)
}

/// A pod review on a new connection, required to be answered 200 with a patch.
async fn reviewed(addr: SocketAddr, ca: &Ca, uid: &str, pod: &Value) {
    let reply = send(addr, &ca.der(), "POST", "/mutate", pod_review(uid, pod)).await;
    let body = String::from_utf8_lossy(&reply.body).into_owned();
    assert_eq!(reply.status, 200, "{uid}: {body}");
    assert_eq!(reply.json()["response"]["patchType"], "JSONPatch", "{uid}");
}

/// Kinds of slow client in the flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slow {
    /// TCP only: never sends its ClientHello.
    Handshake,
    /// HTTP/1.1: half a request head, then nothing.
    Head,
    /// HTTP/1.1: a whole head announcing a body, then a byte now and then.
    Body,
    /// HTTP/2: the preface, then no request.
    Http2,
}

/// A slow client's connection: its reading half, and for a trickled body the task writing it.
struct SlowClient {
    kind: Slow,
    reader: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    trickle: Option<tokio::task::JoinHandle<()>>,
}

/// Opens a slow client; `None` when the webhook closed it already (shed to make room).
async fn slow_client(addr: SocketAddr, ca: &Ca, kind: Slow) -> Option<SlowClient> {
    let (alpn, first): (&[u8], &[u8]) = match kind {
        Slow::Handshake => {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let reader = Box::new(tcp);
            return Some(SlowClient {
                kind,
                reader,
                trickle: None,
            });
        }
        Slow::Head => (
            b"http/1.1",
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Ty",
        ),
        Slow::Body => (
            b"http/1.1",
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n{",
        ),
        Slow::Http2 => (b"h2", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    };
    let mut tls = tls_connect(addr, &ca.der(), "localhost", alpn).await.ok()?;
    tls.write_all(first).await.ok()?;
    tls.flush().await.ok()?;
    let (reader, mut writer) = tokio::io::split(tls);
    let trickle = (kind == Slow::Body).then(|| {
        tokio::spawn(async move {
            // Until the webhook closes the connection (the write fails) or the test ends.
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
        })
    });
    Some(SlowClient {
        kind,
        reader: Box::new(reader),
        trickle,
    })
}

/// A flood of slow clients, three times `--max-connections`, each kind in turn: reviews and
/// probes on new connections are still answered while it lasts, and every flood connection is
/// closed by the webhook (shed to make room, or timed out), none left open.
#[tokio::test]
async fn a_slow_client_flood_neither_locks_reviews_out_nor_stays() {
    bounded("test", TEST_TIMEOUT, async {
        const LIMIT: usize = 16;
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let server = start(dir.path(), &[&format!("--max-connections={LIMIT}")]);
        let kinds = [Slow::Handshake, Slow::Head, Slow::Body, Slow::Http2];
        let mut flood = Vec::new();
        let mut shed_while_connecting = 0;
        for i in 0..3 * LIMIT {
            match slow_client(server.addr, &ca, kinds[i % kinds.len()]).await {
                Some(client) => flood.push(client),
                None => shed_while_connecting += 1,
            }
        }
        for round in 0..3 {
            reviewed(server.addr, &ca, &format!("flooded-{round}"), &tutorial_pod()).await;
            let probe = send(server.addr, &ca.der(), "GET", "/healthz", Vec::new()).await;
            assert_eq!(probe.status, 200, "round {round}");
        }
        let waits = flood.into_iter().map(|mut client| async move {
            let closed = until_closed(&mut client.reader, CLOSE_WAIT).await;
            if let Some(trickle) = client.trickle {
                trickle.abort();
            }
            (client.kind, closed)
        });
        let mut still_open = Vec::new();
        for (kind, closed) in futures_util::future::join_all(waits).await {
            let Some(bytes) = closed else {
                still_open.push(kind);
                continue;
            };
            // Shed connections just close; a trickled body that ran out of time is told so.
            let text = String::from_utf8_lossy(&bytes);
            match kind {
                Slow::Body if !bytes.is_empty() => {
                    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
                }
                // An HTTP/2 server's SETTINGS and GOAWAY frames are not HTTP/1.1 text.
                Slow::Http2 => {}
                _ => assert!(bytes.is_empty(), "{kind:?}: {text}"),
            }
        }
        assert!(
            still_open.is_empty(),
            "left open by the webhook: {still_open:?} ({shed_while_connecting} shed while connecting)"
        );
        reviewed(server.addr, &ca, "after", &tutorial_pod()).await;
    })
    .await;
}

/// The body cap: an AdmissionReview of a pod as large as etcd stores is reviewed; a body
/// announced or sent over 3 MiB gets 413 and the connection closes.
#[tokio::test]
async fn bodies_over_the_cap_get_413_and_large_reviews_fit() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let server = start(dir.path(), &[]);
        let mut big = tutorial_pod();
        big["metadata"]["annotations"] = json!({"example.com/blob": "x".repeat(1536 * 1024)});
        reviewed(server.addr, &ca, "big", &big).await;
        let der = ca.der();
        let connect = || tls_connect(server.addr, &der, "localhost", b"http/1.1");

        let cap = 3 * 1024 * 1024;
        let announced = format!(
            "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            cap + 1
        );
        let tls = connect().await.expect("TLS");
        let (status, text) = until_answered_and_closed(tls, announced.as_bytes()).await;
        assert_eq!(status, Some(413), "{text}");
        assert!(text.contains("larger than 3 MiB"), "{text}");

        // Chunked, so that the size is known only once the bytes are in: cap + 1 of them.
        let mut chunked =
            b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        let mut sent = 0;
        while sent <= cap {
            let len = (64 * 1024).min(cap + 1 - sent);
            chunked.extend_from_slice(format!("{len:x}\r\n").as_bytes());
            chunked.resize(chunked.len() + len, b' ');
            chunked.extend_from_slice(b"\r\n");
            sent += len;
        }
        let tls = connect().await.expect("TLS");
        let (status, text) = until_answered_and_closed(tls, &chunked).await;
        assert_eq!(status, Some(413), "{text}");
    })
    .await;
}

/// A head that announces a body which never comes: 408 once the body's time is up, then closed.
#[tokio::test]
async fn a_body_that_never_comes_times_out_and_closes() {
    bounded("test", TEST_TIMEOUT, async {
        let ca = Ca::new("test-ca");
        let dir = setup(&ca);
        let server = start(dir.path(), &[]);
        let tls = tls_connect(server.addr, &ca.der(), "localhost", b"http/1.1")
            .await
            .expect("TLS");
        let head = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n";
        let (status, text) = until_answered_and_closed(tls, head).await;
        assert_eq!(status, Some(408), "{text}");
        assert!(text.contains("request body not received within"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
    })
    .await;
}
