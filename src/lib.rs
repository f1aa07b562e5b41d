//! amazing-proxy: a small, fast sidecar proxy for Kubernetes.
//!
//! One binary, four jobs, one module each:
//! - [`proxy`]: the data plane (`run`): inbound and outbound listeners, HTTP and opaque TCP forwarding,
//!   drain; configured by [`config`], observed through [`telemetry`] and served on [`admin`];
//! - [`netfilter`]: the pod's traffic redirection (`init`): iptables or nftables rules;
//! - [`inject`]: adds the sidecar to Kubernetes manifests (`inject`);
//! - [`webhook`]: the same injection as an admission webhook (`webhook`), installed by [`install`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod error;
pub mod identity;
pub mod inject;
pub mod install;
pub mod netfilter;
pub mod proxy;
pub mod telemetry;
pub mod vocab;
pub mod webhook;
