//! Runs every configured workload attestor for one caller, concurrently, on blocking
//! threads (they read `/proc`), under one deadline. Any attestor error fails the whole
//! attestation: a partial selector set could match a less specific entry.

use std::sync::Arc;
use std::time::Duration;

use tessera_plugin_sdk::{Selector, Workload, WorkloadAttestor};
use tokio::task::JoinSet;

/// Why a caller could not be attested. The message is for the agent's log; callers
/// only learn that attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationFailure {
    /// An attestor failed.
    #[error("attestor {attestor}: {reason}")]
    Attestor {
        /// The attestor's name.
        attestor: String,
        /// Its error.
        reason: String,
    },
    /// The deadline passed.
    #[error("workload attestation timed out after {0:?}")]
    Timeout(Duration),
}

/// The configured attestors.
#[derive(Debug, Clone)]
pub struct Attestors {
    plugins: Vec<Arc<dyn WorkloadAttestor>>,
    timeout: Duration,
}

impl Attestors {
    /// `plugins` run concurrently; all must finish within `timeout`.
    pub fn new(plugins: Vec<Arc<dyn WorkloadAttestor>>, timeout: Duration) -> Self {
        Self { plugins, timeout }
    }

    /// The union of every attestor's selectors, sorted and deduplicated.
    pub async fn attest(
        &self,
        workload: Arc<Workload>,
    ) -> Result<Vec<Selector>, AttestationFailure> {
        let mut tasks = JoinSet::new();
        for plugin in &self.plugins {
            let plugin = Arc::clone(plugin);
            let workload = Arc::clone(&workload);
            tasks.spawn_blocking(move || {
                let name = plugin.name().to_owned();
                (name, plugin.attest(&workload))
            });
        }
        let collect = async {
            let mut selectors = Vec::new();
            while let Some(joined) = tasks.join_next().await {
                let (attestor, result) = joined.map_err(|err| AttestationFailure::Attestor {
                    attestor: "?".into(),
                    reason: err.to_string(),
                })?;
                match result {
                    Ok(found) => selectors.extend(found),
                    Err(err) => {
                        return Err(AttestationFailure::Attestor {
                            attestor,
                            reason: err.to_string(),
                        });
                    }
                }
            }
            selectors.sort();
            selectors.dedup();
            Ok(selectors)
        };
        tokio::time::timeout(self.timeout, collect)
            .await
            .map_err(|_| AttestationFailure::Timeout(self.timeout))?
    }
}
