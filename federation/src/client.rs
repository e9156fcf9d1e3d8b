//! The bundle endpoint client: one HTTPS GET of a foreign trust domain's bundle with the
//! `https_web` or `https_spiffe` profile (Federation spec §5), bounded in size and time,
//! following a few redirects that satisfy the same rules as the configured URL.
//!
//! It stores nothing: the caller decides what to keep with
//! [`should_store`](crate::policy::should_store). A redirect, even a permanent one, is
//! never remembered; the caller fetches the configured URL every time (spec §7.5.1).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Bytes};
use hyper::header::{ACCEPT, CONNECTION, CONTENT_LENGTH, HOST, LOCATION, USER_AGENT};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tessera_plugin_sdk::{SpiffeId, TrustDomain};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use url::{Host, Position, Url};

use crate::bundle::{BundleError, MAX_BUNDLE_SIZE, SpiffeBundle};
use crate::svid::{SpiffeEndpointVerifier, SvidError, provider};

/// The longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// How the bundle endpoint is authenticated (Federation spec §5.2). The profile is
/// configured, never inferred from the URL (spec §7.2).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Profile {
    /// `https_web`: the server certificate must chain to `roots` and name the URL's
    /// host (RFC 6125). `roots` are the operator's CA certificates; to trust the
    /// system store, pass the certificates of `/etc/ssl/certs/ca-certificates.crt`
    /// (see [`read_pem_certificates`]).
    HttpsWeb {
        /// Trusted CA certificates.
        roots: Vec<CertificateDer<'static>>,
    },
    /// `https_spiffe`: the server must present a valid X509-SVID with exactly
    /// `endpoint_spiffe_id`, chaining to `trust_bundle`; the host name is not checked.
    HttpsSpiffe {
        /// The SPIFFE ID the endpoint must present.
        endpoint_spiffe_id: SpiffeId,
        /// The current bundle of the endpoint's trust domain (the trust domain of
        /// `endpoint_spiffe_id`; any other is refused, SECURITY.md item 71). For a
        /// self-serving endpoint: the last bundle fetched from it, or the operator's
        /// bootstrap bundle.
        trust_bundle: SpiffeBundle,
    },
}

/// Bounds of one fetch (SECURITY.md §3.11 item 110).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchLimits {
    /// Largest response body read; the fetch fails as soon as more arrives (or a
    /// larger `Content-Length` is announced). Default 1 MiB ([`MAX_BUNDLE_SIZE`]),
    /// which is also the most the bundle parser accepts.
    pub max_body_size: usize,
    /// Time for the whole fetch: resolution, connections, handshakes, redirects and
    /// the body, so a slow ("slowloris") endpoint is cut off. Default 10 s.
    pub total_timeout: Duration,
    /// Time for the TCP connection and TLS handshake of each hop. Default 5 s.
    pub connect_timeout: Duration,
    /// Redirects followed. Default 3.
    pub max_redirects: usize,
}

impl Default for FetchLimits {
    fn default() -> Self {
        Self {
            max_body_size: MAX_BUNDLE_SIZE,
            total_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_redirects: 3,
        }
    }
}

/// Why an endpoint URL is not acceptable (spec §5.2.1.1, §5.2.2.1).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// Not an absolute URL.
    #[error("not a valid absolute URL")]
    Parse,
    /// Longer than [`MAX_URL_LEN`].
    #[error("longer than {MAX_URL_LEN} bytes")]
    TooLong,
    /// The scheme is not `https`.
    #[error("the scheme must be https")]
    NotHttps,
    /// The URL carries userinfo (`user:password@`).
    #[error("the URL must not carry userinfo")]
    UserInfo,
    /// The URL carries a fragment.
    #[error("the URL must not carry a fragment")]
    Fragment,
    /// The URL has no host.
    #[error("the URL has no host")]
    NoHost,
}

