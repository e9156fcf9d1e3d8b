//! Upstream authority `disk` end to end: a real server whose CAs are intermediates
//! signed by an upstream intermediate (itself under a root given in
//! `bundle_file_path`), a real agent bootstrapped from that root alone, and workloads
//! whose X.509-SVIDs carry [leaf, server CA, upstream intermediate] and verify against a
//! bundle that is exactly the upstream root, across CA rotations too.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::{CertificateDer, UnixTime};
use tessera_tests::{Harness, fetch_as, my_uid};

use crate::support::{chain_verifies, fetch_x509_raw, open_x509_stream, split_der, workload_bin};

/// An upstream CA made with rcgen.
struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Upstream Corp");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2045, 1, 1);
    p
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// An upstream root, an upstream intermediate under it, and the files the server
/// reads: the intermediate's certificate and key (0600), the root as bundle.
struct Upstream {
    _dir: tempfile::TempDir,
    root: TestCa,
    intermediate: TestCa,
    config: String,
}

fn upstream() -> Upstream {
    let dir = tempfile::tempdir().unwrap();
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca_params("Upstream Root");
    let root_der = root_params.self_signed(&root_key).unwrap().der().to_vec();
    let root = TestCa {
        params: root_params,
        key: root_key,
        der: root_der,
    };
    let key = KeyPair::generate().unwrap();
    let params = ca_params("Upstream Intermediate");
    let der = params
        .signed_by(&key, &Issuer::from_params(&root.params, &root.key))
        .unwrap()
        .der()
        .to_vec();
    let intermediate = TestCa { params, key, der };

    let files = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(files("upstream.pem"), pem_of(&intermediate.der)).unwrap();
    std::fs::write(files("roots.pem"), pem_of(&root.der)).unwrap();
    std::fs::write(files("upstream.key"), intermediate.key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        files("upstream.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let config = format!(
        "[server.upstream_authority]\nkind = \"disk\"\ncert_file_path = \"{}\"\n\
         key_file_path = \"{}\"\nbundle_file_path = \"{}\"\n",
        files("upstream.pem").display(),
        files("upstream.key").display(),
        files("roots.pem").display(),
    );
    Upstream {
        _dir: dir,
        root,
        intermediate,
        config,
    }
}

/// Starts a server with `server_extra` then the upstream section, and makes the agents'
/// bootstrap bundle the upstream root alone (not the server's CA).
async fn start(upstream: &Upstream, server_extra: &str) -> Harness {
    let h = Harness::start_with(&format!("{server_extra}{}", upstream.config)).await;
    std::fs::write(h.bootstrap_bundle(), pem_of(&upstream.root.der)).unwrap();
    h
}

/// Verifies `chain` (leaf first) against `bundle` with webpki, now, for client and
/// server auth, and with rustls' `WebPkiServerVerifier` (what a TLS client of the
/// workload does).
fn verify(chain: &[Vec<u8>], bundle: &[Vec<u8>]) {
    let now = std::time::SystemTime::now();
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        chain_verifies(chain, bundle, now, usage)
            .expect("the SVID chain verifies against the bundle");
    }
    // Without the served intermediates the leaf does not reach the root.
    assert!(
        chain_verifies(&chain[..1], bundle, now, webpki::KeyUsage::client_auth()).is_err(),
        "the leaf alone must not verify: the chain is what makes it"
    );

    // rustls' server certificate verifier, with the bundle as roots. The SVID has no
    // DNS name: a name mismatch (after the path was built and verified) is success for
    // the path.
    let mut roots = rustls::RootCertStore::empty();
    for der in bundle {
        roots.add(CertificateDer::from(der.clone())).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        provider,
    )
    .build()
    .unwrap();
    let name = rustls::pki_types::ServerName::try_from("workload.example.org").unwrap();
    let leaf_der = CertificateDer::from(chain[0].as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let result = rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &leaf_der,
        &intermediates,
        &name,
        &[],
        UnixTime::now(),
    );
    match result {
        Ok(_)
        | Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. },
        )) => {}
        Err(err) => panic!("rustls refused the chain: {err:?}"),
    }
}

fn subject(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .subject()
        .to_string()
}

fn issuer(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .issuer()
        .to_string()
}

fn is_ca(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).unwrap().1.is_ca()
}

