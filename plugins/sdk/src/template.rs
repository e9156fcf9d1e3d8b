//! SPIFFE ID templates: the SPIFFE ID of a registration entry may contain placeholders
//! that the agent fills in per caller, so that every process instance (or every uid,
//! or every systemd unit) matching one entry gets its own identity:
//! `spiffe://example.org/ai/research-bot/{instance}`.
//!
//! Placeholder values come from the attested caller, never from the workload's own
//! words, and each value must be a valid SPIFFE ID path segment: a value containing
//! `/`, `..`, `%` or any byte outside `[A-Za-z0-9._-]` makes rendering fail instead of
//! producing another ID (SECURITY.md §3.6 item 61, CVE-2021-27099). The server renders
//! the ID itself from the values the agent sends and checks them the same way.

use std::collections::BTreeMap;
use std::fmt;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use crate::id::{IdError, SpiffeId, is_valid_path_segment};

/// A placeholder an entry's SPIFFE ID may contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Placeholder {
    /// `{instance}`: one value per process instance, derived from (boot id, pid, process
    /// start time, pidfs inode); see [`instance_value`].
    Instance,
    /// `{uid}`: the caller's uid in decimal, as the kernel reported it at connect.
    Uid,
    /// `{systemd_unit}`: the caller's systemd unit (the value of its
    /// `systemd:unit:` selector), for example `research-bot.service`.
    SystemdUnit,
}

impl Placeholder {
    /// Every placeholder, in the order the docs list them.
    pub const ALL: [Self; 3] = [Self::Instance, Self::Uid, Self::SystemdUnit];

    /// The name between the braces.
    pub fn name(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::Uid => "uid",
            Self::SystemdUnit => "systemd_unit",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Longest value a placeholder may take, in bytes.
    fn max_len(self) -> usize {
        match self {
            Self::Instance => INSTANCE_VALUE_LEN,
            Self::Uid => 10,
            Self::SystemdUnit => 255,
        }
    }

    /// Checks a value for this placeholder: a path segment, and of this placeholder's
    /// own shape.
    pub fn check_value(self, value: &str) -> Result<(), TemplateError> {
        let bad = || TemplateError::BadValue(self.name());
        if value.len() > self.max_len() || !is_valid_path_segment(value) {
            return Err(bad());
        }
        match self {
            Self::Instance => {
                let hex = value.strip_prefix(INSTANCE_PREFIX).ok_or_else(bad)?;
                if hex.len() != INSTANCE_HEX_LEN
                    || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                {
                    return Err(bad());
                }
            }
            Self::Uid => {
                let uid: u32 = value.parse().map_err(|_| bad())?;
                if uid.to_string() != value {
                    return Err(bad());
                }
            }
            Self::SystemdUnit => {}
        }
        Ok(())
    }
}

impl fmt::Display for Placeholder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", self.name())
    }
}

