//! The bundle endpoint server: serves this trust domain's bundle document at `/` over
//! HTTPS (HTTP/1.1, TLS 1.2 or 1.3), with the `https_web` or `https_spiffe` profile
//! (Federation spec §5.2.1.3, §5.2.2.3).
//!
//! `GET /` answers the document of the [`BundleSource`] with
//! `Content-Type: application/json`; another method is 405, another path 404, as in
//! SPIRE. No client authentication. Each connection carries one request and is bounded
//! by [`ServeLimits`]; the TLS configuration is shared, so an `https_spiffe` resolver
//! that returns the current SVID makes rotation take effect without a restart.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::svid::provider;

/// Where the server gets the document to serve, on every request. Return the current
/// bundle document (e.g. [`SpiffeBundle::to_json`](crate::SpiffeBundle::to_json) of
/// this trust domain's bundle, cached), or `None` when none can be served now (503).
///
/// Called on the async runtime for every request: it must be cheap and must not block
/// (serve a cached document, refreshed when the bundle changes). Implemented for
/// closures `Fn() -> Option<Vec<u8>>`.
pub trait BundleSource: Send + Sync {
    /// The bundle document to serve now.
    fn bundle_document(&self) -> Option<Vec<u8>>;
}

impl<F> BundleSource for F
where
    F: Fn() -> Option<Vec<u8>> + Send + Sync,
{
    fn bundle_document(&self) -> Option<Vec<u8>> {
        self()
    }
}

/// Bounds of the server's connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeLimits {
    /// Largest request head (request line and headers); larger gets 431. Default
    /// 8 KiB.
    pub max_header_size: usize,
    /// Time for the TLS handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time for the request head once TLS is up. Default 10 s.
    pub header_read_timeout: Duration,
    /// Time for a whole connection, handshake to last byte. Default 30 s.
    pub connection_timeout: Duration,
    /// Connections served at once; further ones are closed at once. Default 256.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_header_size: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// Why a server TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerConfigError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The PEM input is not what is expected.
    #[error("{0}")]
    Pem(&'static str),
    /// rustls refused the certificate, key or configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn base_config()
-> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, ServerConfigError> {
    ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| ServerConfigError::Tls(err.to_string()))
}

fn finish(mut config: ServerConfig) -> ServerConfig {
    // Nothing is gained by resumption on a public, unauthenticated endpoint; keep every
    // handshake full, as everywhere else in tessera.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// The `https_web` configuration: a certificate chain (PEM, leaf first, naming the
/// endpoint's DNS name or IP address) and its private key (PEM: PKCS#8, SEC1 or PKCS#1).
pub fn https_web_server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<ServerConfig, ServerConfigError> {
    let chain: Vec<CertificateDer<'static>> = pem::parse_many(cert_chain_pem)
        .map_err(|_| ServerConfigError::Pem("the certificate file is not valid PEM"))?
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect();
    if chain.is_empty() {
        return Err(ServerConfigError::Pem(
            "the certificate file holds no CERTIFICATE",
        ));
    }
    let keys: Vec<PrivateKeyDer<'static>> = pem::parse_many(key_pem)
        .map_err(|_| ServerConfigError::Pem("the key file is not valid PEM"))?
        .into_iter()
        .filter_map(|block| match block.tag() {
            "PRIVATE KEY" => Some(PrivatePkcs8KeyDer::from(block.into_contents()).into()),
            "EC PRIVATE KEY" => Some(PrivateSec1KeyDer::from(block.into_contents()).into()),
            "RSA PRIVATE KEY" => Some(PrivatePkcs1KeyDer::from(block.into_contents()).into()),
            _ => None,
        })
        .collect();
    let [key] = <[PrivateKeyDer<'static>; 1]>::try_from(keys)
        .map_err(|_| ServerConfigError::Pem("the key file must hold exactly one private key"))?;
    let config = base_config()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| ServerConfigError::Tls(err.to_string()))?;
    Ok(finish(config))
}

/// [`https_web_server_config`] from files. Blocking: call it at start-up or on a
/// blocking thread.
pub fn https_web_server_config_from_files(
    cert_chain_path: &Path,
    key_path: &Path,
) -> Result<ServerConfig, ServerConfigError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ServerConfigError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    https_web_server_config(&read(cert_chain_path)?, &read(key_path)?)
}

/// The `https_spiffe` configuration: `resolver` returns the server's current X509-SVID
/// and key on each handshake, so a renewed SVID is served without a restart.
pub fn https_spiffe_server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, ServerConfigError> {
    Ok(finish(
        base_config()?
            .with_no_client_auth()
            .with_cert_resolver(resolver),
    ))
}

/// [`serve_with_limits`] with the default [`ServeLimits`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    source: Arc<dyn BundleSource>,
    shutdown: CancellationToken,
) {
    serve_with_limits(listener, tls, source, ServeLimits::default(), shutdown).await;
}

/// Serves the bundle endpoint on `listener` until `shutdown` is cancelled, then closes
/// the open connections and returns once their tasks are done. Accept errors (such as
/// running out of file descriptors) are logged and retried after a short pause.
pub async fn serve_with_limits(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    source: Arc<dyn BundleSource>,
    limits: ServeLimits,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let limits = Arc::new(limits);
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "bundle endpoint: accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, "bundle endpoint: connection limit reached, closing");
            continue;
        };
        let acceptor = acceptor.clone();
        let source = Arc::clone(&source);
        let limits = Arc::clone(&limits);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let connection = serve_connection(acceptor, tcp, source, &limits);
            tokio::select! {
                () = shutdown.cancelled() => {}
                result = tokio::time::timeout(limits.connection_timeout, connection) => {
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            tracing::debug!(%peer, %reason, "bundle endpoint: connection failed");
                        }
                        Err(_) => tracing::debug!(%peer, "bundle endpoint: connection timed out"),
                    }
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn serve_connection(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    source: Arc<dyn BundleSource>,
    limits: &ServeLimits,
) -> Result<(), String> {
    let tls = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|err| format!("TLS handshake: {err}"))?;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, source.as_ref());
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_size)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(|err| format!("HTTP: {err}"))
}

fn respond(request: &Request<Incoming>, source: &dyn BundleSource) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if request.uri().path() != "/" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    match source.bundle_document() {
        Some(document) => {
            let mut response = Response::new(Full::new(Bytes::from(document)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        None => {
            tracing::warn!("bundle endpoint: no bundle to serve");
            plain(StatusCode::SERVICE_UNAVAILABLE, "bundle unavailable\n")
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
