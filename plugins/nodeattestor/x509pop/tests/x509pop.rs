//! End-to-end tests of the x509pop agent and server halves with rcgen-made PKIs
//! (SECURITY.md §3.9 items 85-87).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test helpers: a failed step is a failed test"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, RsaKeySize, SerialNumber,
    SubjectPublicKeyInfo, date_time_ymd,
};
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_x509pop::{
    AgentCredentials, AgentError, AttestationError, ConfigError, Limits, X509PopVerifier,
};

/// 2024-06-01T00:00:00Z: inside every default validity period below.
const NOW: u64 = 1_717_200_000;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

struct Issued {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

impl Issued {
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2040, 1, 1);
    p
}

fn leaf_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = name(cn);
    p.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x0a, 0xbc]));
    p.not_before = date_time_ymd(2024, 1, 1);
    p.not_after = date_time_ymd(2025, 1, 1);
    p
}

fn root(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(cn);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Issued { params, key, der }
}

fn issue(params: CertificateParams, key: KeyPair, by: &Issued) -> Issued {
    let der = params.signed_by(&key, &by.issuer()).unwrap().der().to_vec();
    Issued { params, key, der }
}

fn intermediate(cn: &str, by: &Issued) -> Issued {
    issue(ca_params(cn), KeyPair::generate().unwrap(), by)
}

fn new_leaf(cn: &str, by: &Issued) -> Issued {
    issue(leaf_params(cn), KeyPair::generate().unwrap(), by)
}

fn pem_chain(ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

/// Writes the chain and key into a fresh 0700 directory (key 0600).
fn write_credentials(chain: &[&[u8]], key_pem: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("agent.crt");
    let key = dir.path().join("agent.key");
    std::fs::write(&cert, pem_chain(chain)).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir, cert, key)
}

struct Agent {
    _dir: tempfile::TempDir,
    creds: AgentCredentials,
}

fn agent(leaf: &Issued, chain_after_leaf: &[&Issued]) -> Agent {
    let mut ders: Vec<&[u8]> = vec![&leaf.der];
    ders.extend(chain_after_leaf.iter().map(|c| c.der.as_slice()));
    let (dir, cert, key) = write_credentials(&ders, &leaf.key.serialize_pem());
    Agent {
        creds: AgentCredentials::load(&cert, &key).unwrap(),
        _dir: dir,
    }
}

fn verifier(cas: &[&Issued]) -> X509PopVerifier {
    verifier_with(cas, Limits::default())
}

fn verifier_with(cas: &[&Issued], limits: Limits) -> X509PopVerifier {
    X509PopVerifier::new(cas.iter().map(|c| c.der.clone()).collect(), limits).unwrap()
}

fn payload_of(ders: &[&[u8]]) -> Vec<u8> {
    let certs: Vec<String> = ders.iter().map(|d| STANDARD.encode(d)).collect();
    serde_json::to_vec(&serde_json::json!({ "certificates": certs })).unwrap()
}

fn tbs_fingerprint(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    hex_sha256(cert.tbs_certificate.as_ref())
}

#[test]
fn success_with_intermediate_gives_id_and_selectors() {
    let root = root("Root CA");
    let inter = intermediate("Issuing CA", &root);
    let leaf = new_leaf("node-1.example.org", &inter);
    let agent = agent(&leaf, &[&inter]);
    let v = verifier(&[&root]);

    let candidate = v
        .verify_payload(&agent.creds.attestation_payload(), at(NOW))
        .unwrap();
    let challenge = v.challenge();
    let response = agent.creds.respond(challenge.encoded()).unwrap();
    let node = v.verify_response(&candidate, challenge, &response).unwrap();

    let fp = tbs_fingerprint(&leaf.der);
    assert_eq!(node.fingerprint(), fp);
    assert_eq!(agent.creds.fingerprint(), fp);
    assert_eq!(candidate.fingerprint(), fp);
    assert_eq!(
        node.agent_path_segments(),
        ["tessera", "agent", "x509pop", fp.as_str()]
    );
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(
        node.agent_id(&td).unwrap().as_str(),
        format!("spiffe://example.org/tessera/agent/x509pop/{fp}")
    );
    let selectors: Vec<String> = node.selectors().iter().map(ToString::to_string).collect();
    assert_eq!(
        selectors,
        vec![
            "x509pop:subject:cn:node-1.example.org".to_owned(),
            format!("x509pop:ca:fingerprint:{}", hex_sha256(&inter.der)),
            format!("x509pop:ca:fingerprint:{}", hex_sha256(&root.der)),
            "x509pop:serialnumber:0abc".to_owned(),
        ]
    );
    assert_eq!(candidate.selectors(), node.selectors());
    assert_eq!(
        node.certificate_not_after(),
        at(1_735_689_600) // 2025-01-01
    );
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf.der).unwrap();
    assert_eq!(candidate.public_key_spki(), parsed.public_key().raw);
}

