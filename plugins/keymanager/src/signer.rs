//! [`RcgenSigner`]: lets rcgen sign certificates (and CSRs, CRLs) with a key manager's
//! [`SigningKey`], so the CA never holds the private key itself.

use std::fmt;
use std::sync::Arc;

use rcgen::{PublicKeyData, SignatureAlgorithm};
use tessera_plugin_sdk::keymanager::{KeyType, SignatureFormat, SigningKey};

/// A [`SigningKey`] seen as an rcgen key: `rcgen::SigningKey` + `rcgen::PublicKeyData`.
///
/// Signature algorithms: ECDSA P-256 with SHA-256, ECDSA P-384 with SHA-384, RSA PKCS#1
/// v1.5 with SHA-256 (both RSA sizes). Use it as the issuer key
/// (`rcgen::Issuer::new(params, &signer)`, `CertificateParams::self_signed(&signer)`)
/// or as the subject public key.
pub struct RcgenSigner {
    key: Arc<dyn SigningKey>,
    /// The `subjectPublicKey` bits of the SPKI (what rcgen calls the key's DER bytes).
    subject_public_key: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
}

impl RcgenSigner {
    /// Wrap `key`. Fails only if its public key is not a well-formed
    /// `SubjectPublicKeyInfo`.
    pub fn new(key: Arc<dyn SigningKey>) -> Result<Self, rcgen::Error> {
        let spki = rcgen::SubjectPublicKeyInfo::from_der(key.public_key_der())?;
        let algorithm = match key.key_type() {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 | KeyType::Rsa4096 => &rcgen::PKCS_RSA_SHA256,
        };
        Ok(Self {
            subject_public_key: spki.der_bytes().to_vec(),
            key,
            algorithm,
        })
    }

    /// The wrapped key.
    pub fn key(&self) -> &Arc<dyn SigningKey> {
        &self.key
    }
}

impl fmt::Debug for RcgenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RcgenSigner")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for RcgenSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.subject_public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for RcgenSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign(msg, SignatureFormat::Asn1Der)
            .map_err(|error| {
                // rcgen's error cannot carry ours; log it so the cause is not lost.
                tracing::warn!(key_id = self.key.id(), %error, "signing a certificate failed");
                rcgen::Error::RemoteKeyError
            })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
    };
    use tessera_plugin_sdk::keymanager::KeyManager;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::MemoryKeyManager;

    fn ca_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tessera");
        dn.push(DnType::CommonName, "tessera test CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(&[0x01, 0x23, 0x45]));
        params
    }

    fn leaf_params() -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://example.org/workload".try_into().unwrap(),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&[0x02]));
        params
    }

    #[tokio::test]
    async fn signs_a_ca_and_a_leaf_that_verify() {
        let km = MemoryKeyManager::new();
        for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
            let ca_key = km.generate_key("ca", key_type).await.unwrap();
            let leaf_key = km.generate_key("leaf", KeyType::EcP256).await.unwrap();
            let ca_signer = RcgenSigner::new(ca_key.clone()).unwrap();
            let leaf_public = RcgenSigner::new(leaf_key.clone()).unwrap();
            // rcgen rebuilds the SPKI from our parts: it must equal the key's own.
            assert_eq!(ca_signer.subject_public_key_info(), ca_key.public_key_der());
            assert_eq!(
                leaf_public.subject_public_key_info(),
                leaf_key.public_key_der()
            );

            let ca_cert = ca_params().self_signed(&ca_signer).unwrap();
            let issuer = Issuer::new(ca_params(), &ca_signer);
            let leaf_cert = leaf_params().signed_by(&leaf_public, &issuer).unwrap();

            let (_, ca) = X509Certificate::from_der(ca_cert.der()).unwrap();
            let (_, leaf) = X509Certificate::from_der(leaf_cert.der()).unwrap();
            assert_eq!(ca.public_key().raw, ca_key.public_key_der());
            assert_eq!(leaf.public_key().raw, leaf_key.public_key_der());
            ca.verify_signature(None)
                .unwrap_or_else(|e| panic!("{key_type}: CA self-signature: {e}"));
            leaf.verify_signature(Some(ca.public_key()))
                .unwrap_or_else(|e| panic!("{key_type}: leaf signature: {e}"));
            assert_eq!(leaf.issuer(), ca.subject());
            // A different CA key does not verify the leaf.
            let other = km.generate_key("other", key_type).await.unwrap();
            let other = RcgenSigner::new(other).unwrap();
            let other_cert = ca_params().self_signed(&other).unwrap();
            let (_, other_ca) = X509Certificate::from_der(other_cert.der()).unwrap();
            assert!(leaf.verify_signature(Some(other_ca.public_key())).is_err());
        }
    }

    #[test]
    fn malformed_public_key_is_refused() {
        #[derive(Debug)]
        struct Broken;
        impl SigningKey for Broken {
            fn id(&self) -> &str {
                "broken"
            }
            fn key_type(&self) -> KeyType {
                KeyType::EcP256
            }
            fn public_key_der(&self) -> &[u8] {
                b"\x30\x03junk"
            }
            fn sign(
                &self,
                _: &[u8],
                _: SignatureFormat,
            ) -> Result<Vec<u8>, tessera_plugin_sdk::KeyManagerError> {
                Err(tessera_plugin_sdk::KeyManagerError::Signing {
                    id: "broken".into(),
                })
            }
        }
        assert!(RcgenSigner::new(Arc::new(Broken)).is_err());
    }
}