/// Why a fetch failed. Messages never contain the response body.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The configured URL is not a bundle endpoint URL.
    #[error("invalid bundle endpoint URL: {0}")]
    InvalidUrl(#[source] UrlError),
    /// A redirect target is not a bundle endpoint URL (e.g. `http://`, userinfo).
    #[error("redirect refused: {0}")]
    RedirectRefused(#[source] UrlError),
    /// A redirect without a usable `Location`.
    #[error("redirect without a valid Location header")]
    RedirectWithoutLocation,
    /// More redirects than [`FetchLimits::max_redirects`].
    #[error("more than {limit} redirects")]
    TooManyRedirects {
        /// The limit.
        limit: usize,
    },
    /// `https_web` without any usable root certificate.
    #[error("https_web profile without a usable root certificate")]
    NoRoots,
    /// The `https_spiffe` profile cannot work: its bundle is not that of the endpoint
    /// ID's trust domain, or has no X.509 authority.
    #[error("https_spiffe profile: {0}")]
    Profile(#[source] SvidError),
    /// TCP connection failed.
    #[error("cannot connect to {host}: {reason}")]
    Connect {
        /// `host:port` of the hop.
        host: String,
        /// The operating system's reason.
        reason: String,
    },
    /// TCP connection and TLS handshake took longer than
    /// [`FetchLimits::connect_timeout`].
    #[error("connecting to {host} timed out")]
    ConnectTimeout {
        /// `host:port` of the hop.
        host: String,
    },
    /// `https_spiffe`: the endpoint's certificate was refused; `UnexpectedId` when it is
    /// a valid SVID of another SPIFFE ID (item 107).
    #[error("bundle endpoint authentication failed: {0}")]
    EndpointAuthentication(#[source] SvidError),
    /// TLS failed (including an `https_web` certificate that does not verify).
    #[error("TLS: {0}")]
    Tls(String),
    /// HTTP protocol failure.
    #[error("HTTP: {0}")]
    Http(String),
    /// A status other than 200 or a followed redirect.
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    /// The body exceeds [`FetchLimits::max_body_size`].
    #[error("response body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The fetch took longer than [`FetchLimits::total_timeout`].
    #[error("fetch did not complete within {limit:?}")]
    Timeout {
        /// The limit.
        limit: Duration,
    },
    /// The body is not a usable SPIFFE bundle.
    #[error("{0}")]
    Bundle(#[source] BundleError),
}

/// A fetched bundle and where it finally came from (for logs only: never store the
/// final URL as the endpoint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchedBundle {
    /// The bundle, of the trust domain the caller asked for.
    pub bundle: SpiffeBundle,
    /// The URL that served it.
    pub final_url: String,
    /// Redirects followed.
    pub redirects: usize,
    /// True if one of them was permanent (301, 308): worth a warning to the operator,
    /// who may update the configuration out of band.
    pub permanent_redirect: bool,
}

/// Checks a bundle endpoint URL: absolute, `https`, a host, no userinfo, no fragment,
/// at most [`MAX_URL_LEN`] bytes. Returns the normalised URL.
pub fn check_endpoint_url(url: &str) -> Result<String, UrlError> {
    parse_endpoint_url(url).map(String::from)
}

fn parse_endpoint_url(url: &str) -> Result<Url, UrlError> {
    if url.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let parsed = Url::parse(url).map_err(|_| UrlError::Parse)?;
    check_url(&parsed)?;
    Ok(parsed)
}

fn check_url(url: &Url) -> Result<(), UrlError> {
    if url.as_str().len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    if url.scheme() != "https" {
        return Err(UrlError::NotHttps);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::UserInfo);
    }
    if url.fragment().is_some() {
        return Err(UrlError::Fragment);
    }
    if url.host().is_none() {
        return Err(UrlError::NoHost);
    }
    Ok(())
}

/// Reads the `CERTIFICATE` blocks of a PEM file, e.g. an operator CA file or the
/// system store `/etc/ssl/certs/ca-certificates.crt`, for [`Profile::HttpsWeb`].
pub fn read_pem_certificates(pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, FetchError> {
    let blocks = pem::parse_many(pem_bytes).map_err(|_| FetchError::NoRoots)?;
    Ok(blocks
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.into_contents()))
        .collect())
}

/// Fetches the bundle of `expected_td` from `url` with `profile`, within `limits`.
///
/// The document is read as the bundle of `expected_td`, whatever it or its certificates
/// say (item 113). Redirects (301, 302, 303, 307, 308) are followed up to
/// [`FetchLimits::max_redirects`] times when the target is itself a valid bundle
/// endpoint URL; the same profile authenticates every hop, so with `https_spiffe` the
/// new host must present the same SPIFFE ID (item 109). TLS 1.2 or 1.3, no session
/// resumption, HTTP/1.1, one connection per hop.
pub async fn fetch_bundle(
    url: &str,
    profile: &Profile,
    expected_td: &TrustDomain,
    limits: &FetchLimits,
) -> Result<FetchedBundle, FetchError> {
    let url = parse_endpoint_url(url).map_err(FetchError::InvalidUrl)?;
    let config = Arc::new(client_config(profile)?);
    match tokio::time::timeout(
        limits.total_timeout,
        fetch_following(url, config, expected_td, limits),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout {
            limit: limits.total_timeout,
        }),
    }
}

