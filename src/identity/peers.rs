//! `--peer-identities FILE` (or the same text inline, `--peer-identities-inline`, which `inject`
//! writes from the `amazing-proxy.io/peer-identities` annotation): the identity expected of the
//! HBONE server at an address, one `CIDR-or-address SPIFFE-ID` entry per line or between `;`
//! (`#` starts a comment that runs to the end of the line). Without an entry, any identity of our
//! trust domain is accepted, as ztunnel does for a workload it knows nothing about; a server of
//! another trust domain only where an entry names it. One CIDR given twice is an error.

use std::net::IpAddr;
use std::path::Path;

use super::SpiffeId;
use crate::vocab::Cidr;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerIdentities(Vec<(Cidr, SpiffeId)>);

impl PeerIdentities {
    pub(crate) fn load(path: &Path) -> Result<PeerIdentities, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --peer-identities {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--peer-identities {}: {e}", path.display()))
    }

    pub(crate) fn parse(text: &str) -> Result<PeerIdentities, String> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("");
            for entry in line.split(';').map(str::trim).filter(|e| !e.is_empty()) {
                let at = |e: String| format!("line {}: {e}", number + 1);
                let mut fields = entry.split_whitespace();
                let (Some(cidr), Some(id), None) = (fields.next(), fields.next(), fields.next())
                else {
                    return Err(at(format!(
                        "expected `CIDR-or-address SPIFFE-ID`, got `{entry}`"
                    )));
                };
                let cidr: Cidr = cidr.parse().map_err(at)?;
                let id: SpiffeId = id
                    .parse()
                    .map_err(|e: super::InvalidSpiffeId| at(e.to_string()))?;
                if let Some((_, first)) = entries.iter().find(|(c, _)| *c == cidr) {
                    return Err(at(format!(
                        "{cidr} is given twice ({first}, then {id}); give each address one identity"
                    )));
                }
                entries.push((cidr, id));
            }
        }
        Ok(PeerIdentities(entries))
    }

    /// The identity expected at `ip`: the entry with the longest matching prefix.
    pub(crate) fn expected(&self, ip: IpAddr) -> Option<&SpiffeId> {
        self.0
            .iter()
            .filter(|(cidr, _)| contains(cidr, ip))
            .max_by_key(|(cidr, _)| cidr.prefix)
            .map(|(_, id)| id)
    }
}

/// The entries in one line, `;`-separated (the inline form `inject` writes).
impl std::fmt::Display for PeerIdentities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (cidr, id)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{cidr} {id}")?;
        }
        Ok(())
    }
}

fn contains(cidr: &Cidr, ip: IpAddr) -> bool {
    let (net, ip, bits) = match (cidr.addr, ip.to_canonical()) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (u128::from(u32::from(n)), u128::from(u32::from(i)), 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
        _ => return false,
    };
    let host_bits = bits - u32::from(cidr.prefix);
    (net ^ ip).checked_shr(host_bits).unwrap_or(0) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity `peers` expects at `ip`, as text.
    fn expected_at(peers: &PeerIdentities, ip: &str) -> Option<String> {
        peers
            .expected(ip.parse().expect("ip"))
            .map(ToString::to_string)
    }

    #[test]
    fn longest_prefix_wins_and_bad_lines_are_named() {
        let peers = PeerIdentities::parse(
            "# pods\n198.18.0.0/15 spiffe://cluster.local/ns/a/sa/any\n198.18.0.7 spiffe://cluster.local/ns/b/sa/db\n",
        )
        .expect("parses");
        assert_eq!(
            expected_at(&peers, "198.18.0.7").as_deref(),
            Some("spiffe://cluster.local/ns/b/sa/db")
        );
        assert_eq!(
            expected_at(&peers, "198.19.1.1").as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/any")
        );
        assert_eq!(expected_at(&peers, "198.20.0.1"), None);
        assert_eq!(expected_at(&peers, "::1"), None);
        let err = PeerIdentities::parse("\n198.18.0.1\n").expect_err("one field");
        assert!(err.starts_with("line 2:"), "{err}");
        let err = PeerIdentities::parse("198.18.0.1 spiffe://x/ns/a").expect_err("bad id");
        assert!(err.contains("not a workload SPIFFE ID"), "{err}");
    }

    #[test]
    fn the_inline_form_separates_entries_with_semicolons_and_round_trips() {
        let text = "198.18.0.7 spiffe://cluster.local/ns/b/sa/db; 198.18.0.0/15 spiffe://partner.example/ns/a/sa/any;";
        let peers = PeerIdentities::parse(text).expect("parses");
        assert_eq!(
            expected_at(&peers, "198.18.0.7").as_deref(),
            Some("spiffe://cluster.local/ns/b/sa/db")
        );
        assert_eq!(
            peers.to_string(),
            "198.18.0.7/32 spiffe://cluster.local/ns/b/sa/db; 198.18.0.0/15 spiffe://partner.example/ns/a/sa/any"
        );
        assert_eq!(PeerIdentities::parse(&peers.to_string()), Ok(peers));
        // One address, two identities: which one would be meant?
        let err = PeerIdentities::parse(
            "198.18.0.7 spiffe://cluster.local/ns/b/sa/db\n198.18.0.7/32 spiffe://cluster.local/ns/b/sa/other",
        )
        .expect_err("twice");
        assert!(
            err.starts_with("line 2: 198.18.0.7/32 is given twice"),
            "{err}"
        );
        let err = PeerIdentities::parse("198.18.0.7 spiffe://cluster.local/ns/b/sa/db 1.2.3.4")
            .expect_err("three fields");
        assert!(
            err.contains("expected `CIDR-or-address SPIFFE-ID`"),
            "{err}"
        );
    }
}
