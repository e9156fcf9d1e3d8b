//! The agent's configuration file (`[agent]`, `[[plugins.workload_attestor]]` and
//! `[[plugins.node_attestor]]`),
//! parsed once into typed values before the runtime starts. Every field documents its
//! default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::config::{
    ConfigDuration, ConfigError, LogFormat, LogLevel, load_toml, parse_toml,
};
use tessera_plugin_unix::UnixAttestorConfig;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    agent: RawAgent,
    #[serde(default)]
    plugins: RawPlugins,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    trust_domain: String,
    server_address: ServerAddresses,
    #[serde(default = "default_socket")]
    socket_path: PathBuf,
    data_dir: PathBuf,
    trust_bundle_path: Option<PathBuf>,
    join_token: Option<String>,
    #[serde(default = "default_proc_root")]
    proc_root: PathBuf,
    attestation_timeout: Option<ConfigDuration>,
    #[serde(default = "default_max_connections_per_uid")]
    max_connections_per_uid: usize,
    #[serde(default = "default_max_requests_per_second_per_uid")]
    max_requests_per_second_per_uid: u32,
    #[serde(default = "default_max_request_burst_per_uid")]
    max_request_burst_per_uid: u32,
    audit_log_path: Option<PathBuf>,
    #[serde(default = "default_max_instance_identities")]
    max_instance_identities: usize,
    #[serde(default)]
    log_level: LogLevel,
    #[serde(default)]
    log_format: LogFormat,
}

/// `server_address` as written: one string or a list of strings.
#[derive(Debug)]
struct ServerAddresses(Vec<String>);

