//! JWT-SVIDs (SPIFFE JWT-SVID specification), compact serialization only: minting with
//! a P-256 key parsed once, strict validation against the JWT bundles of trust domains,
//! and the SPIFFE bundle document (a JWKS) that publishes the keys.
//!
//! Signing and verification go straight to aws-lc-rs with keys parsed once (PERF.md:
//! `jsonwebtoken` re-parses the key on every call). No general JOSE library is used: the
//! validator accepts only what a JWT-SVID may be (SECURITY.md §2 rule 6, §3.8) and checks
//! in this order, so that hostile input is rejected cheaply and before any key is used:
//!
//! 1. length <= [`MAX_TOKEN_LEN`]; exactly three `.`-separated parts (the JWS JSON
//!    serialization, JWE and anything else are refused);
//! 2. every part strict base64url: no padding, URL-safe alphabet only, canonical
//!    trailing bits;
//! 3. the header (at most [`MAX_HEADER_LEN`] encoded bytes) is one JSON object with no
//!    repeated member name and nesting at most [`MAX_JSON_DEPTH`]; `alg` is in the
//!    hard-coded allow-list (ES256/384/512, RS256/384/512, PS256/384/512); `typ` is absent,
//!    `JWT` or `JOSE`; `crit`, `jku`, `jwk`, `x5u`, `x5c` are absent; `kid` is a non-empty
//!    string;
//! 4. the claims are one JSON object under the same rules; `sub` is a workload SPIFFE ID;
//! 5. the key is the one with that `kid` in the bundle of the trust domain of `sub` (a
//!    bundle is only ever used for its own trust domain); its type must match `alg`;
//! 6. the signature verifies (ECDSA: fixed-size `r || s` only, aws-lc rejects zero,
//!    out-of-range and wrong-length values);
//! 7. `aud` is present and contains the expected audience; `exp` is present and not
//!    passed by more than [`LEEWAY`]; `nbf` and `iat`, when present, are not in the
//!    future by more than [`LEEWAY`].
//!
//! A token that passes can be replayed to the same audience until it expires: that is
//! accepted, as JWT-SVID spec §7.1 says (validators are not required to track `jti`).
//!
//! Nothing here logs, and no error message contains any part of a token.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::pkcs8::Document;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    self as sig, EcdsaKeyPair, KeyPair, ParsedPublicKey, VerificationAlgorithm,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey as X509PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::id::{IdError, SpiffeId, TrustDomain};
use crate::keymanager::{SignatureFormat, SigningKey};

// base64: the `base64` crate (0.22, already in Cargo.lock through sqlx and tonic) with
// its `URL_SAFE_NO_PAD` engine is strict in exactly the way a JWS needs: padding is an
// error (`DecodePaddingMode::RequireNone`), `+`, `/` and whitespace are not in the
// alphabet, and non-zero trailing bits are an error (`decode_allow_trailing_bits`
// defaults to false). The tests below pin each of these.

/// Longest token accepted by [`validate`] (and produced by [`JwtSigner::sign`]), in bytes.
/// Checked before anything else, so a 1 MB token costs one comparison.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);

/// Longest encoded JOSE header accepted, in bytes. A JWT-SVID header holds `alg`, `kid`
/// and `typ` only.
pub const MAX_HEADER_LEN: usize = 1024;

/// Deepest JSON nesting accepted in a header, a claims set or a bundle document (the
/// top-level object counts as 1). Checked by a linear scan before parsing.
pub const MAX_JSON_DEPTH: usize = 32;

/// The `use` value of JWT-SVID keys in a SPIFFE bundle.
pub const USE_JWT_SVID: &str = "jwt-svid";

/// The `use` value of X.509 authorities in a SPIFFE bundle.
pub const USE_X509_SVID: &str = "x509-svid";

/// Header parameters a JWT-SVID must not carry: they would let the token choose its own
/// key or processing rules.
const FORBIDDEN_HEADERS: [&str; 5] = ["crit", "jku", "jwk", "x5u", "x5c"];

const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 8192;

/// The part of a token an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JwtPart {
    /// The JOSE header (first part).
    Header,
    /// The claims set (second part).
    Payload,
    /// The signature (third part).
    Signature,
}

impl fmt::Display for JwtPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "JOSE header",
            Self::Payload => "claims set",
            Self::Signature => "signature",
        })
    }
}

/// Why a JWT-SVID could not be minted or validated, or a key or bundle not read.
///
/// Messages never quote the token or any value taken from it, so they are safe to log
/// and to return to the presenter.
#[non_exhaustive]
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Length of the token.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not three `.`-separated parts: the JWS JSON serialization, a JWE, or garbage.
    #[error("not a JWS in compact serialization (three base64url parts separated by '.')")]
    NotCompact,
    /// A part is not strict unpadded base64url.
    #[error("the {0} is not valid unpadded base64url")]
    Base64(JwtPart),
    /// The encoded header is longer than [`MAX_HEADER_LEN`].
    #[error("the JOSE header is longer than {MAX_HEADER_LEN} bytes")]
    HeaderTooLong,
    /// The header or claims set is not exactly one JSON object.
    #[error("the {0} is not a single JSON object")]
    NotJsonObject(JwtPart),
    /// The header or claims set repeats a member name.
    #[error("the {0} repeats a JSON member name")]
    DuplicateKey(JwtPart),
    /// The header or claims set nests deeper than [`MAX_JSON_DEPTH`].
    #[error("the {0} nests JSON deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep(JwtPart),
    /// `alg` is missing, not a string, or not in the allow-list (`none`, HS*, EdDSA...).
    #[error(
        "`alg` is missing or not one of ES256, ES384, ES512, RS256, RS384, RS512, PS256, PS384, PS512"
    )]
    UnsupportedAlgorithm,
    /// `typ` is present and not exactly `JWT` or `JOSE`.
    #[error("`typ` must be absent, \"JWT\" or \"JOSE\"")]
    InvalidType,
    /// A header parameter that a JWT-SVID must not carry.
    #[error("the `{0}` header parameter is not allowed in a JWT-SVID")]
    ForbiddenHeader(&'static str),
    /// `kid` is missing, empty or not a string.
    #[error("the `kid` header parameter is missing, empty or not a string")]
    MissingKeyId,
    /// `sub` is missing or not a string.
    #[error("the `sub` claim is missing or not a string")]
    MissingSubject,
    /// `sub` is not a canonical workload SPIFFE ID (or a JWT-SVID was requested for a
    /// trust domain ID).
    #[error("the subject is not a workload SPIFFE ID: {0}")]
    InvalidSubject(IdError),
    /// No JWT bundle is known for the trust domain of `sub`.
    #[error("no keys found for trust domain \"{trust_domain}\": no JWT bundle")]
    NoBundle {
        /// The trust domain of `sub`.
        trust_domain: TrustDomain,
    },
    /// The bundle of the trust domain of `sub` has no key with the token's `kid`.
    #[error("no keys found for trust domain \"{trust_domain}\" with the token's `kid`")]
    UnknownKeyId {
        /// The trust domain of `sub`.
        trust_domain: TrustDomain,
    },
    /// The key named by `kid` is not of the type `alg` requires (ES256 needs P-256...).
    #[error("the key named by `kid` does not match the token's `alg`")]
    KeyAlgorithmMismatch,
    /// The signature does not verify.
    #[error("signature verification failed")]
    InvalidSignature,
    /// `aud` is missing.
    #[error("the `aud` claim is missing")]
    MissingAudience,
    /// `aud` is not a non-empty string or a non-empty array of non-empty strings.
    #[error("the `aud` claim must be a non-empty string or array of non-empty strings")]
    InvalidAudience,
    /// `aud` does not contain the audience of the validator.
    #[error("the token was not issued for this audience")]
    AudienceMismatch,
    /// An empty audience was asked for (caller error, at signing or validation).
    #[error("an audience must be a non-empty string")]
    EmptyAudience,
    /// `exp` is missing.
    #[error("the `exp` claim is missing")]
    MissingExpiry,
    /// A time claim is not a number, or not representable.
    #[error("the `{0}` claim is not a valid NumericDate")]
    InvalidTime(&'static str),
    /// `exp` is passed by more than [`LEEWAY`].
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future by more than [`LEEWAY`].
    #[error("the token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    /// `iat` is in the future by more than [`LEEWAY`].
    #[error("the token was issued in the future (`iat`)")]
    IssuedInFuture,
    /// A well-formed key of a type or size tessera does not use.
    #[error("unsupported key: {0}")]
    UnsupportedKey(&'static str),
    /// Malformed key material.
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    /// A SPIFFE bundle document that cannot be used.
    #[error("invalid SPIFFE bundle document: {0}")]
    InvalidBundle(&'static str),
    /// The TTL of a JWT-SVID to mint is under one second or overflows the clock.
    #[error("a JWT-SVID TTL must be at least one second and keep the expiry representable")]
    InvalidTtl,
    /// The clock is before 1970.
    #[error("the clock is before the Unix epoch")]
    Clock,
    /// The random generator or the signing primitive failed.
    #[error("signing failed")]
    Signing,
}

// ---------------------------------------------------------------------------------------
// Algorithms and key types

/// An EC curve a JWT-SVID key may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    fn jwk_name(self) -> &'static str {
        match self {
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::P521 => "P-521",
        }
    }

    fn from_jwk_name(name: &str) -> Option<Self> {
        match name {
            "P-256" => Some(Self::P256),
            "P-384" => Some(Self::P384),
            "P-521" => Some(Self::P521),
            _ => None,
        }
    }

    fn from_oid(oid: &str) -> Option<Self> {
        match oid {
            "1.2.840.10045.3.1.7" => Some(Self::P256),
            "1.3.132.0.34" => Some(Self::P384),
            "1.3.132.0.35" => Some(Self::P521),
            _ => None,
        }
    }

    /// Bytes of one coordinate (and of `r` and `s` in a fixed signature).
    fn coordinate_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }

    /// The one verification algorithm JWA pairs with this curve.
    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            Self::P256 => &sig::ECDSA_P256_SHA256_FIXED,
            Self::P384 => &sig::ECDSA_P384_SHA384_FIXED,
            Self::P521 => &sig::ECDSA_P521_SHA512_FIXED,
        }
    }
}

/// The hard-coded allow-list of JWT-SVID spec §2.1. Names are matched exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Es256,
    Es384,
    Es512,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

/// What an algorithm needs of a key.
enum Family {
    Ec(Curve),
    /// Index into [`Material::Rsa::keys`].
    Rsa(usize),
}

/// Number of RSA algorithms, i.e. of lazily parsed RSA verification keys.
const RSA_ALGS: usize = 6;

impl Alg {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "ES512" => Self::Es512,
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            _ => return None,
        })
    }

    fn family(self) -> Family {
        match self {
            Self::Es256 => Family::Ec(Curve::P256),
            Self::Es384 => Family::Ec(Curve::P384),
            Self::Es512 => Family::Ec(Curve::P521),
            Self::Rs256 => Family::Rsa(0),
            Self::Rs384 => Family::Rsa(1),
            Self::Rs512 => Family::Rsa(2),
            Self::Ps256 => Family::Rsa(3),
            Self::Ps384 => Family::Rsa(4),
            Self::Ps512 => Family::Rsa(5),
        }
    }

    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            Self::Es256 => Curve::P256.verification(),
            Self::Es384 => Curve::P384.verification(),
            Self::Es512 => Curve::P521.verification(),
            Self::Rs256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Self::Rs384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Self::Rs512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Self::Ps256 => &sig::RSA_PSS_2048_8192_SHA256,
            Self::Ps384 => &sig::RSA_PSS_2048_8192_SHA384,
            Self::Ps512 => &sig::RSA_PSS_2048_8192_SHA512,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Public keys

