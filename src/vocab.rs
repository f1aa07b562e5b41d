//! The shared vocabulary of `run`, `init`, `inject` and `webhook`: the proxy's well-known ports,
//! uid, gid and socket mark, the pod's variables `inject` sets and `run` reads, and the typed values their options are made of (port lists, CIDR
//! lists, bounded durations, the access-log format, DNS names); and the words the policy and the
//! routes files share (HTTP methods, normalised paths and their segment-aware prefixes).
//!
//! Each value is parsed here and only here, so that what `inject` accepts in an annotation is
//! exactly what `init` and `run` accept when the injected pod starts: a value refused at start
//! would be a pod that never becomes ready, found long after `kubectl apply` said yes. This module
//! depends on nothing else in the crate.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

/// The proxy's inbound listener port: where `init` redirects traffic to the pod.
pub(crate) const INBOUND_PORT: u16 = 8000;
/// The proxy's outbound listener port: where `init` redirects the app's own connections.
pub(crate) const OUTBOUND_PORT: u16 = 15001;
/// The proxy's admin port (`/live`, `/ready`, `/metrics`, `POST /shutdown`).
pub(crate) const ADMIN_PORT: u16 = 15000;
/// HBONE (HTTP/2 CONNECT over mutual TLS), the port Istio ambient's ztunnel dials and listens on;
/// `init` leaves it out of the inbound redirection.
pub(crate) const HBONE_PORT: u16 = 15008;
/// The uid the proxy runs as; `init` lets this uid's connections out unredirected.
pub(crate) const PROXY_UID: u32 = 1337;
/// The gid the proxy runs as; `init` lets this gid's connections out unredirected.
pub(crate) const PROXY_GID: u32 = 1337;
/// The socket mark (SO_MARK) the proxy sets on its upstream sockets; `init` lets it through.
pub(crate) const PROXY_MARK: u32 = 1337;

/// The downward-API variables `inject` sets on the sidecar and `run` reads: the pod's name and
/// namespace.
pub(crate) const POD_NAME_ENV: &str = "POD_NAME";
pub(crate) const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";

/// Longest accepted timeout (connect, head, idle, body, pool idle...): a day. Longer is a typo,
/// and unbounded values overflow when added to an `Instant`.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest accepted drain delay or drain timeout: an hour. Kubernetes' own grace period would
/// have killed the pod long before.
pub(crate) const MAX_DRAIN: Duration = Duration::from_secs(60 * 60);

/// One TCP port, 1-65535.
pub(crate) fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("expected a TCP port 1-65535, got `{s}`")),
    }
}

/// A comma-separated list of TCP ports (`3306,5432`); empty means none. Kept sorted and
/// deduplicated, so that what is generated from it does not depend on how the list was written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl PortList {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }
}

impl FromStr for PortList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut ports = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            ports.push(parse_port(part).map_err(|_| {
                format!(
                    "expected a comma-separated list of TCP ports 1-65535, got `{part}` in `{s}`"
                )
            })?);
        }
        Ok(PortList::from_iter(ports))
    }
}

impl FromIterator<u16> for PortList {
    fn from_iter<I: IntoIterator<Item = u16>>(ports: I) -> Self {
        let mut ports: Vec<u16> = ports.into_iter().collect();
        ports.sort_unstable();
        ports.dedup();
        PortList(ports)
    }
}

