//! The workload attestor seam: [`WorkloadAttestor`] turns a pinned [`Workload`] into
//! selectors, and [`AttestError`] says why it could not.
//!
//! It owns the trait and its error only; implementations live in plugin crates and the
//! agent decides how to run them (concurrently, on blocking threads, under one deadline).

use crate::selector::Selector;
use crate::workload::{Workload, WorkloadError};

/// Reads kernel-owned facts about a pinned process and returns its selectors.
///
/// Object-safe and shared as `Arc<dyn WorkloadAttestor>`. The call is synchronous: it may
/// block on `/proc` reads or hashing, so the agent runs it on a blocking thread under a
/// single deadline for all attestors.
///
/// Contract:
/// - `Ok(vec![])` when this attestor does not apply to the process (e.g. a container
///   attestor for a process outside any container).
/// - `Err` when it should apply but failed. Any `/proc` read error is a failure, never
///   "selector absent": a process whose `exe` cannot be read is not attested.
/// - Selectors come only from kernel-owned sources (SECURITY.md §2 rule 1).
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// The attestor's name, e.g. `unix`; also the kind of the selectors it returns.
    fn name(&self) -> &str;

    /// The selectors of `workload`. See the trait documentation for the contract.
    fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError>;
}

/// Why an attestor could not attest a process. Error messages never contain raw
/// selector values (paths, hashes, names).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// Pinning or reading the process failed (including: it exited).
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// `/proc/<pid>/status` shows other effective credentials than the socket reported
    /// (e.g. the caller exec'd a setuid binary after connecting).
    #[error("{field} in /proc ({found}) differs from the peer credentials ({expected})")]
    CredentialMismatch {
        /// `euid` or `egid`.
        field: &'static str,
        /// The value from `SO_PEERCRED`.
        expected: u32,
        /// The value from `/proc/<pid>/status`.
        found: u32,
    },
    /// The executable is larger than the configured hashing limit.
    #[error("executable is {size} bytes, over the hashing limit of {limit} bytes")]
    BinaryTooLarge {
        /// The size reported by `fstat` (or seen while reading).
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The executable changed while it was hashed (metadata before and after differ,
    /// or the process exec'd another binary meanwhile).
    #[error("executable changed while it was being hashed")]
    BinaryChanged,
    /// Any other failure, described without secrets or raw selector values.
    #[error("{0}")]
    Failed(String),
}
