//! What the agent keeps in its data directory so a restart needs no new join token:
//! its private key (0600), its SVID, and the last bundle the server sent. Written
//! atomically with the SDK's secret-file helpers.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tessera_plugin_sdk::SpiffeId;
use tessera_plugin_sdk::fs::{
    ensure_private_dir, read_private_file, write_private_file, write_public_file,
};
use tessera_plugin_sdk::x509::{pem_encode, pem_encode_all};

use crate::error::AgentError;

const KEY_FILE: &str = "agent_key.pem";
const SVID_FILE: &str = "agent_svid.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// The agent's own credentials as persisted.
#[derive(Clone)]
pub struct AgentSvidFiles {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Vec<u8>,
    /// The SPIFFE ID of the leaf.
    pub spiffe_id: SpiffeId,
    /// NotAfter of the leaf.
    pub not_after: SystemTime,
    /// NotBefore of the leaf.
    pub not_before: SystemTime,
}

impl std::fmt::Debug for AgentSvidFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSvidFiles")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Parses every `CERTIFICATE` block of a PEM text.
pub fn parse_pem_certificates(text: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(text).map_err(|err| format!("invalid PEM: {err}"))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| block.into_contents())
        .collect();
    if certs.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    Ok(certs)
}

impl Store {
    /// Opens (creating 0700) the data directory.
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        ensure_private_dir(dir).map_err(AgentError::io(format!("data_dir {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The stored agent SVID and key, if both are present and parse.
    pub fn load_svid(&self) -> Result<Option<AgentSvidFiles>, AgentError> {
        let cert_path = self.dir.join(SVID_FILE);
        let Ok(cert_text) = std::fs::read(&cert_path) else {
            return Ok(None);
        };
        let key_text = match read_private_file(&self.dir, KEY_FILE) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(AgentError::Io {
                    what: format!("{}/{KEY_FILE}", self.dir.display()),
                    source: err,
                });
            }
        };
        let chain = parse_pem_certificates(&cert_text)
            .map_err(|err| AgentError::Config(format!("{}: {err}", cert_path.display())))?;
        let key = pem::parse(&key_text)
            .map_err(|err| AgentError::Config(format!("{KEY_FILE}: {err}")))?
            .into_contents();
        let leaf = chain
            .first()
            .ok_or_else(|| AgentError::Config("empty agent SVID".into()))?;
        let info = tessera_plugin_sdk::x509::leaf_info(leaf)
            .map_err(|err| AgentError::Config(format!("{}: {err}", cert_path.display())))?;
        Ok(Some(AgentSvidFiles {
            chain,
            key_pkcs8: key,
            spiffe_id: info.spiffe_id,
            not_after: info.not_after,
            not_before: info.not_before,
        }))
    }

    /// Persists the agent SVID and key (key first, so a crash never leaves a certificate
    /// without its key).
    pub fn save_svid(&self, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<(), AgentError> {
        let key_pem = pem_encode("PRIVATE KEY", key_pkcs8);
        write_private_file(&self.dir, KEY_FILE, key_pem.as_bytes())
            .map_err(AgentError::io(format!("write {KEY_FILE}")))?;
        write_private_file(
            &self.dir,
            SVID_FILE,
            pem_encode_all("CERTIFICATE", chain).as_bytes(),
        )
        .map_err(AgentError::io(format!("write {SVID_FILE}")))
    }

    /// Deletes the stored agent SVID and its key (after a ban or an evict: the next start
    /// needs a new attestation). Files already absent are fine.
    pub fn delete_svid(&self) -> Result<(), AgentError> {
        for name in [SVID_FILE, KEY_FILE] {
            match std::fs::remove_file(self.dir.join(name)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(AgentError::Io {
                        what: format!("remove {}/{name}", self.dir.display()),
                        source: err,
                    });
                }
            }
        }
        Ok(())
    }

    /// The last bundle received from the server, if any.
    pub fn load_bundle(&self) -> Result<Option<Vec<Vec<u8>>>, AgentError> {
        let path = self.dir.join(BUNDLE_FILE);
        match std::fs::read(&path) {
            Ok(text) => parse_pem_certificates(&text)
                .map(Some)
                .map_err(|err| AgentError::Config(format!("{}: {err}", path.display()))),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(AgentError::Io {
                what: path.display().to_string(),
                source: err,
            }),
        }
    }

    /// Keeps the bundle the server sent, for the next start.
    pub fn save_bundle(&self, authorities: &[Vec<u8>]) -> Result<(), AgentError> {
        write_public_file(
            &self.dir,
            BUNDLE_FILE,
            pem_encode_all("CERTIFICATE", authorities).as_bytes(),
        )
        .map_err(AgentError::io(format!("write {BUNDLE_FILE}")))
    }
}

/// A fresh P-256 key and a CSR for it (the server uses only the public key).
pub fn new_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), AgentError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|err| AgentError::Crypto(format!("key generation: {err}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|err| AgentError::Crypto(format!("CSR: {err}")))?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_svid_removes_key_and_certificate_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data).unwrap();
        let (key, _) = new_key_and_csr().unwrap();
        let kp = rcgen::KeyPair::try_from(key.as_slice()).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://example.org/tessera/agent/x/1").unwrap(),
        )];
        let cert = params.self_signed(&kp).unwrap().der().to_vec();
        store.save_svid(std::slice::from_ref(&cert), &key).unwrap();
        store.save_bundle(&[cert]).unwrap();
        assert!(store.load_svid().unwrap().is_some());
        store.delete_svid().unwrap();
        assert!(!data.join(KEY_FILE).exists());
        assert!(!data.join(SVID_FILE).exists());
        assert!(store.load_svid().unwrap().is_none());
        assert!(
            store.load_bundle().unwrap().is_some(),
            "the public bundle stays"
        );
        // Twice is fine.
        store.delete_svid().unwrap();
    }
}