impl<'de> Deserialize<'de> for ServerAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ServerAddresses;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a \"host:port\" string or a list of them")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(ServerAddresses(vec![value.to_owned()]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(address) = seq.next_element::<String>()? {
                    out.push(address);
                }
                Ok(ServerAddresses(out))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Checks the `server_address` list: at least one entry, each `host:port` with a host
/// and a port number and no whitespace, none twice.
fn check_server_addresses(addresses: &[String]) -> Result<(), String> {
    if addresses.is_empty() {
        return Err("lists no server: give \"host:port\" or a list of them".to_owned());
    }
    for (index, address) in addresses.iter().enumerate() {
        let which = if addresses.len() == 1 {
            String::new()
        } else {
            format!("entry {index}: ")
        };
        if address.trim().is_empty() {
            return Err(format!("{which}is empty: must be host:port"));
        }
        if address.chars().any(char::is_whitespace) {
            return Err(format!(
                "{which}`{}` contains whitespace: must be host:port",
                address.escape_debug()
            ));
        }
        let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok {
            return Err(format!(
                "{which}`{}` is not host:port (a host name or IP address, `[...]` for IPv6, and a port)",
                address.escape_debug()
            ));
        }
        if addresses[..index].contains(address) {
            return Err(format!(
                "{which}`{}` is listed twice",
                address.escape_debug()
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    #[serde(default)]
    workload_attestor: Vec<RawPlugin>,
    #[serde(default)]
    node_attestor: Vec<RawPlugin>,
}

/// `[plugins.node_attestor.data]` of the `x509pop` node attestor
/// (`docs/plugin_agent_nodeattestor_x509pop.md`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopAgentConfig {
    /// `certificate_path` (required): PEM chain, the node's certificate first, then any
    /// intermediates. Read at each attestation.
    pub certificate_path: PathBuf,
    /// `private_key_path` (required): the certificate's key, one unencrypted PKCS#8 PEM
    /// block, mode 0600 or 0400, owned by the agent's user. Read at each attestation.
    pub private_key_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    #[serde(default)]
    data: Option<toml::Table>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/tessera/agent.sock")
}

fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}

fn default_max_connections_per_uid() -> usize {
    crate::limits::DEFAULT_MAX_CONNECTIONS_PER_UID
}

fn default_max_requests_per_second_per_uid() -> u32 {
    crate::limits::DEFAULT_MAX_REQUESTS_PER_SECOND_PER_UID
}

fn default_max_request_burst_per_uid() -> u32 {
    crate::limits::DEFAULT_MAX_REQUEST_BURST_PER_UID
}

fn default_max_instance_identities() -> usize {
    crate::instances::DEFAULT_MAX_INSTANCE_IDENTITIES
}

/// Default `attestation_timeout`: all workload attestors together must finish in 5 s.
pub const DEFAULT_ATTESTATION_TIMEOUT: Duration = Duration::from_secs(5);

/// A configured workload attestor.
#[derive(Debug, Clone)]
pub enum WorkloadAttestorConfig {
    /// The `unix` attestor.
    Unix(UnixAttestorConfig),
    /// The `systemd` attestor.
    Systemd(tessera_plugin_systemd::SystemdAttestorConfig),
    /// The `cgroup` attestor.
    Cgroup(tessera_plugin_cgroup::CgroupAttestorConfig),
    /// The `container` attestor.
    Container(tessera_plugin_container::ContainerAttestorConfig),
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `trust_domain` (required).
    pub trust_domain: TrustDomain,
    /// `server_address` (required, no default): the node API of the server, `host:port`,
    /// or a list of them for failover (`["10.0.0.1:8081", "10.0.0.2:8081"]`: servers of
    /// this trust domain sharing one datastore). Not empty, no blank entry, no address
    /// twice. Every node API call (attestation, agent SVID renewal, the `Sync` stream,
    /// signing) goes to the server in use; when it cannot be reached or answers
    /// `Unavailable`, the next one is tried, round robin, and after a full round the
    /// call's usual backoff applies. The agent stays on a server that answers; an
    /// answer such as `PermissionDenied` (banned, evicted) is final, not a reason to
    /// switch. Every server must present `spiffe://<trust_domain>/tessera/server`
    /// chained to the bundle. In the order written; the first is tried first.
    pub server_addresses: Vec<String>,
    /// `socket_path` (default `/run/tessera/agent.sock`): the Workload API socket. Its
    /// directory is created 0755 by the agent (or must be owned by root or the agent and
    /// not writable by others); the socket is 0777 since attestation, not the file mode,
    /// decides who gets what.
    pub socket_path: PathBuf,
    /// `data_dir` (required): agent key and SVID, last bundle received. Created 0700.
    pub data_dir: PathBuf,
    /// `trust_bundle_path` (no default): PEM CA certificates used only for the first
    /// contact with the server; afterwards the agent keeps the bundle the server sends.
    pub trust_bundle_path: Option<PathBuf>,
    /// `join_token` (no default): join token for the first attestation; the
    /// `--join-token` flag overrides it. Not needed once the agent holds a valid SVID.
    pub join_token: Option<String>,
    /// `proc_root` (default `/proc`): where procfs is mounted. Must be a procfs
    /// (`statfs` magic `PROC_SUPER_MAGIC`) whose root is owned by root, else the
    /// configuration is rejected: a plain directory would let anyone write the
    /// `/proc/<pid>/status` the agent trusts.
    pub proc_root: PathBuf,
    /// `max_connections_per_uid` (default 64, 0 = no limit): concurrent Workload API
    /// connections per caller uid; further connections are closed at accept, before any
    /// `/proc` access.
    pub max_connections_per_uid: usize,
    /// `max_requests_per_second_per_uid` (default 100, 0 = no limit): Workload API calls
    /// per second per caller uid (token bucket); over it, calls get `ResourceExhausted`.
    pub max_requests_per_second_per_uid: u32,
    /// `max_request_burst_per_uid` (default 200): calls a uid may make at once before the
    /// per-second rate applies (the bucket size). At least 1.
    pub max_request_burst_per_uid: u32,
    /// `attestation_timeout` (default `5s`): deadline for all workload attestors of
    /// one call.
    pub attestation_timeout: Duration,
    /// `audit_log_path` (no default: no audit log): the agent's audit log, JSON lines
    /// (see `docs/audit-log.md`): every workload attestation, every identity served,
    /// every refusal, templated identities dropped, start and stop. Created 0600 (its
    /// directory must exist); an existing file must be a regular file of the agent's uid
    /// with no group or other permission. Opened before the agent serves anything; if it
    /// cannot be opened the agent does not start.
    pub audit_log_path: Option<PathBuf>,
    /// `max_instance_identities` (default 10000): most templated identities (entries
    /// whose SPIFFE ID holds `{instance}`, `{uid}` or `{systemd_unit}`) held at once, and
    /// most caller processes holding them. A caller that would need one more gets
    /// `ResourceExhausted` until others exit. 0 refuses every templated identity.
    pub max_instance_identities: usize,
    /// `log_level` (default `info`).
    pub log_level: LogLevel,
    /// `log_format` (default `text`).
    pub log_format: LogFormat,
    /// `[[plugins.workload_attestor]]` (default: `unix` with its defaults).
    pub workload_attestors: Vec<WorkloadAttestorConfig>,
    /// `[[plugins.node_attestor]] name = "x509pop"` (default: none): attest with a node
    /// certificate when the agent holds no valid SVID and no join token is given.
    pub x509pop: Option<X509PopAgentConfig>,
}

impl AgentConfig {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(load_toml(path)?, path)
    }

    /// Parses configuration text (`path` only names the source in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::from_file(parse_toml(text, path)?, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self, ConfigError> {
        let raw = file.agent;
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|err| ConfigError::invalid(path, "agent.trust_domain", err))?;
        let server_addresses = raw.server_address.0;
        check_server_addresses(&server_addresses)
            .map_err(|reason| ConfigError::invalid(path, "agent.server_address", reason))?;
        if let Err(err) = crate::peer::ProcRoot::open(&raw.proc_root) {
            return Err(ConfigError::invalid(path, "agent.proc_root", err));
        }
        if raw.max_request_burst_per_uid == 0 {
            return Err(ConfigError::invalid(
                path,
                "agent.max_request_burst_per_uid",
                "must be at least 1",
            ));
        }
        let mut workload_attestors = Vec::new();
        for (index, plugin) in file.plugins.workload_attestor.into_iter().enumerate() {
            let key = format!("plugins.workload_attestor[{index}]");
            let data = plugin.data.unwrap_or_default();
            let data_key = format!("{key}.data");
            let attestor = match plugin.name.as_str() {
                "unix" => WorkloadAttestorConfig::Unix(plugin_data(data, path, &data_key)?),
                "systemd" => WorkloadAttestorConfig::Systemd(plugin_data(data, path, &data_key)?),
                "cgroup" => WorkloadAttestorConfig::Cgroup(plugin_data(data, path, &data_key)?),
                "container" => {
                    WorkloadAttestorConfig::Container(plugin_data(data, path, &data_key)?)
                }
                other => {
                    return Err(ConfigError::invalid(
                        path,
                        &format!("{key}.name"),
                        format!(
                            "unknown workload attestor `{other}` \
                             (available: unix, systemd, cgroup, container)"
                        ),
                    ));
                }
            };
            workload_attestors.push(attestor);
        }
        let mut x509pop = None;
        for (index, plugin) in file.plugins.node_attestor.into_iter().enumerate() {
            let key = format!("plugins.node_attestor[{index}]");
            let data = plugin.data.unwrap_or_default();
            let data_key = format!("{key}.data");
            match plugin.name.as_str() {
                "x509pop" if x509pop.is_none() => {
                    x509pop = Some(plugin_data(data, path, &data_key)?);
                }
                "x509pop" => {
                    return Err(ConfigError::invalid(
                        path,
                        &format!("{key}.name"),
                        "x509pop is configured twice",
                    ));
                }
                other => {
                    return Err(ConfigError::invalid(
                        path,
                        &format!("{key}.name"),
                        format!(
                            "unknown node attestor `{}` (available: x509pop; join tokens \
                             are given with join_token)",
                            other.escape_debug()
                        ),
                    ));
                }
            }
        }
        if workload_attestors.is_empty() {
            workload_attestors.push(WorkloadAttestorConfig::Unix(UnixAttestorConfig::default()));
        }
        Ok(Self {
            trust_domain,
            server_addresses,
            socket_path: raw.socket_path,
            data_dir: raw.data_dir,
            trust_bundle_path: raw.trust_bundle_path,
            join_token: raw.join_token,
            proc_root: raw.proc_root,
            max_connections_per_uid: raw.max_connections_per_uid,
            max_requests_per_second_per_uid: raw.max_requests_per_second_per_uid,
            max_request_burst_per_uid: raw.max_request_burst_per_uid,
            attestation_timeout: raw
                .attestation_timeout
                .map_or(DEFAULT_ATTESTATION_TIMEOUT, |d| d.0),
            audit_log_path: raw.audit_log_path,
            max_instance_identities: raw.max_instance_identities,
            log_level: raw.log_level,
            log_format: raw.log_format,
            workload_attestors,
            x509pop,
        })
    }
}

/// Parses a plugin's `data` table into its config type; errors name `key`.
fn plugin_data<T: serde::de::DeserializeOwned>(
    data: toml::Table,
    path: &Path,
    key: &str,
) -> Result<T, ConfigError> {
    toml::Value::Table(data)
        .try_into()
        .map_err(|err: toml::de::Error| {
            ConfigError::invalid(path, key, err.message().replace('\n', " "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:8081\"\ndata_dir = \"/tmp/a\"\n";

    #[test]
    fn x509pop_node_attestor() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.x509pop, None);
        let text = format!(
            "{MINIMAL}[[plugins.node_attestor]]\nname = \"x509pop\"\n\
             [plugins.node_attestor.data]\ncertificate_path = \"/c.pem\"\n\
             private_key_path = \"/k.pem\"\n"
        );
        let c = AgentConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(
            c.x509pop,
            Some(X509PopAgentConfig {
                certificate_path: PathBuf::from("/c.pem"),
                private_key_path: PathBuf::from("/k.pem"),
            })
        );
        let err = AgentConfig::parse(
            &format!("{MINIMAL}[[plugins.node_attestor]]\nname = \"x509pop\"\n"),
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("plugins.node_attestor[0].data"), "{err}");
        let err = AgentConfig::parse(
            &format!("{MINIMAL}[[plugins.node_attestor]]\nname = \"tpm\"\n"),
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown node attestor `tpm`"), "{err}");
    }

    /// `MINIMAL` with `server_address = <value>` instead of its own.
    fn with_servers(value: &str) -> String {
        MINIMAL.replace(
            "server_address = \"127.0.0.1:8081\"",
            &format!("server_address = {value}"),
        )
    }

    #[test]
    fn server_address_is_one_string_or_a_list() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.server_addresses, ["127.0.0.1:8081"]);
        let c = AgentConfig::parse(
            &with_servers(
                "[\"10.0.0.1:8081\", \"tessera-b.example.internal:8081\", \"[::1]:8081\"]",
            ),
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            c.server_addresses,
            [
                "10.0.0.1:8081",
                "tessera-b.example.internal:8081",
                "[::1]:8081"
            ],
            "in the order written"
        );
        let c =
            AgentConfig::parse(&with_servers("[\"10.0.0.1:8081\"]"), Path::new("a.toml")).unwrap();
        assert_eq!(c.server_addresses, ["10.0.0.1:8081"]);
        // Every refusal names the key.
        for (value, why) in [
            ("[]", "lists no server"),
            ("\"\"", "is empty"),
            ("\"  \"", "is empty"),
            ("[\"10.0.0.1:8081\", \"\"]", "entry 1: is empty"),
            (
                "[\"10.0.0.1:8081\", \" 10.0.0.2:8081\"]",
                "entry 1: ` 10.0.0.2:8081` contains whitespace",
            ),
            (
                "[\"10.0.0.1:8081\", \"10.0.0.1:8081\"]",
                "entry 1: `10.0.0.1:8081` is listed twice",
            ),
            ("\"10.0.0.1\"", "is not host:port"),
            ("\":8081\"", "is not host:port"),
            ("\"10.0.0.1:0\"", "is not host:port"),
            (
                "[\"a:1\", \"b:99999\"]",
                "entry 1: `b:99999` is not host:port",
            ),
        ] {
            let err = AgentConfig::parse(&with_servers(value), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("agent.server_address"), "{value}: {err}");
            assert!(err.contains(why), "{value}: {err}");
        }
        // Not a string or a list of strings: a type error at the key's line.
        for value in ["8081", "[8081]", "{ host = \"a\" }"] {
            let err = AgentConfig::parse(&with_servers(value), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("line 3"), "{value}: {err}");
        }
        let missing = MINIMAL.replace("server_address = \"127.0.0.1:8081\"\n", "");
        let err = AgentConfig::parse(&missing, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server_address"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/run/tessera/agent.sock"));
        assert_eq!(c.workload_attestors.len(), 1);
        assert_eq!(c.attestation_timeout, DEFAULT_ATTESTATION_TIMEOUT);
        assert_eq!(c.audit_log_path, None);
        assert_eq!(c.max_instance_identities, 10_000);
        let text = format!(
            "{MINIMAL}audit_log_path = \"/var/log/tessera/agent-audit.jsonl\"\nmax_instance_identities = 5\n"
        );
        let c = AgentConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(
            c.audit_log_path,
            Some(PathBuf::from("/var/log/tessera/agent-audit.jsonl"))
        );
        assert_eq!(c.max_instance_identities, 5);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = AgentConfig::parse(&format!("{MINIMAL}insecure = true\n"), Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("insecure") && err.contains("line 5"), "{err}");
        let text = format!("{MINIMAL}[[plugins.workload_attestor]]\nname = \"k8s\"\n");
        let err = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plugins.workload_attestor[0].name"), "{err}");
    }

    #[test]
    fn limits_have_defaults_and_can_be_set() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.proc_root, PathBuf::from("/proc"));
        assert_eq!(c.max_connections_per_uid, 64);
        assert_eq!(c.max_requests_per_second_per_uid, 100);
        assert_eq!(c.max_request_burst_per_uid, 200);
        let text = format!(
            "{MINIMAL}max_connections_per_uid = 3\nmax_requests_per_second_per_uid = 0\nmax_request_burst_per_uid = 1\n"
        );
        let c = AgentConfig::parse(&text, Path::new("a.toml")).unwrap();
        assert_eq!(
            (
                c.max_connections_per_uid,
                c.max_requests_per_second_per_uid,
                c.max_request_burst_per_uid
            ),
            (3, 0, 1)
        );
        let err = AgentConfig::parse(
            &format!("{MINIMAL}max_request_burst_per_uid = 0\n"),
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent.max_request_burst_per_uid"), "{err}");
    }

    #[test]
    fn proc_root_must_be_procfs_owned_by_root() {
        let fake = tempfile::tempdir().unwrap();
        for bad in [
            fake.path(),
            Path::new("/nonexistent"),
            Path::new("/proc/self"),
        ] {
            let text = format!("{MINIMAL}proc_root = \"{}\"\n", bad.display());
            let err = AgentConfig::parse(&text, Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("agent.proc_root"), "{err}");
        }
        let text = format!("{MINIMAL}proc_root = \"{}\"\n", fake.path().display());
        let err = AgentConfig::parse(&text, Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a procfs mount"), "{err}");
    }
}