/// Key material, parsed once into aws-lc form.
#[derive(Clone)]
enum Material {
    Ec {
        curve: Curve,
        x: Vec<u8>,
        y: Vec<u8>,
        key: ParsedPublicKey,
    },
    Rsa {
        /// Big-endian, no leading zero.
        n: Vec<u8>,
        /// Big-endian, no leading zero.
        e: Vec<u8>,
        /// DER `RSAPublicKey` (PKCS#1).
        pkcs1: Vec<u8>,
        /// aws-lc binds a parsed key to one algorithm: one slot per RSA `alg`, filled on
        /// first use (index from [`Alg::family`]).
        keys: Box<[OnceLock<ParsedPublicKey>; RSA_ALGS]>,
    },
}

/// A JWT-SVID verification key: its `kid` and its public key, parsed once.
///
/// Supported: EC P-256, P-384, P-521 and RSA of 2048 to 8192 bits. Equality is that of
/// the `kid` and the SubjectPublicKeyInfo.
#[derive(Clone)]
pub struct JwtPublicKey {
    /// The key ID, the `kid` of the tokens it verifies and of its JWK.
    pub kid: String,
    /// Canonical SubjectPublicKeyInfo DER, as aws-lc re-encodes it.
    spki: Vec<u8>,
    material: Material,
}

impl PartialEq for JwtPublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.spki == other.spki
    }
}

impl Eq for JwtPublicKey {}

impl fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtPublicKey")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type())
            .finish_non_exhaustive()
    }
}

impl JwtPublicKey {
    /// Reads a DER SubjectPublicKeyInfo: EC P-256/P-384/P-521 (uncompressed point) or
    /// RSA of 2048 to 8192 bits. `kid` must not be empty.
    pub fn from_spki_der(kid: String, spki: &[u8]) -> Result<Self, JwtError> {
        if kid.is_empty() {
            return Err(JwtError::InvalidKey("kid must not be empty"));
        }
        Self::parse_spki(kid, spki)
    }

    /// [`Self::from_spki_der`] without the `kid` check (X.509 authorities have none).
    fn parse_spki(kid: String, spki: &[u8]) -> Result<Self, JwtError> {
        let (rest, info) = SubjectPublicKeyInfo::from_der(spki)
            .map_err(|_| JwtError::InvalidKey("not a DER SubjectPublicKeyInfo"))?;
        if !rest.is_empty() {
            return Err(JwtError::InvalidKey(
                "trailing bytes after the SubjectPublicKeyInfo",
            ));
        }
        match info.parsed() {
            Ok(X509PublicKey::EC(point)) => {
                let curve = info
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|params| params.as_oid().ok())
                    .and_then(|oid| Curve::from_oid(&oid.to_id_string()))
                    .ok_or(JwtError::UnsupportedKey(
                        "EC curve other than P-256, P-384 or P-521",
                    ))?;
                let n = curve.coordinate_len();
                match point.data().split_first() {
                    Some((4, xy)) if xy.len() == 2 * n => {
                        let (x, y) = xy.split_at(n);
                        Self::from_ec(kid, curve, x, y)
                    }
                    _ => Err(JwtError::InvalidKey(
                        "EC point is not uncompressed or has the wrong length",
                    )),
                }
            }
            Ok(X509PublicKey::RSA(rsa)) => Self::from_rsa(kid, rsa.modulus, rsa.exponent),
            Ok(_) => Err(JwtError::UnsupportedKey(
                "only EC P-256/P-384/P-521 and RSA keys are supported",
            )),
            Err(_) => Err(JwtError::InvalidKey("malformed public key")),
        }
    }

    fn from_ec(kid: String, curve: Curve, x: &[u8], y: &[u8]) -> Result<Self, JwtError> {
        let n = curve.coordinate_len();
        if x.len() != n || y.len() != n {
            return Err(JwtError::InvalidKey("EC coordinate of the wrong length"));
        }
        let mut point = Vec::with_capacity(1 + 2 * n);
        point.push(4);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        let key = ParsedPublicKey::new(curve.verification(), &point)
            .map_err(|_| JwtError::InvalidKey("EC point is not on the curve"))?;
        let spki = key
            .as_der()
            .map_err(|_| JwtError::InvalidKey("EC key cannot be encoded"))?
            .as_ref()
            .to_vec();
        Ok(Self {
            kid,
            spki,
            material: Material::Ec {
                curve,
                x: x.to_vec(),
                y: y.to_vec(),
                key,
            },
        })
    }

    fn from_rsa(kid: String, n: &[u8], e: &[u8]) -> Result<Self, JwtError> {
        let n = strip_leading_zeros(n);
        let e = strip_leading_zeros(e);
        let bits = match n.first() {
            Some(first) => (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
            None => 0,
        };
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(JwtError::UnsupportedKey(
                "RSA modulus must be 2048 to 8192 bits",
            ));
        }
        if e.is_empty() || e.len() > 8 {
            return Err(JwtError::InvalidKey("RSA exponent out of range"));
        }
        let mut body = Vec::with_capacity(n.len() + e.len() + 16);
        der_unsigned_integer(n, &mut body);
        der_unsigned_integer(e, &mut body);
        let mut pkcs1 = Vec::with_capacity(body.len() + 6);
        pkcs1.push(0x30);
        der_length(body.len(), &mut pkcs1);
        pkcs1.extend_from_slice(&body);

        let first = ParsedPublicKey::new(Alg::Rs256.verification(), &pkcs1)
            .map_err(|_| JwtError::InvalidKey("RSA public key rejected"))?;
        let spki = first
            .as_der()
            .map_err(|_| JwtError::InvalidKey("RSA key cannot be encoded"))?
            .as_ref()
            .to_vec();
        let keys: Box<[OnceLock<ParsedPublicKey>; RSA_ALGS]> =
            Box::new([const { OnceLock::new() }; RSA_ALGS]);
        // Slot 0 is RS256, the algorithm `first` was parsed for.
        let _ = keys[0].set(first);
        Ok(Self {
            kid,
            spki,
            material: Material::Rsa {
                n: n.to_vec(),
                e: e.to_vec(),
                pkcs1,
                keys,
            },
        })
    }

    /// Reads a JWK's key parameters. `Ok(None)`: a key type or curve tessera does not
    /// support, to be ignored (bundle spec §4.1.3).
    fn from_jwk(kid: String, jwk: &Map<String, Value>) -> Result<Option<Self>, JwtError> {
        let param = |name: &'static str| -> Result<Vec<u8>, JwtError> {
            let text = jwk
                .get(name)
                .and_then(Value::as_str)
                .ok_or(JwtError::InvalidBundle(
                    "JWK parameter missing or not a string",
                ))?;
            URL_SAFE_NO_PAD
                .decode(text)
                .map_err(|_| JwtError::InvalidBundle("JWK parameter is not base64url"))
        };
        match jwk.get("kty").and_then(Value::as_str) {
            Some("EC") => {
                let Some(curve) = jwk
                    .get("crv")
                    .and_then(Value::as_str)
                    .and_then(Curve::from_jwk_name)
                else {
                    return Ok(None);
                };
                Self::from_ec(kid, curve, &param("x")?, &param("y")?).map(Some)
            }
            Some("RSA") => match Self::from_rsa(kid, &param("n")?, &param("e")?) {
                Ok(key) => Ok(Some(key)),
                Err(JwtError::UnsupportedKey(_)) => Ok(None),
                Err(err) => Err(err),
            },
            _ => Ok(None),
        }
    }

    /// The SubjectPublicKeyInfo DER, for storage; [`Self::from_spki_der`] reads it back.
    pub fn to_spki_der(&self) -> Vec<u8> {
        self.spki.clone()
    }

    /// `EC P-256`, `EC P-384`, `EC P-521` or `RSA`, for logs and errors.
    pub fn key_type(&self) -> &'static str {
        match &self.material {
            Material::Ec {
                curve: Curve::P256, ..
            } => "EC P-256",
            Material::Ec {
                curve: Curve::P384, ..
            } => "EC P-384",
            Material::Ec {
                curve: Curve::P521, ..
            } => "EC P-521",
            Material::Rsa { .. } => "RSA",
        }
    }

    /// The key as a JWT-SVID JWK: `kty`, the key parameters, `kid` and
    /// `"use": "jwt-svid"`.
    pub fn to_jwk(&self) -> Value {
        let mut jwk = self.jwk_params();
        jwk.insert("kid".to_owned(), Value::String(self.kid.clone()));
        jwk.insert("use".to_owned(), Value::String(USE_JWT_SVID.to_owned()));
        Value::Object(jwk)
    }

    /// `kty` and the key parameters (RFC 7518 §6).
    fn jwk_params(&self) -> Map<String, Value> {
        let mut jwk = Map::new();
        let b64 = |bytes: &[u8]| Value::String(URL_SAFE_NO_PAD.encode(bytes));
        match &self.material {
            Material::Ec { curve, x, y, .. } => {
                jwk.insert("kty".to_owned(), Value::String("EC".to_owned()));
                jwk.insert("crv".to_owned(), Value::String(curve.jwk_name().to_owned()));
                jwk.insert("x".to_owned(), b64(x));
                jwk.insert("y".to_owned(), b64(y));
            }
            Material::Rsa { n, e, .. } => {
                jwk.insert("kty".to_owned(), Value::String("RSA".to_owned()));
                jwk.insert("n".to_owned(), b64(n));
                jwk.insert("e".to_owned(), b64(e));
            }
        }
        jwk
    }

    /// Verifies `signature` over `message` under `alg`, which must suit the key.
    fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), JwtError> {
        let key = match (&self.material, alg.family()) {
            (Material::Ec { curve, key, .. }, Family::Ec(wanted)) if *curve == wanted => key,
            (Material::Rsa { pkcs1, keys, .. }, Family::Rsa(index)) => {
                let slot = keys.get(index).ok_or(JwtError::KeyAlgorithmMismatch)?;
                match slot.get() {
                    Some(key) => key,
                    None => {
                        let key = ParsedPublicKey::new(alg.verification(), pkcs1)
                            .map_err(|_| JwtError::InvalidKey("RSA public key rejected"))?;
                        slot.get_or_init(|| key)
                    }
                }
            }
            _ => return Err(JwtError::KeyAlgorithmMismatch),
        };
        key.verify_sig(message, signature)
            .map_err(|_| JwtError::InvalidSignature)
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// DER length octets.
fn der_length(len: usize, out: &mut Vec<u8>) {
    if let Ok(short) = u8::try_from(len)
        && short < 0x80
    {
        out.push(short);
        return;
    }
    let bytes = len.to_be_bytes();
    let significant = strip_leading_zeros(&bytes);
    // At most size_of::<usize>() = 8 octets, so the count fits in the low 7 bits.
    out.push(0x80 | u8::try_from(significant.len()).unwrap_or(0x7f));
    out.extend_from_slice(significant);
}

/// DER INTEGER of a non-negative big-endian value without leading zeros.
fn der_unsigned_integer(value: &[u8], out: &mut Vec<u8>) {
    let pad = value.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    der_length(value.len() + usize::from(pad), out);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(value);
}

// ---------------------------------------------------------------------------------------
// Signing

/// A JWT-SVID signing key, parsed once. `Debug` does not show the key.
///
/// Either a P-256 key held here ([`JwtSigner::generate`], [`JwtSigner::from_pkcs8`]),
/// or a key that stays inside a key manager ([`JwtSigner::from_signing_key`]: the
/// server's keys), which signs ES256, ES384 or RS256 according to its type.
pub struct JwtSigner {
    kid: String,
    key: SignerKey,
    alg: &'static str,
    public: JwtPublicKey,
    /// The encoded header: it depends on the `kid` only.
    header_b64: String,
    rng: SystemRandom,
}

/// Where the private key of a [`JwtSigner`] lives.
enum SignerKey {
    /// Held here, with its PKCS#8 v1 (aws-lc zeroes a `Document` when it is dropped).
    Local { key: EcdsaKeyPair, pkcs8: Document },
    /// Held by a key manager, which signs without ever handing out the key.
    Managed(Arc<dyn SigningKey>),
}

impl SignerKey {
    /// The JWS signature of `message` (ECDSA: fixed-width `r || s`).
    fn sign(&self, rng: &SystemRandom, message: &[u8]) -> Result<Vec<u8>, JwtError> {
        match self {
            SignerKey::Local { key, .. } => key
                .sign(rng, message)
                .map(|signature| signature.as_ref().to_vec())
                .map_err(|_| JwtError::Signing),
            SignerKey::Managed(key) => key
                .sign(message, SignatureFormat::Fixed)
                .map_err(|_| JwtError::Signing),
        }
    }
}

impl fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct SignerHeader<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'static str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

#[derive(Serialize)]
struct SignerClaims<'a> {
    sub: &'a str,
    aud: Audience<'a>,
    exp: u64,
    iat: u64,
    jti: &'a str,
}

