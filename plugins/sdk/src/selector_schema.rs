//! The selector schema: which `TYPE:KEY:VALUE` selectors tessera's workload attestors
//! emit, and what each value must look like (SECURITY.md §3.6 item 62).
//!
//! [`crate::selector`] checks only the generic `TYPE:VALUE` syntax. An entry selector
//! that passes it but names no form an attestor produces (`k8s:pod_name:x`,
//! `unix:pid:1`, `unix:uid:01`) can never match a workload, so the server rejects it at
//! entry create/update with [`validate`] instead of storing a dead entry.
//!
//! The forms (see [`known_forms`], and `docs/selectors.md` for operators):
//!
//! | type | keys |
//! |---|---|
//! | `unix` | `uid`, `gid`, `user`, `group`, `supplementary_gid`, `supplementary_group`, `path`, `sha256` |
//! | `systemd` | `unit`, `user_unit`, `slice`, `invocation_id` |
//! | `cgroup` | `path` |
//! | `container` | `id`, `pod_uid`, `image`, `name` |
//!
//! Selector values may be sensitive (SECURITY.md §2 rule 10): a [`SchemaError`] names the
//! type, the key (only when it is short and key-shaped) and the valid forms, never the
//! value.

use std::fmt;

use crate::selector::Selector;

/// Selector types the schema knows, in the order error messages list them.
pub const KNOWN_TYPES: &[&str] = &["unix", "systemd", "cgroup", "container"];

/// Longest user or group name (`useradd`'s limit).
pub const MAX_NAME_LEN: usize = 32;

/// Longest `unix:path` or `cgroup:path` value (`PATH_MAX`). The generic selector limit
/// ([`crate::selector::MAX_VALUE_LEN`], which counts the key too) is lower, and applies
/// first.
pub const MAX_PATH_LEN: usize = 4096;

/// Longest systemd unit name (systemd's `UNIT_NAME_MAX` minus the NUL).
pub const MAX_UNIT_LEN: usize = 255;

/// Longest `container:image` value.
pub const MAX_IMAGE_LEN: usize = 1024;

/// Longest `container:name` value.
pub const MAX_CONTAINER_NAME_LEN: usize = 255;

/// Longest key echoed back in an error; a longer one is not named.
const MAX_ECHOED_KEY_LEN: usize = 32;

/// Longest type echoed back in an error (the generic limit already caps types at 64).
const MAX_ECHOED_KIND_LEN: usize = 64;

/// Unit suffixes systemd knows.
const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".scope",
    ".socket",
    ".mount",
    ".timer",
    ".slice",
    ".target",
    ".path",
    ".swap",
    ".device",
    ".automount",
];

/// Why a syntactically valid selector is not one the schema knows.
///
/// The message lists the valid forms and never quotes the selector value.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaError {
    /// The type is none of [`KNOWN_TYPES`].
    UnknownType {
        /// The rejected type (already limited to `[a-z][a-z0-9_]*`, at most 64 bytes).
        kind: String,
    },
    /// The type is known but the value has no `KEY:` part.
    MissingKey {
        /// The selector type.
        kind: &'static str,
    },
    /// The type is known but the key is not one of its keys.
    UnknownKey {
        /// The selector type.
        kind: &'static str,
        /// The rejected key, when it is short and key-shaped (`[A-Za-z0-9_-]`, at most
        /// 32 bytes); `None` otherwise, so that no value is ever echoed.
        key: Option<String>,
    },
    /// The type and key are known but the value is malformed.
    InvalidValue {
        /// The selector type.
        kind: &'static str,
        /// The selector key.
        key: &'static str,
        /// The valid form, e.g. `unix:uid:<number>`.
        form: &'static str,
        /// What the value must be.
        requirement: &'static str,
    },
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownType { kind } => write!(
                f,
                "unknown selector type `{}`; valid forms start with a known type: {}",
                truncate(kind, MAX_ECHOED_KIND_LEN),
                KNOWN_TYPES.join(", ")
            ),
            Self::MissingKey { kind } => write!(
                f,
                "{kind} selector has no KEY (the form is {kind}:KEY:VALUE); valid forms: {}",
                FormsOf(kind)
            ),
            Self::UnknownKey {
                kind,
                key: Some(key),
            } => write!(
                f,
                "unknown {kind} selector `{}`; valid forms: {}",
                truncate(key, MAX_ECHOED_KEY_LEN),
                FormsOf(kind)
            ),
            Self::UnknownKey { kind, key: None } => write!(
                f,
                "unknown {kind} selector key; valid forms: {}",
                FormsOf(kind)
            ),
            Self::InvalidValue {
                kind,
                key,
                form,
                requirement,
            } => write!(
                f,
                "invalid value for selector {kind}:{key}: {requirement} (valid form: {form})"
            ),
        }
    }
}

