//! `amazing-proxy run` options: every flag is also an `AMAZING_PROXY_*` environment variable so that a
//! pod spec can set it. Parsing and validation happen here, before anything binds: a bad value exits
//! with a message naming the option and what it accepts.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Where a listener binds, or `off` to not start it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen(None));
        }
        s.parse().map(|addr| Listen(Some(addr))).map_err(|_| {
            format!("expected IP:PORT (for example 127.0.0.1:15001) or `off`, got `{s}`")
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AccessLogFormat {
    /// The tutorial's multi-line block (`Original URL: ...` ... blank line).
    Seed,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

/// Which HTTP version the proxy speaks to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AppProtocol {
    /// HTTP/1.1 to the app.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the app: gRPC servers.
    Http2,
    /// The version the client used: HTTP/2 clients reach the app over HTTP/2, HTTP/1 over HTTP/1.1.
    Auto,
}

/// Parses `IP:PORT`, with a message that says so (the standard one only says "invalid syntax").
pub fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected IP:PORT (for example 127.0.0.1:8000), got `{s}`"))
}

/// Parses `500ms`, `2s`, `1m` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 500ms, 2s or 1m, got `{s}`: {e}"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("must be greater than zero, got `{s}`"));
    }
    Ok(d)
}

fn parse_port_list(s: &str) -> Result<PortList, String> {
    s.parse()
}

/// A comma-separated list of TCP ports (`3306,5432`); empty means none. Kept sorted and
/// deduplicated so that what is generated from it does not depend on how the user wrote the list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl FromStr for PortList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ports = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<u16>() {
                Ok(p) if p != 0 => ports.push(p),
                _ => {
                    return Err(format!(
                        "expected a comma-separated list of TCP ports 1-65535, got `{part}`"
                    ));
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
        Ok(PortList(ports))
    }
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Inbound listener: traffic to the pod, redirected here by `amazing-proxy init`.
    #[arg(long, env = "AMAZING_PROXY_INBOUND", default_value = "0.0.0.0:8000", value_parser = parse_socket_addr)]
    pub inbound: SocketAddr,

    /// Outbound listener: the app's own connections, redirected here by `init`; `off` disables it.
    #[arg(
        long,
        env = "AMAZING_PROXY_OUTBOUND",
        default_value = "127.0.0.1:15001"
    )]
    pub outbound: Listen,

    /// The app, used when an inbound connection has no original destination (not redirected).
    #[arg(long, env = "AMAZING_PROXY_APP", default_value = "127.0.0.1:80", value_parser = parse_socket_addr)]
    pub app: SocketAddr,

    /// Admin listener (/live, /ready, /metrics, POST /shutdown); never the data port.
    #[arg(long, env = "AMAZING_PROXY_ADMIN", default_value = "127.0.0.1:15000", value_parser = parse_socket_addr)]
    pub admin: SocketAddr,

    /// Access log format, written to stdout.
    #[arg(
        long,
        env = "AMAZING_PROXY_ACCESS_LOG",
        value_enum,
        default_value = "json"
    )]
    pub access_log: AccessLogFormat,

    /// Worker threads for the data plane (a sidecar shares its pod's CPU budget).
    #[arg(long, env = "AMAZING_PROXY_WORKERS", default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,

    /// Lower-case HTTP/1.1 header names. By default each name keeps the case the client or the app
    /// wrote, and the proxy's own names are written in canonical case (`Server`, `X-Request-Id`).
    #[arg(
        long,
        env = "AMAZING_PROXY_LOWERCASE_HEADER_NAMES",
        conflicts_with = "preserve_header_case"
    )]
    pub lowercase_header_names: bool,

    /// Kept for old manifests: preserving header case is now the default.
    #[arg(long, env = "AMAZING_PROXY_PRESERVE_HEADER_CASE", hide = true)]
    pub preserve_header_case: bool,

    /// Rewrite the Host header to the app's address instead of keeping the client's.
    #[arg(long, env = "AMAZING_PROXY_REWRITE_HOST")]
    pub rewrite_host: bool,

    /// HTTP version spoken to the app.
    #[arg(
        long,
        env = "AMAZING_PROXY_APP_PROTOCOL",
        value_enum,
        default_value = "http1"
    )]
    pub app_protocol: AppProtocol,

    /// Inbound ports whose app speaks HTTP/2 (h2c), whatever --app-protocol says.
    #[arg(long, env = "AMAZING_PROXY_HTTP2_PORTS", default_value = "", value_parser = parse_port_list)]
    pub http2_ports: PortList,

    /// Time allowed to connect to the app or the original destination (504 when exceeded).
    #[arg(long, env = "AMAZING_PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// Time allowed for the app to start its response, counted from the end of the request body
    /// (504 when exceeded; Envoy's route timeout default).
    #[arg(long, env = "AMAZING_PROXY_RESPONSE_TIMEOUT", default_value = "15s", value_parser = parse_positive_duration)]
    pub response_timeout: Duration,

    /// Time allowed for a whole request head, from its first byte (408, then close; nginx's
    /// client_header_timeout, hyper's header_read_timeout).
    #[arg(long, env = "AMAZING_PROXY_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub header_timeout: Duration,

    /// An idle keep-alive client connection is closed after this long (nginx's keepalive_timeout).
    #[arg(long, env = "AMAZING_PROXY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub idle_timeout: Duration,

    /// Longest pause between two reads of a request body (408, then close; nginx's
    /// client_body_timeout).
    #[arg(long, env = "AMAZING_PROXY_REQUEST_BODY_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub request_body_timeout: Duration,

    /// Longest pause between two reads of the app's response body; the response is cut after it
    /// (nginx's proxy_read_timeout).
    #[arg(long, env = "AMAZING_PROXY_RESPONSE_BODY_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub response_body_timeout: Duration,

    /// Idle pooled connections to the app are closed after this long.
    #[arg(long, env = "AMAZING_PROXY_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub pool_idle_timeout: Duration,

    /// Open client connections above which new ones get 503 with Retry-After.
    #[arg(long, env = "AMAZING_PROXY_MAX_CONNECTIONS", default_value = "10000",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Requests in flight above which new ones get 503 with Retry-After.
    #[arg(long, env = "AMAZING_PROXY_MAX_IN_FLIGHT", default_value = "10000",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Largest request head (request line and headers) accepted, in bytes (431 above it).
    #[arg(long, env = "AMAZING_PROXY_MAX_HEADER_BYTES", default_value = "65536",
          value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    pub max_header_bytes: u32,

    /// When set, /ready also requires the app to answer GET on this path with a 2xx.
    #[arg(long, env = "AMAZING_PROXY_APP_READY_PATH")]
    pub app_ready_path: Option<String>,

    /// After SIGTERM or /shutdown: keep serving (while /ready says 503) for this long.
    #[arg(long, env = "AMAZING_PROXY_DRAIN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// Then stop accepting and give in-flight requests at most this long to finish.
    #[arg(long, env = "AMAZING_PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long to wait for a new connection's first bytes before treating it as opaque TCP
    /// (server-speaks-first protocols).
    #[arg(long, env = "AMAZING_PROXY_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_positive_duration)]
    pub detect_timeout: Duration,

    /// Ports forwarded as opaque TCP without protocol detection (MySQL, PostgreSQL, SMTP...).
    #[arg(long, env = "AMAZING_PROXY_OPAQUE_PORTS", default_value = "", value_parser = parse_port_list)]
    pub opaque_ports: PortList,

    /// Ports known to carry HTTP: never forwarded as opaque TCP, whatever the timing (`inject`
    /// fills it from container ports named http*, grpc* or h2c*).
    #[arg(long, env = "AMAZING_PROXY_HTTP_PORTS", default_value = "", value_parser = parse_port_list)]
    pub http_ports: PortList,

    /// Socket mark (SO_MARK) set on the proxy's upstream sockets so that `init`'s rules let them
    /// pass; 0 disables it. Must match `init --proxy-mark`.
    #[arg(long, env = "AMAZING_PROXY_PROXY_MARK", default_value = "1337")]
    pub proxy_mark: u32,
}