/// A workload's FetchX509SVID: the chain is leaf, server CA, upstream intermediate;
/// the bundle is exactly the upstream root; the chain verifies against it (webpki,
/// rustls, and the `spiffe` crate's client in a child process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_svid_chains_to_the_upstream_root() {
    let up = upstream();
    let h = start(&up, "").await;
    let server_ca = h.server.as_ref().unwrap().ca_certificate_der();
    assert_eq!(
        issuer(&server_ca),
        subject(&up.intermediate.der),
        "the server CA is signed by the upstream intermediate"
    );
    // The agent attests and syncs over mTLS: it verified the server's chain from the
    // root alone, and the server verified the agent's chain against the same root.
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    h.create_entry(
        agent.agent_id().as_ref(),
        "spiffe://example.org/workload/upstream",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();

    let response = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(response) = fetch_x509_raw(agent.socket_path()).await {
                break response;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("an X.509-SVID within 20 s");
    let svid = &response.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/workload/upstream");
    let chain = split_der(&svid.x509_svid);
    assert_eq!(chain.len(), 3, "leaf, server CA, upstream intermediate");
    assert!(!is_ca(&chain[0]));
    assert_eq!(chain[1], server_ca, "the server's CA second");
    assert_eq!(
        chain[2], up.intermediate.der,
        "the upstream intermediate last"
    );
    assert!(!chain.contains(&up.root.der), "never the root");
    let bundle = split_der(&svid.bundle);
    assert_eq!(
        bundle,
        vec![up.root.der.clone()],
        "the bundle is the upstream root"
    );
    verify(&chain, &bundle);

    // A real SPIFFE client (the `spiffe` crate) verifies it the same way.
    let fetched = fetch_as(workload_bin(), agent.socket_path(), None).await;
    assert_eq!(fetched["ok"], true, "{fetched}");
    assert_eq!(fetched["svids"][0]["chain_verified"], true, "{fetched}");

    // The server's own trust bundle, as the admin CLI and federation see it.
    let bundle = h
        .admin()
        .await
        .get_bundle(tessera_proto::admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.x509_authorities, vec![up.root.der.clone()]);
    assert!(
        !bundle.jwt_authorities.is_empty(),
        "JWT keys are unaffected"
    );
    agent.stop().await.unwrap();
}

/// Short CA lifetimes: across CA rotations every SVID the workload receives verifies
/// against the same bundle (the upstream root), which never changes for X.509.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_bundle_and_new_svids_verify() {
    let up = upstream();
    let h = start(
        &up,
        "ca_ttl = \"8s\"\njwt_key_ttl = \"1h\"\nallow_short_key_lifetimes = true\n\
         default_x509_svid_ttl = \"3s\"\nagent_svid_ttl = \"4s\"\n",
    )
    .await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    h.create_entry(
        agent.agent_id().as_ref(),
        "spiffe://example.org/workload/rot",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    let mut stream = open_x509_stream(agent.socket_path()).await;

    let mut server_cas = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    // Three server CAs seen signing = two rotations.
    while server_cas.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} CAs seen signing in 60 s",
            server_cas.len()
        );
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an update within 10 s (SVIDs live 3 s)")
            .expect("stream healthy")
            .expect("stream open");
        let svid = &response.svids[0];
        let chain = split_der(&svid.x509_svid);
        assert_eq!(chain.len(), 3, "leaf, server CA, upstream intermediate");
        assert_eq!(chain[2], up.intermediate.der);
        assert_eq!(
            split_der(&svid.bundle),
            vec![up.root.der.clone()],
            "the X.509 bundle never changes"
        );
        verify(&chain, std::slice::from_ref(&up.root.der));
        server_cas.insert(chain[1].clone());
    }
    let fetched = fetch_as(workload_bin(), agent.socket_path(), None).await;
    assert_eq!(fetched["svids"][0]["chain_verified"], true, "{fetched}");
    agent.stop().await.unwrap();
}

/// A bad upstream stops the server before it serves, naming the configuration key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_readable_upstream_key_stops_the_start() {
    let up = upstream();
    let key = Path::new(
        up.config
            .lines()
            .find_map(|l| l.strip_prefix("key_file_path = \""))
            .unwrap()
            .trim_end_matches('"'),
    )
    .to_owned();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\n\
         data_dir = \"{}\"\nadmin_socket_path = \"{}\"\n{}",
        dir.path().join("data").display(),
        dir.path().join("admin/admin.sock").display(),
        up.config
    );
    let config =
        tessera_server::config::ServerConfig::parse(&text, Path::new("upstream.toml")).unwrap();
    let err = tessera_server::start(config).await.unwrap_err().to_string();
    assert!(
        err.contains("server.upstream_authority.key_file_path") && err.contains("group or others"),
        "{err}"
    );
}