#[test]
fn p384_and_rsa_leaves_succeed() {
    let root = root("Root CA");
    let keys = [
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap(),
    ];
    let v = verifier(&[&root]);
    for key in keys {
        let leaf = issue(leaf_params("n"), key, &root);
        let agent = agent(&leaf, &[]);
        let candidate = v
            .verify_payload(&agent.creds.attestation_payload(), at(NOW))
            .unwrap();
        let challenge = v.challenge();
        let response = agent.creds.respond(challenge.encoded()).unwrap();
        let node = v.verify_response(&candidate, challenge, &response).unwrap();
        assert_eq!(node.fingerprint(), tbs_fingerprint(&leaf.der));
    }
}

/// Item 85: a response recorded in one session does not verify in another (the nonce
/// differs), and a stale challenge is refused.
#[test]
fn s85_replayed_response_and_stale_nonce_rejected() {
    let root = root("Root CA");
    let leaf = new_leaf("n", &root);
    let agent = agent(&leaf, &[]);
    let v = verifier(&[&root]);
    let payload = agent.creds.attestation_payload();

    let first = v.verify_payload(&payload, at(NOW)).unwrap();
    let c1 = v.challenge();
    let recorded = agent.creds.respond(c1.encoded()).unwrap();
    v.verify_response(&first, c1, &recorded).unwrap();

    // A second session with the same payload: the recorded response is refused.
    let second = v.verify_payload(&payload, at(NOW)).unwrap();
    let c2 = v.challenge();
    assert_ne!(c2.encoded(), recorded.as_slice());
    assert_eq!(
        v.verify_response(&second, c2, &recorded),
        Err(AttestationError::BadSignature)
    );

    // Two sessions in flight: answers swapped between them fail both ways.
    let (ca, cb) = (v.challenge(), v.challenge());
    assert_ne!(ca.encoded(), cb.encoded());
    let ra = agent.creds.respond(ca.encoded()).unwrap();
    let rb = agent.creds.respond(cb.encoded()).unwrap();
    assert_eq!(
        v.verify_response(&second, ca, &rb),
        Err(AttestationError::BadSignature)
    );
    assert_eq!(
        v.verify_response(&second, cb, &ra),
        Err(AttestationError::BadSignature)
    );

    // Stale: a challenge answered after the timeout.
    let v = verifier_with(
        &[&root],
        Limits::default().with_challenge_timeout(Duration::from_millis(1)),
    );
    let c = v.challenge();
    let r = agent.creds.respond(c.encoded()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        v.verify_response(&second, c, &r),
        Err(AttestationError::ChallengeExpired)
    );
}

