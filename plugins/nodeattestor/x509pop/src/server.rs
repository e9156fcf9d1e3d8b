//! The server half: verifies the agent's chain, issues a challenge and verifies the
//! response. See the crate documentation for the order of the checks.

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use tessera_plugin_sdk::{IdError, Selector, SpiffeId, TrustDomain};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS,
};
use x509_parser::prelude::FromDer as _;
use x509_parser::public_key::RSAPublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::wire::{self, NONCE_LEN, WireError};
use crate::{
    DEFAULT_MAX_INTERMEDIATES, DEFAULT_MAX_PAYLOAD_SIZE, DEFAULT_MAX_RSA_KEY_SIZE, PLUGIN_NAME,
    SELECTOR_TYPE, parse_certificate, sha256, signed_message, tbs_fingerprint,
};

/// Most intermediates webpki follows between a leaf and a trust anchor; a larger
/// `max_intermediates` could never verify.
const WEBPKI_MAX_INTERMEDIATES: usize = 6;

/// Smallest RSA key accepted for the leaf (and what webpki accepts for chain signatures).
const MIN_RSA_KEY_SIZE: usize = 2048;

/// Largest RSA key AWS-LC verifies signatures with; a larger `max_rsa_key_size` could
/// never verify.
const AWS_LC_MAX_RSA_KEY_SIZE: usize = 8192;

/// Largest CA bundle file [`load_ca_bundle`] reads.
const MAX_CA_BUNDLE_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// Default for [`Limits::challenge_timeout`].
const DEFAULT_CHALLENGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest [`Limits::challenge_timeout`] accepted.
const MAX_CHALLENGE_TIMEOUT: Duration = Duration::from_secs(600);

