//! The SPIFFE bundle of one trust domain and its two encodings: the SPIFFE bundle
//! document (a JWK Set, SPIFFE Trust Domain and Bundle spec §4) and PEM CA certificates.
//!
//! A bundle document does not name its trust domain: the caller always says which trust
//! domain it is read for (Federation spec §5.1, §7.2; SECURITY.md §3.11 item 113).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::jwt::{JwtBundle, JwtError, JwtPublicKey, USE_X509_SVID};

/// The largest bundle document or PEM file read: 1 MiB.
pub const MAX_BUNDLE_SIZE: usize = 1024 * 1024;

/// Why a bundle could not be read or written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// The input is larger than [`MAX_BUNDLE_SIZE`].
    #[error("bundle of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The document is not a SPIFFE bundle (bad JSON, no `keys`, bad field types).
    #[error("invalid SPIFFE bundle document: {0}")]
    Malformed(&'static str),
    /// A `jwt-svid` key of a supported type is malformed, or two share a `kid`.
    #[error("invalid JWT authority: {0}")]
    Jwt(#[source] JwtError),
    /// An X.509 authority is not a usable DER certificate.
    #[error("invalid X.509 authority: {0}")]
    InvalidAuthority(&'static str),
    /// The bundle has no usable key. A peer publishing an empty key set revokes all of
    /// its keys (bundle spec §4.1.3); tessera never applies that automatically, so a
    /// stored bundle is not wiped by a broken or hostile endpoint (SECURITY.md §3.11
    /// item 112). An operator deletes the bundle instead.
    #[error("the bundle has no usable X.509 or JWT authority")]
    EmptyBundle,
}

/// The trust material of one trust domain: X.509 authorities, JWT authorities, and the
/// sequence number and refresh hint of the document it came from.
///
/// Equality compares every field, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeBundle {
    /// The trust domain these authorities speak for: always the one the caller named,
    /// never read from the document.
    pub trust_domain: TrustDomain,
    /// X.509 authorities, DER certificates, without duplicates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT-SVID verification keys (read from a document: ordered by `kid`).
    pub jwt_authorities: Vec<JwtPublicKey>,
    /// `spiffe_sequence` of the document.
    pub sequence_number: Option<u64>,
    /// `spiffe_refresh_hint` of the document.
    pub refresh_hint: Option<Duration>,
}

/// Key types accepted for an authority: EC P-256, EC P-384 and RSA of 2048 to 8192
/// bits (the SDK enforces the RSA range). Others are ignored, as unknown key types are
/// (bundle spec §4.2.1).
fn key_type_allowed(key: &JwtPublicKey) -> bool {
    matches!(key.key_type(), "EC P-256" | "EC P-384" | "RSA")
}

impl SpiffeBundle {
    /// An empty bundle of `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number: None,
            refresh_hint: None,
        }
    }

    /// A bundle of `trust_domain` holding `authorities` (DER CA certificates), as used
    /// to configure an `https_spiffe` endpoint's trust.
    pub fn from_x509_authorities(trust_domain: TrustDomain, authorities: Vec<Vec<u8>>) -> Self {
        Self {
            x509_authorities: authorities,
            ..Self::new(trust_domain)
        }
    }

    /// True when the bundle has neither an X.509 nor a JWT authority.
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// The JWT authorities as the SDK's [`JwtBundle`], for JWT-SVID validation.
    pub fn jwt_bundle(&self) -> JwtBundle {
        JwtBundle::new(self.trust_domain.clone(), self.jwt_authorities.clone())
    }

    /// Reads a SPIFFE bundle document for `trust_domain`.
    ///
    /// Following the bundle spec §4, the X509-SVID and JWT-SVID specs §6 and
    /// SECURITY.md §3.11 item 111:
    ///
    /// - at most [`MAX_BUNDLE_SIZE`] bytes; one JSON object, no repeated member names;
    ///   unknown members are ignored; `keys` must be an array;
    /// - a JWK with no `use` or an unknown one, or with an unknown or missing `kty`, is
    ///   ignored;
    /// - `x509-svid`: no `x5c` (or an empty one) ⇒ ignored; several certificates ⇒ only
    ///   the first is used (it is the authority); the certificate is authoritative for
    ///   the key, its `kty` must agree, other JWK parameters are not read;
    /// - `jwt-svid`: no (or an empty) `kid` ⇒ ignored; two keys with one `kid` ⇒ error;
    /// - keys of a type other than EC P-256, EC P-384 or RSA 2048-8192 are ignored;
    ///   malformed material of those types is an error;
    /// - `spiffe_sequence` and `spiffe_refresh_hint` must be non-negative integers;
    /// - a document left with no usable key is [`BundleError::EmptyBundle`].
    ///
    /// The trust domain of the result is `trust_domain`, whatever the document or its
    /// certificates say (item 113).
    pub fn parse_json(trust_domain: &TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        check_size(json)?;
        // The SDK's reader validates the whole document strictly (one object, no
        // duplicate names, bounded depth, integer sequence and hint) and reads the
        // `jwt-svid` keys; the second, plain parse below cannot fail on valid JSON.
        let jwt = JwtBundle::from_spiffe_bundle_json(trust_domain.clone(), json).map_err(
            |err| match err {
                JwtError::InvalidBundle(reason) => BundleError::Malformed(reason),
                other => BundleError::Jwt(other),
            },
        )?;
        let doc: Map<String, Value> = serde_json::from_slice(json)
            .map_err(|_| BundleError::Malformed("not a single JSON object"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(BundleError::Malformed("`keys` is missing or not an array"))?;

        let mut x509_authorities: Vec<Vec<u8>> = Vec::new();
        for entry in keys {
            let jwk = entry
                .as_object()
                .ok_or(BundleError::Malformed("a `keys` entry is not an object"))?;
            if let Some(der) = x509_authority_of_jwk(jwk)?
                && !x509_authorities.contains(&der)
            {
                x509_authorities.push(der);
            }
        }
        let jwt_authorities: Vec<JwtPublicKey> = jwt
            .keys()
            .filter(|k| key_type_allowed(k))
            .cloned()
            .collect();

        let bundle = Self {
            trust_domain: trust_domain.clone(),
            x509_authorities,
            jwt_authorities,
            sequence_number: doc.get("spiffe_sequence").and_then(Value::as_u64),
            refresh_hint: doc
                .get("spiffe_refresh_hint")
                .and_then(Value::as_u64)
                .map(Duration::from_secs),
        };
        if bundle.is_empty() {
            return Err(BundleError::EmptyBundle);
        }
        Ok(bundle)
    }

    /// Reads PEM CA certificates (`CERTIFICATE` blocks only) as the X.509 authorities
    /// of `trust_domain`. Any other block, a certificate that does not parse or whose
    /// key is not EC P-256/P-384 or RSA 2048-8192, is an error: this is operator input.
    /// No certificate at all is [`BundleError::EmptyBundle`].
    pub fn parse_pem(trust_domain: &TrustDomain, pem_bytes: &[u8]) -> Result<Self, BundleError> {
        check_size(pem_bytes)?;
        let blocks = pem::parse_many(pem_bytes)
            .map_err(|_| BundleError::InvalidAuthority("not valid PEM"))?;
        let mut authorities: Vec<Vec<u8>> = Vec::new();
        for block in blocks {
            if block.tag() != "CERTIFICATE" {
                return Err(BundleError::InvalidAuthority(
                    "a PEM block other than CERTIFICATE",
                ));
            }
            let der = block.into_contents();
            if authority_key(&der)?.is_none() {
                return Err(BundleError::InvalidAuthority(
                    "key type other than EC P-256, EC P-384 or RSA 2048-8192",
                ));
            }
            if !authorities.contains(&der) {
                authorities.push(der);
            }
        }
        if authorities.is_empty() {
            return Err(BundleError::EmptyBundle);
        }
        Ok(Self::from_x509_authorities(
            trust_domain.clone(),
            authorities,
        ))
    }

    /// The SPIFFE bundle document: `keys` (one `x509-svid` JWK per X.509 authority with
    /// `kty`, the key parameters and `x5c`, then the `jwt-svid` JWKs with `kid`), and
    /// `spiffe_sequence` / `spiffe_refresh_hint` when set.
    ///
    /// Fails if an X.509 authority is not a certificate with a supported key.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for der in &self.x509_authorities {
            let key = authority_key(der)?.ok_or(BundleError::InvalidAuthority(
                "key type other than EC P-256, EC P-384 or RSA 2048-8192",
            ))?;
            let Value::Object(mut jwk) = key.to_jwk() else {
                return Err(BundleError::InvalidAuthority(
                    "key cannot be written as a JWK",
                ));
            };
            jwk.remove("kid");
            jwk.insert("use".to_owned(), Value::String(USE_X509_SVID.to_owned()));
            jwk.insert(
                "x5c".to_owned(),
                Value::Array(vec![Value::String(STANDARD.encode(der))]),
            );
            keys.push(Value::Object(jwk));
        }
        keys.extend(self.jwt_authorities.iter().map(JwtPublicKey::to_jwk));
        let mut doc = Map::new();
        doc.insert("keys".to_owned(), Value::Array(keys));
        if let Some(sequence) = self.sequence_number {
            doc.insert("spiffe_sequence".to_owned(), sequence.into());
        }
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".to_owned(), hint.as_secs().into());
        }
        Ok(Value::Object(doc).to_string())
    }
}

