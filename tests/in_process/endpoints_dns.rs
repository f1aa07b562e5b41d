//! A route's endpoints from a real DNS server: Debian's dnsmasq, started by the test on
//! 127.0.0.1 at a reserved port, answering for `balance.test` only from a hosts directory that it
//! watches (a rewritten file is read again at once) with a TTL of 1 s. The addresses are DNS data
//! only (198.18.0.0/15 and the IPv6 documentation prefix): nothing connects to them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use amazing_proxy::proxy::upstream::endpoints::{Resolver, Source, watch};
use tokio::sync::watch::Receiver;

use crate::support::http::ReservedPort;
use crate::support::process::Background;
use crate::support::tools::missing;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually, skip};

const NAME: &str = "svc.balance.test";
const PORT: u16 = 9080;

/// dnsmasq on 127.0.0.1, killed on drop (fields drop in order: the server before its port).
struct Dnsmasq {
    _child: Background,
    _port: ReservedPort,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with `hosts` as its hosts file. Its UDP port is not reserved (only TCP
    /// can be, see `ReservedPort`): when something else holds it, dnsmasq exits and the start is
    /// tried again on another port.
    async fn start(hosts: &str) -> Dnsmasq {
        let mut why = String::new();
        for _ in 0..3 {
            match Dnsmasq::try_start(hosts).await {
                Ok(server) => return server,
                Err(e) => why = e,
            }
        }
        panic!("dnsmasq did not start: {why}");
    }

    async fn try_start(hosts: &str) -> Result<Dnsmasq, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("a temp dir: {e}"))?;
        let hostsdir = dir.path().join("hosts.d");
        std::fs::create_dir(&hostsdir).map_err(|e| format!("{}: {e}", hostsdir.display()))?;
        // Read after dnsmasq drops root (to its own user or nobody): world-readable.
        set_mode(dir.path(), 0o755);
        set_mode(&hostsdir, 0o755);
        write_hosts(dir.path(), hosts);
        let port = ReservedPort::new();
        let addr = port.addr;
        let log = dir.path().join("dnsmasq.log");
        let mut child = Background::logging(
            Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--log-facility=-",
                ])
                .args(["--no-resolv", "--no-hosts", "--bind-interfaces"])
                .arg("--listen-address=127.0.0.1")
                .arg(format!("--port={}", addr.port()))
                .arg(format!("--hostsdir={}", hostsdir.display()))
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("dnsmasq.pid").display()
                ))
                // Names under balance.test are answered from the hosts only: NXDOMAIN otherwise.
                .args(["--local=/balance.test/", "--local-ttl=1", "--log-queries"]),
            &log,
            &log,
        );
        let started = eventually("dnsmasq to listen or exit", WAIT, || {
            let exited = !child.is_running();
            let log = &log;
            async move {
                if exited {
                    let log = std::fs::read_to_string(log).unwrap_or_default();
                    return Ok(Err(format!("dnsmasq exited: {log}")));
                }
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(_) => Ok(Ok(())),
                    Err(e) => Err(format!("{addr}: {e}")),
                }
            }
        })
        .await;
        started.map(|()| Dnsmasq {
            _child: child,
            _port: port,
            addr,
            dir,
        })
    }

    fn write_hosts(&self, hosts: &str) {
        write_hosts(self.dir.path(), hosts);
    }

    /// How many A queries for [`NAME`] dnsmasq has answered.
    fn queries(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default();
        log.matches(&format!("query[A] {NAME} ")).count()
    }
}

/// Replaces the hosts file at once (written beside the directory, then renamed into it).
fn write_hosts(dir: &Path, hosts: &str) {
    let staged = dir.join("hosts.new");
    let mut file = std::fs::File::create(&staged).expect("create the new hosts file");
    file.write_all(hosts.as_bytes())
        .expect("write the hosts file");
    drop(file);
    set_mode(&staged, 0o644);
    std::fs::rename(&staged, dir.join("hosts.d/hosts")).expect("rename the hosts file");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter()
        .map(|ip| {
            let ip: std::net::IpAddr = ip.parse().expect("an IP address");
            SocketAddr::new(ip, PORT)
        })
        .collect()
}