/// Caps the server applies before any signature work (SECURITY.md §3.9 item 86).
///
/// Build with [`Limits::default`] and the `with_*` methods; [`X509PopVerifier::new`]
/// checks the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest attestation payload, in bytes. Default 64 KiB; 1 KiB to 1 MiB.
    pub max_payload_size: usize,
    /// Most intermediate certificates after the leaf (the payload holds at most
    /// `1 + max_intermediates` certificates). Default 4; 0 to 6 (webpki's own limit).
    pub max_intermediates: usize,
    /// Largest RSA modulus in any certificate of the chain, in bits. Default 8192;
    /// 2048 to 8192 (AWS-LC verifies no larger RSA key).
    pub max_rsa_key_size: usize,
    /// How long a challenge may wait for its response. Default 60 s; more than zero and
    /// at most 10 minutes.
    pub challenge_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_size: DEFAULT_MAX_PAYLOAD_SIZE,
            max_intermediates: DEFAULT_MAX_INTERMEDIATES,
            max_rsa_key_size: DEFAULT_MAX_RSA_KEY_SIZE,
            challenge_timeout: DEFAULT_CHALLENGE_TIMEOUT,
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_intermediates`].
    #[must_use]
    pub fn with_max_intermediates(mut self, max: usize) -> Self {
        self.max_intermediates = max;
        self
    }

    /// Sets [`Limits::max_rsa_key_size`], in bits.
    #[must_use]
    pub fn with_max_rsa_key_size(mut self, bits: usize) -> Self {
        self.max_rsa_key_size = bits;
        self
    }

    /// Sets [`Limits::max_payload_size`], in bytes.
    #[must_use]
    pub fn with_max_payload_size(mut self, bytes: usize) -> Self {
        self.max_payload_size = bytes;
        self
    }

    /// Sets [`Limits::challenge_timeout`].
    #[must_use]
    pub fn with_challenge_timeout(mut self, timeout: Duration) -> Self {
        self.challenge_timeout = timeout;
        self
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.max_intermediates > WEBPKI_MAX_INTERMEDIATES {
            return Err(ConfigError::Limit("max_intermediates must be at most 6"));
        }
        if !(MIN_RSA_KEY_SIZE..=AWS_LC_MAX_RSA_KEY_SIZE).contains(&self.max_rsa_key_size) {
            return Err(ConfigError::Limit(
                "max_rsa_key_size must be between 2048 and 8192 bits",
            ));
        }
        if !(1024..=1024 * 1024).contains(&self.max_payload_size) {
            return Err(ConfigError::Limit(
                "max_payload_size must be between 1 KiB and 1 MiB",
            ));
        }
        if self.challenge_timeout.is_zero() || self.challenge_timeout > MAX_CHALLENGE_TIMEOUT {
            return Err(ConfigError::Limit(
                "challenge_timeout must be more than zero and at most 10 minutes",
            ));
        }
        Ok(())
    }
}

/// Why the verifier could not be built. For the operator: may name paths.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The CA bundle holds no certificate.
    #[error("the x509pop CA bundle holds no certificate")]
    EmptyBundle,
    /// A CA bundle entry is not a DER X.509 certificate webpki accepts as a trust anchor.
    #[error("certificate {index} of the x509pop CA bundle is not a valid X.509 certificate")]
    BadCaCertificate {
        /// Position in the bundle, from 0.
        index: usize,
    },
    /// A CA has an RSA key larger than [`Limits::max_rsa_key_size`].
    #[error(
        "certificate {index} of the x509pop CA bundle has an RSA key larger than max_rsa_key_size ({max_bits} bits)"
    )]
    CaKeyTooLarge {
        /// Position in the bundle, from 0.
        index: usize,
        /// The configured cap.
        max_bits: usize,
    },
    /// A limit is out of range.
    #[error("invalid x509pop limit: {0}")]
    Limit(&'static str),
    /// The CA bundle file could not be read.
    #[error("cannot read x509pop CA bundle {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA bundle file is not PEM, holds a block other than `CERTIFICATE`, or is too
    /// large.
    #[error("x509pop CA bundle {}: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Why an attestation failed. The messages are safe to return to the agent: they name
/// the check that failed and never quote the agent's input.
///
/// [`AttestationError::is_invalid_input`] tells the malformed or over-the-cap inputs
/// (map to `InvalidArgument`) from those that failed verification (map to
/// `PermissionDenied`).
#[non_exhaustive]
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AttestationError {
    /// The payload is larger than [`Limits::max_payload_size`].
    #[error("x509pop payload is larger than {max} bytes")]
    PayloadTooLarge {
        /// The cap.
        max: usize,
    },
    /// The payload is not the x509pop JSON object, or a certificate is not base64.
    #[error(
        "x509pop payload is malformed; the valid form is {{\"certificates\":[<base64 DER>...]}}"
    )]
    Malformed,
    /// The payload holds no certificate.
    #[error("x509pop payload holds no certificate")]
    NoCertificate,
    /// More than [`Limits::max_intermediates`] certificates follow the leaf.
    #[error("x509pop chain has more than {max} intermediate certificates")]
    TooManyIntermediates {
        /// The cap.
        max: usize,
    },
    /// A certificate is not one DER X.509 certificate.
    #[error("certificate {index} of the x509pop chain is not a valid DER X.509 certificate")]
    CertificateMalformed {
        /// Position in the chain (0 is the leaf).
        index: usize,
    },
    /// A certificate carries an RSA key larger than [`Limits::max_rsa_key_size`].
    #[error("certificate {index} of the x509pop chain has an RSA key larger than {max_bits} bits")]
    RsaKeyTooLarge {
        /// Position in the chain (0 is the leaf).
        index: usize,
        /// The cap.
        max_bits: usize,
    },
    /// The leaf's key is not ECDSA P-256, ECDSA P-384 or RSA (rsaEncryption) of
    /// 2048 bits or more.
    #[error(
        "the x509pop leaf certificate key must be ECDSA P-256, ECDSA P-384 or RSA of at least 2048 bits"
    )]
    UnsupportedLeafKey,
    /// The leaf is a CA certificate.
    #[error("the x509pop leaf certificate is a CA certificate")]
    LeafIsCa,
    /// The leaf has a key usage extension without `digitalSignature`.
    #[error("the x509pop leaf certificate's key usage does not allow digital signatures")]
    LeafKeyUsage,
    /// A certificate of the chain (or the CA it ends at) is expired or not yet valid.
    #[error("a certificate of the x509pop chain is expired or not yet valid")]
    NotValidNow,
    /// The chain leads to none of the configured CAs.
    #[error("the x509pop certificate chain does not lead to a configured CA")]
    UnknownIssuer,
    /// The chain failed another check of path validation.
    #[error("the x509pop certificate chain is not valid: {reason}")]
    ChainRejected {
        /// Which check failed.
        reason: &'static str,
    },
    /// The response came after [`Limits::challenge_timeout`].
    #[error("the x509pop challenge has expired")]
    ChallengeExpired,
    /// The response is not the x509pop JSON object, or is too large.
    #[error(
        "x509pop challenge response is malformed; the valid form is {{\"signature\":<base64>}}"
    )]
    ResponseMalformed,
    /// The signature does not verify with the leaf's key over this challenge.
    #[error("the x509pop challenge response signature does not verify")]
    BadSignature,
}

impl AttestationError {
    /// True when the input was malformed or over a cap (`InvalidArgument`); false when
    /// it was well formed but failed verification (`PermissionDenied`).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::PayloadTooLarge { .. }
                | Self::Malformed
                | Self::NoCertificate
                | Self::TooManyIntermediates { .. }
                | Self::CertificateMalformed { .. }
                | Self::RsaKeyTooLarge { .. }
                | Self::ResponseMalformed
        )
    }
}

/// Reads a PEM file of `CERTIFICATE` blocks (the `ca_bundle_path` of the server config)
/// into DER certificates for [`X509PopVerifier::new`].
pub fn load_ca_bundle(path: &Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut text = Vec::new();
    file.take(MAX_CA_BUNDLE_FILE_SIZE + 1)
        .read_to_end(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_CA_BUNDLE_FILE_SIZE {
        return Err(ConfigError::Pem {
            path: path.to_owned(),
            reason: "the file is larger than 4 MiB",
        });
    }
    parse_ca_bundle_pem(&text).map_err(|reason| ConfigError::Pem {
        path: path.to_owned(),
        reason,
    })
}

/// Parses PEM `CERTIFICATE` blocks into DER. Any other block type is an error; so is a
/// text with no block.
pub fn parse_ca_bundle_pem(text: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
    let blocks = pem::parse_many(text).map_err(|_| "not valid PEM")?;
    if blocks.is_empty() {
        return Err("no CERTIFICATE PEM block");
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() == "CERTIFICATE" {
                Ok(block.into_contents())
            } else {
                Err("a PEM block is not a CERTIFICATE")
            }
        })
        .collect()
}

/// One configured CA.
struct CaCert {
    anchor: TrustAnchor<'static>,
    fingerprint: String,
    not_before: u64,
    not_after: u64,
}

/// The server half of x509pop, built once from the configuration; cheap to share
/// (`Send + Sync`), holds no per-session state.
pub struct X509PopVerifier {
    limits: Limits,
    /// Parallel to `cas`: webpki takes a slice of anchors.
    anchors: Vec<TrustAnchor<'static>>,
    cas: Vec<CaCert>,
    algorithms: &'static [&'static dyn SignatureVerificationAlgorithm],
    rng: SystemRandom,
}

impl fmt::Debug for X509PopVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509PopVerifier")
            .field("limits", &self.limits)
            .field(
                "ca_fingerprints",
                &self
                    .cas
                    .iter()
                    .map(|ca| &ca.fingerprint)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl X509PopVerifier {
    /// Builds a verifier trusting the given CA certificates (DER) under `limits`.
    ///
    /// Refuses an empty bundle, a certificate that does not parse, a CA whose RSA key is
    /// larger than `limits.max_rsa_key_size`, and limits out of range.
    pub fn new(ca_bundle_der: Vec<Vec<u8>>, limits: Limits) -> Result<Self, ConfigError> {
        limits.check()?;
        if ca_bundle_der.is_empty() {
            return Err(ConfigError::EmptyBundle);
        }
        let mut anchors = Vec::with_capacity(ca_bundle_der.len());
        let mut cas = Vec::with_capacity(ca_bundle_der.len());
        for (index, der) in ca_bundle_der.iter().enumerate() {
            let bad = || ConfigError::BadCaCertificate { index };
            let cert = parse_certificate(der).ok_or_else(bad)?;
            match rsa_modulus_bits(cert.public_key()) {
                Some(Ok(bits)) if bits > limits.max_rsa_key_size => {
                    return Err(ConfigError::CaKeyTooLarge {
                        index,
                        max_bits: limits.max_rsa_key_size,
                    });
                }
                Some(Err(())) => return Err(bad()),
                _ => {}
            }
            let der = CertificateDer::from(der.as_slice());
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|_| bad())?
                .to_owned();
            let validity = cert.validity();
            cas.push(CaCert {
                anchor: anchor.clone(),
                fingerprint: hex::encode(sha256(der.as_ref())),
                not_before: u64::try_from(validity.not_before.timestamp()).unwrap_or(0),
                not_after: u64::try_from(validity.not_after.timestamp()).unwrap_or(0),
            });
            anchors.push(anchor);
        }
        Ok(Self {
            limits,
            anchors,
            cas,
            algorithms: rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
            rng: SystemRandom::new(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks the agent's payload at time `now`: caps first (no signature work), then the
    /// leaf, then the chain to a configured CA for client authentication. The returned
    /// [`Candidate`] is not proven yet: send [`Self::challenge`] and verify the answer with
    /// [`Self::verify_response`].
    pub fn verify_payload(
        &self,
        payload: &[u8],
        now: SystemTime,
    ) -> Result<Candidate, AttestationError> {
        let encoded =
            wire::decode_payload(payload, self.limits.max_payload_size).map_err(|e| match e {
                WireError::TooLarge => AttestationError::PayloadTooLarge {
                    max: self.limits.max_payload_size,
                },
                WireError::Malformed => AttestationError::Malformed,
            })?;
        // Count before decoding anything.
        let intermediates = encoded
            .len()
            .checked_sub(1)
            .ok_or(AttestationError::NoCertificate)?;
        if intermediates > self.limits.max_intermediates {
            return Err(AttestationError::TooManyIntermediates {
                max: self.limits.max_intermediates,
            });
        }
        let ders = encoded
            .iter()
            .map(|s| wire::decode_base64(s).map_err(|_| AttestationError::Malformed))
            .collect::<Result<Vec<_>, _>>()?;
        drop(encoded);

        // Parse every certificate and cap every RSA key: still no signature work.
        let mut parsed = Vec::with_capacity(ders.len());
        for (index, der) in ders.iter().enumerate() {
            let cert =
                parse_certificate(der).ok_or(AttestationError::CertificateMalformed { index })?;
            match rsa_modulus_bits(cert.public_key()) {
                Some(Ok(bits)) if bits > self.limits.max_rsa_key_size => {
                    return Err(AttestationError::RsaKeyTooLarge {
                        index,
                        max_bits: self.limits.max_rsa_key_size,
                    });
                }
                Some(Err(())) => return Err(AttestationError::CertificateMalformed { index }),
                _ => {}
            }
            parsed.push(cert);
        }
        let (Some(leaf), Some((leaf_der, intermediate_ders))) =
            (parsed.first(), ders.split_first())
        else {
            return Err(AttestationError::NoCertificate);
        };

        let key = LeafKey::from_spki(leaf.public_key())?;
        check_leaf_extensions(leaf)?;

        // Now the signature work: webpki path building and verification.
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| AttestationError::NotValidNow)?;
        let time = UnixTime::since_unix_epoch(since_epoch);
        let leaf_der_ref = CertificateDer::from(leaf_der.as_slice());
        let end_entity = webpki::EndEntityCert::try_from(&leaf_der_ref)
            .map_err(|_| AttestationError::CertificateMalformed { index: 0 })?;
        let intermediate_refs: Vec<CertificateDer<'_>> = intermediate_ders
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()))
            .collect();
        // A path is acceptable only if a configured certificate for its anchor is valid
        // now (webpki does not check the validity of trust anchors); otherwise path
        // building goes on with other candidates.
        let anchor_valid = |path: &webpki::VerifiedPath<'_>| {
            if self.valid_cas_for(path.anchor(), time).next().is_some() {
                Ok(())
            } else {
                Err(webpki::Error::CertExpired {
                    time,
                    not_after: time,
                })
            }
        };
        let path = end_entity
            .verify_for_usage(
                self.algorithms,
                &self.anchors,
                &intermediate_refs,
                time,
                webpki::KeyUsage::client_auth(),
                None,
                Some(&anchor_valid),
            )
            .map_err(map_webpki_error)?;

        let mut selectors = Vec::new();
        for cn in leaf.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                push_selector(&mut selectors, &format!("subject:cn:{cn}"));
            }
        }
        for ca in path.intermediate_certificates() {
            push_selector(
                &mut selectors,
                &format!("ca:fingerprint:{}", hex::encode(sha256(ca.der().as_ref()))),
            );
        }
        for ca in self.valid_cas_for(path.anchor(), time) {
            push_selector(
                &mut selectors,
                &format!("ca:fingerprint:{}", ca.fingerprint),
            );
        }
        let serial = serial_hex(leaf.raw_serial())
            .ok_or(AttestationError::CertificateMalformed { index: 0 })?;
        push_selector(&mut selectors, &format!("serialnumber:{serial}"));

        Ok(Candidate {
            key,
            leaf_der_sha256: sha256(leaf_der),
            fingerprint: tbs_fingerprint(leaf),
            selectors,
            not_after: system_time(leaf.validity().not_after.timestamp()),
        })
    }

    /// A fresh challenge: 32 random bytes from AWS-LC's CSPRNG. Send
    /// [`Challenge::encoded`] to the agent, keep the [`Challenge`] for
    /// [`Self::verify_response`], which consumes it.
    #[must_use]
    pub fn challenge(&self) -> Challenge {
        let mut nonce = [0u8; NONCE_LEN];
        fill(&self.rng, &mut nonce);
        Challenge {
            encoded: wire::encode_challenge(&nonce),
            nonce,
            issued: Instant::now(),
        }
    }

    /// Verifies the agent's answer to `challenge` with the key of `candidate`'s leaf.
    ///
    /// The challenge is consumed: one nonce, one verification. Refused when the challenge
    /// is older than [`Limits::challenge_timeout`], when the response is malformed, and
    /// when the signature is not over exactly
    /// `SIGNATURE_CONTEXT || nonce || SHA-256(leaf DER)` with the leaf's key.
    ///
    /// Re-attestation with the same certificate yields the same node: the caller must
    /// check its ban list for [`AttestedNode::agent_path_segments`] before issuing.
    pub fn verify_response(
        &self,
        candidate: &Candidate,
        challenge: Challenge,
        response: &[u8],
    ) -> Result<AttestedNode, AttestationError> {
        if challenge.issued.elapsed() > self.limits.challenge_timeout {
            return Err(AttestationError::ChallengeExpired);
        }
        let signature =
            wire::decode_response(response).map_err(|_| AttestationError::ResponseMalformed)?;
        let message = signed_message(&challenge.nonce, &candidate.leaf_der_sha256);
        candidate.key.verify(&message, &signature)?;
        Ok(AttestedNode {
            fingerprint: candidate.fingerprint.clone(),
            selectors: candidate.selectors.clone(),
            not_after: candidate.not_after,
        })
    }

    /// Configured CAs for `anchor` that are valid at `time`.
    fn valid_cas_for<'s>(
        &'s self,
        anchor: &'s TrustAnchor<'_>,
        time: UnixTime,
    ) -> impl Iterator<Item = &'s CaCert> + 's {
        let now = time.as_secs();
        self.cas.iter().filter(move |ca| {
            ca.anchor.subject == anchor.subject
                && ca.anchor.subject_public_key_info == anchor.subject_public_key_info
                && ca.not_before <= now
                && now <= ca.not_after
        })
    }
}

/// An agent whose chain verified, before it proved possession of the leaf key.
///
/// Deliberately offers no agent ID: only an [`AttestedNode`] does.
#[derive(Debug, Clone)]
pub struct Candidate {
    key: LeafKey,
    leaf_der_sha256: [u8; 32],
    fingerprint: String,
    selectors: Vec<Selector>,
    not_after: SystemTime,
}

impl Candidate {
    /// The leaf's public key as a DER SubjectPublicKeyInfo.
    pub fn public_key_spki(&self) -> &[u8] {
        &self.key.spki
    }

    /// The leaf's fingerprint: lowercase hex SHA-256 of its TBSCertificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The selectors the node will have once attested.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    /// End of the leaf certificate's validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

/// A challenge sent to one agent in one session. Not `Clone`:
/// [`X509PopVerifier::verify_response`] takes it by value, so a nonce is verified at
/// most once.
///
/// ```compile_fail,E0382
/// # fn f(v: &tessera_plugin_x509pop::X509PopVerifier, c: &tessera_plugin_x509pop::Candidate) {
/// let challenge = v.challenge();
/// let _ = v.verify_response(c, challenge, b"");
/// let _ = v.verify_response(c, challenge, b""); // use of moved value
/// # }
/// ```
pub struct Challenge {
    nonce: [u8; NONCE_LEN],
    encoded: Vec<u8>,
    issued: Instant,
}

