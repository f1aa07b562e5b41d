//! The policy as `iptables-restore --noflush` input for the nat table.
//!
//! `--noflush` keeps everyone else's rules; the script then moves *our* part of the nat table from
//! what is there now to what we want, in one `COMMIT`, so the kernel takes all of it or none of it.
//! Declaring a chain (`:AMAZING_INBOUND - [0:0]`) creates it or flushes it, but the jumps from the
//! built-in `PREROUTING` and `OUTPUT` chains cannot be flushed without touching other rules, so the
//! script is a function of the policy *and* of the jumps currently present (read with
//! `iptables-save`): each is deleted by its exact spec before ours are appended. That is what makes a
//! second run leave the same rules as the first, and what lets `--clean` and the IPv6 rollback reuse
//! the same transition with another target.
//!
//! Rules are written in the normalised form `iptables-save` prints (`-m tcp`, hex marks), so what we
//! read back compares equal to what we wrote.

use super::rules::Policy;
use crate::vocab::Cidr;

pub(crate) const INBOUND: &str = "AMAZING_INBOUND";
pub(crate) const IN_REDIRECT: &str = "AMAZING_IN_REDIRECT";
pub(crate) const OUTPUT: &str = "AMAZING_OUTPUT";
pub(crate) const REDIRECT: &str = "AMAZING_REDIRECT";
/// Exactly the chains we own, in the order they are declared; nothing else is ever removed.
pub(crate) const OUR_CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Our part of a nat table: our chains, their rules, and the jumps into them from other chains.
/// Rules are `(chain, spec)` where spec is what follows `-A CHAIN `.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatState {
    pub(crate) chains: Vec<String>,
    pub(crate) rules: Vec<(String, String)>,
    pub(crate) jumps: Vec<(String, String)>,
}

impl NatState {
    pub(crate) fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.rules.is_empty() && self.jumps.is_empty()
    }
}

fn is_ours(chain: &str) -> bool {
    OUR_CHAINS.contains(&chain)
}

/// Whether a rule spec jumps (`-j`) or goes (`-g`) to one of our chains.
fn targets_ours(spec: &str) -> bool {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if matches!(w, "-j" | "--jump" | "-g" | "--goto") && words.next().is_some_and(is_ours) {
            return true;
        }
    }
    false
}

/// Reads our part of the nat table from `iptables-save` output (all tables or `-t nat`).
pub(crate) fn parse_nat(save: &str) -> NatState {
    let mut state = NatState::default();
    let mut in_nat = false;
    for line in save.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
        } else if line == "COMMIT" {
            in_nat = false;
        } else if !in_nat {
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if is_ours(name) {
                state.chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            if is_ours(chain) {
                state.rules.push((chain.to_string(), spec.to_string()));
            } else if targets_ours(spec) {
                state.jumps.push((chain.to_string(), spec.to_string()));
            }
        }
    }
    state
        .chains
        .sort_by_key(|c| OUR_CHAINS.iter().position(|o| o == c));
    state
}

/// Counts the rules of every table in `iptables-save` output (backend detection).
pub(crate) fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

fn cidr_rules(cidrs: &[Cidr]) -> impl Iterator<Item = String> + '_ {
    cidrs.iter().map(|c| format!("-d {c} -j RETURN"))
}

/// What the policy wants in the nat table of one family.
pub fn desired(policy: &Policy, family: Family) -> NatState {
    let mut s = NatState::default();
    let mut rule = |chain: &str, spec: String| s.rules.push((chain.to_string(), spec));

    for port in &policy.inbound_exclude {
        rule(INBOUND, format!("-p tcp -m tcp --dport {port} -j RETURN"));
    }
    if policy.inbound_only.is_empty() {
        rule(INBOUND, format!("-p tcp -j {IN_REDIRECT}"));
    } else {
        for port in &policy.inbound_only {
            rule(
                INBOUND,
                format!("-p tcp -m tcp --dport {port} -j {IN_REDIRECT}"),
            );
        }
    }
    rule(
        IN_REDIRECT,
        format!("-p tcp -j REDIRECT --to-ports {}", policy.inbound_port),
    );

    // Both families alike: IPv6 egress left alone would bypass the proxy (and `--outbound-mtls
    // strict`). An IPv6 REDIRECT leads to [::1]:port, where `run` listens too.
    let outbound = policy.outbound.as_ref();
    if let Some(out) = outbound {
        // Everything that leaves through lo stays local: 127.0.0.0/8 and ::1 (the proxy reaching
        // the app), but also the pod's own addresses (hairpin), which route via lo too.
        rule(OUTPUT, "-o lo -j RETURN".to_string());
        rule(
            OUTPUT,
            format!("-m owner --uid-owner {} -j RETURN", out.uid),
        );
        rule(
            OUTPUT,
            format!("-m owner --gid-owner {} -j RETURN", out.gid),
        );
        if let Some(mark) = out.mark {
            rule(OUTPUT, format!("-m mark --mark {mark:#x} -j RETURN"));
        }
        for port in &out.exclude_ports {
            rule(OUTPUT, format!("-p tcp -m tcp --dport {port} -j RETURN"));
        }
        let cidrs = match family {
            Family::V4 => &out.exclude_v4,
            Family::V6 => &out.exclude_v6,
        };
        for spec in cidr_rules(cidrs) {
            rule(OUTPUT, spec);
        }
        rule(OUTPUT, format!("-j {REDIRECT}"));
        rule(
            REDIRECT,
            format!("-p tcp -j REDIRECT --to-ports {}", out.port),
        );
    }

    s.jumps
        .push(("PREROUTING".to_string(), format!("-p tcp -j {INBOUND}")));
    if outbound.is_some() {
        s.jumps
            .push(("OUTPUT".to_string(), format!("-p tcp -j {OUTPUT}")));
    }
    let mut chains: Vec<String> = s.rules.iter().map(|(c, _)| c.clone()).collect();
    chains.dedup();
    s.chains = chains;
    s
}

