//! x509pop node attestation end to end: a real server configured with a node CA bundle,
//! a real agent holding a certificate (leaf + intermediate) and its key; the agent ID is
//! the leaf's TBS fingerprint, stable across re-attestation, refused once banned; a
//! certificate from an unknown CA is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use tessera_agent::{AgentConfig, RunningAgent};
use tessera_proto::node::{AttestAgentRequest, AttestationParams, attest_agent_request};
use tessera_tests::{Harness, fetch_as, my_uid};
use tonic::Code;

use crate::support::{attest_messages_at, ca_der, new_key_and_csr, run_product, workload_bin};

struct Issued {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2045, 1, 1);
    p
}

fn root(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Issued { params, key, der }
}

fn issue(params: CertificateParams, by: &Issued) -> Issued {
    let key = KeyPair::generate().unwrap();
    let der = params
        .signed_by(&key, &Issuer::from_params(&by.params, &by.key))
        .unwrap()
        .der()
        .to_vec();
    Issued { params, key, der }
}

fn leaf(cn: &str, by: &Issued) -> Issued {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2045, 1, 1);
    issue(p, by)
}

fn pem_of(ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

/// Lowercase hex SHA-256 of the certificate's TBSCertificate: the agent ID's last
/// segment, computed independently of the plugin.
fn tbs_fingerprint(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.tbs_certificate.as_ref());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `leaf` + `chain` and the leaf key (0600) into `dir`; returns (cert, key) paths.
fn write_credentials(dir: &Path, leaf: &Issued, chain: &[&Issued]) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut ders: Vec<&[u8]> = vec![&leaf.der];
    ders.extend(chain.iter().map(|c| c.der.as_slice()));
    let cert = dir.join("node.crt");
    let key = dir.join("node.key");
    std::fs::write(&cert, pem_of(&ders)).unwrap();
    std::fs::write(&key, leaf.key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert, key)
}

/// The config of agent `name` attesting with x509pop from `cert` and `key`.
fn x509pop_agent_config(h: &Harness, name: &str, cert: &Path, key: &Path) -> AgentConfig {
    std::fs::create_dir_all(h.path(name)).unwrap();
    let text = format!(
        "[agent]\ntrust_domain = \"{}\"\nserver_address = \"{}\"\nsocket_path = \"{}\"\n\
         data_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n\
         [[plugins.node_attestor]]\nname = \"x509pop\"\n[plugins.node_attestor.data]\n\
         certificate_path = \"{}\"\nprivate_key_path = \"{}\"\n",
        h.trust_domain(),
        h.node_address(),
        h.agent_socket(name).display(),
        h.path(&format!("{name}/data")).display(),
        h.bootstrap_bundle().display(),
        cert.display(),
        key.display(),
    );
    AgentConfig::parse(&text, Path::new("x509pop-agent.toml")).unwrap()
}

async fn start_synced(config: AgentConfig) -> RunningAgent {
    let agent = tessera_agent::start(config, None)
        .await
        .expect("agent starts");
    tessera_tests::wait_until("agent synced", Duration::from_secs(10), || {
        agent.is_synced()
    })
    .await;
    agent
}

