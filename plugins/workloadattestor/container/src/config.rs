//! The configuration of the container attestor ([`ContainerAttestorConfig`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize as _;
use serde::de::Deserializer;
use tessera_plugin_sdk::config::ConfigDuration;

/// Default for [`ContainerAttestorConfig::runtime_timeout`]: 2 s.
pub const DEFAULT_RUNTIME_TIMEOUT: Duration = Duration::from_secs(2);

/// Configuration of the container workload attestor.
///
/// | key | type | default | meaning |
/// |---|---|---|---|
/// | `runtime_socket` | path (optionally `unix://`-prefixed) | none | Docker-API-compatible socket (docker, or podman's `podman.sock`) asked for the image and name of Docker and Podman containers. Unset: no query, only cgroup-derived selectors. |
/// | `runtime_timeout` | duration | `"2s"` | Deadline for the whole query (connect, request, response); past it attestation fails. |
///
/// Unknown keys are rejected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerAttestorConfig {
    /// The runtime's API socket; `None` (the default) disables the query.
    #[serde(deserialize_with = "deserialize_socket")]
    pub runtime_socket: Option<PathBuf>,
    /// Deadline of one runtime query. Default [`DEFAULT_RUNTIME_TIMEOUT`].
    #[serde(deserialize_with = "deserialize_duration")]
    pub runtime_timeout: Duration,
}

impl Default for ContainerAttestorConfig {
    fn default() -> Self {
        Self {
            runtime_socket: None,
            runtime_timeout: DEFAULT_RUNTIME_TIMEOUT,
        }
    }
}

fn deserialize_socket<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let text = String::deserialize(d)?;
    let path = PathBuf::from(text.strip_prefix("unix://").unwrap_or(&text));
    if !path.is_absolute() {
        return Err(serde::de::Error::custom(
            "runtime_socket must be an absolute path (e.g. /run/docker.sock)",
        ));
    }
    Ok(Some(path))
}

fn deserialize_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    ConfigDuration::deserialize(d).map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deserializes_config() {
        let c: ContainerAttestorConfig = toml::from_str("").unwrap();
        assert_eq!(c, ContainerAttestorConfig::default());
        assert_eq!(c.runtime_socket, None);
        assert_eq!(c.runtime_timeout, Duration::from_secs(2));
        let c: ContainerAttestorConfig =
            toml::from_str("runtime_socket = \"/run/docker.sock\"\nruntime_timeout = \"500ms\"")
                .unwrap();
        assert_eq!(c.runtime_socket, Some(PathBuf::from("/run/docker.sock")));
        assert_eq!(c.runtime_timeout, Duration::from_millis(500));
        let c: ContainerAttestorConfig =
            toml::from_str("runtime_socket = \"unix:///run/podman/podman.sock\"").unwrap();
        assert_eq!(
            c.runtime_socket,
            Some(PathBuf::from("/run/podman/podman.sock"))
        );
        for bad in [
            "runtime_socket = \"docker.sock\"",
            "runtime_socket = \"unix://docker.sock\"",
            "runtime_socket = 1",
            "runtime_timeout = \"0s\"",
            "runtime_timeout = 2",
            "runtime_timeout = \"soon\"",
            "other = 1",
        ] {
            assert!(
                toml::from_str::<ContainerAttestorConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
