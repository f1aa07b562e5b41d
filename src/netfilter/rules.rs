//! The redirection policy as plain data: what to redirect and what to let through, decided once
//! from the options and shared by both renderers, so that iptables and nftables cannot drift.

use crate::vocab::{Cidr, CidrList, HBONE_PORT, PortList};

/// The inputs of the policy, already parsed; everything that is not I/O.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    pub(crate) inbound_port: u16,
    pub(crate) outbound_port: u16,
    pub(crate) admin_port: u16,
    pub(crate) inbound_ports: PortList,
    pub(crate) exclude_inbound_ports: PortList,
    pub(crate) exclude_outbound_ports: PortList,
    pub(crate) exclude_outbound_cidrs: CidrList,
    pub(crate) proxy_uid: u32,
    pub(crate) proxy_gid: u32,
    /// 0 disables the mark exception (as `run --proxy-mark 0` disables setting it).
    pub(crate) proxy_mark: u32,
    pub(crate) no_outbound: bool,
}

/// What the rules do, for both families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Where inbound TCP is redirected (the proxy's `run --inbound` port).
    pub(crate) inbound_port: u16,
    /// Inbound destination ports left alone: the user's exclusions plus our own listeners.
    pub(crate) inbound_exclude: Vec<u16>,
    /// Inbound destination ports redirected; empty means every TCP port not excluded.
    pub(crate) inbound_only: Vec<u16>,
    /// `None` with `--no-outbound`.
    pub(crate) outbound: Option<Outbound>,
    /// Whether IPv6 rules are installed at all (`--ipv6`, resolved).
    pub ipv6: bool,
}

/// The app's own connections: redirected to the outbound listener except for these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Outbound {
    pub(crate) port: u16,
    pub(crate) exclude_ports: Vec<u16>,
    pub(crate) exclude_v4: Vec<Cidr>,
    pub(crate) exclude_v6: Vec<Cidr>,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mark: Option<u32>,
}

impl Policy {
    /// Builds the policy; `ipv6` is the resolved `--ipv6` (I/O decides `auto`).
    pub fn new(o: &PolicyOptions, ipv6: bool) -> Result<Policy, String> {
        for (name, port) in [
            ("--inbound-port", o.inbound_port),
            ("--outbound-port", o.outbound_port),
            ("--admin-port", o.admin_port),
        ] {
            if port == 0 {
                return Err(format!("{name} must be 1-65535, got 0"));
            }
        }
        if o.inbound_port == o.admin_port
            || (!o.no_outbound
                && (o.outbound_port == o.inbound_port || o.outbound_port == o.admin_port))
        {
            return Err(format!(
                "--inbound-port {}, --outbound-port {} and --admin-port {} must be three different ports",
                o.inbound_port, o.outbound_port, o.admin_port
            ));
        }
        // Our own ports are never redirected inbound: the admin port must not become reachable
        // through the proxy (it would forward to 127.0.0.1:15000), nor the outbound listener
        // (an open relay; it may run even with --no-outbound), and the inbound port itself is
        // already the proxy. HBONE (15008) arrives encrypted at the proxy's own listener.
        let mut inbound_exclude = o.exclude_inbound_ports.0.clone();
        inbound_exclude.extend([o.inbound_port, o.admin_port, o.outbound_port, HBONE_PORT]);
        inbound_exclude.sort_unstable();
        inbound_exclude.dedup();
        let inbound_only: Vec<u16> = o
            .inbound_ports
            .0
            .iter()
            .copied()
            .filter(|p| !inbound_exclude.contains(p))
            .collect();
        if !o.inbound_ports.0.is_empty() && inbound_only.is_empty() {
            return Err(format!(
                "every port of --inbound-ports {:?} is excluded (--exclude-inbound-ports or the proxy's own ports {:?}): nothing would be redirected",
                o.inbound_ports.0, inbound_exclude
            ));
        }
        let outbound = (!o.no_outbound).then(|| Outbound {
            port: o.outbound_port,
            exclude_ports: o.exclude_outbound_ports.0.clone(),
            exclude_v4: o
                .exclude_outbound_cidrs
                .0
                .iter()
                .copied()
                .filter(Cidr::is_ipv4)
                .collect(),
            exclude_v6: o
                .exclude_outbound_cidrs
                .0
                .iter()
                .copied()
                .filter(|c| !c.is_ipv4())
                .collect(),
            uid: o.proxy_uid,
            gid: o.proxy_gid,
            mark: (o.proxy_mark != 0).then_some(o.proxy_mark),
        });
        Ok(Policy {
            inbound_port: o.inbound_port,
            inbound_exclude,
            inbound_only,
            outbound,
            ipv6,
        })
    }
}

#[cfg(test)]
use crate::vocab::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_MARK, PROXY_UID};

#[cfg(test)]
impl PolicyOptions {
    /// The default ports, uid, gid and mark, plus one outbound exclusion of each family: the
    /// renderers' unit-test fixture.
    pub(crate) fn example() -> PolicyOptions {
        PolicyOptions {
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            admin_port: ADMIN_PORT,
            inbound_ports: PortList::default(),
            exclude_inbound_ports: PortList::default(),
            exclude_outbound_ports: PortList::default(),
            exclude_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse().expect("valid CIDRs"),
            proxy_uid: PROXY_UID,
            proxy_gid: PROXY_GID,
            proxy_mark: PROXY_MARK,
            no_outbound: false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn defaults() -> PolicyOptions {
        PolicyOptions {
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            admin_port: ADMIN_PORT,
            inbound_ports: PortList::default(),
            exclude_inbound_ports: PortList::default(),
            exclude_outbound_ports: PortList::default(),
            exclude_outbound_cidrs: CidrList::default(),
            proxy_uid: PROXY_UID,
            proxy_gid: PROXY_GID,
            proxy_mark: PROXY_MARK,
            no_outbound: false,
        }
    }

    #[test]
    fn own_ports_are_always_excluded_inbound() {
        let p = Policy::new(&defaults(), false).unwrap();
        assert_eq!(p.inbound_exclude, vec![8000, 15000, 15001, 15008]);
        assert!(p.inbound_only.is_empty());
        let mut o = defaults();
        o.no_outbound = true;
        o.inbound_ports = "80,15000".parse().unwrap();
        let p = Policy::new(&o, false).unwrap();
        assert_eq!(p.inbound_exclude, vec![8000, 15000, 15001, 15008]);
        assert_eq!(p.inbound_only, vec![80]);
        assert!(p.outbound.is_none());
    }

    #[test]
    fn cidrs_go_to_their_family_and_mark_zero_disables() {
        let mut o = defaults();
        o.exclude_outbound_cidrs = "10.0.0.0/8,fd00::/8".parse().unwrap();
        o.proxy_mark = 0;
        let out = Policy::new(&o, false).unwrap().outbound.unwrap();
        assert_eq!(out.exclude_v4.len(), 1);
        assert_eq!(out.exclude_v6.len(), 1);
        assert_eq!(out.mark, None);
    }

    #[test]
    fn inconsistent_ports_are_refused() {
        let mut o = defaults();
        o.outbound_port = 8000;
        assert!(Policy::new(&o, false).is_err());
        let mut o = defaults();
        o.inbound_ports = "8000,15001".parse().unwrap();
        assert!(Policy::new(&o, false).is_err());
        let mut o = defaults();
        o.admin_port = 0;
        assert!(Policy::new(&o, false).is_err());
    }
}
