//! The `disk` upstream authority (`[server.upstream_authority] kind = "disk"`): an
//! existing CA, given as a certificate file and a key file, that signs the server's CA
//! certificates (as SPIRE's `disk` UpstreamAuthority).
//!
//! [`UpstreamAuthority::load`] reads and checks the files, once at start and again each
//! time a CA is prepared; the rotation drops the loaded key once the CA is signed, so
//! the upstream key is in memory only while it is needed. Only the public key of a
//! server CA goes to the upstream key; the server CA keys stay in the key manager. The
//! checks, each failing with an [`UpstreamError`] that names the configuration key:
//!
//! - the files are readable; `cert_file_path` and `bundle_file_path` hold only
//!   `CERTIFICATE` PEM blocks; the key file passes the SDK's secret-file rules (no group
//!   or other permission bits, owned by the server's uid, not a symlink);
//! - the key is an unencrypted ECDSA P-256/P-384 or RSA 2048..=8192 key in PKCS#8, SEC1
//!   or PKCS#1 PEM, and it is the key of the first certificate;
//! - every certificate of `cert_file_path` is a CA (basicConstraints CA=true, keyUsage
//!   keyCertSign) issued by the next one, and the last one chains to a root of
//!   `bundle_file_path` (or is itself self-signed when there is no bundle file);
//! - the chain and its root are valid now; path length constraints leave room for the
//!   server CA; no certificate of the path carries URI name constraints (rustls/webpki
//!   rejects every SPIFFE ID below them).
//!
//! The server CA then proves the whole path with a real signature and a webpki
//! verification (its self-test).

use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use rcgen::{Issuer, PublicKeyData, SignatureAlgorithm};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::config::UpstreamAuthorityConfig;

/// Largest certificate or bundle file read (a chain of a few certificates is a few KiB).
const MAX_CERT_FILE_SIZE: u64 = 1024 * 1024;

/// Smallest and largest RSA upstream key, in bits.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// Why the upstream authority cannot be used. The message names the configuration key
/// (`server.upstream_authority.<field>`) and, when known, the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server.upstream_authority.{field}{}: {reason}", path.as_ref().map(|p| format!(" ({})", p.display())).unwrap_or_default())]
pub struct UpstreamError {
    /// The configuration key: `cert_file_path`, `key_file_path` or `bundle_file_path`.
    pub field: &'static str,
    /// The file, when the error is about one.
    pub path: Option<PathBuf>,
    /// What is wrong.
    pub reason: String,
}

const CERT: &str = "cert_file_path";
const KEY: &str = "key_file_path";
const BUNDLE: &str = "bundle_file_path";

fn err(field: &'static str, reason: impl Into<String>) -> UpstreamError {
    UpstreamError {
        field,
        path: None,
        reason: reason.into(),
    }
}

/// The upstream CA: its key (parsed by aws-lc-rs; the file's bytes are wiped after
/// parsing), the chain that follows a server CA, and the roots the trust bundle
/// publishes. `Debug` never shows the key.
pub struct UpstreamAuthority {
    issuer: Issuer<'static, UpstreamKey>,
    /// The certificates that follow a server CA's own in every chain it serves: the
    /// upstream CA and its intermediates, without a root. DER.
    chain: Vec<Vec<u8>>,
    /// The trust anchors: `bundle_file_path`'s certificates, or the self-signed last
    /// certificate of `cert_file_path`. DER.
    roots: Vec<Vec<u8>>,
    /// The upstream CA certificate (first of `cert_file_path`), DER.
    certificate: Vec<u8>,
    /// Subject of the upstream CA certificate, DER (what a server CA names as issuer).
    subject_der: Vec<u8>,
    /// Subject of the upstream CA certificate, for messages.
    subject: String,
    /// Latest NotBefore and earliest NotAfter of the path (chain and its root), Unix
    /// seconds: a server CA never outlives the path above it.
    not_before: i64,
    not_after: i64,
}

impl fmt::Debug for UpstreamAuthority {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuthority")
            .field("subject", &self.subject)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"[elided]")
            .finish()
    }
}

