//! TLS of the node API: the server's own SVID (`spiffe://<td>/tessera/server`), a
//! client-certificate verifier that reads the *current* bundle, and the accept loop
//! that turns TCP connections into authenticated TLS streams for tonic.
//!
//! No session tickets and no session cache: every handshake re-validates the agent's
//! certificate against the current bundle (SECURITY.md §2 rule 9, SPIRE #6715).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// The crypto provider of the whole project: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Errors setting up TLS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Builds a rustls `CertifiedKey` from a DER chain and a PKCS#8 key.
pub fn certified_key(chain: Vec<Vec<u8>>, pkcs8: Vec<u8>) -> Result<CertifiedKey, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|err| TlsError::Config(format!("server key: {err}")))?;
    Ok(CertifiedKey::new(
        chain.into_iter().map(CertificateDer::from).collect(),
        signing,
    ))
}

/// Serves whichever server SVID is current; replaced on renewal.
#[derive(Debug)]
pub struct ServerCertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertSlot {
    /// A slot holding `key`.
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// Replaces the served certificate (new handshakes use it at once).
    pub fn replace(&self, key: CertifiedKey) {
        if let Ok(mut slot) = self.current.write() {
            *slot = Arc::new(key);
        }
    }
}

impl ResolvesServerCert for ServerCertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|key| Arc::clone(&key))
    }
}

/// Verifies agent client certificates against the bundle current at handshake time.
/// A client without a certificate is let through (only `AttestAgent` accepts that; the
/// handlers of the other methods require a certificate).
#[derive(Debug)]
pub struct BundleClientVerifier {
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl BundleClientVerifier {
    /// A verifier trusting `authorities` (DER CA certificates).
    pub fn new(authorities: &[Vec<u8>], provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let inner = Self::build(authorities, &provider)?;
        Ok(Self {
            inner: RwLock::new(inner),
            provider,
        })
    }

    /// Trust `authorities` from now on (called when the bundle changes).
    pub fn update(&self, authorities: &[Vec<u8>]) -> Result<(), TlsError> {
        let inner = Self::build(authorities, &self.provider)?;
        if let Ok(mut slot) = self.inner.write() {
            *slot = inner;
        }
        Ok(())
    }

    fn build(
        authorities: &[Vec<u8>],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        // One authority that webpki cannot use (another server's, of a newer version,
        // or damaged) must not freeze the trust set: skip it, loudly, and keep the rest.
        let mut roots = RootCertStore::empty();
        for der in authorities {
            if let Err(err) = roots.add(CertificateDer::from(der.clone())) {
                tracing::warn!(error = %err, "bundle authority skipped on the node API");
            }
        }
        if roots.is_empty() {
            return Err(TlsError::Config(
                "no usable authority in the bundle".to_owned(),
            ));
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
            .allow_unauthenticated()
            .build()
            .map_err(|err| TlsError::Config(format!("client verifier: {err}")))
    }

    fn current(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.inner.read().ok().map(|inner| Arc::clone(&inner))
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self
            .current()
            .ok_or_else(|| rustls::Error::General("verifier unavailable".into()))?;
        inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
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

/// The rustls configuration of the node API: TLS 1.3 only, no tickets, no session cache.
pub fn server_config(
    certs: Arc<ServerCertSlot>,
    verifier: Arc<BundleClientVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|err| TlsError::Config(err.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What a node API handler knows about its peer.
#[derive(Debug, Clone)]
pub struct NodePeer {
    /// The agent's address.
    pub remote_addr: SocketAddr,
    /// The client certificate chain the agent presented (verified against the bundle
    /// during the handshake), leaf first; empty for an unauthenticated client.
    pub certificates: Arc<Vec<CertificateDer<'static>>>,
}

/// A TLS connection accepted by [`accept_loop`], with its verified peer.
pub type NodeConnection = tessera_proto::connection::PeerConnection<TlsStream<TcpStream>, NodePeer>;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections, completes TLS handshakes concurrently (a slow client does
/// not hold up others) and hands finished connections to `out` until `shutdown`.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    out: mpsc::Sender<std::io::Result<NodeConnection>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote_addr) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                tracing::warn!(error = %err, "node API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let certificates = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|certs| certs.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default();
                    let peer = NodePeer {
                        remote_addr,
                        certificates: Arc::new(certificates),
                    };
                    let _ = out.send(Ok(NodeConnection::new(stream, peer))).await;
                }
                Ok(Err(err)) => {
                    tracing::info!(%remote_addr, error = %err, "node API TLS handshake failed");
                }
                Err(_) => tracing::info!(%remote_addr, "node API TLS handshake timed out"),
            }
        });
    }
}
