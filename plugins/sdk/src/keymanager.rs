//! The key manager seam: [`KeyManager`] creates, stores and hands out signing keys;
//! [`SigningKey`] signs with one of them. The server's CA (X.509 authority and JWT
//! signing keys) signs through these traits only, so key custody is the plugin's
//! business (DESIGN.md §4).
//!
//! Rules every implementation follows:
//!
//! - **Private keys never leave the key manager.** No method returns private key
//!   material, as PEM, DER or otherwise; callers get a public key (SPKI DER) and a
//!   `sign` method.
//! - **Keys stay parsed.** A [`SigningKey`] holds its key ready to sign; nothing is
//!   re-read or re-parsed per signature.
//! - **Key ids are safe file names.** [`validate_key_id`] accepts 1 to
//!   [`MAX_KEY_ID_LEN`] bytes of `[A-Za-z0-9._-]`, except `.` and `..`; every method
//!   rejects anything else with [`KeyManagerError::InvalidKeyId`] before any I/O.
//! - **No silent fallback.** A manager that cannot store a key (disk full, backend
//!   down) returns [`KeyManagerError::Unavailable`]; the CA then keeps its current key
//!   and retries, and never falls back to an unprotected key (SECURITY.md §3.10 item 103).
//!
//! This module owns the traits, the key and signature types and the error; the plugins
//! (`memory`, `disk`) live in `tessera-plugin-keymanager`.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

/// Longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;

/// The algorithm and size of a key. ECDSA P-256 is the default (DESIGN.md §4).
///
/// In configuration files and on the command line a key type is spelled as SPIRE spells
/// it: `ec-p256`, `ec-p384`, `rsa-2048`, `rsa-4096` (see [`KeyType::as_str`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum KeyType {
    /// ECDSA on NIST P-256, signing with SHA-256 (JWS `ES256`).
    #[default]
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA on NIST P-384, signing with SHA-384 (JWS `ES384`).
    #[serde(rename = "ec-p384")]
    EcP384,
    /// RSA with a 2048-bit modulus, PKCS#1 v1.5 with SHA-256 (JWS `RS256`).
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA with a 4096-bit modulus, PKCS#1 v1.5 with SHA-256 (JWS `RS256`).
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyType {
    /// Every key type, in a stable order.
    pub const ALL: [KeyType; 4] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa4096,
    ];

    /// The configuration spelling: `ec-p256`, `ec-p384`, `rsa-2048` or `rsa-4096`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    /// The JWS `alg` of signatures made by this key with [`SignatureFormat::Fixed`]:
    /// `ES256`, `ES384` or `RS256`.
    pub fn jws_algorithm(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ES256",
            KeyType::EcP384 => "ES384",
            KeyType::Rsa2048 | KeyType::Rsa4096 => "RS256",
        }
    }

    /// Whether this is an ECDSA key (its signature encoding depends on
    /// [`SignatureFormat`]).
    pub fn is_ecdsa(self) -> bool {
        matches!(self, KeyType::EcP256 | KeyType::EcP384)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key type name that is not one of `ec-p256`, `ec-p384`, `rsa-2048`, `rsa-4096`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown key type {0:?}: expected one of ec-p256, ec-p384, rsa-2048, rsa-4096")]
pub struct UnknownKeyType(String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownKeyType(truncate(s)))
    }
}

/// How a signature is encoded.
///
/// For ECDSA keys the two formats differ; RSA keys sign with PKCS#1 v1.5 and SHA-256 in
/// both (the encoding X.509 and JWS `RS256` share).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignatureFormat {
    /// ECDSA: the DER `Ecdsa-Sig-Value` (`SEQUENCE { r, s }`) X.509 certificates and
    /// CSRs carry.
    Asn1Der,
    /// ECDSA: `r || s` as fixed-width big-endian integers (64 bytes for P-256, 96 for
    /// P-384), as JWS `ES256`/`ES384` require (RFC 7518 §3.4).
    Fixed,
}