fn hosts(ips: &[&str]) -> String {
    ips.iter().map(|ip| format!("{ip} {NAME}\n")).collect()
}

/// Waits until the published set is `want`.
async fn published(rx: &mut Receiver<Arc<[SocketAddr]>>, want: &[SocketAddr]) {
    let outcome = tokio::time::timeout(WAIT, rx.wait_for(|set| **set == *want))
        .await
        .map(|seen| seen.map(drop));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(_)) => panic!("the watcher stopped"),
        Err(_) => panic!("not {want:?} within {WAIT:?}: {:?}", *rx.borrow()),
    }
}

/// The watcher's warnings, captured for this thread (a current-thread runtime: the watcher
/// task runs here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn count(&self, needle: &str) -> usize {
        let text = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&text).matches(needle).count()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut text = self.0.lock().unwrap_or_else(|p| p.into_inner());
        text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn dns(server: &Dnsmasq) -> Receiver<Arc<[SocketAddr]>> {
    let resolver = Resolver::with_name_server(server.addr).expect("a resolver");
    let source = Source::Dns {
        name: NAME.into(),
        port: PORT,
    };
    watch(source, &resolver)
}

#[tokio::test]
async fn three_addresses_then_a_changed_record_after_its_ttl() {
    let test = "endpoints_dns::three_addresses_then_a_changed_record_after_its_ttl";
    if let Some(why) = missing(&["dnsmasq"]) {
        return skip(test, &why);
    }
    bounded(test, TEST_TIMEOUT, async {
        // Dual stack: whatever the name has, A and AAAA alike.
        let first = ["198.18.0.1", "198.18.0.2", "2001:db8::3"];
        let server = Dnsmasq::start(&hosts(&first)).await;
        let mut rx = dns(&server);
        published(&mut rx, &addrs(&first)).await;

        let second = ["198.18.0.1", "198.18.0.4", "2001:db8::3"];
        server.write_hosts(&hosts(&second));
        published(&mut rx, &addrs(&second)).await;
    })
    .await;
}

#[tokio::test]
async fn an_empty_answer_and_a_server_gone_keep_the_last_good_set() {
    let test = "endpoints_dns::an_empty_answer_and_a_server_gone_keep_the_last_good_set";
    if let Some(why) = missing(&["dnsmasq"]) {
        return skip(test, &why);
    }
    let logs = Logs::default();
    let _capture = logs.install();
    bounded(test, TEST_TIMEOUT, async {
        let good = ["198.18.0.1", "198.18.0.2"];
        let server = Dnsmasq::start(&hosts(&good)).await;
        let mut rx = dns(&server);
        published(&mut rx, &addrs(&good)).await;

        // The name is gone (NXDOMAIN): the set stays, the log says so once however often the
        // watcher asks again.
        server.write_hosts("198.18.0.9 other.balance.test\n");
        let empty = "resolved to no usable address";
        eventually("a warning that the answer was empty", WAIT, || async {
            (logs.count(empty) > 0).then_some(())
        })
        .await;
        let asked = server.queries();
        eventually("two more resolutions", WAIT, || async {
            (server.queries() >= asked + 2).then_some(())
        })
        .await;
        assert_eq!(logs.count(empty), 1, "said once");
        assert_eq!(**rx.borrow_and_update(), *addrs(&good));

        // Back with new addresses, then the server goes away: the last set stays.
        let last = ["198.18.0.5", "198.18.0.6", "2001:db8::7"];
        server.write_hosts(&hosts(&last));
        published(&mut rx, &addrs(&last)).await;
        drop(server);
        let failed = format!("resolving {NAME}");
        eventually("a failed resolution", TEST_TIMEOUT / 2, || async {
            (logs.count(&failed) > 0).then_some(())
        })
        .await;
        assert!(
            !rx.has_changed().expect("the watcher runs"),
            "published after the failure"
        );
        assert_eq!(**rx.borrow(), *addrs(&last));
    })
    .await;
}
