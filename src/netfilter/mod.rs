//! `amazing-proxy init`: the pod's traffic redirection, run once in an init container.
//!
//! The rules are a pure function of the options ([`rules::Policy`]), rendered either as
//! `iptables-restore --noflush` input for the nat table ([`iptables`], IPv4 and IPv6) or as one
//! native nftables table ([`nft`]), then applied atomically by [`apply`]. Keeping the policy apart
//! from the renderers is what lets golden files pin both backends and keeps them in step.
//!
//! **What is redirected.** Inbound: TCP arriving at the pod (nat `PREROUTING`) goes to
//! `--inbound-port`, or only `--inbound-ports`, minus `--exclude-inbound-ports` and always minus
//! the proxy's own ports (admin, inbound, outbound), which would otherwise expose the admin
//! listener or the outbound listener through the proxy. Outbound: the app's TCP (nat `OUTPUT`)
//! goes to `--outbound-port`, except what leaves through `lo`, the proxy's own sockets (by
//! `--proxy-uid`, `--proxy-gid`, or the `--proxy-mark` the proxy sets with SO_MARK, which also covers
//! a proxy running as root; `--proxy-mark 0` disables that exception), `--exclude-outbound-ports`
//! and `--exclude-outbound-cidrs`. UDP is never touched. No loop is possible as long as one of
//! uid, gid or mark identifies the proxy.
//!
//! **Hairpin.** A connection from the pod to its own pod IP routes through `lo`, so the
//! `-o lo` exception lets it go straight to the app: not redirected outbound, and never seen by
//! `PREROUTING` (locally generated traffic is NAT-ed in `OUTPUT` only). Istio instead sends such
//! traffic through its inbound path to apply policy; we have no per-request inbound policy that
//! would need it, and excluding by interface needs no knowledge of the pod's addresses at init
//! time. The cost: self-calls do not appear in the proxy's telemetry.
//!
//! **IPv6.** `--ipv6 auto` installs IPv6 rules when the kernel has IPv6 (and, for iptables, when
//! `ip6tables-save` works in the namespace), and they are the IPv4 rules: inbound IPv6 is
//! redirected to the inbound port (the proxy must accept IPv6 there, `run --inbound [::]:8000`,
//! else such connections are refused), and the app's IPv6 egress to the outbound port, with the
//! same exceptions. An IPv6 REDIRECT leads to `[::1]:<outbound-port>`, where `run` listens too
//! (its outbound listener on 127.0.0.1 has a twin on ::1). Leaving IPv6 egress alone would let the
//! app bypass the proxy, its policy and `--outbound-mtls strict` by dialling an IPv6 address; if
//! nothing listens on ::1 (a proxy with another `--outbound`) the app's IPv6 connections are
//! refused, which fails closed. `--ipv6 off`, or a kernel with IPv6 but no working ip6tables,
//! leaves IPv6 untouched in both directions, with a warning when the namespace has IPv6 addresses
//! beyond loopback. (`--ipv6-outbound-redirect`, the old opt-in, is accepted and ignored.)
//!
//! **Atomicity and idempotency.** iptables: one script per family, one `COMMIT`, `--noflush`; it
//! declares (creates or flushes) our chains, deletes the jumps to them currently present (read with
//! `iptables-save`), and appends rules and jumps: all or nothing, and a second run leaves the same
//! rules. If IPv6 fails after IPv4 succeeded, IPv4 is put back as it was. nft: one `nft -f`
//! transaction that creates, deletes and recreates `table inet amazing_proxy`. `--clean` removes
//! exactly our chains and the jumps to them (or our table), nothing else.
//!
//! **Backend detection** (`--backend auto`), from what the namespace holds rather than from which
//! binary the image ships: (1) wherever rules of ours already are; (2) iptables-legacy if its
//! tables hold more rules than iptables-nft's (`iptables-legacy-save` vs `iptables-nft-save`, IPv4
//! and IPv6); (3) iptables-nft if it holds any rule; (4) native nft if `nft list tables` shows
//! tables iptables-nft did not create; (5) an empty namespace: iptables-nft, else nft, else
//! iptables-legacy, depending on what is installed. nf_tables is today's kernel default and
//! iptables-nft keeps the rules visible to iptables-based tooling, which is also Istio's default.
//! `--backend iptables` picks the variant with the same rules (1, 2), defaulting to nf_tables.
//! `--clean` with `auto` cleans every backend where rules of ours are found.

use clap::Args;

pub(crate) mod apply;
pub mod iptables;
pub mod nft;
pub mod rules;

use crate::vocab::{self, CidrList, PortList, parse_port};
pub use apply::{BackendChoice, InitError, Ipv6Mode};
use rules::PolicyOptions;