fn check_size(input: &[u8]) -> Result<(), BundleError> {
    if input.len() > MAX_BUNDLE_SIZE {
        return Err(BundleError::TooLarge {
            size: input.len(),
            limit: MAX_BUNDLE_SIZE,
        });
    }
    Ok(())
}

/// The public key of an authority certificate; `Ok(None)` for a well-formed key of a
/// type tessera does not accept.
fn authority_key(der: &[u8]) -> Result<Option<JwtPublicKey>, BundleError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| BundleError::InvalidAuthority("not a DER certificate"))?;
    if !rest.is_empty() {
        return Err(BundleError::InvalidAuthority(
            "trailing bytes after the certificate",
        ));
    }
    // The SDK parses the key (checking EC points and the RSA size); the kid is a
    // placeholder, X.509 authorities have none.
    match JwtPublicKey::from_spki_der("x509-authority".to_owned(), cert.public_key().raw) {
        Ok(key) if key_type_allowed(&key) => Ok(Some(key)),
        Ok(_) | Err(JwtError::UnsupportedKey(_)) => Ok(None),
        Err(_) => Err(BundleError::InvalidAuthority("malformed public key")),
    }
}

/// The X.509 authority of one JWK, if it is a usable `x509-svid` entry.
fn x509_authority_of_jwk(jwk: &Map<String, Value>) -> Result<Option<Vec<u8>>, BundleError> {
    if jwk.get("use").and_then(Value::as_str) != Some(USE_X509_SVID) {
        // `jwt-svid` entries were read by the SDK; anything else is ignored.
        return Ok(None);
    }
    let kty = match jwk.get("kty").and_then(Value::as_str) {
        Some(kty @ ("EC" | "RSA")) => kty,
        _ => return Ok(None),
    };
    let first = match jwk.get("x5c") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(certs)) => match certs.first() {
            None => return Ok(None),
            Some(Value::String(b64)) => b64,
            Some(_) => return Err(BundleError::Malformed("an `x5c` entry is not a string")),
        },
        Some(_) => return Err(BundleError::Malformed("`x5c` is not an array")),
    };
    let der = STANDARD
        .decode(first)
        .map_err(|_| BundleError::Malformed("an `x5c` entry is not base64"))?;
    let Some(key) = authority_key(&der)? else {
        return Ok(None);
    };
    let cert_kty = if key.key_type() == "RSA" { "RSA" } else { "EC" };
    if cert_kty != kty {
        return Err(BundleError::Malformed(
            "the `kty` of an x509-svid JWK does not match its certificate",
        ));
    }
    Ok(Some(der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_plugin_sdk::jwt::JwtSigner;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn ca(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn p256_ca() -> Vec<u8> {
        ca(&rcgen::PKCS_ECDSA_P256_SHA256)
    }

    fn x509_jwk(der: &[u8], kty: &str) -> Value {
        json!({"use": "x509-svid", "kty": kty, "x5c": [STANDARD.encode(der)]})
    }

    fn doc(keys: Vec<Value>) -> Vec<u8> {
        json!({"keys": keys, "spiffe_sequence": 3, "spiffe_refresh_hint": 60})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn round_trips_x509_and_jwt_authorities() {
        let jwt = JwtSigner::generate("k1".into()).unwrap().public_key();
        let bundle = SpiffeBundle {
            trust_domain: td("example.org"),
            x509_authorities: vec![p256_ca(), ca(&rcgen::PKCS_ECDSA_P384_SHA384)],
            jwt_authorities: vec![jwt],
            sequence_number: Some(7),
            refresh_hint: Some(Duration::from_secs(300)),
        };
        let json = bundle.to_json().unwrap();
        let value: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["spiffe_sequence"], 7);
        assert_eq!(value["spiffe_refresh_hint"], 300);
        let first = &value["keys"][0];
        assert_eq!(first["use"], "x509-svid");
        assert_eq!(first["kty"], "EC");
        assert_eq!(first["crv"], "P-256");
        assert!(first["x"].is_string() && first["y"].is_string());
        assert!(first.get("kid").is_none());
        assert_eq!(value["keys"][2]["use"], "jwt-svid");
        assert_eq!(value["keys"][2]["kid"], "k1");
        let back = SpiffeBundle::parse_json(&td("example.org"), json.as_bytes()).unwrap();
        assert_eq!(back, bundle);
    }

    #[test]
    fn optional_fields_are_omitted_and_read_as_absent() {
        let bundle = SpiffeBundle::from_x509_authorities(td("example.org"), vec![p256_ca()]);
        let json = bundle.to_json().unwrap();
        assert!(!json.contains("spiffe_sequence") && !json.contains("spiffe_refresh_hint"));
        assert_eq!(
            SpiffeBundle::parse_json(&td("example.org"), json.as_bytes()).unwrap(),
            bundle
        );
    }

    // SECURITY.md §3.11 item 111.
    #[test]
    fn x509_entry_without_x5c_is_ignored() {
        let ca = p256_ca();
        let json = doc(vec![
            json!({"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}),
            json!({"use": "x509-svid", "kty": "EC", "x5c": []}),
            x509_jwk(&ca, "EC"),
        ]);
        let bundle = SpiffeBundle::parse_json(&td("example.org"), &json).unwrap();
        assert_eq!(bundle.x509_authorities, vec![ca]);
    }

    #[test]
    fn only_the_first_x5c_certificate_is_used() {
        let (first, second) = (p256_ca(), p256_ca());
        let json = doc(vec![json!({
            "use": "x509-svid", "kty": "EC",
            "x5c": [STANDARD.encode(&first), STANDARD.encode(&second)],
        })]);
        let bundle = SpiffeBundle::parse_json(&td("example.org"), &json).unwrap();
        assert_eq!(bundle.x509_authorities, vec![first]);
    }

    #[test]
    fn jwt_key_without_kid_and_unknown_use_are_ignored() {
        let keyed = JwtSigner::generate("kept".into()).unwrap().public_key();
        let mut no_kid = JwtSigner::generate("dropped".into())
            .unwrap()
            .public_key()
            .to_jwk();
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut empty_kid = no_kid.clone();
        empty_kid["kid"] = json!("");
        let mut unknown_use = keyed.to_jwk();
        unknown_use["use"] = json!("x509-svid-v2");
        unknown_use["kid"] = json!("other");
        let mut no_use = keyed.to_jwk();
        no_use.as_object_mut().unwrap().remove("use");
        no_use["kid"] = json!("third");
        let ca = p256_ca();
        let mut ca_unknown_use = x509_jwk(&ca, "EC");
        ca_unknown_use["use"] = json!("X509-SVID");
        let json = doc(vec![
            no_kid,
            empty_kid,
            unknown_use,
            no_use,
            ca_unknown_use,
            keyed.to_jwk(),
        ]);
        let bundle = SpiffeBundle::parse_json(&td("example.org"), &json).unwrap();
        assert_eq!(bundle.jwt_authorities, vec![keyed]);
        assert!(bundle.x509_authorities.is_empty());
    }

    #[test]
    fn unknown_fields_and_key_types_are_tolerated() {
        let ca = p256_ca();
        let mut entry = x509_jwk(&ca, "EC");
        entry["x-extra"] = json!({"nested": [1, 2]});
        let json = json!({
            "keys": [
                {"use": "x509-svid", "kty": "OKP", "crv": "Ed25519", "x5c": [STANDARD.encode(&ca)]},
                {"use": "jwt-svid", "kty": "oct", "kid": "sym", "k": "AAAA"},
                {"use": "x509-svid", "x5c": [STANDARD.encode(&ca)]},
                entry,
            ],
            "trust_domain": "evil.org",
            "something_new": true,
        })
        .to_string();
        let bundle = SpiffeBundle::parse_json(&td("example.org"), json.as_bytes()).unwrap();
        assert_eq!(bundle.x509_authorities, vec![ca]);
        assert_eq!(bundle.trust_domain, td("example.org"));
        assert_eq!(bundle.sequence_number, None);
    }

    #[test]
    fn p521_authorities_are_ignored() {
        let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
        let jwk = JwtPublicKey::from_spki_der(
            "p521".into(),
            &rcgen::PublicKeyData::subject_public_key_info(&p521),
        )
        .unwrap()
        .to_jwk();
        let p521_ca = ca(&rcgen::PKCS_ECDSA_P521_SHA512);
        let p384_ca = ca(&rcgen::PKCS_ECDSA_P384_SHA384);
        let json = doc(vec![
            jwk,
            x509_jwk(&p521_ca, "EC"),
            x509_jwk(&p384_ca, "EC"),
        ]);
        let bundle = SpiffeBundle::parse_json(&td("example.org"), &json).unwrap();
        assert!(bundle.jwt_authorities.is_empty());
        assert_eq!(bundle.x509_authorities, vec![p384_ca]);
        let pem = tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &p521_ca);
        assert!(matches!(
            SpiffeBundle::parse_pem(&td("example.org"), pem.as_bytes()),
            Err(BundleError::InvalidAuthority(_))
        ));
    }

    #[test]
    fn malformed_documents_are_errors() {
        let ca = p256_ca();
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"[]".to_vec(),
            b"{}".to_vec(),
            br#"{"keys": {}}"#.to_vec(),
            br#"{"keys": [1]}"#.to_vec(),
            br#"{"keys": [], "keys": []}"#.to_vec(),
            br#"{"keys": [], "spiffe_sequence": -1}"#.to_vec(),
            br#"{"keys": [], "spiffe_refresh_hint": "60"}"#.to_vec(),
            doc(vec![
                json!({"use": "x509-svid", "kty": "EC", "x5c": "AAAA"}),
            ]),
            doc(vec![
                json!({"use": "x509-svid", "kty": "EC", "x5c": ["!!"]}),
            ]),
            doc(vec![
                json!({"use": "x509-svid", "kty": "EC", "x5c": ["AAAA"]}),
            ]),
            doc(vec![x509_jwk(&ca, "RSA")]),
        ];
        for case in cases {
            let result = SpiffeBundle::parse_json(&td("example.org"), &case);
            assert!(
                matches!(
                    result,
                    Err(BundleError::Malformed(_) | BundleError::InvalidAuthority(_))
                ),
                "{}: {result:?}",
                String::from_utf8_lossy(&case)
            );
        }
    }

    #[test]
    fn duplicate_kids_are_an_error() {
        let a = JwtSigner::generate("same".into()).unwrap().public_key();
        let b = JwtSigner::generate("same".into()).unwrap().public_key();
        let json = doc(vec![a.to_jwk(), b.to_jwk()]);
        assert!(matches!(
            SpiffeBundle::parse_json(&td("example.org"), &json),
            Err(BundleError::Malformed(_) | BundleError::Jwt(_))
        ));
    }

    // SECURITY.md §3.11 item 112.
    #[test]
    fn a_bundle_without_usable_keys_is_empty() {
        for json in [
            br#"{"keys": [], "spiffe_sequence": 9}"#.to_vec(),
            doc(vec![json!({"use": "x509-svid", "kty": "EC"})]),
            doc(vec![
                json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256"}),
            ]),
        ] {
            assert_eq!(
                SpiffeBundle::parse_json(&td("example.org"), &json),
                Err(BundleError::EmptyBundle)
            );
        }
        assert_eq!(
            SpiffeBundle::parse_pem(&td("example.org"), b""),
            Err(BundleError::EmptyBundle)
        );
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = vec![b' '; MAX_BUNDLE_SIZE + 1];
        assert!(matches!(
            SpiffeBundle::parse_json(&td("example.org"), &big),
            Err(BundleError::TooLarge { .. })
        ));
        assert!(matches!(
            SpiffeBundle::parse_pem(&td("example.org"), &big),
            Err(BundleError::TooLarge { .. })
        ));
    }

    #[test]
    fn pem_certificates_become_x509_authorities() {
        let (a, b) = (p256_ca(), ca(&rcgen::PKCS_ECDSA_P384_SHA384));
        let pem = tessera_plugin_sdk::x509::pem_encode_all("CERTIFICATE", &[a.clone(), b.clone()]);
        let bundle = SpiffeBundle::parse_pem(&td("example.org"), pem.as_bytes()).unwrap();
        assert_eq!(bundle.x509_authorities, vec![a.clone(), b]);
        assert_eq!(bundle.sequence_number, None);

        let with_key = format!(
            "{pem}{}",
            tessera_plugin_sdk::x509::pem_encode("PRIVATE KEY", b"secret")
        );
        assert!(matches!(
            SpiffeBundle::parse_pem(&td("example.org"), with_key.as_bytes()),
            Err(BundleError::InvalidAuthority(_))
        ));
        let garbage = tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", b"not der");
        assert!(matches!(
            SpiffeBundle::parse_pem(&td("example.org"), garbage.as_bytes()),
            Err(BundleError::InvalidAuthority(_))
        ));
    }
}
