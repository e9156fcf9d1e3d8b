//! Canonical SPIFFE IDs and trust domains: the typed values every boundary parses into.
//!
//! Parsing follows the SPIFFE-ID specification and SECURITY.md §3.6: input that is not
//! already canonical is **rejected, never normalised**. Once parsed, IDs are compared as
//! exact strings.
//!
//! # Relation to the `spiffe` crate
//!
//! The structural rules (trust-domain and path-segment character tables, empty, `.` and
//! `..` segments, trailing slash, trust-domain length) are delegated to
//! [`spiffe::SpiffeId`] / [`spiffe::TrustDomain`], which follow go-spiffe. That crate,
//! however, *normalises* where we must reject, and is laxer in two places, so this
//! module adds the checks it lacks before delegating:
//!
//! - the scheme must be exactly lowercase `spiffe://` (upstream accepts any case);
//! - the trust domain must already be lowercase (upstream lowercases it);
//! - the whole ID must be at most 2048 bytes (upstream enforces this only when building
//!   from segments, not when parsing);
//! - port, userinfo, IP literal, query, fragment and percent-encoding get their own
//!   error messages (upstream reports them all as a bad character).
//!
//! After delegating, every constructor also checks that the upstream value prints back
//! as exactly the input, so a future upstream normalisation cannot slip through.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The only accepted scheme prefix, exactly as written.
const SCHEME_PREFIX: &str = "spiffe://";

/// Longest accepted SPIFFE ID, in bytes (SPIFFE-ID spec §2.3 interop limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Longest accepted trust domain name, in bytes (SPIFFE-ID spec §2.1 interop limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a canonical SPIFFE ID, trust domain or path segment.
///
/// Messages never quote the rejected input, so they are safe to log and return to peers.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum IdError {
    /// The input is the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The whole ID exceeds [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is longer than 2048 bytes")]
    TooLong,
    /// The scheme is missing, not `spiffe`, not lowercase, or lacks `//`.
    #[error("scheme must be exactly `spiffe://`")]
    Scheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain exceeds [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,
    /// The trust domain contains an uppercase ASCII letter.
    #[error("trust domain must be lowercase (it is rejected, not lowercased)")]
    TrustDomainNotLowercase,
    /// The trust domain contains a byte outside `[a-z0-9.-_]`.
    #[error("trust domain contains a character outside [a-z0-9.-_]")]
    TrustDomainChar,
    /// A bare trust domain name was expected but a URI or path was given.
    #[error("trust domain must be a bare name such as `example.org`, not a URI or path")]
    TrustDomainNotBare,
    /// The authority has a `:port`.
    #[error("a port is not allowed in a SPIFFE ID")]
    Port,
    /// The authority has `userinfo@`.
    #[error("userinfo (`user@`) is not allowed in a SPIFFE ID")]
    Userinfo,
    /// The authority is an IP literal in brackets.
    #[error("an IP literal (`[...]`) is not allowed as a trust domain")]
    IpLiteral,
    /// The ID has a `?query`.
    #[error("a query (`?`) is not allowed in a SPIFFE ID")]
    Query,
    /// The ID has a `#fragment`.
    #[error("a fragment (`#`) is not allowed in a SPIFFE ID")]
    Fragment,
    /// A `%` appears anywhere.
    #[error("percent-encoding is not allowed")]
    PercentEncoding,
    /// The path has an empty segment (`//a`, `/a//b`) or an empty segment was given.
    #[error("path contains an empty segment")]
    EmptySegment,
    /// The path ends with `/`.
    #[error("path must not end with `/`")]
    TrailingSlash,
    /// A path segment is `.` or `..`.
    #[error("path segment `.` or `..` is not allowed")]
    DotSegment,
    /// A path segment contains a byte outside `[A-Za-z0-9._-]` (this includes `/` inside
    /// a single segment).
    #[error("path segment contains a character outside [A-Za-z0-9._-]")]
    PathChar,
    /// The ID names only a trust domain but a workload or agent ID was required.
    #[error("a trust-domain-only SPIFFE ID (no path) cannot identify a workload or agent")]
    TrustDomainOnly,
    /// The input was accepted by the underlying parser only after normalisation.
    #[error("SPIFFE ID is not in canonical form")]
    NotCanonical,
    /// The underlying parser rejected the input for a reason this version does not know.
    #[error("invalid SPIFFE ID: {0}")]
    Invalid(String),
}