#[test]
fn response_from_another_key_rejected() {
    let root = root("Root CA");
    let honest_leaf = new_leaf("a", &root);
    let honest = agent(&honest_leaf, &[]);
    let other = agent(&new_leaf("b", &root), &[]);
    let v = verifier(&[&root]);
    let candidate = v
        .verify_payload(&honest.creds.attestation_payload(), at(NOW))
        .unwrap();
    let challenge = v.challenge();
    let forged = other.creds.respond(challenge.encoded()).unwrap();
    assert_eq!(
        v.verify_response(&candidate, challenge, &forged),
        Err(AttestationError::BadSignature)
    );

    // The right key, but an answer bound to another certificate of that key: the leaf
    // digest in the signed message differs, so it does not verify either.
    let same_key = KeyPair::from_pem(&honest_leaf.key.serialize_pem()).unwrap();
    let reissued = issue(leaf_params("a2"), same_key, &root);
    let candidate = v
        .verify_payload(&payload_of(&[&reissued.der]), at(NOW))
        .unwrap();
    let challenge = v.challenge();
    let wrong_leaf = honest.creds.respond(challenge.encoded()).unwrap();
    assert_eq!(
        v.verify_response(&candidate, challenge, &wrong_leaf),
        Err(AttestationError::BadSignature)
    );

    for bad in [
        &b""[..],
        b"{}",
        b"{\"signature\":\"!!\"}",
        b"{\"signature\":\"AAAA\"}",
    ] {
        let challenge = v.challenge();
        let err = v.verify_response(&candidate, challenge, bad).unwrap_err();
        assert!(
            matches!(
                err,
                AttestationError::ResponseMalformed | AttestationError::BadSignature
            ),
            "{err:?}"
        );
    }
}

#[test]
fn chain_to_unknown_ca_rejected() {
    let trusted = root("Trusted CA");
    let other = root("Other CA");
    let inter = intermediate("Other Issuing", &other);
    let leaf = new_leaf("n", &inter);
    let v = verifier(&[&trusted]);
    assert_eq!(
        v.verify_payload(&payload_of(&[&leaf.der, &inter.der]), at(NOW))
            .unwrap_err(),
        AttestationError::UnknownIssuer
    );
    // Sending the untrusted root along does not help.
    assert_eq!(
        v.verify_payload(&payload_of(&[&leaf.der, &inter.der, &other.der]), at(NOW))
            .unwrap_err(),
        AttestationError::UnknownIssuer
    );
    // A leaf signed by a key that merely claims the trusted CA's name.
    let impostor = Issued {
        params: ca_params("Trusted CA"),
        key: KeyPair::generate().unwrap(),
        der: Vec::new(),
    };
    let forged = new_leaf("n", &impostor);
    let err = v
        .verify_payload(&payload_of(&[&forged.der]), at(NOW))
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestationError::UnknownIssuer | AttestationError::ChainRejected { .. }
        ),
        "{err:?}"
    );
}

/// Item 86: more than `max_intermediates` certificates after the leaf are refused by
/// counting, before any certificate is even decoded.
#[test]
fn s86_too_many_intermediates_refused_before_any_work() {
    let root = root("Root CA");
    let mut chain = vec![intermediate("I1", &root)];
    for i in 2..=5 {
        let next = intermediate(&format!("I{i}"), chain.last().unwrap());
        chain.push(next);
    }
    let leaf = new_leaf("n", chain.last().unwrap());
    let mut ders: Vec<&[u8]> = vec![&leaf.der];
    ders.extend(chain.iter().rev().map(|c| c.der.as_slice()));
    let payload = payload_of(&ders);

    let v = verifier(&[&root]);
    assert_eq!(
        v.verify_payload(&payload, at(NOW)).unwrap_err(),
        AttestationError::TooManyIntermediates { max: 4 }
    );
    // The same chain verifies when the cap allows it: the count is what refused it.
    let v5 = verifier_with(&[&root], Limits::default().with_max_intermediates(5));
    v5.verify_payload(&payload, at(NOW)).unwrap();

    // Garbage that is not even base64 DER: still refused by the count alone.
    let garbage = br#"{"certificates":["!","!","!","!","!","!"]}"#;
    assert_eq!(
        v.verify_payload(garbage, at(NOW)).unwrap_err(),
        AttestationError::TooManyIntermediates { max: 4 }
    );
    let v0 = verifier_with(&[&root], Limits::default().with_max_intermediates(0));
    assert_eq!(
        v0.verify_payload(&payload_of(&[&leaf.der, &chain[4].der]), at(NOW))
            .unwrap_err(),
        AttestationError::TooManyIntermediates { max: 0 }
    );
}

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![u8::try_from(len).unwrap()]
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let mut out = vec![0x80 | u8::try_from(bytes.len()).unwrap()];
        out.extend(bytes);
        out
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_len(content.len()));
    out.extend_from_slice(content);
    out
}