impl UpstreamAuthority {
    /// Reads and checks the files of `config` (see the module documentation). Errors
    /// name the configuration key and the file. Blocking (file reads).
    pub fn load(config: &UpstreamAuthorityConfig, now: SystemTime) -> Result<Self, UpstreamError> {
        let UpstreamAuthorityConfig::Disk {
            cert_file_path,
            key_file_path,
            bundle_file_path,
        } = config;
        let certs =
            read_public(cert_file_path).map_err(|r| err(CERT, r).with_path(cert_file_path))?;
        let bundle = match bundle_file_path {
            Some(path) => Some(read_public(path).map_err(|r| err(BUNDLE, r).with_path(path))?),
            None => None,
        };
        let mut key_pem = read_key_file(key_file_path).map_err(|e| e.with_path(key_file_path))?;
        let result = Self::from_pem(&certs, &key_pem, bundle.as_deref(), now);
        key_pem.fill(0);
        std::hint::black_box(&key_pem);
        result.map_err(|e| {
            let path = match e.field {
                CERT => cert_file_path.clone(),
                KEY => key_file_path.clone(),
                _ => bundle_file_path.clone().unwrap_or_default(),
            };
            e.with_path(&path)
        })
    }

    /// [`UpstreamAuthority::load`] over file contents: `cert_pem` (the upstream CA, then
    /// its intermediates), `key_pem`, `bundle_pem` (the roots, when the upstream CA is
    /// not itself a root). Errors name the configuration key, not a file.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: Option<&[u8]>,
        now: SystemTime,
    ) -> Result<Self, UpstreamError> {
        let now = crate::state::unix_seconds(now);
        let certs = certificates(cert_pem, CERT)?;
        let parsed = certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                parse(der).map_err(|r| err(CERT, format!("certificate {}: {r}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = UpstreamKey::from_pem(key_pem)?;
        let first = &parsed[0];
        if key.public_key_bits() != first.public_key().subject_public_key.data.as_ref() {
            return Err(err(
                KEY,
                format!(
                    "the key is not the key of the first certificate of cert_file_path ({})",
                    first.subject()
                ),
            ));
        }
        check_issuer_name(first)?;
        for (i, cert) in parsed.iter().enumerate() {
            check_is_ca(cert).map_err(|r| {
                err(
                    CERT,
                    format!("certificate {} ({}): {r}", i + 1, cert.subject()),
                )
            })?;
        }
        // Each certificate is issued by the next; a self-signed one can only be last.
        for (i, pair) in parsed.windows(2).enumerate() {
            let (child, parent) = (&pair[0], &pair[1]);
            if is_self_signed(child) {
                return Err(err(
                    CERT,
                    format!(
                        "certificate {} ({}) is self-signed but not the last one; list the \
                         upstream CA first, then its intermediates, then (optionally) its root",
                        i + 1,
                        child.subject()
                    ),
                ));
            }
            if !issued_by(child, parent) {
                return Err(err(
                    CERT,
                    format!(
                        "certificate {} ({}) is not issued by certificate {} ({}); list the \
                         upstream CA first, then each issuer in turn",
                        i + 1,
                        child.subject(),
                        i + 2,
                        parent.subject()
                    ),
                ));
            }
        }

        // The chain served after a server CA, and the roots it ends at.
        let last_index = parsed.len() - 1;
        let last = &parsed[last_index];
        let (chain_len, roots, root_index): (usize, Vec<Vec<u8>>, usize) = match bundle_pem {
            None => {
                if !is_self_signed(last) {
                    return Err(err(
                        CERT,
                        format!(
                            "the last certificate ({}) is not self-signed: give the roots it \
                             chains to in server.upstream_authority.bundle_file_path",
                            last.subject()
                        ),
                    ));
                }
                (last_index, vec![certs[last_index].clone()], 0)
            }
            Some(bundle_pem) => {
                let roots = certificates(bundle_pem, BUNDLE)?;
                let parsed_roots = roots
                    .iter()
                    .enumerate()
                    .map(|(i, der)| {
                        parse(der).map_err(|r| err(BUNDLE, format!("certificate {}: {r}", i + 1)))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                for (i, root) in parsed_roots.iter().enumerate() {
                    if !root.is_ca() {
                        return Err(err(
                            BUNDLE,
                            format!(
                                "certificate {} ({}) is not a CA (basicConstraints CA=true)",
                                i + 1,
                                root.subject()
                            ),
                        ));
                    }
                }
                if let Some(i) = roots.iter().position(|r| *r == certs[last_index]) {
                    // The root itself closes cert_file_path: it is not served.
                    (last_index, roots, i)
                } else if is_self_signed(last) {
                    return Err(err(
                        CERT,
                        format!(
                            "the last certificate ({}) is self-signed but is not in \
                             server.upstream_authority.bundle_file_path",
                            last.subject()
                        ),
                    ));
                } else {
                    let Some(i) = parsed_roots.iter().position(|root| issued_by(last, root)) else {
                        return Err(err(
                            CERT,
                            format!(
                                "the chain does not verify to any certificate of \
                                 server.upstream_authority.bundle_file_path: no root there \
                                 issued {} (issuer {})",
                                last.subject(),
                                last.issuer()
                            ),
                        ));
                    };
                    (parsed.len(), roots, i)
                }
            }
        };
        let root = parse(&roots[root_index]).map_err(|r| err(BUNDLE, r))?;

        // The path: chain certificates, then the root.
        let mut path: Vec<(&'static str, &X509Certificate<'_>)> =
            parsed[..chain_len].iter().map(|c| (CERT, c)).collect();
        path.push((if bundle_pem.is_some() { BUNDLE } else { CERT }, &root));
        let mut not_before = i64::MIN;
        let mut not_after = i64::MAX;
        for (depth, (field, cert)) in path.iter().enumerate() {
            let nb = cert.validity().not_before.timestamp();
            let na = cert.validity().not_after.timestamp();
            if now >= na {
                return Err(err(
                    field,
                    format!(
                        "{} expired at {}",
                        cert.subject(),
                        cert.validity().not_after
                    ),
                ));
            }
            if now < nb {
                return Err(err(
                    field,
                    format!(
                        "{} is not valid before {}",
                        cert.subject(),
                        cert.validity().not_before
                    ),
                ));
            }
            not_before = not_before.max(nb);
            not_after = not_after.min(na);
            // Below the certificate at `depth` come `depth` upstream CAs and the server
            // CA: its path length constraint must allow that many.
            let below = u32::try_from(depth + 1).unwrap_or(u32::MAX);
            if let Ok(Some(bc)) = cert.basic_constraints()
                && let Some(max) = bc.value.path_len_constraint
                && max < below
            {
                return Err(err(
                    field,
                    format!(
                        "{} has a path length constraint of {max}, but {below} CA \
                         certificate(s) would follow it (the server CA signs SVIDs below it)",
                        cert.subject()
                    ),
                ));
            }
            check_name_constraints(cert).map_err(|r| err(field, r))?;
        }

        let subject_der = first.subject().as_raw().to_vec();
        let subject = first.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&certs[0].clone().into(), key).map_err(|e| {
            err(
                CERT,
                format!("cannot use the upstream CA certificate as issuer: {e}"),
            )
        })?;
        drop(parsed);
        drop(root);
        let chain = certs[..chain_len].to_vec();
        let certificate = certs.into_iter().next().unwrap_or_default();
        Ok(Self {
            issuer,
            chain,
            roots,
            certificate,
            subject_der,
            subject,
            not_before,
            not_after,
        })
    }

    /// The certificates that follow a server CA's own in every chain: the upstream CA
    /// and its intermediates, without a root (empty when the upstream CA is a root). DER.
    pub fn chain(&self) -> &[Vec<u8>] {
        &self.chain
    }

    /// The roots the trust bundle publishes in place of the server CAs. DER.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots
    }

    /// The upstream CA certificate (the first of `cert_file_path`), DER.
    pub fn certificate_der(&self) -> &[u8] {
        &self.certificate
    }

    /// Subject of the upstream CA certificate, as text.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Earliest NotAfter of the upstream path (chain and root), Unix seconds: no server
    /// CA it signs ends later.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Latest NotBefore of the upstream path, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The subject a server CA it signs names as issuer, DER.
    pub(crate) fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }

    /// The issuer rcgen signs server CA certificates with.
    pub(crate) fn issuer(&self) -> &Issuer<'static, UpstreamKey> {
        &self.issuer
    }

    /// Whether `cert_der` (a server CA certificate) was signed by this upstream CA's key
    /// and names it as issuer.
    pub fn signed(&self, cert_der: &[u8]) -> bool {
        let (Ok(cert), Ok(upstream)) = (parse(cert_der), parse(&self.certificate)) else {
            return false;
        };
        issued_by(&cert, &upstream)
    }
}