/// Why a key manager or a key could not do what was asked.
///
/// Error messages name key ids and file paths, never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    /// The key id is not 1 to 64 bytes of `[A-Za-z0-9._-]`, or is `.` or `..`.
    #[error("invalid key id {id:?}: {reason}")]
    InvalidKeyId {
        /// The rejected id (at most 80 characters of it).
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend cannot store, load or delete keys right now (I/O error, disk full,
    /// read-only file system, remote service down). Transient: keep the current key and
    /// retry later; never fall back to another key manager.
    #[error("key manager unavailable: {context}")]
    Unavailable {
        /// What was being done, naming the file or key.
        context: String,
        /// The underlying I/O error, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A file or directory the key manager would use fails a security check: wrong
    /// owner, group/other permission bits, a symlink, or not a regular file. It is never
    /// used, repaired or written through; an operator must look at it.
    #[error("{}: {problem}", path.display())]
    Insecure {
        /// The offending file or directory.
        path: PathBuf,
        /// What is wrong with it (mode, owner, type).
        problem: String,
    },
    /// A stored key cannot be parsed, or is not one of the supported [`KeyType`]s.
    #[error("{}: {reason}", path.display())]
    InvalidKeyFile {
        /// The key file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Signing failed inside the crypto library.
    #[error("signing with key {id:?} failed")]
    Signing {
        /// The key id.
        id: String,
    },
    /// Generating a key failed inside the crypto library.
    #[error("generating a {key_type} key for {id:?} failed")]
    Generation {
        /// The key id.
        id: String,
        /// The requested type.
        key_type: KeyType,
    },
}

impl KeyManagerError {
    /// Whether the failure is transient ([`KeyManagerError::Unavailable`]): the caller
    /// should keep using its current key and retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KeyManagerError::Unavailable { .. })
    }

    /// A [`KeyManagerError::Unavailable`] with an I/O cause.
    pub fn unavailable(context: impl Into<String>, source: std::io::Error) -> Self {
        KeyManagerError::Unavailable {
            context: context.into(),
            source: Some(source),
        }
    }
}

/// Check that `id` is a valid key id: 1 to [`MAX_KEY_ID_LEN`] bytes of
/// `[A-Za-z0-9._-]`, and neither `.` nor `..`. Such an id is a safe file name.
pub fn validate_key_id(id: &str) -> Result<(), KeyManagerError> {
    let reason = if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_KEY_ID_LEN {
        Some("longer than 64 bytes")
    } else if id == "." || id == ".." {
        Some("`.` and `..` are not key ids")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only ASCII letters, digits, `.`, `_` and `-` are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(KeyManagerError::InvalidKeyId {
            id: truncate(id),
            reason,
        }),
    }
}

/// At most 80 characters of untrusted input, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// One key held by a [`KeyManager`], ready to sign.
///
/// Shared as `Arc<dyn SigningKey>`. The handle keeps working after the key is replaced
/// or deleted in its manager (it holds its own parsed key); ask the manager again to
/// see the current key for an id. `Debug` output never includes key material.
pub trait SigningKey: Send + Sync + fmt::Debug {
    /// The key id, as given to [`KeyManager::generate_key`].
    fn id(&self) -> &str;

    /// The key's algorithm and size.
    fn key_type(&self) -> KeyType;

    /// The public key as a DER `SubjectPublicKeyInfo` (what goes into a certificate
    /// or a JWKS).
    fn public_key_der(&self) -> &[u8];

    /// Sign `message` (the whole message: the key hashes it with SHA-256, or SHA-384
    /// for P-384). `format` selects the ECDSA encoding; RSA keys ignore it.
    fn sign(&self, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>, KeyManagerError>;
}

/// The future a [`KeyManager`] method returns.
pub type KeyManagerFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, KeyManagerError>> + Send + 'a>>;

/// Creates, stores and hands out signing keys by id.
///
/// Object-safe and shared as `Arc<dyn KeyManager>`. The methods are async; their
/// signatures are exactly what `#[async_trait::async_trait]` expands `async fn` to
/// (written out because this crate does not depend on `async-trait`), so callers
/// simply `.await` them and implementations may be written either with
/// `#[async_trait::async_trait]` on the `impl` block and plain `async fn`s, or by hand
/// with `Box::pin(async move { ... })`.
///
/// Contract:
/// - every method validates the key id ([`validate_key_id`]) first;
/// - [`generate_key`](KeyManager::generate_key) creates the key or atomically replaces
///   an existing one with the same id: afterwards [`get_key`](KeyManager::get_key)
///   returns either the old key or the new one, never nothing and never a torn key. On
///   error the previous key, if any, is still the one stored;
/// - a failure of the backend is [`KeyManagerError::Unavailable`];
/// - blocking work (key generation, file I/O) does not run on the async runtime's
///   worker threads.
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// The plugin's name, e.g. `disk` (the `kind` in `[server.key_manager]`).
    fn name(&self) -> &'static str;

    /// Generate a new `key_type` key under `id`, replacing any key stored under it,
    /// and return it.
    fn generate_key<'life0, 'life1, 'async_trait>(
        &'life0 self,
        id: &'life1 str,
        key_type: KeyType,
    ) -> KeyManagerFuture<'async_trait, Arc<dyn SigningKey>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait;

    /// The key stored under `id`, if any.
    fn get_key<'life0, 'life1, 'async_trait>(
        &'life0 self,
        id: &'life1 str,
    ) -> KeyManagerFuture<'async_trait, Option<Arc<dyn SigningKey>>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait;

    /// Every stored key, sorted by id.
    fn list_keys<'life0, 'async_trait>(
        &'life0 self,
    ) -> KeyManagerFuture<'async_trait, Vec<Arc<dyn SigningKey>>>
    where
        'life0: 'async_trait,
        Self: 'async_trait;

    /// Delete the key stored under `id`. Returns whether there was one.
    fn delete_key<'life0, 'life1, 'async_trait>(
        &'life0 self,
        id: &'life1 str,
    ) -> KeyManagerFuture<'async_trait, bool>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids() {
        for ok in [
            "a",
            "x509-ca-A",
            "jwt.key_1",
            "...",
            ".hidden",
            &"a".repeat(64),
        ] {
            validate_key_id(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "a\0b",
            "é",
            "a\n",
            &"a".repeat(65),
        ] {
            let err = validate_key_id(bad).unwrap_err();
            assert!(
                matches!(err, KeyManagerError::InvalidKeyId { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = validate_key_id(&"x".repeat(1000)).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn key_type_names_round_trip() {
        assert_eq!(KeyType::default(), KeyType::EcP256);
        for t in KeyType::ALL {
            assert_eq!(t.as_str().parse::<KeyType>().unwrap(), t);
            assert_eq!(t.to_string(), t.as_str());
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<KeyType>(&json).unwrap(), t);
        }
        assert!("EC-P256".parse::<KeyType>().is_err());
        assert!(serde_json::from_str::<KeyType>("\"rsa-1024\"").is_err());
        assert_eq!(KeyType::EcP384.jws_algorithm(), "ES384");
        assert_eq!(KeyType::Rsa4096.jws_algorithm(), "RS256");
    }

    #[test]
    fn unavailable_is_distinct() {
        let err =
            KeyManagerError::unavailable("writing /k/a.key", std::io::Error::from_raw_os_error(28));
        assert!(err.is_unavailable());
        assert!(err.to_string().contains("/k/a.key"), "{err}");
        assert!(
            !KeyManagerError::Signing { id: "a".into() }.is_unavailable(),
            "only Unavailable is transient"
        );
    }
}
