//! Federation end to end: two complete deployments (`example.org` and
//! `example-federated.org`) on loopback, federated both ways over `https_spiffe`, and a
//! third domain over `https_web`. Workloads receive the other domain's bundle, verify
//! its X.509-SVIDs and JWT-SVIDs, and talk mutual TLS with rustls until the
//! relationship is deleted; a JWT key rotation and X.509 CA rotations reach the other
//! domain without a restart; SECURITY.md §3.11 items 107-113 and §3.7 item 71 at the server level.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tessera_agent::cli::with_header;
use tessera_federation::SpiffeBundle;
use tessera_plugin_sdk::TrustDomain;
use tessera_proto::admin::{
    DeleteFederationRelationshipRequest, FederationRelationship, GetFederationRelationshipRequest,
    ListFederatedBundlesRequest, RefreshFederatedBundleRequest, RotateJwtAuthorityRequest,
    SetFederatedBundleRequest,
};
use tessera_proto::types::{Entry, Selector};
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509svidResponse,
};
use tessera_tests::{Harness, my_uid, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{fetch_x509_raw, raw_workload_client, split_der};

const A: &str = "example.org";
const B: &str = "example-federated.org";
const WEB: &str = "web-federated.org";

/// `[server.federation]` of a deployment whose bundle endpoint uses `https_spiffe`
/// and whose peers are polled every second.
fn spiffe_endpoint(extra: &str) -> String {
    format!(
        "[server.federation]\nbind_address = \"127.0.0.1:0\"\nrefresh_hint = \"1s\"\nmin_refresh_interval = \"1s\"\n{extra}"
    )
}

fn endpoint_url(h: &Harness) -> String {
    let port = h
        .server
        .as_ref()
        .unwrap()
        .federation_address()
        .unwrap()
        .port();
    format!("https://127.0.0.1:{port}/")
}

/// Starts an agent of `h` and an entry for this process's uid federating with `federates_with`; returns the agent and the SPIFFE ID.
async fn workload(h: &Harness, federates_with: &[&str]) -> (tessera_agent::RunningAgent, String) {
    let token = h.join_token(None).await;
    let agent = h.start_agent("agent", Some(token)).await;
    let spiffe_id = format!("spiffe://{}/workload", h.trust_domain());
    h.admin()
        .await
        .create_entry(tessera_proto::admin::CreateEntryRequest {
            entry: Some(Entry {
                spiffe_id: spiffe_id.clone(),
                parent_id: agent.agent_id().to_string(),
                selectors: vec![Selector {
                    r#type: "unix".into(),
                    value: format!("uid:{}", my_uid()),
                }],
                federates_with: federates_with.iter().map(|s| (*s).to_owned()).collect(),
                ..Entry::default()
            }),
        })
        .await
        .unwrap();
    (agent, spiffe_id)
}

fn relationship(td: &str, url: String, bundle: Vec<u8>) -> FederationRelationship {
    FederationRelationship {
        trust_domain: td.into(),
        bundle_endpoint_url: url,
        profile: "https_spiffe".into(),
        trust_domain_bundle: bundle,
        ..FederationRelationship::default()
    }
}

fn federated_of(response: &X509svidResponse, td: &str) -> Option<Vec<Vec<u8>>> {
    response
        .federated_bundles
        .get(&format!("spiffe://{td}"))
        .map(|der| split_der(der))
}

/// Waits until this process's X.509 response on `socket` satisfies `ok`.
async fn x509_until(
    socket: &Path,
    what: &str,
    ok: impl Fn(&X509svidResponse) -> bool,
) -> X509svidResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let last = fetch_x509_raw(socket).await;
        if let Ok(response) = &last
            && ok(response)
        {
            return last.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: last {:?}",
            last.map(|r| r.federated_bundles.keys().cloned().collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn jwt(socket: &Path, audience: &str) -> String {
    raw_workload_client(socket)
        .await
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![audience.into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid
}

async fn validate(socket: &Path, audience: &str, token: &str) -> Result<String, tonic::Status> {
    raw_workload_client(socket)
        .await
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: audience.into(),
            svid: token.into(),
        }))
        .await
        .map(|r| r.into_inner().spiffe_id)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(authorities: &[Vec<u8>]) -> Arc<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for der in authorities {
        store.add(CertificateDer::from(der.clone())).unwrap();
    }
    Arc::new(store)
}

fn identity(svid: &X509svidResponse) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let first = &svid.svids[0];
    let chain = split_der(&first.x509_svid)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(first.x509_svid_key.clone()));
    (chain, key)
}

