//! amazing-proxy: a small, fast sidecar proxy for Kubernetes.
//!
//! One binary, four jobs. Layers point one way, each using only those above it:
//! 1. [`vocab`] (ports, uid/gid/mark, port lists, CIDRs, durations, log formats: shared by all
//!    jobs), [`error`] (error kinds and whose fault), [`identity`] (SPIFFE IDs), [`text_response`];
//! 2. [`telemetry`]: metrics and the access log;
//! 3. [`proxy`]: the data plane, in its own layers (exchange and phases, limits and upstreams,
//!    protocol adapters, listeners), its state built by one constructor;
//! 4. the wiring: [`run`] (`run`, configured by [`config`]) and [`admin`].
//!
//! Beside the data plane, sharing only layer 1: [`netfilter`] (`init`: the pod's redirect rules),
//! [`inject`] (`inject`, `uninject`), [`webhook`] (`webhook`) and [`install`] (`install`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod error;
pub mod identity;
pub mod inject;
pub mod install;
pub mod netfilter;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod settings;
pub mod sync;
pub mod telemetry;
pub mod text_response;
pub mod vocab;
pub mod webhook;
