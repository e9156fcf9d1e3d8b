//! What every API handler of the server shares: configuration, datastore, CA, the audit
//! log, the current CRL and the channels that wake `Sync` streams after each write.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_audit::{AuditLog, ServerEvent};
use tessera_plugin_sdk::{SpiffeId, TrustDomain};
use tessera_proto::types;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::{CRL_VALIDITY, X509Authority};
use crate::config::ServerConfig;
use crate::datastore::{Datastore, RevokedSerial};
use crate::error::ApiError;
use crate::jwt_authority::JwtAuthority;

/// Path prefix reserved for IDs tessera assigns itself (agents, the server).
pub const RESERVED_PREFIX: &str = "/tessera";

/// True when a SPIFFE ID path (or the literal start of a template's path) lies in the
/// reserved [`RESERVED_PREFIX`].
pub fn is_reserved_path(path: &str) -> bool {
    path.strip_prefix(RESERVED_PREFIX)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Refresh hint published with the bundle.
pub const BUNDLE_REFRESH_HINT_SECS: i64 = 300;

/// Seconds since the epoch (0 before it, saturating far after).
pub fn unix_seconds(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Shared server state.
#[derive(Debug)]
pub struct ServerState {
    /// The configuration the server runs with.
    pub config: ServerConfig,
    /// The datastore.
    pub datastore: Arc<dyn Datastore>,
    /// The signing CA (the active one; switched by [`ServerState::rotation`]).
    pub ca: Arc<X509Authority>,
    /// The JWT-SVID signing key (the active one; switched by [`ServerState::rotation`]).
    pub jwt: Arc<JwtAuthority>,
    /// The rotation of the CA and JWT keys: journal, prepared keys, the bundle they
    /// publish.
    pub rotation: Arc<crate::rotation::Rotation>,
    /// X.509-SVIDs signed since start (workload SVIDs, not agent or server SVIDs).
    pub x509_svids_signed: AtomicU64,
    /// JWT-SVIDs signed since start.
    pub jwt_svids_signed: AtomicU64,
    /// Latest change-feed revision; `Sync` streams wake on it.
    pub revisions: watch::Sender<u64>,
    /// The CRL agents publish; `Sync` streams wake when it changes. Rebuilt by
    /// [`ServerState::refresh_crl`].
    pub crl: watch::Sender<Arc<CurrentCrl>>,
    /// Serialises [`ServerState::refresh_crl`], so an older read never replaces a newer
    /// CRL.
    pub crl_refresh: tokio::sync::Mutex<()>,
    /// The audit log (disabled when `audit_log_path` is not set).
    pub audit: AuditLog<ServerEvent>,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
    /// Federation refresh status and serialisation.
    pub federation: crate::federation::FederationState,
    /// The x509pop node attestor, built from its CA bundle at start (`None` when not
    /// configured: x509pop attestation is then refused).
    pub x509pop: Option<Arc<tessera_plugin_x509pop::X509PopVerifier>>,
}

/// The CRL of the server's CA as last built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurrentCrl {
    /// Increases with every rebuild (its cRLNumber when `der` is set); 0 before the
    /// first one.
    pub number: u64,
    /// The DER CRL; `None` while nothing is revoked (agents then publish no CRL).
    pub der: Option<Vec<u8>>,
    /// What it lists.
    pub serials: Vec<RevokedSerial>,
    /// When it was signed (its thisUpdate).
    pub signed_at: Option<SystemTime>,
}

impl CurrentCrl {
    /// The wire form: one CRL, or none.
    pub fn to_proto(&self) -> tessera_proto::node::CrlSet {
        tessera_proto::node::CrlSet {
            crls: self.der.iter().cloned().collect(),
        }
    }
}

impl ServerState {
    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// `spiffe://<td>/tessera/server`.
    pub fn server_id(&self) -> Result<SpiffeId, ApiError> {
        SpiffeId::from_segments(self.trust_domain(), &["tessera", "server"])
            .map_err(|err| ApiError::Internal(format!("server id: {err}")))
    }

    /// Wakes `Sync` streams after a write.
    ///
    /// The revision only moves forward, except when the datastore's own revision went
    /// back (a database restored from an older backup): confirmed by a second read, so
    /// that a read racing a newer one is not taken for it. Streams then wake, find
    /// their revision ahead of the datastore and send their agents a snapshot.
    pub async fn publish_revision(&self) {
        let revision = match self.datastore.current_revision().await {
            Ok(revision) => revision,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the current revision");
                return;
            }
        };
        let current = *self.revisions.borrow();
        if revision >= current {
            self.revisions.send_if_modified(|current| {
                let newer = revision > *current;
                if newer {
                    *current = revision;
                }
                newer
            });
            return;
        }
        match self.datastore.current_revision().await {
            Ok(again) if again < *self.revisions.borrow() => {
                tracing::warn!(
                    revision = again,
                    previous = current,
                    "the datastore's revision went back (restored from a backup?): \
                     agents get a snapshot"
                );
                self.revisions.send_replace(again);
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot read the current revision"),
        }
    }

    /// Rebuilds the CRL from the datastore when the revoked serials changed, or when
    /// the current one is past half its validity; `Sync` streams then send it. Returns
    /// whether it changed. Signs on a blocking thread.
    pub async fn refresh_crl(&self) -> Result<bool, ApiError> {
        let _guard = self.crl_refresh.lock().await;
        let now = SystemTime::now();
        let serials = self.datastore.revoked_serials(now).await?;
        let current = Arc::clone(&self.crl.borrow());
        let aging = current
            .signed_at
            .is_some_and(|at| at + CRL_VALIDITY / 2 <= now);
        if current.number != 0 && current.serials == serials && !(current.der.is_some() && aging) {
            return Ok(false);
        }
        // Increasing across restarts too, as RFC 5280 §5.2.3 wants, without storing it.
        let millis = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis();
        let number = (current.number + 1).max(u64::try_from(millis).unwrap_or(u64::MAX));
        let der = if serials.is_empty() {
            None
        } else {
            let ca = Arc::clone(&self.ca);
            let listed: Vec<(String, SystemTime)> = serials
                .iter()
                .map(|s| (s.serial.clone(), s.revoked_at))
                .collect();
            let der = tokio::task::spawn_blocking(move || ca.sign_crl(number, &listed, now))
                .await
                .map_err(|err| ApiError::Internal(format!("CRL signing task: {err}")))??;
            Some(der)
        };
        tracing::info!(
            crl_number = number,
            revoked_serials = serials.len(),
            "CRL rebuilt"
        );
        self.crl.send_replace(Arc::new(CurrentCrl {
            number,
            der,
            serials,
            signed_at: Some(now),
        }));
        Ok(true)
    }

    /// The trust domain's bundle as stored, in wire form.
    pub async fn bundle(&self) -> Result<types::Bundle, ApiError> {
        let stored = self
            .datastore
            .get_bundle(self.trust_domain().name())
            .await?
            .ok_or_else(|| ApiError::Internal("own bundle missing from the datastore".into()))?;
        Ok(types::Bundle {
            trust_domain: stored.trust_domain,
            x509_authorities: stored.x509_authorities,
            sequence_number: stored.sequence_number,
            refresh_hint_seconds: BUNDLE_REFRESH_HINT_SECS,
            jwt_authorities: stored
                .jwt_authorities
                .into_iter()
                .map(|a| types::JwtAuthority {
                    kid: a.kid,
                    public_key: a.public_key,
                    expires_at: a.expires_at.map_or(0, unix_seconds),
                })
                .collect(),
        })
    }
}
