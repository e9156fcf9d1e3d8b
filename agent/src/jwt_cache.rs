//! JWT-SVIDs held by the agent: one token per (entry, entry revision, audience set),
//! reused until half its lifetime has passed, then replaced by the next request. Callers
//! asking for the same token at once share one signing round trip (a per-key
//! `OnceCell`); a failed signing is not remembered, the next caller tries again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::RegistrationEntry;
use tessera_proto::node::NewJwtsvidRequest;
use tokio::sync::OnceCell;

use crate::node::ServerConnection;

/// Most tokens held; beyond it, the ones past their reuse time are dropped first.
const MAX_TOKENS: usize = 10_000;

/// A JWT-SVID as the server issued it.
#[derive(Clone)]
pub struct CachedJwt {
    /// The compact JWS.
    pub token: String,
    /// Issue time.
    pub issued_at: SystemTime,
    /// Expiry.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token: it is a bearer credential.
        f.debug_struct("CachedJwt")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl CachedJwt {
    /// Reusable until half its lifetime has passed.
    fn fresh(&self, now: SystemTime) -> bool {
        let lifetime = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        now < self.issued_at + lifetime / 2
    }
}

type Key = (String, u64, Vec<String>);

/// The agent's JWT-SVID cache.
#[derive(Debug, Default)]
pub struct JwtCache {
    slots: Mutex<HashMap<Key, Arc<OnceCell<CachedJwt>>>>,
}

fn from_unix(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs())
}

impl JwtCache {
    /// A token of `entry` for `audiences` (sorted, deduplicated by the caller): from the
    /// cache while fresh, else signed by the server.
    pub async fn get(
        &self,
        connection: &ServerConnection,
        entry: &RegistrationEntry,
        audiences: &[String],
    ) -> Result<CachedJwt, tonic::Status> {
        let key = (entry.id.clone(), entry.revision, audiences.to_vec());
        let now = SystemTime::now();
        let slot = {
            let mut slots = match self.slots.lock() {
                Ok(slots) => slots,
                Err(poisoned) => poisoned.into_inner(),
            };
            let stale = slots
                .get(&key)
                .is_some_and(|slot| slot.get().is_some_and(|jwt| !jwt.fresh(now)));
            if stale {
                slots.remove(&key);
            }
            if slots.len() >= MAX_TOKENS {
                slots.retain(|_, slot| slot.get().is_none_or(|jwt| jwt.fresh(now)));
            }
            if slots.len() >= MAX_TOKENS {
                slots.clear();
            }
            Arc::clone(slots.entry(key).or_default())
        };
        slot.get_or_try_init(|| async {
            let response = connection
                .client()
                .new_jwtsvid(NewJwtsvidRequest {
                    entry_id: entry.id.clone(),
                    audiences: audiences.to_vec(),
                    template_values: Default::default(),
                })
                .await?
                .into_inner();
            Ok(CachedJwt {
                token: response.token,
                issued_at: from_unix(response.issued_at),
                expires_at: from_unix(response.expires_at),
            })
        })
        .await
        .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_until_half_life() {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let jwt = CachedJwt {
            token: String::new(),
            issued_at,
            expires_at: issued_at + Duration::from_secs(300),
        };
        assert!(jwt.fresh(issued_at + Duration::from_secs(149)));
        assert!(!jwt.fresh(issued_at + Duration::from_secs(150)));
    }
}