impl Challenge {
    /// The bytes to send in the node API's `challenge` field.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Challenge")
            .field("issued", &self.issued)
            .finish_non_exhaustive()
    }
}

/// An agent that proved possession of the key of a certificate chaining to a configured
/// CA. Only [`X509PopVerifier::verify_response`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    fingerprint: String,
    selectors: Vec<Selector>,
    not_after: SystemTime,
}

impl AttestedNode {
    /// Path segments of the agent ID:
    /// `["tessera", "agent", "x509pop", <fingerprint>]`, from the verified leaf only.
    /// The same certificate always gives the same segments: check the ban list.
    pub fn agent_path_segments(&self) -> [&str; 4] {
        ["tessera", "agent", PLUGIN_NAME, &self.fingerprint]
    }

    /// The agent ID `spiffe://<td>/tessera/agent/x509pop/<fingerprint>`.
    pub fn agent_id(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, IdError> {
        SpiffeId::from_segments(trust_domain, &self.agent_path_segments())
    }

    /// The leaf's fingerprint: lowercase hex SHA-256 of its TBSCertificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The node's selectors: `x509pop:subject:cn:*`, `x509pop:ca:fingerprint:*`,
    /// `x509pop:serialnumber:*`, in that order.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    /// The node's selectors, by value.
    pub fn into_selectors(self) -> Vec<Selector> {
        self.selectors
    }

    /// End of the leaf certificate's validity (the server may cap the agent SVID by it).
    pub fn certificate_not_after(&self) -> SystemTime {
        self.not_after
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeafAlgorithm {
    EcdsaP256,
    EcdsaP384,
    RsaPss,
}

/// The leaf's key, ready for verification.
#[derive(Clone)]
struct LeafKey {
    algorithm: LeafAlgorithm,
    /// The subjectPublicKey bits: the EC point, or the RSAPublicKey DER.
    raw: Vec<u8>,
    spki: Vec<u8>,
}

impl fmt::Debug for LeafKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl LeafKey {
    fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, AttestationError> {
        let oid = &spki.algorithm.algorithm;
        let algorithm = if *oid == OID_PKCS1_RSAENCRYPTION {
            match rsa_modulus_bits(spki) {
                Some(Ok(bits)) if bits >= MIN_RSA_KEY_SIZE => LeafAlgorithm::RsaPss,
                _ => return Err(AttestationError::UnsupportedLeafKey),
            }
        } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 => LeafAlgorithm::EcdsaP256,
                Some(c) if c == OID_NIST_EC_P384 => LeafAlgorithm::EcdsaP384,
                _ => return Err(AttestationError::UnsupportedLeafKey),
            }
        } else {
            return Err(AttestationError::UnsupportedLeafKey);
        };
        Ok(Self {
            algorithm,
            raw: spki.subject_public_key.data.to_vec(),
            spki: spki.raw.to_vec(),
        })
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), AttestationError> {
        let algorithm: &'static dyn signature::VerificationAlgorithm = match self.algorithm {
            LeafAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            LeafAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
            LeafAlgorithm::RsaPss => &signature::RSA_PSS_2048_8192_SHA256,
        };
        UnparsedPublicKey::new(algorithm, &self.raw)
            .verify(message, signature)
            .map_err(|_| AttestationError::BadSignature)
    }
}

