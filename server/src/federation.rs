//! Federation on the server (SPIFFE Federation): the bundle endpoint that publishes this
//! trust domain's bundle, and the refresh tasks that poll the bundle endpoints of the
//! federation relationships and store each foreign bundle under its own trust domain.
//!
//! The wire formats, TLS profiles, fetch limits and the storage policy come from
//! `tessera-federation`; this module owns the scheduling, the storage and the status
//! operators see. Bundles of different trust domains are never merged: a fetched bundle
//! is stored only under the trust domain of the relationship it was fetched for
//! (SECURITY.md §3.11 item 113), never replaces the stored one when empty (item 112)
//! or older by sequence number (item 108), and a failed fetch keeps the last good bundle
//! (items 107, 109, 110).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_federation::{
    Decision, FetchError, FetchLimits, Profile, RefreshPolicy, SpiffeBundle, fetch_bundle,
    should_store,
};
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::jwt::JwtPublicKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ServerError;
use crate::config::BundleEndpointProfile;
use crate::datastore::{
    DatastoreError, EndpointProfile, FederationRelationship, StoredBundle, StoredJwtAuthority,
};
use crate::state::ServerState;
use crate::tls::ServerCertSlot;

/// Where `https_web` endpoints' CA certificates are read from unless configured.
pub const DEFAULT_WEB_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a federated bundle could not be refreshed or stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The bundle endpoint could not be fetched (the stored bundle is kept).
    #[error("fetching the bundle endpoint failed: {0}")]
    Fetch(#[source] FetchError),
    /// An `https_spiffe` endpoint cannot be authenticated without a bundle of its
    /// trust domain.
    #[error(
        "no bundle is stored for {0}: give one with `federation create --trust-domain-bundle` or `bundle set`"
    )]
    NoBundle(TrustDomain),
    /// The CA certificates for `https_web` could not be read.
    #[error("reading the web trust roots {path}: {message}")]
    WebRoots {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// There is no relationship with this trust domain.
    #[error("no federation relationship with {0}")]
    NoRelationship(String),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// A task failed.
    #[error("{0}")]
    Internal(String),
}

/// What one refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The fetched bundle is new and was stored (and pushed to agents).
    Stored,
    /// The fetched bundle equals the stored one.
    Unchanged,
    /// Its sequence number is lower than the stored one's: kept the stored one.
    IgnoredLowerSequence,
    /// It holds no authority: kept the stored one (and alerted).
    RejectedEmpty,
}

impl RefreshOutcome {
    /// The name the admin API reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Unchanged => "unchanged",
            Self::IgnoredLowerSequence => "ignored_lower_sequence",
            Self::RejectedEmpty => "rejected_empty",
        }
    }
}

/// The last refresh of one relationship, as operators see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    /// When the last fetch succeeded.
    pub last_success: Option<SystemTime>,
    /// The error of the last fetch, `None` when it succeeded.
    pub last_error: Option<String>,
}

/// Federation state shared by the refresh tasks and the admin API.
#[derive(Debug, Default)]
pub struct FederationState {
    /// Serialises fetch-compare-store, so two refreshes of one trust domain (the poll
    /// and an operator's `federation refresh`) never store an older bundle last.
    refresh: tokio::sync::Mutex<()>,
    /// Status per trust domain name.
    status: Mutex<BTreeMap<String, RefreshStatus>>,
}

impl FederationState {
    /// The status of the relationship with `trust_domain`.
    pub fn status(&self, trust_domain: &str) -> RefreshStatus {
        self.status
            .lock()
            .ok()
            .and_then(|s| s.get(trust_domain).cloned())
            .unwrap_or_default()
    }

    fn record(&self, trust_domain: &str, result: Result<(), String>) {
        if let Ok(mut status) = self.status.lock() {
            let entry = status.entry(trust_domain.to_owned()).or_default();
            match result {
                Ok(()) => {
                    entry.last_success = Some(SystemTime::now());
                    entry.last_error = None;
                }
                Err(err) => entry.last_error = Some(err),
            }
        }
    }

    fn forget(&self, trust_domain: &str) {
        if let Ok(mut status) = self.status.lock() {
            status.remove(trust_domain);
        }
    }
}

