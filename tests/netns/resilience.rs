//! Resilience (issue 10) where it needs a second host: the admin port changes state only for
//! loopback (a `POST /shutdown` from another address gets 403 and drains nothing). The rest of the
//! issue's checks are the in-process suite's `resilience`.

use std::process::Command;

use crate::support;
use crate::support::netns::Netns;
use crate::support::process::{Background, bin};
use crate::support::tools::{missing, text};
use crate::support::{WAIT, eventually_blocking, skip};

#[test]
fn shutdown_from_another_address_gets_403() {
    const TEST: &str = "shutdown_from_another_address_gets_403";
    if let Some(why) = missing(&["curl"]) {
        return skip(TEST, &why);
    }
    let (pod, client) = match (Netns::unique("ap-res"), Netns::unique("ap-res")) {
        (Ok(pod), Ok(client)) => (pod, client),
        (Err(why), _) | (_, Err(why)) => return skip(TEST, &why),
    };
    support::process::must(Command::new("ip").args([
        "-n",
        &pod.name,
        "link",
        "add",
        "v0",
        "type",
        "veth",
        "peer",
        "name",
        "v1",
        "netns",
        &client.name,
    ]));
    pod.ok(&["ip", "addr", "add", "198.18.0.1/30", "dev", "v0"]);
    pod.ok(&["ip", "link", "set", "v0", "up"]);
    client.ok(&["ip", "addr", "add", "198.18.0.2/30", "dev", "v1"]);
    client.ok(&["ip", "link", "set", "v1", "up"]);

    let dir = tempfile::tempdir().expect("a temp dir");
    let log = dir.path().join("proxy.log");
    let mut proxy_cmd = pod.cmd(&[
        bin(),
        "run",
        "--inbound",
        "127.0.0.1:8000",
        "--admin",
        "0.0.0.0:15000",
        "--outbound",
        "off",
        "--proxy-mark",
        "0",
        "--app",
        "127.0.0.1:9",
    ]);
    proxy_cmd.env("AMAZING_PROXY_LOG", "info");
    let _proxy = Background::logging(&mut proxy_cmd, &log, &log);
    let ready = |ns: &Netns, url: &str| {
        let out = ns.exec(&[
            "curl",
            "-sS",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ]);
        text(&out.stdout)
    };
    eventually_blocking("the admin port to answer", WAIT, || {
        let code = ready(&pod, "http://127.0.0.1:15000/ready");
        (code == "200")
            .then_some(())
            .ok_or_else(|| std::fs::read_to_string(&log).unwrap_or_default())
    });

    let out = client.exec(&[
        "curl",
        "-sS",
        "-m",
        "5",
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
        "http://198.18.0.1:15000/shutdown",
    ]);
    let answer = text(&out.stdout);
    let (body, code) = answer.rsplit_once('\n').unwrap_or(("", &answer));
    assert_eq!(code, "403", "{answer}");
    assert!(!body.trim().is_empty(), "403 without a reason");
    // Still serving: the refused request drained nothing.
    assert_eq!(ready(&pod, "http://127.0.0.1:15000/ready"), "200");
}
