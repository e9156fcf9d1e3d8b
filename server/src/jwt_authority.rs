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
        Self::store(dir, &signer)?;
        Ok(signer)
    }

    /// Writes `signer` and its kid in one atomic file replacement.
    fn store(dir: &Path, signer: &JwtSigner) -> Result<(), JwtAuthorityError> {
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
        })
    }

    /// The key that signs now.
    pub fn current(&self) -> Arc<JwtSigner> {
        match self.current.read() {
            Ok(current) => Arc::clone(&current),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// A new key, not yet used or stored: publish it first, then [`Self::activate`].
    /// Blocking (key generation).
    pub fn prepare(&self) -> Result<JwtSigner, JwtAuthorityError> {
        JwtSigner::generate(random_kid()?)
            .map_err(|err| JwtAuthorityError::Corrupt(format!("key generation: {err}")))
    }

    /// Stores `next` and signs with it from now on; returns the key it replaces.
    /// Blocking (file writes).
    pub fn activate(&self, next: JwtSigner) -> Result<Arc<JwtSigner>, JwtAuthorityError> {
        Self::store(&self.dir, &next)?;
        let next = Arc::new(next);
        let old = match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, next),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), next),
        };
        Ok(old)
    }
}

/// The JWT authorities to publish: the current key and a `prepared` next key (no
/// expiry), and every earlier key whose tokens may still be valid. `earlier` are the
/// keys as stored: one with an expiry is kept until then; one without an expiry that is
/// neither current nor prepared (a key replaced without its retirement record, e.g. a
/// crash mid-rotation, or a prepared key never activated) is retired now, published for
/// `max_ttl` plus a minute, so no token it signed loses its key.
pub fn published_authorities(
    current: &JwtSigner,
    prepared: Option<&JwtSigner>,
    earlier: &[StoredJwtAuthority],
    max_ttl: Duration,
    now: SystemTime,
) -> Vec<StoredJwtAuthority> {
    let signing = std::iter::once(current).chain(prepared);
    let mut out: Vec<StoredJwtAuthority> = signing
        .map(|key| StoredJwtAuthority {
            kid: key.kid().to_owned(),
            public_key: key.public_key().to_spki_der(),
            expires_at: None,
        })
        .collect();
    for key in earlier {
        if out.iter().any(|kept| kept.kid == key.kid) {
            continue;
        }
        let expires_at = key.expires_at.unwrap_or(now + max_ttl + RETIREMENT_LEEWAY);
        if expires_at > now {
            out.push(StoredJwtAuthority {
                expires_at: Some(expires_at),
                ..key.clone()
            });
        }
    }
    out
}

/// How long past the longest token lifetime a replaced key stays published (verifier
/// clock leeway).
pub const RETIREMENT_LEEWAY: Duration = Duration::from_secs(60);

/// The retirement record of `old`: published until `max_ttl` (plus a minute of
/// verifier leeway) after now.
pub fn retire(old: &JwtSigner, max_ttl: Duration, now: SystemTime) -> StoredJwtAuthority {
    StoredJwtAuthority {
        kid: old.kid().to_owned(),
        public_key: old.public_key().to_spki_der(),
        expires_at: Some(now + max_ttl + RETIREMENT_LEEWAY),
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
        let next = again.prepare().unwrap();
        let old = again.activate(next).unwrap();
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
        let max = Duration::from_secs(300);
        let next = authority.prepare().unwrap();
        // Prepared: published beside the current key before it signs anything.
        let before = published_authorities(&authority.current(), Some(&next), &[], max, now);
        assert_eq!(before.len(), 2);
        assert!(before.iter().all(|a| a.expires_at.is_none()));
        let old = authority.activate(next).unwrap();
        let retired = vec![retire(&old, max, now)];
        let published = published_authorities(&authority.current(), None, &retired, max, now);
        assert_eq!(published.len(), 2);
        let later = now + Duration::from_secs(361);
        assert_eq!(
            published_authorities(&authority.current(), None, &retired, max, later).len(),
            1
        );
    }

    #[test]
    fn a_replaced_key_without_retirement_record_is_retired_not_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        tessera_plugin_sdk::fs::ensure_private_dir(&dir).unwrap();
        let authority = JwtAuthority::load_or_create(&dir).unwrap();
        let stale = StoredJwtAuthority {
            kid: "old".into(),
            public_key: vec![1, 2, 3],
            expires_at: None,
        };
        let now = SystemTime::now();
        let max = Duration::from_secs(300);
        let published = published_authorities(&authority.current(), None, &[stale], max, now);
        assert_eq!(published.len(), 2);
        assert_eq!(published[1].expires_at, Some(now + max + RETIREMENT_LEEWAY));
    }
}