/// A stored bundle as a [`SpiffeBundle`] of `trust_domain` (JWT keys that no longer
/// parse are skipped). The refresh hint is not stored.
pub fn spiffe_bundle_of(trust_domain: &TrustDomain, stored: &StoredBundle) -> SpiffeBundle {
    let jwt_authorities = stored
        .jwt_authorities
        .iter()
        .filter_map(|a| JwtPublicKey::from_spki_der(a.kid.clone(), &a.public_key).ok())
        .collect();
    SpiffeBundle {
        trust_domain: trust_domain.clone(),
        x509_authorities: stored.x509_authorities.clone(),
        jwt_authorities,
        sequence_number: Some(stored.sequence_number),
        refresh_hint: None,
    }
}

/// A fetched or imported bundle in storage form (no sequence number stores as 0).
pub fn stored_bundle_of(bundle: &SpiffeBundle) -> StoredBundle {
    StoredBundle {
        trust_domain: bundle.trust_domain.name().to_owned(),
        x509_authorities: bundle.x509_authorities.clone(),
        jwt_authorities: bundle
            .jwt_authorities
            .iter()
            .map(|key| StoredJwtAuthority {
                kid: key.kid.clone(),
                public_key: key.to_spki_der(),
                expires_at: None,
            })
            .collect(),
        sequence_number: bundle.sequence_number.unwrap_or(0),
    }
}

/// Reads a bundle given by an operator for `trust_domain`: a SPIFFE bundle document
/// (JSON) or PEM CA certificates.
pub fn parse_bundle_file(
    trust_domain: &TrustDomain,
    bytes: &[u8],
) -> Result<SpiffeBundle, tessera_federation::BundleError> {
    let json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if json {
        SpiffeBundle::parse_json(trust_domain, bytes)
    } else {
        SpiffeBundle::parse_pem(trust_domain, bytes)
    }
}

/// The bundle document of this trust domain, as the endpoint serves it.
async fn own_bundle_document(state: &ServerState) -> Result<Vec<u8>, String> {
    let td = state.trust_domain();
    let stored = state
        .datastore
        .get_bundle(td.name())
        .await
        .map_err(|err| err.to_string())?
        .ok_or("own bundle missing from the datastore")?;
    let mut bundle = spiffe_bundle_of(td, &stored);
    bundle.refresh_hint = Some(state.config.federation.refresh_hint);
    bundle
        .to_json()
        .map(String::into_bytes)
        .map_err(|err| err.to_string())
}

/// Starts federation: the bundle endpoint when configured (returns its address) and
/// the task that runs one refresh task per federation relationship.
pub async fn start(
    state: &Arc<ServerState>,
    cert_slot: Arc<ServerCertSlot>,
    tasks: &mut JoinSet<Result<(), ServerError>>,
) -> Result<Option<SocketAddr>, ServerError> {
    tasks.spawn(run_relationships(Arc::clone(state)));
    let Some(endpoint) = state.config.federation.endpoint.clone() else {
        return Ok(None);
    };
    let tls = match &endpoint.profile {
        BundleEndpointProfile::HttpsSpiffe => {
            tessera_federation::https_spiffe_server_config(cert_slot)
        }
        BundleEndpointProfile::HttpsWeb {
            certificate_path,
            key_path,
        } => {
            let (cert, key) = (certificate_path.clone(), key_path.clone());
            tokio::task::spawn_blocking(move || {
                tessera_federation::https_web_server_config_from_files(&cert, &key)
            })
            .await
            .map_err(|err| ServerError::Task(err.to_string()))?
        }
    }
    .map_err(|err| ServerError::Task(format!("bundle endpoint TLS: {err}")))?;
    let listener = TcpListener::bind(endpoint.bind_address)
        .await
        .map_err(|source| ServerError::Io {
            what: format!("bind bundle endpoint on {}", endpoint.bind_address),
            source,
        })?;
    let address = listener.local_addr().map_err(|source| ServerError::Io {
        what: "bundle endpoint address".into(),
        source,
    })?;

    // The document is cached and rebuilt when the revision moves, so a request never
    // waits for the datastore.
    let first = own_bundle_document(state)
        .await
        .map_err(ServerError::Task)?;
    let (document_tx, document_rx) = watch::channel(Some(Arc::new(first)));
    let cache_state = Arc::clone(state);
    tasks.spawn(async move {
        let mut revisions = cache_state.revisions.subscribe();
        loop {
            tokio::select! {
                () = cache_state.shutdown.cancelled() => return Ok(()),
                changed = revisions.changed() => if changed.is_err() { return Ok(()) },
            }
            match own_bundle_document(&cache_state).await {
                Ok(document) => {
                    document_tx.send_if_modified(|current| {
                        let changed = current.as_deref() != Some(&document);
                        if changed {
                            *current = Some(Arc::new(document));
                        }
                        changed
                    });
                }
                Err(err) => tracing::warn!(error = %err, "cannot rebuild the served bundle"),
            }
        }
    });
    let source: Arc<dyn tessera_federation::BundleSource> =
        Arc::new(move || document_rx.borrow().as_deref().cloned());
    let shutdown = state.shutdown.clone();
    tasks.spawn(async move {
        tessera_federation::serve(listener, Arc::new(tls), source, shutdown).await;
        Ok(())
    });
    tracing::info!(address = %address, profile = ?endpoint.profile, "bundle endpoint started");
    Ok(Some(address))
}

