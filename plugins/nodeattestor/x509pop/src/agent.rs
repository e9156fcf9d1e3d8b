//! The agent half: loads the certificate chain and its key, builds the payload and
//! answers the server's challenge.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

use crate::wire::{self, WireError};
use crate::{DEFAULT_MAX_PAYLOAD_SIZE, parse_certificate, sha256, signed_message, tbs_fingerprint};

/// Largest certificate chain file read, in bytes (the payload cap is 64 KiB of DER).
const MAX_CHAIN_FILE_SIZE: u64 = 256 * 1024;

/// Why the agent half failed. For the agent's operator (local logs): may name paths,
/// never key material.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A file could not be read, or failed the secret-file checks (the key must be owned
    /// by this user, with no group or other permission bits, in a directory others cannot
    /// write to).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file is not a PEM sequence of `CERTIFICATE` blocks.
    #[error("{}: {reason}", path.display())]
    CertificatePem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A certificate of the chain is not one valid DER X.509 certificate.
    #[error("{}: certificate {index} is not a valid X.509 certificate", path.display())]
    CertificateMalformed {
        /// The file.
        path: PathBuf,
        /// Position in the file, from 0 (the leaf).
        index: usize,
    },
    /// The key file is not a single unencrypted PKCS#8 `PRIVATE KEY` PEM block.
    #[error(
        "{}: expected one unencrypted PKCS#8 `PRIVATE KEY` PEM block (convert with `openssl pkcs8 -topk8 -nocrypt`)",
        path.display()
    )]
    KeyPem {
        /// The file.
        path: PathBuf,
    },
    /// The key is not ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits.
    #[error("{}: the key must be ECDSA P-256, ECDSA P-384 or RSA of 2048 to 8192 bits", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not the key of the chain's first (leaf) certificate.
    #[error("the private key does not match the first (leaf) certificate of the chain")]
    KeyMismatch,
    /// The chain is too large for the server's default payload cap.
    #[error("the certificate chain makes a payload larger than {max} bytes")]
    PayloadTooLarge {
        /// The cap.
        max: usize,
    },
    /// The server's challenge is not an x509pop challenge.
    #[error("the server's x509pop challenge is malformed")]
    ChallengeMalformed,
    /// AWS-LC failed to sign.
    #[error("signing the x509pop challenge failed")]
    Sign,
}

enum SigningKey {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

/// The agent's x509pop credentials: the certificate chain (leaf first) and the leaf's
/// private key. `Debug` shows only the fingerprint.
pub struct AgentCredentials {
    payload: Vec<u8>,
    leaf_der_sha256: [u8; 32],
    fingerprint: String,
    not_after: SystemTime,
    key: SigningKey,
    rng: SystemRandom,
}

impl fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentCredentials")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl AgentCredentials {
    /// Loads the chain (PEM `CERTIFICATE` blocks, leaf first) and the leaf's key
    /// (unencrypted PKCS#8 PEM: ECDSA P-256, P-384 or RSA 2048 to 8192 bits).
    ///
    /// The key file is read as a secret file: not a symlink, owned by this user, no group
    /// or other permission bits, in a directory owned by root or this user that others
    /// cannot write to. The key must match the leaf. Blocking: call from a blocking
    /// thread.
    pub fn load(cert_chain_pem_path: &Path, key_pem_path: &Path) -> Result<Self, AgentError> {
        let chain = read_chain(cert_chain_pem_path)?;
        let key_pem = read_key_file(key_pem_path)?;
        Self::from_parts(cert_chain_pem_path, chain, key_pem_path, &key_pem)
    }