impl UpstreamError {
    fn with_path(mut self, path: &Path) -> Self {
        if !path.as_os_str().is_empty() {
            self.path = Some(path.to_owned());
        }
        self
    }
}

// ---------------------------------------------------------------------------------------
// Certificates.

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a DER certificate: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(cert)
}

/// The DER certificates of a PEM file: at least one, and nothing but `CERTIFICATE`
/// blocks.
fn certificates(pem_text: &[u8], field: &'static str) -> Result<Vec<Vec<u8>>, UpstreamError> {
    let blocks =
        pem::parse_many(pem_text).map_err(|e| err(field, format!("not valid PEM: {e}")))?;
    if blocks.is_empty() {
        return Err(err(field, "no CERTIFICATE PEM block"));
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() == "CERTIFICATE" {
                Ok(block.into_contents())
            } else {
                Err(err(
                    field,
                    format!(
                        "a {:?} PEM block; only CERTIFICATE blocks belong here (the key goes \
                         in key_file_path)",
                        block.tag()
                    ),
                ))
            }
        })
        .collect()
}

fn check_is_ca(cert: &X509Certificate<'_>) -> Result<(), String> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| format!("bad basicConstraints: {e}"))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err("not a CA certificate (basicConstraints CA=true is missing)".into());
    }
    let ku = cert
        .key_usage()
        .map_err(|e| format!("bad keyUsage: {e}"))?
        .ok_or("no keyUsage extension; a CA certificate needs keyCertSign")?;
    if !ku.value.key_cert_sign() {
        return Err("keyUsage lacks keyCertSign: it cannot sign certificates".into());
    }
    Ok(())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    cert.issuer().as_raw() == cert.subject().as_raw() && cert.verify_signature(None).is_ok()
}