impl RunArgs {
    /// Checks what clap cannot: relations between options.
    pub fn validate(&self) -> Result<(), String> {
        // Port 0 asks the kernel for a free port: two listeners on port 0 never collide.
        let collide = |a: SocketAddr, b: SocketAddr| a == b && a.port() != 0;
        if collide(self.admin, self.inbound) {
            return Err(format!(
                "--admin and --inbound are both {}: the admin listener must not share the data port",
                self.admin
            ));
        }
        if let Listen(Some(out)) = self.outbound
            && (collide(out, self.inbound) || collide(out, self.admin))
        {
            return Err(format!(
                "--outbound {out} collides with --inbound or --admin: give each listener its own port"
            ));
        }
        if let Some(path) = &self.app_ready_path
            && !path.starts_with('/')
        {
            return Err(format!(
                "--app-ready-path must start with `/`, got `{path}`"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_off_and_addresses() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen(None)));
        assert_eq!(
            "127.0.0.1:15001"
                .parse::<Listen>()
                .map(|l| l.0.map(|a| a.port())),
            Ok(Some(15001))
        );
        assert!("15001".parse::<Listen>().is_err());
    }

    #[test]
    fn durations_use_short_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_positive_duration("0s").is_err());
    }

    #[test]
    fn port_lists() {
        assert_eq!(
            "3306, 5432".parse::<PortList>(),
            Ok(PortList(vec![3306, 5432]))
        );
        assert_eq!("".parse::<PortList>(), Ok(PortList(vec![])));
        assert!("0".parse::<PortList>().is_err());
        assert!("http".parse::<PortList>().is_err());
    }

    #[test]
    fn listeners_on_port_zero_do_not_collide() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
                .expect("parse")
                .run
                .validate()
        };
        let zero = ["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        assert_eq!(parse(&zero), Ok(()));
        assert_eq!(
            parse(&[&zero[..], &["--outbound", "127.0.0.1:0"]].concat()),
            Ok(())
        );
        assert!(parse(&["--inbound", "127.0.0.1:9", "--admin", "127.0.0.1:9"]).is_err());
    }
}