impl std::error::Error for SchemaError {}

/// Displays the forms of one type, comma-separated.
struct FormsOf<'a>(&'a str);

impl fmt::Display for FormsOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for rule in RULES.iter().filter(|r| r.kind == self.0) {
            if !first {
                f.write_str(", ")?;
            }
            f.write_str(rule.form)?;
            first = false;
        }
        Ok(())
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Checks `selector` against the schema: a known type, one of its keys, and a value of
/// the form that key requires.
pub fn validate(selector: &Selector) -> Result<(), SchemaError> {
    let kind = selector.kind();
    let Some(&kind) = KNOWN_TYPES.iter().find(|&&k| k == kind) else {
        return Err(SchemaError::UnknownType {
            kind: truncate(kind, MAX_ECHOED_KIND_LEN).to_owned(),
        });
    };
    let Some((key, value)) = selector.value().split_once(':') else {
        return Err(SchemaError::MissingKey { kind });
    };
    let Some(rule) = RULES.iter().find(|r| r.kind == kind && r.key == key) else {
        let key_shaped = !key.is_empty()
            && key.len() <= MAX_ECHOED_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        return Err(SchemaError::UnknownKey {
            kind,
            key: key_shaped.then(|| key.to_owned()),
        });
    };
    if (rule.check)(value) {
        Ok(())
    } else {
        Err(SchemaError::InvalidValue {
            kind: rule.kind,
            key: rule.key,
            form: rule.form,
            requirement: rule.requirement,
        })
    }
}

/// Every valid form with its description, e.g. `("unix:uid:<number>", "effective uid of
/// the process; <number> must be ...")`, in a stable order (by type as in
/// [`KNOWN_TYPES`], then by key), for documentation and CLI help.
pub fn known_forms() -> &'static [(&'static str, &'static str)] {
    &KNOWN_FORMS
}

/// One selector form.
struct Rule {
    kind: &'static str,
    key: &'static str,
    /// `kind:key:<placeholder>`.
    form: &'static str,
    /// `<placeholder> must be ...`.
    requirement: &'static str,
    /// What the selector means, then the requirement.
    description: &'static str,
    check: fn(&str) -> bool,
}

/// Builds a [`Rule`] from literals, so that the form, requirement and description stay
/// consistent.
macro_rules! rule {
    ($kind:literal, $key:literal, $placeholder:literal, $meaning:literal, $must:literal, $check:expr $(,)?) => {
        Rule {
            kind: $kind,
            key: $key,
            form: concat!($kind, ":", $key, ":", $placeholder),
            requirement: concat!($placeholder, " must be ", $must),
            description: concat!($meaning, "; ", $placeholder, " must be ", $must),
            check: $check,
        }
    };
}

const RULE_COUNT: usize = 17;

