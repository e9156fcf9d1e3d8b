//! X509-SVID verification against the bundle of the SVID's own trust domain, and the
//! rustls verifier of the `https_spiffe` profile built on it.
//!
//! The bundle is chosen by the trust domain of the SPIFFE ID, never pooled: a
//! certificate of trust domain A that chains to a CA of B is refused (Federation spec
//! §7.3, SECURITY.md §3.7 item 71).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use tessera_plugin_sdk::x509::spiffe_id_of_certificate;
use tessera_plugin_sdk::{SpiffeId, TrustDomain};

use crate::bundle::SpiffeBundle;

/// The most intermediates accepted between an SVID and its authority.
pub const MAX_INTERMEDIATES: usize = 8;

/// Why an X509-SVID was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SvidError {
    /// No certificate was presented.
    #[error("no certificate presented")]
    NoCertificate,
    /// A certificate of the chain is not DER.
    #[error("malformed certificate")]
    Malformed,
    /// The leaf is a CA or may sign certificates or CRLs (X509-SVID spec §4.1).
    #[error("the leaf certificate is a CA or carries keyCertSign/cRLSign")]
    NotALeaf,
    /// An intermediate is not a CA allowed to sign certificates.
    #[error("an intermediate certificate is not a signing CA")]
    IntermediateNotCa,
    /// More than [`MAX_INTERMEDIATES`] intermediates.
    #[error("too many intermediate certificates")]
    ChainTooLong,
    /// The leaf does not carry exactly one valid SPIFFE ID.
    #[error("the leaf is not an X509-SVID: {0}")]
    Id(String),
    /// The SVID's trust domain is not the bundle's (item 71).
    #[error("the SVID belongs to {svid} but the bundle is that of {bundle}")]
    TrustDomainMismatch {
        /// Trust domain of the SVID's SPIFFE ID.
        svid: TrustDomain,
        /// Trust domain of the bundle.
        bundle: TrustDomain,
    },
    /// The chain does not verify against the bundle (webpki's reason).
    #[error("the certificate does not chain to the trust domain's bundle: {0}")]
    Chain(String),
    /// The SVID is valid but carries another SPIFFE ID than required (item 107).
    #[error("the endpoint presented {found}, expected {expected}")]
    UnexpectedId {
        /// The configured SPIFFE ID.
        expected: SpiffeId,
        /// The SPIFFE ID of the presented SVID.
        found: SpiffeId,
    },
    /// The bundle has no usable X.509 authority.
    #[error("the bundle of {0} has no usable X.509 authority")]
    NoAuthority(TrustDomain),
}

/// The crypto provider of the project: aws-lc-rs.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Trust anchors of a bundle's X.509 authorities; unusable ones are skipped.
fn anchors_of(bundle: &SpiffeBundle) -> Vec<TrustAnchor<'static>> {
    bundle
        .x509_authorities
        .iter()
        .filter_map(|der| {
            let der = CertificateDer::from(der.as_slice());
            webpki::anchor_from_trusted_cert(&der)
                .ok()
                .map(|anchor| anchor.to_owned())
        })
        .collect()
}

/// The SPIFFE ID of an X509-SVID leaf after its shape checks: not a CA, no
/// keyCertSign / cRLSign, exactly one SPIFFE URI SAN.
fn leaf_id(leaf: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|_| SvidError::Malformed)?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|_| SvidError::Malformed)?
        .is_some_and(|bc| bc.value.ca);
    let signs = cert
        .key_usage()
        .map_err(|_| SvidError::Malformed)?
        .is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign());
    if is_ca || signs {
        return Err(SvidError::NotALeaf);
    }
    spiffe_id_of_certificate(leaf).map_err(|err| SvidError::Id(err.to_string()))
}

fn check_intermediates(intermediates: &[CertificateDer<'_>]) -> Result<(), SvidError> {
    if intermediates.len() > MAX_INTERMEDIATES {
        return Err(SvidError::ChainTooLong);
    }
    for der in intermediates {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| SvidError::Malformed)?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|_| SvidError::Malformed)?
            .is_some_and(|bc| bc.value.ca);
        let may_sign = cert
            .key_usage()
            .map_err(|_| SvidError::Malformed)?
            .is_none_or(|ku| ku.value.key_cert_sign());
        if !is_ca || !may_sign {
            return Err(SvidError::IntermediateNotCa);
        }
    }
    Ok(())
}

fn verify_with(
    chain: &[CertificateDer<'_>],
    bundle_td: &TrustDomain,
    anchors: &[TrustAnchor<'_>],
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    let id = leaf_id(leaf)?;
    if !id.is_member_of(bundle_td) {
        return Err(SvidError::TrustDomainMismatch {
            svid: id.trust_domain(),
            bundle: bundle_td.clone(),
        });
    }
    if anchors.is_empty() {
        return Err(SvidError::NoAuthority(bundle_td.clone()));
    }
    check_intermediates(intermediates)?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| SvidError::Malformed)?;
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        anchors,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|err| SvidError::Chain(err.to_string()))?;
    Ok(id)
}