/// A freshly minted JWT-SVID. `Debug` does not show the token.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedJwt {
    /// The compact serialization. A bearer credential: never log it.
    pub token: String,
    /// `exp`.
    pub expires_at: SystemTime,
    /// `iat`.
    pub issued_at: SystemTime,
    /// `jti`, 128 random bits in lowercase hex (safe to log and audit).
    pub jti: String,
}

impl fmt::Debug for SignedJwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedJwt")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("issued_at", &self.issued_at)
            .field("jti", &self.jti)
            .finish()
    }
}

impl JwtSigner {
    /// A fresh P-256 key named `kid` (non-empty).
    pub fn generate(kid: String) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| JwtError::Signing)?;
        Self::with_key(kid, key)
    }

    /// Loads a P-256 key from PKCS#8 DER (v1 or v2), e.g. one saved from [`Self::pkcs8`].
    pub fn from_pkcs8(kid: String, pkcs8_der: &[u8]) -> Result<Self, JwtError> {
        let key = EcdsaKeyPair::from_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8_der)
            .map_err(|_| JwtError::InvalidKey("not a P-256 PKCS#8 private key"))?;
        Self::with_key(kid, key)
    }

    /// A signer over a key manager's key, which never leaves the key manager. The
    /// token's `alg` follows the key type (ES256, ES384 or RS256); `kid` names the key
    /// in tokens and bundles (it need not be the key manager's id).
    pub fn from_signing_key(kid: String, key: Arc<dyn SigningKey>) -> Result<Self, JwtError> {
        let public = JwtPublicKey::from_spki_der(kid.clone(), key.public_key_der())?;
        let alg = key.key_type().jws_algorithm();
        Self::assemble(kid, SignerKey::Managed(key), alg, public)
    }

    fn with_key(kid: String, key: EcdsaKeyPair) -> Result<Self, JwtError> {
        if kid.is_empty() {
            return Err(JwtError::InvalidKey("kid must not be empty"));
        }
        let pkcs8 = key
            .to_pkcs8v1()
            .map_err(|_| JwtError::InvalidKey("key cannot be encoded as PKCS#8"))?;
        let point = key.public_key().as_ref();
        let n = Curve::P256.coordinate_len();
        let public = match point.split_first() {
            Some((4, xy)) if xy.len() == 2 * n => {
                let (x, y) = xy.split_at(n);
                JwtPublicKey::from_ec(kid.clone(), Curve::P256, x, y)?
            }
            _ => return Err(JwtError::InvalidKey("unexpected public key encoding")),
        };
        Self::assemble(kid, SignerKey::Local { key, pkcs8 }, "ES256", public)
    }

    fn assemble(
        kid: String,
        key: SignerKey,
        alg: &'static str,
        public: JwtPublicKey,
    ) -> Result<Self, JwtError> {
        if kid.is_empty() {
            return Err(JwtError::InvalidKey("kid must not be empty"));
        }
        let header = serde_json::to_vec(&SignerHeader {
            alg,
            kid: &kid,
            typ: "JWT",
        })
        .map_err(|_| JwtError::Signing)?;
        let header_b64 = URL_SAFE_NO_PAD.encode(header);
        if header_b64.len() > MAX_HEADER_LEN {
            return Err(JwtError::InvalidKey("kid too long for a JWT-SVID header"));
        }
        Ok(Self {
            kid,
            key,
            alg,
            public,
            header_b64,
            rng: SystemRandom::new(),
        })
    }

    /// The private key as PKCS#8 v1 DER, for persisting (secret: 0600 files only);
    /// `None` for a key manager's key, which never leaves it.
    pub fn pkcs8(&self) -> Option<Vec<u8>> {
        match &self.key {
            SignerKey::Local { pkcs8, .. } => Some(pkcs8.as_ref().to_vec()),
            SignerKey::Managed(_) => None,
        }
    }

    /// The JWS `alg` of the tokens it signs.
    pub fn algorithm(&self) -> &'static str {
        self.alg
    }

    /// The key ID put in every token's header and in the bundle.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The verification key, for the bundle.
    pub fn public_key(&self) -> JwtPublicKey {
        self.public.clone()
    }

    /// Mints a JWT-SVID for `subject` (a workload ID, not a trust domain ID).
    ///
    /// Header `{"alg":"ES256","kid":..,"typ":"JWT"}`; claims `sub`, `aud` (a string when
    /// there is one audience, else an array), `exp` = `iat` + `ttl` (whole seconds),
    /// `iat` = `now` (whole seconds), `jti` (128 random bits, hex).
    pub fn sign(
        &self,
        subject: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<SignedJwt, JwtError> {
        if subject.is_trust_domain_id() {
            return Err(JwtError::InvalidSubject(IdError::TrustDomainOnly));
        }
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(JwtError::EmptyAudience);
        }
        let ttl = ttl.as_secs();
        if ttl == 0 {
            return Err(JwtError::InvalidTtl);
        }
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| JwtError::Clock)?
            .as_secs();
        let exp = iat.checked_add(ttl).ok_or(JwtError::InvalidTtl)?;
        let issued_at = UNIX_EPOCH + Duration::from_secs(iat);
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .ok_or(JwtError::InvalidTtl)?;

        let mut nonce = [0u8; 16];
        self.rng.fill(&mut nonce).map_err(|_| JwtError::Signing)?;
        let jti = lower_hex(&nonce);

        let claims = SignerClaims {
            sub: subject.as_str(),
            aud: match audiences {
                [one] => Audience::One(one),
                many => Audience::Many(many),
            },
            exp,
            iat,
            jti: &jti,
        };
        let payload = serde_json::to_vec(&claims).map_err(|_| JwtError::Signing)?;
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 4 / 3 + 96);
        token.push_str(&self.header_b64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let signature = self
            .key
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::Signing)?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut token);
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLong {
                len: token.len(),
                max: MAX_TOKEN_LEN,
            });
        }
        Ok(SignedJwt {
            token,
            expires_at,
            issued_at,
            jti,
        })
    }
}

fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Bundles

/// The JWT authorities of one trust domain, by `kid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: BTreeMap<String, JwtPublicKey>,
}

impl JwtBundle {
    /// A bundle of `keys` for `trust_domain`. Of two keys with the same `kid`, the later
    /// one is kept.
    pub fn new(trust_domain: TrustDomain, keys: Vec<JwtPublicKey>) -> Self {
        Self {
            trust_domain,
            keys: keys.into_iter().map(|key| (key.kid.clone(), key)).collect(),
        }
    }

    /// The trust domain the keys speak for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The keys, ordered by `kid`.
    pub fn keys(&self) -> impl Iterator<Item = &JwtPublicKey> {
        self.keys.values()
    }

    /// The key named `kid`.
    pub fn get(&self, kid: &str) -> Option<&JwtPublicKey> {
        self.keys.get(kid)
    }

    /// True when the bundle has no key: every JWT-SVID of the trust domain is invalid.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The SPIFFE bundle document (a JWKS, SPIFFE Trust Domain and Bundle spec §4):
    /// `{"keys": [...], "spiffe_refresh_hint": .., "spiffe_sequence": ..}` with one
    /// `x509-svid` JWK (with `x5c`) per X.509 authority (DER certificate), then the
    /// `jwt-svid` keys of this bundle.
    ///
    /// An authority that is not a certificate, or whose key is not EC P-256/P-384/P-521
    /// or RSA 2048-8192, cannot be written as a JWK and is left out; use
    /// [`Self::try_to_spiffe_bundle_json`] where that must be an error.
    pub fn to_spiffe_bundle_json(
        &self,
        x509_authorities: &[Vec<u8>],
        sequence: u64,
        refresh_hint_secs: u64,
    ) -> String {
        let authorities = x509_authorities
            .iter()
            .filter_map(|der| x509_authority_jwk(der).ok())
            .collect();
        self.document(authorities, sequence, refresh_hint_secs)
    }

    /// [`Self::to_spiffe_bundle_json`], failing instead of leaving out an authority that
    /// cannot be written as a JWK.
    pub fn try_to_spiffe_bundle_json(
        &self,
        x509_authorities: &[Vec<u8>],
        sequence: u64,
        refresh_hint_secs: u64,
    ) -> Result<String, JwtError> {
        let authorities = x509_authorities
            .iter()
            .map(|der| x509_authority_jwk(der))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.document(authorities, sequence, refresh_hint_secs))
    }

    fn document(&self, mut keys: Vec<Value>, sequence: u64, refresh_hint_secs: u64) -> String {
        keys.extend(self.keys().map(JwtPublicKey::to_jwk));
        let mut doc = Map::new();
        doc.insert("keys".to_owned(), Value::Array(keys));
        doc.insert("spiffe_refresh_hint".to_owned(), refresh_hint_secs.into());
        doc.insert("spiffe_sequence".to_owned(), sequence.into());
        Value::Object(doc).to_string()
    }

    /// Reads the JWT-SVID keys of a SPIFFE bundle document for `trust_domain`.
    ///
    /// Only `"use": "jwt-svid"` JWKs with a non-empty string `kid` are kept (JWT-SVID
    /// spec §6.2, SECURITY.md §3.8 item 79 and §3.11 item 111); entries with another or
    /// no `use`, no `kid`, or a key type, curve or RSA size tessera does not support are
    /// ignored. Fails on malformed JSON (including repeated member names), a missing
    /// `keys` array, malformed key material of a supported type, two JWT keys with one
    /// `kid`, and non-integer `spiffe_sequence` / `spiffe_refresh_hint`.
    pub fn from_spiffe_bundle_json(
        trust_domain: TrustDomain,
        json: &[u8],
    ) -> Result<Self, JwtError> {
        let doc = parse_object(json).map_err(|err| {
            JwtError::InvalidBundle(match err {
                JsonError::Malformed => "not a single JSON object",
                JsonError::Duplicate => "repeated JSON member name",
                JsonError::TooDeep => "JSON nested too deeply",
            })
        })?;
        for field in ["spiffe_sequence", "spiffe_refresh_hint"] {
            if doc.get(field).is_some_and(|v| v.as_u64().is_none()) {
                return Err(JwtError::InvalidBundle(
                    "spiffe_sequence and spiffe_refresh_hint must be non-negative integers",
                ));
            }
        }
        let entries = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwtError::InvalidBundle("`keys` is missing or not an array"))?;
        let mut keys = BTreeMap::new();
        for entry in entries {
            let jwk = entry
                .as_object()
                .ok_or(JwtError::InvalidBundle("a `keys` entry is not an object"))?;
            if jwk.get("use").and_then(Value::as_str) != Some(USE_JWT_SVID) {
                continue;
            }
            let Some(kid) = jwk
                .get("kid")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty())
            else {
                continue;
            };
            let Some(key) = JwtPublicKey::from_jwk(kid.to_owned(), jwk)? else {
                continue;
            };
            if keys.insert(kid.to_owned(), key).is_some() {
                return Err(JwtError::InvalidBundle("two jwt-svid keys share a kid"));
            }
        }
        Ok(Self { trust_domain, keys })
    }
}