fn issued_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// A server CA names the upstream CA's subject as its issuer, re-encoded by rcgen: it
/// must be non-empty, one attribute per RDN, no attribute type twice (rcgen keeps one
/// value per type). The server CA's self-test compares the bytes too.
fn check_issuer_name(cert: &X509Certificate<'_>) -> Result<(), UpstreamError> {
    let subject = cert.subject();
    let mut seen = Vec::new();
    let mut count = 0;
    for rdn in subject.iter() {
        let attributes: Vec<_> = rdn.iter().collect();
        if attributes.len() != 1 {
            return Err(err(
                CERT,
                format!(
                    "the upstream CA's subject ({subject}) has a multi-valued RDN, which \
                     tessera cannot reproduce as the issuer of its CA certificates"
                ),
            ));
        }
        for attribute in attributes {
            let oid = attribute.attr_type().to_id_string();
            if seen.contains(&oid) {
                return Err(err(
                    CERT,
                    format!(
                        "the upstream CA's subject ({subject}) repeats attribute {oid}, which \
                         tessera cannot reproduce as the issuer of its CA certificates"
                    ),
                ));
            }
            seen.push(oid);
            count += 1;
        }
    }
    if count == 0 {
        return Err(err(
            CERT,
            "the upstream CA certificate has an empty subject",
        ));
    }
    Ok(())
}

