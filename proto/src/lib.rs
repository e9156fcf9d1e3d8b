//! Protocol buffers of tessera, with generated code checked in under `src/gen/`
//! (produced by protox + tonic-prost-build; `tests/bootstrap.rs` verifies it).
//!
//! - [`workload`]: the SPIFFE Workload API, vendored verbatim (see `proto/UPSTREAM`). The
//!   upstream file has no `package`, so its wire paths are `/SpiffeWorkloadAPI/...`.
//! - [`node`]: the agent <-> server API (`tessera.node.v1`).
//! - [`admin`]: the operator API of the server, on a local Unix socket
//!   (`tessera.admin.v1`).
//! - [`types`]: messages shared by the node and admin APIs (`tessera.types.v1`).

/// The SPIFFE Workload API (`SpiffeWorkloadAPI` service), generated from the vendored
/// upstream file.
#[allow(
    missing_docs,
    clippy::all,
    clippy::allow_attributes_without_reason,
    reason = "generated code; the .proto files carry the documentation"
)]
pub mod workload {
    include!("gen/_.rs");
}

/// The `tessera.*` packages, nested as prost's cross-package paths expect.
pub mod tessera {
    /// `tessera.types.v1`.
    pub mod types {
        /// Version 1.
        #[allow(
            missing_docs,
            clippy::all,
            clippy::allow_attributes_without_reason,
            reason = "generated code; the .proto files carry the documentation"
        )]
        pub mod v1 {
            include!("gen/tessera.types.v1.rs");
        }
    }
    /// `tessera.node.v1`.
    pub mod node {
        /// Version 1.
        #[allow(
            missing_docs,
            clippy::all,
            clippy::allow_attributes_without_reason,
            reason = "generated code; the .proto files carry the documentation"
        )]
        pub mod v1 {
            include!("gen/tessera.node.v1.rs");
        }
    }
    /// `tessera.admin.v1`.
    pub mod admin {
        /// Version 1.
        #[allow(
            missing_docs,
            clippy::all,
            clippy::allow_attributes_without_reason,
            reason = "generated code; the .proto files carry the documentation"
        )]
        pub mod v1 {
            include!("gen/tessera.admin.v1.rs");
        }
    }
}

pub use tessera::admin::v1 as admin;
pub use tessera::node::v1 as node;
pub use tessera::types::v1 as types;

pub mod connection;
pub mod convert;
pub mod uds;