/// The `x509-svid` JWK of one X.509 authority: its key parameters, `use` and `x5c`.
fn x509_authority_jwk(der: &[u8]) -> Result<Value, JwtError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| JwtError::InvalidKey("X.509 authority is not a DER certificate"))?;
    if !rest.is_empty() {
        return Err(JwtError::InvalidKey(
            "trailing bytes after an X.509 authority",
        ));
    }
    let key = JwtPublicKey::parse_spki(String::new(), cert.public_key().raw)?;
    let mut jwk = key.jwk_params();
    jwk.insert("use".to_owned(), Value::String(USE_X509_SVID.to_owned()));
    jwk.insert(
        "x5c".to_owned(),
        Value::Array(vec![Value::String(STANDARD.encode(der))]),
    );
    Ok(Value::Object(jwk))
}

/// Where [`validate`] finds the JWT bundle of a trust domain: a [`JwtBundle`], a slice,
/// `Vec`, `HashMap` or `BTreeMap` of them (borrowed, no copy), or a closure
/// `Fn(&TrustDomain) -> Option<JwtBundle>` (its result is owned: return a cheap clone).
///
/// Whatever the source returns, a bundle is only used if its own trust domain is the
/// one asked for.
pub trait JwtBundleSource {
    /// The JWT bundle of `trust_domain`, if known.
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>>;
}

impl JwtBundleSource for JwtBundle {
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        (self.trust_domain == *trust_domain).then_some(Cow::Borrowed(self))
    }
}

impl JwtBundleSource for [JwtBundle] {
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        self.iter()
            .find(|b| b.trust_domain == *trust_domain)
            .map(Cow::Borrowed)
    }
}

impl JwtBundleSource for Vec<JwtBundle> {
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        self.as_slice().jwt_bundle(trust_domain)
    }
}

impl<S: BuildHasher> JwtBundleSource for HashMap<TrustDomain, JwtBundle, S> {
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        self.get(trust_domain).map(Cow::Borrowed)
    }
}

impl JwtBundleSource for BTreeMap<TrustDomain, JwtBundle> {
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        self.get(trust_domain).map(Cow::Borrowed)
    }
}

impl<F> JwtBundleSource for F
where
    F: Fn(&TrustDomain) -> Option<JwtBundle> + ?Sized,
{
    fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
        self(trust_domain).map(Cow::Owned)
    }
}

// ---------------------------------------------------------------------------------------
// Validation

/// A JWT-SVID that passed [`validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedJwt {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// Every claim, as sent.
    pub claims: Map<String, Value>,
    /// `exp`.
    pub expires_at: SystemTime,
}

/// Validates a JWT-SVID presented to `audience`, with the keys of `bundles`, at `now`.
/// The checks and their order are in the module documentation.
pub fn validate<B: JwtBundleSource + ?Sized>(
    token: &str,
    audience: &str,
    bundles: &B,
    now: SystemTime,
) -> Result<ValidatedJwt, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    if audience.is_empty() {
        return Err(JwtError::EmptyAudience);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotCompact);
    };

    // Header: everything about it is checked before any key is looked up.
    if header_b64.len() > MAX_HEADER_LEN {
        return Err(JwtError::HeaderTooLong);
    }
    let header = decode_object(header_b64, JwtPart::Header)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Alg::parse)
        .ok_or(JwtError::UnsupportedAlgorithm)?;
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ == "JWT" || typ == "JOSE" => {}
        Some(_) => return Err(JwtError::InvalidType),
    }
    if let Some(name) = FORBIDDEN_HEADERS
        .into_iter()
        .find(|name| header.contains_key(*name))
    {
        return Err(JwtError::ForbiddenHeader(name));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => kid,
        _ => return Err(JwtError::MissingKeyId),
    };

    let claims = decode_object(payload_b64, JwtPart::Payload)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| JwtError::Base64(JwtPart::Signature))?;
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtError::MissingSubject)?;
    let spiffe_id = SpiffeId::parse_leaf(subject).map_err(JwtError::InvalidSubject)?;

    // The key: by the trust domain of `sub`, then by `kid`.
    let trust_domain = spiffe_id.trust_domain();
    let bundle = bundles
        .jwt_bundle(&trust_domain)
        .filter(|bundle| bundle.trust_domain == trust_domain);
    let Some(bundle) = bundle else {
        return Err(JwtError::NoBundle { trust_domain });
    };
    let Some(key) = bundle.get(kid) else {
        return Err(JwtError::UnknownKeyId { trust_domain });
    };
    let signing_input = token
        .as_bytes()
        .get(..header_b64.len() + 1 + payload_b64.len())
        .ok_or(JwtError::NotCompact)?;
    key.verify(alg, signing_input, &signature)?;

    // Claims, now that they are authentic.
    let audience_ok = match claims.get("aud") {
        None => return Err(JwtError::MissingAudience),
        Some(Value::String(aud)) if !aud.is_empty() => aud == audience,
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut found = false;
            for item in items {
                match item {
                    Value::String(aud) if !aud.is_empty() => found |= aud == audience,
                    _ => return Err(JwtError::InvalidAudience),
                }
            }
            found
        }
        Some(_) => return Err(JwtError::InvalidAudience),
    };
    if !audience_ok {
        return Err(JwtError::AudienceMismatch);
    }

    let now = match now.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    };
    let leeway = LEEWAY.as_secs_f64();
    let exp = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingExpiry)?;
    if now > exp + leeway {
        return Err(JwtError::Expired);
    }
    if numeric_date(&claims, "nbf")?.is_some_and(|nbf| nbf > now + leeway) {
        return Err(JwtError::NotYetValid);
    }
    if numeric_date(&claims, "iat")?.is_some_and(|iat| iat > now + leeway) {
        return Err(JwtError::IssuedInFuture);
    }
    let expires_at = Duration::try_from_secs_f64(exp)
        .ok()
        .and_then(|since| UNIX_EPOCH.checked_add(since))
        .ok_or(JwtError::InvalidTime("exp"))?;

    Ok(ValidatedJwt {
        spiffe_id,
        claims,
        expires_at,
    })
}

/// A NumericDate claim: absent, or a finite JSON number (fractions allowed, RFC 7519 §2).
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(number)) => number
            .as_f64()
            .filter(|v| v.is_finite())
            .map(Some)
            .ok_or(JwtError::InvalidTime(name)),
        Some(_) => Err(JwtError::InvalidTime(name)),
    }
}

fn decode_object(part_b64: &str, part: JwtPart) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part_b64)
        .map_err(|_| JwtError::Base64(part))?;
    parse_object(&bytes).map_err(|err| match err {
        JsonError::Malformed => JwtError::NotJsonObject(part),
        JsonError::Duplicate => JwtError::DuplicateKey(part),
        JsonError::TooDeep => JwtError::TooDeep(part),
    })
}

// ---------------------------------------------------------------------------------------
// Strict JSON: serde_json keeps the last of two members with the same name; a JOSE
// header or claims set that says two things must be refused instead (RFC 7515 §4 allows
// either, RFC 8725 §3.1 and the JWT-SVID threat model want the refusal).

enum JsonError {
    Malformed,
    Duplicate,
    TooDeep,
}

/// Parses exactly one JSON object: no repeated member name at any level, nesting at most
/// [`MAX_JSON_DEPTH`], nothing after it but whitespace.
fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, JsonError> {
    if !depth_within_limit(bytes) {
        return Err(JsonError::TooDeep);
    }
    let duplicate = Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = match StrictValue(&duplicate).deserialize(&mut deserializer) {
        Ok(value) => value,
        Err(_) if duplicate.get() => return Err(JsonError::Duplicate),
        Err(_) => return Err(JsonError::Malformed),
    };
    deserializer.end().map_err(|_| JsonError::Malformed)?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(JsonError::Malformed),
    }
}

