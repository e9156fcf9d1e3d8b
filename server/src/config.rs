//! The server's configuration file (`[server]` and `[server.datastore]`), parsed once
//! into typed values before the runtime starts. Every field documents its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::config::{ConfigDuration, ConfigError, LogFormat, LogLevel, load_toml};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: RawServer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    trust_domain: String,
    #[serde(default = "default_bind")]
    bind_address: String,
    data_dir: PathBuf,
    #[serde(default = "default_admin_socket")]
    admin_socket_path: PathBuf,
    #[serde(default)]
    admin_uids: Vec<u32>,
    ca_ttl: Option<ConfigDuration>,
    default_x509_svid_ttl: Option<ConfigDuration>,
    default_jwt_svid_ttl: Option<ConfigDuration>,
    max_jwt_svid_ttl: Option<ConfigDuration>,
    agent_svid_ttl: Option<ConfigDuration>,
    join_token_ttl: Option<ConfigDuration>,
    audit_log_path: Option<PathBuf>,
    #[serde(default)]
    log_level: LogLevel,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default)]
    datastore: RawDatastore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatastore {
    #[serde(default)]
    kind: DatastoreKind,
}

/// Which datastore holds entries, agents, tokens and bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// SQLite file `datastore.sqlite3` in `data_dir` (the default).
    #[default]
    Sqlite,
}

fn default_bind() -> String {
    "0.0.0.0:8081".into()
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/tessera-server/admin.sock")
}

/// Default `ca_ttl`: one year, until CA rotation exists.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default `default_x509_svid_ttl`: one hour.
pub const DEFAULT_X509_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default `default_jwt_svid_ttl`: five minutes.
pub const DEFAULT_JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// Default `max_jwt_svid_ttl`: one hour.
pub const DEFAULT_MAX_JWT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default `agent_svid_ttl`: one hour.
pub const DEFAULT_AGENT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Default `join_token_ttl`: ten minutes.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `trust_domain` (required): the trust domain this server signs for.
    pub trust_domain: TrustDomain,
    /// `bind_address` (default `0.0.0.0:8081`): TCP address of the node API. Port 0
    /// picks a free port (tests).
    pub bind_address: SocketAddr,
    /// `data_dir` (required): CA key and certificate, SQLite database. Created 0700.
    pub data_dir: PathBuf,
    /// `admin_socket_path` (default `/run/tessera-server/admin.sock`): the admin API
    /// socket; its directory is created 0700 and must not be shared.
    pub admin_socket_path: PathBuf,
    /// `admin_uids` (default empty): uids besides root and the server's own uid that
    /// may use the admin API.
    pub admin_uids: Vec<u32>,
    /// `ca_ttl` (default `8760h`): lifetime of the self-signed CA created on first start.
    pub ca_ttl: Duration,
    /// `default_x509_svid_ttl` (default `1h`): X.509-SVID lifetime for entries without
    /// their own.
    pub default_x509_svid_ttl: Duration,
    /// `default_jwt_svid_ttl` (default `5m`): JWT-SVID lifetime for entries without
    /// their own.
    pub default_jwt_svid_ttl: Duration,
    /// `max_jwt_svid_ttl` (default `1h`): no JWT-SVID lives longer, whatever its entry
    /// says; also how long a replaced JWT key stays in the bundle.
    pub max_jwt_svid_ttl: Duration,
    /// `agent_svid_ttl` (default `1h`): lifetime of agent SVIDs.
    pub agent_svid_ttl: Duration,
    /// `join_token_ttl` (default `10m`): lifetime of join tokens without `--ttl`.
    pub join_token_ttl: Duration,
    /// `audit_log_path` (default: none, no audit log): the server's audit log, JSON
    /// lines (`tessera-audit`): every admin call, signing, node attestation, renewal,
    /// refusal of an agent, ban, eviction and revocation. Opened (created 0600, its
    /// directory must exist) before the server serves; `run` fails if it cannot be.
    /// Separate from the operational log.
    pub audit_log_path: Option<PathBuf>,
    /// `log_level` (default `info`).
    pub log_level: LogLevel,
    /// `log_format` (default `text`).
    pub log_format: LogFormat,
    /// `[server.datastore] kind` (default `sqlite`).
    pub datastore: DatastoreKind,
}

