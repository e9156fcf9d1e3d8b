//! Selectors: the `TYPE:VALUE` facts an attestor reports about a workload or node, and
//! that registration entries require.
//!
//! This module owns only the syntax shared by every selector. Which types and values a
//! given plugin produces (its schema) is checked by that plugin, not here.
//!
//! Selector values may be sensitive (SECURITY.md §2 rule 10), so errors never quote the
//! rejected input.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted selector type, in bytes.
pub const MAX_KIND_LEN: usize = 64;

/// Longest accepted selector value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a string is not a valid `TYPE:VALUE` selector.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SelectorError {
    /// No `:` separates the type from the value.
    #[error("selector has no `:`; the valid form is TYPE:VALUE")]
    MissingSeparator,
    /// The type is empty.
    #[error("selector TYPE is empty; the valid form is TYPE:VALUE")]
    EmptyKind,
    /// The type is longer than [`MAX_KIND_LEN`].
    #[error("selector TYPE is longer than 64 bytes; the valid form is TYPE:VALUE")]
    KindTooLong,
    /// The type does not match `[a-z][a-z0-9_]*`.
    #[error("selector TYPE must match [a-z][a-z0-9_]*; the valid form is TYPE:VALUE")]
    KindChar,
    /// The value is empty.
    #[error("selector VALUE is empty; the valid form is TYPE:VALUE")]
    EmptyValue,
    /// The value is longer than [`MAX_VALUE_LEN`].
    #[error("selector VALUE is longer than 1024 bytes; the valid form is TYPE:VALUE")]
    ValueTooLong,
    /// The value contains an ASCII control character (including NUL, newline, DEL).
    #[error("selector VALUE contains an ASCII control character; the valid form is TYPE:VALUE")]
    ValueControlChar,
}

/// A validated selector: a type (`unix`, `k8s`, ...) and a value (`uid:1000`, ...).
///
/// Serialised as the string `TYPE:VALUE`; deserialising validates. Ordering is by type,
/// then value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Builds a selector from its type and value, validating both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        validate_kind(kind)?;
        validate_value(value)?;
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Parses `TYPE:VALUE`, splitting at the first `:` (so `unix:uid:1000` has type
    /// `unix` and value `uid:1000`).
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let (kind, value) = s.split_once(':').ok_or(SelectorError::MissingSeparator)?;
        Self::new(kind, value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

fn validate_kind(kind: &str) -> Result<(), SelectorError> {
    let mut bytes = kind.bytes();
    let first = bytes.next().ok_or(SelectorError::EmptyKind)?;
    if kind.len() > MAX_KIND_LEN {
        return Err(SelectorError::KindTooLong);
    }
    if !first.is_ascii_lowercase()
        || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(SelectorError::KindChar);
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Err(SelectorError::EmptyValue);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(SelectorError::ValueTooLong);
    }
    if value.bytes().any(|b| b.is_ascii_control()) {
        return Err(SelectorError::ValueControlChar);
    }
    Ok(())
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Selector {
    type Error = SelectorError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl TryFrom<&str> for Selector {
    type Error = SelectorError;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<Selector> for String {
    fn from(s: Selector) -> Self {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error as DeError, StrDeserializer};

    use super::*;

    #[test]
    fn parse_splits_at_first_colon() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!(s.kind(), "unix");
        assert_eq!(s.value(), "uid:1000");
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert_eq!(s, "unix:uid:1000".parse::<Selector>().unwrap());
        assert_eq!(s, Selector::new("unix", "uid:1000").unwrap());

        let t = Selector::parse("k8s_2:ns:").unwrap();
        assert_eq!((t.kind(), t.value()), ("k8s_2", "ns:"));
        let u = Selector::parse("unix:path:/usr/bin/caf\u{e9} x").unwrap();
        assert_eq!(u.value(), "path:/usr/bin/caf\u{e9} x");
    }

    #[test]
    fn rejects_bad_kind() {
        assert_eq!(
            Selector::parse("unix"),
            Err(SelectorError::MissingSeparator)
        );
        assert_eq!(Selector::parse(""), Err(SelectorError::MissingSeparator));
        assert_eq!(Selector::parse(":x"), Err(SelectorError::EmptyKind));
        for bad in [
            "Unix",
            "1unix",
            "_unix",
            "un-ix",
            "un ix",
            "unix\0",
            "\u{fc}nix",
            "k8s.io",
        ] {
            assert_eq!(
                Selector::new(bad, "v"),
                Err(SelectorError::KindChar),
                "{bad:?}"
            );
        }
        let max = format!("a{}", "b".repeat(MAX_KIND_LEN - 1));
        Selector::new(&max, "v").unwrap();
        assert_eq!(
            Selector::new(&format!("{max}c"), "v"),
            Err(SelectorError::KindTooLong)
        );
    }

    #[test]
    fn rejects_bad_value() {
        assert_eq!(Selector::parse("unix:"), Err(SelectorError::EmptyValue));
        assert_eq!(Selector::new("unix", ""), Err(SelectorError::EmptyValue));
        for b in (0u8..=0x1f).chain([0x7f]) {
            let v = format!("uid:{}", char::from(b));
            assert_eq!(
                Selector::new("unix", &v),
                Err(SelectorError::ValueControlChar),
                "byte {b:#04x}"
            );
        }
        // Every other ASCII byte is fine in a value.
        for b in 0x20u8..0x7f {
            Selector::new("unix", &char::from(b).to_string()).unwrap();
        }
        let max = "v".repeat(MAX_VALUE_LEN);
        Selector::new("unix", &max).unwrap();
        assert_eq!(
            Selector::new("unix", &format!("{max}v")),
            Err(SelectorError::ValueTooLong)
        );
    }

    #[test]
    fn errors_name_the_form_and_not_the_input() {
        for e in [
            Selector::parse("nocolon").unwrap_err(),
            Selector::parse("BAD:secret-value").unwrap_err(),
            Selector::parse("unix:secret\nvalue").unwrap_err(),
        ] {
            let m = e.to_string();
            assert!(m.contains("TYPE:VALUE"), "{m}");
            assert!(!m.contains("secret") && !m.contains("nocolon"), "{m}");
        }
    }

    #[test]
    fn ordering_is_by_kind_then_value() {
        let mut v: Vec<Selector> = ["unix:uid:2", "docker:id:x", "unix:gid:1", "unix:uid:1"]
            .into_iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        v.sort();
        let strs: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            strs,
            ["docker:id:x", "unix:gid:1", "unix:uid:1", "unix:uid:2"]
        );
    }

    #[test]
    fn serde_validates() {
        let de = |s: &'static str| -> Result<Selector, DeError> {
            let d: StrDeserializer<'_, DeError> = s.into_deserializer();
            Selector::deserialize(d)
        };
        assert_eq!(de("unix:uid:0").unwrap().value(), "uid:0");
        assert!(de("Unix:uid:0").is_err());
        assert!(de("unix").is_err());
        assert_eq!(
            String::from(Selector::parse("unix:uid:0").unwrap()),
            "unix:uid:0"
        );
    }
}
