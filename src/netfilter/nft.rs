//! The policy as one native nftables table, `table inet amazing_proxy`, loaded with `nft -f`.
//!
//! One `inet` table carries both families, and `nft -f` applies a file as one transaction, so
//! there is no IPv4/IPv6 half-state to roll back. The script starts by creating the table (a no-op
//! when present) and deleting it, which makes the deletion safe on a first run and the whole
//! script idempotent without reading the current state; `--clean` is the same two lines alone.
//! Nothing outside our table is touched.

use std::fmt::Write as _;

use super::rules::Policy;

pub(crate) const TABLE: &str = "inet amazing_proxy";

/// `nft -f` input that removes our table if present (and nothing else).
pub fn render_clean() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

fn port_set(ports: &[u16]) -> String {
    if let [one] = ports {
        return one.to_string();
    }
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

/// `nft -f` input installing the policy (replacing any previous version of our table).
pub fn render(policy: &Policy) -> String {
    let mut s = render_clean();
    // Restricting to IPv4 in the hook chains keeps the rest of the table family-agnostic.
    let family = if policy.ipv6 {
        ""
    } else {
        "meta nfproto ipv4 "
    };
    let _ = writeln!(s, "table {TABLE} {{");

    let _ = writeln!(s, "\tchain prerouting {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook prerouting priority -100; policy accept;"
    );
    let _ = writeln!(s, "\t\t{family}meta l4proto tcp jump inbound");
    let _ = writeln!(s, "\t}}\n");

    let _ = writeln!(s, "\tchain inbound {{");
    let _ = writeln!(
        s,
        "\t\ttcp dport {} return",
        port_set(&policy.inbound_exclude)
    );
    if policy.inbound_only.is_empty() {
        let _ = writeln!(s, "\t\tjump in_redirect");
    } else {
        let _ = writeln!(
            s,
            "\t\ttcp dport {} jump in_redirect",
            port_set(&policy.inbound_only)
        );
    }
    let _ = writeln!(s, "\t}}\n");

    let _ = writeln!(s, "\tchain in_redirect {{");
    let _ = writeln!(
        s,
        "\t\tmeta l4proto tcp redirect to :{}",
        policy.inbound_port
    );
    let _ = writeln!(s, "\t}}");

    if let Some(out) = &policy.outbound {
        let _ = writeln!(s, "\n\tchain output {{");
        let _ = writeln!(s, "\t\ttype nat hook output priority -100; policy accept;");
        // Both families alike (see iptables.rs).
        let _ = writeln!(s, "\t\t{family}meta l4proto tcp jump outbound");
        let _ = writeln!(s, "\t}}\n");

        let _ = writeln!(s, "\tchain outbound {{");
        // Same order and reasons as the iptables rules (see iptables.rs): local, proxy, exclusions.
        let _ = writeln!(s, "\t\toifname \"lo\" return");
        let _ = writeln!(s, "\t\tmeta skuid {} return", out.uid);
        let _ = writeln!(s, "\t\tmeta skgid {} return", out.gid);
        if let Some(mark) = out.mark {
            let _ = writeln!(s, "\t\tmeta mark {mark:#x} return");
        }
        if !out.exclude_ports.is_empty() {
            let _ = writeln!(s, "\t\ttcp dport {} return", port_set(&out.exclude_ports));
        }
        // One rule per CIDR rather than a set: an anonymous set refuses overlapping intervals.
        for c in &out.exclude_v4 {
            let _ = writeln!(s, "\t\tip daddr {c} return");
        }
        if policy.ipv6 {
            for c in &out.exclude_v6 {
                let _ = writeln!(s, "\t\tip6 daddr {c} return");
            }
        }
        let _ = writeln!(s, "\t\tjump out_redirect");
        let _ = writeln!(s, "\t}}\n");

        let _ = writeln!(s, "\tchain out_redirect {{");
        let _ = writeln!(s, "\t\tmeta l4proto tcp redirect to :{}", out.port);
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::netfilter::rules::PolicyOptions;

    fn options() -> PolicyOptions {
        PolicyOptions::example()
    }

    #[test]
    fn script_replaces_only_our_table() {
        let s = render(&Policy::new(&options(), true).unwrap());
        assert!(s.starts_with("table inet amazing_proxy\ndelete table inet amazing_proxy\n"));
        assert_eq!(s.matches("table ").count(), 3);
        assert!(s.contains("\t\tmeta l4proto tcp jump inbound\n"));
        assert!(s.contains("\t\tmeta l4proto tcp jump outbound\n"));
        assert!(s.contains("ip daddr 10.0.0.0/8 return"));
        assert!(s.contains("ip6 daddr fd00::/8 return"));
        let v4_only = render(&Policy::new(&options(), false).unwrap());
        assert!(v4_only.contains("meta nfproto ipv4 meta l4proto tcp jump outbound"));
        assert!(!v4_only.contains("fd00::/8"));
    }

    #[test]
    fn ipv6_off_and_no_outbound() {
        let mut o = options();
        o.no_outbound = true;
        o.inbound_ports = "80".parse().unwrap();
        let s = render(&Policy::new(&o, false).unwrap());
        assert!(s.contains("meta nfproto ipv4 meta l4proto tcp jump inbound"));
        assert!(s.contains("tcp dport 80 jump in_redirect"));
        assert!(!s.contains("outbound"));
    }
}
