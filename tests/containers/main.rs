//! The container suite: the tutorial's pod in Docker, from the project's image (needs root and
//! Docker; elsewhere it says SKIP). Its own binary, so the namespace and in-process suites run
//! without Docker: `cargo test --test containers`.

#[path = "../support/mod.rs"]
mod support;

mod e2e_containers;
