//! The node API driven by hand, without an agent: join token redemption (single use,
//! races, expiry, malformed tokens), CSR and public key handling, the X509-SVID
//! profile, per-agent authorization and aliases, serial binding across renewal, the
//! `Sync` stream, and the server's TLS identity (SECURITY.md §3.7, §3.9).

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rcgen::PublicKeyData;
use tessera_proto::admin::CreateJoinTokenRequest;
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::node::{
    AttestAgentRequest, AttestationParams, BatchNewX509svidRequest, NewX509svidParams,
    RenewAgentRequest, SyncRequest, SyncResponse, attest_agent_request, x509svid_result,
};
use tessera_tests::Harness;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::support::{
    Credential, SERVER_ID, attest_at, attest_messages_at, attest_raw, attested_agent, ca_der,
    concurrent_attestations, new_key_and_csr, new_x509_svid, node_client, node_client_with,
    node_tls, workload_credential,
};

/// The message of an unknown or spent token (suite `join-token`).
const USED: &str = "does not exist or has already been used";

/// A token that is not in the datastore, and an entry id that does not exist.
const NO_SUCH_ENTRY: &str = "0123456789abcdef0123456789abcdef";

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, fragment: &str) {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(fragment),
        "message {:?} lacks {fragment:?}",
        status.message()
    );
}

