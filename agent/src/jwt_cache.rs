//! JWT-SVIDs held by the agent: one token per (entry, entry revision, SPIFFE ID,
//! audience set), reused until half its lifetime has passed, then replaced by the next
//! request. The SPIFFE ID is part of the key because a templated entry has one ID per
//! caller (`.../{instance}`): two instances never share a token. Callers asking for the
//! same token at once share one signing round trip (a per-key `OnceCell`); a failed
//! signing is not remembered, the next caller tries again. Tokens of an identity that is
//! dropped (its process exited, it was revoked) are forgotten at once ([`JwtCache::forget`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use tessera_plugin_sdk::{RegistrationEntry, SpiffeId, TemplateValues};
use tokio::sync::OnceCell;

use crate::cache::from_unix;
use crate::signer::Signer;

/// Most tokens held; beyond it, the ones past their reuse time are dropped first.
const MAX_TOKENS: usize = 10_000;
/// Longest `jti` recorded in the audit log.
const MAX_JTI_LEN: usize = 128;

/// A JWT-SVID as the server issued it.
#[derive(Clone)]
pub struct CachedJwt {
    /// The compact JWS.
    pub token: String,
    /// Issue time.
    pub issued_at: SystemTime,
    /// Expiry.
    pub expires_at: SystemTime,
    /// The token's `jti` claim (read once from its payload, for the audit log).
    pub jti: Option<String>,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token: it is a bearer credential.
        f.debug_struct("CachedJwt")
            .field("expires_at", &self.expires_at)
            .field("jti", &self.jti)
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

/// The `jti` claim of a compact JWS, read from its payload without verifying it (the
/// token comes from the server over mutual TLS; this is only for the audit record).
/// `None` when absent or not a short printable string.
pub fn jti_of(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    let jti = claims.get("jti")?.as_str()?;
    (!jti.is_empty()
        && jti.len() <= MAX_JTI_LEN
        && jti
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then(|| jti.to_owned())
}

type Key = (String, u64, SpiffeId, Vec<String>);

/// The agent's JWT-SVID cache.
#[derive(Debug, Default)]
pub struct JwtCache {
    slots: Mutex<HashMap<Key, Arc<OnceCell<CachedJwt>>>>,
}

impl JwtCache {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<OnceCell<CachedJwt>>>> {
        // Every update is a single insert, remove or retain: a poisoned map is consistent.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A token of `entry` for `spiffe_id` (the entry's fixed ID, or the one rendered for
    /// the caller from `values`) and `audiences` (sorted, deduplicated by the caller):
    /// from the cache while fresh, else signed by the server. A token whose subject is
    /// not `spiffe_id` is refused.
    pub async fn get(
        &self,
        signer: &dyn Signer,
        entry: &RegistrationEntry,
        spiffe_id: &SpiffeId,
        values: &TemplateValues,
        audiences: &[String],
    ) -> Result<CachedJwt, tonic::Status> {
        let key = (
            entry.id.clone(),
            entry.revision,
            spiffe_id.clone(),
            audiences.to_vec(),
        );
        let now = SystemTime::now();
        let slot = {
            let mut slots = self.slots();
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
            let response = signer.new_jwt(&entry.id, audiences, values).await?;
            if response.spiffe_id != spiffe_id.as_str() {
                tracing::warn!(entry_id = %entry.id, "the server signed a JWT-SVID for another SPIFFE ID; discarded");
                return Err(tonic::Status::internal(
                    "the server signed a JWT-SVID for another SPIFFE ID",
                ));
            }
            Ok(CachedJwt {
                jti: jti_of(&response.token),
                token: response.token,
                issued_at: from_unix(response.issued_at),
                expires_at: from_unix(response.expires_at),
            })
        })
        .await
        .cloned()
    }

    /// Forgets every token whose subject is `spiffe_id`.
    pub fn forget(&self, spiffe_id: &SpiffeId) {
        self.slots().retain(|(_, _, id, _), _| id != spiffe_id);
    }

    /// Tokens (and signings in flight) held.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    /// True when no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::LocalSigner;
    use std::time::Duration;

    #[test]
    fn fresh_until_half_life() {
        let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let jwt = CachedJwt {
            token: String::new(),
            issued_at,
            expires_at: issued_at + Duration::from_secs(300),
            jti: None,
        };
        assert!(jwt.fresh(issued_at + Duration::from_secs(149)));
        assert!(!jwt.fresh(issued_at + Duration::from_secs(150)));
    }

    #[test]
    fn jti_is_read_from_the_payload() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = |claims: &str| format!("{}.{}.sig", b64("{}"), b64(claims));
        assert_eq!(
            jti_of(&token(r#"{"sub":"x","jti":"0a1b2c"}"#)).as_deref(),
            Some("0a1b2c")
        );
        for bad in [
            r#"{"sub":"x"}"#,
            r#"{"jti":""}"#,
            r#"{"jti":7}"#,
            r#"{"jti":"a b"}"#,
            "not json",
        ] {
            assert_eq!(jti_of(&token(bad)), None, "{bad}");
        }
        assert_eq!(jti_of("no-dots"), None);
        assert_eq!(jti_of("a.!!!.c"), None);
    }

    #[tokio::test]
    async fn tokens_are_keyed_by_rendered_id_and_forgotten_by_id() {
        let signer = LocalSigner::new();
        let entry = signer.entry("e1", "spiffe://example.org/bot/{instance}", &["unix:uid:1"]);
        let cache = JwtCache::default();
        let aud = vec!["svc".to_owned()];
        let (a, va) = signer.render(&entry, "a");
        let (b, vb) = signer.render(&entry, "b");
        let first = cache.get(&signer, &entry, &a, &va, &aud).await.unwrap();
        let again = cache.get(&signer, &entry, &a, &va, &aud).await.unwrap();
        assert_eq!(first.token, again.token, "reused for the same rendered ID");
        assert_eq!(signer.jwt_calls(), 1);
        assert!(first.jti.is_some());
        let other = cache.get(&signer, &entry, &b, &vb, &aud).await.unwrap();
        assert_ne!(first.token, other.token, "another instance, another token");
        assert_eq!(signer.jwt_calls(), 2);
        assert_eq!(cache.len(), 2);
        cache.forget(&a);
        assert_eq!(cache.len(), 1);
        cache.get(&signer, &entry, &b, &vb, &aud).await.unwrap();
        assert_eq!(signer.jwt_calls(), 2, "b is still cached");
        // A server that signs another subject is refused.
        let (c, _) = signer.render(&entry, "c");
        let err = cache.get(&signer, &entry, &c, &vb, &aud).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
    }
}
