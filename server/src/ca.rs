//! The signing CA of the server and X.509-SVID issuance.
//!
//! [`CertificateAuthority`] is one CA: a key held by the key manager (never seen here,
//! only asked to sign through [`RcgenSigner`]) and its self-signed certificate. It
//! signs X509-SVIDs where the server chooses every field and the caller contributes
//! only a public key (SECURITY.md §2 rule 3, CVE-2021-27098). [`X509Authority`] holds
//! the CA that signs now and is switched to the next one when a rotation activates it
//! (see [`crate::rotation`], which owns the schedule, the journal and the bundle).
//!
//! The free functions are the strict edges around it: [`public_key_from_csr`] (DER only,
//! self-signature verified, key policy), [`check_public_key`] (the key policy),
//! [`spiffe_id_of_certificate`] and [`serial_of_certificate`] (used by the node API to
//! identify agents by their SVID).
//!
//! With an upstream authority ([`upstream`], `[server.upstream_authority]`) each CA is
//! an intermediate signed by the upstream CA instead of a self-signed root
//! ([`CertificateAuthority::signed_by_upstream`]); every SVID it signs then comes with
//! the chain up to (not including) the upstream root ([`IssuedCertificate::chain`]).

pub mod upstream;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyUsagePurpose,
    PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use tessera_plugin_keymanager::RcgenSigner;
use tessera_plugin_sdk::keymanager::SigningKey;
use tessera_plugin_sdk::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use upstream::{UpstreamAuthority, UpstreamError};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// File name of the CA private key of servers before the key manager (PKCS#8 PEM in
/// `<data_dir>/ca`); migrated into the key manager on the first start.
pub const CA_KEY_FILE: &str = "ca_key.pem";
/// File name of the CA certificate of servers before the key manager (PEM in
/// `<data_dir>/ca`); migrated into the rotation journal on the first start.
pub const CA_CERT_FILE: &str = "ca_cert.pem";

/// How long a CRL signed by [`CertificateAuthority::sign_crl`] is valid: its nextUpdate
/// is this long after its thisUpdate. The server signs a fresh one whenever the revoked
/// set changes, and at least every [`CRL_VALIDITY`]` / 2`.
pub const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// How far NotBefore is back-dated to absorb clock skew (SPIRE uses 10 s).
pub const BACKDATE: Duration = Duration::from_secs(10);

/// Largest CSR [`public_key_from_csr`] parses; an RSA-4096 CSR is about 1.3 KiB.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Smallest and largest RSA modulus accepted, in bits.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 4096;
/// The only RSA public exponent accepted.
const RSA_EXPONENT: u64 = 65537;

/// X.520 `serialNumber` attribute type (2.5.4.5), used to make each CA subject unique.
const OID_AT_SERIAL_NUMBER: &[u64] = &[2, 5, 4, 5];

/// Errors of the CA and of the certificate/CSR helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CSR is not acceptable DER, or its self-signature does not verify.
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    /// The public key is outside the key policy (type, curve, size, encoding).
    #[error("public key rejected by policy: {0}")]
    KeyPolicy(String),
    /// The request itself is unacceptable (ID outside the trust domain, bad DNS name,
    /// zero TTL).
    #[error("invalid signing request: {0}")]
    InvalidRequest(String),
    /// Building or signing a certificate failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The CA certificate has expired; nothing can be signed.
    #[error("the CA certificate has expired")]
    Expired,
    /// A stored CA certificate cannot be used with its key as it is.
    #[error("CA certificate is corrupt or inconsistent: {0}")]
    Corrupt(String),
    /// The stored CA belongs to another trust domain than the configured one.
    #[error("the stored CA is for {found:?}, but the configured trust domain ID is {configured:?}")]
    TrustDomainMismatch {
        /// `spiffe://<configured trust domain>`.
        configured: String,
        /// The URI SAN of the stored CA certificate.
        found: String,
    },
    /// A certificate given to [`spiffe_id_of_certificate`] or
    /// [`serial_of_certificate`] is malformed or not an X509-SVID.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// The upstream authority cannot be used (the message names the configuration key).
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
}

/// One signed X509-SVID.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Serial number, lowercase hex without separators or leading zeros (as
    /// [`serial_of_certificate`] returns it).
    pub serial_hex: String,
    /// NotBefore as written in the certificate (whole seconds).
    pub not_before: SystemTime,
    /// NotAfter as written in the certificate (whole seconds).
    pub not_after: SystemTime,
    /// The certificates that go after [`IssuedCertificate::der`] in the chain handed
    /// out, DER: empty when the signing CA is a self-signed root (the trust bundle holds
    /// it); with an upstream authority, the signing CA and the upstream intermediates
    /// (never the root).
    pub chain: Vec<Vec<u8>>,
}

impl IssuedCertificate {
    /// The chain to hand out: the certificate, then [`IssuedCertificate::chain`].
    pub fn cert_chain(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.der.clone())
            .chain(self.chain.iter().cloned())
            .collect()
    }
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("der_len", &self.der.len())
            .field("chain_len", &self.chain.len())
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Where a CA signed by an upstream authority sits: what follows it in a chain, and the
/// roots the chain ends at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamChain {
    /// The certificates that follow the CA's own in every chain it hands out: the
    /// upstream CA and its intermediates, without a root (empty when the upstream CA is
    /// itself a root). DER.
    pub intermediates: Vec<Vec<u8>>,
    /// The roots (trust anchors) the chain ends at: what the trust bundle publishes in
    /// place of the CA. DER, at least one.
    pub roots: Vec<Vec<u8>>,
}

/// One CA: a key manager's key and its certificate, self-signed or signed by an
/// upstream authority.
///
/// `Send + Sync`; signing takes `&self` and is blocking CPU work (call it from
/// `spawn_blocking`, or accept a few hundred microseconds on the runtime).
pub struct CertificateAuthority {
    /// Signing key plus the subject / key identifier the leaves reference.
    issuer: Issuer<'static, RcgenSigner>,
    trust_domain: TrustDomain,
    cert_der: Vec<u8>,
    cert_pem: String,
    serial_hex: String,
    /// Validity of the CA certificate, Unix seconds.
    not_before: i64,
    not_after: i64,
    /// `None` for a self-signed root.
    upstream: Option<UpstreamChain>,
    /// What follows a leaf it signs: empty for a root; else this certificate and the
    /// upstream intermediates.
    chain: Vec<Vec<u8>>,
}