/// The refresh policy from the configuration.
fn policy(state: &ServerState) -> RefreshPolicy {
    let federation = &state.config.federation;
    RefreshPolicy {
        min_interval: federation.min_refresh_interval,
        max_interval: federation.max_refresh_interval,
        default_interval: crate::config::DEFAULT_FEDERATION_REFRESH_HINT.clamp(
            federation.min_refresh_interval,
            federation.max_refresh_interval,
        ),
    }
}

/// Keeps one refresh task per stored relationship: started, restarted when the
/// relationship changes, stopped when it is deleted. Follows the change feed.
async fn run_relationships(state: Arc<ServerState>) -> Result<(), ServerError> {
    let mut revisions = state.revisions.subscribe();
    let mut running: BTreeMap<String, (FederationRelationship, CancellationToken)> =
        BTreeMap::new();
    loop {
        match state.datastore.list_federation_relationships().await {
            Ok(relationships) => {
                let wanted: BTreeMap<String, FederationRelationship> = relationships
                    .into_iter()
                    .map(|r| (r.trust_domain.name().to_owned(), r))
                    .collect();
                running.retain(|td, (relationship, token)| {
                    let keep = wanted.get(td) == Some(relationship);
                    if !keep {
                        token.cancel();
                    }
                    keep
                });
                for (td, relationship) in wanted {
                    if running.contains_key(&td) {
                        continue;
                    }
                    let token = state.shutdown.child_token();
                    tokio::spawn(refresh_loop(
                        Arc::clone(&state),
                        relationship.clone(),
                        token.clone(),
                    ));
                    running.insert(td, (relationship, token));
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot list federation relationships"),
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            changed = revisions.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// Polls one relationship's endpoint until cancelled: at the refresh hint of the bundle
/// in force (bounded), sooner with backoff after a failure.
async fn refresh_loop(
    state: Arc<ServerState>,
    relationship: FederationRelationship,
    token: CancellationToken,
) {
    let policy = policy(&state);
    let td = relationship.trust_domain.clone();
    let mut failures = 0_u32;
    loop {
        let delay = match refresh(&state, &relationship, false).await {
            Ok((_, hint)) => {
                failures = 0;
                let current = SpiffeBundle {
                    refresh_hint: hint,
                    ..SpiffeBundle::new(td.clone())
                };
                policy.next_refresh(Some(&current))
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                tracing::warn!(trust_domain = %td, error = %err, failures, "federated bundle refresh failed; keeping the stored bundle");
                policy.retry_after_failure(None, failures)
            }
        };
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Fetches the bundle of `relationship` now and stores it when it should replace the
/// stored one; returns what happened and the fetched bundle's refresh hint. With
/// `accept_lower_sequence`, a lower sequence number than the stored one is accepted.
pub async fn refresh(
    state: &ServerState,
    relationship: &FederationRelationship,
    accept_lower_sequence: bool,
) -> Result<(RefreshOutcome, Option<Duration>), FederationError> {
    let td = &relationship.trust_domain;
    let result = refresh_inner(state, relationship, accept_lower_sequence).await;
    state.federation.record(
        td.name(),
        result.as_ref().map(|_| ()).map_err(ToString::to_string),
    );
    result
}

async fn refresh_inner(
    state: &ServerState,
    relationship: &FederationRelationship,
    accept_lower_sequence: bool,
) -> Result<(RefreshOutcome, Option<Duration>), FederationError> {
    let td = &relationship.trust_domain;
    let profile = match &relationship.profile {
        EndpointProfile::HttpsWeb => Profile::HttpsWeb {
            roots: web_roots(state.config.federation.web_trust_roots_path.clone()).await?,
        },
        EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
            let stored = state
                .datastore
                .get_bundle(td.name())
                .await?
                .ok_or_else(|| FederationError::NoBundle(td.clone()))?;
            Profile::HttpsSpiffe {
                endpoint_spiffe_id: endpoint_spiffe_id.clone(),
                trust_bundle: spiffe_bundle_of(td, &stored),
            }
        }
    };
    let fetched = fetch_bundle(
        &relationship.bundle_endpoint_url,
        &profile,
        td,
        &FetchLimits::default(),
    )
    .await
    .map_err(FederationError::Fetch)?;
    if fetched.permanent_redirect {
        tracing::warn!(trust_domain = %td, final_url = %fetched.final_url, "the bundle endpoint redirects permanently; the configured URL is kept (update the relationship if the move is legitimate)");
    }
    let hint = fetched.bundle.refresh_hint;
    let outcome = store_bundle(state, fetched.bundle, accept_lower_sequence).await?;
    Ok((outcome, hint))
}

/// Stores `bundle` under its trust domain unless the policy says otherwise; wakes the
/// `Sync` streams when stored.
pub async fn store_bundle(
    state: &ServerState,
    mut bundle: SpiffeBundle,
    accept_lower_sequence: bool,
) -> Result<RefreshOutcome, FederationError> {
    let td = bundle.trust_domain.clone();
    let _guard = state.federation.refresh.lock().await;
    let stored = state
        .datastore
        .get_bundle(td.name())
        .await?
        .map(|s| spiffe_bundle_of(&td, &s));
    // Compare content and sequence only; no sequence number is stored as 0.
    bundle.sequence_number = Some(bundle.sequence_number.unwrap_or(0));
    bundle.refresh_hint = None;
    let outcome = match should_store(stored.as_ref(), &bundle, accept_lower_sequence) {
        Decision::Store => {
            state
                .datastore
                .set_bundle(stored_bundle_of(&bundle))
                .await?;
            state.publish_revision().await;
            tracing::info!(trust_domain = %td, sequence_number = ?bundle.sequence_number, "federated bundle stored");
            RefreshOutcome::Stored
        }
        Decision::Unchanged => RefreshOutcome::Unchanged,
        Decision::IgnoreLowerSequence { stored, fetched } => {
            tracing::warn!(trust_domain = %td, stored, fetched, "fetched bundle has a lower sequence number; keeping the stored one (`federation refresh --accept-lower-sequence` accepts it)");
            RefreshOutcome::IgnoredLowerSequence
        }
        Decision::RejectEmpty => {
            tracing::error!(trust_domain = %td, "fetched bundle holds no authority; keeping the stored one (delete it with `bundle delete` if the peer really revoked every key)");
            RefreshOutcome::RejectedEmpty
        }
        Decision::RejectTrustDomainMismatch | _ => {
            return Err(FederationError::Internal(format!(
                "bundle of {td} compared with another trust domain's"
            )));
        }
    };
    Ok(outcome)
}

/// Reads the CA certificates that authenticate `https_web` endpoints, off the runtime.
async fn web_roots(
    path: Option<PathBuf>,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, FederationError> {
    let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_WEB_ROOTS));
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || read_roots(&path))
        .await
        .map_err(|err| FederationError::Internal(err.to_string()))?
        .map_err(|message| FederationError::WebRoots {
            path: shown,
            message,
        })
}

fn read_roots(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|err| err.to_string())?;
    tessera_federation::read_pem_certificates(&bytes).map_err(|err| err.to_string())
}

/// Forgets the status of a deleted relationship.
pub fn forget(state: &ServerState, trust_domain: &str) {
    state.federation.forget(trust_domain);
}
