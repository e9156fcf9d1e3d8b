//! The agent's view of what it may serve, published to Workload API handlers through a
//! `watch` channel: entries received from the server, the bundle, one SVID per entry
//! with a fixed SPIFFE ID, the identities the server revoked and its CRLs. Handlers
//! read a consistent snapshot without locks; the SVID manager is the only writer.
//! (Templated identities, one per caller, are held by [`crate::instances`].)

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
    /// Current SVID per entry id (entries with a fixed SPIFFE ID only; templated
    /// identities live in [`crate::instances::Instances`]).
    pub svids: Arc<HashMap<String, Arc<WorkloadSvid>>>,
    /// Identities the server revoked: never served, minted or accepted.
    pub revoked: Arc<RevokedSet>,
    /// DER CRLs of the trust domain, for the Workload API's `crl` fields.
    pub crls: Arc<Vec<Vec<u8>>>,
    /// Bundles of federated trust domains, by trust domain (never merged).
    pub federated: Arc<crate::federation::FederatedSet>,
    /// Entries (fixed IDs) whose last signing attempt failed and is being retried with
    /// backoff: callers are served their other identities instead of waiting for this
    /// one indefinitely.
    pub failing: Arc<std::collections::BTreeSet<String>>,
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
}

/// Identities the server revoked (rendered SPIFFE IDs), each kept until no SVID of it
/// can still be valid (the server's `expires_at`), then forgotten.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokedSet {
    until: BTreeMap<SpiffeId, SystemTime>,
}

impl RevokedSet {
    /// Whether `id` is revoked at `now`.
    pub fn is_revoked(&self, id: &SpiffeId, now: SystemTime) -> bool {
        self.until.get(id).is_some_and(|until| *until > now)
    }

    /// Applies the `revoked` list of a `Sync` message (in a snapshot, every revocation
    /// in force: the set is replaced). Revocations that have already expired at `now`
    /// and IDs that do not parse are ignored. Returns the IDs newly revoked.
    pub fn apply(
        &mut self,
        snapshot: bool,
        revoked: &[tessera_proto::node::RevokedIdentity],
        now: SystemTime,
    ) -> Vec<SpiffeId> {
        let before = if snapshot {
            std::mem::take(&mut self.until)
        } else {
            BTreeMap::new()
        };
        let mut added = Vec::new();
        for item in revoked {
            let id = match SpiffeId::parse_leaf(&item.spiffe_id) {
                Ok(id) => id,
                Err(err) => {
                    tracing::warn!(error = %err, "ignoring an invalid revoked SPIFFE ID from the server");
                    continue;
                }
            };
            let until = from_unix(item.expires_at);
            if until <= now {
                continue;
            }
            let known = self.is_revoked(&id, now) || before.get(&id).is_some_and(|t| *t > now);
            let slot = self.until.entry(id.clone()).or_insert(until);
            *slot = (*slot).max(until);
            if !known {
                added.push(id);
            }
        }
        added
    }

    /// Forgets revocations that expired at `now`; true when something was forgotten.
    pub fn prune(&mut self, now: SystemTime) -> bool {
        let before = self.until.len();
        self.until.retain(|_, until| *until > now);
        self.until.len() != before
    }

    /// When the next revocation expires.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.until.values().min().copied()
    }

    /// The revoked IDs.
    pub fn ids(&self) -> impl Iterator<Item = &SpiffeId> {
        self.until.keys()
    }

    /// Number of revocations held.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// True when nothing is revoked.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

/// Unix seconds as a `SystemTime` (negative values clamp to the epoch).
pub fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0).unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tessera_proto::node::RevokedIdentity;

    fn revoked(id: &str, expires_at: i64) -> RevokedIdentity {
        RevokedIdentity {
            spiffe_id: id.to_owned(),
            revoked_at: 0,
            expires_at,
        }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse_leaf(s).unwrap()
    }

    #[test]
    fn revocations_apply_and_expire() {
        let now = from_unix(1_000);
        let mut set = RevokedSet::default();
        let added = set.apply(
            false,
            &[
                revoked("spiffe://example.org/a", 1_100),
                revoked("spiffe://example.org/b", 1_050),
                revoked("spiffe://example.org/old", 900),
                revoked("not an id", 2_000),
            ],
            now,
        );
        assert_eq!(
            added,
            vec![id("spiffe://example.org/a"), id("spiffe://example.org/b")]
        );
        assert_eq!(set.len(), 2);
        assert!(set.is_revoked(&id("spiffe://example.org/a"), now));
        assert!(!set.is_revoked(&id("spiffe://example.org/old"), now));
        assert_eq!(set.next_expiry(), Some(from_unix(1_050)));
        // A delta repeating a known revocation adds nothing new.
        assert!(
            set.apply(false, &[revoked("spiffe://example.org/a", 1_100)], now)
                .is_empty()
        );
        // Past b's expiry it no longer counts, even before it is pruned; then it is
        // forgotten.
        let later = now + Duration::from_secs(60);
        assert!(!set.is_revoked(&id("spiffe://example.org/b"), later));
        assert!(set.is_revoked(&id("spiffe://example.org/a"), later));
        assert!(set.prune(later));
        assert_eq!(set.len(), 1);
        assert!(!set.prune(later));
        // A snapshot replaces the set; what it still holds is not new.
        let added = set.apply(
            true,
            &[
                revoked("spiffe://example.org/a", 1_100),
                revoked("spiffe://example.org/c", 1_200),
            ],
            later,
        );
        assert_eq!(added, vec![id("spiffe://example.org/c")]);
        let added = set.apply(true, &[], later);
        assert!(added.is_empty() && set.is_empty());
    }
}