/// The `iptables-restore --noflush` script taking our part of the nat table from `current` to
/// `target`; `None` when both are empty (nothing to do, nothing to run).
pub fn transition(current: &NatState, target: &NatState) -> Option<String> {
    if current.is_empty() && target.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    // Declaring flushes (or creates) every chain we touch, so stale rules cannot survive.
    for chain in OUR_CHAINS {
        let used = |s: &NatState| s.chains.iter().any(|c| c == chain);
        if used(current) || used(target) {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
    }
    for (chain, spec) in &current.jumps {
        out.push_str(&format!("-D {chain} {spec}\n"));
    }
    for chain in &current.chains {
        if !target.chains.contains(chain) {
            out.push_str(&format!("-X {chain}\n"));
        }
    }
    for (chain, spec) in target.rules.iter().chain(&target.jumps) {
        out.push_str(&format!("-A {chain} {spec}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The `--dry-run` text: each family's script under a comment naming the tool that takes it.
/// Only comments are added, so each part is exactly what is fed to the tool.
pub fn render_dry_run(parts: &[(Family, Option<String>)]) -> String {
    let mut out = String::new();
    for (family, script) in parts {
        let tool = match family {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        };
        out.push_str(&format!("# {}: {tool} --noflush\n", family.label()));
        out.push_str(script.as_deref().unwrap_or("# (nothing to change)\n"));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::netfilter::rules::PolicyOptions;

    fn options() -> PolicyOptions {
        PolicyOptions::example()
    }

    /// Renders what `iptables-save` would print for the state, to feed `parse_nat`.
    fn as_save(state: &NatState) -> String {
        let mut s = String::from(
            "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:OTHER - [0:0]\n",
        );
        for c in &state.chains {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        s.push_str("-A PREROUTING -p udp -j OTHER\n");
        for (c, r) in state.jumps.iter().chain(&state.rules) {
            s.push_str(&format!("-A {c} {r}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }

    #[test]
    fn parse_reads_back_what_we_write_and_ignores_others() {
        let p = Policy::new(&options(), true).unwrap();
        for family in [Family::V4, Family::V6] {
            let want = desired(&p, family);
            assert_eq!(parse_nat(&as_save(&want)), want);
        }
        assert_eq!(count_rules(&as_save(&desired(&p, Family::V4))), 17);
    }

    #[test]
    fn second_run_deletes_the_previous_jumps_first() {
        let p = Policy::new(&options(), false).unwrap();
        let want = desired(&p, Family::V4);
        let script = transition(&want, &want).unwrap();
        assert!(script.contains("-D PREROUTING -p tcp -j AMAZING_INBOUND\n"));
        assert!(script.contains("-D OUTPUT -p tcp -j AMAZING_OUTPUT\n"));
        assert_eq!(script.matches("-A PREROUTING").count(), 1);
        assert!(!script.contains("-X"));
        assert_eq!(script.matches("COMMIT").count(), 1);
    }

    #[test]
    fn clean_removes_only_our_chains() {
        let p = Policy::new(&options(), true).unwrap();
        let script = transition(&desired(&p, Family::V4), &NatState::default()).unwrap();
        assert!(!script.contains("-A "));
        assert!(!script.contains("OTHER"));
        assert_eq!(script.matches("-X AMAZING_").count(), 4);
        assert_eq!(transition(&NatState::default(), &NatState::default()), None);
    }

    #[test]
    fn ipv6_outbound_is_redirected_like_ipv4() {
        let p = Policy::new(&options(), true).unwrap();
        let (v4, v6) = (desired(&p, Family::V4), desired(&p, Family::V6));
        assert_eq!(v6.chains, OUR_CHAINS);
        assert_eq!(v6.jumps, v4.jumps);
        assert!(v6.rules.iter().any(|(_, r)| r == "-d fd00::/8 -j RETURN"));
        assert!(!v6.rules.iter().any(|(_, r)| r.contains("10.0.0.0")));
        let without_cidrs = |s: &NatState| -> Vec<(String, String)> {
            s.rules
                .iter()
                .filter(|(_, r)| !r.starts_with("-d "))
                .cloned()
                .collect()
        };
        assert_eq!(without_cidrs(&v6), without_cidrs(&v4));
    }

    #[test]
    fn jumps_from_any_chain_are_found() {
        let save = "*nat\n:MINE - [0:0]\n:AMAZING_OUTPUT - [0:0]\n-A MINE -g AMAZING_OUTPUT\n-A MINE -j AMAZING_OTHER\nCOMMIT\n";
        let s = parse_nat(save);
        assert_eq!(
            s.jumps,
            [("MINE".to_string(), "-g AMAZING_OUTPUT".to_string())]
        );
        assert_eq!(s.chains, ["AMAZING_OUTPUT"]);
    }
}