/// Why a template or a value for it was refused. Messages never quote the input.
#[non_exhaustive]
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum TemplateError {
    /// The template (or the ID it renders) is not a valid SPIFFE ID.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A `{` without a matching `}`, a `}` without `{`, or braces in the trust domain.
    #[error("unbalanced or misplaced `{{` `}}` in the SPIFFE ID template")]
    Braces,
    /// A placeholder name this version does not know.
    #[error(
        "unknown placeholder; known placeholders are {{instance}}, {{uid}} and {{systemd_unit}}"
    )]
    UnknownPlaceholder,
    /// The template needs a value the caller does not have.
    #[error("no value for the placeholder {{{0}}}")]
    MissingValue(&'static str),
    /// A value is not a valid path segment, or not of the placeholder's shape.
    #[error("the value for {{{0}}} is not a valid SPIFFE ID path segment of its kind")]
    BadValue(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Part {
    Literal(String),
    Placeholder(Placeholder),
}

/// The SPIFFE ID of a registration entry: either a plain SPIFFE ID, or a template with
/// placeholders in its path.
///
/// Equality and hashing are those of the exact string. Serialised as the string;
/// deserialising validates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeIdTemplate {
    raw: String,
    parts: Vec<Part>,
    /// The parsed ID when the template has no placeholder.
    fixed: Option<SpiffeId>,
}

impl SpiffeIdTemplate {
    /// Parses a leaf SPIFFE ID or a template. Without placeholders this is exactly
    /// [`SpiffeId::parse_leaf`]. With placeholders, the trust domain must be literal,
    /// each placeholder must be known, and the template must render a valid leaf ID
    /// (checked with values of maximal length, so a valid value never makes it too
    /// long).
    pub fn parse(s: &str) -> Result<Self, TemplateError> {
        if !s.contains(['{', '}']) {
            let id = SpiffeId::parse_leaf(s)?;
            return Ok(Self {
                raw: s.to_owned(),
                parts: vec![Part::Literal(s.to_owned())],
                fixed: Some(id),
            });
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::Scheme)?;
        let td = rest.split_once('/').map_or(rest, |(td, _)| td);
        if td.contains(['{', '}']) {
            return Err(TemplateError::Braces);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = s.char_indices();
        while let Some((start, c)) = chars.next() {
            match c {
                '{' => {
                    let end = s[start..].find('}').ok_or(TemplateError::Braces)? + start;
                    let name = &s[start + 1..end];
                    if name.contains('{') {
                        return Err(TemplateError::Braces);
                    }
                    let placeholder =
                        Placeholder::from_name(name).ok_or(TemplateError::UnknownPlaceholder)?;
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(placeholder));
                    // Skip to the closing brace.
                    for _ in start + 1..=end {
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::Braces),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let template = Self {
            raw: s.to_owned(),
            parts,
            fixed: None,
        };
        // Render with the longest and the shortest valid values: every literal
        // segment and the total length are checked once, here, for all callers.
        let longest = |p: Placeholder| "a".repeat(p.max_len());
        template.render_with(|p| Some(longest(p)))?;
        template.render_with(|p| {
            Some(match p {
                Placeholder::Instance => format!("{INSTANCE_PREFIX}{}", "0".repeat(32)),
                Placeholder::Uid => "0".to_owned(),
                Placeholder::SystemdUnit => "a".to_owned(),
            })
        })?;
        Ok(template)
    }

    /// The template exactly as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The SPIFFE ID when the entry has no placeholder.
    pub fn as_fixed(&self) -> Option<&SpiffeId> {
        self.fixed.as_ref()
    }

    /// True when the ID holds at least one placeholder.
    pub fn is_template(&self) -> bool {
        self.fixed.is_none()
    }

    /// True when the ID holds `{instance}`: one identity per process instance.
    pub fn is_per_instance(&self) -> bool {
        self.placeholders().any(|p| p == Placeholder::Instance)
    }

    /// The placeholders the template holds (each once, in order of first use).
    pub fn placeholders(&self) -> impl Iterator<Item = Placeholder> + '_ {
        let mut seen = Vec::new();
        self.parts.iter().filter_map(move |part| match part {
            Part::Placeholder(p) if !seen.contains(p) => {
                seen.push(*p);
                Some(*p)
            }
            _ => None,
        })
    }

    /// The trust domain name (always literal).
    pub fn trust_domain_name(&self) -> &str {
        let rest = self.raw.strip_prefix("spiffe://").unwrap_or(&self.raw);
        rest.split_once('/').map_or(rest, |(td, _)| td)
    }

    /// The literal path up to the first placeholder (the whole path for a plain ID).
    pub fn literal_path_prefix(&self) -> &str {
        let literal_end = self.raw.find('{').unwrap_or(self.raw.len());
        let start = "spiffe://".len() + self.trust_domain_name().len();
        self.raw.get(start..literal_end).unwrap_or("")
    }

    /// Renders the SPIFFE ID for one caller. Every placeholder must have a value, and
    /// each value is checked against its placeholder's shape before use.
    pub fn render(&self, values: &TemplateValues) -> Result<SpiffeId, TemplateError> {
        if let Some(id) = &self.fixed {
            return Ok(id.clone());
        }
        for placeholder in self.placeholders() {
            let value = values
                .get(placeholder)
                .ok_or(TemplateError::MissingValue(placeholder.name()))?;
            placeholder.check_value(value)?;
        }
        self.render_with(|p| values.get(p).map(str::to_owned))
    }

    /// True when `id` is an instantiation of this template: some values, each passing
    /// its placeholder's [`Placeholder::check_value`], render exactly `id`. A literal
    /// part must match exactly; a placeholder matches a non-empty run of path
    /// characters (never a `/`) of its own shape; a placeholder used twice must take
    /// the same value both times. A template without placeholders matches only its own
    /// ID. Exact string comparison: nothing is normalised.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if let Some(fixed) = &self.fixed {
            return fixed == id;
        }
        let mut bound: BTreeMap<Placeholder, &str> = BTreeMap::new();
        match_parts(&self.parts, id.as_str(), &mut bound)
    }

    fn render_with(
        &self,
        value: impl Fn(Placeholder) -> Option<String>,
    ) -> Result<SpiffeId, TemplateError> {
        let mut out = String::with_capacity(self.raw.len() + 64);
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Placeholder(p) => {
                    out.push_str(&value(*p).ok_or(TemplateError::MissingValue(p.name()))?)
                }
            }
        }
        Ok(SpiffeId::parse_leaf(&out)?)
    }
}