fn client_config(profile: &Profile) -> Result<ClientConfig, FetchError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| FetchError::Tls(err.to_string()))?;
    let mut config = match profile {
        Profile::HttpsWeb { roots } => {
            let mut store = RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
            if added == 0 {
                return Err(FetchError::NoRoots);
            }
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|err| FetchError::Tls(err.to_string()))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        Profile::HttpsSpiffe {
            endpoint_spiffe_id,
            trust_bundle,
        } => {
            let verifier =
                SpiffeEndpointVerifier::new(endpoint_spiffe_id.clone(), trust_bundle, provider)
                    .map_err(FetchError::Profile)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn fetch_following(
    mut url: Url,
    config: Arc<ClientConfig>,
    expected_td: &TrustDomain,
    limits: &FetchLimits,
) -> Result<FetchedBundle, FetchError> {
    let mut redirects = 0;
    let mut permanent_redirect = false;
    loop {
        match fetch_once(&url, &config, limits).await? {
            Outcome::Body(body) => {
                let bundle =
                    SpiffeBundle::parse_json(expected_td, &body).map_err(FetchError::Bundle)?;
                return Ok(FetchedBundle {
                    bundle,
                    final_url: url.into(),
                    redirects,
                    permanent_redirect,
                });
            }
            Outcome::Redirect {
                location,
                permanent,
            } => {
                if redirects >= limits.max_redirects {
                    return Err(FetchError::TooManyRedirects {
                        limit: limits.max_redirects,
                    });
                }
                let next = url
                    .join(&location)
                    .map_err(|_| FetchError::RedirectRefused(UrlError::Parse))?;
                check_url(&next).map_err(FetchError::RedirectRefused)?;
                tracing::info!(
                    from = %url,
                    to = %next,
                    permanent,
                    "bundle endpoint redirected; following it for this fetch only"
                );
                redirects += 1;
                permanent_redirect |= permanent;
                url = next;
            }
        }
    }
}

enum Outcome {
    Body(Vec<u8>),
    Redirect { location: String, permanent: bool },
}

async fn fetch_once(
    url: &Url,
    config: &Arc<ClientConfig>,
    limits: &FetchLimits,
) -> Result<Outcome, FetchError> {
    let authority = url[Position::BeforeHost..Position::AfterPort].to_owned();
    let port = url.port_or_known_default().unwrap_or(443);
    let (server_name, addr) = match url.host() {
        Some(Host::Domain(domain)) => (
            ServerName::try_from(domain.to_owned())
                .map_err(|_| FetchError::InvalidUrl(UrlError::Parse))?,
            Target::Name(domain.to_owned()),
        ),
        Some(Host::Ipv4(ip)) => (
            ServerName::IpAddress(ip.into()),
            Target::Addr(SocketAddr::new(ip.into(), port)),
        ),
        Some(Host::Ipv6(ip)) => (
            ServerName::IpAddress(ip.into()),
            Target::Addr(SocketAddr::new(ip.into(), port)),
        ),
        None => return Err(FetchError::InvalidUrl(UrlError::NoHost)),
    };

    let connect = async {
        let tcp = match &addr {
            Target::Name(name) => TcpStream::connect((name.as_str(), port)).await,
            Target::Addr(addr) => TcpStream::connect(addr).await,
        }
        .map_err(|err| FetchError::Connect {
            host: authority.clone(),
            reason: err.to_string(),
        })?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(Arc::clone(config))
            .connect(server_name, tcp)
            .await
            .map_err(tls_error)
    };
    let tls = tokio::time::timeout(limits.connect_timeout, connect)
        .await
        .map_err(|_| FetchError::ConnectTimeout {
            host: authority.clone(),
        })??;

    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|err| FetchError::Http(err.to_string()))?;
    let request = Request::get(&url[Position::BeforePath..Position::AfterQuery])
        .header(HOST, authority.as_str())
        .header(ACCEPT, "application/json")
        .header(
            USER_AGENT,
            concat!("tessera-federation/", env!("CARGO_PKG_VERSION")),
        )
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|err| FetchError::Http(err.to_string()))?;

    let exchange = exchange(sender, request, limits.max_body_size);
    tokio::pin!(conn);
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        outcome = &mut exchange => outcome,
        ended = &mut conn => {
            // The connection is over; what it delivered is buffered in the body
            // channel, so the exchange can still finish (or fail if incomplete).
            match (ended, exchange.await) {
                (_, Ok(outcome)) => Ok(outcome),
                (Err(err), Err(_)) => Err(FetchError::Http(err.to_string())),
                (Ok(()), Err(err)) => Err(err),
            }
        }
    }
}