#[derive(Args, Clone, Debug)]
pub struct InitArgs {
    /// Where the rules go: detected from the rules present in the namespace, or forced.
    #[arg(
        long,
        env = "AMAZING_PROXY_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub(crate) backend: BackendChoice,

    /// Port inbound traffic is redirected to (the proxy's `run --inbound` port).
    #[arg(long, env = "AMAZING_PROXY_INBOUND_PORT", default_value_t = vocab::INBOUND_PORT, value_parser = parse_port)]
    pub(crate) inbound_port: u16,

    /// Port the app's outbound traffic is redirected to (the proxy's `run --outbound` port).
    #[arg(long, env = "AMAZING_PROXY_OUTBOUND_PORT", default_value_t = vocab::OUTBOUND_PORT, value_parser = parse_port)]
    pub(crate) outbound_port: u16,

    /// The proxy's admin port: never redirected inbound.
    #[arg(long, env = "AMAZING_PROXY_ADMIN_PORT", default_value_t = vocab::ADMIN_PORT, value_parser = parse_port)]
    pub(crate) admin_port: u16,

    /// Only these inbound TCP ports are redirected (comma-separated); empty means all.
    #[arg(long, env = "AMAZING_PROXY_INBOUND_PORTS", default_value = "")]
    pub(crate) inbound_ports: PortList,

    /// Inbound TCP ports never redirected (comma-separated).
    #[arg(long, env = "AMAZING_PROXY_EXCLUDE_INBOUND_PORTS", default_value = "")]
    pub(crate) exclude_inbound_ports: PortList,

    /// Outbound TCP destination ports never redirected (comma-separated).
    #[arg(long, env = "AMAZING_PROXY_EXCLUDE_OUTBOUND_PORTS", default_value = "")]
    pub(crate) exclude_outbound_ports: PortList,

    /// Outbound destinations never redirected: IPv4 and IPv6 CIDRs, comma-separated.
    #[arg(long, env = "AMAZING_PROXY_EXCLUDE_OUTBOUND_CIDRS", default_value = "")]
    pub(crate) exclude_outbound_cidrs: CidrList,

    /// The proxy's uid: its connections are not redirected.
    #[arg(long, env = "AMAZING_PROXY_PROXY_UID", default_value_t = vocab::PROXY_UID)]
    pub(crate) proxy_uid: u32,

    /// The proxy's gid: its connections are not redirected.
    #[arg(long, env = "AMAZING_PROXY_PROXY_GID", default_value_t = vocab::PROXY_GID)]
    pub(crate) proxy_gid: u32,

    /// Socket mark the proxy sets on its upstream sockets (`run --proxy-mark`): not redirected.
    /// 0 disables this exception.
    #[arg(long, env = "AMAZING_PROXY_PROXY_MARK", default_value_t = vocab::PROXY_MARK)]
    pub(crate) proxy_mark: u32,

    /// Redirect inbound traffic only.
    #[arg(long, env = "AMAZING_PROXY_NO_OUTBOUND")]
    pub(crate) no_outbound: bool,

    /// IPv6 rules: auto = when the kernel has IPv6 and ip6tables works in the namespace.
    #[arg(long, env = "AMAZING_PROXY_IPV6", value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,

    /// Kept for old manifests: IPv6 egress is now always redirected with the IPv6 rules.
    #[arg(long, env = "AMAZING_PROXY_IPV6_OUTBOUND_REDIRECT", hide = true)]
    pub(crate) ipv6_outbound_redirect: bool,

    /// Print the exact script that would be applied, change nothing.
    #[arg(long, env = "AMAZING_PROXY_DRY_RUN")]
    pub(crate) dry_run: bool,

    /// Remove our chains and jumps (or our nft table), and nothing else.
    #[arg(long, env = "AMAZING_PROXY_CLEAN")]
    pub(crate) clean: bool,
}

impl InitArgs {
    /// The I/O-free part of the options.
    pub fn policy_options(&self) -> PolicyOptions {
        PolicyOptions {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            inbound_ports: self.inbound_ports.clone(),
            exclude_inbound_ports: self.exclude_inbound_ports.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.clone(),
            exclude_outbound_cidrs: self.exclude_outbound_cidrs.clone(),
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            proxy_mark: self.proxy_mark,
            no_outbound: self.no_outbound,
        }
    }
}

pub fn main(args: InitArgs) -> Result<(), InitError> {
    if args.ipv6_outbound_redirect {
        tracing::warn!(
            "--ipv6-outbound-redirect is ignored: IPv6 egress is redirected whenever IPv6 rules are installed"
        );
    }
    apply::run_init(&apply::Settings {
        backend: args.backend,
        ipv6: args.ipv6,
        dry_run: args.dry_run,
        clean: args.clean,
        options: args.policy_options(),
    })
}