impl From<spiffe::SpiffeIdError> for IdError {
    fn from(e: spiffe::SpiffeIdError) -> Self {
        use spiffe::SpiffeIdError as U;
        match e {
            U::Empty => Self::Empty,
            U::MissingTrustDomain => Self::EmptyTrustDomain,
            U::WrongScheme => Self::Scheme,
            U::BadTrustDomainChar => Self::TrustDomainChar,
            U::BadPathSegmentChar => Self::PathChar,
            U::EmptySegment => Self::EmptySegment,
            U::DotSegment => Self::DotSegment,
            U::TrailingSlash => Self::TrailingSlash,
            U::SpiffeIdTooLong { .. } => Self::TooLong,
            U::TrustDomainTooLong { .. } => Self::TrustDomainTooLong,
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// True when `s` is a valid SPIFFE ID path segment: non-empty, only `[A-Za-z0-9._-]`,
/// and neither `.` nor `..`.
pub fn is_valid_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks on a trust domain name that `spiffe` lacks or reports only as "bad character".
/// The upstream parser then enforces the character table.
fn precheck_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    let bytes = name.as_bytes();
    if bytes.contains(&b'%') {
        return Err(IdError::PercentEncoding);
    }
    if bytes.contains(&b'@') {
        return Err(IdError::Userinfo);
    }
    if bytes.contains(&b'[') || bytes.contains(&b']') {
        return Err(IdError::IpLiteral);
    }
    if bytes.contains(&b':') {
        return Err(IdError::Port);
    }
    if bytes.iter().any(u8::is_ascii_uppercase) {
        return Err(IdError::TrustDomainNotLowercase);
    }
    Ok(())
}

/// A trust domain name such as `example.org`: lowercase `[a-z0-9.-_]`, 1 to 255 bytes.
///
/// Serialised as the bare name; deserialising validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain {
    name: String,
}

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`, not `spiffe://example.org`).
    pub fn new(name: &str) -> Result<Self, IdError> {
        if name.contains('/') {
            return Err(IdError::TrustDomainNotBare);
        }
        precheck_trust_domain(name)?;
        let upstream = spiffe::TrustDomain::new(name)?;
        if upstream.as_str() != name {
            return Err(IdError::NotCanonical);
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The bare name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The trust domain's own SPIFFE ID, e.g. `spiffe://example.org`.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl TryFrom<&str> for TrustDomain {
    type Error = IdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> Self {
        td.name
    }
}

/// A canonical SPIFFE ID: `spiffe://<trust domain>` followed by an empty path or by
/// `/segment` repeated, each segment `[A-Za-z0-9._-]` and neither `.` nor `..`; at most
/// 2048 bytes.
///
/// Equality, ordering and hashing are those of the exact string. Serialised as the
/// full ID; deserialising validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    /// The full canonical ID.
    id: String,
    /// Length of the trust domain name; it starts right after [`SCHEME_PREFIX`].
    td_len: usize,
}

impl SpiffeId {
    /// Parses a canonical SPIFFE ID. The path may be empty (`spiffe://example.org`);
    /// use [`SpiffeId::parse_leaf`] where a workload or agent ID is required.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdError::Scheme)?;
        if s.contains('%') {
            return Err(IdError::PercentEncoding);
        }
        match s.chars().find(|c| matches!(c, '?' | '#')) {
            Some('?') => return Err(IdError::Query),
            Some(_) => return Err(IdError::Fragment),
            None => {}
        }
        let td = rest.split_once('/').map_or(rest, |(td, _)| td);
        precheck_trust_domain(td)?;

        let upstream = spiffe::SpiffeId::new(s)?;
        if upstream.to_string() != s {
            return Err(IdError::NotCanonical);
        }
        Ok(Self {
            id: s.to_owned(),
            td_len: td.len(),
        })
    }