/// Backtracking matcher of [`SpiffeIdTemplate::matches`]: `parts` against the whole of
/// `rest`, with the values bound so far. At most three distinct placeholders exist and
/// each value is at most 255 bytes, so the search is small.
fn match_parts<'a>(
    parts: &[Part],
    rest: &'a str,
    bound: &mut BTreeMap<Placeholder, &'a str>,
) -> bool {
    let Some((first, tail)) = parts.split_first() else {
        return rest.is_empty();
    };
    match first {
        Part::Literal(literal) => rest
            .strip_prefix(literal.as_str())
            .is_some_and(|after| match_parts(tail, after, bound)),
        Part::Placeholder(p) => {
            if let Some(value) = bound.get(p).copied() {
                return rest
                    .strip_prefix(value)
                    .is_some_and(|after| match_parts(tail, after, bound));
            }
            // The run of path characters this placeholder may take.
            let segment_end = rest.find('/').unwrap_or(rest.len());
            let longest = segment_end.min(p.max_len());
            for end in 1..=longest {
                let Some(value) = rest.get(..end) else {
                    continue;
                };
                if p.check_value(value).is_err() {
                    continue;
                }
                bound.insert(*p, value);
                if match_parts(tail, &rest[end..], bound) {
                    return true;
                }
                bound.remove(p);
            }
            false
        }
    }
}

impl fmt::Display for SpiffeIdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl From<SpiffeId> for SpiffeIdTemplate {
    fn from(id: SpiffeId) -> Self {
        Self {
            raw: id.as_str().to_owned(),
            parts: vec![Part::Literal(id.as_str().to_owned())],
            fixed: Some(id),
        }
    }
}

impl TryFrom<String> for SpiffeIdTemplate {
    type Error = TemplateError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SpiffeIdTemplate> for String {
    fn from(t: SpiffeIdTemplate) -> Self {
        t.raw
    }
}

impl std::str::FromStr for SpiffeIdTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Values for the placeholders of one caller. Travels agent -> server as a string map
/// keyed by placeholder name; [`TemplateValues::from_map`] checks every value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TemplateValues {
    values: BTreeMap<Placeholder, String>,
}

impl TemplateValues {
    /// No values (enough for a plain SPIFFE ID).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a value after checking it against the placeholder's shape.
    pub fn set(&mut self, placeholder: Placeholder, value: String) -> Result<(), TemplateError> {
        placeholder.check_value(&value)?;
        self.values.insert(placeholder, value);
        Ok(())
    }

    /// The value of a placeholder, if set.
    pub fn get(&self, placeholder: Placeholder) -> Option<&str> {
        self.values.get(&placeholder).map(String::as_str)
    }

