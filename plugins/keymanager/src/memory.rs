//! The `memory` key manager: keys live in a map in process memory and are lost when
//! the process exits. For tests and ephemeral servers; a server using it gets a new CA
//! key on every start.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_trait::async_trait;
use tessera_plugin_sdk::keymanager::{
    KeyManager, KeyManagerError, KeyType, SigningKey, validate_key_id,
};

use crate::blocking;
use crate::software::SoftwareKey;

/// The plugin name (`kind = "memory"`).
pub const NAME: &str = "memory";

/// Keys in memory, by id.
#[derive(Debug, Default)]
pub struct MemoryKeyManager {
    keys: RwLock<BTreeMap<String, Arc<SoftwareKey>>>,
}

impl MemoryKeyManager {
    /// An empty key manager.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyManager for MemoryKeyManager {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn generate_key(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> Result<Arc<dyn SigningKey>, KeyManagerError> {
        validate_key_id(id)?;
        let owned = id.to_owned();
        let key =
            blocking(move || SoftwareKey::generate(&owned, key_type).map(|(key, _)| key)).await?;
        let key = Arc::new(key);
        // The map only ever holds complete keys, so a poisoned lock is still consistent.
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), Arc::clone(&key));
        Ok(key)
    }

    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn SigningKey>>, KeyManagerError> {
        validate_key_id(id)?;
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.get(id).map(|k| Arc::clone(k) as Arc<dyn SigningKey>))
    }

    async fn list_keys(&self) -> Result<Vec<Arc<dyn SigningKey>>, KeyManagerError> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        Ok(keys
            .values()
            .map(|k| Arc::clone(k) as Arc<dyn SigningKey>)
            .collect())
    }

    async fn delete_key(&self, id: &str) -> Result<bool, KeyManagerError> {
        validate_key_id(id)?;
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        Ok(keys.remove(id).is_some())
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::UnparsedPublicKey;
    use tessera_plugin_sdk::keymanager::SignatureFormat;

    use super::*;
    use crate::test_support::verifier;

    #[tokio::test]
    async fn generate_get_list_delete() {
        let km: Arc<dyn KeyManager> = Arc::new(MemoryKeyManager::new());
        assert_eq!(km.name(), "memory");
        assert!(km.get_key("a").await.unwrap().is_none());
        assert!(km.list_keys().await.unwrap().is_empty());

        let b = km.generate_key("b", KeyType::EcP384).await.unwrap();
        let a = km.generate_key("a", KeyType::EcP256).await.unwrap();
        assert_eq!(a.id(), "a");
        assert_eq!(a.key_type(), KeyType::EcP256);
        let got = km.get_key("a").await.unwrap().unwrap();
        assert_eq!(got.public_key_der(), a.public_key_der());
        let ids: Vec<_> = km
            .list_keys()
            .await
            .unwrap()
            .iter()
            .map(|k| k.id().to_owned())
            .collect();
        assert_eq!(ids, ["a", "b"]);

        // Fixed-format P-256 signatures are 64 bytes and verify as ES256.
        let sig = a.sign(b"jws", SignatureFormat::Fixed).unwrap();
        assert_eq!(sig.len(), 64);
        UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            a.public_key_der(),
        )
        .verify(b"jws", &sig)
        .unwrap();

        // Replacing gives a new key; the old handle still signs with the old one.
        let a2 = km.generate_key("a", KeyType::Rsa2048).await.unwrap();
        assert_ne!(a2.public_key_der(), a.public_key_der());
        let got = km.get_key("a").await.unwrap().unwrap();
        assert_eq!(got.public_key_der(), a2.public_key_der());
        let sig = a.sign(b"old", SignatureFormat::Asn1Der).unwrap();
        UnparsedPublicKey::new(
            verifier(KeyType::EcP256, SignatureFormat::Asn1Der),
            a.public_key_der(),
        )
        .verify(b"old", &sig)
        .unwrap();

        assert!(km.delete_key("a").await.unwrap());
        assert!(!km.delete_key("a").await.unwrap());
        assert!(km.get_key("a").await.unwrap().is_none());
        assert_eq!(km.list_keys().await.unwrap().len(), 1);
        drop(b);
    }

    #[tokio::test]
    async fn invalid_ids_are_refused() {
        let km = MemoryKeyManager::new();
        for bad in ["", "..", "a/b", "a b"] {
            assert!(matches!(
                km.generate_key(bad, KeyType::EcP256).await,
                Err(KeyManagerError::InvalidKeyId { .. })
            ));
            assert!(km.get_key(bad).await.is_err());
            assert!(km.delete_key(bad).await.is_err());
        }
    }
}