impl fmt::Debug for CertificateAuthority {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain.name())
            .field("key_id", &self.key_id())
            .field("serial_hex", &self.serial_hex)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("upstream", &self.upstream.is_some())
            .field("key", &"[elided]")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA over `key`: a self-signed certificate valid from `now` − [`BACKDATE`]
    /// for `ttl`. Blocking (signing).
    pub fn self_signed(
        key: Arc<dyn SigningKey>,
        trust_domain: &TrustDomain,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if ttl_secs == 0 {
            return Err(CaError::InvalidRequest(
                "CA ttl must be at least one second".into(),
            ));
        }
        let signer = RcgenSigner::new(key).map_err(|e| CaError::Signing(format!("CA key: {e}")))?;
        let now = unix_of(now)?;
        let not_before = now.saturating_sub(backdate_secs());
        let not_after = now.saturating_add(ttl_secs);
        let serial = random_serial()?;
        let params = ca_params(
            trust_domain,
            serial.clone(),
            to_offset(not_before)?,
            to_offset(not_after)
                .map_err(|_| CaError::InvalidRequest(format!("CA ttl {ttl:?} is too long")))?,
        )?;
        let cert = params
            .self_signed(&signer)
            .map_err(|e| CaError::Signing(format!("CA certificate: {e}")))?;
        let cert_der = cert.der().to_vec();
        let ca = Self {
            cert_pem: tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &cert_der),
            issuer: Issuer::new(params, signer),
            trust_domain: trust_domain.clone(),
            cert_der,
            serial_hex: serial_hex(&serial),
            not_before,
            not_after,
            upstream: None,
            chain: Vec::new(),
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// A new CA over `key`, an intermediate signed by `upstream` (only the public key
    /// goes to it): valid from `now` − [`BACKDATE`] (never before the upstream path's
    /// NotBefore) for `ttl`, but never past the upstream path's NotAfter (check
    /// [`CertificateAuthority::not_after`] to see whether it was clamped). Same profile
    /// as a self-signed CA (subject, the trust domain's SPIFFE ID as URI SAN, keyUsage
    /// keyCertSign + cRLSign), plus an authority key identifier and a path length
    /// constraint of 0: it signs SVIDs, never another CA. Its self-test signs a probe
    /// SVID and verifies it with webpki through the upstream chain to the upstream
    /// roots, so a chain that would not verify never signs. Blocking (signing).
    pub fn signed_by_upstream(
        key: Arc<dyn SigningKey>,
        trust_domain: &TrustDomain,
        ttl: Duration,
        now: SystemTime,
        upstream: &UpstreamAuthority,
    ) -> Result<Self, CaError> {
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if ttl_secs == 0 {
            return Err(CaError::InvalidRequest(
                "CA ttl must be at least one second".into(),
            ));
        }
        let signer = RcgenSigner::new(key).map_err(|e| CaError::Signing(format!("CA key: {e}")))?;
        let now = unix_of(now)?;
        let not_before = now
            .saturating_sub(backdate_secs())
            .max(upstream.not_before());
        let not_after = now.saturating_add(ttl_secs).min(upstream.not_after());
        if not_after <= now {
            return Err(CaError::Upstream(UpstreamError {
                field: "cert_file_path",
                path: None,
                reason: format!(
                    "the upstream CA ({}) has expired; no CA can be signed under it",
                    upstream.subject()
                ),
            }));
        }
        let serial = random_serial()?;
        let mut params = ca_params(
            trust_domain,
            serial.clone(),
            to_offset(not_before)?,
            to_offset(not_after)
                .map_err(|_| CaError::InvalidRequest(format!("CA ttl {ttl:?} is too long")))?,
        )?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&signer, upstream.issuer())
            .map_err(|e| CaError::Signing(format!("CA certificate by the upstream CA: {e}")))?;
        let cert_der = cert.der().to_vec();
        {
            let parsed = parse_certificate(&cert_der)?;
            if parsed.issuer().as_raw() != upstream.subject_der() {
                return Err(CaError::Upstream(UpstreamError {
                    field: "cert_file_path",
                    path: None,
                    reason: format!(
                        "the upstream CA's subject ({}) cannot be reproduced exactly as \
                         issuer name; use an upstream CA with a simpler subject",
                        upstream.subject()
                    ),
                }));
            }
        }
        let upstream = UpstreamChain {
            intermediates: upstream.chain().to_vec(),
            roots: upstream.roots().to_vec(),
        };
        let ca = Self {
            cert_pem: tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &cert_der),
            issuer: Issuer::new(params, signer),
            trust_domain: trust_domain.clone(),
            chain: chain_after_leaf(&cert_der, &upstream),
            cert_der,
            serial_hex: serial_hex(&serial),
            not_before,
            not_after,
            upstream: Some(upstream),
        };
        ca.self_test()?;
        Ok(ca)
    }

    /// A stored CA: `cert_der` must be a CA certificate for `trust_domain`,
    /// self-signed by `key`. Expiry is not checked here (an old CA stays loaded, only
    /// to be published, until its NotAfter). Blocking (a self-test signature).
    pub fn from_certificate(
        key: Arc<dyn SigningKey>,
        cert_der: Vec<u8>,
        trust_domain: &TrustDomain,
    ) -> Result<Self, CaError> {
        Self::load(key, cert_der, trust_domain, None)
    }

    /// A stored CA signed by an upstream authority: `cert_der` must be a CA certificate
    /// for `trust_domain` over `key`, and (unless it has expired) a probe SVID it signs
    /// must verify through `upstream.intermediates` to `upstream.roots`. Blocking.
    pub fn from_upstream_certificate(
        key: Arc<dyn SigningKey>,
        cert_der: Vec<u8>,
        trust_domain: &TrustDomain,
        upstream: UpstreamChain,
    ) -> Result<Self, CaError> {
        if upstream.roots.is_empty() {
            return Err(CaError::Corrupt(
                "a CA signed by an upstream authority needs at least one root".into(),
            ));
        }
        Self::load(key, cert_der, trust_domain, Some(upstream))
    }

    fn load(
        key: Arc<dyn SigningKey>,
        cert_der: Vec<u8>,
        trust_domain: &TrustDomain,
        upstream: Option<UpstreamChain>,
    ) -> Result<Self, CaError> {
        let signer = RcgenSigner::new(key).map_err(|e| CaError::Corrupt(format!("CA key: {e}")))?;
        let (serial, not_before, not_after) = {
            let cert = parse_certificate(&cert_der).map_err(|e| CaError::Corrupt(e.to_string()))?;
            check_ca_certificate(
                &cert,
                signer.key().public_key_der(),
                trust_domain,
                upstream.is_none(),
            )?;
            (
                serial_of_certificate(&cert_der).map_err(|e| CaError::Corrupt(e.to_string()))?,
                cert.validity().not_before.timestamp(),
                cert.validity().not_after.timestamp(),
            )
        };
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), signer)
            .map_err(|e| CaError::Corrupt(e.to_string()))?;
        let chain = upstream
            .as_ref()
            .map(|u| chain_after_leaf(&cert_der, u))
            .unwrap_or_default();
        let ca = Self {
            issuer,
            trust_domain: trust_domain.clone(),
            cert_pem: tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &cert_der),
            cert_der,
            serial_hex: serial,
            not_before,
            not_after,
            upstream,
            chain,
        };
        if unix_now()? < ca.not_after {
            ca.self_test()?;
        }
        Ok(ca)
    }

    /// The key manager's id of the CA key.
    pub fn key_id(&self) -> &str {
        self.issuer.key().key().id()
    }

    /// The CA's public key (SPKI, DER).
    pub fn public_key_der(&self) -> &[u8] {
        self.issuer.key().key().public_key_der()
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA certificate, PEM (one `CERTIFICATE` block, LF line endings).
    pub fn certificate_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// NotAfter of the CA certificate.
    pub fn not_after(&self) -> SystemTime {
        system_time(self.not_after)
    }

    /// NotBefore of the CA certificate.
    pub fn not_before(&self) -> SystemTime {
        system_time(self.not_before)
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Hex serial of the CA certificate (same format as [`serial_of_certificate`]).
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// The upstream chain and roots of a CA signed by an upstream authority; `None`
    /// for a self-signed root.
    pub fn upstream(&self) -> Option<&UpstreamChain> {
        self.upstream.as_ref()
    }

    /// The certificates that follow a leaf this CA signs (see
    /// [`IssuedCertificate::chain`]). DER.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// What the trust bundle publishes for this CA: its own certificate if it is a
    /// root, else the upstream roots. DER.
    pub fn trust_anchors(&self) -> Vec<Vec<u8>> {
        match &self.upstream {
            None => vec![self.cert_der.clone()],
            Some(upstream) => upstream.roots.clone(),
        }
    }

    /// Signs an X509-SVID for `spiffe_id` over the public key `public_key_spki_der`.
    ///
    /// The server picks every field: empty subject, one URI SAN (`spiffe_id`) plus
    /// `dns_names` in a critical SAN extension, basicConstraints CA=false (critical),
    /// keyUsage digitalSignature (critical), EKU serverAuth + clientAuth, subject and
    /// authority key identifiers, a random positive 128-bit serial,
    /// NotBefore = now − 10 s, NotAfter = min(now + `ttl`, CA NotAfter).
    ///
    /// The key must pass [`check_public_key`]; `spiffe_id` must be a leaf ID (non-empty
    /// path) in the CA's trust domain; `dns_names` must be valid host names (a `*`
    /// is allowed only as the whole leftmost label); `ttl` must be at least one second.
    pub fn sign_x509_svid(
        &self,
        public_key_spki_der: &[u8],
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let public_key = parse_policy_key(public_key_spki_der)?;
        if !spiffe_id.is_member_of(&self.trust_domain) {
            return Err(CaError::InvalidRequest(format!(
                "{} is not in trust domain {}",
                spiffe_id.as_str(),
                self.trust_domain.name()
            )));
        }
        if spiffe_id.is_trust_domain_id() {
            return Err(CaError::InvalidRequest(format!(
                "{} has no path; a trust domain ID cannot be an SVID subject",
                spiffe_id.as_str()
            )));
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if ttl_secs == 0 {
            return Err(CaError::InvalidRequest(
                "ttl must be at least one second".into(),
            ));
        }

        let now = unix_now()?;
        if now >= self.not_after {
            return Err(CaError::Expired);
        }
        let not_before = now.saturating_sub(backdate_secs()).max(self.not_before);
        let not_after = now.saturating_add(ttl_secs).min(self.not_after);
        if not_after <= not_before {
            return Err(CaError::Signing(
                "the system clock is before the CA's NotBefore; refusing to sign".into(),
            ));
        }

        let mut sans = Vec::with_capacity(1 + dns_names.len());
        sans.push(SanType::URI(ia5(spiffe_id.as_str())?));
        for name in dns_names {
            check_dns_name(name)?;
            sans.push(SanType::DnsName(ia5(name)?));
        }

        let serial = random_serial()?;
        let params = leaf_params(
            sans,
            serial.clone(),
            to_offset(not_before)?,
            to_offset(not_after)?,
        );
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(IssuedCertificate {
            der: cert.der().to_vec(),
            serial_hex: serial_hex(&serial),
            not_before: system_time(not_before),
            not_after: system_time(not_after),
            chain: self.chain.clone(),
        })
    }

    /// Signs a certificate revocation list (RFC 5280 §5, DER) naming this CA as issuer
    /// and listing `revoked`: each serial (lowercase hex, as
    /// [`IssuedCertificate::serial_hex`]) with its revocation time.
    ///
    /// thisUpdate is `now`, nextUpdate `now + `[`CRL_VALIDITY`]; `crl_number` goes in
    /// the cRLNumber extension and must increase from one CRL to the next. Version 2,
    /// with the authority key identifier of the CA. Blocking (signing).
    pub fn sign_crl(
        &self,
        crl_number: u64,
        revoked: &[(String, SystemTime)],
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        let this_update = to_offset(unix_of(now)?)?;
        let next_update = to_offset(unix_of(now + CRL_VALIDITY)?)?;
        let revoked_certs = revoked
            .iter()
            .map(|(serial, revoked_at)| {
                let padded;
                let serial = if serial.len() % 2 == 1 {
                    padded = format!("0{serial}");
                    &padded
                } else {
                    serial
                };
                let bytes = hex::decode(serial)
                    .ok()
                    .filter(|b| !b.is_empty() && b.len() <= 20)
                    .ok_or_else(|| {
                        CaError::InvalidRequest(format!("CRL: {serial:?} is not a hex serial"))
                    })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(strip_leading_zeros(&bytes)),
                    revocation_time: to_offset(unix_of(*revoked_at)?)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let params = CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Signing(format!("CRL: {e}")))?;
        Ok(crl.der().to_vec())
    }

    /// Signs a throwaway leaf and checks it chains to our certificate: catches an
    /// issuer name or key identifier that does not match the certificate on disk.
    fn self_test(&self) -> Result<(), CaError> {
        let probe_key = self.issuer.key().subject_public_key_info();
        let probe_id = SpiffeId::from_segments(&self.trust_domain, &["tessera", "ca-self-test"])
            .map_err(|e| CaError::Signing(format!("self-test ID: {e}")))?;
        let leaf = self.sign_x509_svid(&probe_key, &probe_id, &[], Duration::from_secs(60))?;
        let ca = parse_certificate(&self.cert_der).map_err(|e| CaError::Corrupt(e.to_string()))?;
        let leaf_cert =
            parse_certificate(&leaf.der).map_err(|e| CaError::Signing(e.to_string()))?;
        if leaf_cert.issuer().as_raw() != ca.subject().as_raw() {
            return Err(CaError::Corrupt(
                "issued certificates would not name the CA certificate's subject as issuer".into(),
            ));
        }
        leaf_cert
            .verify_signature(Some(ca.public_key()))
            .map_err(|e| CaError::Corrupt(format!("self-test signature does not verify: {e}")))?;
        if let Some(upstream) = &self.upstream {
            // At the CA's NotBefore if it lies ahead (a CA made for a clock a little ahead
            // of this one), else now.
            let at = unix_now()?.max(self.not_before);
            verify_through_upstream(&leaf.cert_chain(), upstream, at)?;
        }
        Ok(())
    }
}

/// [`CertificateAuthority::chain`] of a CA signed by an upstream authority.
fn chain_after_leaf(cert_der: &[u8], upstream: &UpstreamChain) -> Vec<Vec<u8>> {
    std::iter::once(cert_der.to_vec())
        .chain(upstream.intermediates.iter().cloned())
        .collect()
}

/// Path validation of `chain` (leaf first) against `upstream.roots` with webpki at `at`
/// (Unix seconds), for client and server auth: what every rustls peer of the SVID will
/// do.
fn verify_through_upstream(
    chain: &[Vec<u8>],
    upstream: &UpstreamChain,
    at: i64,
) -> Result<(), CaError> {
    let failed = |what: String| {
        CaError::Upstream(UpstreamError {
            field: "cert_file_path",
            path: None,
            reason: what,
        })
    };
    let root_ders: Vec<CertificateDer<'_>> = upstream
        .roots
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(d)
                .map_err(|e| failed(format!("a root is not a usable trust anchor: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let [leaf, intermediates @ ..] = chain else {
        return Err(CaError::Signing("empty chain".into()));
    };
    let leaf = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| CaError::Signing(format!("self-test SVID: {e}")))?;
    let now = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(at).unwrap_or(0),
    ));
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| {
            failed(format!(
                "an SVID signed under the upstream CA does not verify to the upstream roots \
                 with rustls/webpki: {e:?}"
            ))
        })?;
    }
    Ok(())
}

/// The CA that signs now, switched to the next one when a rotation activates it.
///
/// Cheap to read: each call takes the current [`CertificateAuthority`] under a short
/// read lock (never held across an `.await`) and signs with it, so an activation never
/// tears a signature. The rotation itself (which CA, when) is [`crate::rotation`]'s.
#[derive(Debug)]
pub struct X509Authority {
    current: RwLock<Arc<CertificateAuthority>>,
}

impl X509Authority {
    /// An authority signing with `active`.
    pub fn new(active: Arc<CertificateAuthority>) -> Self {
        Self {
            current: RwLock::new(active),
        }
    }