impl ServerConfig {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: File = load_toml(path)?;
        Self::from_raw(file.server, path)
    }

    /// Parses configuration text (`path` only names the source in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: File = tessera_plugin_sdk::config::parse_toml(text, path)?;
        Self::from_raw(file.server, path)
    }

    fn from_raw(raw: RawServer, path: &Path) -> Result<Self, ConfigError> {
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|err| ConfigError::invalid(path, "server.trust_domain", err))?;
        let bind_address = raw.bind_address.parse().map_err(|err| {
            ConfigError::invalid(
                path,
                "server.bind_address",
                format!("`{}`: {err}", raw.bind_address),
            )
        })?;
        if !raw.admin_socket_path.is_absolute() && raw.admin_socket_path.parent().is_none() {
            return Err(ConfigError::invalid(
                path,
                "server.admin_socket_path",
                "must name a file",
            ));
        }
        let config = Self {
            trust_domain,
            bind_address,
            data_dir: raw.data_dir,
            admin_socket_path: raw.admin_socket_path,
            admin_uids: raw.admin_uids,
            ca_ttl: raw.ca_ttl.map_or(DEFAULT_CA_TTL, |d| d.0),
            default_x509_svid_ttl: raw
                .default_x509_svid_ttl
                .map_or(DEFAULT_X509_SVID_TTL, |d| d.0),
            default_jwt_svid_ttl: raw
                .default_jwt_svid_ttl
                .map_or(DEFAULT_JWT_SVID_TTL, |d| d.0),
            max_jwt_svid_ttl: raw
                .max_jwt_svid_ttl
                .map_or(DEFAULT_MAX_JWT_SVID_TTL, |d| d.0),
            agent_svid_ttl: raw.agent_svid_ttl.map_or(DEFAULT_AGENT_SVID_TTL, |d| d.0),
            join_token_ttl: raw.join_token_ttl.map_or(DEFAULT_JOIN_TOKEN_TTL, |d| d.0),
            audit_log_path: raw.audit_log_path,
            log_level: raw.log_level,
            log_format: raw.log_format,
            datastore: raw.datastore.kind,
        };
        if config
            .audit_log_path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty() || p.ends_with(".."))
        {
            return Err(ConfigError::invalid(
                path,
                "server.audit_log_path",
                "must name a file",
            ));
        }
        if config.default_x509_svid_ttl >= config.ca_ttl {
            return Err(ConfigError::invalid(
                path,
                "server.default_x509_svid_ttl",
                "must be shorter than ca_ttl",
            ));
        }
        if config.default_jwt_svid_ttl > config.max_jwt_svid_ttl {
            return Err(ConfigError::invalid(
                path,
                "server.default_jwt_svid_ttl",
                "must not exceed max_jwt_svid_ttl",
            ));
        }
        if config.agent_svid_ttl >= config.ca_ttl {
            return Err(ConfigError::invalid(
                path,
                "server.agent_svid_ttl",
                "must be shorter than ca_ttl",
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[server]\ntrust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";

    #[test]
    fn defaults_apply() {
        let c = ServerConfig::parse(MINIMAL, Path::new("s.toml")).unwrap();
        assert_eq!(c.bind_address.port(), 8081);
        assert_eq!(c.ca_ttl, DEFAULT_CA_TTL);
        assert_eq!(c.datastore, DatastoreKind::Sqlite);
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = ServerConfig::parse(&format!("{MINIMAL}bogus_key = 1\n"), Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus_key") && err.contains("line 4"), "{err}");
    }

    #[test]
    fn bad_trust_domain_names_the_key() {
        let text = MINIMAL.replace("example.org", "Example.org");
        let err = ServerConfig::parse(&text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.trust_domain"), "{err}");
    }

    #[test]
    fn audit_log_path_is_optional() {
        let c = ServerConfig::parse(MINIMAL, Path::new("s.toml")).unwrap();
        assert_eq!(c.audit_log_path, None);
        let text = format!("{MINIMAL}audit_log_path = \"/var/log/tessera/server-audit.jsonl\"\n");
        let c = ServerConfig::parse(&text, Path::new("s.toml")).unwrap();
        assert_eq!(
            c.audit_log_path.as_deref(),
            Some(Path::new("/var/log/tessera/server-audit.jsonl"))
        );
        let text = format!("{MINIMAL}audit_log_path = \"\"\n");
        let err = ServerConfig::parse(&text, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.audit_log_path"), "{err}");
    }

    #[test]
    fn unknown_datastore_kind_is_refused() {
        let text = format!("{MINIMAL}[server.datastore]\nkind = \"oracle\"\n");
        assert!(ServerConfig::parse(&text, Path::new("s.toml")).is_err());
    }
}
