//! The namespace suite: tests that build network namespaces, veth pairs and packet-filter rules
//! (a reproduced pod, two pods of a mesh, `init`'s rules against real kernels). They need root;
//! elsewhere each says SKIP (`support::skip`). Every namespace is removed by a guard, even when a
//! test fails; addresses are in 198.18.0.0/15 only.
//!
//! Each file here is a module, its tests named `<module>::<test>`:
//! `sudo -E cargo test --test netns mtls::` runs one file. A new file joins with one `mod` line.

#[path = "../support/mod.rs"]
mod support;

mod containment;
mod e2e_pod;
mod init_netns;
mod istio_metrics;
mod mtls;
mod resilience;
mod routes;
mod traces;
