//! The SVID manager: the one task that applies `Sync` messages to the cache (entries,
//! bundle, revocations, CRLs) and keeps an X.509-SVID for every entry with a fixed
//! SPIFFE ID the agent holds (templated entries are minted per caller, on demand, by
//! [`crate::instances`]); revoked identities are dropped and never minted. Entries are minted as soon as they
//! arrive (one `BatchNewX509SVID` round trip), renewed at about half their lifetime
//! with jitter so a fleet does not renew in lockstep, and retried with exponential
//! backoff while the server fails, during which still-valid SVIDs keep being served.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::jwt::{JwtBundle, JwtPublicKey};
use tessera_proto::convert::entry_from_proto;
use tessera_proto::node::{
    BatchNewX509svidRequest, NewX509svidParams, SyncResponse, x509svid_result,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::cache::{CacheSnapshot, TrustBundle, WorkloadSvid};
use crate::node::ServerConnection;
use crate::store::Store;
use crate::tls::ServerTrust;

/// Most SVIDs requested in one call.
const BATCH: usize = 100;

/// A random fraction in `[0, 1)` for jitter.
pub fn jitter_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

/// When to renew a certificate that expires at `not_after`, received `now`: at half of
/// its remaining lifetime, minus up to a tenth of it as jitter. The remaining lifetime,
/// not `NotBefore`, is the base: the server back-dates `NotBefore` for clock skew, and a
/// short-lived SVID measured from there would look due at once.
pub fn renewal_time(now: SystemTime, not_after: SystemTime) -> SystemTime {
    let remaining = not_after.duration_since(now).unwrap_or_default();
    let at = now + remaining / 2 - remaining.mul_f64(0.1 * jitter_fraction());
    // Never sooner than a second from now, so an SVID clamped by a nearly expired CA
    // does not make the manager spin.
    at.max(now + Duration::from_secs(1))
}

/// The manager's inputs and outputs.
#[derive(Debug)]
pub struct SvidManager {
    /// Trust domain of the agent.
    pub trust_domain: TrustDomain,
    /// Connection to the server.
    pub connection: Arc<ServerConnection>,
    /// Where the cache is published.
    pub cache: watch::Sender<Arc<CacheSnapshot>>,
    /// Where the bundle is persisted.
    pub store: Store,
    /// Trust anchors for the server connection, updated with the bundle.
    pub server_trust: Arc<ServerTrust>,
}

struct Minted {
    entry_id: String,
    svid: Result<WorkloadSvid, String>,
}

impl SvidManager {
    /// Runs until `shutdown`, consuming `updates` from the sync task.
    pub async fn run(self, mut updates: mpsc::Receiver<SyncResponse>, shutdown: CancellationToken) {
        let mut state = (**self.cache.borrow()).clone();
        let mut entries = (*state.entries).clone();
        let mut svids = (*state.svids).clone();
        let mut retry_at: HashMap<String, Backoff> = HashMap::new();
        let mut failing: std::collections::BTreeSet<String> = (*state.failing).clone();
        // Hashes the host's interpreters in the background (SECURITY.md §3.3 item 34).
        let mut interpreter_lint = crate::interpreters::InterpreterLint::start();
        let mut reachable_again = self.connection.reachable_again();
        loop {
            let now = SystemTime::now();
            let instant_now = Instant::now();
            let mut changed = false;
            if state.revoked.next_expiry().is_some_and(|at| at <= now) {
                let mut revoked = (*state.revoked).clone();
                if revoked.prune(now) {
                    state.revoked = Arc::new(revoked);
                    changed = true;
                }
            }
            let before = svids.len();
            svids.retain(|id, svid| {
                entries
                    .get(id)
                    .is_some_and(|entry| mintable(entry, &state.revoked, now))
                    && svid.not_after > now
            });
            changed |= svids.len() != before;

            let due: Vec<String> = entries
                .values()
                .filter(|entry| mintable(entry, &state.revoked, now))
                .filter(|entry| match svids.get(&entry.id) {
                    Some(svid) => svid.entry_revision != entry.revision || svid.renew_at <= now,
                    None => true,
                })
                .filter(|entry| {
                    retry_at
                        .get(&entry.id)
                        .is_none_or(|backoff| backoff.retry_at() <= instant_now)
                })
                .map(|entry| entry.id.clone())
                .take(BATCH)
                .collect();
            if !due.is_empty() {
                for minted in self.mint(&entries, &due).await {
                    match minted.svid {
                        Ok(svid) => {
                            retry_at.remove(&minted.entry_id);
                            failing.remove(&minted.entry_id);
                            svids.insert(minted.entry_id, Arc::new(svid));
                            changed = true;
                        }
                        Err(reason) => {
                            let wait = retry_at
                                .entry(minted.entry_id.clone())
                                .or_default()
                                .failed();
                            tracing::warn!(entry_id = %minted.entry_id, %reason, retry_in = ?wait, "cannot obtain an X.509-SVID");
                            failing.insert(minted.entry_id);
                            changed = true;
                        }
                    }
                }
            }
            if changed {
                failing.retain(|id| entries.contains_key(id));
                state.svids = Arc::new(svids.clone());
                state.failing = Arc::new(failing.clone());
                self.cache.send_replace(Arc::new(state.clone()));
            }

            // Sleep until the next renewal, expiry or retry, or until the server sends
            // something.
            // Both times of each SVID: a renewal that failed leaves `renew_at` in the
            // past, and the expiry must still wake the manager to withdraw the SVID.
            let next_wake = svids
                .values()
                .flat_map(|svid| [svid.renew_at, svid.not_after])
                .filter_map(|at| at.duration_since(SystemTime::now()).ok())
                .map(|d| Instant::now() + d)
                .chain(
                    state
                        .revoked
                        .next_expiry()
                        .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
                        .map(|d| Instant::now() + d),
                )
                .chain(retry_at.values().map(Backoff::retry_at))
                .min()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let more_due = entries.values().any(|entry| {
                mintable(entry, &state.revoked, now)
                    && !svids.contains_key(&entry.id)
                    && !retry_at.contains_key(&entry.id)
            });
            if more_due {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                update = updates.recv() => {
                    let Some(update) = update else { return };
                    self.apply(update, &mut state, &mut entries).await;
                    while let Ok(more) = updates.try_recv() {
                        self.apply(more, &mut state, &mut entries).await;
                    }
                    interpreter_lint.check(&entries).await;
                    let now = SystemTime::now();
                    retry_at.retain(|id, _| entries.contains_key(id));
                    svids.retain(|id, _| {
                        entries
                            .get(id)
                            .is_some_and(|entry| mintable(entry, &state.revoked, now))
                    });
                    state.entries = Arc::new(entries.clone());
                    state.svids = Arc::new(svids.clone());
                    self.cache.send_replace(Arc::new(state.clone()));
                }
                () = tokio::time::sleep_until(next_wake) => {}
                // A call reached a server after none could be reached: what waits for
                // its backoff is retried sooner (within the limits of
                // [`Backoff::woken`]; its backoff keeps growing if it fails).
                Ok(()) = reachable_again.changed(), if retry_at.values().any(Backoff::is_wakeable) => {
                    for backoff in retry_at.values_mut() {
                        backoff.woken();
                    }
                }
            }
        }
    }

    async fn apply(
        &self,
        update: SyncResponse,
        state: &mut CacheSnapshot,
        entries: &mut BTreeMap<String, Arc<tessera_plugin_sdk::RegistrationEntry>>,
    ) {
        if update.snapshot {
            entries.clear();
        }
        for wire in &update.entries {
            match entry_from_proto(wire) {
                Ok(entry) => {
                    entries.insert(entry.id.clone(), Arc::new(entry));
                }
                Err(err) => {
                    tracing::warn!(entry_id = %wire.id, error = %err, "ignoring an invalid entry from the server")
                }
            }
        }
        for id in &update.deleted_entry_ids {
            entries.remove(id);
        }
        if let Some(bundle) = update.bundle {
            if bundle.trust_domain != self.trust_domain.name() {
                tracing::warn!("ignoring a bundle for another trust domain on the sync stream");
            } else if bundle.x509_authorities.is_empty() {
                tracing::warn!("ignoring an empty bundle from the server");
            } else if bundle.sequence_number != state.bundle.sequence_number
                || bundle.x509_authorities != state.bundle.authorities
            {
                let jwt_keys = bundle
                    .jwt_authorities
                    .iter()
                    .filter_map(|a| match JwtPublicKey::from_spki_der(a.kid.clone(), &a.public_key) {
                        Ok(key) => Some(key),
                        Err(err) => {
                            tracing::warn!(kid = %a.kid.escape_debug(), error = %err, "ignoring an unusable JWT key from the server");
                            None
                        }
                    })
                    .collect();
                self.server_trust.set(&bundle.x509_authorities);
                let store = self.store.clone();
                let authorities = bundle.x509_authorities.clone();
                match tokio::task::spawn_blocking(move || store.save_bundle(&authorities)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::warn!(error = %err, "cannot persist the bundle"),
                    Err(err) => tracing::warn!(error = %err, "cannot persist the bundle"),
                }
                state.bundle = Arc::new(TrustBundle {
                    trust_domain: self.trust_domain.clone(),
                    authorities: bundle.x509_authorities,
                    jwt: JwtBundle::new(self.trust_domain.clone(), jwt_keys),
                    sequence_number: bundle.sequence_number,
                });
                tracing::info!(
                    sequence_number = state.bundle.sequence_number,
                    "trust bundle updated"
                );
            }
        }
        if let Some(federated) = &update.federated_bundles {
            let set =
                crate::federation::read_federated(&self.trust_domain, federated, &state.federated);
            let changed = set.len() != state.federated.len()
                || set
                    .iter()
                    .zip(state.federated.iter())
                    .any(|((a, x), (b, y))| a != b || !Arc::ptr_eq(x, y));
            if changed {
                tracing::info!(
                    trust_domains = ?set.keys().map(TrustDomain::name).collect::<Vec<_>>(),
                    "federated bundles updated"
                );
                state.federated = Arc::new(set);
            }
        }
        if update.snapshot || !update.revoked.is_empty() {
            let mut revoked = (*state.revoked).clone();
            let added = revoked.apply(update.snapshot, &update.revoked, SystemTime::now());
            for id in &added {
                tracing::info!(spiffe_id = %id, "identity revoked by the server: no longer served");
            }
            if revoked != *state.revoked {
                state.revoked = Arc::new(revoked);
            }
        }
        if let Some(crls) = update.crls
            && crls.crls != *state.crls
        {
            tracing::info!(
                count = crls.crls.len(),
                "certificate revocation lists updated"
            );
            state.crls = Arc::new(crls.crls);
        }
        state.revision = update.revision;
        if !state.synced {
            tracing::info!(
                revision = update.revision,
                entries = entries.len(),
                "first sync with the server complete"
            );
        }
        state.synced = true;
    }

    /// Mints SVIDs for `due` in one round trip: fresh P-256 keys are generated off the
    /// runtime, only their public keys travel.
    async fn mint(
        &self,
        entries: &BTreeMap<String, Arc<tessera_plugin_sdk::RegistrationEntry>>,
        due: &[String],
    ) -> Vec<Minted> {
        let count = due.len();
        let keys = match tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|_| {
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map(|key| {
                        (
                            key.serialize_der(),
                            rcgen::PublicKeyData::subject_public_key_info(&key),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        {
            Ok(Ok(keys)) => keys,
            Ok(Err(err)) => return failed(due, format!("key generation: {err}")),
            Err(err) => return failed(due, format!("key generation: {err}")),
        };
        let params = due
            .iter()
            .zip(&keys)
            .map(|(id, (_, spki))| NewX509svidParams {
                entry_id: id.clone(),
                public_key: spki.clone(),
                template_values: Default::default(),
            })
            .collect::<Vec<_>>();
        let response = match self
            .connection
            .call("BatchNewX509SVID", |mut client| {
                let request = BatchNewX509svidRequest {
                    params: params.clone(),
                };
                async move { client.batch_new_x509svid(request).await }
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return failed(due, crate::node::describe(&status));
            }
        };
        let mut out = Vec::with_capacity(due.len());
        for ((entry_id, (pkcs8, _)), result) in due.iter().zip(keys).zip(response.results) {
            let svid = match (result.result, entries.get(entry_id)) {
                (_, None) => Err("entry vanished".to_owned()),
                (Some(x509svid_result::Result::Svid(svid)), Some(entry)) => {
                    match entry.spiffe_id.as_fixed() {
                        Some(expected) => build_svid(entry, expected, svid.cert_chain, pkcs8),
                        None => Err("entry became a template".to_owned()),
                    }
                }
                (Some(x509svid_result::Result::Error(err)), _) => {
                    Err(format!("code {}: {}", err.code, err.message))
                }
                (None, _) => Err("empty result".to_owned()),
            };
            out.push(Minted {
                entry_id: entry_id.clone(),
                svid,
            });
        }
        if out.len() < due.len() {
            out.extend(failed(
                &due[out.len()..],
                "server sent fewer results than asked".into(),
            ));
        }
        out
    }
}

/// Whether the manager keeps an SVID for `entry`: a fixed SPIFFE ID (templated entries
/// are minted per caller by [`crate::instances`]) that is not revoked.
fn mintable(
    entry: &tessera_plugin_sdk::RegistrationEntry,
    revoked: &crate::cache::RevokedSet,
    now: SystemTime,
) -> bool {
    entry
        .spiffe_id
        .as_fixed()
        .is_some_and(|id| !revoked.is_revoked(id, now))
}

fn failed(ids: &[String], reason: String) -> Vec<Minted> {
    ids.iter()
        .map(|id| Minted {
            entry_id: id.clone(),
            svid: Err(reason.clone()),
        })
        .collect()
}

/// Checks what the server sent against what was asked (the SVID must carry exactly
/// `expected`: the entry's ID, or the ID rendered for a caller) and wraps it with its key.
pub(crate) fn build_svid(
    entry: &tessera_plugin_sdk::RegistrationEntry,
    expected: &tessera_plugin_sdk::SpiffeId,
    cert_chain: Vec<Vec<u8>>,
    private_key: Vec<u8>,
) -> Result<WorkloadSvid, String> {
    let leaf = cert_chain.first().ok_or("empty certificate chain")?;
    let info = tessera_plugin_sdk::x509::leaf_info(leaf).map_err(|err| err.to_string())?;
    if *expected != info.spiffe_id {
        return Err(format!(
            "server signed {} for an entry of {}",
            info.spiffe_id, entry.spiffe_id
        ));
    }
    Ok(WorkloadSvid {
        entry_id: entry.id.clone(),
        entry_revision: entry.revision,
        spiffe_id: info.spiffe_id,
        cert_chain,
        private_key,
        serial_hex: info.serial_hex,
        not_before: info.not_before,
        not_after: info.not_after,
        renew_at: renewal_time(SystemTime::now(), info.not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_proto::node::{CrlSet, RevokedIdentity};

    fn manager(dir: &std::path::Path) -> (SvidManager, CacheSnapshot) {
        let snapshot = crate::testing::snapshot_with(&[]);
        let td = snapshot.bundle.trust_domain.clone();
        let verifier = Arc::new(crate::tls::ServerVerifier::new(
            Arc::new(ServerTrust::default()),
            tessera_plugin_sdk::SpiffeId::from_segments(&td, &["tessera", "server"]).unwrap(),
            crate::tls::provider(),
        ));
        let tls = crate::tls::client_config(verifier, None, crate::tls::provider()).unwrap();
        let (cache, _) = watch::channel(Arc::new(snapshot.clone()));
        let manager = SvidManager {
            trust_domain: td,
            connection: Arc::new(
                ServerConnection::new(&["127.0.0.1:1".to_owned()], Arc::new(tls)).unwrap(),
            ),
            cache,
            store: Store::open(dir).unwrap(),
            server_trust: Arc::new(ServerTrust::default()),
        };
        (manager, snapshot)
    }

    #[tokio::test]
    async fn crls_and_revocations_from_sync_reach_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (manager, mut state) = manager(&dir.path().join("data"));
        let mut entries = BTreeMap::new();
        let far = i64::MAX / 2;
        let revoked = |id: &str| RevokedIdentity {
            spiffe_id: id.into(),
            revoked_at: 0,
            expires_at: far,
        };
        // A snapshot: CRLs as sent (opaque DER, passed through), revocations in force.
        manager
            .apply(
                SyncResponse {
                    revision: 3,
                    snapshot: true,
                    revoked: vec![revoked("spiffe://example.org/bot/a")],
                    crls: Some(CrlSet {
                        crls: vec![b"crl-a".to_vec(), b"crl-b".to_vec()],
                    }),
                    ..SyncResponse::default()
                },
                &mut state,
                &mut entries,
            )
            .await;
        assert_eq!(*state.crls, vec![b"crl-a".to_vec(), b"crl-b".to_vec()]);
        let a = tessera_plugin_sdk::SpiffeId::parse_leaf("spiffe://example.org/bot/a").unwrap();
        let b = tessera_plugin_sdk::SpiffeId::parse_leaf("spiffe://example.org/bot/b").unwrap();
        assert!(state.revoked.is_revoked(&a, SystemTime::now()));
        // A delta without CRLs keeps them; a delta adds revocations.
        let crls = Arc::clone(&state.crls);
        manager
            .apply(
                SyncResponse {
                    revision: 4,
                    revoked: vec![revoked("spiffe://example.org/bot/b")],
                    ..SyncResponse::default()
                },
                &mut state,
                &mut entries,
            )
            .await;
        assert!(Arc::ptr_eq(&crls, &state.crls));
        assert!(state.revoked.is_revoked(&a, SystemTime::now()));
        assert!(state.revoked.is_revoked(&b, SystemTime::now()));
        // New CRLs replace them (an empty set too); a snapshot replaces revocations.
        manager
            .apply(
                SyncResponse {
                    revision: 5,
                    snapshot: true,
                    crls: Some(CrlSet { crls: Vec::new() }),
                    revoked: vec![revoked("spiffe://example.org/bot/b")],
                    ..SyncResponse::default()
                },
                &mut state,
                &mut entries,
            )
            .await;
        assert!(state.crls.is_empty());
        assert!(!state.revoked.is_revoked(&a, SystemTime::now()));
        assert!(state.revoked.is_revoked(&b, SystemTime::now()));
        assert_eq!(state.revision, 5);
    }

    #[test]
    fn templated_and_revoked_entries_are_not_minted_here() {
        let fixed = crate::testing::entry("e1", "spiffe://example.org/web", &["unix:uid:0"]);
        let templated =
            crate::testing::entry("e2", "spiffe://example.org/bot/{instance}", &["unix:uid:0"]);
        let mut revoked = crate::cache::RevokedSet::default();
        let now = SystemTime::now();
        assert!(mintable(&fixed, &revoked, now));
        assert!(!mintable(&templated, &revoked, now));
        revoked.apply(
            false,
            &[RevokedIdentity {
                spiffe_id: "spiffe://example.org/web".into(),
                revoked_at: 0,
                expires_at: i64::MAX / 2,
            }],
            now,
        );
        assert!(!mintable(&fixed, &revoked, now));
    }

    #[test]
    fn renewal_is_near_half_life() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(3600);
        for _ in 0..100 {
            let at = renewal_time(start, end);
            let offset = at.duration_since(start).unwrap().as_secs();
            assert!(at < end);
            assert!((1440..=1800).contains(&offset), "{offset}");
        }
    }
}