/// A DER SubjectPublicKeyInfo of an RSA key whose modulus has exactly `bits` bits (all
/// ones: odd, never used for arithmetic since it is refused first).
fn synthetic_rsa_spki(bits: usize) -> Vec<u8> {
    let mut modulus = vec![0x00];
    modulus.extend(vec![0xff; bits / 8]);
    let mut rsa = tlv(0x02, &modulus);
    rsa.extend(tlv(0x02, &[0x01, 0x00, 0x01]));
    let rsa = tlv(0x30, &rsa);
    let mut alg = tlv(
        0x06,
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
    );
    alg.extend([0x05, 0x00]);
    let mut bit_string = vec![0x00];
    bit_string.extend(rsa);
    let mut spki = tlv(0x30, &alg);
    spki.extend(tlv(0x03, &bit_string));
    tlv(0x30, &spki)
}

fn cert_with_spki(params: CertificateParams, spki: &[u8], by: &Issued) -> Vec<u8> {
    let public = SubjectPublicKeyInfo::from_der(spki).unwrap();
    assert_eq!(public.subject_public_key_info(), spki);
    params
        .signed_by(&public, &by.issuer())
        .unwrap()
        .der()
        .to_vec()
}

/// Item 86: a 16384-bit RSA key anywhere in the chain is refused from its length alone,
/// before the chain is verified (the verifier trusts an unrelated CA, and the answer is
/// still the key size, not the unknown issuer), and quickly.
#[test]
fn s86_big_rsa_key_refused_cheaply() {
    let root = root("Root CA");
    let unrelated = root_unrelated();
    let big = synthetic_rsa_spki(16384);
    let big_leaf = cert_with_spki(leaf_params("n"), &big, &root);
    let v = verifier(&[&unrelated]);

    let payload = payload_of(&[&big_leaf]);
    let start = Instant::now();
    let err = v.verify_payload(&payload, at(NOW)).unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(
        err,
        AttestationError::RsaKeyTooLarge {
            index: 0,
            max_bits: 8192
        }
    );
    assert!(elapsed < Duration::from_millis(50), "{elapsed:?}");

    // A big key in an intermediate: refused by position, also before verification.
    let big_inter = cert_with_spki(ca_params("Big"), &big, &root);
    let small_leaf = new_leaf("n", &root);
    let start = Instant::now();
    let err = v
        .verify_payload(&payload_of(&[&small_leaf.der, &big_inter]), at(NOW))
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(50));
    assert_eq!(
        err,
        AttestationError::RsaKeyTooLarge {
            index: 1,
            max_bits: 8192
        }
    );

    // The cap is configurable: a 3072-bit key over a 2048-bit cap.
    let v2048 = verifier_with(&[&root], Limits::default().with_max_rsa_key_size(2048));
    let leaf3072 = cert_with_spki(leaf_params("n"), &synthetic_rsa_spki(3072), &root);
    assert_eq!(
        v2048
            .verify_payload(&payload_of(&[&leaf3072]), at(NOW))
            .unwrap_err(),
        AttestationError::RsaKeyTooLarge {
            index: 0,
            max_bits: 2048
        }
    );
    // And at exactly the cap the size check passes (the key is then used normally).
    let leaf2048 = cert_with_spki(leaf_params("n"), &synthetic_rsa_spki(2048), &root);
    v2048
        .verify_payload(&payload_of(&[&leaf2048]), at(NOW))
        .unwrap();
}

fn root_unrelated() -> Issued {
    root("Unrelated CA")
}

#[test]
fn expired_or_not_yet_valid_rejected() {
    let root = root("Root CA");
    let leaf = new_leaf("n", &root);
    let v = verifier(&[&root]);
    let payload = payload_of(&[&leaf.der]);
    for when in [1_767_225_600 /* 2026 */, 1_672_531_200 /* 2023 */] {
        assert_eq!(
            v.verify_payload(&payload, at(when)).unwrap_err(),
            AttestationError::NotValidNow
        );
    }
    // An expired configured root (webpki does not check anchors' validity; we do).
    let mut old = ca_params("Old Root");
    old.not_before = date_time_ymd(2020, 1, 1);
    old.not_after = date_time_ymd(2023, 1, 1);
    let key = KeyPair::generate().unwrap();
    let old_der = old.self_signed(&key).unwrap().der().to_vec();
    let old_root = Issued {
        params: old,
        key,
        der: old_der,
    };
    let leaf = new_leaf("n", &old_root);
    assert_eq!(
        verifier(&[&old_root])
            .verify_payload(&payload_of(&[&leaf.der]), at(NOW))
            .unwrap_err(),
        AttestationError::NotValidNow
    );
}

