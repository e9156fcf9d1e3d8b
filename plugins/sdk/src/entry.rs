//! Registration entries: the rule that says which workloads, under which parent, get
//! which SPIFFE ID and with which SVID parameters.

use std::time::Duration;

use crate::id::SpiffeId;
use crate::id::TrustDomain;
use crate::selector::Selector;
use crate::template::SpiffeIdTemplate;

/// A registration entry as stored by the server and pushed to agents.
///
/// An entry matches a workload when every one of its selectors is among the workload's
/// selectors, and the agent serving the workload is `parent_id` (or holds it as an alias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Opaque unique id assigned by the server (32 lowercase hex characters).
    pub id: String,
    /// The SPIFFE ID the workload receives, or a template (`{instance}`, `{uid}`,
    /// `{systemd_unit}`) the agent renders per caller.
    pub spiffe_id: SpiffeIdTemplate,
    /// The agent ID (or node alias) allowed to serve this entry.
    pub parent_id: SpiffeId,
    /// Every selector the workload must present; never empty.
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime; `None` means the server's `default_x509_svid_ttl`.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` means the server's `default_jwt_svid_ttl`. Always capped
    /// by the server's `max_jwt_svid_ttl`.
    pub jwt_svid_ttl: Option<Duration>,
    /// Audiences a JWT-SVID of this entry may carry; empty means any audience.
    pub jwt_audiences: Vec<String>,
    /// Whether one JWT-SVID may carry several audiences (off: one audience per token,
    /// so a token cannot be replayed between services).
    pub jwt_multi_audience: bool,
    /// DNS names added as SANs to the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Hint passed to workloads to tell several identities apart; may be empty.
    pub hint: String,
    /// Federated trust domains whose bundles workloads of this entry receive besides
    /// their own (sorted, without duplicates, never the entry's own trust domain).
    pub federates_with: Vec<TrustDomain>,
    /// Revision of the change feed at which the entry was created.
    pub created_revision: u64,
    /// Revision of the change feed at which the entry last changed.
    pub revision: u64,
}

impl RegistrationEntry {
    /// True when every selector of the entry is in `workload_selectors`.
    pub fn matches<'a, I>(&self, workload_selectors: I) -> bool
    where
        I: IntoIterator<Item = &'a Selector> + Clone,
    {
        !self.selectors.is_empty()
            && self
                .selectors
                .iter()
                .all(|wanted| workload_selectors.clone().into_iter().any(|s| s == wanted))
    }
}