const RULES: [Rule; RULE_COUNT] = [
    rule!(
        "unix",
        "uid",
        "<number>",
        "effective uid of the process",
        "a decimal number 0-4294967295 without sign or leading zeros",
        is_u32,
    ),
    rule!(
        "unix",
        "gid",
        "<number>",
        "effective gid of the process",
        "a decimal number 0-4294967295 without sign or leading zeros",
        is_u32,
    ),
    rule!(
        "unix",
        "user",
        "<name>",
        "user name of the effective uid",
        "1-32 characters [A-Za-z_][A-Za-z0-9_.-]*, optionally ending in $",
        is_posix_name,
    ),
    rule!(
        "unix",
        "group",
        "<name>",
        "group name of the effective gid",
        "1-32 characters [A-Za-z_][A-Za-z0-9_.-]*, optionally ending in $",
        is_posix_name,
    ),
    rule!(
        "unix",
        "supplementary_gid",
        "<number>",
        "a supplementary gid of the process",
        "a decimal number 0-4294967295 without sign or leading zeros",
        is_u32,
    ),
    rule!(
        "unix",
        "supplementary_group",
        "<name>",
        "name of a supplementary gid of the process",
        "1-32 characters [A-Za-z_][A-Za-z0-9_.-]*, optionally ending in $",
        is_posix_name,
    ),
    rule!(
        "unix",
        "path",
        "<path>",
        "absolute path of the executable",
        "an absolute path: starting with /, no empty, . or .. component, no trailing /, no NUL, at most 4096 bytes",
        is_unix_path,
    ),
    rule!(
        "unix",
        "sha256",
        "<hex>",
        "SHA-256 of the running executable",
        "64 lowercase hex digits",
        is_sha256_hex,
    ),
    rule!(
        "systemd",
        "unit",
        "<unit>",
        "system unit of the process",
        "a unit name of 1-255 characters [A-Za-z0-9:_.@\\-] ending in .service, .scope, .socket, .mount, .timer, .slice, .target, .path, .swap, .device or .automount",
        is_unit_name,
    ),
    rule!(
        "systemd",
        "user_unit",
        "<unit>",
        "user-manager unit of the process",
        "a unit name of 1-255 characters [A-Za-z0-9:_.@\\-] ending in .service, .scope, .socket, .mount, .timer, .slice, .target, .path, .swap, .device or .automount",
        is_unit_name,
    ),
    rule!(
        "systemd",
        "slice",
        "<slice>",
        "slice of the process",
        "a unit name of 1-255 characters [A-Za-z0-9:_.@\\-] ending in .slice",
        is_slice_name,
    ),
    rule!(
        "systemd",
        "invocation_id",
        "<hex>",
        "invocation ID of the unit",
        "32 lowercase hex digits",
        is_invocation_id,
    ),
    rule!(
        "cgroup",
        "path",
        "<path>",
        "cgroup v2 path of the process",
        "/ or an absolute path of non-empty components other than . and .., no trailing /, no NUL or newline, at most 4096 bytes",
        is_cgroup_path,
    ),
    rule!(
        "container",
        "id",
        "<hex>",
        "container ID",
        "64 lowercase hex digits",
        is_sha256_hex,
    ),
    rule!(
        "container",
        "pod_uid",
        "<uuid>",
        "Kubernetes pod UID",
        "a lowercase UUID, 8-4-4-4-12 hex digits",
        is_lower_uuid,
    ),
    rule!(
        "container",
        "image",
        "<image>",
        "container image reference",
        "1-1024 bytes without whitespace or control characters",
        is_image,
    ),
    rule!(
        "container",
        "name",
        "<name>",
        "container name",
        "1-255 characters [A-Za-z0-9_.-]",
        is_container_name,
    ),
];

/// `(form, description)` of every rule, in rule order.
static KNOWN_FORMS: [(&str, &str); RULE_COUNT] = {
    let mut out = [("", ""); RULE_COUNT];
    let mut i = 0;
    while i < RULE_COUNT {
        out[i] = (RULES[i].form, RULES[i].description);
        i += 1;
    }
    out
};

/// A `u32` in canonical decimal: digits only, no leading zero except `0` itself.
fn is_u32(v: &str) -> bool {
    let canonical = match v.as_bytes() {
        [] => false,
        [b'0'] => true,
        [first, ..] => *first != b'0' && v.bytes().all(|b| b.is_ascii_digit()),
    };
    canonical && v.parse::<u32>().is_ok()
}