#[test]
fn leaf_must_be_a_signing_end_entity() {
    let root = root("Root CA");
    let v = verifier(&[&root]);

    let mut ca_leaf = leaf_params("n");
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_leaf = issue(ca_leaf, KeyPair::generate().unwrap(), &root);
    assert_eq!(
        v.verify_payload(&payload_of(&[&ca_leaf.der]), at(NOW))
            .unwrap_err(),
        AttestationError::LeafIsCa
    );

    // CA=false stated explicitly is fine.
    let mut explicit = leaf_params("n");
    explicit.is_ca = IsCa::ExplicitNoCa;
    let explicit = issue(explicit, KeyPair::generate().unwrap(), &root);
    v.verify_payload(&payload_of(&[&explicit.der]), at(NOW))
        .unwrap();

    let mut no_sign = leaf_params("n");
    no_sign.key_usages = vec![KeyUsagePurpose::KeyAgreement];
    let no_sign = issue(no_sign, KeyPair::generate().unwrap(), &root);
    assert_eq!(
        v.verify_payload(&payload_of(&[&no_sign.der]), at(NOW))
            .unwrap_err(),
        AttestationError::LeafKeyUsage
    );

    let mut server_only = leaf_params("n");
    server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_only = issue(server_only, KeyPair::generate().unwrap(), &root);
    assert!(matches!(
        v.verify_payload(&payload_of(&[&server_only.der]), at(NOW))
            .unwrap_err(),
        AttestationError::ChainRejected { .. }
    ));

    let mut client = leaf_params("n");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = issue(client, KeyPair::generate().unwrap(), &root);
    v.verify_payload(&payload_of(&[&client.der]), at(NOW))
        .unwrap();

    let ed = issue(
        leaf_params("n"),
        KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        &root,
    );
    assert_eq!(
        v.verify_payload(&payload_of(&[&ed.der]), at(NOW))
            .unwrap_err(),
        AttestationError::UnsupportedLeafKey
    );
}

