//! A key held in process memory by aws-lc-rs, parsed once: the [`SigningKey`] both
//! plugins hand out. Also the PKCS#8 encoding the `disk` plugin stores.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, RsaKeyPair};
use tessera_plugin_sdk::keymanager::{KeyManagerError, KeyType, SignatureFormat, SigningKey};

/// A private key in memory, parsed and ready to sign.
pub(crate) struct SoftwareKey {
    id: String,
    key_type: KeyType,
    public_key_der: Vec<u8>,
    private: Private,
}

enum Private {
    /// aws-lc-rs binds the signature encoding to the key pair, so an ECDSA key is parsed
    /// twice, once per encoding, when it is created or loaded; never per signature.
    Ecdsa {
        asn1: EcdsaKeyPair,
        fixed: EcdsaKeyPair,
    },
    Rsa(RsaKeyPair),
}

/// Private key bytes (PKCS#8 DER) that are overwritten with zeros when dropped.
///
/// Best effort: without `unsafe` (volatile writes) or a dependency on `zeroize` the
/// compiler could in principle elide the wipe; `black_box` makes that unlikely. aws-lc-rs
/// zeroizes its own buffers.
pub(crate) struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// For reading into; reserve the capacity up front so the secret is not copied by
    /// a reallocation.
    pub(crate) fn as_vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

fn ecdsa_algorithms(
    key_type: KeyType,
) -> Option<(
    &'static EcdsaSigningAlgorithm,
    &'static EcdsaSigningAlgorithm,
)> {
    match key_type {
        KeyType::EcP256 => Some((
            &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        )),
        KeyType::EcP384 => Some((
            &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        )),
        KeyType::Rsa2048 | KeyType::Rsa4096 => None,
    }
}

/// Generate a `key_type` private key and return it as PKCS#8 v1 DER.
fn generate_pkcs8(key_type: KeyType) -> Result<SecretBytes, aws_lc_rs::error::Unspecified> {
    let bytes = match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            let (asn1, _) = ecdsa_algorithms(key_type).ok_or(aws_lc_rs::error::Unspecified)?;
            let pair = EcdsaKeyPair::generate(asn1)?;
            pair.to_pkcs8v1()?.as_ref().to_vec()
        }
        KeyType::Rsa2048 | KeyType::Rsa4096 => {
            let size = if key_type == KeyType::Rsa2048 {
                KeySize::Rsa2048
            } else {
                KeySize::Rsa4096
            };
            let pair = RsaKeyPair::generate(size)?;
            pair.as_der()?.as_ref().to_vec()
        }
    };
    Ok(SecretBytes::new(bytes))
}

impl SoftwareKey {
    /// Generate a new key. Returns the parsed key and its PKCS#8 encoding (for storage).
    ///
    /// The key is parsed back from the PKCS#8 bytes, so what a plugin stores is exactly
    /// what it will load. Slow for RSA: call on a blocking thread.
    pub(crate) fn generate(
        id: &str,
        key_type: KeyType,
    ) -> Result<(Self, SecretBytes), KeyManagerError> {
        let failed = || KeyManagerError::Generation {
            id: id.to_owned(),
            key_type,
        };
        let pkcs8 = generate_pkcs8(key_type).map_err(|_| failed())?;
        let key = Self::from_pkcs8(id, pkcs8.as_bytes()).map_err(|_| failed())?;
        if key.key_type != key_type {
            return Err(failed());
        }
        Ok((key, pkcs8))
    }