fn agent_id_of_token(token: &str) -> String {
    let id = token.split_once('.').unwrap().0;
    format!("spiffe://example.org/tessera/agent/join_token/{id}")
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

fn parse_cert(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

/// Every URI SAN of `cert`.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The per-item error code of a `BatchNewX509SVID` result (panics on an SVID).
fn item_error(result: &x509svid_result::Result) -> (i32, String) {
    match result {
        x509svid_result::Result::Error(err) => (err.code, err.message.clone()),
        x509svid_result::Result::Svid(svid) => panic!("expected an error, got {}", svid.spiffe_id),
    }
}

// ---------------------------------------------------------------------------------------
// Join tokens (§3.9 items 81-84).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_second_use_is_refused() {
    // Item 81.
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let svid = attest_raw(&h, &token, new_key_and_csr().1).await.unwrap();
    assert_eq!(svid.spiffe_id, agent_id_of_token(&token));
    assert_eq!(svid.cert_chain.len(), 1);
    let bundle = svid.bundle.unwrap();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities, vec![ca_der(&h)]);
    assert_status(
        attest_raw(&h, &token, new_key_and_csr().1).await,
        Code::InvalidArgument,
        USED,
    );
    // The secret never comes back in an error.
    let secret = token.split_once('.').unwrap().1;
    let status = attest_raw(&h, &token, new_key_and_csr().1)
        .await
        .unwrap_err();
    assert!(!status.message().contains(secret), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_use_of_one_token_succeeds_once() {
    // Item 82: SPIRE 1.14.6 fixed a TOCTOU here.
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let targets = vec![(h.node_address(), ca_der(&h)); 8];
    let results = concurrent_attestations(targets, &token).await;
    let mut ok = 0;
    for result in results {
        match result {
            Ok(svid) => {
                assert_eq!(svid.spiffe_id, agent_id_of_token(&token));
                ok += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(status.message().contains(USED), "{status:?}");
            }
        }
    }
    assert_eq!(ok, 1, "exactly one attestation wins");
    let agents = h
        .admin()
        .await
        .list_agents(tessera_proto::admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_join_token_is_refused_and_deleted() {
    // Item 83.
    let h = Harness::start().await;
    let token = h
        .admin()
        .await
        .create_join_token(CreateJoinTokenRequest {
            ttl_seconds: 1,
            alias_spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_status(
        attest_raw(&h, &token, new_key_and_csr().1).await,
        Code::InvalidArgument,
        "expired",
    );
    // Deleted on that refusal: now it is simply unknown.
    assert_status(
        attest_raw(&h, &token, new_key_and_csr().1).await,
        Code::InvalidArgument,
        USED,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_join_tokens_are_refused_without_consuming() {
    // Item 84: rejected before any agent ID is built, and nothing is consumed.
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let (id, secret) = token.split_once('.').unwrap();
    let bad: Vec<Vec<u8>> = vec![
        format!("{id}/x.{secret}").into(),
        format!("../{id}.{secret}").into(),
        format!("{id}/../{id}.{secret}").into(),
        format!("{id}..{secret}").into(),
        format!("{id}.{secret}/").into(),
        format!("{id}é.{secret}").into(),
        format!("ıd.{secret}").into(),
        format!("{id}%2F.{secret}").into(),
        format!("{id}.{secret}\n").into(),
        format!(" {id}.{secret}").into(),
        format!("{id}\0.{secret}").into(),
        format!("{}.{secret}", id.to_uppercase()).into(),
        format!("{id}{secret}").into(),
        format!("{id}.{secret}.x").into(),
        format!(".{secret}").into(),
        format!("{id}.").into(),
        Vec::new(),
        vec![0xff, 0xfe, b'.', b'a'],
        format!("{}.{secret}", "a".repeat(65)).into(),
    ];
    for payload in &bad {
        let status = attest_raw(&h, payload, new_key_and_csr().1)
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{:?}: {status:?}",
            String::from_utf8_lossy(payload)
        );
        assert!(
            !status.message().contains(secret),
            "secret echoed: {status:?}"
        );
    }
    // A well-formed guess of the secret is refused like an unknown token, and does not
    // burn the real one.
    let guess = format!("{id}.{}", "0".repeat(secret.len()));
    assert_status(
        attest_raw(&h, &guess, new_key_and_csr().1).await,
        Code::InvalidArgument,
        USED,
    );
    let svid = attest_raw(&h, &token, new_key_and_csr().1).await.unwrap();
    assert_eq!(svid.spiffe_id, agent_id_of_token(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_attestation_type_and_missing_params_are_refused() {
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let (address, ca) = (h.node_address(), ca_der(&h));
    // `x509pop` exists but is not configured on this server: refused like an unknown
    // type (tests/tests/scenarios/x509pop.rs covers a server that has it).
    for kind in ["x509pop", "Join_Token", "join_token ", ""] {
        let message = AttestAgentRequest {
            step: Some(attest_agent_request::Step::Params(AttestationParams {
                r#type: kind.into(),
                payload: token.clone().into_bytes(),
                csr: new_key_and_csr().1,
            })),
        };
        assert_status(
            attest_messages_at(&address, ca.clone(), vec![message]).await,
            Code::InvalidArgument,
            "unsupported node attestation type",
        );
    }
    // First message without parameters: a challenge response, an empty step, nothing.
    let challenge = AttestAgentRequest {
        step: Some(attest_agent_request::Step::ChallengeResponse(b"x".to_vec())),
    };
    assert_status(
        attest_messages_at(&address, ca.clone(), vec![challenge]).await,
        Code::InvalidArgument,
        "attestation parameters",
    );
    assert_status(
        attest_messages_at(
            &address,
            ca.clone(),
            vec![AttestAgentRequest { step: None }],
        )
        .await,
        Code::InvalidArgument,
        "attestation parameters",
    );
    assert_status(
        attest_messages_at(&address, ca.clone(), Vec::new()).await,
        Code::InvalidArgument,
        "empty",
    );
    // None of this consumed the token.
    attest_raw(&h, &token, new_key_and_csr().1).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// CSRs and public keys (§3.7 items 63-67).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_csrs_are_refused_without_consuming_the_token() {
    // Items 63 and 64; the CSR is checked before the token is consumed.
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let (key, csr) = new_key_and_csr();
    let pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let mut trailing = csr.clone();
    trailing.push(0);
    let mut flipped = csr.clone();
    *flipped.last_mut().unwrap() ^= 0x01;
    // A P-521 key: outside the key policy (the CSR itself is well formed).
    let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA256).unwrap();
    let p521_csr = rcgen::CertificateParams::default()
        .serialize_request(&p521)
        .unwrap()
        .der()
        .to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "invalid CSR"),
        ("PEM", pem.into_bytes(), "invalid CSR"),
        ("truncated", csr[..csr.len() - 10].to_vec(), "invalid CSR"),
        ("half", csr[..csr.len() / 2].to_vec(), "invalid CSR"),
        ("trailing byte", trailing, "trailing"),
        ("flipped signature bit", flipped, "signature"),
        ("garbage", vec![0x30, 0x03, 0x02, 0x01, 0x00], "invalid CSR"),
        ("P-521 key", p521_csr, "policy"),
    ];
    for (name, bad, fragment) in cases {
        let status = attest_raw(&h, &token, bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(fragment), "{name}: {status:?}");
    }
    let svid = attest_raw(&h, &token, csr).await.unwrap();
    assert_eq!(svid.spiffe_id, agent_id_of_token(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_fields_other_than_the_key_are_ignored() {
    // Item 65 (CVE-2021-27098): the issued agent SVID takes only the key from the CSR.
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "evil");
    params.subject_alt_names = vec![
        rcgen::SanType::URI("spiffe://example.org/evil".try_into().unwrap()),
        rcgen::SanType::URI("spiffe://example.org/evil2".try_into().unwrap()),
        rcgen::SanType::DnsName("evil.example.org".try_into().unwrap()),
    ];
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05, 0x00],
    )];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    // The CSR really asks for all of it.
    {
        let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
        let asked: Vec<&ParsedExtension<'_>> = parsed.requested_extensions().unwrap().collect();
        assert!(
            asked
                .iter()
                .any(|e| matches!(e, ParsedExtension::BasicConstraints(bc) if bc.ca))
        );
        assert!(asked.iter().any(
            |e| matches!(e, ParsedExtension::SubjectAlternativeName(san) if san.general_names.len() == 3)
        ));
    }
    let svid = attest_raw(&h, &token, csr).await.unwrap();
    let expected = agent_id_of_token(&token);
    assert_eq!(svid.spiffe_id, expected);
    let cert = parse_cert(&svid.cert_chain[0]);
    assert_eq!(uri_sans(&cert), vec![expected.as_str()]);
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names.len(), 1, "no DNS SAN from the CSR: {names:?}");
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    assert_eq!(
        cert.subject().iter().count(),
        0,
        "subject not taken from the CSR"
    );
    assert!(
        cert.extensions()
            .iter()
            .all(|e| e.oid.to_id_string() != "1.3.6.1.4.1.99999.1"),
        "custom extension copied"
    );
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    // Validity from the server's agent_svid_ttl (1 h), not from anything requested.
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, 3600 + 10);
}

fn der_tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = body.len();
    if len < 0x80 {
        out.push(u8::try_from(len).unwrap());
    } else if len < 0x100 {
        out.extend([0x81, u8::try_from(len).unwrap()]);
    } else {
        out.extend([
            0x82,
            u8::try_from(len >> 8).unwrap(),
            u8::try_from(len & 0xff).unwrap(),
        ]);
    }
    out.extend_from_slice(body);
    out
}

/// A syntactically valid RSA SubjectPublicKeyInfo with a `bits`-bit modulus and e=65537.
fn rsa_spki(bits: usize) -> Vec<u8> {
    let mut modulus = vec![0x00, 0xc3];
    modulus.extend(std::iter::repeat_n(0x5a, bits / 8 - 2));
    modulus.push(0x4b);
    let key = der_tlv(
        0x30,
        &[der_tlv(0x02, &modulus), der_tlv(0x02, &[0x01, 0x00, 0x01])].concat(),
    );
    let algorithm = der_tlv(
        0x30,
        &[
            der_tlv(
                0x06,
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            ),
            vec![0x05, 0x00],
        ]
        .concat(),
    );
    der_tlv(
        0x30,
        &[algorithm, der_tlv(0x03, &[&[0u8][..], &key].concat())].concat(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_keys_outside_the_policy_are_refused_per_item() {
    // Item 66: per-item InvalidArgument; good items in the same batch still succeed.
    let h = Harness::start().await;
    let (agent, agent_id) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(&agent_id, "spiffe://example.org/w", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA256)
        .unwrap()
        .subject_public_key_info();
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .subject_public_key_info();
    let mut p256_trailing = p256.clone();
    p256_trailing.push(0);
    // The same P-256 SPKI with its point moved off the curve.
    let mut off_curve = p256.clone();
    let last = off_curve.len() - 1;
    off_curve[last] ^= 0x01;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("RSA-1024", rsa_spki(1024)),
        ("RSA-16384", rsa_spki(16384)),
        ("P-521", p521),
        ("garbage", b"not a key at all".to_vec()),
        ("empty", Vec::new()),
        ("P-256 with a trailing byte", p256_trailing),
        ("P-256 point off the curve", off_curve),
        ("truncated P-256", p256[..p256.len() - 5].to_vec()),
    ];
    let mut params: Vec<NewX509svidParams> = bad
        .iter()
        .map(|(_, key)| NewX509svidParams {
            entry_id: entry.id.clone(),
            public_key: key.clone(),
            template_values: Default::default(),
        })
        .collect();
    params.push(NewX509svidParams {
        entry_id: entry.id.clone(),
        public_key: p256.clone(),
        template_values: Default::default(),
    });
    // Control: the hand-built DER is right; only the size decides.
    params.push(NewX509svidParams {
        entry_id: entry.id.clone(),
        public_key: rsa_spki(2048),
        template_values: Default::default(),
    });
    let mut client = node_client(&h, Some(&agent));
    let started = Instant::now();
    let results = client
        .batch_new_x509svid(BatchNewX509svidRequest { params })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(started.elapsed() < Duration::from_secs(2), "bounded cost");
    assert_eq!(results.len(), bad.len() + 2);
    for ((name, _), result) in bad.iter().zip(&results) {
        let (code, message) = item_error(result.result.as_ref().unwrap());
        assert_eq!(code, Code::InvalidArgument as i32, "{name}: {message}");
        assert!(message.contains("policy"), "{name}: {message}");
    }
    for result in &results[bad.len()..] {
        assert!(
            matches!(result.result, Some(x509svid_result::Result::Svid(_))),
            "{result:?}"
        );
    }
    // More than 1000 items: the call itself is refused.
    let params = (0..1001)
        .map(|_| NewX509svidParams {
            entry_id: entry.id.clone(),
            public_key: Vec::new(),
            template_values: Default::default(),
        })
        .collect();
    assert_status(
        client
            .batch_new_x509svid(BatchNewX509svidRequest { params })
            .await,
        Code::InvalidArgument,
        "at most 1000",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_workload_svid_follows_the_profile() {
    // Item 67; the request carries only a key, ID and TTL come from the entry.
    let h = Harness::start().await;
    let (agent, agent_id) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(
            &agent_id,
            "spiffe://example.org/ns/prod/web",
            &["unix:uid:1"],
            600,
        )
        .await
        .unwrap();
    let mut client = node_client(&h, Some(&agent));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let x509svid_result::Result::Svid(svid) =
        new_x509_svid(&mut client, &entry.id, key.subject_public_key_info())
            .await
            .unwrap()
    else {
        panic!("no SVID")
    };
    let now = unix(SystemTime::now());
    assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/prod/web");
    assert_eq!(svid.cert_chain.len(), 1);
    let ca = ca_der(&h);
    let ca_cert = parse_cert(&ca);
    let cert = parse_cert(&svid.cert_chain[0]);

    assert_eq!(uri_sans(&cert), vec!["spiffe://example.org/ns/prod/web"]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(san.critical, "SAN critical with an empty subject");
    assert_eq!(san.value.general_names.len(), 1);
    assert_eq!(cert.subject().iter().count(), 0);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert_eq!(ku.value.flags, 1, "digitalSignature only: {}", ku.value);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any, "{eku:?}");
    assert!(eku.other.is_empty() && !eku.code_signing && !eku.ocsp_signing);

    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert!(not_before <= now, "NotBefore in the past");
    assert!(
        now - not_before <= 10 + 2,
        "backdated at most 10 s: {}",
        now - not_before
    );
    assert!(not_after <= ca_cert.validity().not_after.timestamp());
    assert_eq!(not_after - not_before, 600 + 10, "TTL from the entry");
    assert_eq!(svid.expires_at, not_after);

    assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    // A random positive serial (127 random bits, so leading zero bytes may go).
    let serial = cert.raw_serial().to_vec();
    assert!((8..=17).contains(&serial.len()), "{serial:02x?}");
    assert_eq!(serial[0] & 0x80, 0, "positive");

    // An entry without TTL gets the server default (1 h).
    let default = h
        .create_entry(
            &agent_id,
            "spiffe://example.org/ns/prod/db",
            &["unix:uid:1"],
            0,
        )
        .await
        .unwrap();
    let credential = workload_credential(&mut client, &default.id).await;
    let cert = parse_cert(&credential.chain[0]);
    assert_eq!(
        cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
        3600 + 10
    );
    assert_ne!(cert.raw_serial(), serial.as_slice());
}

// ---------------------------------------------------------------------------------------
// Authorization (§3.9 item 93, aliases, workload SVIDs, missing certificates).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_another_agent_are_not_found_like_nonexistent_ones() {
    // Item 93.
    let h = Harness::start().await;
    let (a, a_id) = attested_agent(&h, None).await;
    let (b, _) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(&a_id, "spiffe://example.org/a-only", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let spki = || {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .subject_public_key_info()
    };
    let mut as_b = node_client(&h, Some(&b));
    let theirs = item_error(&new_x509_svid(&mut as_b, &entry.id, spki()).await.unwrap());
    let missing = item_error(
        &new_x509_svid(&mut as_b, NO_SUCH_ENTRY, spki())
            .await
            .unwrap(),
    );
    assert_eq!(theirs.0, Code::NotFound as i32);
    assert_eq!(theirs, missing, "indistinguishable from a nonexistent id");
    assert!(theirs.1.contains("not found"), "{theirs:?}");
    // Even with a key that would fail the policy, "not yours" answers first.
    let theirs_bad_key = item_error(
        &new_x509_svid(&mut as_b, &entry.id, Vec::new())
            .await
            .unwrap(),
    );
    assert_eq!(theirs_bad_key, missing);
    // The owner gets it.
    let mut as_a = node_client(&h, Some(&a));
    let credential = workload_credential(&mut as_a, &entry.id).await;
    assert_eq!(
        uri_sans(&parse_cert(&credential.chain[0])),
        vec!["spiffe://example.org/a-only"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_entries_are_served_to_the_agent_holding_the_alias() {
    // `token generate --spiffe-id ALIAS`.
    let h = Harness::start().await;
    let alias = "spiffe://example.org/node/alias";
    // Aliases are validated when the token is made.
    for bad in [
        "spiffe://example.org",
        "spiffe://example.org/tessera/x",
        "spiffe://example.org/tessera",
        "spiffe://other.org/node/alias",
        "spiffe://example.org/node/../alias",
        "spiffe://Example.org/node/alias",
        "node/alias",
    ] {
        assert_status(
            h.admin()
                .await
                .create_join_token(CreateJoinTokenRequest {
                    ttl_seconds: 0,
                    alias_spiffe_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
            "",
        );
    }
    let (with_alias, _) = attested_agent(&h, Some(alias)).await;
    let (without, _) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(alias, "spiffe://example.org/via-alias", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let mut client = node_client(&h, Some(&with_alias));
    let credential = workload_credential(&mut client, &entry.id).await;
    assert_eq!(
        uri_sans(&parse_cert(&credential.chain[0])),
        vec!["spiffe://example.org/via-alias"]
    );
    // The alias is in its Sync snapshot too.
    let mut stream = client
        .sync(SyncRequest { since_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let snapshot = stream.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot);
    assert_eq!(entry_ids(&snapshot), vec![entry.id.clone()]);
    // Another agent does not hold the alias.
    let mut other = node_client(&h, Some(&without));
    let spki = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .subject_public_key_info();
    let (code, _) = item_error(&new_x509_svid(&mut other, &entry.id, spki).await.unwrap());
    assert_eq!(code, Code::NotFound as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_svid_cannot_use_the_node_api() {
    let h = Harness::start().await;
    let (agent, agent_id) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(&agent_id, "spiffe://example.org/w", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let workload = workload_credential(&mut node_client(&h, Some(&agent)), &entry.id).await;
    let mut client = node_client(&h, Some(&workload));
    let fragment = "not an agent identity";
    assert_status(
        client.sync(SyncRequest { since_revision: 0 }).await,
        Code::PermissionDenied,
        fragment,
    );
    assert_status(
        client
            .batch_new_x509svid(BatchNewX509svidRequest {
                params: vec![NewX509svidParams {
                    entry_id: entry.id.clone(),
                    public_key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                        .unwrap()
                        .subject_public_key_info(),
                    template_values: Default::default(),
                }],
            })
            .await,
        Code::PermissionDenied,
        fragment,
    );
    assert_status(
        client
            .renew_agent(RenewAgentRequest {
                csr: new_key_and_csr().1,
            })
            .await,
        Code::PermissionDenied,
        fragment,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_is_unauthenticated() {
    let h = Harness::start().await;
    let mut client = node_client(&h, None);
    assert_status(
        client.sync(SyncRequest { since_revision: 0 }).await,
        Code::Unauthenticated,
        "agent SVID is required",
    );
    assert_status(
        client
            .batch_new_x509svid(BatchNewX509svidRequest { params: Vec::new() })
            .await,
        Code::Unauthenticated,
        "agent SVID is required",
    );
    assert_status(
        client
            .renew_agent(RenewAgentRequest {
                csr: new_key_and_csr().1,
            })
            .await,
        Code::Unauthenticated,
        "agent SVID is required",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_at_the_handshake() {
    // A self-signed "agent SVID" with the right URI SAN: the chain does not reach the
    // bundle, so the TLS handshake fails and no call gets through.
    let h = Harness::start().await;
    let (_, agent_id) = attested_agent(&h, None).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(agent_id.as_str().try_into().unwrap())];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = Credential {
        chain: vec![params.self_signed(&key).unwrap().der().to_vec()],
        pkcs8: key.serialize_der(),
    };
    for _ in 0..3 {
        let status = node_client(&h, Some(&forged))
            .sync(SyncRequest { since_revision: 0 })
            .await
            .unwrap_err();
        // TLS 1.3 reports the refused client certificate after the client's side of the
        // handshake, so the call fails as a transport error (Unknown, Cancelled or
        // Unavailable by timing), never with a handler's answer.
        assert!(
            matches!(
                status.code(),
                Code::Unknown | Code::Cancelled | Code::Unavailable
            ),
            "{status:?}"
        );
        assert!(
            status
                .source()
                .is_some_and(|s| s.is::<tonic::transport::Error>()),
            "a transport failure: {status:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Renewal and serial binding (§3.9 item 91).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_retires_the_old_serial_after_first_use_of_the_new() {
    let h = Harness::start().await;
    let (old, agent_id) = attested_agent(&h, None).await;
    let entry = h
        .create_entry(&agent_id, "spiffe://example.org/w", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let old_serial = tessera_plugin_sdk::x509::serial_of_certificate(&old.chain[0]).unwrap();
    // A bad CSR changes nothing.
    assert_status(
        node_client(&h, Some(&old))
            .renew_agent(RenewAgentRequest { csr: Vec::new() })
            .await,
        Code::InvalidArgument,
        "invalid CSR",
    );
    let (new_key, csr) = new_key_and_csr();
    let renewed = node_client(&h, Some(&old))
        .renew_agent(RenewAgentRequest { csr })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    assert_eq!(renewed.spiffe_id, agent_id);
    let info = tessera_plugin_sdk::x509::leaf_info(&renewed.cert_chain[0]).unwrap();
    assert_eq!(info.spiffe_id.as_str(), agent_id);
    assert_ne!(info.serial_hex, old_serial, "a new serial");
    assert_eq!(
        parse_cert(&renewed.cert_chain[0]).public_key().raw,
        new_key.subject_public_key_info().as_slice()
    );
    let new = Credential {
        chain: renewed.cert_chain,
        pkcs8: new_key.serialize_der(),
    };
    // Until the new certificate is used, the old one still works (crash mid-renewal).
    workload_credential(&mut node_client(&h, Some(&old)), &entry.id).await;
    // First use of the new certificate retires the old one.
    workload_credential(&mut node_client(&h, Some(&new)), &entry.id).await;
    let mut stale = node_client(&h, Some(&old));
    assert_status(
        stale.sync(SyncRequest { since_revision: 0 }).await,
        Code::PermissionDenied,
        "no longer active",
    );
    assert_status(
        stale
            .renew_agent(RenewAgentRequest {
                csr: new_key_and_csr().1,
            })
            .await,
        Code::PermissionDenied,
        "no longer active",
    );
    // The agent list shows the new serial.
    let agents = h
        .admin()
        .await
        .list_agents(tessera_proto::admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let listed = agents.iter().find(|a| a.spiffe_id == agent_id).unwrap();
    assert_eq!(listed.serial, info.serial_hex);
    // And the new one keeps working.
    workload_credential(&mut node_client(&h, Some(&new)), &entry.id).await;
}

// ---------------------------------------------------------------------------------------
// Sync.

fn entry_ids(message: &SyncResponse) -> Vec<String> {
    let mut ids: Vec<String> = message.entries.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    ids
}

/// The next `Sync` message that carries entries or deletions, within `limit`; returns
/// it and the revision of the last message read.
async fn next_change(stream: &mut tonic::Streaming<SyncResponse>, limit: Duration) -> SyncResponse {
    tokio::time::timeout(limit, async {
        loop {
            let message = stream.message().await.unwrap().expect("stream open");
            if !message.entries.is_empty() || !message.deleted_entry_ids.is_empty() {
                return message;
            }
        }
    })
    .await
    .expect("a change within the limit")
}

async fn open_sync(
    client: &mut NodeClient<Channel>,
    since_revision: u64,
) -> tonic::Streaming<SyncResponse> {
    client
        .sync(SyncRequest { since_revision })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_a_snapshot_then_deltas_and_resumes_from_a_revision() {
    let h = Harness::start().await;
    let (a, a_id) = attested_agent(&h, None).await;
    let (_, b_id) = attested_agent(&h, None).await;
    let first = h
        .create_entry(&a_id, "spiffe://example.org/one", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let second = h
        .create_entry(&a_id, "spiffe://example.org/two", &["unix:uid:2"], 0)
        .await
        .unwrap();
    h.create_entry(&b_id, "spiffe://example.org/b", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let mut client = node_client(&h, Some(&a));
    let mut stream = open_sync(&mut client, 0).await;

    // Snapshot: this agent's entries (not B's) and the bundle.
    let snapshot = stream.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot);
    let mut expected = vec![first.id.clone(), second.id.clone()];
    expected.sort();
    assert_eq!(entry_ids(&snapshot), expected);
    assert!(snapshot.deleted_entry_ids.is_empty());
    let bundle = snapshot.bundle.clone().unwrap();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities, vec![ca_der(&h)]);
    assert!(snapshot.revision > 0);

    // A new entry arrives as a delta within 1 s.
    let started = Instant::now();
    let third = h
        .create_entry(&a_id, "spiffe://example.org/three", &["unix:uid:3"], 0)
        .await
        .unwrap();
    let delta = next_change(&mut stream, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!delta.snapshot);
    assert_eq!(entry_ids(&delta), vec![third.id.clone()]);
    assert_eq!(delta.entries[0].spiffe_id, "spiffe://example.org/three");
    assert!(delta.revision > snapshot.revision);

    // A deletion arrives as deleted_entry_ids.
    h.admin()
        .await
        .delete_entry(tessera_proto::admin::DeleteEntryRequest {
            id: second.id.clone(),
        })
        .await
        .unwrap();
    let deletion = next_change(&mut stream, Duration::from_secs(1)).await;
    assert!(!deletion.snapshot);
    assert!(deletion.entries.is_empty());
    assert_eq!(deletion.deleted_entry_ids, vec![second.id.clone()]);
    let last_revision = deletion.revision;
    drop(stream);
    drop(client);

    // While disconnected, one more entry; reconnecting from the last revision brings
    // only that.
    let fourth = h
        .create_entry(&a_id, "spiffe://example.org/four", &["unix:uid:4"], 0)
        .await
        .unwrap();
    let mut client = node_client(&h, Some(&a));
    let mut stream = open_sync(&mut client, last_revision).await;
    let resumed = tokio::time::timeout(Duration::from_secs(1), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!resumed.snapshot, "a delta, not a snapshot");
    assert_eq!(entry_ids(&resumed), vec![fourth.id.clone()]);
    assert!(resumed.deleted_entry_ids.is_empty());
    assert!(resumed.revision > last_revision);
    drop(stream);

    // A revision the server never handed out (its datastore restored from a backup):
    // a snapshot, never a silent "nothing changed".
    for since in [resumed.revision + 1000, u64::MAX] {
        let mut stream = open_sync(&mut client, since).await;
        let message = stream.message().await.unwrap().unwrap();
        assert!(message.snapshot, "since {since}: {message:?}");
        let mut expected = vec![first.id.clone(), third.id.clone(), fourth.id.clone()];
        expected.sort();
        assert_eq!(entry_ids(&message), expected);
        assert!(message.bundle.is_some());
        assert!(message.revision <= resumed.revision);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_does_not_reveal_other_agents_entry_ids() {
    let h = Harness::start().await;
    let (a, a_id) = attested_agent(&h, None).await;
    let (_, b_id) = attested_agent(&h, None).await;
    let mut client = node_client(&h, Some(&a));
    let mut stream = open_sync(&mut client, 0).await;
    let snapshot = stream.message().await.unwrap().unwrap();
    assert!(snapshot.snapshot);
    let theirs = h
        .create_entry(&b_id, "spiffe://example.org/b", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let mine = h
        .create_entry(&a_id, "spiffe://example.org/a", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let message = stream.message().await.unwrap().unwrap();
            seen.extend(message.deleted_entry_ids.iter().cloned());
            seen.extend(message.entries.iter().map(|e| e.id.clone()));
            if message.entries.iter().any(|e| e.id == mine.id) {
                break;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !seen.contains(&theirs.id),
        "agent A learned the id of agent B's entry: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The server's TLS identity.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_must_present_the_expected_server_id() {
    let h = Harness::start().await;
    let token = h.join_token(None).await;
    // An agent expecting another ID refuses the server; the token stays unused.
    let config = node_tls(ca_der(&h), None, "spiffe://example.org/tessera/other");
    let mut client = node_client_with(&h.node_address(), config);
    let status = client
        .attest_agent(futures::stream::iter(vec![
            crate::support::join_token_params(token.as_bytes(), new_key_and_csr().1),
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // An agent trusting another CA refuses it too.
    let other_ca = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    };
    let status = attest_at(
        &h.node_address(),
        other_ca,
        token.as_bytes(),
        new_key_and_csr().1,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // With the right ID and CA it works, so the token was never redeemed above.
    let config = node_tls(ca_der(&h), None, SERVER_ID);
    let mut client = node_client_with(&h.node_address(), config);
    let mut stream = client
        .attest_agent(futures::stream::iter(vec![
            crate::support::join_token_params(token.as_bytes(), new_key_and_csr().1),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
}

/// A client session store that records what the server offered for resumption.
#[derive(Debug, Default)]
struct RecordingStore {
    inner: Option<Arc<rustls::client::ClientSessionMemoryCache>>,
    tickets: AtomicUsize,
    kx_hints: AtomicUsize,
}

impl rustls::client::ClientSessionStore for RecordingStore {
    fn set_kx_hint(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.kx_hints.fetch_add(1, Ordering::SeqCst);
        if let Some(inner) = &self.inner {
            inner.set_kx_hint(server_name, group);
        }
    }

    fn kx_hint(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::NamedGroup> {
        self.inner
            .as_ref()
            .and_then(|inner| inner.kx_hint(server_name))
    }

    fn set_tls12_session(
        &self,
        _server_name: rustls::pki_types::ServerName<'static>,
        _value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
    }

    fn tls12_session(
        &self,
        _server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &rustls::pki_types::ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        if let Some(inner) = &self.inner {
            inner.insert_tls13_ticket(server_name, value);
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner
            .as_ref()
            .and_then(|inner| inner.take_tls13_ticket(server_name))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_issues_no_session_tickets() {
    // §2 rule 9 / item 95: with resumption enabled on the client, the server still
    // offers nothing to resume, so every handshake re-validates the agent certificate.
    let h = Harness::start().await;
    let (agent, agent_id) = attested_agent(&h, None).await;
    h.create_entry(&agent_id, "spiffe://example.org/w", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let store = Arc::new(RecordingStore {
        inner: Some(Arc::new(rustls::client::ClientSessionMemoryCache::new(8))),
        ..RecordingStore::default()
    });
    for _ in 0..2 {
        let mut config = node_tls(ca_der(&h), Some(&agent), SERVER_ID);
        config.resumption = rustls::client::Resumption::store(Arc::clone(&store) as _);
        let mut client = node_client_with(&h.node_address(), config);
        // A streamed answer, so the client reads whatever the server sent after the
        // handshake (where TLS 1.3 tickets would be).
        let mut stream = open_sync(&mut client, 0).await;
        assert!(stream.message().await.unwrap().unwrap().snapshot);
    }
    assert!(
        store.kx_hints.load(Ordering::SeqCst) >= 1,
        "the store was in use"
    );
    assert_eq!(
        store.tickets.load(Ordering::SeqCst),
        0,
        "no session tickets"
    );
}