    /// Parses a canonical SPIFFE ID that must have a non-empty path, as required of
    /// X509-SVID and JWT-SVID subjects, registration entries and agent IDs.
    pub fn parse_leaf(s: &str) -> Result<Self, IdError> {
        let id = Self::parse(s)?;
        if id.is_trust_domain_id() {
            return Err(IdError::TrustDomainOnly);
        }
        Ok(id)
    }

    /// Builds `spiffe://<td>/<segments[0]>/<segments[1]>...`, validating each segment
    /// as a path segment (so a segment containing `/`, `..` or `%2F` is rejected, never
    /// split or decoded). No segments gives the trust domain ID.
    pub fn from_segments(td: &TrustDomain, segments: &[&str]) -> Result<Self, IdError> {
        if segments.iter().any(|s| s.contains('%')) {
            return Err(IdError::PercentEncoding);
        }
        let upstream_td = spiffe::TrustDomain::new(td.name())?;
        let upstream = spiffe::SpiffeId::from_segments(upstream_td, segments)?;
        let id = upstream.to_string();
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        let expected_len = SCHEME_PREFIX.len()
            + td.name().len()
            + segments.iter().map(|s| s.len() + 1).sum::<usize>();
        if upstream.trust_domain_name() != td.name() || id.len() != expected_len {
            return Err(IdError::NotCanonical);
        }
        Ok(Self {
            id,
            td_len: td.name().len(),
        })
    }

    /// The trust domain the ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        self.id
            .get(SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.td_len)
            .unwrap_or_default()
    }

    /// The path: `""` for a trust domain ID, otherwise `/a/b`.
    pub fn path(&self) -> &str {
        self.id
            .get(SCHEME_PREFIX.len() + self.td_len..)
            .unwrap_or_default()
    }

    /// The full ID, e.g. `spiffe://example.org/a/b`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// True when the ID belongs to `td` (exact name comparison).
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.name()
    }

    /// True when the path is empty: the ID names the trust domain itself and must not be
    /// used as a leaf SVID ID.
    pub fn is_trust_domain_id(&self) -> bool {
        self.td_len + SCHEME_PREFIX.len() == self.id.len()
    }

    /// Segment-wise path prefix test: `/tessera` matches `/tessera` and `/tessera/x` but
    /// not `/tesserax`. The empty prefix matches every ID; a prefix with a trailing `/`
    /// matches none (it is not a canonical path).
    pub fn has_path_prefix(&self, prefix: &str) -> bool {
        self.path()
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.id
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.id
    }
}

#[cfg(test)]
mod tests {
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn err(s: &str) -> IdError {
        SpiffeId::parse(s).unwrap_err()
    }

    fn is_td_byte(b: u8) -> bool {
        matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
    }

    fn is_path_byte(b: u8) -> bool {
        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
    }