enum Target {
    Name(String),
    Addr(SocketAddr),
}

async fn exchange(
    mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
    max_body_size: usize,
) -> Result<Outcome, FetchError> {
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| FetchError::Http(err.to_string()))?;
    let status = response.status();
    match status {
        StatusCode::OK => {}
        StatusCode::MOVED_PERMANENTLY
        | StatusCode::FOUND
        | StatusCode::SEE_OTHER
        | StatusCode::TEMPORARY_REDIRECT
        | StatusCode::PERMANENT_REDIRECT => {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|value| value.to_str().ok())
                .filter(|value| !value.is_empty() && value.len() <= MAX_URL_LEN)
                .ok_or(FetchError::RedirectWithoutLocation)?;
            return Ok(Outcome::Redirect {
                location: location.to_owned(),
                permanent: matches!(
                    status,
                    StatusCode::MOVED_PERMANENTLY | StatusCode::PERMANENT_REDIRECT
                ),
            });
        }
        other => return Err(FetchError::Status(other.as_u16())),
    }
    let too_large = FetchError::BodyTooLarge {
        limit: max_body_size,
    };
    let announced = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if announced.is_some_and(|len| len > max_body_size as u64) {
        return Err(too_large);
    }
    let mut body = response.into_body();
    if body.size_hint().lower() > max_body_size as u64 {
        return Err(too_large);
    }
    let mut bytes = Vec::with_capacity(
        announced
            .and_then(|len| usize::try_from(len).ok())
            .unwrap_or(0)
            .min(max_body_size),
    );
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| FetchError::Http(err.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if data.len() > max_body_size - bytes.len() {
                return Err(too_large);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Outcome::Body(bytes))
}

/// Recovers an [`SvidError`] of the `https_spiffe` verifier from a failed handshake.
fn tls_error(err: io::Error) -> FetchError {
    let Some(rustls_err) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return FetchError::Tls(err.to_string());
    };
    if let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = rustls_err
        && let Some(svid) = other.0.downcast_ref::<SvidError>()
    {
        return FetchError::EndpointAuthentication(svid.clone());
    }
    FetchError::Tls(rustls_err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_follow_the_spec() {
        assert_eq!(
            check_endpoint_url("https://Host.Example.com/td/bundle?x=1").unwrap(),
            "https://host.example.com/td/bundle?x=1"
        );
        assert!(check_endpoint_url("https://[::1]:8443").is_ok());
        for (url, err) in [
            ("http://example.com/", UrlError::NotHttps),
            ("ftp://example.com/", UrlError::NotHttps),
            ("https://user@example.com/", UrlError::UserInfo),
            ("https://user:pw@example.com/", UrlError::UserInfo),
            ("https://:pw@example.com/", UrlError::UserInfo),
            ("https://example.com/#frag", UrlError::Fragment),
            ("/relative", UrlError::Parse),
            ("not a url", UrlError::Parse),
        ] {
            assert_eq!(check_endpoint_url(url), Err(err), "{url}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check_endpoint_url(&long), Err(UrlError::TooLong));
    }

    #[test]
    fn default_limits_are_documented_values() {
        let limits = FetchLimits::default();
        assert_eq!(limits.max_body_size, 1024 * 1024);
        assert_eq!(limits.total_timeout, Duration::from_secs(10));
        assert_eq!(limits.connect_timeout, Duration::from_secs(5));
        assert_eq!(limits.max_redirects, 3);
    }

    #[test]
    fn https_web_needs_roots() {
        assert!(matches!(
            client_config(&Profile::HttpsWeb { roots: vec![] }),
            Err(FetchError::NoRoots)
        ));
    }
}