    /// The CA that signs now.
    pub fn active(&self) -> Arc<CertificateAuthority> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Sign with `next` from now on; returns the CA it replaces.
    pub fn activate(&self, next: Arc<CertificateAuthority>) -> Arc<CertificateAuthority> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, next)
    }

    /// The active CA certificate, DER.
    pub fn certificate_der(&self) -> Vec<u8> {
        self.active().certificate_der().to_vec()
    }

    /// NotAfter of the active CA.
    pub fn not_after(&self) -> SystemTime {
        self.active().not_after()
    }

    /// Hex serial of the active CA.
    pub fn serial_hex(&self) -> String {
        self.active().serial_hex().to_owned()
    }

    /// [`CertificateAuthority::sign_x509_svid`] with the active CA: the SVID's NotAfter
    /// never exceeds that CA's.
    pub fn sign_x509_svid(
        &self,
        public_key_spki_der: &[u8],
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        self.active()
            .sign_x509_svid(public_key_spki_der, spiffe_id, dns_names, ttl)
    }

    /// [`CertificateAuthority::sign_crl`] with the active CA.
    pub fn sign_crl(
        &self,
        crl_number: u64,
        revoked: &[(String, SystemTime)],
        now: SystemTime,
    ) -> Result<Vec<u8>, CaError> {
        self.active().sign_crl(crl_number, revoked, now)
    }
}

/// Strict CSR handling for the agent's own SVID: returns the CSR's public key (SPKI,
/// DER) and nothing else.
///
/// DER only: empty input, PEM, truncated DER, trailing bytes and CSRs over
/// [`MAX_CSR_LEN`] are [`CaError::InvalidCsr`]. The key must pass [`check_public_key`]
/// (checked *before* the signature, so a huge RSA key costs nothing to reject); the
/// self-signature must use an allowed algorithm (ECDSA with SHA-256/384, RSA PKCS#1 v1.5
/// or PSS with SHA-256/384/512; not SHA-1) and verify. Everything else in the CSR
/// (subject, SANs, basic constraints, other extensions) is ignored by design.
pub fn public_key_from_csr(csr_der: &[u8]) -> Result<Vec<u8>, CaError> {
    if csr_der.is_empty() {
        return Err(CaError::InvalidCsr("empty".into()));
    }
    if csr_der.len() > MAX_CSR_LEN {
        return Err(CaError::InvalidCsr(format!(
            "larger than {MAX_CSR_LEN} bytes"
        )));
    }
    if csr_der.starts_with(b"-----BEGIN") || csr_der.first().is_some_and(u8::is_ascii_whitespace) {
        return Err(CaError::InvalidCsr("PEM given; DER expected".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|e| CaError::InvalidCsr(format!("not a DER PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCsr(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    if csr.certification_request_info.version.0 != 0 {
        return Err(CaError::InvalidCsr(format!(
            "unsupported version {}",
            csr.certification_request_info.version.0
        )));
    }
    let spki = csr.certification_request_info.subject_pki.raw;
    check_public_key(spki)?;

    let alg = &csr.signature_algorithm.algorithm;
    let allowed = [
        &OID_SIG_ECDSA_WITH_SHA256,
        &OID_SIG_ECDSA_WITH_SHA384,
        &OID_PKCS1_SHA256WITHRSA,
        &OID_PKCS1_SHA384WITHRSA,
        &OID_PKCS1_SHA512WITHRSA,
        &OID_PKCS1_RSASSAPSS,
    ];
    if !allowed.contains(&alg) {
        return Err(CaError::InvalidCsr(format!(
            "signature algorithm {alg} is not allowed"
        )));
    }
    csr.verify_signature()
        .map_err(|e| CaError::InvalidCsr(format!("self-signature does not verify: {e}")))?;
    Ok(spki.to_vec())
}

/// The key policy for SVID public keys: EC P-256 or P-384 (uncompressed point on the
/// curve), or RSA with a 2048..=4096-bit modulus and exponent 65537. Everything else
/// (RSA-1024, RSA-16384, other curves, Ed25519 for now, DSA, malformed or
/// non-canonical SPKI, trailing bytes) is [`CaError::KeyPolicy`].
pub fn check_public_key(spki_der: &[u8]) -> Result<(), CaError> {
    parse_policy_key(spki_der).map(drop)
}

/// The SPIFFE ID in the single URI SAN of a DER certificate.
///
/// Errors ([`CaError::InvalidCertificate`]) on malformed DER or trailing bytes, no SAN
/// extension, zero or several URI SANs, or a URI that is not a canonical leaf SPIFFE ID.
/// Chain verification is the caller's job (TLS).
pub fn spiffe_id_of_certificate(der: &[u8]) -> Result<SpiffeId, CaError> {
    let id = tessera_plugin_sdk::x509::spiffe_id_of_certificate(der)
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))?;
    if id.is_trust_domain_id() {
        return Err(CaError::InvalidCertificate(
            "URI SAN is a trust domain ID, not a leaf SPIFFE ID".into(),
        ));
    }
    Ok(id)
}

/// Serial number of a DER certificate: lowercase hex, no separators, no leading zeros
/// (the format of [`IssuedCertificate::serial_hex`]). Zero or negative serials are
/// errors.
pub fn serial_of_certificate(der: &[u8]) -> Result<String, CaError> {
    tessera_plugin_sdk::x509::serial_of_certificate(der)
        .map_err(|e| CaError::InvalidCertificate(e.to_string()))
}

// ---------------------------------------------------------------------------------------
// Certificate profiles.

/// The CA certificate. rcgen's defaults are for tests (placeholder CN, serial derived
/// from the key, centuries of validity), so every field is set here.
fn ca_params(
    trust_domain: &TrustDomain,
    serial: SerialNumber,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tessera");
    dn.push(
        DnType::CommonName,
        format!("tessera CA {}", trust_domain.name()),
    );
    // A serialNumber attribute makes every CA's subject unique, so a rotated CA is never
    // confused with its predecessor by name-based chain building.
    let serial_attr = rcgen::string::PrintableString::try_from(serial_hex(&serial))
        .map_err(|e| CaError::Signing(format!("CA subject: {e}")))?;
    dn.push(
        DnType::CustomDnType(OID_AT_SERIAL_NUMBER.to_vec()),
        DnValue::PrintableString(serial_attr),
    );

    let mut p = CertificateParams::default();
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(serial);
    // The trust domain ID as URI SAN, as SPIRE does. The subject is non-empty, so rcgen
    // leaves this SAN non-critical.
    p.subject_alt_names = vec![SanType::URI(ia5(&trust_domain.id_string())?)];
    p.distinguished_name = dn;
    // No path length constraint: rotation and upstream authorities may add levels.
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // rcgen always marks keyUsage critical.
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.extended_key_usages = Vec::new();
    p.name_constraints = None;
    p.crl_distribution_points = Vec::new();
    p.custom_extensions = Vec::new();
    // Self-signed: the subject key identifier (written for CA certificates) suffices.
    p.use_authority_key_identifier_extension = false;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// The X509-SVID profile (X509-SVID spec §4, SECURITY.md §3.7 item 67).
///
/// The subject is empty, so rcgen marks the subjectAltName extension critical on its
/// own (RFC 5280 §4.2.1.6, its `write_subject_alt_names`); a test pins this, so a
/// change in rcgen cannot silently drop the criticality.
fn leaf_params(
    sans: Vec<SanType>,
    serial: SerialNumber,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.not_before = not_before;
    p.not_after = not_after;
    p.serial_number = Some(serial);
    p.subject_alt_names = sans;
    p.distinguished_name = DistinguishedName::new();
    // Writes basicConstraints (critical) with cA = FALSE, and a subject key identifier.
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.name_constraints = None;
    p.crl_distribution_points = Vec::new();
    p.custom_extensions = Vec::new();
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    p
}

/// Load-time checks of the CA certificate against the key and the configuration (its
/// self-signature only when it is a root; an upstream-signed CA's path is proven by its
/// self-test).
fn check_ca_certificate(
    cert: &X509Certificate<'_>,
    key_spki_der: &[u8],
    trust_domain: &TrustDomain,
    self_signed: bool,
) -> Result<(), CaError> {
    let corrupt = |what: &str| CaError::Corrupt(what.to_owned());
    let bc = cert
        .basic_constraints()
        .map_err(|e| corrupt(&format!("bad basicConstraints: {e}")))?
        .ok_or_else(|| corrupt("no basicConstraints"))?;
    if !bc.value.ca {
        return Err(corrupt("not a CA certificate (basicConstraints CA=false)"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| corrupt(&format!("bad keyUsage: {e}")))?
        .ok_or_else(|| corrupt("no keyUsage"))?;
    if !ku.value.key_cert_sign() {
        return Err(corrupt("keyUsage lacks keyCertSign"));
    }
    if !ku.value.crl_sign() {
        // Every CA tessera creates has it; one made elsewhere may not. SVIDs still
        // work, but no CRL can be signed, so revoked instances are only cut off by the
        // agents and by expiry.
        tracing::warn!(
            "the CA certificate's keyUsage lacks cRLSign; instance revocations cannot be \
             published as a CRL"
        );
    }
    if cert.public_key().raw != key_spki_der {
        return Err(CaError::Corrupt(
            "the CA certificate does not certify the CA key".into(),
        ));
    }
    if self_signed {
        cert.verify_signature(None)
            .map_err(|e| corrupt(&format!("self-signature does not verify: {e}")))?;
    }
    let configured = trust_domain.id_string();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| corrupt(&format!("bad subjectAltName: {e}")))?;
    let found: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if found != [configured.as_str()] {
        return Err(CaError::TrustDomainMismatch {
            configured,
            found: found.join(", "),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Key policy.

/// Checks the policy and returns the key in the form rcgen signs over.
fn parse_policy_key(spki_der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, CaError> {
    let policy = |m: String| CaError::KeyPolicy(m);
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| policy(format!("malformed SubjectPublicKeyInfo: {e}")))?;
    if !rest.is_empty() {
        return Err(policy(format!(
            "{} trailing bytes after SubjectPublicKeyInfo",
            rest.len()
        )));
    }
    if spki.subject_public_key.unused_bits != 0 {
        return Err(policy("public key BIT STRING has unused bits".into()));
    }
    let alg = &spki.algorithm.algorithm;
    let key_bytes: &[u8] = &spki.subject_public_key.data;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| policy("EC key without a named curve".into()))?;
        let (verify_alg, point_len): (
            &'static aws_lc_rs::signature::EcdsaVerificationAlgorithm,
            usize,
        ) = if curve == OID_EC_P256 {
            (&aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1, 65)
        } else if curve == OID_NIST_EC_P384 {
            (&aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1, 97)
        } else {
            return Err(policy(format!(
                "unsupported EC curve {curve}; allowed: P-256, P-384"
            )));
        };
        if key_bytes.len() != point_len || key_bytes.first() != Some(&4) {
            return Err(policy(
                "EC point must be uncompressed and of the curve's size".into(),
            ));
        }
        aws_lc_rs::signature::ParsedPublicKey::new(verify_alg, key_bytes)
            .map_err(|e| policy(format!("EC point is not on the curve: {e}")))?;
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let rsa = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => rsa,
            _ => return Err(policy("malformed RSA public key".into())),
        };
        let modulus = strip_leading_zeros(rsa.modulus);
        let bits = bit_len(modulus);
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(policy(format!(
                "RSA key of {bits} bits; allowed: {RSA_MIN_BITS} to {RSA_MAX_BITS}"
            )));
        }
        if modulus.last().is_none_or(|b| b & 1 == 0) {
            return Err(policy("RSA modulus is even".into()));
        }
        let exponent = rsa
            .try_exponent()
            .map_err(|_| policy("malformed RSA exponent".into()))?;
        if exponent != RSA_EXPONENT {
            return Err(policy(format!(
                "RSA exponent {exponent}; only {RSA_EXPONENT} is allowed"
            )));
        }
        aws_lc_rs::signature::ParsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
            key_bytes,
        )
        .map_err(|e| policy(format!("RSA key rejected: {e}")))?;
    } else if *alg == OID_SIG_ED25519 {
        return Err(policy(
            "Ed25519 keys are not supported yet; use EC P-256".into(),
        ));
    } else {
        return Err(policy(format!(
            "unsupported key algorithm {alg}; allowed: EC P-256/P-384, RSA 2048-4096"
        )));
    }

    // What gets signed is rcgen's re-encoding of the key: insist it is byte-identical to
    // the input, so the certificate carries exactly the caller's key (this also rejects
    // odd algorithm parameters such as RSA without NULL).
    let key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| policy(format!("unsupported SubjectPublicKeyInfo: {e}")))?;
    if key.subject_public_key_info() != spki_der {
        return Err(policy("non-canonical SubjectPublicKeyInfo encoding".into()));
    }
    Ok(key)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Bit length of a big-endian unsigned integer without leading zero bytes.
fn bit_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        None => 0,
        Some(first) => bytes.len() * 8 - first.leading_zeros() as usize,
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers.

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, CaError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::InvalidCertificate(format!("not a DER certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(CaError::InvalidCertificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        )));
    }
    Ok(cert)
}

fn serial_hex(serial: &SerialNumber) -> String {
    hex::encode(strip_leading_zeros(serial.as_ref()))
}

/// 128 random bits, top bit cleared (positive), never zero (RFC 5280 §4.1.2.2).
fn random_serial() -> Result<SerialNumber, CaError> {
    loop {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| CaError::Signing("the system RNG failed".into()))?;
        bytes[0] &= 0x7f;
        if bytes.iter().any(|b| *b != 0) {
            return Ok(SerialNumber::from_slice(strip_leading_zeros(&bytes)));
        }
    }
}

/// The DNS SAN check at signing: the same rule as `entry create` applies
/// ([`crate::admin::validate_dns_name`]), so an entry the server accepted never fails to
/// sign for its DNS names.
fn check_dns_name(name: &str) -> Result<(), CaError> {
    crate::admin::validate_dns_name(name).map_err(CaError::InvalidRequest)
}

fn ia5(s: &str) -> Result<rcgen::string::Ia5String, CaError> {
    rcgen::string::Ia5String::try_from(s)
        .map_err(|e| CaError::InvalidRequest(format!("{s:?} is not IA5: {e}")))
}

/// Exactly one `CERTIFICATE` PEM block and nothing else that PEM parsing recognises.
pub(crate) fn pem_decode_single_certificate(pem: &[u8]) -> Result<Vec<u8>, CaError> {
    let mut reader = pem;
    let mut found = None;
    loop {
        match rustls_pemfile::read_one(&mut reader) {
            Ok(None) => break,
            Ok(Some(rustls_pemfile::Item::X509Certificate(der))) if found.is_none() => {
                found = Some(der.to_vec());
            }
            Ok(Some(_)) => {
                return Err(CaError::Corrupt(
                    "a CA certificate file must hold exactly one CERTIFICATE block".into(),
                ));
            }
            Err(e) => return Err(CaError::Corrupt(format!("bad PEM: {e:?}"))),
        }
    }
    found.ok_or_else(|| CaError::Corrupt("no CERTIFICATE block".into()))
}

fn backdate_secs() -> i64 {
    i64::try_from(BACKDATE.as_secs()).unwrap_or(0)
}

fn unix_of(time: SystemTime) -> Result<i64, CaError> {
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Signing("time before 1970".into()))?;
    i64::try_from(since.as_secs()).map_err(|_| CaError::Signing("time out of range".into()))
}

fn unix_now() -> Result<i64, CaError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CaError::Signing("system clock is before 1970".into()))?;
    i64::try_from(since.as_secs()).map_err(|_| CaError::Signing("system clock out of range".into()))
}