    #[test]
    fn accepts_canonical_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(id.to_string(), id.as_str());
        assert_eq!(id.as_ref(), id.as_str());
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.trust_domain(), td("example.org"));
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(id.is_member_of(&td("example.org")));
        assert!(!id.is_member_of(&td("example.com")));
        assert!(!id.is_member_of(&td("example.org.evil")));
        assert!(!id.is_trust_domain_id());
        assert_eq!(
            "spiffe://example.org/x".parse::<SpiffeId>().unwrap().path(),
            "/x"
        );

        let tdid = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(tdid.is_trust_domain_id());
        assert_eq!(tdid.path(), "");
        assert_eq!(tdid.trust_domain_name(), "example.org");

        for ok in [
            "spiffe://a",
            "spiffe://a-b_c.d0/...x/x../.x./-/_/A.b-C_9",
            "spiffe://example.org/...",
        ] {
            SpiffeId::parse(ok).unwrap();
        }
    }

    #[test]
    fn trust_domain_basics() {
        let t = td("example.org");
        assert_eq!(t.name(), "example.org");
        assert_eq!(t.to_string(), "example.org");
        assert_eq!(t.id_string(), "spiffe://example.org");
        assert_eq!("example.org".parse::<TrustDomain>().unwrap(), t);
        assert_eq!(SpiffeId::parse(&t.id_string()).unwrap().trust_domain(), t);
        assert_eq!(TrustDomain::new(""), Err(IdError::EmptyTrustDomain));
        assert_eq!(
            TrustDomain::new("spiffe://example.org"),
            Err(IdError::TrustDomainNotBare)
        );
        assert_eq!(
            TrustDomain::new("example.org/x"),
            Err(IdError::TrustDomainNotBare)
        );
        assert_eq!(
            TrustDomain::new("Example.org"),
            Err(IdError::TrustDomainNotLowercase)
        );
    }

    /// SECURITY.md #52: uppercase trust domain is rejected, not lowercased.
    #[test]
    fn s52_uppercase_trust_domain_rejected() {
        assert_eq!(
            err("spiffe://Example.org/foo"),
            IdError::TrustDomainNotLowercase
        );
        assert_eq!(
            err("spiffe://EXAMPLE.ORG"),
            IdError::TrustDomainNotLowercase
        );
        assert_eq!(
            err("spiffe://example.orG/foo"),
            IdError::TrustDomainNotLowercase
        );
    }

    /// SECURITY.md #53: the path is case-sensitive.
    #[test]
    fn s53_path_is_case_sensitive() {
        let upper = SpiffeId::parse("spiffe://example.org/Foo").unwrap();
        let lower = SpiffeId::parse("spiffe://example.org/foo").unwrap();
        assert_eq!(upper.path(), "/Foo");
        assert_ne!(upper, lower);
        assert_ne!(upper.as_str(), lower.as_str());
    }

    /// SECURITY.md #54: the scheme must be exactly `spiffe://`.
    #[test]
    fn s54_scheme() {
        for bad in [
            "SPIFFE://example.org/x",
            "Spiffe://example.org/x",
            "spiffE://example.org/x",
            "http://example.org/x",
            "https://example.org/x",
            "spiffe:example.org/x",
            "spiffe:/example.org/x",
            "spiffe//example.org/x",
            "example.org/x",
            " spiffe://example.org/x",
            "spiffe ://example.org/x",
            "/x",
        ] {
            assert_eq!(err(bad), IdError::Scheme, "{bad}");
        }
        assert_eq!(err(""), IdError::Empty);
        assert_eq!(err("spiffe://"), IdError::EmptyTrustDomain);
        assert_eq!(err("spiffe:///x"), IdError::EmptyTrustDomain);
    }

    /// SECURITY.md #55: port, userinfo, query, fragment and IP literals are rejected.
    #[test]
    fn s55_uri_parts() {
        let cases = [
            ("spiffe://example.org:8080/x", IdError::Port),
            ("spiffe://example.org:/x", IdError::Port),
            ("spiffe://user@example.org/x", IdError::Userinfo),
            ("spiffe://user:pw@example.org/x", IdError::Userinfo),
            ("spiffe://example.org/x?q", IdError::Query),
            ("spiffe://example.org?q", IdError::Query),
            ("spiffe://example.org/x?", IdError::Query),
            ("spiffe://example.org/x#f", IdError::Fragment),
            ("spiffe://example.org#f", IdError::Fragment),
            ("spiffe://example.org/x#f?q", IdError::Fragment),
            ("spiffe://[::1]/x", IdError::IpLiteral),
            ("spiffe://[::1]:8080/x", IdError::IpLiteral),
            ("spiffe://[fe80::1]", IdError::IpLiteral),
        ];
        for (bad, want) in cases {
            assert_eq!(err(bad), want, "{bad}");
        }
        // The same characters inside a path are plain bad characters.
        assert_eq!(err("spiffe://example.org/a:b"), IdError::PathChar);
        assert_eq!(err("spiffe://example.org/a@b"), IdError::PathChar);
        assert_eq!(err("spiffe://example.org/[x]"), IdError::PathChar);
    }

    /// SECURITY.md #56: dot segments, empty segments and trailing slashes are rejected,
    /// never normalised.
    #[test]
    fn s56_path_not_normalised() {
        let cases = [
            ("spiffe://example.org/a/../b", IdError::DotSegment),
            ("spiffe://example.org/./a", IdError::DotSegment),
            ("spiffe://example.org/a/.", IdError::DotSegment),
            ("spiffe://example.org/..", IdError::DotSegment),
            ("spiffe://example.org/a/", IdError::TrailingSlash),
            ("spiffe://example.org/", IdError::TrailingSlash),
            ("spiffe://example.org//a", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org//", IdError::EmptySegment),
        ];
        for (bad, want) in cases {
            assert_eq!(err(bad), want, "{bad}");
        }
    }

    /// SECURITY.md #57: percent-encoding is rejected anywhere, not decoded.
    #[test]
    fn s57_percent_encoding() {
        for bad in [
            "spiffe://example.org/%2e%2e",
            "spiffe://example.org/a%2Fb",
            "spiffe://example.org/%62%61%64",
            "spiffe://ex%61mple.org/x",
            "spiffe://example.org%2F/x",
            "spiffe://example.org/%",
            "spiffe://example.org/x%",
        ] {
            assert_eq!(err(bad), IdError::PercentEncoding, "{bad}");
        }
        assert_eq!(err("spiffe%3A//example.org/x"), IdError::Scheme);
        assert_eq!(
            TrustDomain::new("ex%61mple.org"),
            Err(IdError::PercentEncoding)
        );
        assert_eq!(
            SpiffeId::from_segments(&td("example.org"), &["%2e%2e"]),
            Err(IdError::PercentEncoding)
        );
        assert!(!is_valid_path_segment("%2F"));
    }

    /// SECURITY.md #58: every character 0..=255 in the trust domain (go-spiffe
    /// `TestTrustDomainFromString` style). Values >= 128 are the code points U+0080..U+00FF,
    /// i.e. two-byte UTF-8, which must all be rejected.
    #[test]
    fn s58_every_byte_in_trust_domain() {
        for b in 0..=255u8 {
            let c = char::from(b);
            let name = format!("td{c}x");
            let id = format!("spiffe://td{c}x/path");
            let want_ok = b.is_ascii() && is_td_byte(b);
            assert_eq!(
                TrustDomain::new(&name).is_ok(),
                want_ok,
                "byte {b:#04x} in name"
            );
            // `/` ends the trust domain in an ID, so `td/x/path` is a valid ID with a
            // two-segment path; every other byte follows the table.
            let id_ok = want_ok || c == '/';
            assert_eq!(
                SpiffeId::parse(&id).is_ok(),
                id_ok,
                "byte {b:#04x} in ID {id:?}"
            );
            if !id_ok {
                assert_ne!(SpiffeId::parse(&id).unwrap_err(), IdError::NotCanonical);
            }
            // Alone as the whole trust domain.
            let alone = format!("spiffe://{c}");
            let alone_ok = want_ok && c != '/';
            assert_eq!(
                SpiffeId::parse(&alone).is_ok(),
                alone_ok,
                "byte {b:#04x} alone"
            );
        }
    }

    /// SECURITY.md #58: every character 0..=255 in a path segment, through the parser,
    /// `from_segments` and `is_valid_path_segment`.
    #[test]
    fn s58_every_byte_in_path_segment() {
        let t = td("example.org");
        for b in 0..=255u8 {
            let c = char::from(b);
            let seg = format!("a{c}b");
            let want_ok = b.is_ascii() && is_path_byte(b);
            assert_eq!(is_valid_path_segment(&seg), want_ok, "byte {b:#04x}");
            assert_eq!(
                SpiffeId::from_segments(&t, &[&seg]).is_ok(),
                want_ok,
                "byte {b:#04x} in segment"
            );
            let id = format!("spiffe://example.org/{seg}");
            // `/` splits `a/b` into two valid segments.
            let id_ok = want_ok || c == '/';
            assert_eq!(
                SpiffeId::parse(&id).is_ok(),
                id_ok,
                "byte {b:#04x} in {id:?}"
            );
            // A single-character segment: only `.` differs from the table.
            let single = c.to_string();
            let single_ok = want_ok && c != '.';
            assert_eq!(is_valid_path_segment(&single), single_ok, "single {b:#04x}");
        }
        for bad in [
            "spiffe://example.org/a\0b",
            "spiffe://example.org/a b",
            "spiffe://example.org/caf\u{e9}",
            "spiffe://example.org/\u{2215}",
            "spiffe://example.org/a\u{ff0f}b",
            "spiffe://example.org/x\n",
        ] {
            assert_eq!(err(bad), IdError::PathChar, "{bad:?}");
        }
        assert_eq!(err("spiffe://ex\u{e4}mple.org/x"), IdError::TrustDomainChar);
        assert_eq!(err("spiffe://exa mple.org/x"), IdError::TrustDomainChar);
        assert_eq!(err("spiffe://example.org\0/x"), IdError::TrustDomainChar);
    }

    /// SECURITY.md #59: the 2048-byte ID and 255-byte trust domain limits.
    #[test]
    fn s59_length_limits() {
        let name255 = "a".repeat(255);
        TrustDomain::new(&name255).unwrap();
        assert_eq!(
            TrustDomain::new(&"a".repeat(256)),
            Err(IdError::TrustDomainTooLong)
        );
        SpiffeId::parse(&format!("spiffe://{name255}/x")).unwrap();
        assert_eq!(
            err(&format!("spiffe://{}/x", "a".repeat(256))),
            IdError::TrustDomainTooLong
        );

        let base = "spiffe://example.org/";
        let max = format!("{base}{}", "p".repeat(MAX_SPIFFE_ID_LEN - base.len()));
        assert_eq!(max.len(), 2048);
        SpiffeId::parse(&max).unwrap();
        let over = format!("{max}p");
        assert_eq!(err(&over), IdError::TooLong);
        // Far too long input is rejected by length before anything else.
        assert_eq!(err(&"x".repeat(1 << 20)), IdError::TooLong);

        let t = td("example.org");
        let seg_max = "p".repeat(MAX_SPIFFE_ID_LEN - base.len());
        assert_eq!(
            SpiffeId::from_segments(&t, &[&seg_max]).unwrap().as_str(),
            max
        );
        let seg_over = format!("{seg_max}p");
        assert_eq!(
            SpiffeId::from_segments(&t, &[&seg_over]),
            Err(IdError::TooLong)
        );
        let many = vec!["abc"; 600];
        assert_eq!(SpiffeId::from_segments(&t, &many), Err(IdError::TooLong));
    }

    /// SECURITY.md #60: a trust-domain-only ID is detectable and refused as a leaf.
    #[test]
    fn s60_trust_domain_id_is_not_a_leaf() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(id.is_trust_domain_id());
        assert_eq!(
            SpiffeId::parse_leaf("spiffe://example.org"),
            Err(IdError::TrustDomainOnly)
        );
        let leaf = SpiffeId::parse_leaf("spiffe://example.org/w").unwrap();
        assert!(!leaf.is_trust_domain_id());
        assert_eq!(
            SpiffeId::parse_leaf("spiffe://example.org/"),
            Err(IdError::TrailingSlash)
        );
        let from_none = SpiffeId::from_segments(&td("example.org"), &[]).unwrap();
        assert!(from_none.is_trust_domain_id());
        assert_eq!(from_none, id);
    }

    #[test]
    fn has_path_prefix_is_segment_wise() {
        let id = SpiffeId::parse("spiffe://example.org/tessera/agent/x").unwrap();
        assert!(id.has_path_prefix(""));
        assert!(id.has_path_prefix("/tessera"));
        assert!(id.has_path_prefix("/tessera/agent"));
        assert!(id.has_path_prefix("/tessera/agent/x"));
        assert!(!id.has_path_prefix("/tessera/agent/x/y"));
        assert!(!id.has_path_prefix("/tessera/ag"));
        assert!(!id.has_path_prefix("/tessera/"));
        assert!(!id.has_path_prefix("/Tessera"));
        assert!(!id.has_path_prefix("tessera"));
        assert!(!id.has_path_prefix("/"));

        let exact = SpiffeId::parse("spiffe://example.org/tessera").unwrap();
        assert!(exact.has_path_prefix("/tessera"));
        let longer = SpiffeId::parse("spiffe://example.org/tesserax").unwrap();
        assert!(!longer.has_path_prefix("/tessera"));
        let tdid = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(tdid.has_path_prefix(""));
        assert!(!tdid.has_path_prefix("/tessera"));
    }

    #[test]
    fn from_segments_validates_each_segment() {
        let t = td("example.org");
        let id = SpiffeId::from_segments(&t, &["tessera", "agent", "join_token", "ab-12"]).unwrap();
        assert_eq!(
            id.as_str(),
            "spiffe://example.org/tessera/agent/join_token/ab-12"
        );
        assert_eq!(id.path(), "/tessera/agent/join_token/ab-12");
        assert_eq!(id.trust_domain(), t);
        assert_eq!(id, SpiffeId::parse(id.as_str()).unwrap());

        // SECURITY.md #61: attacker-controlled template values are never split or decoded.
        let cases: [(&[&str], IdError); 9] = [
            (&["a/b"], IdError::PathChar),
            (&["/a"], IdError::PathChar),
            (&["a", ".."], IdError::DotSegment),
            (&["."], IdError::DotSegment),
            (&["a", ""], IdError::EmptySegment),
            (&["a%2Fb"], IdError::PercentEncoding),
            (&["a b"], IdError::PathChar),
            (&["caf\u{e9}"], IdError::PathChar),
            (&["x?y"], IdError::PathChar),
        ];
        for (segs, want) in cases {
            assert_eq!(SpiffeId::from_segments(&t, segs), Err(want), "{segs:?}");
        }
    }

    #[test]
    fn ordering_and_hash_follow_the_string() {
        use std::collections::BTreeSet;
        let ids: BTreeSet<SpiffeId> =
            ["spiffe://b/x", "spiffe://a/z", "spiffe://a/y", "spiffe://a"]
                .into_iter()
                .map(|s| SpiffeId::parse(s).unwrap())
                .collect();
        let strs: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
        assert_eq!(
            strs,
            ["spiffe://a", "spiffe://a/y", "spiffe://a/z", "spiffe://b/x"]
        );
    }

    #[test]
    fn serde_validates() {
        let de = |s: &'static str| -> Result<SpiffeId, DeError> {
            let d: StrDeserializer<'_, DeError> = s.into_deserializer();
            SpiffeId::deserialize(d)
        };
        assert_eq!(de("spiffe://example.org/a").unwrap().path(), "/a");
        assert!(de("spiffe://Example.org/a").is_err());
        assert!(de("spiffe://example.org/a/../b").is_err());
        let de_td = |s: &'static str| -> Result<TrustDomain, DeError> {
            let d: StrDeserializer<'_, DeError> = s.into_deserializer();
            TrustDomain::deserialize(d)
        };
        assert_eq!(de_td("example.org").unwrap().name(), "example.org");
        assert!(de_td("EXAMPLE.org").is_err());
        assert!(de_td("spiffe://example.org").is_err());
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        assert_eq!(String::from(id), "spiffe://example.org/a");
        assert_eq!(String::from(td("example.org")), "example.org");
    }

    /// Every ID we accept is accepted unchanged by the `spiffe` crate, so values convert
    /// losslessly to its types.
    #[test]
    fn accepted_ids_agree_with_upstream() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/Foo",
            "spiffe://a.b-c_d/x/y.z",
        ] {
            let ours = SpiffeId::parse(s).unwrap();
            let theirs = spiffe::SpiffeId::new(s).unwrap();
            assert_eq!(theirs.to_string(), ours.as_str());
            assert_eq!(theirs.path(), ours.path());
            assert_eq!(theirs.trust_domain_name(), ours.trust_domain_name());
        }
    }

    #[test]
    fn messages_are_one_line() {
        for e in [
            IdError::Scheme,
            IdError::TrustDomainChar,
            IdError::DotSegment,
            IdError::PercentEncoding,
            IdError::TooLong,
        ] {
            let m = e.to_string();
            assert!(!m.is_empty() && !m.contains('\n'), "{m}");
        }
        assert_eq!(
            IdError::Scheme.to_string(),
            "scheme must be exactly `spiffe://`"
        );
        assert_eq!(
            IdError::TrustDomainChar.to_string(),
            "trust domain contains a character outside [a-z0-9.-_]"
        );
    }
}