    /// Parse a PKCS#8 v1 DER private key of one of the supported [`KeyType`]s. The
    /// error says why the bytes were rejected (never what they contain).
    pub(crate) fn from_pkcs8(id: &str, pkcs8: &[u8]) -> Result<Self, String> {
        for key_type in [KeyType::EcP256, KeyType::EcP384] {
            let Some((asn1_alg, fixed_alg)) = ecdsa_algorithms(key_type) else {
                continue;
            };
            let Ok(asn1) = EcdsaKeyPair::from_pkcs8(asn1_alg, pkcs8) else {
                continue;
            };
            let fixed = EcdsaKeyPair::from_pkcs8(fixed_alg, pkcs8)
                .map_err(|e| format!("ECDSA key rejected: {e}"))?;
            let public_key_der = asn1
                .public_key()
                .as_der()
                .map_err(|_| "cannot encode the ECDSA public key".to_owned())?
                .as_ref()
                .to_vec();
            return Ok(Self {
                id: id.to_owned(),
                key_type,
                public_key_der,
                private: Private::Ecdsa { asn1, fixed },
            });
        }
        let rsa = RsaKeyPair::from_pkcs8(pkcs8).map_err(|_| {
            "not an unencrypted PKCS#8 ECDSA P-256, ECDSA P-384 or RSA private key".to_owned()
        })?;
        let key_type = match rsa.public_modulus_len() {
            256 => KeyType::Rsa2048,
            512 => KeyType::Rsa4096,
            n => {
                return Err(format!(
                    "RSA key of {} bits: only 2048 and 4096 are supported",
                    n * 8
                ));
            }
        };
        let public_key_der = rsa
            .public_key()
            .as_der()
            .map_err(|_| "cannot encode the RSA public key".to_owned())?
            .as_ref()
            .to_vec();
        Ok(Self {
            id: id.to_owned(),
            key_type,
            public_key_der,
            private: Private::Rsa(rsa),
        })
    }
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("id", &self.id)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl SigningKey for SoftwareKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    fn sign(&self, message: &[u8], format: SignatureFormat) -> Result<Vec<u8>, KeyManagerError> {
        let failed = || KeyManagerError::Signing {
            id: self.id.clone(),
        };
        let rng = SystemRandom::new();
        match &self.private {
            Private::Ecdsa { asn1, fixed } => {
                let pair = match format {
                    SignatureFormat::Asn1Der => asn1,
                    SignatureFormat::Fixed => fixed,
                };
                let sig = pair.sign(&rng, message).map_err(|_| failed())?;
                Ok(sig.as_ref().to_vec())
            }
            Private::Rsa(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| failed())?;
                Ok(sig)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::signature::UnparsedPublicKey;

    use super::*;
    use crate::test_support::verifier;

    #[test]
    fn every_key_type_signs_in_both_formats() {
        for key_type in KeyType::ALL {
            let (key, pkcs8) = SoftwareKey::generate("k", key_type).unwrap();
            assert_eq!(key.key_type(), key_type);
            assert_eq!(key.id(), "k");
            let reloaded = SoftwareKey::from_pkcs8("k", pkcs8.as_bytes()).unwrap();
            assert_eq!(reloaded.public_key_der(), key.public_key_der());
            for format in [SignatureFormat::Asn1Der, SignatureFormat::Fixed] {
                let sig = reloaded.sign(b"message", format).unwrap();
                match (key_type, format) {
                    (KeyType::EcP256, SignatureFormat::Fixed) => assert_eq!(sig.len(), 64),
                    (KeyType::EcP384, SignatureFormat::Fixed) => assert_eq!(sig.len(), 96),
                    (KeyType::EcP256 | KeyType::EcP384, SignatureFormat::Asn1Der) => {
                        assert_eq!(sig[0], 0x30, "DER SEQUENCE")
                    }
                    (KeyType::Rsa2048, _) => assert_eq!(sig.len(), 256),
                    (KeyType::Rsa4096, _) => assert_eq!(sig.len(), 512),
                }
                let public =
                    UnparsedPublicKey::new(verifier(key_type, format), key.public_key_der());
                public.verify(b"message", &sig).unwrap();
                assert!(public.verify(b"other", &sig).is_err());
            }
        }
    }

    #[test]
    fn garbage_and_debug() {
        let err = SoftwareKey::from_pkcs8("k", b"not a key").unwrap_err();
        assert!(err.contains("PKCS#8"), "{err}");
        let (key, pkcs8) = SoftwareKey::generate("k", KeyType::EcP256).unwrap();
        let debug = format!("{key:?} {pkcs8:?}");
        assert!(debug.contains("EcP256"), "{debug}");
        assert!(!debug.contains("0x") && !debug.contains('['), "{debug}");
    }
}