fn to_offset(unix: i64) -> Result<OffsetDateTime, CaError> {
    let t = OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|_| CaError::Signing(format!("time {unix} out of range")))?;
    // X.509 GeneralizedTime has four year digits.
    if t.year() > 9999 || t.year() < 1950 {
        return Err(CaError::Signing(format!(
            "time {unix} out of the X.509 range"
        )));
    }
    Ok(t)
}

fn system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use rcgen::{CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256};
    use rustls::pki_types::{CertificateDer, UnixTime};
    use tessera_plugin_keymanager::MemoryKeyManager;
    use tessera_plugin_sdk::keymanager::{KeyManager, KeyType};
    use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse_leaf(&format!("spiffe://example.org{path}")).unwrap()
    }

    /// A key from the memory key manager.
    fn test_key(key_type: KeyType) -> Arc<dyn SigningKey> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(MemoryKeyManager::new().generate_key("x509-ca-test", key_type))
            .unwrap()
    }

    fn new_ca_with_ttl(ttl: Duration) -> CertificateAuthority {
        CertificateAuthority::self_signed(test_key(KeyType::EcP256), &td(), ttl, SystemTime::now())
            .unwrap()
    }

    fn new_ca() -> CertificateAuthority {
        new_ca_with_ttl(24 * HOUR)
    }

    fn csr_for(key: &KeyPair, params: &CertificateParams) -> Vec<u8> {
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn plain_csr() -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_for(&key, &CertificateParams::default());
        (key, der)
    }

    fn now_unix() -> i64 {
        unix_now().unwrap()
    }

    /// Full path validation with webpki (strict DER, chain, EKU) plus x509-parser's
    /// signature check.
    fn verify_chain(ca_der: &[u8], leaf_der: &[u8]) {
        let ca_cert = CertificateDer::from(ca_der.to_vec());
        let anchor = webpki::anchor_from_trusted_cert(&ca_cert).unwrap();
        let leaf = CertificateDer::from(leaf_der.to_vec());
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_secs(now_unix() as u64));
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .unwrap();
        }
        let ca = parse_certificate(ca_der).unwrap();
        let leaf = parse_certificate(leaf_der).unwrap();
        leaf.verify_signature(Some(ca.public_key())).unwrap();
    }

    /// Every item of SECURITY.md §3.7 item 67 plus the X509-SVID profile.
    fn check_svid_profile(
        ca: &CertificateAuthority,
        issued: &IssuedCertificate,
        want_id: &SpiffeId,
        want_dns: &[&str],
    ) {
        let cert = parse_certificate(&issued.der).unwrap();
        // Empty subject, issuer = CA subject.
        assert_eq!(cert.subject().iter().count(), 0, "empty subject");
        let ca_cert = parse_certificate(ca.certificate_der()).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca_cert.subject().as_raw());
        assert_eq!(cert.version().0, 2, "X.509 v3");

        // Exactly one URI SAN, the entry's ID, in a critical SAN extension; DNS SANs.
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            san.critical,
            "SAN must be critical when the subject is empty"
        );
        let uris: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(uris, [want_id.as_str()]);
        let dns: Vec<_> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::DNSName(d) = n {
                    Some(*d)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(dns, want_dns);
        assert_eq!(
            san.value.general_names.len(),
            1 + want_dns.len(),
            "no other name types"
        );
        assert_eq!(spiffe_id_of_certificate(&issued.der).unwrap(), *want_id);

        // CA=false, critical.
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical);
        assert!(!bc.value.ca);
        assert!(!cert.is_ca());

        // keyUsage critical, digitalSignature only.
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!ku.value.crl_sign());
        assert_eq!(ku.value.flags, 1, "digitalSignature and nothing else");

        // EKU serverAuth + clientAuth, nothing else.
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.any && !eku.value.code_signing && eku.value.other.is_empty());

        // Key identifiers: AKI = CA's SKI.
        let ca_ski = ca_cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(aki, ca_ski);

        // Only the extensions we chose.
        let mut oids: Vec<String> = cert
            .extensions()
            .iter()
            .map(|e| e.oid.to_id_string())
            .collect();
        oids.sort();
        assert_eq!(
            oids,
            [
                "2.5.29.14",
                "2.5.29.15",
                "2.5.29.17",
                "2.5.29.19",
                "2.5.29.35",
                "2.5.29.37"
            ],
            "SKI, KU, SAN, BC, AKI, EKU"
        );

        // Validity: NotBefore back-dated by at most 10 s (+ test slack), NotAfter within the CA's.
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        let now = now_unix();
        assert!(
            now - nb >= 10 - 1 && now - nb <= 10 + 5,
            "backdate {}",
            now - nb
        );
        assert!(na <= ca_cert.validity().not_after.timestamp());
        assert_eq!(system_time(nb), issued.not_before);
        assert_eq!(system_time(na), issued.not_after);

        // Serial: positive, at most 128 bits, reported consistently.
        let raw = cert.raw_serial();
        assert!(raw[0] & 0x80 == 0 && raw.len() <= 17);
        assert_eq!(
            serial_of_certificate(&issued.der).unwrap(),
            issued.serial_hex
        );

        verify_chain(ca.certificate_der(), &issued.der);
    }

    #[test]
    fn ca_certificate_profile() {
        let ca = new_ca();
        let cert = parse_certificate(ca.certificate_der()).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            [GeneralName::URI("spiffe://example.org")]
        );
        let subject = cert.subject().to_string();
        assert!(subject.contains("O=tessera"), "{subject}");
        assert!(subject.contains("CN=tessera CA example.org"), "{subject}");
        assert!(subject.contains(&ca.serial_hex), "{subject}");
        assert!(
            cert.iter_extensions()
                .any(|e| e.oid.to_id_string() == "2.5.29.14"),
            "SKI"
        );
        let raw = cert.raw_serial();
        assert!(raw[0] & 0x80 == 0 && raw.len() <= 16);
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        assert!((now_unix() - nb - 10).abs() <= 2);
        assert_eq!(na - nb, 24 * 3600 + 10);
        assert_eq!(ca.not_after(), system_time(na));
        cert.verify_signature(None).unwrap();
        // Our PEM encoder agrees with the file and decodes back.
        assert_eq!(
            pem_decode_single_certificate(ca.certificate_pem().as_bytes()).unwrap(),
            ca.certificate_der()
        );
        assert!(format!("{ca:?}").contains("[elided]"));
    }

    #[test]
    fn debug_hides_key_and_names_key_id() {
        let ca = new_ca();
        let debug = format!("{ca:?}");
        assert!(
            debug.contains("[elided]") && debug.contains("x509-ca-test"),
            "{debug}"
        );
        assert!(!debug.contains("PRIVATE"), "{debug}");
        assert_eq!(ca.key_id(), "x509-ca-test");
        let cert = parse_certificate(ca.certificate_der()).unwrap();
        assert_eq!(cert.public_key().raw, ca.public_key_der());
    }

    #[test]
    fn reload_gives_same_ca_and_chains() {
        let key = test_key(KeyType::EcP256);
        let ca = CertificateAuthority::self_signed(
            Arc::clone(&key),
            &td(),
            24 * HOUR,
            SystemTime::now(),
        )
        .unwrap();
        let reloaded =
            CertificateAuthority::from_certificate(key, ca.certificate_der().to_vec(), &td())
                .unwrap();
        assert_eq!(reloaded.certificate_der(), ca.certificate_der());
        assert_eq!(reloaded.certificate_pem(), ca.certificate_pem());
        assert_eq!(reloaded.serial_hex(), ca.serial_hex());
        assert_eq!(reloaded.not_after(), ca.not_after());

        // A leaf from the reloaded CA chains to the original certificate.
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let issued = reloaded
            .sign_x509_svid(&spki, &id("/workload"), &[], HOUR)
            .unwrap();
        check_svid_profile(&ca, &issued, &id("/workload"), &[]);
        let issued = ca
            .sign_x509_svid(&spki, &id("/workload"), &[], HOUR)
            .unwrap();
        verify_chain(reloaded.certificate_der(), &issued.der);
    }

    #[test]
    fn x509_authority_switches_on_activation() {
        let first = Arc::new(new_ca());
        let second = Arc::new(new_ca_with_ttl(HOUR));
        let authority = X509Authority::new(Arc::clone(&first));
        assert_eq!(authority.serial_hex(), first.serial_hex());
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let before = authority
            .sign_x509_svid(&spki, &id("/w"), &[], 48 * HOUR)
            .unwrap();
        verify_chain(first.certificate_der(), &before.der);
        let old = authority.activate(Arc::clone(&second));
        assert_eq!(old.serial_hex(), first.serial_hex());
        let after = authority
            .sign_x509_svid(&spki, &id("/w"), &[], 48 * HOUR)
            .unwrap();
        verify_chain(second.certificate_der(), &after.der);
        // NotAfter never exceeds the issuing CA's.
        assert_eq!(after.not_after, second.not_after());
        assert_eq!(before.not_after, first.not_after());
        assert_eq!(authority.certificate_der(), second.certificate_der());
    }

    #[test]
    fn issued_leaf_follows_the_profile() {
        let ca = new_ca();
        let (key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        assert_eq!(spki, key.subject_public_key_info());
        let dns = vec![
            "web.example.org".to_string(),
            "*.svc.example.org".to_string(),
        ];
        let issued = ca
            .sign_x509_svid(&spki, &id("/ns/prod/web"), &dns, HOUR)
            .unwrap();
        check_svid_profile(
            &ca,
            &issued,
            &id("/ns/prod/web"),
            &["web.example.org", "*.svc.example.org"],
        );
        let cert = parse_certificate(&issued.der).unwrap();
        assert_eq!(
            cert.public_key().raw,
            spki.as_slice(),
            "exactly the caller's key"
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 10);

        let second = ca
            .sign_x509_svid(&spki, &id("/ns/prod/web"), &dns, HOUR)
            .unwrap();
        assert_ne!(second.serial_hex, issued.serial_hex, "fresh random serials");
    }

    #[test]
    fn not_after_is_clamped_to_the_ca() {
        let ca = new_ca_with_ttl(HOUR);
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let issued = ca
            .sign_x509_svid(&spki, &id("/w"), &[], 1000 * HOUR)
            .unwrap();
        assert_eq!(issued.not_after, ca.not_after());
        check_svid_profile(&ca, &issued, &id("/w"), &[]);
        // Even a TTL that overflows every clock is clamped, not an error.
        let issued = ca
            .sign_x509_svid(&spki, &id("/w"), &[], Duration::MAX)
            .unwrap();
        assert_eq!(issued.not_after, ca.not_after());
    }

    #[test]
    fn rsa_and_p384_keys_are_signed() {
        let ca = new_ca();
        let rsa =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        for key in [rsa, p384] {
            let spki = public_key_from_csr(&csr_for(&key, &CertificateParams::default())).unwrap();
            let issued = ca.sign_x509_svid(&spki, &id("/k"), &[], HOUR).unwrap();
            check_svid_profile(&ca, &issued, &id("/k"), &[]);
        }
    }

    /// SECURITY.md §3.7 item 63.
    #[test]
    fn malformed_csrs_are_invalid() {
        let (key, der) = plain_csr();
        let pem = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut trailing = der.clone();
        trailing.push(0);
        let mut trailing_seq = der.clone();
        trailing_seq.extend_from_slice(&der);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("pem", pem.into_bytes()),
            ("truncated by one", der[..der.len() - 1].to_vec()),
            ("truncated half", der[..der.len() / 2].to_vec()),
            ("one byte", der[..1].to_vec()),
            ("trailing zero", trailing),
            ("two CSRs", trailing_seq),
            ("garbage", b"hello world".to_vec()),
            ("huge", vec![0x30; MAX_CSR_LEN + 1]),
        ];
        for (name, input) in cases {
            match public_key_from_csr(&input) {
                Err(CaError::InvalidCsr(msg)) => assert!(!msg.is_empty(), "{name}"),
                other => panic!("{name}: expected InvalidCsr, got {other:?}"),
            }
        }
    }

    /// SECURITY.md §3.7 item 64.
    #[test]
    fn csr_with_bad_self_signature_is_invalid() {
        let (_key, der) = plain_csr();
        // Last byte: inside the ECDSA signature's s integer.
        let mut bad_sig = der.clone();
        *bad_sig.last_mut().unwrap() ^= 0x01;
        // A byte inside the signed request info (the public key point).
        let spki = public_key_from_csr(&der).unwrap();
        let pos = der
            .windows(spki.len())
            .position(|w| w == spki.as_slice())
            .unwrap();
        let mut bad_info = der.clone();
        bad_info[pos + spki.len() - 1] ^= 0x01; // still a DER point, but a different key
        for (name, input) in [("signature", bad_sig), ("info", bad_info)] {
            match public_key_from_csr(&input) {
                Err(CaError::InvalidCsr(_)) | Err(CaError::KeyPolicy(_)) => {}
                other => panic!("{name}: expected rejection, got {other:?}"),
            }
        }
        // Signature tampering specifically is InvalidCsr.
        let mut bad_sig = der;
        *bad_sig.last_mut().unwrap() ^= 0x01;
        assert!(
            matches!(public_key_from_csr(&bad_sig), Err(CaError::InvalidCsr(m)) if m.contains("self-signature"))
        );
    }

    /// SECURITY.md §3.7 item 65 (CVE-2021-27098): only the key is taken from the CSR.
    #[test]
    fn csr_requests_are_ignored() {
        let ca = new_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "admin");
        params.subject_alt_names = vec![
            SanType::URI(ia5("spiffe://example.org/admin").unwrap()),
            SanType::URI(ia5("spiffe://other.org/admin").unwrap()),
            SanType::DnsName(ia5("evil.example").unwrap()),
        ];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 2, 3, 4],
            vec![0x05, 0x00],
        )];
        let csr = csr_for(&key, &params);

        let spki = public_key_from_csr(&csr).unwrap();
        assert_eq!(spki, key.subject_public_key_info());
        let entry_id = id("/ns/prod/web");
        let issued = ca.sign_x509_svid(&spki, &entry_id, &[], HOUR).unwrap();
        check_svid_profile(&ca, &issued, &entry_id, &[]);
        let cert = parse_certificate(&issued.der).unwrap();
        assert!(
            !cert
                .iter_extensions()
                .any(|e| e.oid.to_id_string() == "1.2.3.4")
        );
        assert!(!issued.der.windows(5).any(|w| w == b"admin"));
        assert!(!issued.der.windows(4).any(|w| w == b"evil"));
    }

    // Hand-built DER for keys rcgen / aws-lc cannot generate.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    fn rsa_spki(bits: usize, exponent: &[u8]) -> Vec<u8> {
        let mut modulus = vec![0u8];
        modulus.push(0xc5);
        modulus.extend(std::iter::repeat_n(0x5a, bits / 8 - 2));
        modulus.push(0x01); // odd
        let rsa_key = tlv(0x30, &[tlv(0x02, &modulus), tlv(0x02, exponent)].concat());
        let alg = tlv(
            0x30,
            &[
                tlv(
                    0x06,
                    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
                ),
                vec![0x05, 0x00],
            ]
            .concat(),
        );
        let bitstring = tlv(0x03, &[vec![0x00], rsa_key].concat());
        tlv(0x30, &[alg, bitstring].concat())
    }

    fn ec_spki(curve_oid: &[u8], point: &[u8]) -> Vec<u8> {
        let alg = tlv(
            0x30,
            &[
                tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
                tlv(0x06, curve_oid),
            ]
            .concat(),
        );
        let bitstring = tlv(0x03, &[&[0x00][..], point].concat());
        tlv(0x30, &[alg, bitstring].concat())
    }

    const P256_OID: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

    /// SECURITY.md §3.7 item 66.
    #[test]
    fn key_policy() {
        let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        check_public_key(&p256.subject_public_key_info()).unwrap();
        // The hand builder agrees with real encodings.
        assert_eq!(
            ec_spki(P256_OID, p256.der_bytes()),
            p256.subject_public_key_info()
        );
        let rsa =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        check_public_key(&rsa.subject_public_key_info()).unwrap();

        let e65537 = [0x01, 0x00, 0x01];
        let mut trailing = p256.subject_public_key_info();
        trailing.push(0);
        let mut compressed = vec![0x02];
        compressed.extend_from_slice(&p256.der_bytes()[1..33]);
        let mut off_curve = vec![0x04];
        off_curve.extend([0x01; 64]);
        let p521 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("rsa-1024", rsa_spki(1024, &e65537)),
            ("rsa-2040", rsa_spki(2040, &e65537)),
            ("rsa-4104", rsa_spki(4104, &e65537)),
            ("rsa-16384", rsa_spki(16384, &e65537)),
            ("rsa e=3", rsa_spki(2048, &[0x03])),
            ("p-521", p521.subject_public_key_info()),
            ("ed25519", ed25519.subject_public_key_info()),
            (
                "secp256k1",
                ec_spki(&[0x2b, 0x81, 0x04, 0x00, 0x0a], p256.der_bytes()),
            ),
            ("compressed point", ec_spki(P256_OID, &compressed)),
            ("point off the curve", ec_spki(P256_OID, &off_curve)),
            ("trailing bytes", trailing),
            ("empty", Vec::new()),
            ("garbage", b"not a key".to_vec()),
        ];
        for (name, spki) in cases {
            match check_public_key(&spki) {
                Err(CaError::KeyPolicy(msg)) => eprintln!("{name}: {msg}"),
                other => panic!("{name}: expected KeyPolicy, got {other:?}"),
            }
        }

        // Cost stays bounded: a 16384-bit key is rejected on size alone.
        let big = rsa_spki(16384, &e65537);
        let start = Instant::now();
        for _ in 0..1000 {
            assert!(check_public_key(&big).is_err());
        }
        assert!(start.elapsed() < Duration::from_secs(5));

        // The CSR path applies the policy too.
        let csr = csr_for(&p521, &CertificateParams::default());
        assert!(matches!(
            public_key_from_csr(&csr),
            Err(CaError::KeyPolicy(_))
        ));
        let csr = csr_for(&ed25519, &CertificateParams::default());
        assert!(matches!(
            public_key_from_csr(&csr),
            Err(CaError::KeyPolicy(_))
        ));
    }

    #[test]
    fn sign_rejects_bad_requests() {
        let ca = new_ca();
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let foreign = SpiffeId::parse_leaf("spiffe://other.org/w").unwrap();
        let td_only = SpiffeId::parse("spiffe://example.org").unwrap();
        for (name, r) in [
            ("foreign td", ca.sign_x509_svid(&spki, &foreign, &[], HOUR)),
            ("td only", ca.sign_x509_svid(&spki, &td_only, &[], HOUR)),
            (
                "ttl 0",
                ca.sign_x509_svid(&spki, &id("/w"), &[], Duration::ZERO),
            ),
            (
                "ttl 500ms",
                ca.sign_x509_svid(&spki, &id("/w"), &[], Duration::from_millis(500)),
            ),
        ] {
            assert!(
                matches!(r, Err(CaError::InvalidRequest(_))),
                "{name}: {r:?}"
            );
        }
        for bad in [
            "", "*.com", "*", "a..b", "-a.b", "a-.b", "a b.c", "a_b.c", "x.*.c", "é.com", "a.b.",
        ] {
            let r = ca.sign_x509_svid(&spki, &id("/w"), &[bad.to_string()], HOUR);
            assert!(
                matches!(r, Err(CaError::InvalidRequest(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert!(matches!(
            ca.sign_x509_svid(&rsa_spki(1024, &[1, 0, 1]), &id("/w"), &[], HOUR),
            Err(CaError::KeyPolicy(_))
        ));
    }

    #[test]
    fn spiffe_id_and_serial_of_certificates() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let make = |uris: &[&str]| {
            let mut p = CertificateParams::default();
            p.subject_alt_names = uris.iter().map(|u| SanType::URI(ia5(u).unwrap())).collect();
            p.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x12, 0xab]));
            p.self_signed(&key).unwrap().der().to_vec()
        };
        let one = make(&["spiffe://example.org/agent/x"]);
        assert_eq!(
            spiffe_id_of_certificate(&one).unwrap().as_str(),
            "spiffe://example.org/agent/x"
        );
        assert_eq!(serial_of_certificate(&one).unwrap(), "12ab");
        for (name, der) in [
            (
                "two URIs",
                make(&["spiffe://example.org/a", "spiffe://example.org/b"]),
            ),
            ("no SAN", make(&[])),
            ("not spiffe", make(&["https://example.org/a"])),
            ("td only", make(&["spiffe://example.org"])),
            ("not canonical", make(&["spiffe://example.org/a/../b"])),
        ] {
            assert!(
                matches!(
                    spiffe_id_of_certificate(&der),
                    Err(CaError::InvalidCertificate(_))
                ),
                "{name}"
            );
        }
        let mut trailing = one.clone();
        trailing.push(0);
        assert!(spiffe_id_of_certificate(&trailing).is_err());
        assert!(serial_of_certificate(&trailing).is_err());
        assert!(spiffe_id_of_certificate(&one[..one.len() - 3]).is_err());
        assert!(spiffe_id_of_certificate(&[]).is_err());
        // The SAN OID constant we rely on when reading SANs.
        assert_eq!(OID_X509_EXT_SUBJECT_ALT_NAME.to_id_string(), "2.5.29.17");
    }

    /// A CA certificate with chosen validity over `key` (as an older start would have
    /// made), DER.
    fn ca_certificate(
        key: &Arc<dyn SigningKey>,
        trust_domain: &TrustDomain,
        not_before: i64,
        not_after: i64,
    ) -> Vec<u8> {
        let signer = RcgenSigner::new(Arc::clone(key)).unwrap();
        let params = ca_params(
            trust_domain,
            random_serial().unwrap(),
            to_offset(not_before).unwrap(),
            to_offset(not_after).unwrap(),
        )
        .unwrap();
        params.self_signed(&signer).unwrap().der().to_vec()
    }

    #[test]
    fn expired_and_nearly_expired_cas() {
        let now = now_unix();
        let key = test_key(KeyType::EcP256);
        // An expired CA loads (an old CA stays published until it expires) but signs
        // nothing.
        let cert = ca_certificate(&key, &td(), now - 7200, now - 60);
        let expired =
            CertificateAuthority::from_certificate(Arc::clone(&key), cert, &td()).unwrap();
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        assert!(matches!(
            expired.sign_x509_svid(&spki, &id("/w"), &[], HOUR),
            Err(CaError::Expired)
        ));

        // Under 1/6 of the lifetime left: loads and clamps leaves.
        let cert = ca_certificate(&key, &td(), now - 6000, now + 600);
        let ca = CertificateAuthority::from_certificate(key, cert, &td()).unwrap();
        let issued = ca.sign_x509_svid(&spki, &id("/w"), &[], HOUR).unwrap();
        assert_eq!(issued.not_after, system_time(now + 600));
        check_svid_profile(&ca, &issued, &id("/w"), &[]);
    }

    #[test]
    fn inconsistent_certificates_are_refused() {
        let key = test_key(KeyType::EcP256);
        let now = now_unix();
        let cert = ca_certificate(&key, &td(), now - 10, now + 3600);

        // Another trust domain configured.
        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            CertificateAuthority::from_certificate(Arc::clone(&key), cert.clone(), &other),
            Err(CaError::TrustDomainMismatch { .. })
        ));

        // Certificate for another key.
        let foreign = test_key(KeyType::EcP256);
        assert!(matches!(
            CertificateAuthority::from_certificate(foreign, cert.clone(), &td()),
            Err(CaError::Corrupt(_))
        ));

        // Garbage certificate; a leaf instead of a CA.
        assert!(matches!(
            CertificateAuthority::from_certificate(Arc::clone(&key), b"junk".to_vec(), &td()),
            Err(CaError::Corrupt(_))
        ));
        let ca = CertificateAuthority::from_certificate(Arc::clone(&key), cert, &td()).unwrap();
        let leaf = ca
            .sign_x509_svid(key.public_key_der(), &id("/w"), &[], HOUR)
            .unwrap();
        assert!(matches!(
            CertificateAuthority::from_certificate(Arc::clone(&key), leaf.der, &td()),
            Err(CaError::Corrupt(_) | CaError::TrustDomainMismatch { .. })
        ));

        // PEM of two certificates is refused.
        let pem = ca.certificate_pem();
        assert!(pem_decode_single_certificate(format!("{pem}{pem}").as_bytes()).is_err());

        // Zero and absurd CA TTLs.
        let now = SystemTime::now();
        assert!(
            CertificateAuthority::self_signed(Arc::clone(&key), &td(), Duration::ZERO, now)
                .is_err()
        );
        assert!(CertificateAuthority::self_signed(key, &td(), Duration::MAX, now).is_err());
    }

    #[test]
    fn p384_and_rsa_ca_keys_sign() {
        for key_type in [KeyType::EcP384, KeyType::Rsa2048] {
            let ca = CertificateAuthority::self_signed(
                test_key(key_type),
                &td(),
                HOUR,
                SystemTime::now(),
            )
            .unwrap();
            let (_key, csr) = plain_csr();
            let spki = public_key_from_csr(&csr).unwrap();
            let issued = ca.sign_x509_svid(&spki, &id("/w"), &[], HOUR).unwrap();
            verify_chain(ca.certificate_der(), &issued.der);
        }
    }

    /// A CRL from [`CertificateAuthority::sign_crl`] is well formed, signed by the CA,
    /// lists exactly the given serials, and makes rustls/webpki reject a revoked leaf
    /// while a leaf it does not list still passes.
    #[test]
    fn crl_is_signed_and_rejects_revoked_leaves() {
        use rustls::pki_types::CertificateRevocationListDer;

        let ca = new_ca();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = key.subject_public_key_info();
        let revoked = ca
            .sign_x509_svid(&spki, &id("/ai/bot/i-1"), &[], HOUR)
            .unwrap();
        let kept = ca
            .sign_x509_svid(&spki, &id("/ai/bot/i-2"), &[], HOUR)
            .unwrap();
        let now = SystemTime::now();
        let revoked_at = UNIX_EPOCH + Duration::from_secs(now_unix() as u64 - 5);
        let crl = ca
            .sign_crl(7, &[(revoked.serial_hex.clone(), revoked_at)], now)
            .unwrap();

        // x509-parser: structure, issuer, signature, number, times, the one serial.
        let (rest, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
        assert!(rest.is_empty());
        let ca_cert = parse_certificate(ca.certificate_der()).unwrap();
        assert_eq!(parsed.issuer().as_raw(), ca_cert.subject().as_raw());
        parsed.verify_signature(ca_cert.public_key()).unwrap();
        let other_ca = new_ca_with_ttl(HOUR);
        let other_cert = parse_certificate(other_ca.certificate_der()).unwrap();
        assert!(parsed.verify_signature(other_cert.public_key()).is_err());
        assert_eq!(
            parsed.crl_number(),
            Some(&x509_parser::num_bigint::BigUint::from(7_u32))
        );
        assert_eq!(parsed.version(), Some(x509_parser::x509::X509Version(1)));
        let this_update = parsed.last_update().timestamp();
        let next_update = parsed.next_update().unwrap().timestamp();
        assert!((this_update - now_unix()).abs() <= 2);
        assert_eq!(next_update - this_update, CRL_VALIDITY.as_secs() as i64);
        let listed: Vec<(String, i64)> = parsed
            .iter_revoked_certificates()
            .map(|r| {
                (
                    hex::encode(strip_leading_zeros(r.raw_serial())),
                    r.revocation_date.timestamp(),
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![(revoked.serial_hex.clone(), unix_of(revoked_at).unwrap())]
        );

        // rustls/webpki, as a TLS peer reading the Workload API's `crl` field would.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.certificate_der().to_vec()))
            .unwrap();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .with_crls(vec![CertificateRevocationListDer::from(crl.clone())])
        .build()
        .unwrap();
        let at = UnixTime::now();
        let err = verifier
            .verify_client_cert(&CertificateDer::from(revoked.der.clone()), &[], at)
            .unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
        );
        verifier
            .verify_client_cert(&CertificateDer::from(kept.der.clone()), &[], at)
            .unwrap();

        // An empty CRL revokes nothing; a CRL of another CA is not authoritative.
        let empty = ca.sign_crl(8, &[], now).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&provider),
        )
        .with_crls(vec![CertificateRevocationListDer::from(empty)])
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&CertificateDer::from(revoked.der.clone()), &[], at)
            .unwrap();
        let foreign = other_ca
            .sign_crl(1, &[(revoked.serial_hex.clone(), revoked_at)], now)
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .with_crls(vec![CertificateRevocationListDer::from(foreign)])
            .allow_unknown_revocation_status()
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&CertificateDer::from(revoked.der), &[], at)
            .unwrap();
    }

    #[test]
    fn crl_refuses_bad_serials() {
        let ca = new_ca();
        let now = SystemTime::now();
        for bad in ["", "zz", "0x12", &"ab".repeat(21)] {
            assert!(
                matches!(
                    ca.sign_crl(1, &[(bad.to_owned(), now)], now),
                    Err(CaError::InvalidRequest(_))
                ),
                "{bad:?}"
            );
        }
        // An odd number of hex digits is a serial whose first byte is below 0x10.
        let crl = ca.sign_crl(1, &[("abc".to_owned(), now)], now).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
        let serials: Vec<&[u8]> = parsed
            .iter_revoked_certificates()
            .map(|r| r.raw_serial())
            .collect();
        assert_eq!(serials, vec![&[0x0a_u8, 0xbc][..]]);
    }

    #[test]
    fn ca_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CertificateAuthority>();
        assert_send_sync::<X509Authority>();
    }

    #[test]
    fn sign_cost() {
        let ca = new_ca();
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let svid_id = id("/ns/prod/web");
        let dns = vec!["web.example.org".to_string()];
        let n = 1000;
        let start = Instant::now();
        for _ in 0..n {
            ca.sign_x509_svid(&spki, &svid_id, &dns, HOUR).unwrap();
        }
        let sign = start.elapsed() / n;
        let start = Instant::now();
        for _ in 0..n {
            public_key_from_csr(&csr).unwrap();
        }
        let csr_cost = start.elapsed() / n;
        println!("sign_x509_svid: {sign:?} per call; public_key_from_csr: {csr_cost:?} per call");
    }

    // -----------------------------------------------------------------------------------
    // Upstream authority.

    /// A test upstream CA made with rcgen: its key, params and DER.
    struct TestCa {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
    }

    impl TestCa {
        fn pem(&self) -> String {
            tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &self.der)
        }
    }

    fn test_ca_params(cn: &str, not_after: i64) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Upstream Corp");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.serial_number = Some(random_serial().unwrap());
        p.not_before = to_offset(now_unix() - 3600).unwrap();
        p.not_after = to_offset(not_after).unwrap();
        p
    }

    fn test_root_with(params: CertificateParams) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        TestCa { params, key, der }
    }

    fn test_root(cn: &str) -> TestCa {
        test_root_with(test_ca_params(cn, now_unix() + 30 * 24 * 3600))
    }

    fn test_issue(params: CertificateParams, by: &TestCa) -> TestCa {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params
            .signed_by(&key, &Issuer::from_params(&by.params, &by.key))
            .unwrap()
            .der()
            .to_vec();
        TestCa { params, key, der }
    }

    fn upstream_of(cert_pem: &str, key_pem: &str, bundle_pem: Option<&str>) -> UpstreamAuthority {
        UpstreamAuthority::from_pem(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            bundle_pem.map(str::as_bytes),
            SystemTime::now(),
        )
        .unwrap()
    }

    fn upstream_err(cert_pem: &str, key_pem: &str, bundle_pem: Option<&str>) -> UpstreamError {
        UpstreamAuthority::from_pem(
            cert_pem.as_bytes(),
            key_pem.as_bytes(),
            bundle_pem.map(str::as_bytes),
            SystemTime::now(),
        )
        .unwrap_err()
    }

    /// webpki path validation of `chain` (leaf first) against `roots`, both usages.
    pub(crate) fn verify_path(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Result<(), webpki::Error> {
        let root_ders: Vec<CertificateDer<'_>> = roots
            .iter()
            .map(|d| CertificateDer::from(d.as_slice()))
            .collect();
        let anchors: Vec<_> = root_ders
            .iter()
            .map(|d| webpki::anchor_from_trusted_cert(d).unwrap())
            .collect();
        let leaf = CertificateDer::from(chain[0].as_slice());
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|d| CertificateDer::from(d.as_slice()))
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &intermediates,
                UnixTime::now(),
                usage,
                None,
                None,
            )?;
        }
        Ok(())
    }

    fn signed_under(upstream: &UpstreamAuthority, ttl: Duration) -> CertificateAuthority {
        signed_under_with(test_key(KeyType::EcP256), upstream, ttl)
    }

    fn signed_under_with(
        key: Arc<dyn SigningKey>,
        upstream: &UpstreamAuthority,
        ttl: Duration,
    ) -> CertificateAuthority {
        CertificateAuthority::signed_by_upstream(key, &td(), ttl, SystemTime::now(), upstream)
            .unwrap()
    }

    /// The server CA is an intermediate under a self-signed upstream root: SPIFFE CA
    /// profile, path length 0, issuer and AKI of the root; SVIDs carry [leaf, CA] and
    /// verify to the root alone, which is what the bundle publishes.
    #[test]
    fn intermediate_under_an_upstream_root_chains() {
        let root = test_root("Upstream Root");
        let upstream = upstream_of(&root.pem(), &root.key.serialize_pem(), None);
        assert_eq!(upstream.roots(), std::slice::from_ref(&root.der));
        assert!(upstream.chain().is_empty(), "a root is never served");
        let key = test_key(KeyType::EcP256);
        let ca = signed_under_with(Arc::clone(&key), &upstream, 24 * HOUR);
        assert_eq!(ca.trust_anchors(), vec![root.der.clone()]);
        assert_eq!(ca.chain(), [ca.certificate_der().to_vec()]);
        assert!(upstream.signed(ca.certificate_der()));

        let cert = parse_certificate(ca.certificate_der()).unwrap();
        let root_cert = parse_certificate(&root.der).unwrap();
        assert_eq!(cert.issuer().as_raw(), root_cert.subject().as_raw());
        cert.verify_signature(Some(root_cert.public_key())).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            [GeneralName::URI("spiffe://example.org")]
        );
        assert!(
            cert.iter_extensions()
                .any(|e| e.oid.to_id_string() == "2.5.29.35"),
            "authority key identifier"
        );
        let nb = cert.validity().not_before.timestamp();
        let na = cert.validity().not_after.timestamp();
        assert_eq!(na - nb, 24 * 3600 + 10);

        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let issued = ca.sign_x509_svid(&spki, &id("/w"), &[], HOUR).unwrap();
        assert_eq!(issued.chain, [ca.certificate_der().to_vec()]);
        let chain = issued.cert_chain();
        assert_eq!(chain.len(), 2);
        check_svid_profile(&ca, &issued, &id("/w"), &[]);
        verify_path(&chain, std::slice::from_ref(&root.der)).unwrap();
        // The leaf alone does not reach the root: the CA must be in the chain.
        assert!(verify_path(&chain[..1], std::slice::from_ref(&root.der)).is_err());
        // Reloaded from the journal's pieces: same chain, still signs; never over
        // another key than the certificate's.
        let reloaded = CertificateAuthority::from_upstream_certificate(
            key,
            ca.certificate_der().to_vec(),
            &td(),
            ca.upstream().unwrap().clone(),
        )
        .unwrap();
        assert_eq!(reloaded.chain(), ca.chain());
        assert_eq!(reloaded.trust_anchors(), vec![root.der.clone()]);
        let again = reloaded
            .sign_x509_svid(&spki, &id("/w"), &[], HOUR)
            .unwrap();
        verify_path(&again.cert_chain(), std::slice::from_ref(&root.der)).unwrap();
        assert!(
            CertificateAuthority::from_upstream_certificate(
                test_key(KeyType::EcP256),
                ca.certificate_der().to_vec(),
                &td(),
                ca.upstream().unwrap().clone(),
            )
            .is_err()
        );
    }

    /// Upstream CA = an intermediate of a root given in bundle_file_path: SVIDs carry
    /// [leaf, server CA, upstream intermediate] and verify to the root only; the same
    /// with the root appended to cert_file_path and no bundle file.
    #[test]
    fn intermediate_under_an_upstream_intermediate_chains() {
        let root = test_root("Upstream Root");
        let mid = test_issue(
            test_ca_params("Upstream Intermediate", now_unix() + 20 * 24 * 3600),
            &root,
        );
        for (cert_pem, bundle) in [
            (mid.pem(), Some(root.pem())),
            (format!("{}{}", mid.pem(), root.pem()), None),
            (format!("{}{}", mid.pem(), root.pem()), Some(root.pem())),
        ] {
            let upstream = upstream_of(&cert_pem, &mid.key.serialize_pem(), bundle.as_deref());
            assert_eq!(upstream.chain(), std::slice::from_ref(&mid.der));
            assert_eq!(upstream.roots(), std::slice::from_ref(&root.der));
            assert_eq!(upstream.certificate_der(), mid.der);
            let key = test_key(KeyType::EcP256);
            let ca = CertificateAuthority::signed_by_upstream(
                Arc::clone(&key),
                &td(),
                24 * HOUR,
                SystemTime::now(),
                &upstream,
            )
            .unwrap();
            let (_key, csr) = plain_csr();
            let spki = public_key_from_csr(&csr).unwrap();
            let issued = ca.sign_x509_svid(&spki, &id("/w"), &[], HOUR).unwrap();
            let chain = issued.cert_chain();
            assert_eq!(
                chain[1..],
                [ca.certificate_der().to_vec(), mid.der.clone()],
                "leaf, server CA, upstream intermediate"
            );
            verify_path(&chain, std::slice::from_ref(&root.der)).unwrap();
            assert!(verify_path(&chain[..2], std::slice::from_ref(&root.der)).is_err());
            // Reload from the journal's pieces.
            let reloaded = CertificateAuthority::from_upstream_certificate(
                key,
                ca.certificate_der().to_vec(),
                &td(),
                ca.upstream().unwrap().clone(),
            )
            .unwrap();
            assert_eq!(reloaded.chain(), ca.chain());
            let again = reloaded
                .sign_x509_svid(&spki, &id("/w"), &[], HOUR)
                .unwrap();
            verify_path(&again.cert_chain(), std::slice::from_ref(&root.der)).unwrap();
        }
    }

    /// A reloaded upstream-signed CA whose roots do not match its chain is refused.
    #[test]
    fn reload_with_foreign_roots_is_refused() {
        let root = test_root("Upstream Root");
        let upstream = upstream_of(&root.pem(), &root.key.serialize_pem(), None);
        let key = test_key(KeyType::EcP256);
        let ca = CertificateAuthority::signed_by_upstream(
            Arc::clone(&key),
            &td(),
            HOUR,
            SystemTime::now(),
            &upstream,
        )
        .unwrap();
        let other = test_root("Other Root");
        let err = CertificateAuthority::from_upstream_certificate(
            Arc::clone(&key),
            ca.certificate_der().to_vec(),
            &td(),
            UpstreamChain {
                intermediates: Vec::new(),
                roots: vec![other.der],
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");
        // As a self-signed CA it is refused too (its signature is the root's).
        assert!(
            CertificateAuthority::from_certificate(key, ca.certificate_der().to_vec(), &td())
                .is_err()
        );
    }

    /// The CA never outlives the upstream path: NotAfter clamped to the earliest
    /// NotAfter of the upstream CA, its intermediates and the root; SVIDs with it.
    #[test]
    fn not_after_is_clamped_to_the_upstream() {
        let soon = now_unix() + 1800;
        let root = test_root_with(test_ca_params("Short Root", soon));
        let upstream = upstream_of(&root.pem(), &root.key.serialize_pem(), None);
        assert_eq!(upstream.not_after(), soon);
        let ca = signed_under(&upstream, 24 * HOUR);
        assert_eq!(ca.not_after(), system_time(soon));
        let (_key, csr) = plain_csr();
        let spki = public_key_from_csr(&csr).unwrap();
        let issued = ca.sign_x509_svid(&spki, &id("/w"), &[], 24 * HOUR).unwrap();
        assert_eq!(issued.not_after, system_time(soon));

        // An intermediate that outlives its root is capped by the root.
        let root = test_root_with(test_ca_params("Root", now_unix() + 3600));
        let mid = test_issue(test_ca_params("Mid", now_unix() + 30 * 24 * 3600), &root);
        let upstream = upstream_of(&mid.pem(), &mid.key.serialize_pem(), Some(&root.pem()));
        let ca = signed_under(&upstream, 24 * HOUR);
        assert_eq!(ca.not_after(), system_time(not_after_of(&root.der)));
    }

    fn not_after_of(der: &[u8]) -> i64 {
        parse_certificate(der)
            .unwrap()
            .validity()
            .not_after
            .timestamp()
    }

    /// PKCS#8, SEC1 and PKCS#1 keys, P-256, P-384 and RSA upstream keys all sign.
    #[test]
    fn upstream_key_formats() {
        // P-384 in SEC1 (what `openssl ecparam -genkey` writes, parameters block too).
        let params = test_ca_params("P-384 Root", now_unix() + 30 * 24 * 3600);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING,
            &key.serialize_der(),
        )
        .unwrap();
        let sec1 =
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::EcPrivateKeyRfc5915Der>::as_der(
                &pair.private_key(),
            )
            .unwrap();
        let sec1_pem = format!(
            "-----BEGIN EC PARAMETERS-----\nBgUrgQQAIg==\n-----END EC PARAMETERS-----\n{}",
            tessera_plugin_sdk::x509::pem_encode("EC PRIVATE KEY", sec1.as_ref())
        );
        let cert_pem = tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &der);
        let upstream = upstream_of(&cert_pem, &sec1_pem, None);
        let ca = signed_under(&upstream, HOUR);
        let (_k, csr) = plain_csr();
        let issued = ca
            .sign_x509_svid(&public_key_from_csr(&csr).unwrap(), &id("/w"), &[], HOUR)
            .unwrap();
        verify_path(&issued.cert_chain(), &[der]).unwrap();

        // RSA in PKCS#1 (the RSAPrivateKey inside the PKCS#8 envelope) and in PKCS#8.
        let params = test_ca_params("RSA Root", now_unix() + 30 * 24 * 3600);
        let key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let cert_pem = tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &der);
        let pkcs1 = pkcs8_inner_key(&key.serialize_der());
        for key_pem in [
            tessera_plugin_sdk::x509::pem_encode("RSA PRIVATE KEY", &pkcs1),
            key.serialize_pem(),
        ] {
            let upstream = upstream_of(&cert_pem, &key_pem, None);
            let ca = signed_under(&upstream, HOUR);
            let issued = ca
                .sign_x509_svid(&public_key_from_csr(&csr).unwrap(), &id("/w"), &[], HOUR)
                .unwrap();
            verify_path(&issued.cert_chain(), std::slice::from_ref(&der)).unwrap();
        }
    }

    /// The privateKey OCTET STRING of a PKCS#8 PrivateKeyInfo (for RSA: PKCS#1).
    fn pkcs8_inner_key(pkcs8: &[u8]) -> Vec<u8> {
        // SEQUENCE { INTEGER, SEQUENCE alg, OCTET STRING key }
        fn tlv(input: &[u8]) -> (u8, &[u8], &[u8]) {
            let tag = input[0];
            let (len, hdr) = if input[1] & 0x80 == 0 {
                (usize::from(input[1]), 2)
            } else {
                let n = usize::from(input[1] & 0x7f);
                let len = input[2..2 + n]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
                (len, 2 + n)
            };
            (tag, &input[hdr..hdr + len], &input[hdr + len..])
        }
        let (_, body, _) = tlv(pkcs8);
        let (_, _, rest) = tlv(body);
        let (_, _, rest) = tlv(rest);
        let (tag, key, _) = tlv(rest);
        assert_eq!(tag, 0x04, "OCTET STRING");
        key.to_vec()
    }

    /// Each bad upstream input is refused with an error naming the configuration key.
    #[test]
    fn bad_upstream_inputs_are_refused() {
        let root = test_root("Upstream Root");
        let root_key = root.key.serialize_pem();
        let other = test_root("Other Root");
        let expect = |e: UpstreamError, field: &str, words: &str| {
            let text = e.to_string();
            assert_eq!(e.field, field, "{text}");
            assert!(
                text.contains(&format!("server.upstream_authority.{field}")),
                "{text}"
            );
            assert!(text.contains(words), "{words:?} not in {text}");
        };

        // Key and certificate do not match.
        expect(
            upstream_err(&root.pem(), &other.key.serialize_pem(), None),
            "key_file_path",
            "not the key of the first certificate",
        );
        // Not a CA: a leaf, and a CA certificate without keyCertSign.
        let mut leaf_params = test_ca_params("Leaf", now_unix() + 3600);
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf = test_root_with(leaf_params);
        expect(
            upstream_err(&leaf.pem(), &leaf.key.serialize_pem(), None),
            "cert_file_path",
            "not a CA",
        );
        let mut no_sign = test_ca_params("No Sign", now_unix() + 3600);
        no_sign.key_usages = vec![KeyUsagePurpose::CrlSign];
        let no_sign = test_root_with(no_sign);
        expect(
            upstream_err(&no_sign.pem(), &no_sign.key.serialize_pem(), None),
            "cert_file_path",
            "keyCertSign",
        );
        // Expired, and not yet valid.
        let mut expired = test_ca_params("Expired", now_unix() - 60);
        expired.not_before = to_offset(now_unix() - 7200).unwrap();
        let expired = test_root_with(expired);
        expect(
            upstream_err(&expired.pem(), &expired.key.serialize_pem(), None),
            "cert_file_path",
            "expired",
        );
        let mut future = test_ca_params("Future", now_unix() + 7200);
        future.not_before = to_offset(now_unix() + 3600).unwrap();
        let future = test_root_with(future);
        expect(
            upstream_err(&future.pem(), &future.key.serialize_pem(), None),
            "cert_file_path",
            "not valid before",
        );
        // An intermediate without its roots; with unrelated roots; roots that are leaves.
        let mid = test_issue(test_ca_params("Mid", now_unix() + 3600), &root);
        let mid_key = mid.key.serialize_pem();
        expect(
            upstream_err(&mid.pem(), &mid_key, None),
            "cert_file_path",
            "bundle_file_path",
        );
        expect(
            upstream_err(&mid.pem(), &mid_key, Some(&other.pem())),
            "cert_file_path",
            "does not verify",
        );
        expect(
            upstream_err(&mid.pem(), &mid_key, Some(&leaf.pem())),
            "bundle_file_path",
            "not a CA",
        );
        // Chain out of order; a self-signed certificate not in the given bundle.
        expect(
            upstream_err(&format!("{}{}", root.pem(), mid.pem()), &root_key, None),
            "cert_file_path",
            "self-signed but not the last",
        );
        expect(
            upstream_err(&root.pem(), &root_key, Some(&other.pem())),
            "cert_file_path",
            "not in",
        );
        // Path length 0 leaves no room for the server CA.
        let mut tight = test_ca_params("Tight", now_unix() + 3600);
        tight.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let tight = test_root_with(tight);
        expect(
            upstream_err(&tight.pem(), &tight.key.serialize_pem(), None),
            "cert_file_path",
            "path length constraint of 0",
        );
        let mut one = test_ca_params("Root pathlen 1", now_unix() + 3600);
        one.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let one = test_root_with(one);
        let under_one = test_issue(test_ca_params("Mid", now_unix() + 3600), &one);
        expect(
            upstream_err(
                &under_one.pem(),
                &under_one.key.serialize_pem(),
                Some(&one.pem()),
            ),
            "bundle_file_path",
            "path length constraint of 1",
        );
        // URI name constraints.
        let mut constrained = test_ca_params("Constrained", now_unix() + 3600);
        constrained.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.org".into())],
            excluded_subtrees: Vec::new(),
        });
        let dns_only = test_root_with(constrained.clone());
        upstream_of(&dns_only.pem(), &dns_only.key.serialize_pem(), None);
        constrained.name_constraints = None;
        constrained.custom_extensions = vec![uri_name_constraints("example.org")];
        let uri = test_root_with(constrained);
        expect(
            upstream_err(&uri.pem(), &uri.key.serialize_pem(), None),
            "cert_file_path",
            "URI name constraints",
        );
        // Subjects rcgen cannot reproduce as issuer: empty, an attribute twice.
        let mut empty = test_ca_params("x", now_unix() + 3600);
        empty.distinguished_name = DistinguishedName::new();
        let empty = test_root_with(empty);
        expect(
            upstream_err(&empty.pem(), &empty.key.serialize_pem(), None),
            "cert_file_path",
            "empty subject",
        );
        let mut twice = test_ca_params("First CN", now_unix() + 3600);
        twice
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "Second CN");
        let twice = test_root_with(twice);
        expect(
            upstream_err(&twice.pem(), &twice.key.serialize_pem(), None),
            "cert_file_path",
            "repeats attribute 2.5.4.3",
        );
        // Key files: two keys, an encrypted key, a certificate, garbage, nothing.
        for (key_pem, words) in [
            (format!("{root_key}{root_key}"), "exactly one"),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n"
                    .to_owned(),
                "encrypted",
            ),
            (root.pem(), "CERTIFICATE"),
            ("-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n".to_owned(), "PKCS#8"),
            (String::new(), "exactly one"),
        ] {
            expect(upstream_err(&root.pem(), &key_pem, None), "key_file_path", words);
        }
        // Certificate files: a key in it, nothing, garbage.
        expect(
            upstream_err(&format!("{}{root_key}", root.pem()), &root_key, None),
            "cert_file_path",
            "only CERTIFICATE blocks",
        );
        expect(
            upstream_err("", &root_key, None),
            "cert_file_path",
            "no CERTIFICATE",
        );
        expect(
            upstream_err(&root.pem(), &root_key, Some("")),
            "bundle_file_path",
            "no CERTIFICATE",
        );
    }

    /// A nameConstraints extension with one permitted URI subtree (rcgen cannot write
    /// URI constraints).
    fn uri_name_constraints(host: &str) -> CustomExtension {
        let uri = tlv(0x86, host.as_bytes()); // [6] IA5String
        let subtree = tlv(0x30, &uri);
        let permitted = tlv(0xa0, &subtree);
        let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 30], tlv(0x30, &permitted));
        ext.set_criticality(true);
        ext
    }

    /// The key file is read with the secret-file rules: a world- or group-readable key
    /// is refused, naming key_file_path; the files' paths appear in the errors.
    #[test]
    fn key_file_permissions_and_paths() {
        use std::os::unix::fs::PermissionsExt;

        use crate::config::UpstreamAuthorityConfig;

        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let root = test_root("Upstream Root");
        let cert = dir.path().join("upstream.pem");
        let key = dir.path().join("upstream.key");
        std::fs::write(&cert, root.pem()).unwrap();
        std::fs::write(&key, root.key.serialize_pem()).unwrap();
        let config = UpstreamAuthorityConfig::Disk {
            cert_file_path: cert.clone(),
            key_file_path: key.clone(),
            bundle_file_path: None,
        };
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = UpstreamAuthority::load(&config, SystemTime::now()).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.field, "key_file_path", "{text}");
            assert!(
                text.contains("server.upstream_authority.key_file_path")
                    && text.contains(&key.display().to_string())
                    && text.contains("group or others"),
                "{mode:o}: {text}"
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let upstream = UpstreamAuthority::load(&config, SystemTime::now()).unwrap();
            assert_eq!(upstream.roots(), std::slice::from_ref(&root.der));
            assert!(!format!("{upstream:?}").contains("PRIVATE"));
        }
        // Missing files name their key and path.
        for (config, field) in [
            (
                UpstreamAuthorityConfig::Disk {
                    cert_file_path: dir.path().join("missing.pem"),
                    key_file_path: key.clone(),
                    bundle_file_path: None,
                },
                "cert_file_path",
            ),
            (
                UpstreamAuthorityConfig::Disk {
                    cert_file_path: cert.clone(),
                    key_file_path: dir.path().join("missing.key"),
                    bundle_file_path: None,
                },
                "key_file_path",
            ),
            (
                UpstreamAuthorityConfig::Disk {
                    cert_file_path: cert.clone(),
                    key_file_path: key.clone(),
                    bundle_file_path: Some(dir.path().join("missing-roots.pem")),
                },
                "bundle_file_path",
            ),
        ] {
            let err = UpstreamAuthority::load(&config, SystemTime::now()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains("missing"), "{err}");
        }
    }
}