/// The bit length of an RSA key's modulus: `None` for a non-RSA key, `Some(Err)` for an
/// RSA key that does not parse. Only slices bytes: no arithmetic on the key.
fn rsa_modulus_bits(spki: &SubjectPublicKeyInfo<'_>) -> Option<Result<usize, ()>> {
    let oid = &spki.algorithm.algorithm;
    if *oid != OID_PKCS1_RSAENCRYPTION && *oid != OID_PKCS1_RSASSAPSS {
        return None;
    }
    Some(
        match RSAPublicKey::from_der(&spki.subject_public_key.data) {
            Ok(([], key)) => {
                let magnitude = key
                    .modulus
                    .iter()
                    .position(|b| *b != 0)
                    .map_or(&[][..], |first| &key.modulus[first..]);
                match magnitude.first() {
                    Some(top) => Ok(magnitude.len() * 8 - top.leading_zeros() as usize),
                    None => Err(()),
                }
            }
            _ => Err(()),
        },
    )
}

fn check_leaf_extensions(leaf: &X509Certificate<'_>) -> Result<(), AttestationError> {
    let malformed = AttestationError::CertificateMalformed { index: 0 };
    if let Some(bc) = leaf.basic_constraints().map_err(|_| malformed.clone())?
        && bc.value.ca
    {
        return Err(AttestationError::LeafIsCa);
    }
    if let Some(ku) = leaf.key_usage().map_err(|_| malformed)?
        && !ku.value.digital_signature()
    {
        return Err(AttestationError::LeafKeyUsage);
    }
    Ok(())
}