    /// Only the values `template` uses, so that two callers with the same rendered ID
    /// compare equal.
    pub fn restricted_to(&self, template: &SpiffeIdTemplate) -> Self {
        let wanted: Vec<Placeholder> = template.placeholders().collect();
        Self {
            values: self
                .values
                .iter()
                .filter(|(p, _)| wanted.contains(p))
                .map(|(p, v)| (*p, v.clone()))
                .collect(),
        }
    }

    /// True when no value is set.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The wire form: placeholder name to value.
    pub fn to_map(&self) -> std::collections::HashMap<String, String> {
        self.values
            .iter()
            .map(|(p, v)| (p.name().to_owned(), v.clone()))
            .collect()
    }

    /// Parses the wire form, refusing unknown names and malformed values.
    pub fn from_map<'a>(
        map: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, TemplateError> {
        let mut out = Self::new();
        for (name, value) in map {
            let placeholder =
                Placeholder::from_name(name).ok_or(TemplateError::UnknownPlaceholder)?;
            out.set(placeholder, value.clone())?;
        }
        Ok(out)
    }
}

const INSTANCE_PREFIX: &str = "i-";
const INSTANCE_HEX_LEN: usize = 32;
const INSTANCE_VALUE_LEN: usize = INSTANCE_PREFIX.len() + INSTANCE_HEX_LEN;