/// Fetches from `socket` until `id` is served (entries reach the agent asynchronously).
async fn wait_served(socket: &Path, id: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = fetch_as(workload_bin(), socket, None).await;
        if answer["ok"] == true && answer["svids"][0]["spiffe_id"] == id {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} not served: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn x509pop_params(chain: &[&[u8]]) -> AttestAgentRequest {
    let b64 = base64::engine::general_purpose::STANDARD;
    let certificates: Vec<String> = chain.iter().map(|der| b64.encode(der)).collect();
    AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestationParams {
            r#type: "x509pop".into(),
            payload: serde_json::json!({ "certificates": certificates })
                .to_string()
                .into_bytes(),
            csr: new_key_and_csr().1,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_attests_reattests_to_the_same_id_and_honours_bans() {
    let pki = tempfile::tempdir().unwrap();
    let ca = root("node root CA");
    let intermediate = issue(ca_params("node intermediate CA"), &ca);
    let node = leaf("node-1.example.org", &intermediate);
    let bundle = pki.path().join("node-ca.pem");
    std::fs::write(&bundle, pem_of(&[&ca.der])).unwrap();
    let h = Harness::start_with(&format!(
        "[[plugins.node_attestor]]\nname = \"x509pop\"\n[plugins.node_attestor.data]\n\
         ca_bundle_path = \"{}\"\nmax_intermediates = 2\n",
        bundle.display()
    ))
    .await;
    let (cert, key) = write_credentials(&pki.path().join("node"), &node, &[&intermediate]);
    let expected = format!(
        "spiffe://example.org/tessera/agent/x509pop/{}",
        tbs_fingerprint(&node.der)
    );

    // First attestation; a workload entry parented to the agent ID is served.
    let agent = start_synced(x509pop_agent_config(&h, "a", &cert, &key)).await;
    assert_eq!(agent.agent_id().as_str(), expected);
    let workload = "spiffe://example.org/x509pop/workload";
    h.create_entry(&expected, workload, &[&format!("unix:uid:{}", my_uid())], 0)
        .await
        .unwrap();
    wait_served(agent.socket_path(), workload).await;

    // Re-attestation from scratch: same certificate, same ID, still serving.
    agent.stop().await.unwrap();
    std::fs::remove_dir_all(h.path("a/data")).unwrap();
    let agent = start_synced(x509pop_agent_config(&h, "a", &cert, &key)).await;
    assert_eq!(agent.agent_id().as_str(), expected);
    wait_served(agent.socket_path(), workload).await;

    // Banned: a fresh start cannot attest again.
    agent.stop().await.unwrap();
    run_product(
        "tessera-server",
        &[
            "agent",
            "ban",
            &expected,
            "--socket",
            h.admin_socket().to_str().unwrap(),
        ],
    )
    .await
    .expect_code(0);
    std::fs::remove_dir_all(h.path("a/data")).unwrap();
    let Err(err) = tessera_agent::start(x509pop_agent_config(&h, "a", &cert, &key), None).await
    else {
        panic!("a banned agent cannot attest");
    };
    assert!(err.to_string().contains("agent is banned"), "{err}");

    // A leaf of an unknown CA: refused before any challenge, PermissionDenied.
    let stranger_ca = root("someone else's CA");
    let stranger = leaf("node-2.example.org", &stranger_ca);
    let status = attest_messages_at(
        &h.node_address(),
        ca_der(&h),
        vec![x509pop_params(&[&stranger.der, &stranger_ca.der])],
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status
            .message()
            .contains("does not lead to a configured CA"),
        "{status:?}"
    );
    // And through a real agent.
    let (cert, key) = write_credentials(&pki.path().join("stranger"), &stranger, &[]);
    let Err(err) = tessera_agent::start(x509pop_agent_config(&h, "b", &cert, &key), None).await
    else {
        panic!("an unknown CA is refused");
    };
    assert!(
        err.to_string().contains("does not lead to a configured CA"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509pop_answered_with_a_bad_signature_is_refused() {
    use tessera_proto::node::attest_agent_response::Step;
    let pki = tempfile::tempdir().unwrap();
    let ca = root("node root CA");
    let node = leaf("node-1.example.org", &ca);
    let bundle = pki.path().join("node-ca.pem");
    std::fs::write(&bundle, pem_of(&[&ca.der])).unwrap();
    let h = Harness::start_with(&format!(
        "[[plugins.node_attestor]]\nname = \"x509pop\"\n[plugins.node_attestor.data]\n\
         ca_bundle_path = \"{}\"\n",
        bundle.display()
    ))
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(x509pop_params(&[&node.der])).await.unwrap();
    let mut client = crate::support::node_client_with(
        &h.node_address(),
        crate::support::node_tls(ca_der(&h), None, crate::support::SERVER_ID),
    );
    let mut stream = client
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().and_then(|m| m.step);
    assert!(matches!(first, Some(Step::Challenge(_))), "{first:?}");
    let forged = serde_json::json!({
        "signature": base64::engine::general_purpose::STANDARD.encode([0u8; 64])
    });
    tx.send(AttestAgentRequest {
        step: Some(attest_agent_request::Step::ChallengeResponse(
            forged.to_string().into_bytes(),
        )),
    })
    .await
    .unwrap();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("does not verify"), "{status:?}");
}