fn map_webpki_error(err: webpki::Error) -> AttestationError {
    use webpki::Error as E;
    let reason = match err {
        E::CertExpired { .. } | E::CertNotValidYet { .. } | E::InvalidCertValidity => {
            return AttestationError::NotValidNow;
        }
        E::UnknownIssuer => return AttestationError::UnknownIssuer,
        E::CaUsedAsEndEntity => return AttestationError::LeafIsCa,
        // The context-less EKU and algorithm variants are deprecated and no longer
        // produced by webpki 0.103; they fall to the generic reason.
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => {
            "the leaf certificate is not valid for client authentication"
        }
        E::InvalidSignatureForPublicKey | E::SignatureAlgorithmMismatch => {
            "a signature in the chain does not verify"
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "the chain uses an unsupported signature algorithm"
        }
        E::MaximumSignatureChecksExceeded
        | E::MaximumPathBuildCallsExceeded
        | E::MaximumPathDepthExceeded => "the chain is too long or too complex",
        E::EndEntityUsedAsCa => "an intermediate certificate is not a CA",
        E::NameConstraintViolation | E::PathLenConstraintViolated => {
            "the chain violates a name or path length constraint"
        }
        _ => "the chain does not verify",
    };
    AttestationError::ChainRejected { reason }
}