    fn from_parts(
        chain_path: &Path,
        chain: Vec<Vec<u8>>,
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<Self, AgentError> {
        let key_pem_error = || AgentError::KeyPem {
            path: key_path.to_owned(),
        };
        let mut blocks = pem::parse_many(key_pem).map_err(|_| key_pem_error())?;
        let block = match (blocks.pop(), blocks.is_empty()) {
            (Some(block), true) if block.tag() == "PRIVATE KEY" => block,
            _ => return Err(key_pem_error()),
        };
        let key = parse_pkcs8(block.contents()).ok_or_else(|| AgentError::UnsupportedKey {
            path: key_path.to_owned(),
        })?;

        let leaf_der = chain.first().ok_or_else(|| AgentError::CertificatePem {
            path: chain_path.to_owned(),
            reason: "no CERTIFICATE PEM block",
        })?;
        for (index, der) in chain.iter().enumerate() {
            if parse_certificate(der).is_none() {
                return Err(AgentError::CertificateMalformed {
                    path: chain_path.to_owned(),
                    index,
                });
            }
        }
        let leaf = parse_certificate(leaf_der).ok_or_else(|| AgentError::CertificateMalformed {
            path: chain_path.to_owned(),
            index: 0,
        })?;
        let public = match &key {
            SigningKey::Ecdsa(k) => k.public_key().as_ref(),
            SigningKey::Rsa(k) => k.public_key().as_ref(),
        };
        if public != leaf.public_key().subject_public_key.data.as_ref() {
            return Err(AgentError::KeyMismatch);
        }

        let payload = wire::encode_payload(&chain);
        if payload.len() > DEFAULT_MAX_PAYLOAD_SIZE {
            return Err(AgentError::PayloadTooLarge {
                max: DEFAULT_MAX_PAYLOAD_SIZE,
            });
        }
        let secs = leaf.validity().not_after.timestamp();
        let not_after = SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        Ok(Self {
            leaf_der_sha256: sha256(leaf_der),
            fingerprint: tbs_fingerprint(&leaf),
            not_after,
            payload,
            key,
            rng: SystemRandom::new(),
        })
    }

    /// The bytes for `AttestationParams.payload` (type `x509pop`): the chain, leaf first.
    pub fn attestation_payload(&self) -> Vec<u8> {
        self.payload.clone()
    }

    /// The leaf's fingerprint (lowercase hex SHA-256 of its TBSCertificate): the last
    /// segment of the agent ID the server will assign.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// End of the leaf certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Answers the server's `challenge` bytes with the bytes for `challenge_response`:
    /// a signature with the leaf key over
    /// `b"tessera x509pop v1\0" || nonce || SHA-256(leaf DER)`.
    pub fn respond(&self, challenge: &[u8]) -> Result<Vec<u8>, AgentError> {
        let nonce = wire::decode_challenge(challenge).map_err(|e| match e {
            WireError::TooLarge | WireError::Malformed => AgentError::ChallengeMalformed,
        })?;
        let message = signed_message(&nonce, &self.leaf_der_sha256);
        let signature = match &self.key {
            SigningKey::Ecdsa(key) => key
                .sign(&self.rng, &message)
                .map_err(|_| AgentError::Sign)?
                .as_ref()
                .to_vec(),
            SigningKey::Rsa(key) => {
                let mut out = vec![0u8; key.public_modulus_len()];
                key.sign(&signature::RSA_PSS_SHA256, &self.rng, &message, &mut out)
                    .map_err(|_| AgentError::Sign)?;
                out
            }
        };
        Ok(wire::encode_response(&signature))
    }
}

fn parse_pkcs8(der: &[u8]) -> Option<SigningKey> {
    if let Ok(key) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, der) {
        return Some(SigningKey::Ecdsa(key));
    }
    if let Ok(key) = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_ASN1_SIGNING, der) {
        return Some(SigningKey::Ecdsa(key));
    }
    let key = RsaKeyPair::from_pkcs8(der).ok()?;
    (2048..=8192)
        .contains(&(key.public_modulus_len() * 8))
        .then_some(SigningKey::Rsa(key))
}

fn read_chain(path: &Path) -> Result<Vec<Vec<u8>>, AgentError> {
    let read = |source| AgentError::Read {
        path: path.to_owned(),
        source,
    };
    let pem_error = |reason| AgentError::CertificatePem {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = Vec::new();
    file.take(MAX_CHAIN_FILE_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CHAIN_FILE_SIZE {
        return Err(pem_error("the file is larger than 256 KiB"));
    }
    let blocks = pem::parse_many(&text).map_err(|_| pem_error("not valid PEM"))?;
    if blocks.is_empty() {
        return Err(pem_error("no CERTIFICATE PEM block"));
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() == "CERTIFICATE" {
                Ok(block.into_contents())
            } else {
                Err(pem_error(
                    "a PEM block is not a CERTIFICATE (the key goes in private_key_path)",
                ))
            }
        })
        .collect()
}

/// Reads the key through the SDK's secret-file reader, which refuses group or other
/// permission bits, symlinks, other owners and shared directories.
fn read_key_file(path: &Path) -> Result<Vec<u8>, AgentError> {
    let read = |source| AgentError::Read {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the key path must end in a UTF-8 file name",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tessera_plugin_sdk::fs::read_private_file(dir, name).map_err(read)
}
