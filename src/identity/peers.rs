//! `--peer-identities FILE`: the identity expected of the HBONE server at an address, one
//! `CIDR-or-address SPIFFE-ID` per line (`#` starts a comment). Without an entry, any identity
//! of our trust domain is accepted, as ztunnel does for a workload it knows nothing about.

use std::net::IpAddr;
use std::path::Path;

use super::SpiffeId;
use crate::vocab::Cidr;

#[derive(Clone, Debug, Default)]
pub struct PeerIdentities(Vec<(Cidr, SpiffeId)>);

impl PeerIdentities {
    pub fn load(path: &Path) -> Result<PeerIdentities, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --peer-identities {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--peer-identities {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<PeerIdentities, String> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(cidr), Some(id), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(format!(
                    "line {}: expected `CIDR-or-address SPIFFE-ID`, got `{line}`",
                    number + 1
                ));
            };
            let cidr: Cidr = cidr
                .parse()
                .map_err(|e| format!("line {}: {e}", number + 1))?;
            let id: SpiffeId = id
                .parse()
                .map_err(|e| format!("line {}: {e}", number + 1))?;
            entries.push((cidr, id));
        }
        Ok(PeerIdentities(entries))
    }

    /// The identity expected at `ip`: the entry with the longest matching prefix.
    pub fn expected(&self, ip: IpAddr) -> Option<&SpiffeId> {
        self.0
            .iter()
            .filter(|(cidr, _)| contains(cidr, ip))
            .max_by_key(|(cidr, _)| cidr.prefix)
            .map(|(_, id)| id)
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

    #[test]
    fn longest_prefix_wins_and_bad_lines_are_named() {
        let peers = PeerIdentities::parse(
            "# pods\n198.18.0.0/15 spiffe://cluster.local/ns/a/sa/any\n198.18.0.7 spiffe://cluster.local/ns/b/sa/db\n",
        )
        .expect("parses");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            peers
                .expected(ip("198.18.0.7"))
                .map(ToString::to_string)
                .as_deref(),
            Some("spiffe://cluster.local/ns/b/sa/db")
        );
        assert_eq!(
            peers
                .expected(ip("198.19.1.1"))
                .map(ToString::to_string)
                .as_deref(),
            Some("spiffe://cluster.local/ns/a/sa/any")
        );
        assert!(peers.expected(ip("198.20.0.1")).is_none());
        assert!(peers.expected(ip("::1")).is_none());
        let err = PeerIdentities::parse("\n198.18.0.1\n").expect_err("one field");
        assert!(err.starts_with("line 2:"), "{err}");
        let err = PeerIdentities::parse("198.18.0.1 spiffe://x/ns/a").expect_err("bad id");
        assert!(err.contains("not a workload SPIFFE ID"), "{err}");
    }
}
