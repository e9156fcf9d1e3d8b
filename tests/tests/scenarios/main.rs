//! Every scenario of tessera in one test binary (one link step for the whole suite):
//! real servers and agents on temp dirs, loopback and Unix sockets, driven by real
//! clients.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs,
    unreachable_pub,
    reason = "scenario tests: a failed step is a failed test"
)]

mod audit;
mod cli;
mod entries;
mod federation;
mod hardening;
mod high_availability;
mod instances;
mod jwt;
mod node_api;
mod propagation;
mod revocation;
mod rotation;
mod selectors;
mod server_down;
mod support;
mod upstream;
mod workload_api;
mod x509pop;
