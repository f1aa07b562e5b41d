//! Containment (issue 17) in network namespaces: what a hostile workload tries against a sidecar,
//! and what it gets. Two pods, the client pod holding a valid certificate of the mesh, try to reach
//! what pod B serves only to itself (a service bound to loopback, the proxy's admin port) and to get
//! around B's per-port policy (by dialling the inbound port itself); a peer that routes other
//! destinations through B reaches neither. The same issue's checks of the proxy alone are in the
//! in-process suite's `containment`. Every check here failed on the code before these rules existed;
//! none asserts a time.

use crate::support;
use crate::support::identity::Ca;
use crate::support::mesh::{APP_CONTENT, APP_FILE, APP_PORT, Mesh};
use crate::support::netns::Netns;
use crate::support::{WAIT, eventually_blocking};

const ATTACKER_ID: &str = "spiffe://cluster.local/ns/shop/sa/attacker";
const VICTIM_ID: &str = "spiffe://cluster.local/ns/shop/sa/backend";
/// A debug server pod B binds to loopback only, and what it would leak.
const LOOPBACK_PORT: u16 = 9090;
const SECRET: &str = "loopback-only secret\n";

/// Pod B's debug server: bound to 127.0.0.1 only, serving `SECRET`.
fn serve_loopback_secret(mesh: &mut Mesh) {
    let root = mesh.path("secret-root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("secret.txt"), SECRET).expect("write");
    let python = support::tools::venv()
        .expect("the venv")
        .join("bin/python3");
    let port = LOOPBACK_PORT.to_string();
    let root = root.display().to_string();
    let python = python.display().to_string();
    let server = [
        &python,
        "-m",
        "http.server",
        &port,
        "--bind",
        "127.0.0.1",
        "--directory",
        &root,
    ];
    mesh.spawn_in("b", &server, "secret.log");
    eventually_blocking("the loopback-only server", WAIT, || {
        let url = format!("http://127.0.0.1:{LOOPBACK_PORT}/secret.txt");
        let out = mesh.ns_b().exec(&["curl", "-fsS", "-m", "1", &url]);
        (String::from_utf8_lossy(&out.stdout) == SECRET)
            .then_some(())
            .ok_or_else(|| mesh.read("secret.log"))
    });
}

/// Pod A (the attacker: a valid identity of the mesh) against pod B, whose policy lets any
/// authenticated peer reach its app port and no one else, and whose loopback-only debug server and
/// admin port must stay the pod's own. Through A's sidecar (an HBONE tunnel naming any port of B)
/// and around it (plaintext as the proxy's uid, which A's rules let out), A reaches the app and
/// nothing else; B keeps serving.
#[test]
fn a_mesh_peer_reaches_only_what_the_pod_serves_on_its_own_address() {
    let test = "a_mesh_peer_reaches_only_what_the_pod_serves_on_its_own_address";
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "default: all-unauthenticated\nports:\n  - port: {APP_PORT}\n    allow:\n      - authenticated: true\n"
        ),
    )
    .expect("write the policy");
    let policy = policy.display().to_string();
    let ca = Ca::new("mesh CA");
    let victim_args: &[&str] = &["--policy", &policy];
    let mut mesh = match Mesh::start(&ca, (ATTACKER_ID, &[]), (VICTIM_ID, victim_args)) {
        Ok(mesh) => mesh,
        Err(why) => return support::skip(test, &why),
    };
    serve_loopback_secret(&mut mesh);
    let b = mesh.b_ip;
    let app = |uid: &str| mesh.curl_in_a(uid, &[&format!("http://{b}:{APP_PORT}/{APP_FILE}")]);

    // The control: A's app reaches B's app through the tunnel.
    assert_eq!(
        app("1000").as_deref(),
        Ok(APP_CONTENT),
        "{}",
        mesh.read("b-proxy.log")
    );

    // B's loopback-only server: neither in a tunnel (CONNECT b:9090) nor in plaintext.
    let secret_url = format!("http://{b}:{LOOPBACK_PORT}/secret.txt");
    for uid in ["1000", "1337"] {
        let got = mesh.curl_in_a(uid, &["-o", "-", "-w", "%{http_code}", &secret_url]);
        assert!(
            !got.as_deref().unwrap_or_default().contains(SECRET.trim()),
            "uid {uid} read B's loopback-only server: {got:?}"
        );
    }

    // B's admin port: POST /shutdown in a tunnel (CONNECT b:15000) or plaintext drains nothing.
    let shutdown = format!("http://{b}:15000/shutdown");
    for uid in ["1000", "1337"] {
        let got = mesh.curl_in_a(
            uid,
            &["-X", "POST", "-o", "-", "-w", "%{http_code}", &shutdown],
        );
        assert!(
            !got.as_deref().unwrap_or_default().ends_with("200"),
            "uid {uid} drained B: {got:?}"
        );
    }
    // The tunnel to B's inbound port itself is refused too (it would loop).
    let inbound_url = format!("http://{b}:8000/{APP_FILE}");
    let got = mesh.curl_in_a("1000", &["-o", "-", "-w", "%{http_code}", &inbound_url]);
    assert!(
        !got.as_deref()
            .unwrap_or_default()
            .contains(APP_CONTENT.trim()),
        "a tunnel to B's inbound port reached the app: {got:?}"
    );
    // Plaintext to B's inbound port stands for the app's port, and its rule wants a peer identity.
    let got = mesh.curl_in_a("1337", &["-o", "-", "-w", "%{http_code}", &inbound_url]);
    assert!(
        !got.as_deref()
            .unwrap_or_default()
            .contains(APP_CONTENT.trim()),
        "plaintext to B's inbound port skipped the app port's rule: {got:?}"
    );
    // And plaintext to the app port itself is refused by that rule (the control).
    assert!(
        app("1337").is_err(),
        "plaintext passed a rule for authenticated peers"
    );

    let ready = mesh
        .ns_b()
        .exec(&["curl", "-fsS", "-m", "2", "http://127.0.0.1:15000/ready"]);
    assert!(
        ready.status.success(),
        "B no longer ready: {}",
        mesh.read("b-proxy.log")
    );
    let metrics = mesh
        .ns_b()
        .exec(&["curl", "-fsS", "-m", "2", "http://127.0.0.1:15000/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("proxy_port"),
        "the refusals are counted: {metrics}"
    );
    assert_eq!(app("1000").as_deref(), Ok(APP_CONTENT), "B still serves");
}
/// A (the attacker), B (a pod: `init`, `run`, a loopback-only server) and C (a host only B
/// reaches), in a line. Returns them with A's, B's and C's addresses.
fn relay_hosts() -> Option<(Netns, Netns, Netns, [String; 3])> {
    let (Ok(a), Ok(mut b), Ok(mut c)) = (
        Netns::unique("ap-relay-a"),
        Netns::unique("ap-relay-b"),
        Netns::unique("ap-relay-c"),
    ) else {
        return None;
    };
    // A /30 each for A-B and B-C, from the pid, inside 198.18.0.0/15.
    let base = u32::from(std::net::Ipv4Addr::new(198, 19, 0, 0)) + (std::process::id() % 8192) * 8;
    let ip = |n: u32| std::net::Ipv4Addr::from(base + n).to_string();
    let (a_ip, b_ip, b_c_ip, c_ip) = (ip(1), ip(2), ip(5), ip(6));
    let link = |x: &Netns, y: &Netns, x_if: &str| {
        support::process::must(std::process::Command::new("ip").args([
            "-n", &x.name, "link", "add", x_if, "type", "veth", "peer", "name", "eth0", "netns",
            &y.name,
        ]));
    };
    link(&a, &b, "eth0");
    link(&b, &c, "eth1");
    for (ns, ifname, addr) in [
        (&a, "eth0", &a_ip),
        (&b, "eth0", &b_ip),
        (&b, "eth1", &b_c_ip),
        (&c, "eth0", &c_ip),
    ] {
        ns.ok(&["ip", "addr", "add", &format!("{addr}/30"), "dev", ifname]);
        ns.ok(&["ip", "link", "set", ifname, "up"]);
    }
    let banner = |addr: &str, port: u16, text: &str| {
        format!(
            "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('{addr}',{port}));s.listen()\nwhile True:\n  c,_=s.accept();c.sendall(b'{text}');c.close()\n"
        )
    };
    c.spawn(&["python3", "-c", &banner(&c_ip, 7777, "only-B-reaches-C")]);
    b.spawn(&[
        "python3",
        "-c",
        &banner("127.0.0.1", LOOPBACK_PORT, "loopback-secret"),
    ]);
    let bin = support::process::bin();
    b.ok(&[bin, "init"]);
    b.spawn(&[
        bin,
        "run",
        "--app",
        "127.0.0.1:8080",
        "--detect-timeout",
        "100ms",
    ]);
    eventually_blocking("B's proxy and servers", WAIT, || {
        let ready = b.exec(&["curl", "-fsS", "-m", "1", "http://127.0.0.1:15000/ready"]);
        let lo = b.exec(&[
            "python3",
            "-c",
            &format!("import socket;socket.create_connection(('127.0.0.1',{LOOPBACK_PORT}),1)"),
        ]);
        let c_up = b.exec(&[
            "python3",
            "-c",
            &format!("import socket;socket.create_connection(('{c_ip}',7777),1)"),
        ]);
        (ready.status.success() && lo.status.success() && c_up.status.success())
            .then_some(())
            .ok_or_else(|| "not yet".to_string())
    });
    Some((a, b, c, [a_ip, b_ip, c_ip]))
}

