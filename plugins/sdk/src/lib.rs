//! The plugin SDK of tessera: the traits at each plugin seam and the domain types they
//! speak (SPIFFE IDs, selectors, workloads, registration entries), plus the small file
//! helpers every component that keeps secrets on disk shares.
//!
//! It owns no I/O policy of the agent or server: those crates inject implementations
//! of these traits and decide how to run them.

pub mod attestor;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod entry;
pub mod fs;
pub mod id;
pub mod jwt;
pub mod keymanager;
pub mod selector;
pub mod selector_schema;
pub mod socket;
pub mod template;
#[cfg(feature = "testing")]
pub mod testing;
pub mod workload;
pub mod x509;

pub use attestor::{AttestError, WorkloadAttestor};
pub use entry::RegistrationEntry;
pub use id::{IdError, SpiffeId, TrustDomain};
pub use keymanager::{KeyManager, KeyManagerError, KeyType, SignatureFormat, SigningKey};
pub use selector::{Selector, SelectorError};
pub use template::{Placeholder, SpiffeIdTemplate, TemplateError, TemplateValues};
pub use workload::{Workload, WorkloadError};
