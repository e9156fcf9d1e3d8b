//! Federated bundles on the agent: the bundles of other trust domains the server sends
//! for the `federates_with` of this agent's entries, kept per trust domain (never
//! merged), and the selection a caller receives: only the trust domains its own
//! matching entries name.

use std::collections::BTreeMap;
use std::sync::Arc;

use tessera_plugin_sdk::jwt::{JwtBundle, JwtPublicKey};
use tessera_plugin_sdk::{RegistrationEntry, TrustDomain};
use tessera_proto::node::FederatedBundles;

use crate::cache::TrustBundle;

/// Federated bundles by trust domain.
pub type FederatedSet = BTreeMap<TrustDomain, Arc<TrustBundle>>;

/// Reads the complete federated set of a `Sync` message. A bundle of the agent's own
/// trust domain, of an invalid trust domain, a repeated one or an empty one is
/// ignored (and logged); so is a JWT key that does not parse. Bundles equal to the one
/// held are kept as the same `Arc`, so streams push only on a real change.
pub fn read_federated(
    own: &TrustDomain,
    wire: &FederatedBundles,
    held: &FederatedSet,
) -> FederatedSet {
    let mut out = FederatedSet::new();
    for bundle in &wire.bundles {
        let td = match TrustDomain::new(&bundle.trust_domain) {
            Ok(td) if &td != own => td,
            Ok(_) => {
                tracing::warn!("ignoring a federated bundle of the agent's own trust domain");
                continue;
            }
            Err(err) => {
                tracing::warn!(error = %err, "ignoring a federated bundle with an invalid trust domain");
                continue;
            }
        };
        if out.contains_key(&td) {
            tracing::warn!(trust_domain = %td, "ignoring a repeated federated bundle");
            continue;
        }
        let keys: Vec<JwtPublicKey> = bundle
            .jwt_authorities
            .iter()
            .filter_map(|a| match JwtPublicKey::from_spki_der(a.kid.clone(), &a.public_key) {
                Ok(key) => Some(key),
                Err(err) => {
                    tracing::warn!(trust_domain = %td, kid = %a.kid.escape_debug(), error = %err, "ignoring an unusable federated JWT key");
                    None
                }
            })
            .collect();
        if bundle.x509_authorities.is_empty() && keys.is_empty() {
            tracing::warn!(trust_domain = %td, "ignoring an empty federated bundle");
            continue;
        }
        let fresh = TrustBundle {
            trust_domain: td.clone(),
            authorities: bundle.x509_authorities.clone(),
            jwt: JwtBundle::new(td.clone(), keys),
            sequence_number: bundle.sequence_number,
        };
        let kept = match held.get(&td) {
            Some(old) if same(old, &fresh) => Arc::clone(old),
            _ => Arc::new(fresh),
        };
        out.insert(td, kept);
    }
    out
}

fn same(a: &TrustBundle, b: &TrustBundle) -> bool {
    a.sequence_number == b.sequence_number
        && a.authorities == b.authorities
        && a.jwt.keys().eq(b.jwt.keys())
}

/// The federated bundles a caller receives: those of the trust domains its matching
/// `entries` federate with, that the agent holds.
pub fn bundles_for<'a>(
    federated: &FederatedSet,
    entries: impl IntoIterator<Item = &'a RegistrationEntry>,
) -> Vec<Arc<TrustBundle>> {
    let mut wanted: Vec<&TrustDomain> = entries
        .into_iter()
        .flat_map(|e| e.federates_with.iter())
        .collect();
    wanted.sort();
    wanted.dedup();
    wanted
        .into_iter()
        .filter_map(|td| federated.get(td).map(Arc::clone))
        .collect()
}

/// What a stream sent of federated bundles (trust domain, sequence number, X.509
/// authorities, JWT key ids), to push again only on a change.
pub type SentKey = Vec<(String, u64, Vec<Vec<u8>>, Vec<String>)>;

/// The [`SentKey`] of `bundles`.
pub fn sent_key(bundles: &[Arc<TrustBundle>]) -> SentKey {
    bundles
        .iter()
        .map(|b| {
            (
                b.trust_domain.name().to_owned(),
                b.sequence_number,
                b.authorities.clone(),
                b.jwt.keys().map(|k| k.kid.clone()).collect(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use tessera_proto::types::Bundle;

    #[test]
    fn own_empty_and_repeated_bundles_are_ignored_and_equal_ones_kept() {
        let own = TrustDomain::new("example.org").unwrap();
        let bundle = |td: &str, der: &[u8]| Bundle {
            trust_domain: td.to_owned(),
            x509_authorities: if der.is_empty() {
                vec![]
            } else {
                vec![der.to_vec()]
            },
            sequence_number: 1,
            ..Bundle::default()
        };
        let wire = FederatedBundles {
            bundles: vec![
                bundle("example.org", b"a"),
                bundle("other.org", b"b"),
                bundle("other.org", b"c"),
                bundle("empty.org", b""),
                bundle("Bad..td", b"d"),
            ],
        };
        let set = read_federated(&own, &wire, &FederatedSet::new());
        assert_eq!(set.len(), 1);
        let other = TrustDomain::new("other.org").unwrap();
        assert_eq!(set[&other].authorities, vec![b"b".to_vec()]);
        let again = read_federated(&own, &wire, &set);
        assert!(Arc::ptr_eq(&set[&other], &again[&other]));
    }
}