fn push_selector(selectors: &mut Vec<Selector>, value: &str) {
    if let Ok(selector) = Selector::new(SELECTOR_TYPE, value)
        && !selectors.contains(&selector)
    {
        selectors.push(selector);
    }
}

/// A positive serial as lowercase hex, even number of digits, no extra leading `00`
/// (SPIRE's `SerialNumberHex`). `None` for an empty or negative serial.
fn serial_hex(raw: &[u8]) -> Option<String> {
    if raw.first().is_none_or(|b| b & 0x80 != 0) {
        return None;
    }
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let magnitude = &raw[start..];
    Some(if magnitude.is_empty() {
        "00".to_owned()
    } else {
        hex::encode(magnitude)
    })
}

fn system_time(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + magnitude
    } else {
        SystemTime::UNIX_EPOCH - magnitude
    }
}

#[expect(
    clippy::expect_used,
    reason = "invariant: AWS-LC's RAND_bytes aborts the process instead of returning \
              failure, so SystemRandom::fill cannot return an error"
)]
fn fill(rng: &SystemRandom, buf: &mut [u8]) {
    rng.fill(buf)
        .expect("the system CSPRNG never reports failure");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<X509PopVerifier>();
        check::<Candidate>();
        check::<Challenge>();
        check::<AttestedNode>();
        check::<crate::AgentCredentials>();
    }

    #[test]
    fn serial_forms() {
        assert_eq!(serial_hex(&[0x01]).unwrap(), "01");
        assert_eq!(serial_hex(&[0x00, 0x80]).unwrap(), "80");
        assert_eq!(serial_hex(&[0x00, 0x00, 0x12, 0xab]).unwrap(), "12ab");
        assert_eq!(serial_hex(&[0x00]).unwrap(), "00");
        assert_eq!(serial_hex(&[0x80]), None);
        assert_eq!(serial_hex(&[]), None);
    }

    #[test]
    fn limits_are_checked() {
        let ok = Limits::default();
        assert!(ok.check().is_ok());
        for bad in [
            ok.with_max_intermediates(7),
            ok.with_max_rsa_key_size(16384),
            ok.with_max_rsa_key_size(1024),
            ok.with_max_payload_size(10),
            ok.with_max_payload_size(2 << 20),
            ok.with_challenge_timeout(Duration::ZERO),
            ok.with_challenge_timeout(Duration::from_secs(601)),
        ] {
            assert!(matches!(bad.check(), Err(ConfigError::Limit(_))), "{bad:?}");
        }
        assert!(ok.with_max_intermediates(0).check().is_ok());
        assert!(ok.with_max_intermediates(6).check().is_ok());
    }

    #[test]
    fn invalid_input_classification() {
        assert!(AttestationError::Malformed.is_invalid_input());
        assert!(
            AttestationError::RsaKeyTooLarge {
                index: 0,
                max_bits: 8192
            }
            .is_invalid_input()
        );
        assert!(!AttestationError::BadSignature.is_invalid_input());
        assert!(!AttestationError::UnknownIssuer.is_invalid_input());
        assert!(!AttestationError::ChallengeExpired.is_invalid_input());
    }

    #[test]
    fn ca_bundle_pem() {
        assert!(parse_ca_bundle_pem(b"").is_err());
        assert!(
            parse_ca_bundle_pem(b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n")
                .is_err()
        );
        let two = "-----BEGIN CERTIFICATE-----\nAQI=\n-----END CERTIFICATE-----\n\
                   -----BEGIN CERTIFICATE-----\nAw==\n-----END CERTIFICATE-----\n";
        assert_eq!(
            parse_ca_bundle_pem(two.as_bytes()).unwrap(),
            vec![vec![1, 2], vec![3]]
        );
    }
}
