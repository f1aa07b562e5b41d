//! `amazing-proxy tap`: the live stream of a proxy's exchanges (`GET /tap` on its admin listener),
//! one line each for a person, or the records themselves with `--json`. Run in the pod (`kubectl
//! exec POD -c amazing-proxy -- amazing-proxy tap`): the admin listener serves `/tap` to
//! loopback only.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use serde_json::Value;

use super::{Lines, ViewError};

#[derive(clap::Args, Debug)]
pub struct TapArgs {
    /// The proxy's admin listener.
    #[arg(long, env = "AMAZING_PROXY_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Only requests to this pod's app (inbound) or from it (outbound).
    #[arg(long, value_parser = ["inbound", "outbound"])]
    pub direction: Option<String>,
    /// Only exchanges to this port (the one the client dialled).
    #[arg(long)]
    pub port: Option<u16>,
    /// Only this method (GET, POST...).
    #[arg(long)]
    pub method: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this status class: 1xx, 2xx, 3xx, 4xx or 5xx.
    #[arg(long)]
    pub status: Option<String>,
    /// Only this peer (its SPIFFE ID, over mutual TLS).
    #[arg(long)]
    pub peer: Option<String>,
    /// Print the records as the proxy sends them (JSON lines).
    #[arg(long)]
    pub json: bool,
    /// Stop after this many exchanges (default: until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

pub fn main(args: TapArgs) -> Result<(), ViewError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ViewError::Runtime)?;
    runtime.block_on(print(&args))
}

/// The query of `/tap` for these filters.
fn query(args: &TapArgs) -> String {
    let fields = [
        ("direction", &args.direction),
        ("method", &args.method),
        ("path", &args.path),
        ("status", &args.status),
        ("peer", &args.peer),
    ];
    let mut pairs: Vec<String> = fields
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={}", encode(v))))
        .collect();
    if let Some(port) = args.port {
        pairs.push(format!("port={port}"));
    }
    pairs.join("&")
}

/// Percent-encodes what a query value cannot hold as written.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/@!$'()*,;".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn print(args: &TapArgs) -> Result<(), ViewError> {
    let mut lines = Lines::open(args.admin, &query(args)).await?;
    let colour = std::io::stdout().is_terminal();
    let mut shown = 0u64;
    while args.count.is_none_or(|n| shown < n) {
        let text = lines.next().await?;
        let is_record = !text.starts_with("{\"dropped\"");
        let out = if args.json {
            text
        } else {
            human(&text, colour)
        };
        // A closed stdout (piped into `head`) ends the tap quietly.
        if writeln!(std::io::stdout(), "{out}").is_err() {
            return Ok(());
        }
        if is_record {
            shown += 1;
        }
    }
    Ok(())
}

/// One record as a line for a person: time, direction, method, URL, status, duration, bytes,
/// then the peer, route and error when there are.
pub fn human(line: &str, colour: bool) -> String {
    let Ok(record) = serde_json::from_str::<Value>(line) else {
        return line.to_owned();
    };
    if let Some(dropped) = record.get("dropped").and_then(Value::as_u64) {
        return format!("... {dropped} exchanges not shown: this reader fell behind");
    }
    let field = |name: &str| record.get(name).and_then(Value::as_str).unwrap_or("-");
    let number = |name: &str| record.get(name).and_then(Value::as_u64).unwrap_or(0);
    let time = field("time");
    let time = time.get(11..23).unwrap_or(time);
    let arrow = if field("direction") == "inbound" {
        "in "
    } else {
        "out"
    };
    let status = number("status");
    let status_text = match (status, record.get("grpc_status").and_then(Value::as_u64)) {
        (0, _) => "TCP".to_owned(),
        (s, Some(g)) => format!("{s} grpc={g}"),
        (s, None) => s.to_string(),
    };
    let status_text = if colour {
        let code = match status / 100 {
            2 => "32",
            3 => "36",
            4 => "33",
            5 => "31",
            _ => "0",
        };
        format!("\x1b[{code}m{status_text}\x1b[0m")
    } else {
        status_text
    };
    let duration = record
        .get("duration_ms")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let mut out = format!(
        "{time} {arrow} {:<7} {} {status_text} {duration:.1}ms {}B/{}B",
        field("method"),
        field("original_url"),
        number("request_bytes"),
        number("response_bytes"),
    );
    for (name, label) in [("peer", "peer"), ("route", "route"), ("error", "error")] {
        if let Some(value) = record.get(name).and_then(Value::as_str) {
            out.push_str(&format!(" {label}={value}"));
        }
    }
    if field("proxy_url") != field("original_url") {
        out.push_str(&format!(" -> {}", field("proxy_url")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_as_one_line() {
        let line = r#"{"time":"2026-12-06T03:20:01.123456Z","direction":"inbound","protocol":"HTTP/1.1","method":"GET","original_url":"http://198.18.0.1:80/get","proxy_url":"http://127.0.0.1:80/get","status":503,"duration_ms":3.25,"request_bytes":0,"response_bytes":19,"peer":"spiffe://cluster.local/ns/a/sa/b","route":"api","attempts":1,"error":"concurrency_limited"}"#;
        assert_eq!(
            human(line, false),
            "03:20:01.123 in  GET     http://198.18.0.1:80/get 503 3.2ms 0B/19B \
             peer=spiffe://cluster.local/ns/a/sa/b route=api error=concurrency_limited \
             -> http://127.0.0.1:80/get"
        );
        assert!(
            human(line, true).contains("\x1b[31m503\x1b[0m"),
            "5xx in red"
        );
        assert_eq!(
            human(r#"{"dropped":7}"#, false),
            "... 7 exchanges not shown: this reader fell behind"
        );
    }

    #[test]
    fn filters_become_the_query() {
        let args = TapArgs {
            admin: "127.0.0.1:15000".parse().expect("address"),
            direction: Some("inbound".into()),
            port: Some(80),
            method: None,
            path: Some("/a b&c".into()),
            status: Some("5xx".into()),
            peer: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            json: false,
            count: None,
        };
        assert_eq!(
            query(&args),
            "direction=inbound&path=/a%20b%26c&status=5xx&peer=spiffe://cluster.local/ns/a/sa/b&port=80"
        );
    }
}
