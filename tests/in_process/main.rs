//! The in-process suite: every integration test that needs neither root nor containers, in one
//! binary (one link, one copy of tests/support). Data planes built by `Shared::new` in this
//! process, the binary started as a child on loopback, local servers (tonic, tungstenite, httpbin,
//! Redis, MariaDB, dnsmasq) and the goldens. A test whose external program is missing says SKIP
//! (`support::skip`).
//!
//! Each file here is a module, its tests named `<module>::<test>`:
//! `cargo test --test in_process proxy_http::` runs one file, a full name runs one test.
//! A new file joins the suite with one `mod` line below.

#[path = "../support/mod.rs"]
mod support;

mod cli;
mod containment;
mod docs;
mod early_answers;
mod endpoints_dns;
mod h1_attacks;
mod h2_attacks;
mod http1_golden;
mod http_conformance;
mod hyper_request_bodies;
mod identity_cli;
mod identity_spire;
mod in_process;
mod inject_golden;
mod layers;
mod mtls;
mod netfilter_golden;
mod protocols_grpc;
mod protocols_h2_connect;
mod protocols_tcp;
mod protocols_websocket;
mod proxy_admin_drain;
mod proxy_failures;
mod proxy_http;
mod release_script;
mod resilience;
mod retry_attacks;
mod routes_golden;
mod routes_phases;
mod seed_httpbin;
mod tap;
mod top;
mod traces;
mod vocab_consistency;
mod webhook_tls;
