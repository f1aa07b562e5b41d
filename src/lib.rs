//! amazing-proxy: a small, fast sidecar proxy for Kubernetes.
//!
//! One binary, five jobs. Layers point one way, each using only itself and those below it, with
//! no module cycles (tests/in_process/layers.rs reads the `use` paths and holds the code to this):
//! 1. [`vocab`] (ports, uid/gid/mark, port lists, CIDRs, durations, log formats: shared by all
//!    jobs), [`error`] (error kinds and whose fault), [`sync`], [`text_response`];
//! 2. [`identity`] (SPIFFE IDs, the material, HBONE's TLS); [`policy`]; [`routes`] (which route
//!    a request takes, and what applies to it: on the vocabulary only); [`settings`] (the data
//!    plane's configuration as plain values);
//! 3. [`telemetry`]: metrics and the access log;
//! 4. [`proxy`]: the data plane, in its own layers (exchange and phases, limits and upstreams,
//!    its state `Shared` and the exchange driver, protocol adapters, listeners), its state built
//!    by one constructor;
//! 5. the wiring: [`run`] (`run`, configured by [`config`]), [`admin`], and [`view`] (`tap`, `top`:
//!    clients of the admin listener's live stream).
//!
//! Beside the data plane, sharing only [`vocab`], [`error`] and [`identity`]: [`netfilter`]
//! (`init`: the pod's redirect rules), [`inject`] (`inject`, `uninject`), [`webhook`] (`webhook`)
//! and [`install`] (`install`).
#![forbid(unsafe_code)]
// The library's public surface is what the binary and the tests use; its module docs describe the
// internals and link to them (read with `cargo doc --document-private-items`).
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod admin;
pub mod config;
pub mod error;
pub mod identity;
pub mod inject;
pub mod install;
pub mod netfilter;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod run;
pub mod settings;
pub(crate) mod sync;
pub mod telemetry;
pub(crate) mod text_response;
pub mod view;
pub mod vocab;
pub mod webhook;