/// A peer that is root in its own namespace routes packets for other addresses to pod B: for a
/// host only B can reach, and for 127.0.0.1 (with `route_localnet`). B's inbound rules redirect
/// them like any other; its sidecar must not relay them to where they were addressed (B's
/// loopback-only server, or another host as B), only to what B serves on its own address.
#[test]
fn a_peer_routing_other_destinations_through_the_pod_reaches_neither() {
    let test = "a_peer_routing_other_destinations_through_the_pod_reaches_neither";
    let Some((a, b, c, [a_ip, b_ip, c_ip])) = relay_hosts() else {
        return support::skip(test, "cannot create network namespaces (not root?)");
    };
    let read_from_a = |addr: &str, port: u16| {
        let code = format!(
            "import socket\ntry:\n  s=socket.create_connection(('{addr}',{port}),3);s.settimeout(3);print(s.recv(100))\nexcept Exception as e:\n  print('refused:',e)\n"
        );
        String::from_utf8_lossy(&a.exec(&["python3", "-c", &code]).stdout).into_owned()
    };
    // C through B: A has no route to C, so it routes C's address to B.
    a.ok(&["ip", "route", "add", &format!("{c_ip}/32"), "via", &b_ip]);
    let got = read_from_a(&c_ip, 7777);
    assert!(
        !got.contains("only-B-reaches-C"),
        "B's sidecar relayed A to C: {got}"
    );
    // 127.0.0.1 through B: A's own kernel must be told to send loopback out of eth0.
    for cmd in [
        vec!["ip", "rule", "add", "pref", "10", "lookup", "local"],
        vec!["ip", "rule", "del", "pref", "0"],
        vec![
            "ip",
            "rule",
            "add",
            "pref",
            "5",
            "to",
            "127.0.0.1/32",
            "ipproto",
            "tcp",
            "lookup",
            "100",
        ],
        vec![
            "ip",
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            &b_ip,
            "dev",
            "eth0",
            "src",
            &a_ip,
            "table",
            "100",
        ],
        vec![
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.route_localnet=1",
            "net.ipv4.conf.eth0.route_localnet=1",
        ],
    ] {
        a.ok(&cmd);
    }
    let got = read_from_a("127.0.0.1", LOOPBACK_PORT);
    assert!(
        !got.contains("loopback-secret"),
        "A read B's loopback-only server: {got}"
    );
    drop((a, b, c));
}