/// The `{instance}` value of one process: `i-` followed by 32 lowercase hex digits (128
/// bits of SHA-256 over the boot id, the pid, the process start time in clock ticks
/// since boot, and the pidfs inode of the process when the kernel has pidfs).
///
/// The boot id makes values of different boots differ; (pid, start time) identifies a
/// process within a boot; the pidfs inode (unique per process for the whole boot on
/// Linux 6.9 and later) separates two processes that received the same recycled pid
/// within one clock tick. The value is stable for the life of the process.
pub fn instance_value(
    boot_id: &str,
    pid: i32,
    start_time: u64,
    pidfs_inode: Option<u64>,
) -> String {
    let mut hasher = digest::Context::new(&digest::SHA256);
    hasher.update(b"tessera instance v1\0");
    hasher.update(boot_id.trim().as_bytes());
    hasher.update(b"\0");
    hasher.update(&pid.to_le_bytes());
    hasher.update(&start_time.to_le_bytes());
    hasher.update(&pidfs_inode.unwrap_or(0).to_le_bytes());
    let digest = hasher.finish();
    let digest = digest.as_ref();
    let mut out = String::with_capacity(INSTANCE_VALUE_LEN);
    out.push_str(INSTANCE_PREFIX);
    out.push_str(&hex::encode(&digest[..INSTANCE_HEX_LEN / 2]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(Placeholder, &str)]) -> TemplateValues {
        let mut v = TemplateValues::new();
        for (p, s) in pairs {
            v.set(*p, (*s).to_owned()).unwrap();
        }
        v
    }

    #[test]
    fn plain_ids_parse_as_before() {
        let t = SpiffeIdTemplate::parse("spiffe://example.org/web").unwrap();
        assert!(!t.is_template());
        assert_eq!(t.as_fixed().unwrap().as_str(), "spiffe://example.org/web");
        assert_eq!(
            SpiffeIdTemplate::parse("spiffe://example.org"),
            Err(TemplateError::Id(IdError::TrustDomainOnly))
        );
        assert_eq!(
            SpiffeIdTemplate::parse("spiffe://example.org/a/../b"),
            Err(TemplateError::Id(IdError::DotSegment))
        );
    }

    #[test]
    fn instance_template_renders_one_id_per_instance() {
        let t = SpiffeIdTemplate::parse("spiffe://example.org/ai/research-bot/{instance}").unwrap();
        assert!(t.is_template() && t.is_per_instance());
        assert_eq!(t.trust_domain_name(), "example.org");
        assert_eq!(t.literal_path_prefix(), "/ai/research-bot/");
        let a = instance_value("boot", 42, 1000, Some(7));
        let b = instance_value("boot", 42, 1001, Some(7));
        assert_ne!(a, b);
        assert_eq!(a, instance_value("boot", 42, 1000, Some(7)));
        assert_ne!(a, instance_value("boot", 42, 1000, Some(8)));
        assert_ne!(a, instance_value("other-boot", 42, 1000, Some(7)));
        let id = t.render(&values(&[(Placeholder::Instance, &a)])).unwrap();
        assert_eq!(
            id.as_str(),
            format!("spiffe://example.org/ai/research-bot/{a}")
        );
        assert_eq!(
            t.render(&TemplateValues::new()),
            Err(TemplateError::MissingValue("instance"))
        );
    }

    #[test]
    fn placeholders_inside_segments_and_several() {
        let t = SpiffeIdTemplate::parse("spiffe://example.org/u-{uid}/{systemd_unit}/{instance}")
            .unwrap();
        assert_eq!(
            t.placeholders().collect::<Vec<_>>(),
            vec![
                Placeholder::Uid,
                Placeholder::SystemdUnit,
                Placeholder::Instance
            ]
        );
        let inst = instance_value("b", 1, 2, None);
        let v = values(&[
            (Placeholder::Uid, "1000"),
            (Placeholder::SystemdUnit, "bot.service"),
            (Placeholder::Instance, &inst),
        ]);
        assert_eq!(
            t.render(&v).unwrap().as_str(),
            format!("spiffe://example.org/u-1000/bot.service/{inst}")
        );
    }

    #[test]
    fn malformed_templates_are_refused() {
        for (raw, want) in [
            ("spiffe://example.org/{instance", TemplateError::Braces),
            ("spiffe://example.org/instance}", TemplateError::Braces),
            ("spiffe://{uid}.org/x", TemplateError::Braces),
            ("spiffe://example.org/{{uid}}", TemplateError::Braces),
            (
                "spiffe://example.org/{pod_name}",
                TemplateError::UnknownPlaceholder,
            ),
            ("spiffe://example.org/{}", TemplateError::UnknownPlaceholder),
            (
                "spiffe://example.org//{uid}",
                TemplateError::Id(IdError::EmptySegment),
            ),
            (
                "spiffe://example.org/{uid}/",
                TemplateError::Id(IdError::TrailingSlash),
            ),
            (
                "spiffe://example.org/../{uid}",
                TemplateError::Id(IdError::DotSegment),
            ),
            (
                "spiffe://example.org/a b/{uid}",
                TemplateError::Id(IdError::PathChar),
            ),
            (
                "http://example.org/{uid}",
                TemplateError::Id(IdError::Scheme),
            ),
        ] {
            assert_eq!(SpiffeIdTemplate::parse(raw), Err(want), "{raw}");
        }
        let long = format!("spiffe://example.org/{}/{{systemd_unit}}", "a".repeat(1900));
        assert_eq!(
            SpiffeIdTemplate::parse(&long),
            Err(TemplateError::Id(IdError::TooLong))
        );
    }

    #[test]
    fn attacker_controlled_values_never_change_the_path() {
        // SECURITY.md §3.6 item 61.
        for bad in ["a/b", "..", ".", "%2F", "a%2e", "", "a b", "ü", "a\0"] {
            for p in Placeholder::ALL {
                assert_eq!(
                    p.check_value(bad),
                    Err(TemplateError::BadValue(p.name())),
                    "{bad:?}"
                );
            }
        }
        assert!(Placeholder::Uid.check_value("007").is_err());
        assert!(Placeholder::Uid.check_value("4294967296").is_err());
        assert!(Placeholder::Uid.check_value("0").is_ok());
        assert!(
            Placeholder::Instance
                .check_value("i-ABCDEF00000000000000000000000000")
                .is_err()
        );
        assert!(Placeholder::Instance.check_value("i-0123").is_err());
        assert!(
            Placeholder::SystemdUnit
                .check_value("getty@tty1.service")
                .is_err()
        );
        assert!(
            Placeholder::SystemdUnit
                .check_value(&"a".repeat(256))
                .is_err()
        );
        let map: std::collections::HashMap<String, String> =
            [("pod".to_owned(), "x".to_owned())].into();
        assert_eq!(
            TemplateValues::from_map(&map),
            Err(TemplateError::UnknownPlaceholder)
        );
    }

    fn leaf(s: &str) -> SpiffeId {
        SpiffeId::parse_leaf(s).unwrap()
    }

    #[test]
    fn matches_recognises_instantiations_only() {
        let inst = instance_value("boot", 7, 9, None);
        let t = SpiffeIdTemplate::parse("spiffe://example.org/ai/bot/{instance}").unwrap();
        assert!(t.matches(&leaf(&format!("spiffe://example.org/ai/bot/{inst}"))));
        // Every rendered ID matches.
        let rendered = t
            .render(&values(&[(Placeholder::Instance, &inst)]))
            .unwrap();
        assert!(t.matches(&rendered));
        for bad in [
            // Not of the placeholder's shape.
            "spiffe://example.org/ai/bot/i-0123".to_owned(),
            "spiffe://example.org/ai/bot/research".to_owned(),
            format!("spiffe://example.org/ai/bot/{}", inst.to_uppercase()),
            // A placeholder never spans a `/`, and the literal must match exactly.
            format!("spiffe://example.org/ai/bot/{inst}/x"),
            format!("spiffe://example.org/ai/bot/x/{inst}"),
            format!("spiffe://example.org/ai/Bot/{inst}"),
            format!("spiffe://example.org/ai/bots/{inst}"),
            format!("spiffe://other.org/ai/bot/{inst}"),
            "spiffe://example.org/ai/bot".to_owned(),
        ] {
            assert!(!t.matches(&leaf(&bad)), "{bad}");
        }

        let t = SpiffeIdTemplate::parse("spiffe://example.org/u-{uid}/{systemd_unit}").unwrap();
        assert!(t.matches(&leaf("spiffe://example.org/u-1000/bot.service")));
        assert!(t.matches(&leaf("spiffe://example.org/u-0/a")));
        for bad in [
            "spiffe://example.org/u-/bot.service",
            "spiffe://example.org/u-007/bot.service",
            "spiffe://example.org/u-4294967296/bot.service",
            "spiffe://example.org/u-1000",
            "spiffe://example.org/u-1000/a/b",
            "spiffe://example.org/x-1000/bot.service",
        ] {
            assert!(!t.matches(&leaf(bad)), "{bad}");
        }
        let too_long = format!("spiffe://example.org/u-1/{}", "a".repeat(256));
        assert!(!t.matches(&leaf(&too_long)));

        // Several placeholders in one segment: the literal between them decides, with
        // backtracking (`{systemd_unit}` may itself contain `-`).
        let t = SpiffeIdTemplate::parse("spiffe://example.org/w/{systemd_unit}-{uid}").unwrap();
        assert!(t.matches(&leaf("spiffe://example.org/w/my-bot.service-42")));
        assert!(!t.matches(&leaf("spiffe://example.org/w/my-bot.service-x")));
        assert!(!t.matches(&leaf("spiffe://example.org/w/-42")));

        // A placeholder used twice takes one value.
        let t = SpiffeIdTemplate::parse("spiffe://example.org/{uid}/x/{uid}").unwrap();
        assert!(t.matches(&leaf("spiffe://example.org/5/x/5")));
        assert!(!t.matches(&leaf("spiffe://example.org/5/x/6")));

        // A plain ID matches only itself, exactly.
        let t = SpiffeIdTemplate::parse("spiffe://example.org/web").unwrap();
        assert!(t.matches(&leaf("spiffe://example.org/web")));
        assert!(!t.matches(&leaf("spiffe://example.org/web2")));
    }

    #[test]
    fn wire_form_round_trips_and_restriction_drops_unused_values() {
        let t = SpiffeIdTemplate::parse("spiffe://example.org/u/{uid}").unwrap();
        let v = values(&[
            (Placeholder::Uid, "5"),
            (Placeholder::SystemdUnit, "x.service"),
        ]);
        let r = v.restricted_to(&t);
        assert_eq!(r.get(Placeholder::SystemdUnit), None);
        assert_eq!(TemplateValues::from_map(&v.to_map()).unwrap(), v);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeIdTemplate>(&json).unwrap(), t);
    }
}
