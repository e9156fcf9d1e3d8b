//! The configuration of the unix attestor ([`UnixAttestorConfig`]) and its byte-size
//! syntax (`268435456`, `"256MiB"`).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// Default for [`UnixAttestorConfig::max_binary_size`]: 256 MiB.
pub const DEFAULT_MAX_BINARY_SIZE: u64 = 256 * 1024 * 1024;

/// Configuration of the unix workload attestor.
///
/// | key | type | default | meaning |
/// |---|---|---|---|
/// | `max_binary_size` | integer (bytes) or string (`"256MiB"`, units `B`, `KiB`, `MiB`, `GiB`, `TiB`) | `"256MiB"` | Largest executable hashed for the `sha256` selector; a larger one gets no `sha256` selector (its other selectors stay). Must be > 0. |
/// | `network_fs_hash` | `"omit"` or `"allow"` | `"omit"` | What to do with an executable on a network or FUSE filesystem (SECURITY.md §3.3 item 31): `omit` gives it no `sha256` selector, `allow` hashes it like any other (never cached). |
///
/// Unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnixAttestorConfig {
    /// Largest executable, in bytes, that is hashed; never more than this plus one byte
    /// is read. Default [`DEFAULT_MAX_BINARY_SIZE`].
    #[serde(deserialize_with = "deserialize_size")]
    pub max_binary_size: u64,
    /// Policy for executables on FUSE and network filesystems. Default
    /// [`NetworkFsHash::Omit`].
    pub network_fs_hash: NetworkFsHash,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_binary_size: DEFAULT_MAX_BINARY_SIZE,
            network_fs_hash: NetworkFsHash::default(),
        }
    }
}

/// What the `sha256` selector is for an executable on a FUSE or network filesystem
/// (NFS, CIFS/SMB, 9P, AFS, Ceph). The file server, not the kernel, supplies the bytes
/// and the attributes: it can serve different contents to different readers (the agent
/// and the kernel loading the image), so the hash proves little about what runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkFsHash {
    /// No `sha256` selector (the default); the other selectors stay.
    #[default]
    Omit,
    /// Hash as usual, but never from the cache (the attributes the cache key is made of
    /// come from the file server too).
    Allow,
}

/// Parses a byte size: decimal digits with an optional unit `B`, `KiB`, `MiB`, `GiB` or
/// `TiB` (spaces allowed between). Zero and overflow are errors.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(format!("invalid size {text:?}: expected a number of bytes"));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: number too large"))?;
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size unit {other:?}: use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    let size = number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))?;
    if size == 0 {
        return Err("size must be greater than zero".to_owned());
    }
    Ok(size)
}

fn deserialize_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a positive number of bytes or a string like \"256MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            if v == 0 {
                return Err(E::custom("size must be greater than zero"));
            }
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            let v = u64::try_from(v).map_err(|_| E::custom("size must not be negative"))?;
            self.visit_u64(v)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    deserializer.deserialize_any(SizeVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("1").unwrap(), 1);
        assert_eq!(parse_size("10B").unwrap(), 10);
        assert_eq!(parse_size("256MiB").unwrap(), DEFAULT_MAX_BINARY_SIZE);
        assert_eq!(parse_size(" 2 GiB ").unwrap(), 2 << 30);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
        for bad in [
            "",
            "MiB",
            "0",
            "0MiB",
            "1.5MiB",
            "-1",
            "1MB",
            "1mib",
            "99999999999TiB",
            "1 MiB x",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deserializes_config() {
        let c: UnixAttestorConfig = toml::from_str("").unwrap();
        assert_eq!(c, UnixAttestorConfig::default());
        assert_eq!(c.max_binary_size, 256 << 20);
        let c: UnixAttestorConfig = toml::from_str("max_binary_size = 1000").unwrap();
        assert_eq!(c.max_binary_size, 1000);
        let c: UnixAttestorConfig = toml::from_str("max_binary_size = \"64MiB\"").unwrap();
        assert_eq!(c.max_binary_size, 64 << 20);
        for bad in [
            "max_binary_size = 0",
            "max_binary_size = -5",
            "max_binary_size = \"lots\"",
            "max_binary_size = 1.5",
            "other = 1",
        ] {
            assert!(toml::from_str::<UnixAttestorConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deserializes_network_fs_hash() {
        let c: UnixAttestorConfig = toml::from_str("").unwrap();
        assert_eq!(c.network_fs_hash, NetworkFsHash::Omit);
        let c: UnixAttestorConfig = toml::from_str("network_fs_hash = \"omit\"").unwrap();
        assert_eq!(c.network_fs_hash, NetworkFsHash::Omit);
        let c: UnixAttestorConfig =
            toml::from_str("network_fs_hash = \"allow\"\nmax_binary_size = 10").unwrap();
        assert_eq!(c.network_fs_hash, NetworkFsHash::Allow);
        assert_eq!(c.max_binary_size, 10);
        for bad in [
            "network_fs_hash = \"Allow\"",
            "network_fs_hash = \"deny\"",
            "network_fs_hash = \"\"",
            "network_fs_hash = true",
            "network_fs_hash = 1",
        ] {
            assert!(toml::from_str::<UnixAttestorConfig>(bad).is_err(), "{bad}");
        }
    }
}
