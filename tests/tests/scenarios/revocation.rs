//! Revocation end to end: `instance revoke` withdraws one instance identity from every
//! agent, the server refuses to sign it again, every agent's `ValidateJWTSVID` rejects
//! its tokens, and a rustls peer reading the CRL served to workloads rejects its
//! certificate; `agent ban` stops a running agent, which deletes its SVID and exits, and
//! keeps it out; `agent evict` makes it attest again (SECURITY.md §3.9 items 89-92).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use tessera_agent::AgentError;
use tessera_agent::cli::with_header;
use tessera_proto::admin::{BanAgentRequest, EvictAgentRequest, GetAgentRequest};
use tessera_proto::node::{RenewAgentRequest, SyncRequest, x509svid_result};
use tessera_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidResponse};
use tessera_tests::{Harness, my_uid};

use crate::support::{
    arg, attested_agent, fetch_x509_raw, new_key_and_csr, new_x509_svid, node_client,
    raw_workload_client, run_product,
};

const TEMPLATE: &str = "spiffe://example.org/ai/research-bot/{instance}";
const PREFIX: &str = "spiffe://example.org/ai/research-bot/";

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// This process's X.509 answer once it holds `want` SVIDs (10 s at most).
async fn x509_with(socket: &std::path::Path, want: usize) -> X509svidResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(answer) = fetch_x509_raw(socket).await
            && answer.svids.len() == want
        {
            return answer;
        }
        assert!(Instant::now() < deadline, "no answer with {want} SVIDs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A rustls client-certificate verifier trusting `bundle` (concatenated DER) and
/// honouring `crls`, as a TLS server of the trust domain would build it from the
/// Workload API.
fn verifier(
    bundle: &[u8],
    crls: &[Vec<u8>],
) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for der in tessera_agent::cli::split_der_certificates(bundle).unwrap() {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .with_crls(
        crls.iter()
            .map(|c| CertificateRevocationListDer::from(c.clone())),
    )
    .build()
    .unwrap()
}

async fn validate(
    socket: &std::path::Path,
    audience: &str,
    token: &str,
) -> Result<String, tonic::Status> {
    raw_workload_client(socket)
        .await
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        }))
        .await
        .map(|r| r.into_inner().spiffe_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_instance_withdraws_it_everywhere() {
    let h = Harness::start().await;
    let a = h.start_agent("a", Some(h.join_token(None).await)).await;
    let b = h.start_agent("b", Some(h.join_token(None).await)).await;
    let parent = a.agent_id().to_string();
    h.create_entry(&parent, "spiffe://example.org/base", &[&uid_selector()], 0)
        .await
        .unwrap();
    h.create_entry(&parent, TEMPLATE, &[&uid_selector()], 0)
        .await
        .unwrap();
    // Agent b serves this process too, so that it may call ValidateJWTSVID.
    h.create_entry(
        b.agent_id().as_str(),
        "spiffe://example.org/validator",
        &[&uid_selector()],
        0,
    )
    .await
    .unwrap();
    x509_with(b.socket_path(), 1).await;

    let before = x509_with(a.socket_path(), 2).await;
    let instance = before
        .svids
        .iter()
        .find(|s| s.spiffe_id.starts_with(PREFIX))
        .expect("an instance SVID")
        .clone();
    let base = before
        .svids
        .iter()
        .find(|s| s.spiffe_id == "spiffe://example.org/base")
        .unwrap()
        .clone();
    let instance_leaf = tessera_agent::cli::split_der_certificates(&instance.x509_svid).unwrap();
    let base_leaf = tessera_agent::cli::split_der_certificates(&base.x509_svid).unwrap();
    let serial = tessera_plugin_sdk::x509::serial_of_certificate(&instance_leaf[0]).unwrap();
    let token = raw_workload_client(a.socket_path())
        .await
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["tickets".into()],
            spiffe_id: instance.spiffe_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids
        .remove(0)
        .svid;
    assert_eq!(
        validate(b.socket_path(), "tickets", &token).await.unwrap(),
        instance.spiffe_id
    );

    // A TLS peer with the bundle and no revocation accepts the instance's certificate.
    let now = UnixTime::now();
    verifier(&instance.bundle, &before.crl)
        .verify_client_cert(&CertificateDer::from(instance_leaf[0].clone()), &[], now)
        .unwrap();

    // Revoke through the CLI.
    let started = Instant::now();
    let out = run_product(
        "tessera-server",
        &[
            "instance",
            "revoke",
            &instance.spiffe_id,
            "--socket",
            arg(&h.admin_socket()),
            "--output",
            "json",
        ],
    )
    .await;
    out.expect_code(0);
    let revocation = out.json();
    assert!(
        revocation.to_string().contains(&serial),
        "the revocation lists the issued serial {serial}: {revocation}"
    );

    // The identity is gone from the agent, the CRL lists it, the base stays.
    let after = loop {
        let answer = x509_with(a.socket_path(), 1).await;
        if !answer.crl.is_empty() {
            break answer;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no CRL pushed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "instance revoke -> identity gone and CRL served: {:?}",
        started.elapsed()
    );
    assert_eq!(after.svids[0].spiffe_id, "spiffe://example.org/base");
    let crl_verifier = verifier(&after.svids[0].bundle, &after.crl);
    let refused = crl_verifier
        .verify_client_cert(&CertificateDer::from(instance_leaf[0].clone()), &[], now)
        .unwrap_err();
    assert!(
        matches!(
            refused,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        ),
        "{refused:?}"
    );
    crl_verifier
        .verify_client_cert(&CertificateDer::from(base_leaf[0].clone()), &[], now)
        .expect("the base SVID is not revoked");

    // Every agent's ValidateJWTSVID rejects the instance's token.
    for socket in [a.socket_path(), b.socket_path()] {
        let err = validate(socket, "tickets", &token).await.unwrap_err();
        assert!(err.message().contains("revoked"), "{err:?}");
    }

    // The server refuses to sign it again, for any agent serving the template.
    let (credential, agent_id) = attested_agent(&h, None).await;
    let mut client = node_client(&h, Some(&credential));
    let entry = h
        .create_entry(&agent_id, TEMPLATE, &["unix:uid:1"], 0)
        .await
        .unwrap();
    let value = instance.spiffe_id.strip_prefix(PREFIX).unwrap().to_owned();
    let (key, _) = new_key_and_csr();
    let mut response = client
        .batch_new_x509svid(tessera_proto::node::BatchNewX509svidRequest {
            params: vec![tessera_proto::node::NewX509svidParams {
                entry_id: entry.id.clone(),
                public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
                template_values: [("instance".to_owned(), value)].into(),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    match response.results.remove(0).result {
        Some(x509svid_result::Result::Error(err)) => {
            assert_eq!(err.code, tonic::Code::PermissionDenied as i32);
            assert_eq!(err.message, "identity revoked");
        }
        other => panic!("signed a revoked identity: {other:?}"),
    }
    // The agent does not mint it again either.
    assert_eq!(x509_with(a.socket_path(), 1).await.svids.len(), 1);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_stops_deletes_its_svid_and_stays_out() {
    let h = Harness::start().await;
    let mut agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let id = agent.agent_id().to_string();
    h.create_entry(&id, "spiffe://example.org/w", &[&uid_selector()], 0)
        .await
        .unwrap();
    let mut stream = {
        x509_with(agent.socket_path(), 1).await;
        raw_workload_client(agent.socket_path())
            .await
            .fetch_x509svid(with_header(tessera_proto::workload::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner()
    };
    stream.message().await.unwrap().unwrap();
    let svid_file = h.path("a/data/agent_svid.pem");
    assert!(svid_file.exists());

    let started = Instant::now();
    run_product(
        "tessera-server",
        &["agent", "ban", &id, "--socket", arg(&h.admin_socket())],
    )
    .await
    .expect_code(0);
    let outcome = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the banned agent stops by itself");
    assert!(matches!(outcome, Err(AgentError::Banned)), "{outcome:?}");
    eprintln!("agent ban -> agent stopped: {:?}", started.elapsed());
    assert!(!svid_file.exists(), "the banned agent kept its SVID");
    assert!(!agent.socket_path().exists(), "the socket is gone");
    // The open stream ended.
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");

    // `agent show` says banned; restarting from the data dir needs a token.
    let shown = run_product(
        "tessera-server",
        &[
            "agent",
            "show",
            &id,
            "--socket",
            arg(&h.admin_socket()),
            "--output",
            "json",
        ],
    )
    .await;
    shown.expect_code(0);
    assert_eq!(shown.json()["banned"], true, "{}", shown.stdout);
    assert!(
        tessera_agent::start(h.agent_config("a"), None)
            .await
            .is_err()
    );

    // A banned agent's own credentials: renew and sync refused (SECURITY 89).
    let (credential, banned_id) = attested_agent(&h, None).await;
    h.admin()
        .await
        .ban_agent(BanAgentRequest {
            spiffe_id: banned_id.clone(),
        })
        .await
        .unwrap();
    let mut client = node_client(&h, Some(&credential));
    let (_, csr) = new_key_and_csr();
    let err = client
        .renew_agent(RenewAgentRequest { csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "agent is banned");
    let err = new_x509_svid(&mut client, "0".repeat(32).as_str(), vec![1])
        .await
        .unwrap_err();
    assert_eq!(err.message(), "agent is banned");
    match client.sync(SyncRequest { since_revision: 0 }).await {
        Err(err) => assert_eq!(err.message(), "agent is banned"),
        Ok(response) => {
            let mut stream = response.into_inner();
            let last = stream.message().await.unwrap().unwrap();
            assert_eq!(
                last.agent_status,
                tessera_proto::node::AgentStatus::Banned as i32
            );
        }
    }
    let got = h
        .admin()
        .await
        .get_agent(GetAgentRequest {
            spiffe_id: banned_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.banned_at > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_agent_stops_and_attests_again_with_a_new_token() {
    let h = Harness::start().await;
    let mut agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let id = agent.agent_id().to_string();
    h.admin()
        .await
        .evict_agent(EvictAgentRequest {
            spiffe_id: id.clone(),
        })
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the evicted agent stops by itself");
    assert!(matches!(outcome, Err(AgentError::Evicted)), "{outcome:?}");

    // Attest again with a new token: a new agent, serving again.
    let again = h.start_agent("a", Some(h.join_token(None).await)).await;
    assert_ne!(again.agent_id().to_string(), id);
    h.create_entry(
        again.agent_id().as_str(),
        "spiffe://example.org/w",
        &[&uid_selector()],
        0,
    )
    .await
    .unwrap();
    x509_with(again.socket_path(), 1).await;
    again.stop().await.unwrap();

    // The evicted agent's old SVID is refused: it must re-attest (SECURITY 90-92).
    let (credential, evicted_id) = attested_agent(&h, None).await;
    h.admin()
        .await
        .evict_agent(EvictAgentRequest {
            spiffe_id: evicted_id,
        })
        .await
        .unwrap();
    let (_, csr) = new_key_and_csr();
    let err = node_client(&h, Some(&credential))
        .renew_agent(RenewAgentRequest { csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "agent must re-attest");
}
