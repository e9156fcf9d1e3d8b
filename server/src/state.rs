//! What every API handler of the server shares: configuration, datastore, CA and the
//! revision channel that wakes `Sync` streams after each write.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tessera_plugin_sdk::{SpiffeId, TrustDomain};
use tessera_proto::types;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ca::CertificateAuthority;
use crate::config::ServerConfig;
use crate::datastore::Datastore;
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
    /// The signing CA.
    pub ca: Arc<CertificateAuthority>,
    /// The JWT-SVID signing key.
    pub jwt: Arc<JwtAuthority>,
    /// X.509-SVIDs signed since start (workload SVIDs, not agent or server SVIDs).
    pub x509_svids_signed: AtomicU64,
    /// JWT-SVIDs signed since start.
    pub jwt_svids_signed: AtomicU64,
    /// Latest change-feed revision; `Sync` streams wake on it.
    pub revisions: watch::Sender<u64>,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
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
    pub async fn publish_revision(&self) {
        match self.datastore.current_revision().await {
            Ok(revision) => {
                self.revisions.send_if_modified(|current| {
                    let newer = revision > *current;
                    if newer {
                        *current = revision;
                    }
                    newer
                });
            }
            Err(err) => tracing::warn!(error = %err, "cannot read the current revision"),
        }
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