/// Comma-separated, as parsed (`80,443`).
impl fmt::Display for PortList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, port) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{port}")?;
        }
        Ok(())
    }
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`, `fd00::/8`; a bare address is a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    pub(crate) addr: IpAddr,
    pub(crate) prefix: u8,
}

impl Cidr {
    pub(crate) fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not a CIDR such as 10.0.0.0/8 or fd00::/8: `{addr}` is not an IPv4 or IPv6 address")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "`{s}` is not a CIDR: the prefix length must be 0-{max}"
                    ));
                }
            },
        };
        // Host bits set usually means a typo (10.1.2.3/8): iptables would silently mask them and
        // nft would refuse them, so every job refuses them, naming what to write instead.
        let network = mask(addr, prefix);
        if network != addr {
            return Err(format!(
                "`{s}` has host bits set: write the network address `{network}/{prefix}` (or `{addr}/{max}` for the single host)"
            ));
        }
        Ok(Cidr { addr, prefix })
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A comma-separated list of CIDRs, IPv4 and IPv6 mixed; duplicates dropped, order kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CidrList(pub(crate) Vec<Cidr>);

impl FromStr for CidrList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out: Vec<Cidr> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let c: Cidr = part.parse()?;
            if !out.contains(&c) {
                out.push(c);
            }
        }
        Ok(CidrList(out))
    }
}

/// Comma-separated, each with its prefix length (`10.0.0.0/8,1.2.3.4/32`).
impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cidr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{cidr}")?;
        }
        Ok(())
    }
}

/// A duration in humantime syntax (`500ms`, `2s`, `1m`), at most `max`; zero only if `allow_zero`.
/// Negative durations get a message of their own (humantime's would only say "expected number").
pub(crate) fn parse_duration(s: &str, allow_zero: bool, max: Duration) -> Result<Duration, String> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(format!(
            "negative durations are not allowed, got `{s}`; write a duration such as 500ms, 2s or 1m"
        ));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("expected a duration such as 500ms, 2s or 1m, got `{s}`: {e}"))?;
    if d.is_zero() && !allow_zero {
        return Err(format!("must be greater than zero, got `{s}`"));
    }
    if d > max {
        return Err(format!(
            "at most {} is allowed, got `{s}`",
            format_duration(max)
        ));
    }
    Ok(d)
}

/// A timeout: more than zero, at most [`MAX_TIMEOUT`].
pub(crate) fn parse_timeout(s: &str) -> Result<Duration, String> {
    parse_duration(s, false, MAX_TIMEOUT)
}

/// A drain delay or drain timeout: zero (no wait) up to [`MAX_DRAIN`].
pub(crate) fn parse_drain_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s, true, MAX_DRAIN)
}

/// The shortest exact spelling in the unit [`parse_duration`] reads back: `1h`, `90s`, `250ms`.
pub(crate) fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    let (unit, name) = UNITS
        .into_iter()
        .find(|(unit, _)| nanos.is_multiple_of(*unit))
        .unwrap_or((1, "ns"));
    format!("{}{name}", nanos / unit)
}

/// A DNS-1123 subdomain as Kubernetes checks object names (a ConfigMap's): dot-separated labels of
/// lower-case letters, digits and `-`, each beginning and ending with a letter or digit, at most
/// 253 characters in all.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// A host name a resolver will look up: a [DNS-1123 subdomain](is_dns_subdomain) whose labels
/// are at most 63 characters (RFC 1035), and not an IPv4 address written as one.
pub(crate) fn is_dns_name(s: &str) -> bool {
    is_dns_subdomain(s)
        && s.split('.').all(|label| label.len() <= 63)
        && s.parse::<std::net::Ipv4Addr>().is_err()
}

fn is_label(label: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bytes = label.as_bytes();
    alnum(bytes.first())
        && alnum(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// An HTTP method as a rule names it: upper case, as requests spell the standard ones (methods
/// are case-sensitive, RFC 9110 9.1: `get` would never match a GET).
pub(crate) fn parse_method(s: &str) -> Result<http::Method, String> {
    http::Method::from_bytes(s.as_bytes())
        .ok()
        .filter(|_| !s.bytes().any(|b| b.is_ascii_lowercase()))
        .ok_or_else(|| format!("`{s}` is not an upper-case HTTP method (e.g. GET)"))
}

/// A path in the one form rules are written in, and the only form they match: absolute, and
/// nothing an app could resolve to another path (dot segments, encoded `/`, `.` or `\`, empty
/// segments): `/public/../admin` must not pass as `/public`.
pub(crate) fn is_normal_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    path.starts_with('/')
        && !path.contains("//")
        && !path.contains('\\')
        && !["%2f", "%2e", "%5c"].iter().any(|enc| lower.contains(enc))
        && !path.split('/').any(|seg| seg == "." || seg == "..")
}

/// Whether `path` (without its query) lies under `prefix` by whole segments, as Gateway API's
/// PathPrefix: `/api` and `/api/` match `/api` and `/api/v1`, not `/apis`; `/` matches every path.
pub(crate) fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Other projects' metrics the proxy exports beside its own (`run --metrics-compat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MetricsCompat {
    /// Ours only.
    None,
    /// Also Istio's standard metrics (`istio_requests_total`...), for Kiali and Istio's dashboards.
    Istio,
}

/// What the proxy writes to its access log (`run --access-log`, annotation `access-log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum AccessLogFormat {
    /// The tutorial's multi-line block (`Original URL: ...` ... blank line).
    Seed,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

impl AccessLogFormat {
    /// The spelling `run --access-log` reads.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AccessLogFormat::Seed => "seed",
            AccessLogFormat::Json => "json",
            AccessLogFormat::Off => "off",
        }
    }
}

impl FromStr for AccessLogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "seed" => Ok(AccessLogFormat::Seed),
            "json" => Ok(AccessLogFormat::Json),
            "off" => Ok(AccessLogFormat::Off),
            _ => Err(format!("expected seed, json or off, got `{s}`")),
        }
    }
}