/// Verifies an X509-SVID chain (leaf first) presented by a TLS server against
/// `bundle`, and returns its SPIFFE ID.
///
/// The SVID's trust domain must be the bundle's (item 71: the caller looks the bundle
/// up by the ID's trust domain; a bundle of another domain is refused, never tried).
/// The leaf must not be a CA nor carry keyCertSign/cRLSign, must carry exactly one
/// SPIFFE URI SAN, and, if it has an extended key usage, serverAuth; intermediates
/// must be CAs allowed to sign certificates.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundle: &SpiffeBundle,
    now: UnixTime,
) -> Result<SpiffeId, SvidError> {
    verify_with(
        chain,
        &bundle.trust_domain,
        &anchors_of(bundle),
        now,
        &provider(),
    )
}

/// The server verifier of the `https_spiffe` profile: the certificate must be a valid
/// X509-SVID of the endpoint's trust domain with exactly the configured SPIFFE ID. The
/// host name is not checked (SPIFFE authenticates by ID).
#[derive(Debug)]
pub(crate) struct SpiffeEndpointVerifier {
    expected: SpiffeId,
    trust_domain: TrustDomain,
    anchors: Vec<TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeEndpointVerifier {
    /// A verifier requiring `expected`, trusting `bundle`, which must be the bundle of
    /// `expected`'s trust domain.
    pub(crate) fn new(
        expected: SpiffeId,
        bundle: &SpiffeBundle,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, SvidError> {
        if !expected.is_member_of(&bundle.trust_domain) {
            return Err(SvidError::TrustDomainMismatch {
                svid: expected.trust_domain(),
                bundle: bundle.trust_domain.clone(),
            });
        }
        let anchors = anchors_of(bundle);
        if anchors.is_empty() {
            return Err(SvidError::NoAuthority(bundle.trust_domain.clone()));
        }
        Ok(Self {
            expected,
            trust_domain: bundle.trust_domain.clone(),
            anchors,
            provider,
        })
    }
}

/// Wraps an [`SvidError`] so that the fetch client can recover it from the handshake.
fn rustls_error(err: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

impl ServerCertVerifier for SpiffeEndpointVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let found = verify_with(
            &chain,
            &self.trust_domain,
            &self.anchors,
            now,
            &self.provider,
        )
        .map_err(rustls_error)?;
        if found != self.expected {
            return Err(rustls_error(SvidError::UnexpectedId {
                expected: self.expected.clone(),
                found,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    struct Ca {
        der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(td: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca {
            der,
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(ca: &Ca, id: &str, is_ca: bool) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
    }

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn chain(der: Vec<u8>) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from(der)]
    }

    #[test]
    fn verifies_an_svid_of_the_bundles_trust_domain() {
        let a = ca("a.org");
        let bundle = SpiffeBundle::from_x509_authorities(td("a.org"), vec![a.der.clone()]);
        let id = verify_x509_svid(
            &chain(leaf(&a, "spiffe://a.org/w", false)),
            &bundle,
            UnixTime::now(),
        )
        .unwrap();
        assert_eq!(id.as_str(), "spiffe://a.org/w");
    }

    // SECURITY.md §3.7 item 71.
    #[test]
    fn an_svid_of_a_chaining_to_bs_ca_is_refused() {
        let b = ca("b.org");
        let forged = chain(leaf(&b, "spiffe://a.org/w", false));
        // With A's bundle (looked up by the ID's trust domain), B's CA is not there.
        let a_bundle = SpiffeBundle::from_x509_authorities(td("a.org"), vec![ca("a.org").der]);
        assert!(matches!(
            verify_x509_svid(&forged, &a_bundle, UnixTime::now()),
            Err(SvidError::Chain(_))
        ));
        // B's bundle is never used for an ID of A, although the chain would verify.
        let b_bundle = SpiffeBundle::from_x509_authorities(td("b.org"), vec![b.der.clone()]);
        assert_eq!(
            verify_x509_svid(&forged, &b_bundle, UnixTime::now()),
            Err(SvidError::TrustDomainMismatch {
                svid: td("a.org"),
                bundle: td("b.org"),
            })
        );
    }

    #[test]
    fn ca_leaves_and_empty_chains_are_refused() {
        let a = ca("a.org");
        let bundle = SpiffeBundle::from_x509_authorities(td("a.org"), vec![a.der.clone()]);
        assert_eq!(
            verify_x509_svid(
                &chain(leaf(&a, "spiffe://a.org/w", true)),
                &bundle,
                UnixTime::now()
            ),
            Err(SvidError::NotALeaf)
        );
        assert_eq!(
            verify_x509_svid(&[], &bundle, UnixTime::now()),
            Err(SvidError::NoCertificate)
        );
        assert!(matches!(
            verify_x509_svid(
                &chain(leaf(&a, "https://a.org/w", false)),
                &bundle,
                UnixTime::now()
            ),
            Err(SvidError::Id(_))
        ));
    }

    #[test]
    fn endpoint_verifier_needs_the_bundle_of_the_endpoint_domain() {
        let b = ca("b.org");
        let bundle = SpiffeBundle::from_x509_authorities(td("b.org"), vec![b.der]);
        let id = SpiffeId::parse("spiffe://a.org/bundle").unwrap();
        assert!(matches!(
            SpiffeEndpointVerifier::new(id.clone(), &bundle, provider()),
            Err(SvidError::TrustDomainMismatch { .. })
        ));
        assert!(matches!(
            SpiffeEndpointVerifier::new(id, &SpiffeBundle::new(td("a.org")), provider()),
            Err(SvidError::NoAuthority(_))
        ));
    }
}
