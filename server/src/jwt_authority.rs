//! The server's JWT-SVID signing key that signs now: a [`JwtSigner`] over a key
//! manager's key (the private key never leaves the key manager), switched to the next
//! key when a rotation activates it. The schedule, the journal and what the bundle
//! publishes are [`crate::rotation`]'s.

use std::sync::{Arc, PoisonError, RwLock};

use tessera_plugin_sdk::jwt::JwtSigner;

/// The active JWT signing key.
#[derive(Debug)]
pub struct JwtAuthority {
    current: RwLock<Arc<JwtSigner>>,
}

impl JwtAuthority {
    /// An authority signing with `active`.
    pub fn new(active: Arc<JwtSigner>) -> Self {
        Self {
            current: RwLock::new(active),
        }
    }

    /// The key that signs now.
    pub fn current(&self) -> Arc<JwtSigner> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Signs with `next` from now on; returns the key it replaces. Call only once
    /// `next` has been published in the bundle.
    pub fn activate(&self, next: Arc<JwtSigner>) -> Arc<JwtSigner> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, next)
    }
}
