//! The key managers of the tessera server, one module per plugin:
//!
//! - [`memory`]: keys in a map, lost on exit; for tests and ephemeral servers;
//! - [`disk`]: one PKCS#8 file per key, `0600` in a `0700` directory, written
//!   atomically; for production.
//!
//! Both implement [`tessera_plugin_sdk::KeyManager`] and hand out
//! [`tessera_plugin_sdk::SigningKey`]s that keep the private key parsed in memory and
//! never return it. [`RcgenSigner`] lets rcgen sign certificates with such a key, and
//! [`KeyManagerConfig`] is the `[server.key_manager]` configuration section.
//!
//! This crate owns key custody only. Which key ids exist, when to rotate, and what gets
//! signed are the server CA's decisions.

pub mod disk;
pub mod memory;
mod signer;
mod software;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_plugin_sdk::keymanager::{KeyManager, KeyManagerError};

pub use disk::DiskKeyManager;
pub use memory::MemoryKeyManager;
pub use signer::RcgenSigner;

/// The `[server.key_manager]` section of the server configuration.
///
/// ```toml
/// [server.key_manager]
/// kind = "disk"                       # or "memory"
/// directory = "/var/lib/tessera/keys" # disk only; default <data_dir>/keys
/// ```
///
/// The default is `kind = "disk"` with the default directory. `directory` is refused
/// with `kind = "memory"`, as is any other key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RawConfig")]
pub enum KeyManagerConfig {
    /// Keys in memory only: every restart starts with no keys.
    Memory,
    /// Keys in PKCS#8 files in a private directory.
    Disk {
        /// The key directory; `None` means `<data_dir>/keys`.
        directory: Option<PathBuf>,
    },
}

/// `[server.key_manager]` as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    kind: Kind,
    directory: Option<PathBuf>,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Memory,
    #[default]
    Disk,
}

impl TryFrom<RawConfig> for KeyManagerConfig {
    type Error = &'static str;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        match (raw.kind, raw.directory) {
            (Kind::Memory, Some(_)) => {
                Err("`directory` applies to kind = \"disk\", not kind = \"memory\"")
            }
            (Kind::Memory, None) => Ok(KeyManagerConfig::Memory),
            (Kind::Disk, directory) => Ok(KeyManagerConfig::Disk { directory }),
        }
    }
}

impl Default for KeyManagerConfig {
    fn default() -> Self {
        KeyManagerConfig::Disk { directory: None }
    }
}

impl KeyManagerConfig {
    /// The configured plugin name: `memory` or `disk`.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyManagerConfig::Memory => memory::NAME,
            KeyManagerConfig::Disk { .. } => disk::NAME,
        }
    }

    /// The key directory of a `disk` manager (`<data_dir>/keys` unless configured), or
    /// `None` for `memory`.
    pub fn directory(&self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            KeyManagerConfig::Memory => None,
            KeyManagerConfig::Disk { directory } => Some(
                directory
                    .clone()
                    .unwrap_or_else(|| data_dir.join(disk::DEFAULT_DIRECTORY_NAME)),
            ),
        }
    }

    /// Build the configured key manager. A `disk` manager creates or checks its
    /// directory and loads every key in it (see [`DiskKeyManager::open`]).
    pub async fn build(&self, data_dir: &Path) -> Result<Arc<dyn KeyManager>, KeyManagerError> {
        match self.directory(data_dir) {
            None => Ok(Arc::new(MemoryKeyManager::new())),
            Some(dir) => Ok(Arc::new(DiskKeyManager::open(dir).await?)),
        }
    }
}

/// Run blocking work (key generation, file I/O) off the async worker threads.
async fn blocking<T, F>(f: F) -> Result<T, KeyManagerError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, KeyManagerError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| KeyManagerError::Unavailable {
            context: format!("key manager task did not complete: {e}"),
            source: None,
        })?
}

#[cfg(test)]
pub(crate) mod test_support {
    use aws_lc_rs::signature::{self, VerificationAlgorithm};
    use tessera_plugin_sdk::keymanager::{KeyType, SignatureFormat};

    /// The aws-lc verification algorithm for signatures of `key_type` in `format`.
    pub(crate) fn verifier(
        key_type: KeyType,
        format: SignatureFormat,
    ) -> &'static dyn VerificationAlgorithm {
        match (key_type, format) {
            (KeyType::EcP256, SignatureFormat::Asn1Der) => &signature::ECDSA_P256_SHA256_ASN1,
            (KeyType::EcP256, SignatureFormat::Fixed) => &signature::ECDSA_P256_SHA256_FIXED,
            (KeyType::EcP384, SignatureFormat::Asn1Der) => &signature::ECDSA_P384_SHA384_ASN1,
            (KeyType::EcP384, SignatureFormat::Fixed) => &signature::ECDSA_P384_SHA384_FIXED,
            (KeyType::Rsa2048 | KeyType::Rsa4096, _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        #[serde(default)]
        key_manager: KeyManagerConfig,
    }

    fn parse(text: &str) -> Result<KeyManagerConfig, toml::de::Error> {
        toml::from_str::<Server>(text).map(|s| s.key_manager)
    }

    #[test]
    fn config() {
        let data = Path::new("/var/lib/tessera");
        let default = parse("").unwrap();
        assert_eq!(default, KeyManagerConfig::Disk { directory: None });
        assert_eq!(default.kind(), "disk");
        assert_eq!(
            default.directory(data).unwrap(),
            Path::new("/var/lib/tessera/keys")
        );

        let disk = parse("[key_manager]\nkind = \"disk\"\ndirectory = \"/srv/keys\"\n").unwrap();
        assert_eq!(disk.directory(data).unwrap(), Path::new("/srv/keys"));

        let implicit = parse("[key_manager]\ndirectory = \"/srv/keys\"\n").unwrap();
        assert_eq!(implicit, disk);
        let err = parse("[key_manager]\nkind = \"memory\"\ndirectory = \"/x\"\n").unwrap_err();
        assert!(err.to_string().contains("directory"), "{err}");

        let memory = parse("[key_manager]\nkind = \"memory\"\n").unwrap();
        assert_eq!(memory, KeyManagerConfig::Memory);
        assert_eq!(memory.kind(), "memory");
        assert_eq!(memory.directory(data), None);

        for bad in [
            "[key_manager]\nkind = \"hsm\"\n",
            "[key_manager]\nkind = \"disk\"\npath = \"/x\"\n",
            "[key_manager]\nkind = \"memory\"\ndirectory = \"/x\"\n",
            "[key_manager]\nkind = \"Disk\"\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn build_memory_and_disk() {
        let root = tempfile::tempdir().unwrap();
        let km = KeyManagerConfig::Memory.build(root.path()).await.unwrap();
        assert_eq!(km.name(), "memory");
        let km = KeyManagerConfig::default()
            .build(root.path())
            .await
            .unwrap();
        assert_eq!(km.name(), "disk");
        assert!(root.path().join("keys").is_dir());
    }
}