/// Replaces the ECDSA P-256 signature (r, s) of `der` with (r, n - s): a different DER
/// encoding of the same certificate, which still verifies.
fn malleate_p256_signature(der: &[u8]) -> Vec<u8> {
    fn split(b: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
        let tag = b[0];
        let (len, hl) = if b[1] < 0x80 {
            (usize::from(b[1]), 2)
        } else {
            let n = usize::from(b[1] & 0x7f);
            let len = b[2..2 + n]
                .iter()
                .fold(0usize, |acc, x| acc << 8 | usize::from(*x));
            (len, 2 + n)
        };
        (tag, &b[hl..hl + len], &b[..hl + len], &b[hl + len..])
    }
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let (_, outer, _, _) = split(der);
    let (_, _, tbs, rest) = split(outer);
    let (_, _, alg, rest) = split(rest);
    let (_, bits, _, _) = split(rest);
    let (_, sig, _, _) = split(&bits[1..]);
    let (_, _, r, rest) = split(sig);
    let (_, s, _, _) = split(rest);
    let s: Vec<u8> = s.iter().copied().skip_while(|b| *b == 0).collect();
    let mut s32 = vec![0u8; 32 - s.len()];
    s32.extend(s);
    let mut out = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(s32[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = u8::try_from(d).unwrap();
    }
    let mut int: Vec<u8> = out.iter().copied().skip_while(|b| *b == 0).collect();
    if int[0] & 0x80 != 0 {
        int.insert(0, 0);
    }
    let mut sig = r.to_vec();
    sig.extend(tlv(0x02, &int));
    let mut bits = vec![0x00];
    bits.extend(tlv(0x30, &sig));
    let mut cert = tbs.to_vec();
    cert.extend_from_slice(alg);
    cert.extend(tlv(0x03, &bits));
    tlv(0x30, &cert)
}

/// Item 87: the ID comes only from the verified leaf, is stable across calls, and a
/// re-encoded copy of the same certificate (malleated ECDSA signature: new whole-DER
/// hash, still valid) gets the same ID.
#[test]
fn s87_fingerprint_and_selectors_stable() {
    let root = root("Root CA");
    let leaf = new_leaf("n", &root);
    let agent = agent(&leaf, &[]);
    let v = verifier(&[&root]);

    let attest = |payload: &[u8]| {
        let candidate = v.verify_payload(payload, at(NOW)).unwrap();
        let challenge = v.challenge();
        let response = agent.creds.respond(challenge.encoded()).unwrap();
        (
            candidate.clone(),
            v.verify_response(&candidate, challenge, &response),
        )
    };
    let (_, a) = attest(&agent.creds.attestation_payload());
    let (_, b) = attest(&agent.creds.attestation_payload());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    assert_eq!(a.agent_path_segments(), b.agent_path_segments());

    let twin = malleate_p256_signature(&leaf.der);
    assert_ne!(twin, leaf.der);
    assert_ne!(hex_sha256(&twin), hex_sha256(&leaf.der));
    let twin_candidate = v.verify_payload(&payload_of(&[&twin]), at(NOW)).unwrap();
    assert_eq!(twin_candidate.fingerprint(), a.fingerprint());
    // The agent's response binds the exact DER it sent, so the original's answer does
    // not verify for the twin; what matters is that the ID cannot change.
    let (candidate, twin_node) = attest(&payload_of(&[&twin]));
    assert_eq!(candidate.fingerprint(), a.fingerprint());
    assert_eq!(twin_node, Err(AttestationError::BadSignature));
}

#[test]
fn payload_caps_and_shape() {
    let root = root("Root CA");
    let v = verifier(&[&root]);
    let too_big = vec![b' '; 64 * 1024 + 1];
    assert_eq!(
        v.verify_payload(&too_big, at(NOW)).unwrap_err(),
        AttestationError::PayloadTooLarge { max: 65536 }
    );
    let small = verifier_with(&[&root], Limits::default().with_max_payload_size(1024));
    let leaf = new_leaf("n", &root);
    let three = payload_of(&[&leaf.der, &root.der, &root.der]);
    assert!(three.len() > 1024);
    assert_eq!(
        small.verify_payload(&three, at(NOW)).unwrap_err(),
        AttestationError::PayloadTooLarge { max: 1024 }
    );

    let secret = "SecretMarker_0123456789";
    for (bad, want) in [
        (
            format!("{{\"certificates\":[\"{secret}\"]}}"),
            AttestationError::Malformed,
        ),
        (format!("{{\"{secret}\":[]}}"), AttestationError::Malformed),
        (
            "{\"certificates\":[]}".to_owned(),
            AttestationError::NoCertificate,
        ),
        (
            format!("{{\"certificates\":[\"{}\"]}}", STANDARD.encode(secret)),
            AttestationError::CertificateMalformed { index: 0 },
        ),
        (
            format!(
                "{{\"certificates\":[\"{}\",\"{}\"]}}",
                STANDARD.encode(&leaf.der),
                STANDARD.encode(secret)
            ),
            AttestationError::CertificateMalformed { index: 1 },
        ),
    ] {
        let err = v.verify_payload(bad.as_bytes(), at(NOW)).unwrap_err();
        assert_eq!(err, want, "{bad}");
        assert!(!err.to_string().contains(secret), "{err}");
        assert!(err.is_invalid_input());
    }
    // Trailing bytes after the certificate.
    let mut trailing = leaf.der.clone();
    trailing.push(0);
    assert_eq!(
        v.verify_payload(&payload_of(&[&trailing]), at(NOW))
            .unwrap_err(),
        AttestationError::CertificateMalformed { index: 0 }
    );
}

#[test]
fn challenge_encoding() {
    let root = root("Root CA");
    let v = verifier(&[&root]);
    let c = v.challenge();
    let json: serde_json::Value = serde_json::from_slice(c.encoded()).unwrap();
    let nonce = STANDARD.decode(json["nonce"].as_str().unwrap()).unwrap();
    assert_eq!(nonce.len(), 32);
    assert_eq!(json.as_object().unwrap().len(), 1);
    let dbg = format!("{c:?}");
    assert!(!dbg.contains(json["nonce"].as_str().unwrap()));
}

#[test]
fn verifier_config_checks() {
    assert!(matches!(
        X509PopVerifier::new(Vec::new(), Limits::default()),
        Err(ConfigError::EmptyBundle)
    ));
    assert!(matches!(
        X509PopVerifier::new(vec![vec![0x30, 0x00]], Limits::default()),
        Err(ConfigError::BadCaCertificate { index: 0 })
    ));
    let root = root("Root CA");
    assert!(matches!(
        X509PopVerifier::new(
            vec![root.der.clone()],
            Limits::default().with_max_intermediates(7)
        ),
        Err(ConfigError::Limit(_))
    ));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    let other = root_unrelated();
    std::fs::write(&path, pem_chain(&[&root.der, &other.der])).unwrap();
    let bundle = tessera_plugin_x509pop::load_ca_bundle(&path).unwrap();
    assert_eq!(bundle, vec![root.der.clone(), other.der.clone()]);
    let v = X509PopVerifier::new(bundle, Limits::default()).unwrap();
    let leaf = new_leaf("n", &other);
    v.verify_payload(&payload_of(&[&leaf.der]), at(NOW))
        .unwrap();
    assert!(matches!(
        tessera_plugin_x509pop::load_ca_bundle(&dir.path().join("missing.pem")),
        Err(ConfigError::Read { .. })
    ));
}

fn load_err(chain: &[&[u8]], key_pem: &str, mode: u32) -> AgentError {
    let (_dir, cert, key) = write_credentials(chain, key_pem);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    AgentCredentials::load(&cert, &key).unwrap_err()
}

#[test]
fn agent_load_checks() {
    let root = root("Root CA");
    let leaf = new_leaf("n", &root);
    let key_pem = leaf.key.serialize_pem();

    for mode in [0o640, 0o604, 0o644] {
        assert!(
            matches!(
                load_err(&[&leaf.der], &key_pem, mode),
                AgentError::Read { .. }
            ),
            "{mode:o}"
        );
    }
    let other_key = KeyPair::generate().unwrap().serialize_pem();
    assert!(matches!(
        load_err(&[&leaf.der], &other_key, 0o600),
        AgentError::KeyMismatch
    ));
    // The chain's first certificate must be the leaf.
    assert!(matches!(
        load_err(&[&root.der, &leaf.der], &key_pem, 0o600),
        AgentError::KeyMismatch
    ));
    // SEC1 "EC PRIVATE KEY" and an unsupported key type.
    let sec1 = pem::encode(&pem::Pem::new("EC PRIVATE KEY", vec![1, 2, 3]));
    assert!(matches!(
        load_err(&[&leaf.der], &sec1, 0o600),
        AgentError::KeyPem { .. }
    ));
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .unwrap()
        .serialize_pem();
    assert!(matches!(
        load_err(&[&leaf.der], &ed, 0o600),
        AgentError::UnsupportedKey { .. }
    ));
    // A key block in the certificate file.
    let (_dir, cert, key) = write_credentials(&[&leaf.der], &key_pem);
    std::fs::write(&cert, format!("{}{key_pem}", pem_chain(&[&leaf.der]))).unwrap();
    assert!(matches!(
        AgentCredentials::load(&cert, &key).unwrap_err(),
        AgentError::CertificatePem { .. }
    ));
    // A symlinked key is refused too.
    let (dir, cert, key) = write_credentials(&[&leaf.der], &key_pem);
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    assert!(matches!(
        AgentCredentials::load(&cert, &link).unwrap_err(),
        AgentError::Read { .. }
    ));
    // Success: Debug shows no key material.
    let creds = AgentCredentials::load(&cert, &key).unwrap();
    let dbg = format!("{creds:?}");
    assert!(dbg.contains(creds.fingerprint()), "{dbg}");
    assert!(dbg.len() < 200, "{dbg}");
    assert!(matches!(
        creds.respond(b"{\"nonce\":\"AAAA\"}"),
        Err(AgentError::ChallengeMalformed)
    ));
}
