//! The server's JWT-SVID signing key: created on first start and kept (PKCS#8, 0600, in
//! the CA directory, with its `kid`), held parsed in memory, and replaced on request.
//! A replaced key's public half stays published until every token it signed has
//! expired, so verifiers never see a valid token without its key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::fs::{read_private_file, write_private_file};
use tessera_plugin_sdk::jwt::JwtSigner;

use crate::datastore::StoredJwtAuthority;

/// One file holds the kid and the key, so a single atomic rename replaces both: first
/// line `kid: <kid>`, then the PKCS#8 PEM.
const KEY_FILE: &str = "jwt_key.pem";

/// Why the JWT key could not be loaded, created or replaced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwtAuthorityError {
    /// Reading or writing the key files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored key is unusable.
    #[error("{0}")]
    Corrupt(String),
}

/// The active JWT signing key.
#[derive(Debug)]
pub struct JwtAuthority {
    dir: PathBuf,
    current: RwLock<Arc<JwtSigner>>,
}

fn random_kid() -> Result<String, JwtAuthorityError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| JwtAuthorityError::Corrupt("the system RNG failed".into()))?;
    Ok(hex::encode(bytes))
}

impl JwtAuthority {
    /// Loads the key from `dir` (the CA directory, already private), or creates it.
    /// Blocking: call from `spawn_blocking`.
    pub fn load_or_create(dir: &Path) -> Result<Self, JwtAuthorityError> {
        let signer = match read_private_file(dir, KEY_FILE) {
            Ok(contents) => {
                let corrupt = |what: &str| {
                    JwtAuthorityError::Corrupt(format!("{}: {what}", dir.join(KEY_FILE).display()))
                };
                let text = String::from_utf8(contents).map_err(|_| corrupt("not UTF-8"))?;
                let (first, pem_text) = text
                    .split_once('\n')
                    .ok_or_else(|| corrupt("no kid line"))?;
                let kid = first
                    .strip_prefix("kid: ")
                    .ok_or_else(|| corrupt("no kid line"))?;
                let der = pem::parse(pem_text)
                    .map_err(|err| corrupt(&err.to_string()))?
                    .into_contents();
                JwtSigner::from_pkcs8(kid.to_owned(), &der)
                    .map_err(|err| corrupt(&err.to_string()))?
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let signer = Self::create(dir)?;
                tracing::info!(kid = signer.kid(), "created the JWT-SVID signing key");
                signer
            }
            Err(source) => {
                return Err(JwtAuthorityError::Io {
                    path: dir.join(KEY_FILE),
                    source,
                });
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            current: RwLock::new(Arc::new(signer)),
        })
    }

    /// A fresh key, persisted atomically with its kid.
    fn create(dir: &Path) -> Result<JwtSigner, JwtAuthorityError> {
        let signer = JwtSigner::generate(random_kid()?)
            .map_err(|err| JwtAuthorityError::Corrupt(format!("key generation: {err}")))?;
        let contents = format!(
            "kid: {}\n{}",
            signer.kid(),
            tessera_plugin_sdk::x509::pem_encode("PRIVATE KEY", &signer.pkcs8())
        );
        write_private_file(dir, KEY_FILE, contents.as_bytes()).map_err(|source| {
            JwtAuthorityError::Io {
                path: dir.join(KEY_FILE),
                source,
            }
        })?;
        Ok(signer)
    }

    /// The key that signs now.
    pub fn current(&self) -> Arc<JwtSigner> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the signing key; returns the old one. Blocking (key generation, file
    /// writes).
    pub fn rotate(&self) -> Result<Arc<JwtSigner>, JwtAuthorityError> {
        let fresh = Arc::new(Self::create(&self.dir)?);
        let old = match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, fresh),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
        };
        Ok(old)
    }
}

/// The JWT authorities to publish: the current key (no expiry) and every earlier key
/// whose tokens may still be valid; `retired` are the earlier ones as stored.
pub fn published_authorities(
    current: &JwtSigner,
    retired: &[StoredJwtAuthority],
    now: SystemTime,
) -> Vec<StoredJwtAuthority> {
    let mut out = vec![StoredJwtAuthority {
        kid: current.kid().to_owned(),
        public_key: current.public_key().to_spki_der(),
        expires_at: None,
    }];
    out.extend(
        retired
            .iter()
            .filter(|a| a.kid != current.kid())
            .filter(|a| a.expires_at.is_some_and(|at| at > now))
            .cloned(),
    );
    out
}

/// The retirement record of `old`: published until `max_ttl` (plus a minute of
/// verifier leeway) after now.
pub fn retire(old: &JwtSigner, max_ttl: Duration, now: SystemTime) -> StoredJwtAuthority {
    StoredJwtAuthority {
        kid: old.kid().to_owned(),
        public_key: old.public_key().to_spki_der(),
        expires_at: Some(now + max_ttl + Duration::from_secs(60)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_kept_across_loads_and_rotation_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        tessera_plugin_sdk::fs::ensure_private_dir(&dir).unwrap();
        let first = JwtAuthority::load_or_create(&dir).unwrap();
        let kid = first.current().kid().to_owned();
        let again = JwtAuthority::load_or_create(&dir).unwrap();
        assert_eq!(again.current().kid(), kid);
        assert_eq!(again.current().public_key(), first.current().public_key());
        let old = again.rotate().unwrap();
        assert_eq!(old.kid(), kid);
        assert_ne!(again.current().kid(), kid);
        let reloaded = JwtAuthority::load_or_create(&dir).unwrap();
        assert_eq!(reloaded.current().kid(), again.current().kid());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn retired_keys_stay_published_until_their_tokens_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        tessera_plugin_sdk::fs::ensure_private_dir(&dir).unwrap();
        let authority = JwtAuthority::load_or_create(&dir).unwrap();
        let now = SystemTime::now();
        let old = authority.rotate().unwrap();
        let retired = vec![retire(&old, Duration::from_secs(300), now)];
        let published = published_authorities(&authority.current(), &retired, now);
        assert_eq!(published.len(), 2);
        let later = now + Duration::from_secs(361);
        assert_eq!(
            published_authorities(&authority.current(), &retired, later).len(),
            1
        );
    }
}
