//! TLS of the agent's connection to the server: the server's certificate must chain to
//! the bundle the agent holds *now* and carry exactly `spiffe://<td>/tessera/server`;
//! the agent presents its current SVID. TLS 1.3 only, no resumption: every connection
//! re-validates (SECURITY.md §2 rule 9).

use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tessera_plugin_sdk::SpiffeId;

/// The crypto provider of the whole project: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Trust anchors for the server's certificate, replaced when a new bundle arrives.
#[derive(Debug, Default)]
pub struct ServerTrust {
    anchors: RwLock<Arc<Vec<TrustAnchor<'static>>>>,
}

impl ServerTrust {
    /// Trust `authorities` (DER CA certificates) from now on. Unparseable certificates
    /// are skipped with a warning (a bundle with none left trusts nothing).
    pub fn set(&self, authorities: &[Vec<u8>]) {
        let anchors = authorities
            .iter()
            .filter_map(|der| {
                let der = CertificateDer::from(der.as_slice());
                match webpki::anchor_from_trusted_cert(&der) {
                    Ok(anchor) => Some(anchor.to_owned()),
                    Err(err) => {
                        tracing::warn!(error = %err, "ignoring an unusable bundle authority");
                        None
                    }
                }
            })
            .collect();
        if let Ok(mut slot) = self.anchors.write() {
            *slot = Arc::new(anchors);
        }
    }

    fn current(&self) -> Arc<Vec<TrustAnchor<'static>>> {
        self.anchors
            .read()
            .map(|a| Arc::clone(&a))
            .unwrap_or_default()
    }
}

/// Verifies the server: chain to the current bundle, server-auth EKU, and the exact
/// server SPIFFE ID as the certificate's only URI SAN. The TLS server name is ignored
/// (SPIFFE authenticates by ID, not DNS name).
#[derive(Debug)]
pub struct ServerVerifier {
    trust: Arc<ServerTrust>,
    server_id: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerVerifier {
    /// A verifier expecting `server_id`.
    pub fn new(
        trust: Arc<ServerTrust>,
        server_id: SpiffeId,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            trust,
            server_id,
            provider,
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors = self.trust.current();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|err| rustls::Error::General(format!("server certificate: {err}")))?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|err| {
            rustls::Error::General(format!(
                "server certificate does not chain to the bundle: {err}"
            ))
        })?;
        let id = tessera_plugin_sdk::x509::spiffe_id_of_certificate(end_entity)
            .map_err(|err| rustls::Error::General(format!("server certificate: {err}")))?;
        if id != self.server_id {
            return Err(rustls::Error::General(format!(
                "server presented {id}, expected {}",
                self.server_id
            )));
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

/// The agent's current SVID and key, presented as client certificate.
#[derive(Debug, Default)]
pub struct AgentCredentials {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl AgentCredentials {
    /// Presents `chain` (DER, leaf first) with `pkcs8` from the next connection on.
    pub fn set(&self, chain: Vec<Vec<u8>>, pkcs8: Vec<u8>) -> Result<(), rustls::Error> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)?;
        let certified = CertifiedKey::new(
            chain.into_iter().map(CertificateDer::from).collect(),
            signing,
        );
        if let Ok(mut slot) = self.current.write() {
            *slot = Some(Arc::new(certified));
        }
        Ok(())
    }
}

impl ResolvesClientCert for AgentCredentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|slot| slot.clone())
    }

    fn has_certs(&self) -> bool {
        self.current
            .read()
            .map(|slot| slot.is_some())
            .unwrap_or(false)
    }
}

/// Client configuration; `credentials` `None` for node attestation (no certificate yet).
pub fn client_config(
    verifier: Arc<ServerVerifier>,
    credentials: Option<Arc<AgentCredentials>>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match credentials {
        Some(credentials) => builder.with_client_cert_resolver(credentials),
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