/// URI name constraints make rustls/webpki (the agent's TLS, and many workloads') reject
/// every certificate with a URI SAN below them, i.e. every SVID.
fn check_name_constraints(cert: &X509Certificate<'_>) -> Result<(), String> {
    let nc = cert
        .name_constraints()
        .map_err(|e| format!("{}: bad nameConstraints: {e}", cert.subject()))?;
    let Some(nc) = nc else { return Ok(()) };
    let has_uri = nc
        .value
        .permitted_subtrees
        .iter()
        .chain(nc.value.excluded_subtrees.iter())
        .flatten()
        .any(|s| matches!(s.base, GeneralName::URI(_)));
    if has_uri {
        return Err(format!(
            "{} has URI name constraints; rustls/webpki rejects every SPIFFE ID below them, \
             so no SVID signed under it would verify",
            cert.subject()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Files.

fn read_public(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let mut out = Vec::new();
    file.take(MAX_CERT_FILE_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read: {e}"))?;
    if out.len() as u64 > MAX_CERT_FILE_SIZE {
        return Err(format!("larger than {MAX_CERT_FILE_SIZE} bytes"));
    }
    Ok(out)
}

/// The key file, through the SDK's secret-file reader: no symlink, a regular file owned
/// by the server's uid, no group or other permission bits, in a directory others cannot
/// write to.
fn read_key_file(path: &Path) -> Result<Vec<u8>, UpstreamError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| err(KEY, "the path must end in a UTF-8 file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tessera_plugin_sdk::fs::read_private_file(dir, name).map_err(|e| err(KEY, e.to_string()))
}

// ---------------------------------------------------------------------------------------
// The key.

/// The upstream private key, parsed once by aws-lc-rs; signs server CA certificates
/// through rcgen. The key bytes read from the file are wiped after parsing.
pub(crate) struct UpstreamKey {
    /// The `subjectPublicKey` bits (EC point, or RSAPublicKey DER).
    public: Vec<u8>,
    algorithm: &'static SignatureAlgorithm,
    private: Private,
}

enum Private {
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl UpstreamKey {
    /// One unencrypted private key: `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC1, an
    /// `EC PARAMETERS` block before it is ignored) or `RSA PRIVATE KEY` (PKCS#1).
    fn from_pem(text: &[u8]) -> Result<Self, UpstreamError> {
        let blocks = pem::parse_many(text).map_err(|e| err(KEY, format!("not valid PEM: {e}")))?;
        let mut keys: Vec<pem::Pem> = blocks
            .into_iter()
            .filter(|b| b.tag() != "EC PARAMETERS")
            .collect();
        if keys.len() != 1 {
            let found = keys.len();
            for key in &mut keys {
                wipe(key);
            }
            return Err(err(
                KEY,
                format!("expected exactly one private key PEM block, found {found}"),
            ));
        }
        let mut block = keys.remove(0);
        let result = Self::from_block(&block);
        wipe(&mut block);
        result
    }

    fn from_block(block: &pem::Pem) -> Result<Self, UpstreamError> {
        let der = block.contents();
        let ecdsa = |pair: EcdsaKeyPair, algorithm| Self {
            public: pair.public_key().as_ref().to_vec(),
            algorithm,
            private: Private::Ecdsa(pair),
        };
        let ec_algorithms: [(
            &'static signature::EcdsaSigningAlgorithm,
            &'static SignatureAlgorithm,
        ); 2] = [
            (
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            (
                &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
        ];
        let unsupported =
            "not an unencrypted ECDSA P-256, ECDSA P-384 or RSA (2048 to 8192 bits) private key";
        match block.tag() {
            "PRIVATE KEY" => {
                for (alg, rcgen_alg) in ec_algorithms {
                    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(alg, der) {
                        return Ok(ecdsa(pair, rcgen_alg));
                    }
                }
                match RsaKeyPair::from_pkcs8(der) {
                    Ok(pair) => Self::rsa(pair),
                    Err(_) => Err(err(KEY, format!("PKCS#8 key: {unsupported}"))),
                }
            }
            "EC PRIVATE KEY" => {
                for (alg, rcgen_alg) in ec_algorithms {
                    if let Ok(pair) = EcdsaKeyPair::from_private_key_der(alg, der) {
                        return Ok(ecdsa(pair, rcgen_alg));
                    }
                }
                Err(err(KEY, format!("SEC1 key: {unsupported}")))
            }
            "RSA PRIVATE KEY" => match RsaKeyPair::from_der(der) {
                Ok(pair) => Self::rsa(pair),
                Err(_) => Err(err(KEY, format!("PKCS#1 key: {unsupported}"))),
            },
            "ENCRYPTED PRIVATE KEY" => Err(err(
                KEY,
                "encrypted private keys are not supported: store it unencrypted \
                 (`openssl pkcs8 -topk8 -nocrypt`) and protect the file by its owner and mode",
            )),
            other => Err(err(
                KEY,
                format!(
                    "a {other:?} PEM block; expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY"
                ),
            )),
        }
    }

    fn rsa(pair: RsaKeyPair) -> Result<Self, UpstreamError> {
        let bits = pair.public_modulus_len() * 8;
        if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
            return Err(err(
                KEY,
                format!("RSA key of {bits} bits; allowed: {RSA_MIN_BITS} to {RSA_MAX_BITS}"),
            ));
        }
        Ok(Self {
            public: pair.public_key().as_ref().to_vec(),
            algorithm: &rcgen::PKCS_RSA_SHA256,
            private: Private::Rsa(pair),
        })
    }

    fn public_key_bits(&self) -> &[u8] {
        &self.public
    }
}

/// Best effort: overwrite the decoded key bytes before they are freed.
fn wipe(block: &mut pem::Pem) {
    let mut contents = std::mem::replace(block, pem::Pem::new("", Vec::new())).into_contents();
    contents.fill(0);
    std::hint::black_box(&contents);
}

impl PublicKeyData for UpstreamKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl rcgen::SigningKey for UpstreamKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let rng = SystemRandom::new();
        match &self.private {
            Private::Ecdsa(pair) => pair
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RemoteKeyError),
            Private::Rsa(pair) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| rcgen::Error::RemoteKeyError)?;
                Ok(sig)
            }
        }
    }
}
