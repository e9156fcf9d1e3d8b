//! The configuration of the systemd attestor ([`SystemdAttestorConfig`]).

use std::path::PathBuf;

/// Default for [`SystemdAttestorConfig::cgroupfs_root`].
pub const DEFAULT_CGROUPFS_ROOT: &str = "/sys/fs/cgroup";

/// Configuration of the systemd workload attestor.
///
/// | key | type | default | meaning |
/// |---|---|---|---|
/// | `cgroupfs_root` | path | `"/sys/fs/cgroup"` | Where the cgroup filesystem is mounted: a cgroup2 mount, or (hybrid hosts) a directory with the cgroup2 mount at `unified` and the `name=systemd` hierarchy at `systemd`. Used only to read invocation IDs. |
/// | `require_invocation_id` | bool | `false` | Fail attestation of a process in a unit whose invocation ID cannot be read, instead of leaving out the `invocation_id` selector. |
///
/// Unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SystemdAttestorConfig {
    /// Mount point of the cgroup filesystem. Default [`DEFAULT_CGROUPFS_ROOT`].
    pub cgroupfs_root: PathBuf,
    /// Whether a unit without a readable invocation ID fails attestation. Default false.
    pub require_invocation_id: bool,
}

impl Default for SystemdAttestorConfig {
    fn default() -> Self {
        Self {
            cgroupfs_root: PathBuf::from(DEFAULT_CGROUPFS_ROOT),
            require_invocation_id: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_config() {
        let c: SystemdAttestorConfig = toml::from_str("").unwrap();
        assert_eq!(c, SystemdAttestorConfig::default());
        assert_eq!(c.cgroupfs_root, PathBuf::from("/sys/fs/cgroup"));
        assert!(!c.require_invocation_id);
        let c: SystemdAttestorConfig = toml::from_str(
            "cgroupfs_root = \"/sys/fs/cgroup/unified\"\nrequire_invocation_id = true",
        )
        .unwrap();
        assert_eq!(c.cgroupfs_root, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(c.require_invocation_id);
        for bad in [
            "cgroupfs_root = 1",
            "require_invocation_id = \"yes\"",
            "other = 1",
        ] {
            assert!(
                toml::from_str::<SystemdAttestorConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