/// A server verifier for SVIDs: the chain must verify against the roots (the peer
/// domain's bundle); SVIDs name a SPIFFE ID, not a host, so the host name is not
/// checked.
#[derive(Debug)]
struct SpiffeServerVerifier(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// One mutual TLS exchange: `server_svid` serves, trusting `server_trusts` for client
/// certificates; `client_svid` connects, trusting `client_trusts`. Returns whether
/// both handshakes and one round trip succeeded.
async fn mutual_tls(
    server_svid: &X509svidResponse,
    server_trusts: &[Vec<u8>],
    client_svid: &X509svidResponse,
    client_trusts: &[Vec<u8>],
) -> bool {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots(server_trusts),
        provider(),
    )
    .build()
    .unwrap();
    let (chain, key) = identity(server_svid);
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let (chain, key) = identity(client_svid);
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(client_trusts),
        provider(),
    )
    .build()
    .unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier(webpki)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let served = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.ok()?;
        let mut buf = [0_u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        tls.write_all(b"pong").await.ok()?;
        tls.shutdown().await.ok()?;
        Some(buf)
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let client_ok = async {
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .ok()?;
        tls.write_all(b"ping").await.ok()?;
        let mut buf = [0_u8; 4];
        tls.read_exact(&mut buf).await.ok()?;
        Some(buf)
    }
    .await;
    let server_ok = served.await.unwrap();
    client_ok == Some(*b"pong") && server_ok == Some(*b"ping")
}

/// Two deployments federated both ways over `https_spiffe`, each with an agent and a
/// workload federating with the other.
struct Pair {
    a: Harness,
    b: Harness,
    agent_a: tessera_agent::RunningAgent,
    agent_b: tessera_agent::RunningAgent,
    id_a: String,
    id_b: String,
}