/// A POSIX-style user or group name, lenient on case: `[A-Za-z_][A-Za-z0-9_.-]*` with an
/// optional trailing `$` (machine accounts), 1-32 bytes in all.
fn is_posix_name(v: &str) -> bool {
    if v.is_empty() || v.len() > MAX_NAME_LEN {
        return false;
    }
    let body = v.strip_suffix('$').unwrap_or(v);
    let mut bytes = body.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// An absolute path whose components are all non-empty and not `.` or `..`, with no
/// NUL, at most [`MAX_PATH_LEN`] bytes. `/` itself is accepted only when `root_ok`.
fn is_clean_absolute_path(v: &str, root_ok: bool) -> bool {
    if v.len() > MAX_PATH_LEN || v.contains('\0') {
        return false;
    }
    let Some(rest) = v.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return root_ok;
    }
    rest.split('/')
        .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn is_unix_path(v: &str) -> bool {
    is_clean_absolute_path(v, false)
}

fn is_cgroup_path(v: &str) -> bool {
    !v.contains('\n') && is_clean_absolute_path(v, true)
}

/// Exactly `len` lowercase hex digits.
fn is_lower_hex(v: &str, len: usize) -> bool {
    v.len() == len && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_sha256_hex(v: &str) -> bool {
    is_lower_hex(v, 64)
}

fn is_invocation_id(v: &str) -> bool {
    is_lower_hex(v, 32)
}

/// A systemd unit name of allowed characters ending in one of `suffixes`, with a
/// non-empty name before the suffix.
fn is_unit_name_with(v: &str, suffixes: &[&str]) -> bool {
    v.len() <= MAX_UNIT_LEN
        && v.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'\\' | b'@')
        })
        && suffixes
            .iter()
            .any(|s| v.strip_suffix(s).is_some_and(|stem| !stem.is_empty()))
}

fn is_unit_name(v: &str) -> bool {
    is_unit_name_with(v, UNIT_SUFFIXES)
}

fn is_slice_name(v: &str) -> bool {
    is_unit_name_with(v, &[".slice"])
}

/// A lowercase hyphenated UUID (`8-4-4-4-12` hex digits).
fn is_lower_uuid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| is_lower_hex(g, len))
}