/// A hex digit's value.
pub(crate) fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Every well-formed `%XX` decoded; anything else (a `%` without two hex digits after it) kept
/// as written. Paths, `/tap` queries and `baggage` values decode with it.
pub(crate) fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                Some(hi << 4 | lo)
            })
            .flatten();
        match escaped {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn port_lists_are_sorted_deduplicated_and_validated() {
        let l: PortList = "443, 80,80,".parse().unwrap();
        assert_eq!(l, PortList(vec![80, 443]));
        assert_eq!(l.to_string(), "80,443");
        assert!(l.contains(443) && !l.contains(8080));
        assert_eq!("".parse::<PortList>(), Ok(PortList(vec![])));
        for bad in ["0", "80,http", "65536", "-1"] {
            assert!(bad.parse::<PortList>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_accept_both_families_and_refuse_host_bits() {
        let l: CidrList = "10.0.0.0/8, fd00::/8,1.2.3.4,::1,10.0.0.0/8"
            .parse()
            .unwrap();
        assert_eq!(l.to_string(), "10.0.0.0/8,fd00::/8,1.2.3.4/32,::1/128");
        assert_eq!(l.to_string().parse::<CidrList>(), Ok(l));
        let err = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(
            err.contains("`10.0.0.0/8`") && err.contains("`10.1.2.3/32`"),
            "{err}"
        );
        let err = "fd00::1/8".parse::<Cidr>().unwrap_err();
        assert!(err.contains("`fd00::/8`"), "{err}");
        for bad in ["10.0.0.0/33", "fd00::/129", "banana/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        assert!("::/0".parse::<Cidr>().is_ok());
    }

    #[test]
    fn durations_are_bounded_and_never_negative() {
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("24h"), Ok(MAX_TIMEOUT));
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_drain_duration("0s"), Ok(Duration::ZERO));
        let err = parse_timeout("300000000000y").unwrap_err();
        assert!(err.contains("at most 24h"), "{err}");
        let err = parse_drain_duration("61m").unwrap_err();
        assert!(err.contains("at most 1h"), "{err}");
        let err = parse_drain_duration("-1s").unwrap_err();
        assert!(
            err.starts_with("negative durations are not allowed"),
            "{err}"
        );
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn formatted_durations_read_back_exactly() {
        for (d, text) in [
            (Duration::from_secs(5), "5s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (MAX_DRAIN, "1h"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_nanos(7), "7ns"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text, true, MAX_TIMEOUT), Ok(d));
        }
    }

    #[test]
    fn dns_names_follow_rfc_1123() {
        for ok in [
            "a",
            "web-policy.v1",
            "reviews.default.svc.cluster.local",
            "1a",
        ] {
            assert!(is_dns_subdomain(ok) && is_dns_name(ok), "{ok}");
        }
        for bad in [
            "", "Web", "-web", "web-", "a_b", "a..b", "a.-b", "a.", ".a", "a b",
        ] {
            assert!(!is_dns_subdomain(bad) && !is_dns_name(bad), "{bad}");
        }
        let long_label = "a".repeat(64);
        assert!(is_dns_subdomain(&long_label) && !is_dns_name(&long_label));
        assert!(!is_dns_subdomain(&"a.".repeat(127)));
        assert!(is_dns_subdomain("198.18.0.1") && !is_dns_name("198.18.0.1"));
    }

    #[test]
    fn methods_paths_and_prefixes() {
        assert_eq!(parse_method("GET"), Ok(http::Method::GET));
        assert_eq!(
            parse_method("PURGE").map(|m| m.to_string()),
            Ok("PURGE".into())
        );
        for bad in ["get", "Get", "", "GE T"] {
            assert!(parse_method(bad).is_err(), "{bad}");
        }
        for ok in ["/", "/api", "/api/v1", "/~user"] {
            assert!(is_normal_path(ok), "{ok}");
        }
        for bad in [
            "api",
            "//x",
            "/a/../b",
            "/a/./b",
            "/a%2Fb",
            "/%2e%2e/x",
            "/a\\b",
            "/a/..",
        ] {
            assert!(!is_normal_path(bad), "{bad}");
        }
        for (path, prefix, yes) in [
            ("/api", "/api", true),
            ("/api/v1", "/api", true),
            ("/api/v1", "/api/", true),
            ("/apis", "/api", false),
            ("/ap", "/api", false),
            ("/anything", "/", true),
        ] {
            assert_eq!(path_has_prefix(path, prefix), yes, "{path} under {prefix}");
        }
    }

    #[test]
    fn access_log_formats_round_trip() {
        for f in [
            AccessLogFormat::Seed,
            AccessLogFormat::Json,
            AccessLogFormat::Off,
        ] {
            assert_eq!(f.as_str().parse::<AccessLogFormat>(), Ok(f));
        }
        assert!("yes".parse::<AccessLogFormat>().is_err());
    }
}
