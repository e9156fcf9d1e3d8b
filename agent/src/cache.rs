//! The agent's view of what it may serve, published to Workload API handlers through a
//! `watch` channel: entries received from the server, the bundle, and one SVID per
//! entry. Handlers read a consistent snapshot without locks; the SVID manager is the
//! only writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use tessera_plugin_sdk::{RegistrationEntry, SpiffeId, TrustDomain};

/// The X.509 authorities of a trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// DER CA certificates.
    pub authorities: Vec<Vec<u8>>,
    /// JWT-SVID verification keys (empty in a bootstrap bundle).
    pub jwt: tessera_plugin_sdk::jwt::JwtBundle,
    /// Sequence number from the server (0 for a bootstrap bundle).
    pub sequence_number: u64,
}

impl TrustBundle {
    /// The authorities concatenated, as the Workload API carries them.
    pub fn concatenated_der(&self) -> Vec<u8> {
        self.authorities.concat()
    }

    /// The JWT bundle as the Workload API carries it: a SPIFFE bundle document (JWKS)
    /// holding the `jwt-svid` keys.
    pub fn jwks(&self) -> Vec<u8> {
        self.jwt
            .to_spiffe_bundle_json(&[], self.sequence_number, 0)
            .into_bytes()
    }
}

/// An X.509-SVID and its key, ready to hand to a workload.
pub struct WorkloadSvid {
    /// The entry it was minted for.
    pub entry_id: String,
    /// Revision of the entry it was minted from (a changed entry needs a new SVID).
    pub entry_revision: u64,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub private_key: Vec<u8>,
    /// Serial of the leaf (lowercase hex).
    pub serial_hex: String,
    /// Validity start of the leaf.
    pub not_before: SystemTime,
    /// Validity end of the leaf.
    pub not_after: SystemTime,
    /// When the manager renews it (about half its lifetime, with jitter).
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// One consistent view of the agent's state.
#[derive(Debug, Clone)]
pub struct CacheSnapshot {
    /// True once the first `Sync` message arrived; before that, callers get
    /// `Unavailable`.
    pub synced: bool,
    /// Change-feed revision applied.
    pub revision: u64,
    /// The agent's trust domain bundle.
    pub bundle: Arc<TrustBundle>,
    /// Entries this agent may serve, by id.
    pub entries: Arc<BTreeMap<String, Arc<RegistrationEntry>>>,
    /// Current SVID per entry id.
    pub svids: Arc<HashMap<String, Arc<WorkloadSvid>>>,
}

/// What a caller with a given selector set is entitled to right now.
#[derive(Debug)]
pub enum Entitlement {
    /// No entry matches: the caller gets no identity.
    None,
    /// Some matching entries have no usable SVID yet (being minted).
    Pending,
    /// One SVID per matching entry, in entry order, hints unique.
    Ready(Vec<(Arc<RegistrationEntry>, Arc<WorkloadSvid>)>),
}

impl CacheSnapshot {
    /// Entries matching `selectors`, in creation order, skipping an entry whose
    /// non-empty hint repeats an earlier one (a caller never gets two identities with
    /// the same hint).
    pub fn matching_entries(
        &self,
        selectors: &[tessera_plugin_sdk::Selector],
    ) -> Vec<Arc<RegistrationEntry>> {
        let mut matching: Vec<&Arc<RegistrationEntry>> = self
            .entries
            .values()
            .filter(|entry| entry.matches(selectors))
            .collect();
        matching.sort_by(|a, b| (a.created_revision, &a.id).cmp(&(b.created_revision, &b.id)));
        let mut seen_hints: Vec<&str> = Vec::new();
        let mut out = Vec::with_capacity(matching.len());
        for entry in matching {
            if !entry.hint.is_empty() {
                if seen_hints.contains(&entry.hint.as_str()) {
                    continue;
                }
                seen_hints.push(entry.hint.as_str());
            }
            out.push(Arc::clone(entry));
        }
        out
    }

    /// The SVIDs for a caller presenting `selectors`. Entries are taken in creation
    /// order; an entry whose non-empty hint repeats an earlier one is skipped, so a
    /// caller never receives two SVIDs with the same hint. Expired SVIDs never count.
    pub fn entitlement(
        &self,
        selectors: &[tessera_plugin_sdk::Selector],
        now: SystemTime,
    ) -> Entitlement {
        let matching = self.matching_entries(selectors);
        if matching.is_empty() {
            return Entitlement::None;
        }
        let mut ready = Vec::with_capacity(matching.len());
        for entry in matching {
            match self.svids.get(&entry.id) {
                Some(svid) if svid.not_after > now && svid.entry_revision == entry.revision => {
                    ready.push((Arc::clone(&entry), Arc::clone(svid)));
                }
                _ => return Entitlement::Pending,
            }
        }
        Entitlement::Ready(ready)
    }
}