async fn federated_pair() -> Pair {
    let a = Harness::start_in(A, &spiffe_endpoint("")).await;
    let b = Harness::start_in(B, &spiffe_endpoint("")).await;
    let bundle_a = std::fs::read(a.bootstrap_bundle()).unwrap();
    let bundle_b = std::fs::read(b.bootstrap_bundle()).unwrap();
    a.admin()
        .await
        .create_federation_relationship(relationship(B, endpoint_url(&b), bundle_b))
        .await
        .unwrap();
    b.admin()
        .await
        .create_federation_relationship(relationship(A, endpoint_url(&a), bundle_a))
        .await
        .unwrap();
    let (agent_a, id_a) = workload(&a, &[B]).await;
    let (agent_b, id_b) = workload(&b, &[A]).await;
    Pair {
        a,
        b,
        agent_a,
        agent_b,
        id_a,
        id_b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_federated_over_https_spiffe_verify_each_other_and_talk_mutual_tls() {
    let p = federated_pair().await;
    let sock_a = p.agent_a.socket_path().to_owned();
    let sock_b = p.agent_b.socket_path().to_owned();

    // Each workload receives the other domain's bundle (fetched from its endpoint,
    // with the JWT keys the bootstrap PEM did not have).
    let svid_a = x509_until(&sock_a, "B's bundle at A", |r| federated_of(r, B).is_some()).await;
    let svid_b = x509_until(&sock_b, "A's bundle at B", |r| federated_of(r, A).is_some()).await;
    let b_at_a = federated_of(&svid_a, B).unwrap();
    let a_at_b = federated_of(&svid_b, A).unwrap();
    assert_eq!(a_at_b, split_der(&svid_a.svids[0].bundle));
    assert_eq!(b_at_a, split_der(&svid_b.svids[0].bundle));
    // Only the trust domains the entry names: no third bundle.
    assert_eq!(svid_a.federated_bundles.len(), 1);

    // A verifies B's X.509-SVID chain with B's bundle; B verifies A's likewise.
    let now = rustls::pki_types::UnixTime::now();
    let chain_b: Vec<CertificateDer<'_>> = split_der(&svid_b.svids[0].x509_svid)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let chain_a: Vec<CertificateDer<'_>> = split_der(&svid_a.svids[0].x509_svid)
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let td_a = TrustDomain::new(A).unwrap();
    let td_b = TrustDomain::new(B).unwrap();
    let bundle_b = SpiffeBundle::from_x509_authorities(td_b.clone(), b_at_a.clone());
    let bundle_a = SpiffeBundle::from_x509_authorities(td_a.clone(), a_at_b.clone());
    assert_eq!(
        tessera_federation::verify_x509_svid(&chain_b, &bundle_b, now)
            .unwrap()
            .to_string(),
        p.id_b
    );
    assert_eq!(
        tessera_federation::verify_x509_svid(&chain_a, &bundle_a, now)
            .unwrap()
            .to_string(),
        p.id_a
    );
    // §3.7 item 71: an SVID of A chaining to a CA present only in B's bundle (here A's
    // CA filed as B's) is rejected: the bundle is chosen by the ID's trust domain.
    let a_ca_as_b = SpiffeBundle::from_x509_authorities(td_b.clone(), a_at_b.clone());
    assert!(tessera_federation::verify_x509_svid(&chain_a, &a_ca_as_b, now).is_err());
    // ... and B's SVID does not verify against A's bundle.
    assert!(tessera_federation::verify_x509_svid(&chain_b, &bundle_a, now).is_err());

    // JWT: B's workload's token validates through A's agent, and A's through B's.
    let token_b = jwt(&sock_b, "service-a").await;
    assert_eq!(
        validate(&sock_a, "service-a", &token_b).await.unwrap(),
        p.id_b
    );
    let token_a = jwt(&sock_a, "service-b").await;
    assert_eq!(
        validate(&sock_b, "service-b", &token_a).await.unwrap(),
        p.id_a
    );
    // FetchJWTBundles carries the federated JWKS too.
    let mut bundles = raw_workload_client(&sock_a)
        .await
        .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let jwks = bundles.message().await.unwrap().unwrap().bundles;
    assert!(
        jwks.contains_key(&format!("spiffe://{B}")),
        "{:?}",
        jwks.keys()
    );

    // Mutual TLS between the workloads: each trusts the peer's domain bundle from its
    // own FetchX509SVID federated_bundles.
    assert!(mutual_tls(&svid_a, &b_at_a, &svid_b, &a_at_b).await);
    assert!(mutual_tls(&svid_b, &a_at_b, &svid_a, &b_at_a).await);

    // A deletes the relationship: B's bundle is removed and pushed to A's agent, and
    // the handshake with what A's workload now trusts fails.
    p.a.admin()
        .await
        .delete_federation_relationship(DeleteFederationRelationshipRequest {
            trust_domain: B.into(),
        })
        .await
        .unwrap();
    let svid_a = x509_until(&sock_a, "B's bundle gone at A", |r| {
        r.federated_bundles.is_empty()
    })
    .await;
    let a_trusts: Vec<Vec<u8>> =
        federated_of(&svid_a, B).unwrap_or_else(|| split_der(&svid_a.svids[0].bundle));
    assert!(!mutual_tls(&svid_a, &a_trusts, &svid_b, &a_at_b).await);
    let err = validate(&sock_a, "service-a", &jwt(&sock_b, "service-a").await)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let listed =
        p.a.admin()
            .await
            .list_federated_bundles(ListFederatedBundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .bundles;
    assert!(listed.is_empty(), "{listed:?}");

    p.agent_a.stop().await.unwrap();
    p.agent_b.stop().await.unwrap();
    drop((p.a, p.b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_key_rotation_reaches_the_other_domain_without_a_restart() {
    let p = federated_pair().await;
    let sock_a = p.agent_a.socket_path().to_owned();
    let sock_b = p.agent_b.socket_path().to_owned();
    x509_until(&sock_a, "B's bundle at A", |r| federated_of(r, B).is_some()).await;
    let before = jwt(&sock_b, "service-a").await;
    assert_eq!(
        validate(&sock_a, "service-a", &before).await.unwrap(),
        p.id_b
    );

    let kid =
        p.b.admin()
            .await
            .rotate_jwt_authority(RotateJwtAuthorityRequest {})
            .await
            .unwrap()
            .into_inner()
            .kid;
    // Within one refresh interval (1 s, plus the push), A's workloads receive the new
    // key in B's JWT bundle, without a restart...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut bundles = raw_workload_client(&sock_a)
            .await
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let jwks = bundles.message().await.unwrap().unwrap().bundles;
        let jwks_b = String::from_utf8(jwks[&format!("spiffe://{B}")].clone()).unwrap();
        if jwks_b.contains(&kid) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new JWT key of {B} did not reach {A}: {jwks_b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and a token B signs with it validates through A's agent (a new audience, so
    // B's agent does not answer from its token cache).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let token = jwt(&sock_b, &format!("service-a-{n}")).await;
        let header = token.split('.').next().unwrap().to_owned();
        let header = String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap(),
        )
        .unwrap();
        if header.contains(&kid) {
            let validated = validate(&sock_a, &format!("service-a-{n}"), &token).await;
            assert_eq!(validated.unwrap(), p.id_b);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never signed with its new key"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        validate(&sock_a, "service-a", &before).await.unwrap(),
        p.id_b
    );
    p.agent_a.stop().await.unwrap();
    p.agent_b.stop().await.unwrap();
    drop((p.a, p.b));
}

/// The federated domain rotates its X.509 CA (12 s lifetime): every new authority
/// reaches the other domain's workloads within one refresh interval (1 s), without a
/// restart, and the other domain keeps verifying its SVIDs across the rotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_x509_ca_rotation_reaches_the_other_domain_without_a_restart() {
    let a = Harness::start_in(A, &spiffe_endpoint("")).await;
    let b = Harness::start_in(
        B,
        &format!(
            "ca_ttl = \"12s\"\nallow_short_key_lifetimes = true\ndefault_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"6s\"\n{}",
            spiffe_endpoint("")
        ),
    )
    .await;
    let bundle_b = std::fs::read(b.bootstrap_bundle()).unwrap();
    a.admin()
        .await
        .create_federation_relationship(relationship(B, endpoint_url(&b), bundle_b))
        .await
        .unwrap();
    let (agent_a, _) = workload(&a, &[B]).await;
    let (agent_b, id_b) = workload(&b, &[]).await;
    let sock_a = agent_a.socket_path().to_owned();
    let sock_b = agent_b.socket_path().to_owned();
    let first = x509_until(&sock_a, "B's bundle at A", |r| federated_of(r, B).is_some()).await;
    let mut seen: Vec<Vec<u8>> = federated_of(&first, B).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Two new CAs of B in A's view, each reaching A while B's agent is served by it.
    while seen.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's new CAs did not reach A: {} seen",
            seen.len()
        );
        let b_view = fetch_x509_raw(&sock_b).await.unwrap();
        let b_time = std::time::SystemTime::now();
        let b_authorities = split_der(&b_view.svids[0].bundle);
        let a_view = fetch_x509_raw(&sock_a).await.unwrap();
        let a_authorities = federated_of(&a_view, B).unwrap();
        for ca in &a_authorities {
            if !seen.contains(ca) {
                seen.push(ca.clone());
            }
        }
        // A new CA published by B reaches A within the refresh interval plus the push:
        // whatever B's workload holds now, A's workloads hold within 3 s.
        let lag_deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let a_now = federated_of(&fetch_x509_raw(&sock_a).await.unwrap(), B).unwrap();
            if b_authorities.iter().all(|ca| a_now.contains(ca)) {
                // And B's SVID (from the same answer as B's authorities) verifies
                // against the bundle A holds for B.
                let leaf: Vec<CertificateDer<'static>> = split_der(&b_view.svids[0].x509_svid)
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect();
                let bundle =
                    SpiffeBundle::from_x509_authorities(TrustDomain::new(B).unwrap(), a_now);
                let id = tessera_federation::verify_x509_svid(
                    &leaf,
                    &bundle,
                    rustls::pki_types::UnixTime::since_unix_epoch(
                        b_time.duration_since(std::time::UNIX_EPOCH).unwrap(),
                    ),
                )
                .expect("B's SVID verifies with A's copy of B's bundle");
                assert_eq!(id.as_str(), id_b);
                break;
            }
            assert!(
                tokio::time::Instant::now() < lag_deadline,
                "B's authorities took longer than 3 s to reach A"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agent_a.stop().await.unwrap();
    agent_b.stop().await.unwrap();
}

/// A test CA and an `https_web` certificate for `localhost` signed by it, written to
/// `dir`; returns (CA PEM path, cert path, key path).
fn web_pki(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "federation test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("web-ca.pem"),
        dir.join("web-cert.pem"),
        dir.join("web-key.pem"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

/// SECURITY.md §3.11 at the server: an `https_web` relationship; a bundle is stored only
/// under the configured trust domain (113); a failed fetch keeps the last good bundle
/// (107, 110); a lower sequence is ignored unless accepted (108); an empty bundle never
/// wipes the stored one (112).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refresh_policy_over_https_web_and_https_spiffe() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = web_pki(pki.path());
    let web = Harness::start_in(
        WEB,
        &format!(
            "[server.federation]\nbind_address = \"127.0.0.1:0\"\nprofile = \"https_web\"\ncertificate_path = \"{}\"\nkey_path = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    )
    .await;
    let mut b = Harness::start_in(B, &spiffe_endpoint("")).await;
    let a = Harness::start_in(
        A,
        &spiffe_endpoint(&format!("web_trust_roots_path = \"{}\"\n", ca.display())),
    )
    .await;
    let web_port = web
        .server
        .as_ref()
        .unwrap()
        .federation_address()
        .unwrap()
        .port();
    let web_url = format!("https://localhost:{web_port}/");
    let mut admin = a.admin().await;

    // https_web: fetched with the test CA; stored under the relationship's TD.
    let created = admin
        .create_federation_relationship(FederationRelationship {
            trust_domain: WEB.into(),
            bundle_endpoint_url: web_url.clone(),
            profile: "https_web".into(),
            ..FederationRelationship::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.profile, "https_web");
    let refreshed = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: WEB.into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        ["stored", "unchanged"].contains(&refreshed.outcome.as_str()),
        "{refreshed:?}"
    );
    let web_ca = web.server.as_ref().unwrap().ca_certificate_der();
    assert!(
        refreshed
            .bundle
            .as_ref()
            .unwrap()
            .x509_authorities
            .contains(&web_ca)
    );

    // 113: an endpoint serving another domain's bundle: stored only under the
    // configured trust domain, and the own bundle is untouched.
    let own_before = admin
        .get_bundle(tessera_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    admin
        .create_federation_relationship(FederationRelationship {
            trust_domain: "imposter.org".into(),
            bundle_endpoint_url: web_url.clone(),
            profile: "https_web".into(),
            ..FederationRelationship::default()
        })
        .await
        .unwrap();
    let out = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: "imposter.org".into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.bundle.as_ref().unwrap().trust_domain, "imposter.org");
    let listed: Vec<String> = admin
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .bundles
        .into_iter()
        .map(|b| b.trust_domain)
        .collect();
    assert_eq!(listed, vec!["imposter.org".to_owned(), WEB.to_owned()]);
    let own_after = admin
        .get_bundle(tessera_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own_before.x509_authorities, own_after.x509_authorities);
    assert!(!own_after.x509_authorities.contains(&web_ca));

    // https_spiffe with B.
    let b_pem = std::fs::read(b.bootstrap_bundle()).unwrap();
    admin
        .create_federation_relationship(relationship(B, endpoint_url(&b), b_pem.clone()))
        .await
        .unwrap();
    let good = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: B.into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap()
        .into_inner()
        .bundle
        .unwrap();
    assert!(
        !good.jwt_authorities.is_empty(),
        "the endpoint adds the JWT keys"
    );

    // 107: the endpoint must present exactly the configured SPIFFE ID: fails, kept.
    let mut wrong = relationship(B, endpoint_url(&b), Vec::new());
    wrong.endpoint_spiffe_id = format!("spiffe://{B}/not-the-server");
    admin.update_federation_relationship(wrong).await.unwrap();
    let err = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: B.into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let shown = admin
        .get_federation_relationship(GetFederationRelationshipRequest {
            trust_domain: B.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!shown.last_error.is_empty());
    assert_eq!(shown.bundle_sequence_number, good.sequence_number);
    admin
        .update_federation_relationship(relationship(B, endpoint_url(&b), Vec::new()))
        .await
        .unwrap();

    // 108: the stored sequence is higher than what the endpoint serves: ignored, then
    // accepted with accept_lower_sequence.
    let td_b = TrustDomain::new(B).unwrap();
    let mut high = tessera_federation::SpiffeBundle::parse_pem(&td_b, &b_pem).unwrap();
    high.sequence_number = Some(1_000_000);
    admin
        .set_federated_bundle(SetFederatedBundleRequest {
            trust_domain: B.into(),
            bundle: high.to_json().unwrap().into_bytes(),
        })
        .await
        .unwrap();
    let ignored = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: B.into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ignored.outcome, "ignored_lower_sequence");
    assert_eq!(ignored.bundle.unwrap().sequence_number, 1_000_000);
    let accepted = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: B.into(),
            accept_lower_sequence: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.outcome, "stored");
    assert_eq!(
        accepted.bundle.as_ref().unwrap().sequence_number,
        good.sequence_number
    );

    // 112: an empty bundle never replaces the stored one.
    let empty = admin
        .set_federated_bundle(SetFederatedBundleRequest {
            trust_domain: B.into(),
            bundle: br#"{"keys":[],"spiffe_sequence":2000000}"#.to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    // 110 (endpoint gone): the fetch fails, the last good bundle stays.
    b.stop_server().await;
    let err = admin
        .refresh_federated_bundle(RefreshFederatedBundleRequest {
            trust_domain: B.into(),
            accept_lower_sequence: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let still: Vec<_> = admin
        .list_federated_bundles(ListFederatedBundlesRequest {})
        .await
        .unwrap()
        .into_inner()
        .bundles
        .into_iter()
        .filter(|x| x.trust_domain == B)
        .collect();
    assert_eq!(still.len(), 1);
    assert_eq!(still[0].x509_authorities, good.x509_authorities);

    // The own trust domain is refused everywhere.
    let err = admin
        .create_federation_relationship(relationship(A, endpoint_url(&a), Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    wait_until("nothing", Duration::from_millis(1), || true).await;
    drop((a, b, web));
}