/// A linear scan: true when `{`/`[` outside strings never nest deeper than
/// [`MAX_JSON_DEPTH`]. Syntax is left to the parser.
fn depth_within_limit(bytes: &[u8]) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Deserializes a [`Value`], failing (and setting the flag) on a repeated member name.
#[derive(Clone, Copy)]
struct StrictValue<'a>(&'a Cell<bool>);

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("non-finite number"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if members.contains_key(&name) {
                self.0.set(true);
                return Err(de::Error::custom("repeated member name"));
            }
            let value = map.next_value_seed(self)?;
            members.insert(name, value);
        }
        Ok(Value::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;

    const NOW_SECS: u64 = 1_750_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_SECS)
    }

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn aud(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    struct Setup {
        signer: JwtSigner,
        bundle: JwtBundle,
    }

    fn setup() -> Setup {
        let signer = JwtSigner::generate("k1".to_owned()).unwrap();
        let bundle = JwtBundle::new(td("example.org"), vec![signer.public_key()]);
        Setup { signer, bundle }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs arbitrary header and claims text with the signer's P-256 key.
    fn forge_raw(signer: &JwtSigner, header: &str, claims: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let signature = signer.key.sign(&signer.rng, input.as_bytes()).unwrap();
        format!("{input}.{}", b64(signature.as_ref()))
    }

    fn forge(signer: &JwtSigner, header: &Value, claims: &Value) -> String {
        forge_raw(signer, &header.to_string(), &claims.to_string())
    }

    fn good_header() -> Value {
        json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
    }

    fn good_claims() -> Value {
        json!({
            "sub": "spiffe://example.org/w",
            "aud": "a",
            "exp": NOW_SECS + 300,
            "iat": NOW_SECS,
        })
    }

    fn with_header(key: &str, value: Value) -> Value {
        let mut h = good_header();
        h.as_object_mut().unwrap().insert(key.to_owned(), value);
        h
    }

    fn without_header(key: &str) -> Value {
        let mut h = good_header();
        h.as_object_mut().unwrap().remove(key);
        h
    }

    fn with_claim(key: &str, value: Value) -> Value {
        let mut c = good_claims();
        c.as_object_mut().unwrap().insert(key.to_owned(), value);
        c
    }

    fn without_claim(key: &str) -> Value {
        let mut c = good_claims();
        c.as_object_mut().unwrap().remove(key);
        c
    }

    /// Replaces the signature part of a token.
    fn with_signature(token: &str, signature: &[u8]) -> String {
        let (input, _) = token.rsplit_once('.').unwrap();
        format!("{input}.{}", b64(signature))
    }

    fn signature_of(token: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(token.rsplit_once('.').unwrap().1)
            .unwrap()
    }

    /// A bundle source that counts lookups, to show a token was refused before any key
    /// was looked up.
    struct Counting<'a> {
        bundle: &'a JwtBundle,
        lookups: Cell<usize>,
    }

    impl JwtBundleSource for Counting<'_> {
        fn jwt_bundle(&self, trust_domain: &TrustDomain) -> Option<Cow<'_, JwtBundle>> {
            self.lookups.set(self.lookups.get() + 1);
            self.bundle.jwt_bundle(trust_domain)
        }
    }

    fn check_no_lookup(s: &Setup, token: &str, expected: JwtError) {
        let source = Counting {
            bundle: &s.bundle,
            lookups: Cell::new(0),
        };
        assert_eq!(validate(token, "a", &source, now()), Err(expected));
        assert_eq!(source.lookups.get(), 0, "a key was looked up");
    }

    // ---- round trips ----------------------------------------------------------------

    #[test]
    fn sign_then_validate_single_audience_as_string() {
        let s = setup();
        let signed = s
            .signer
            .sign(
                &id("spiffe://example.org/w"),
                &aud(&["a"]),
                Duration::from_secs(300),
                now(),
            )
            .unwrap();
        assert_eq!(signed.issued_at, now());
        assert_eq!(signed.expires_at, now() + Duration::from_secs(300));
        assert_eq!(signed.jti.len(), 32);
        assert!(signed.jti.bytes().all(|b| b.is_ascii_hexdigit()));

        let (header, claims, _) = {
            let mut p = signed.token.split('.');
            (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
        };
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
        assert_eq!(header, good_header());
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], json!("a"));
        assert_eq!(claims["jti"], json!(signed.jti));

        let ok = validate(&signed.token, "a", &s.bundle, now()).unwrap();
        assert_eq!(ok.spiffe_id, id("spiffe://example.org/w"));
        assert_eq!(ok.expires_at, signed.expires_at);
        assert_eq!(ok.claims["sub"], json!("spiffe://example.org/w"));
        assert_eq!(ok.claims["iat"], json!(NOW_SECS));
        assert_eq!(ok.claims["exp"], json!(NOW_SECS + 300));
    }

    #[test]
    fn sign_then_validate_multi_audience_as_array() {
        let s = setup();
        let signed = s
            .signer
            .sign(
                &id("spiffe://example.org/w"),
                &aud(&["a", "b"]),
                Duration::from_secs(60),
                now(),
            )
            .unwrap();
        let claims = signed.token.split('.').nth(1).unwrap();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        assert_eq!(claims["aud"], json!(["a", "b"]));
        for audience in ["a", "b"] {
            assert!(validate(&signed.token, audience, &s.bundle, now()).is_ok());
        }
        assert_eq!(
            validate(&signed.token, "c", &s.bundle, now()),
            Err(JwtError::AudienceMismatch)
        );
    }

    #[test]
    fn both_aud_encodings_are_accepted() {
        let s = setup();
        for aud in [json!("a"), json!(["a"]), json!(["x", "a"])] {
            let token = forge(&s.signer, &good_header(), &with_claim("aud", aud));
            assert!(validate(&token, "a", &s.bundle, now()).is_ok());
        }
        // typ may be absent or JOSE.
        for header in [without_header("typ"), with_header("typ", json!("JOSE"))] {
            let token = forge(&s.signer, &header, &good_claims());
            assert!(validate(&token, "a", &s.bundle, now()).is_ok());
        }
    }

    #[test]
    fn bundle_sources_map_slice_and_single() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let mut map = HashMap::new();
        map.insert(td("example.org"), s.bundle.clone());
        assert!(validate(&token, "a", &map, now()).is_ok());
        let btree: BTreeMap<_, _> = map.clone().into_iter().collect();
        assert!(validate(&token, "a", &btree, now()).is_ok());
        assert!(validate(&token, "a", &vec![s.bundle.clone()], now()).is_ok());
        assert!(validate(&token, "a", [s.bundle.clone()].as_slice(), now()).is_ok());

        // A closure returning an owned bundle.
        let closure = |td: &TrustDomain| (*td == s.bundle.trust_domain).then(|| s.bundle.clone());
        assert!(validate(&token, "a", &closure, now()).is_ok());
        let dynamic: &dyn Fn(&TrustDomain) -> Option<JwtBundle> = &closure;
        assert!(validate(&token, "a", dynamic, now()).is_ok());
        let nothing = |_: &TrustDomain| None;
        assert_eq!(
            validate(&token, "a", &nothing, now()),
            Err(JwtError::NoBundle {
                trust_domain: td("example.org")
            })
        );

        // A bundle filed under the wrong trust domain is not used for it.
        let mut wrong = HashMap::new();
        wrong.insert(
            td("example.org"),
            JwtBundle::new(td("other.org"), vec![s.signer.public_key()]),
        );
        assert_eq!(
            validate(&token, "a", &wrong, now()),
            Err(JwtError::NoBundle {
                trust_domain: td("example.org")
            })
        );
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let s = setup();
        let reloaded = JwtSigner::from_pkcs8("k1".to_owned(), &s.signer.pkcs8().unwrap()).unwrap();
        assert_eq!(reloaded.public_key(), s.signer.public_key());
        assert_eq!(reloaded.kid(), "k1");
        let signed = reloaded
            .sign(
                &id("spiffe://example.org/w"),
                &aud(&["a"]),
                Duration::from_secs(60),
                now(),
            )
            .unwrap();
        assert!(validate(&signed.token, "a", &s.bundle, now()).is_ok());
        assert!(matches!(
            JwtSigner::from_pkcs8("k".to_owned(), b"junk"),
            Err(JwtError::InvalidKey(_))
        ));
        assert!(matches!(
            JwtSigner::generate(String::new()),
            Err(JwtError::InvalidKey(_))
        ));
    }

    #[test]
    fn debug_output_has_no_key_and_no_token() {
        let s = setup();
        let signed = s
            .signer
            .sign(
                &id("spiffe://example.org/w"),
                &aud(&["a"]),
                Duration::from_secs(60),
                now(),
            )
            .unwrap();
        let signer_debug = format!("{:?}", s.signer);
        assert!(signer_debug.contains("k1"));
        let pkcs8 = s.signer.pkcs8().unwrap();
        assert!(!signer_debug.contains(&lower_hex(&pkcs8[pkcs8.len() - 32..])));
        assert!(!signer_debug.contains(&format!("{:?}", &pkcs8[pkcs8.len() - 8..])));
        let signed_debug = format!("{signed:?}");
        for part in signed.token.split('.') {
            assert!(!signed_debug.contains(part));
        }
    }

    #[test]
    fn sign_refuses_bad_requests() {
        let s = setup();
        let sub = id("spiffe://example.org/w");
        let ttl = Duration::from_secs(60);
        assert_eq!(
            s.signer.sign(&sub, &[], ttl, now()),
            Err(JwtError::EmptyAudience)
        );
        assert_eq!(
            s.signer.sign(&sub, &aud(&["a", ""]), ttl, now()),
            Err(JwtError::EmptyAudience)
        );
        assert_eq!(
            s.signer
                .sign(&sub, &aud(&["a"]), Duration::from_millis(999), now()),
            Err(JwtError::InvalidTtl)
        );
        assert_eq!(
            s.signer
                .sign(&id("spiffe://example.org"), &aud(&["a"]), ttl, now()),
            Err(JwtError::InvalidSubject(IdError::TrustDomainOnly))
        );
        let huge = vec!["x".repeat(1000); 8];
        assert!(matches!(
            s.signer.sign(&sub, &huge, ttl, now()),
            Err(JwtError::TooLong { .. })
        ));
    }

    // ---- §3.8 item 72: algorithms ---------------------------------------------------

    #[test]
    fn item72_alg_none_is_rejected_before_key_use() {
        let s = setup();
        let header = b64(json!({"alg": "none", "kid": "k1"}).to_string().as_bytes());
        let claims = b64(good_claims().to_string().as_bytes());
        check_no_lookup(
            &s,
            &format!("{header}.{claims}."),
            JwtError::UnsupportedAlgorithm,
        );
        // Even with a valid ES256 signature attached.
        let token = forge(
            &s.signer,
            &with_header("alg", json!("none")),
            &good_claims(),
        );
        check_no_lookup(&s, &token, JwtError::UnsupportedAlgorithm);
    }

    #[test]
    fn item72_hs256_keyed_with_the_public_key_is_rejected() {
        use aws_lc_rs::hmac;
        let s = setup();
        let public = s.signer.public_key();
        let header = b64(with_header("alg", json!("HS256")).to_string().as_bytes());
        let claims = b64(good_claims().to_string().as_bytes());
        let input = format!("{header}.{claims}");
        // The classic confusion: HMAC keyed with the public key bytes, in each form a
        // careless verifier might use.
        for secret in [
            public.to_spki_der(),
            public.to_jwk().to_string().into_bytes(),
            s.bundle.to_spiffe_bundle_json(&[], 1, 60).into_bytes(),
        ] {
            let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
            let tag = hmac::sign(&key, input.as_bytes());
            check_no_lookup(
                &s,
                &format!("{input}.{}", b64(tag.as_ref())),
                JwtError::UnsupportedAlgorithm,
            );
        }
        for alg in ["HS384", "HS512"] {
            let token = forge(&s.signer, &with_header("alg", json!(alg)), &good_claims());
            check_no_lookup(&s, &token, JwtError::UnsupportedAlgorithm);
        }
    }

    #[test]
    fn item72_eddsa_is_rejected() {
        let s = setup();
        let token = forge(
            &s.signer,
            &with_header("alg", json!("EdDSA")),
            &good_claims(),
        );
        check_no_lookup(&s, &token, JwtError::UnsupportedAlgorithm);
    }

    #[test]
    fn item72_unknown_missing_or_miscased_alg_is_rejected() {
        let s = setup();
        for alg in [
            json!("ES256K"),
            json!("es256"),
            json!("ES256 "),
            json!("RSA-OAEP"),
            json!(""),
            json!(256),
            json!(null),
            json!(["ES256"]),
        ] {
            let token = forge(&s.signer, &with_header("alg", alg), &good_claims());
            check_no_lookup(&s, &token, JwtError::UnsupportedAlgorithm);
        }
        let token = forge(&s.signer, &without_header("alg"), &good_claims());
        check_no_lookup(&s, &token, JwtError::UnsupportedAlgorithm);
    }

    // ---- item 73: key selection -----------------------------------------------------

    #[test]
    fn item73_missing_kid_is_rejected() {
        let s = setup();
        for header in [
            without_header("kid"),
            with_header("kid", json!("")),
            with_header("kid", json!(1)),
        ] {
            let token = forge(&s.signer, &header, &good_claims());
            check_no_lookup(&s, &token, JwtError::MissingKeyId);
        }
    }

    #[test]
    fn item73_unknown_kid_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &with_header("kid", json!("k2")), &good_claims());
        let err = validate(&token, "a", &s.bundle, now()).unwrap_err();
        assert_eq!(
            err,
            JwtError::UnknownKeyId {
                trust_domain: td("example.org")
            }
        );
        assert!(err.to_string().contains("no keys found for trust domain"));
    }

    #[test]
    fn item73_kid_of_trust_domain_a_with_sub_in_trust_domain_b_is_rejected() {
        // TD A's signer mints a token whose sub is in TD B. B has a bundle, but A's kid
        // is not in it: the key of A must not be used for B.
        let a = JwtSigner::generate("ka".to_owned()).unwrap();
        let b = JwtSigner::generate("kb".to_owned()).unwrap();
        let bundles = vec![
            JwtBundle::new(td("a.org"), vec![a.public_key()]),
            JwtBundle::new(td("b.org"), vec![b.public_key()]),
        ];
        let token = a
            .sign(
                &id("spiffe://b.org/w"),
                &aud(&["a"]),
                Duration::from_secs(60),
                now(),
            )
            .unwrap()
            .token;
        assert_eq!(
            validate(&token, "a", &bundles, now()),
            Err(JwtError::UnknownKeyId {
                trust_domain: td("b.org")
            })
        );
        // And with no bundle for B at all.
        let err = validate(&token, "a", &bundles[..1], now()).unwrap_err();
        assert_eq!(
            err,
            JwtError::NoBundle {
                trust_domain: td("b.org")
            }
        );
        assert!(err.to_string().contains("no keys found for trust domain"));
    }

    #[test]
    fn item73_same_kid_in_two_trust_domains_uses_the_sub_trust_domain_key() {
        // Both trust domains name their key "k1"; a token from A with sub in B must be
        // checked with B's "k1" and fail.
        let a = JwtSigner::generate("k1".to_owned()).unwrap();
        let b = JwtSigner::generate("k1".to_owned()).unwrap();
        let bundles = vec![
            JwtBundle::new(td("a.org"), vec![a.public_key()]),
            JwtBundle::new(td("b.org"), vec![b.public_key()]),
        ];
        let token = a
            .sign(
                &id("spiffe://b.org/w"),
                &aud(&["a"]),
                Duration::from_secs(60),
                now(),
            )
            .unwrap()
            .token;
        assert_eq!(
            validate(&token, "a", &bundles, now()),
            Err(JwtError::InvalidSignature)
        );
    }

    #[test]
    fn subject_must_be_a_workload_spiffe_id() {
        let s = setup();
        let cases = [
            (without_claim("sub"), JwtError::MissingSubject),
            (with_claim("sub", json!(7)), JwtError::MissingSubject),
            (
                with_claim("sub", json!("spiffe://example.org")),
                JwtError::InvalidSubject(IdError::TrustDomainOnly),
            ),
            (
                with_claim("sub", json!("spiffe://Example.org/w")),
                JwtError::InvalidSubject(IdError::TrustDomainNotLowercase),
            ),
            (
                with_claim("sub", json!("spiffe://example.org/a/../w")),
                JwtError::InvalidSubject(IdError::DotSegment),
            ),
        ];
        for (claims, expected) in cases {
            let token = forge(&s.signer, &good_header(), &claims);
            check_no_lookup(&s, &token, expected);
        }
    }

    #[test]
    fn key_type_must_match_alg() {
        let s = setup();
        for alg in ["ES384", "ES512", "RS256", "PS256"] {
            let token = forge(&s.signer, &with_header("alg", json!(alg)), &good_claims());
            assert_eq!(
                validate(&token, "a", &s.bundle, now()),
                Err(JwtError::KeyAlgorithmMismatch),
                "{alg}"
            );
        }
    }

    // ---- item 74: time claims -------------------------------------------------------

    #[test]
    fn item74_missing_exp_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &without_claim("exp"));
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::MissingExpiry)
        );
        for exp in [json!("1750000300"), json!(null), json!([NOW_SECS + 300])] {
            let token = forge(&s.signer, &good_header(), &with_claim("exp", exp));
            assert_eq!(
                validate(&token, "a", &s.bundle, now()),
                Err(JwtError::InvalidTime("exp"))
            );
        }
    }

    #[test]
    fn item74_expired_beyond_leeway_is_rejected() {
        let s = setup();
        let leeway = LEEWAY.as_secs();
        let token = forge(
            &s.signer,
            &good_header(),
            &with_claim("exp", json!(NOW_SECS)),
        );
        // Within the leeway: accepted.
        assert!(validate(&token, "a", &s.bundle, now() + LEEWAY).is_ok());
        assert_eq!(
            validate(
                &token,
                "a",
                &s.bundle,
                now() + Duration::from_secs(leeway + 1)
            ),
            Err(JwtError::Expired)
        );
        let token = forge(&s.signer, &good_header(), &with_claim("exp", json!(-5)));
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::Expired)
        );
        // A fractional NumericDate is read as such.
        let token = forge(
            &s.signer,
            &good_header(),
            &with_claim("exp", json!(NOW_SECS as f64 - leeway as f64 - 0.5)),
        );
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn item74_nbf_and_iat_in_the_future_are_rejected() {
        let s = setup();
        let leeway = LEEWAY.as_secs();
        let soon = json!(NOW_SECS + leeway);
        let later = json!(NOW_SECS + leeway + 1);
        let token = forge(&s.signer, &good_header(), &with_claim("nbf", soon.clone()));
        assert!(validate(&token, "a", &s.bundle, now()).is_ok());
        let token = forge(&s.signer, &good_header(), &with_claim("nbf", later.clone()));
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::NotYetValid)
        );
        let token = forge(&s.signer, &good_header(), &with_claim("iat", soon));
        assert!(validate(&token, "a", &s.bundle, now()).is_ok());
        let token = forge(&s.signer, &good_header(), &with_claim("iat", later));
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::IssuedInFuture)
        );
        for name in ["nbf", "iat"] {
            let token = forge(&s.signer, &good_header(), &with_claim(name, json!("0")));
            let expected = if name == "nbf" {
                JwtError::InvalidTime("nbf")
            } else {
                JwtError::InvalidTime("iat")
            };
            assert_eq!(validate(&token, "a", &s.bundle, now()), Err(expected));
        }
    }

    // ---- item 75 and 80: audience ---------------------------------------------------

    #[test]
    fn item75_missing_aud_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &without_claim("aud"));
        assert_eq!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::MissingAudience)
        );
        for bad in [
            json!(""),
            json!([]),
            json!(["a", 1]),
            json!([""]),
            json!(1),
            json!(null),
        ] {
            let token = forge(&s.signer, &good_header(), &with_claim("aud", bad));
            assert_eq!(
                validate(&token, "a", &s.bundle, now()),
                Err(JwtError::InvalidAudience)
            );
        }
    }

    #[test]
    fn item75_aud_without_the_expected_value_is_rejected() {
        let s = setup();
        for aud in [json!("b"), json!(["b", "c"]), json!("A"), json!("a ")] {
            let token = forge(&s.signer, &good_header(), &with_claim("aud", aud));
            assert_eq!(
                validate(&token, "a", &s.bundle, now()),
                Err(JwtError::AudienceMismatch)
            );
        }
        let token = forge(&s.signer, &good_header(), &good_claims());
        assert_eq!(
            validate(&token, "", &s.bundle, now()),
            Err(JwtError::EmptyAudience)
        );
    }

    #[test]
    fn item80_token_for_audience_a_presented_to_b_is_rejected() {
        let s = setup();
        let signed = s
            .signer
            .sign(
                &id("spiffe://example.org/w"),
                &aud(&["service-a"]),
                Duration::from_secs(300),
                now(),
            )
            .unwrap();
        assert!(validate(&signed.token, "service-a", &s.bundle, now()).is_ok());
        assert_eq!(
            validate(&signed.token, "service-b", &s.bundle, now()),
            Err(JwtError::AudienceMismatch)
        );
        // Same-audience replay within the TTL is accepted (JWT-SVID spec §7.1).
        assert!(
            validate(
                &signed.token,
                "service-a",
                &s.bundle,
                now() + Duration::from_secs(100)
            )
            .is_ok()
        );
    }

    // ---- item 76: header shape ------------------------------------------------------

    #[test]
    fn item76_typ_other_than_jwt_or_jose_is_rejected() {
        let s = setup();
        for typ in [
            json!("jwt"),
            json!("at+jwt"),
            json!("JWS"),
            json!(""),
            json!(1),
            json!(null),
        ] {
            let token = forge(&s.signer, &with_header("typ", typ), &good_claims());
            check_no_lookup(&s, &token, JwtError::InvalidType);
        }
    }

    #[test]
    fn item76_crit_jku_jwk_x5u_x5c_headers_are_rejected() {
        let s = setup();
        let jwk = s.signer.public_key().to_jwk();
        let cases: [(&'static str, Value); 5] = [
            ("crit", json!(["exp"])),
            ("jku", json!("https://attacker.example/jwks")),
            ("jwk", jwk),
            ("x5u", json!("https://attacker.example/cert.pem")),
            ("x5c", json!(["MIIB"])),
        ];
        for (name, value) in cases {
            let token = forge(&s.signer, &with_header(name, value), &good_claims());
            check_no_lookup(&s, &token, JwtError::ForbiddenHeader(name));
        }
    }

    #[test]
    fn item76_jws_json_serialization_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let mut parts = token.split('.');
        let (protected, payload, signature) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let general = json!({
            "payload": payload,
            "signatures": [{"protected": protected, "signature": signature}],
        })
        .to_string();
        let flattened = json!({
            "payload": payload,
            "protected": protected,
            "header": {"kid": "k1"},
            "signature": signature,
        })
        .to_string();
        for serialized in [general, flattened] {
            check_no_lookup(&s, &serialized, JwtError::NotCompact);
        }
    }

    #[test]
    fn item76_four_or_two_parts_are_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let (first, rest) = token.split_once('.').unwrap();
        for bad in [
            format!("{token}.{}", b64(b"x")),
            format!("{token}."),
            format!("{first}.{rest}.{first}"),
            format!("{}.{}", first, rest.split_once('.').unwrap().0),
            first.to_owned(),
            String::new(),
            // JWE compact serialization has five parts.
            format!("{token}.{first}.{first}"),
        ] {
            check_no_lookup(&s, &bad, JwtError::NotCompact);
        }
    }

    #[test]
    fn item76_two_header_objects_are_rejected() {
        let s = setup();
        let token = forge_raw(
            &s.signer,
            r#"{"alg":"ES256","kid":"k1"}{"alg":"none","kid":"k1"}"#,
            &good_claims().to_string(),
        );
        check_no_lookup(&s, &token, JwtError::NotJsonObject(JwtPart::Header));
        for header in [
            "[]",
            "\"ES256\"",
            "null",
            "",
            "{",
            r#"{"alg":"ES256","kid":"k1"} x"#,
        ] {
            let token = forge_raw(&s.signer, header, &good_claims().to_string());
            check_no_lookup(&s, &token, JwtError::NotJsonObject(JwtPart::Header));
        }
        let token = forge_raw(&s.signer, &good_header().to_string(), "[1]");
        check_no_lookup(&s, &token, JwtError::NotJsonObject(JwtPart::Payload));
    }

    // ---- item 77: ECDSA signature values --------------------------------------------

    #[test]
    fn item77_ecdsa_r_and_s_zero_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        assert_eq!(
            validate(&with_signature(&token, &[0u8; 64]), "a", &s.bundle, now()),
            Err(JwtError::InvalidSignature)
        );
        let mut r_zero = signature_of(&token);
        r_zero[..32].fill(0);
        assert_eq!(
            validate(&with_signature(&token, &r_zero), "a", &s.bundle, now()),
            Err(JwtError::InvalidSignature)
        );
    }

    #[test]
    fn item77_ecdsa_r_or_s_at_least_n_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let good = signature_of(&token);
        assert!(validate(&token, "a", &s.bundle, now()).is_ok());
        // P-256 group order n.
        let n: [u8; 32] = [
            0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2,
            0xfc, 0x63, 0x25, 0x51,
        ];
        let mut variants = Vec::new();
        for value in [[0xff; 32], n] {
            let mut s_big = good.clone();
            s_big[32..].copy_from_slice(&value);
            variants.push(s_big);
            let mut r_big = good.clone();
            r_big[..32].copy_from_slice(&value);
            variants.push(r_big);
        }
        // s + n: the same residue mod n as a valid s, but out of range.
        let mut s_plus_n = good.clone();
        let mut carry = 0u16;
        for i in (32..64).rev() {
            let sum = u16::from(s_plus_n[i]) + u16::from(n[i - 32]) + carry;
            s_plus_n[i] = (sum & 0xff) as u8;
            carry = sum >> 8;
        }
        if carry == 0 {
            variants.push(s_plus_n);
        }
        for signature in variants {
            assert_eq!(
                validate(&with_signature(&token, &signature), "a", &s.bundle, now()),
                Err(JwtError::InvalidSignature)
            );
        }
    }

    #[test]
    fn item77_ecdsa_wrong_length_signatures_are_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let good = signature_of(&token);
        let short = good[..63].to_vec();
        let mut long = good.clone();
        long.push(0);
        let mut leading_zero = vec![0];
        leading_zero.extend_from_slice(&good);
        for signature in [short, long, leading_zero, Vec::new(), der_signature(&good)] {
            assert_eq!(
                validate(&with_signature(&token, &signature), "a", &s.bundle, now()),
                Err(JwtError::InvalidSignature)
            );
        }
        // A flipped bit anywhere fails too.
        let mut flipped = good;
        flipped[10] ^= 1;
        assert_eq!(
            validate(&with_signature(&token, &flipped), "a", &s.bundle, now()),
            Err(JwtError::InvalidSignature)
        );
    }

    /// The ASN.1 DER form of a fixed `r || s` signature (not accepted in a JWS).
    fn der_signature(fixed: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        der_unsigned_integer(strip_leading_zeros(&fixed[..32]), &mut body);
        der_unsigned_integer(strip_leading_zeros(&fixed[32..]), &mut body);
        let mut out = vec![0x30];
        der_length(body.len(), &mut out);
        out.extend_from_slice(&body);
        out
    }

    // ---- item 78: parser limits -----------------------------------------------------

    #[test]
    fn item78_duplicate_keys_in_header_are_rejected() {
        let s = setup();
        let claims = good_claims().to_string();
        for header in [
            r#"{"alg":"ES256","kid":"k1","alg":"ES256"}"#,
            r#"{"alg":"none","kid":"k1","alg":"ES256"}"#,
            r#"{"alg":"ES256","kid":"k1","kid":"k2"}"#,
            r#"{"alg":"ES256","kid":"k1","\u0061lg":"ES256"}"#,
        ] {
            let token = forge_raw(&s.signer, header, &claims);
            check_no_lookup(&s, &token, JwtError::DuplicateKey(JwtPart::Header));
        }
    }

    #[test]
    fn item78_duplicate_keys_in_payload_are_rejected() {
        let s = setup();
        let header = good_header().to_string();
        let exp = NOW_SECS + 300;
        for claims in [
            format!(
                r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{exp},"sub":"spiffe://example.org/admin"}}"#
            ),
            format!(r#"{{"sub":"spiffe://example.org/w","aud":"b","aud":"a","exp":{exp}}}"#),
            format!(
                r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{exp},"x":{{"y":1,"y":2}}}}"#
            ),
        ] {
            let token = forge_raw(&s.signer, &header, &claims);
            check_no_lookup(&s, &token, JwtError::DuplicateKey(JwtPart::Payload));
        }
    }

    #[test]
    fn item78_one_megabyte_token_is_rejected_cheaply() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let mut big = token.clone();
        big.push_str(&"A".repeat(1 << 20));
        check_no_lookup(
            &s,
            &big,
            JwtError::TooLong {
                len: big.len(),
                max: MAX_TOKEN_LEN,
            },
        );
        let huge_claim = with_claim("pad", json!("x".repeat(1 << 20)));
        let big = forge(&s.signer, &good_header(), &huge_claim);
        assert!(matches!(
            validate(&big, "a", &s.bundle, now()),
            Err(JwtError::TooLong { .. })
        ));
        let dots = ".".repeat(1 << 20);
        assert!(matches!(
            validate(&dots, "a", &s.bundle, now()),
            Err(JwtError::TooLong { .. })
        ));
        // A long header inside the size limit is still capped.
        let long_kid = with_header("kid", json!("k".repeat(2000)));
        let token = forge(&s.signer, &long_kid, &good_claims());
        check_no_lookup(&s, &token, JwtError::HeaderTooLong);
    }

    #[test]
    fn item78_deeply_nested_claims_are_rejected() {
        let s = setup();
        let header = good_header().to_string();
        let exp = NOW_SECS + 300;
        let deep = "[".repeat(10_000);
        let claims =
            format!(r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{exp},"x":{deep}"#);
        // Base64 of 10 000 '[' exceeds the token limit; what fits still fails on depth.
        let token = forge_raw(&s.signer, &header, &claims);
        assert!(matches!(
            validate(&token, "a", &s.bundle, now()),
            Err(JwtError::TooLong { .. })
        ));
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        let claims =
            format!(r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{exp},"x":{deep}}}"#);
        let token = forge_raw(&s.signer, &header, &claims);
        check_no_lookup(&s, &token, JwtError::TooDeep(JwtPart::Payload));
        let deep = format!("{}{}", "{\"a\":".repeat(40), "}".repeat(40));
        let claims =
            format!(r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{exp},"x":{deep}}}"#);
        let token = forge_raw(&s.signer, &header, &claims);
        check_no_lookup(&s, &token, JwtError::TooDeep(JwtPart::Payload));
        let header = format!(r#"{{"alg":"ES256","kid":"k1","x":{}}}"#, "[".repeat(100));
        let token = forge_raw(&s.signer, &header, &good_claims().to_string());
        check_no_lookup(&s, &token, JwtError::TooDeep(JwtPart::Header));

        // The parser itself, on the raw 10 000 levels the token limit keeps out.
        assert!(matches!(
            parse_object(format!("{{\"x\":{}", "[".repeat(10_000)).as_bytes()),
            Err(JsonError::TooDeep)
        ));
        // Brackets inside strings do not count; moderate nesting is fine.
        let ok = with_claim(
            "x",
            json!({"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "n": [[[[1]]]]}),
        );
        let token = forge(&s.signer, &good_header(), &ok);
        assert!(validate(&token, "a", &s.bundle, now()).is_ok());
    }

    #[test]
    fn item78_invalid_base64url_is_rejected() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let rebuilt = |i: usize, part: String| {
            let mut p: Vec<String> = parts.iter().map(|s| (*s).to_owned()).collect();
            p[i] = part;
            p.join(".")
        };
        let which = [JwtPart::Header, JwtPart::Payload, JwtPart::Signature];
        for (i, part) in which.into_iter().enumerate() {
            let original = parts[i];
            let standard = STANDARD.encode(URL_SAFE_NO_PAD.decode(original).unwrap());
            let mut bad = vec![
                // Padding.
                format!("{original}="),
                format!("{original}=="),
                // Standard alphabet instead of URL-safe.
                format!("{original}+"),
                format!("/{original}"),
                format!("{}+{}", &original[..4], &original[4..]),
                // Whitespace and other bytes.
                format!("{} {}", &original[..4], &original[4..]),
                format!("{original}\n"),
                format!("{original}%"),
                // A length no base64 can have (4k + 1).
                format!("{original}{}", "A".repeat((5 - original.len() % 4) % 4)),
            ];
            if standard.ends_with('=') || standard.contains(['+', '/']) {
                bad.push(standard);
            }
            for encoded in bad {
                let token = rebuilt(i, encoded);
                assert_eq!(
                    validate(&token, "a", &s.bundle, now()),
                    Err(JwtError::Base64(part)),
                    "{part}"
                );
            }
        }
    }

    #[test]
    fn base64url_rejects_non_canonical_trailing_bits() {
        // "QQ" is 'A'; "QR" decodes to the same byte with non-zero trailing bits.
        assert_eq!(URL_SAFE_NO_PAD.decode("QQ").unwrap(), b"A");
        assert!(URL_SAFE_NO_PAD.decode("QR").is_err());
        assert!(URL_SAFE_NO_PAD.decode("QUI").is_ok());
        assert!(URL_SAFE_NO_PAD.decode("QUJ").is_err());
        assert!(URL_SAFE_NO_PAD.decode("QQ==").is_err());
        assert!(URL_SAFE_NO_PAD.decode("-_-_").is_ok());
        assert!(URL_SAFE_NO_PAD.decode("+/+/").is_err());

        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        // The 64-byte signature encodes to 86 chars: the last one carries 4 unused bits.
        let (input, signature) = token.rsplit_once('.').unwrap();
        let last = signature.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.find(last).unwrap();
        let sibling = alphabet.chars().nth(index | 1).unwrap();
        assert_ne!(sibling, last);
        let tampered = format!("{input}.{}{sibling}", &signature[..signature.len() - 1]);
        assert_eq!(
            validate(&tampered, "a", &s.bundle, now()),
            Err(JwtError::Base64(JwtPart::Signature))
        );
    }

    // ---- item 79 and bundles --------------------------------------------------------

    #[test]
    fn item79_jwks_x509_svid_key_and_key_without_kid_are_not_used() {
        let s = setup();
        let token = forge(&s.signer, &good_header(), &good_claims());
        let jwk = s.signer.public_key().to_jwk();
        let variant = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut key = jwk.as_object().unwrap().clone();
            edit(&mut key);
            json!({"keys": [key], "spiffe_sequence": 1}).to_string()
        };
        let documents = [
            variant(&|k| {
                k.insert("use".into(), json!("x509-svid"));
            }),
            variant(&|k| {
                k.remove("kid");
            }),
            variant(&|k| {
                k.insert("kid".into(), json!(""));
            }),
            variant(&|k| {
                k.remove("use");
            }),
            variant(&|k| {
                k.insert("use".into(), json!("sig"));
            }),
            variant(&|k| {
                k.insert("use".into(), json!("JWT-SVID"));
            }),
            variant(&|k| {
                k.insert("kty".into(), json!("OKP"));
            }),
            variant(&|k| {
                k.insert("crv".into(), json!("secp256k1"));
            }),
        ];
        for doc in documents {
            let bundle =
                JwtBundle::from_spiffe_bundle_json(td("example.org"), doc.as_bytes()).unwrap();
            assert!(bundle.is_empty(), "{doc}");
            assert_eq!(
                validate(&token, "a", &bundle, now()),
                Err(JwtError::UnknownKeyId {
                    trust_domain: td("example.org")
                })
            );
        }
        // The untouched key is used.
        let doc = variant(&|_| {});
        let bundle = JwtBundle::from_spiffe_bundle_json(td("example.org"), doc.as_bytes()).unwrap();
        assert!(validate(&token, "a", &bundle, now()).is_ok());
    }

    fn ca_certificate() -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn jwks_round_trip() {
        let a = JwtSigner::generate("k1".to_owned()).unwrap();
        let b = JwtSigner::generate("k2".to_owned()).unwrap();
        let bundle = JwtBundle::new(td("example.org"), vec![b.public_key(), a.public_key()]);
        let ca = ca_certificate();
        let text = bundle
            .try_to_spiffe_bundle_json(std::slice::from_ref(&ca), 7, 300)
            .unwrap();
        assert_eq!(
            text,
            bundle.to_spiffe_bundle_json(std::slice::from_ref(&ca), 7, 300)
        );
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["spiffe_sequence"], json!(7));
        assert_eq!(doc["spiffe_refresh_hint"], json!(300));
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0]["use"], json!("x509-svid"));
        assert_eq!(keys[0]["kty"], json!("EC"));
        assert_eq!(keys[0]["crv"], json!("P-256"));
        assert_eq!(keys[0]["x5c"], json!([STANDARD.encode(&ca)]));
        assert!(keys[0].get("kid").is_none());
        assert_eq!(keys[1]["kid"], json!("k1"));
        assert_eq!(keys[1]["use"], json!("jwt-svid"));
        assert_eq!(keys[2]["kid"], json!("k2"));
        assert_eq!(keys[1]["x"].as_str().unwrap().len(), 43);

        let back = JwtBundle::from_spiffe_bundle_json(td("example.org"), text.as_bytes()).unwrap();
        assert_eq!(back, bundle);
        assert_eq!(back.trust_domain(), &td("example.org"));
        assert_eq!(
            back.keys().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            ["k1", "k2"]
        );
        assert_eq!(back.get("k1"), Some(&a.public_key()));

        // Bad authorities are an error, not a silent omission.
        assert!(matches!(
            bundle.try_to_spiffe_bundle_json(&[b"junk".to_vec()], 1, 1),
            Err(JwtError::InvalidKey(_))
        ));
        // The infallible form leaves it out and keeps the rest.
        let lenient: Value = serde_json::from_str(&bundle.to_spiffe_bundle_json(
            &[b"junk".to_vec(), ca.clone()],
            7,
            300,
        ))
        .unwrap();
        assert_eq!(lenient, doc);
    }

    #[test]
    fn spki_round_trip_for_ec_and_rsa_keys() {
        use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
        let ec = JwtSigner::generate("k".to_owned()).unwrap().public_key();
        let again = JwtPublicKey::from_spki_der("k".to_owned(), &ec.to_spki_der()).unwrap();
        assert_eq!(again, ec);
        assert_eq!(again.key_type(), "EC P-256");

        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let spki = rsa.public_key().as_der().unwrap();
        let key = JwtPublicKey::from_spki_der("r".to_owned(), spki.as_ref()).unwrap();
        assert_eq!(key.to_spki_der(), spki.as_ref());
        assert_eq!(key.key_type(), "RSA");
        let jwk = key.to_jwk();
        assert_eq!(jwk["kty"], json!("RSA"));
        assert_eq!(jwk["e"], json!("AQAB"));
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(jwk["n"].as_str().unwrap())
                .unwrap()
                .len(),
            256
        );
        let bundle = JwtBundle::new(td("example.org"), vec![key.clone()]);
        let text = bundle.to_spiffe_bundle_json(&[], 1, 1);
        let back = JwtBundle::from_spiffe_bundle_json(td("example.org"), text.as_bytes()).unwrap();
        assert_eq!(back.get("r"), Some(&key));

        assert!(matches!(
            JwtPublicKey::from_spki_der("k".to_owned(), b"junk"),
            Err(JwtError::InvalidKey(_))
        ));
        let mut trailing = ec.to_spki_der();
        trailing.push(0);
        assert!(matches!(
            JwtPublicKey::from_spki_der("k".to_owned(), &trailing),
            Err(JwtError::InvalidKey(_))
        ));
        assert!(matches!(
            JwtPublicKey::from_spki_der(String::new(), &ec.to_spki_der()),
            Err(JwtError::InvalidKey(_))
        ));
    }

    #[test]
    fn rsa_and_larger_curves_validate() {
        use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let rsa_public = JwtPublicKey::from_spki_der(
            "rsa".to_owned(),
            rsa.public_key().as_der().unwrap().as_ref(),
        )
        .unwrap();
        let p384 = EcdsaKeyPair::generate(&sig::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        let p521 = EcdsaKeyPair::generate(&sig::ECDSA_P521_SHA512_FIXED_SIGNING).unwrap();
        let p384_public = JwtPublicKey::from_spki_der(
            "p384".to_owned(),
            p384.public_key().as_der().unwrap().as_ref(),
        )
        .unwrap();
        let p521_public = JwtPublicKey::from_spki_der(
            "p521".to_owned(),
            p521.public_key().as_der().unwrap().as_ref(),
        )
        .unwrap();
        assert_eq!(p384_public.key_type(), "EC P-384");
        assert_eq!(p521_public.key_type(), "EC P-521");
        let bundle = JwtBundle::new(
            td("example.org"),
            vec![rsa_public.clone(), p384_public, p521_public],
        );
        // The JWKS round trip keeps all three.
        let text = bundle.to_spiffe_bundle_json(&[], 1, 1);
        assert_eq!(
            JwtBundle::from_spiffe_bundle_json(td("example.org"), text.as_bytes()).unwrap(),
            bundle
        );

        let rng = SystemRandom::new();
        let claims = b64(good_claims().to_string().as_bytes());
        let sign_with = |alg: &str, kid: &str| -> String {
            let header = b64(json!({"alg": alg, "kid": kid}).to_string().as_bytes());
            let input = format!("{header}.{claims}");
            let signature = match alg {
                "ES384" => p384.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
                "ES512" => p521.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
                _ => {
                    let encoding: &'static dyn sig::RsaEncoding = match alg {
                        "RS256" => &sig::RSA_PKCS1_SHA256,
                        "RS384" => &sig::RSA_PKCS1_SHA384,
                        "RS512" => &sig::RSA_PKCS1_SHA512,
                        "PS256" => &sig::RSA_PSS_SHA256,
                        "PS384" => &sig::RSA_PSS_SHA384,
                        _ => &sig::RSA_PSS_SHA512,
                    };
                    let mut out = vec![0; rsa.public_modulus_len()];
                    rsa.sign(encoding, &rng, input.as_bytes(), &mut out)
                        .unwrap();
                    out
                }
            };
            format!("{input}.{}", b64(&signature))
        };
        for (alg, kid) in [
            ("ES384", "p384"),
            ("ES512", "p521"),
            ("RS256", "rsa"),
            ("RS384", "rsa"),
            ("RS512", "rsa"),
            ("PS256", "rsa"),
            ("PS384", "rsa"),
            ("PS512", "rsa"),
        ] {
            let token = sign_with(alg, kid);
            assert!(validate(&token, "a", &bundle, now()).is_ok(), "{alg}");
        }
        // A PKCS#1 v1.5 signature does not pass as PSS, nor an RSA key as EC.
        let rs256 = sign_with("RS256", "rsa");
        let (_, rest) = rs256.split_once('.').unwrap();
        let header = b64(json!({"alg": "PS256", "kid": "rsa"}).to_string().as_bytes());
        let relabeled = format!("{header}.{rest}");
        assert_eq!(
            validate(&relabeled, "a", &bundle, now()),
            Err(JwtError::InvalidSignature)
        );
        let header = b64(json!({"alg": "ES256", "kid": "rsa"}).to_string().as_bytes());
        assert_eq!(
            validate(&format!("{header}.{rest}"), "a", &bundle, now()),
            Err(JwtError::KeyAlgorithmMismatch)
        );
        // ES384 token under a P-521 kid.
        let es384 = sign_with("ES384", "p384");
        let (_, rest) = es384.split_once('.').unwrap();
        let header = b64(json!({"alg": "ES384", "kid": "p521"})
            .to_string()
            .as_bytes());
        assert_eq!(
            validate(&format!("{header}.{rest}"), "a", &bundle, now()),
            Err(JwtError::KeyAlgorithmMismatch)
        );
        // RSA keys under 2048 bits are not supported: ignored in a bundle.
        let weak = json!({"keys": [{
            "kty": "RSA", "use": "jwt-svid", "kid": "weak",
            "n": b64(&[0xc5; 128]), "e": "AQAB",
        }]});
        let parsed =
            JwtBundle::from_spiffe_bundle_json(td("example.org"), weak.to_string().as_bytes())
                .unwrap();
        assert!(parsed.is_empty());
        assert_eq!(
            JwtPublicKey::from_rsa("weak".to_owned(), &[0xc5; 128], &[1, 0, 1]),
            Err(JwtError::UnsupportedKey(
                "RSA modulus must be 2048 to 8192 bits"
            ))
        );
    }

    #[test]
    fn bundle_documents_that_cannot_be_used_are_errors() {
        let s = setup();
        let jwk = s.signer.public_key().to_jwk();
        let cases = [
            "[]".to_owned(),
            "{}".to_owned(),
            r#"{"keys":{}}"#.to_owned(),
            r#"{"keys":[1]}"#.to_owned(),
            r#"{"keys":[],"keys":[]}"#.to_owned(),
            r#"{"keys":[],"spiffe_sequence":-1}"#.to_owned(),
            r#"{"keys":[],"spiffe_refresh_hint":"60"}"#.to_owned(),
            json!({"keys": [jwk, jwk]}).to_string(),
            {
                let mut bad = jwk.as_object().unwrap().clone();
                bad.insert("x".into(), json!("AAAA"));
                json!({"keys": [bad]}).to_string()
            },
            {
                let mut bad = jwk.as_object().unwrap().clone();
                bad.insert("y".into(), json!(bad["x"].clone()));
                json!({"keys": [bad]}).to_string()
            },
            {
                let mut bad = jwk.as_object().unwrap().clone();
                let padded = format!("{}=", bad["x"].as_str().unwrap());
                bad.insert("x".into(), json!(padded));
                json!({"keys": [bad]}).to_string()
            },
            format!(r#"{{"keys":{}}}"#, "[".repeat(100)),
        ];
        for doc in cases {
            let result = JwtBundle::from_spiffe_bundle_json(td("example.org"), doc.as_bytes());
            assert!(
                matches!(
                    result,
                    Err(JwtError::InvalidBundle(_) | JwtError::InvalidKey(_))
                ),
                "{doc}: {result:?}"
            );
        }
        // An empty key list is a valid (revoking) bundle.
        let empty =
            JwtBundle::from_spiffe_bundle_json(td("example.org"), br#"{"keys":[]}"#).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn error_messages_do_not_contain_the_token() {
        let s = setup();
        let token = forge(&s.signer, &with_header("kid", json!("k2")), &good_claims());
        let mut errors = vec![validate(&token, "a", &s.bundle, now()).unwrap_err()];
        let token2 = forge(&s.signer, &good_header(), &with_claim("aud", json!("zzz")));
        errors.push(validate(&token2, "a", &s.bundle, now()).unwrap_err());
        for err in errors {
            let text = format!("{err} {err:?}");
            for part in token.split('.').chain(token2.split('.')) {
                assert!(!text.contains(part), "{text}");
            }
            assert!(!text.contains("k2") && !text.contains("zzz"), "{text}");
        }
    }

    #[test]
    fn types_are_shareable_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<JwtSigner>();
        send_sync::<JwtPublicKey>();
        send_sync::<JwtBundle>();
        send_sync::<SignedJwt>();
        send_sync::<ValidatedJwt>();
        send_sync::<JwtError>();
    }

    // ---- cost ------------------------------------------------------------------------

    #[test]
    fn micro_measurement_of_sign_and_validate() {
        let s = setup();
        let sub = id("spiffe://example.org/workload");
        let audiences = aud(&["spiffe://example.org/service"]);
        let ttl = Duration::from_secs(300);
        let rounds = 2_000u32;

        let start = Instant::now();
        let mut last = None;
        for _ in 0..rounds {
            last = Some(s.signer.sign(&sub, &audiences, ttl, now()).unwrap());
        }
        let sign = start.elapsed() / rounds;
        let token = last.unwrap().token;

        let start = Instant::now();
        for _ in 0..rounds {
            validate(&token, &audiences[0], &s.bundle, now()).unwrap();
        }
        let verify = start.elapsed() / rounds;

        // Floors, same run: the raw primitives.
        let start = Instant::now();
        for _ in 0..rounds {
            s.signer.key.sign(&s.signer.rng, token.as_bytes()).unwrap();
        }
        let raw_sign = start.elapsed() / rounds;
        let signature = signature_of(&token);
        let (input, _) = token.rsplit_once('.').unwrap();
        let key = match &s.signer.public.material {
            Material::Ec { key, .. } => key.clone(),
            Material::Rsa { .. } => unreachable!(),
        };
        let start = Instant::now();
        for _ in 0..rounds {
            key.verify_sig(input.as_bytes(), &signature).unwrap();
        }
        let raw_verify = start.elapsed() / rounds;

        eprintln!(
            "jwt: sign {:.1} us/call (raw P-256 sign {:.1} us), validate {:.1} us/call (raw P-256 verify {:.1} us), token {} bytes",
            sign.as_secs_f64() * 1e6,
            raw_sign.as_secs_f64() * 1e6,
            verify.as_secs_f64() * 1e6,
            raw_verify.as_secs_f64() * 1e6,
            token.len()
        );
    }
}