fn is_image(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_IMAGE_LEN
        && !v.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_container_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CONTAINER_NAME_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    fn check(s: &str) -> Result<(), SchemaError> {
        validate(&sel(s))
    }

    fn assert_valid(s: &str) {
        if let Err(e) = check(s) {
            panic!("{s:?} rejected: {e}");
        }
    }

    /// `s` is rejected as an invalid value of `form`.
    fn assert_bad_value(s: &str, form: &str) {
        match check(s) {
            Err(SchemaError::InvalidValue { form: f, .. }) if f == form => {}
            other => panic!("{s:?}: expected InvalidValue for {form}, got {other:?}"),
        }
    }

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for rule in &RULES {
            assert!(KNOWN_TYPES.contains(&rule.kind), "{}", rule.form);
            assert!(
                rule.form
                    .starts_with(&format!("{}:{}:<", rule.kind, rule.key)),
                "{}",
                rule.form
            );
            assert!(
                rule.description.ends_with(rule.requirement),
                "{}",
                rule.form
            );
            assert!(
                seen.insert((rule.kind, rule.key)),
                "duplicate {}",
                rule.form
            );
        }
        // Every known type has at least one key.
        for kind in KNOWN_TYPES {
            assert!(RULES.iter().any(|r| r.kind == *kind), "{kind}");
        }
        let forms = known_forms();
        assert_eq!(forms.len(), RULES.len());
        for (rule, (form, description)) in RULES.iter().zip(forms) {
            assert_eq!((rule.form, rule.description), (*form, *description));
        }
        assert_eq!(forms[0].0, "unix:uid:<number>");
    }

    #[test]
    fn unix_numbers() {
        for key in ["uid", "gid", "supplementary_gid"] {
            let form = format!("unix:{key}:<number>");
            for good in ["0", "1", "1000", "65534", "4294967295"] {
                assert_valid(&format!("unix:{key}:{good}"));
            }
            for bad in [
                "-1",
                "+1",
                "01",
                "00",
                "4294967296",
                "99999999999999999999",
                "1.0",
                "1e3",
                " 1",
                "1 ",
                "0x10",
                "abc",
                "١",
            ] {
                assert_bad_value(&format!("unix:{key}:{bad}"), &form);
            }
        }
    }

    #[test]
    fn unix_names() {
        for key in ["user", "group", "supplementary_group"] {
            let form = format!("unix:{key}:<name>");
            for good in [
                "alice",
                "_apt",
                "systemd-network",
                "www-data",
                "a.b",
                "Alice",
                "DOMAIN_USER",
                "host$",
                "a",
                &"a".repeat(MAX_NAME_LEN),
                &format!("{}$", "a".repeat(MAX_NAME_LEN - 1)),
            ] {
                assert_valid(&format!("unix:{key}:{good}"));
            }
            for bad in [
                "$",
                "1abc",
                "-abc",
                ".abc",
                "a/b",
                "a:b",
                "a b",
                "a\u{a0}b",
                "caf\u{e9}",
                "a$b",
                "a$$",
                "a@b",
                &"a".repeat(MAX_NAME_LEN + 1),
                &format!("{}$", "a".repeat(MAX_NAME_LEN)),
            ] {
                assert_bad_value(&format!("unix:{key}:{bad}"), &form);
            }
        }
    }

    #[test]
    fn unix_path() {
        for good in [
            "/usr/bin/sleep",
            "/a",
            "/opt/my app/bin/caf\u{e9}",
            "/memfd:x",
            "/a/.hidden/b..c/...",
            "/a/b.",
        ] {
            assert_valid(&format!("unix:path:{good}"));
        }
        for bad in [
            "relative",
            "usr/bin/x",
            "./x",
            "/",
            "//a",
            "/a//b",
            "/a/",
            "/a/./b",
            "/a/../b",
            "/./a",
            "/../a",
            "/a/.",
            "/a/..",
            "~/x",
        ] {
            assert_bad_value(&format!("unix:path:{bad}"), "unix:path:<path>");
        }
        assert!(!is_unix_path("/a\0b"));
        assert!(!is_unix_path(&format!("/{}", "a".repeat(MAX_PATH_LEN))));
        assert!(is_unix_path(&format!("/{}", "a".repeat(MAX_PATH_LEN - 1))));
    }

    #[test]
    fn hex_digests() {
        for kind_key in ["unix:sha256", "container:id"] {
            let form = format!("{kind_key}:<hex>");
            assert_valid(&format!("{kind_key}:{SHA}"));
            assert_valid(&format!("{kind_key}:{}", "0".repeat(64)));
            for bad in [
                SHA.to_uppercase(),
                format!("ABC{}", &SHA[3..]),
                SHA[..63].to_owned(),
                format!("{SHA}0"),
                format!("{}g", &SHA[..63]),
                "abc".to_owned(),
                format!("sha256:{SHA}"),
                format!(" {}", &SHA[1..]),
            ] {
                assert_bad_value(&format!("{kind_key}:{bad}"), &form);
            }
        }
    }

    #[test]
    fn systemd_units() {
        for key in ["unit", "user_unit"] {
            let form = format!("systemd:{key}:<unit>");
            for good in [
                "nginx.service",
                "session-2.scope",
                "dbus.socket",
                "home.mount",
                "logrotate.timer",
                "user-1000.slice",
                "multi-user.target",
                "foo.path",
                "dev-sda2.swap",
                "dev-sda.device",
                "proc-sys-fs-binfmt_misc.automount",
                "getty@tty1.service",
                "user@1000.service",
                "systemd-fsck@dev-disk-by\\x2duuid-AB12.service",
                "a:b.service",
                "-.slice",
                "-.mount",
                &format!("{}.service", "a".repeat(MAX_UNIT_LEN - 8)),
            ] {
                assert_valid(&format!("systemd:{key}:{good}"));
            }
            for bad in [
                "nginx",
                "nginx.Service",
                "nginx.service/",
                ".service",
                "nginx.services",
                "nginx.service.bak",
                "a b.service",
                "a/b.service",
                "caf\u{e9}.service",
                "a$.service",
                &format!("{}.service", "a".repeat(MAX_UNIT_LEN - 7)),
            ] {
                assert_bad_value(&format!("systemd:{key}:{bad}"), &form);
            }
        }
    }

    #[test]
    fn systemd_slice_and_invocation_id() {
        for good in ["system.slice", "user-1000.slice", "-.slice", "a-b-c.slice"] {
            assert_valid(&format!("systemd:slice:{good}"));
        }
        for bad in [
            "system",
            "nginx.service",
            ".slice",
            "a b.slice",
            "system.slice/",
        ] {
            assert_bad_value(&format!("systemd:slice:{bad}"), "systemd:slice:<slice>");
        }
        assert_valid("systemd:invocation_id:0123456789abcdef0123456789abcdef");
        for bad in [
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdef0",
            "01234567-89ab-cdef-0123-456789abcdef",
            "x123456789abcdef0123456789abcdef",
        ] {
            assert_bad_value(
                &format!("systemd:invocation_id:{bad}"),
                "systemd:invocation_id:<hex>",
            );
        }
    }

    #[test]
    fn cgroup_path() {
        for good in [
            "/",
            "/system.slice/nginx.service",
            "/user.slice/user-1000.slice/session-2.scope",
            "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope",
            "/a b/c",
            "/a..b",
        ] {
            assert_valid(&format!("cgroup:path:{good}"));
        }
        for bad in [
            "system.slice",
            "//",
            "/a//b",
            "/a/",
            "/./a",
            "/a/.",
            "/a/../b",
            "/..",
            "a/b",
        ] {
            assert_bad_value(&format!("cgroup:path:{bad}"), "cgroup:path:<path>");
        }
        assert!(!is_cgroup_path("/a\nb"));
        assert!(!is_cgroup_path("/a\0b"));
        assert!(!is_cgroup_path(&format!("/{}", "a".repeat(MAX_PATH_LEN))));
    }

    #[test]
    fn container_forms() {
        assert_valid("container:pod_uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
        for bad in [
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00",
            "0f1e2d3c-4b5a-6978-8796a5b4c3d2e1f0",
            "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1g0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-",
        ] {
            assert_bad_value(
                &format!("container:pod_uid:{bad}"),
                "container:pod_uid:<uuid>",
            );
        }
        for good in [
            "nginx",
            "docker.io/library/nginx:1.27",
            &format!("registry.example.org:5000/team/app@sha256:{SHA}"),
            "ghcr.io/org/app:v1.2.3-rc.1",
        ] {
            assert_valid(&format!("container:image:{good}"));
        }
        for bad in ["nginx latest", "nginx\u{a0}x", "nginx\u{2028}x", "a\u{85}b"] {
            assert_bad_value(&format!("container:image:{bad}"), "container:image:<image>");
        }
        assert!(!is_image(""));
        assert!(is_image(&"a".repeat(MAX_IMAGE_LEN)));
        assert!(!is_image(&"a".repeat(MAX_IMAGE_LEN + 1)));
        for good in [
            "web",
            "my_app-1.2",
            "K8S_POD",
            &"a".repeat(MAX_CONTAINER_NAME_LEN),
        ] {
            assert_valid(&format!("container:name:{good}"));
        }
        for bad in [
            "my app",
            "a/b",
            "a:b",
            "/web",
            "caf\u{e9}",
            &"a".repeat(MAX_CONTAINER_NAME_LEN + 1),
        ] {
            assert_bad_value(&format!("container:name:{bad}"), "container:name:<name>");
        }
        // An empty value after the key is malformed, never "unknown".
        for form in [
            "container:id:<hex>",
            "container:name:<name>",
            "container:image:<image>",
            "unix:uid:<number>",
            "unix:path:<path>",
            "cgroup:path:<path>",
        ] {
            let kind_key = form.rsplit_once(':').unwrap().0;
            assert_bad_value(&format!("{kind_key}:"), form);
        }
    }

    #[test]
    fn unknown_type_lists_known_types() {
        for s in [
            "k8s:pod_name:x",
            "docker:id:abc",
            "unixx:uid:1",
            "systemd_unit:x",
        ] {
            let err = check(s).unwrap_err();
            assert!(
                matches!(err, SchemaError::UnknownType { .. }),
                "{s}: {err:?}"
            );
            let m = err.to_string();
            assert!(
                m.contains("unix, systemd, cgroup, container") && m.contains("valid forms"),
                "{m}"
            );
            assert!(m.contains(&format!("`{}`", sel(s).kind())), "{m}");
        }
        let m = check("k8s:pod_name:secret-pod").unwrap_err().to_string();
        assert!(!m.contains("secret") && !m.contains("pod_name"), "{m}");
    }

    #[test]
    fn unknown_key_lists_forms_of_the_type() {
        let err = check("unix:pid:1").unwrap_err();
        assert_eq!(
            err,
            SchemaError::UnknownKey {
                kind: "unix",
                key: Some("pid".into())
            }
        );
        let m = err.to_string();
        assert!(
            m.starts_with(
                "unknown unix selector `pid`; valid forms: unix:uid:<number>, unix:gid:<number>, "
            ),
            "{m}"
        );
        for rule in RULES.iter().filter(|r| r.kind == "unix") {
            assert!(m.contains(rule.form), "{m}");
        }
        assert!(!m.contains("systemd:"), "{m}");

        for (s, kind) in [
            ("systemd:service:nginx.service", "systemd"),
            ("cgroup:id:1", "cgroup"),
            ("container:image_id:x", "container"),
            ("unix:UID:1", "unix"),
            ("unix::1", "unix"),
            ("unix:uid :1", "unix"),
        ] {
            let m = check(s).unwrap_err().to_string();
            assert!(m.contains(&format!("unknown {kind} selector")), "{s}: {m}");
            assert!(m.contains("valid forms"), "{m}");
            for rule in RULES.iter().filter(|r| r.kind == kind) {
                assert!(m.contains(rule.form), "{m}");
            }
        }
        // A value with no KEY: part.
        let err = check("unix:1000").unwrap_err();
        assert_eq!(err, SchemaError::MissingKey { kind: "unix" });
        let m = err.to_string();
        assert!(m.contains("valid forms: unix:uid:<number>"), "{m}");
        assert!(!m.contains("1000"), "{m}");
    }

    #[test]
    fn errors_never_echo_values() {
        let secret = "s3cr3t-token-value";
        for s in [
            format!("unix:uid:{secret}"),
            format!("unix:path:{secret}"),
            format!("container:image:{secret} x"),
            format!("unix:{secret}"),
            format!("unix:{secret}/x:1"),
            format!("cgroup:{}:1", "k".repeat(MAX_ECHOED_KEY_LEN + 1)),
        ] {
            let m = check(&s).unwrap_err().to_string();
            assert!(!m.contains(secret), "{m}");
            assert!(!m.contains("kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"), "{m}");
        }
        // A key-shaped unknown key is named; one that is not is not.
        assert_eq!(
            check("unix:s3cr3t/x:1").unwrap_err(),
            SchemaError::UnknownKey {
                kind: "unix",
                key: None
            }
        );
        // A long (64-byte) unknown type is echoed at most in full, never more.
        let long = "a".repeat(64);
        let m = check(&format!("{long}:x:y")).unwrap_err().to_string();
        assert!(m.contains(&long), "{m}");
    }

    #[test]
    fn malformed_value_says_what_it_must_be() {
        let m = check("unix:uid:-1").unwrap_err().to_string();
        assert_eq!(
            m,
            "invalid value for selector unix:uid: <number> must be a decimal number \
             0-4294967295 without sign or leading zeros (valid form: unix:uid:<number>)"
        );
        let m = check("unix:sha256:ABC").unwrap_err().to_string();
        assert!(m.contains("64 lowercase hex digits"), "{m}");
        assert!(!m.contains("ABC"), "{m}");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 2), "ab");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("a\u{e9}", 2), "a");
        assert_eq!(truncate("", 0), "");
    }
}
