//! The server's configuration file (`[server]`, `[server.datastore]` and
//! `[[plugins.node_attestor]]`), parsed once into typed values before the runtime starts.
//! Every field documents its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tessera_plugin_keymanager::KeyManagerConfig;
use tessera_plugin_sdk::TrustDomain;
use tessera_plugin_sdk::config::{ConfigDuration, ConfigError, LogFormat, LogLevel, load_toml};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: RawServer,
    #[serde(default)]
    plugins: RawPlugins,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    #[serde(default)]
    node_attestor: Vec<RawPlugin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    name: String,
    #[serde(default)]
    data: Option<toml::Table>,
}

/// `[plugins.node_attestor.data]` of the `x509pop` node attestor
/// (`docs/plugin_server_nodeattestor_x509pop.md`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509PopConfig {
    /// `ca_bundle_path` (required): PEM file of the CAs a node certificate must chain
    /// to (not the tessera trust bundle). Read when the server starts.
    pub ca_bundle_path: PathBuf,
    /// `max_intermediates` (default 4, 0 to 6): most intermediate certificates the agent
    /// may send after its leaf.
    #[serde(default = "default_max_intermediates")]
    pub max_intermediates: usize,
    /// `max_rsa_key_size` (default 8192, 2048 to 8192): largest RSA modulus, in bits,
    /// accepted in any certificate of the chain, including the configured CAs.
    #[serde(default = "default_max_rsa_key_size")]
    pub max_rsa_key_size: usize,
}

fn default_max_intermediates() -> usize {
    tessera_plugin_x509pop::DEFAULT_MAX_INTERMEDIATES
}

fn default_max_rsa_key_size() -> usize {
    tessera_plugin_x509pop::DEFAULT_MAX_RSA_KEY_SIZE
}

/// The node attestors enabled besides `join_token` (always on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAttestorsConfig {
    /// `[[plugins.node_attestor]] name = "x509pop"` (default: not enabled).
    pub x509pop: Option<X509PopConfig>,
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
    jwt_key_ttl: Option<ConfigDuration>,
    #[serde(default)]
    allow_short_key_lifetimes: bool,
    #[serde(default)]
    key_manager: KeyManagerConfig,
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
    upstream_authority: Option<RawUpstreamAuthority>,
    #[serde(default)]
    federation: RawFederation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatastore {
    #[serde(default)]
    kind: DatastoreKind,
    connection_string: Option<String>,
    max_connections: Option<u32>,
}

/// `[server.datastore] kind`: which datastore holds entries, agents, tokens and bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// SQLite file `datastore.sqlite3` in `data_dir` (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database, which several servers of one trust domain may share.
    Postgres,
}

/// Default `[server.datastore] max_connections` (PostgreSQL): ten.
pub const DEFAULT_POSTGRES_MAX_CONNECTIONS: u32 = 10;

/// `[server.datastore]`, validated.
#[derive(Clone, PartialEq, Eq)]
pub enum DatastoreConfig {
    /// `kind = "sqlite"` (the default): the file `<data_dir>/datastore.sqlite3`.
    Sqlite,
    /// `kind = "postgres"`.
    Postgres(PostgresConfig),
}

/// `[server.datastore]` with `kind = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// `connection_string` (required): a libpq-style URL or key=value string, e.g.
    /// `postgres://tessera@db.example.org/tessera?sslmode=verify-full` or
    /// `host=/run/postgresql dbname=tessera`. Never logged: it may hold a password.
    pub connection_string: String,
    /// `max_connections` (default 10, 1 to 1000): size of the connection pool, plus
    /// one connection that listens for the other servers' changes.
    pub max_connections: u32,
}

impl std::fmt::Debug for DatastoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres(pg) => f
                .debug_struct("Postgres")
                .field("connection_string", &"<redacted>")
                .field("max_connections", &pg.max_connections)
                .finish(),
        }
    }
}

impl DatastoreConfig {
    fn from_raw(raw: RawDatastore, path: &Path) -> Result<Self, ConfigError> {
        match raw.kind {
            DatastoreKind::Sqlite => {
                for (key, set) in [
                    ("connection_string", raw.connection_string.is_some()),
                    ("max_connections", raw.max_connections.is_some()),
                ] {
                    if set {
                        return Err(ConfigError::invalid(
                            path,
                            &format!("server.datastore.{key}"),
                            "only applies to kind = \"postgres\"",
                        ));
                    }
                }
                Ok(Self::Sqlite)
            }
            DatastoreKind::Postgres => {
                let connection_string = raw.connection_string.ok_or_else(|| {
                    ConfigError::invalid(
                        path,
                        "server.datastore.connection_string",
                        "is required with kind = \"postgres\"",
                    )
                })?;
                if connection_string.trim().is_empty() {
                    return Err(ConfigError::invalid(
                        path,
                        "server.datastore.connection_string",
                        "must not be empty",
                    ));
                }
                let max_connections = raw
                    .max_connections
                    .unwrap_or(DEFAULT_POSTGRES_MAX_CONNECTIONS);
                if !(1..=1000).contains(&max_connections) {
                    return Err(ConfigError::invalid(
                        path,
                        "server.datastore.max_connections",
                        "must be between 1 and 1000",
                    ));
                }
                Ok(Self::Postgres(PostgresConfig {
                    connection_string,
                    max_connections,
                }))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
enum RawUpstreamAuthority {
    Disk {
        cert_file_path: PathBuf,
        key_file_path: PathBuf,
        bundle_file_path: Option<PathBuf>,
    },
}

/// `[server.upstream_authority]`: who signs the server's CA certificates
/// (`docs/ca.md`). Without it the server's CAs are self-signed roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamAuthorityConfig {
    /// `kind = "disk"`: an existing CA whose certificate and key are files. Each server
    /// CA becomes an intermediate signed by it; the trust bundle then holds the
    /// upstream roots instead of the server CAs, and workloads get the chain up to them.
    Disk {
        /// `cert_file_path` (required): PEM certificate of the upstream CA, optionally
        /// followed by its own intermediates up to (not including) a root.
        cert_file_path: PathBuf,
        /// `key_file_path` (required): PEM private key (PKCS#8, SEC1 or PKCS#1) of the
        /// first certificate of `cert_file_path`. Read at start and at each rotation;
        /// must not be readable by group or others.
        key_file_path: PathBuf,
        /// `bundle_file_path` (default: none, `cert_file_path`'s last certificate must
        /// then be self-signed): PEM roots to publish in the trust bundle when the
        /// upstream CA is itself an intermediate.
        bundle_file_path: Option<PathBuf>,
    },
}

impl UpstreamAuthorityConfig {
    /// Paths must be non-empty; the files themselves are read and checked when the
    /// server starts (`tessera_server::ca::upstream::UpstreamAuthority::load`).
    fn from_raw(raw: RawUpstreamAuthority, path: &Path) -> Result<Self, ConfigError> {
        match raw {
            RawUpstreamAuthority::Disk {
                cert_file_path,
                key_file_path,
                bundle_file_path,
            } => {
                for (key, value) in [
                    ("cert_file_path", Some(&cert_file_path)),
                    ("key_file_path", Some(&key_file_path)),
                    ("bundle_file_path", bundle_file_path.as_ref()),
                ] {
                    if value.is_some_and(|p| p.as_os_str().is_empty()) {
                        return Err(ConfigError::invalid(
                            path,
                            &format!("server.upstream_authority.{key}"),
                            "must not be empty",
                        ));
                    }
                }
                Ok(UpstreamAuthorityConfig::Disk {
                    cert_file_path,
                    key_file_path,
                    bundle_file_path,
                })
            }
        }
    }
}

fn default_bind() -> String {
    "0.0.0.0:8081".into()
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/tessera-server/admin.sock")
}

/// Default `ca_ttl`: one day, as SPIRE. Each CA is published at half its predecessor's
/// life and signs from then on for about half of its own.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default `jwt_key_ttl`: one day.
pub const DEFAULT_JWT_KEY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest `ca_ttl` and `jwt_key_ttl` accepted: one hour.
pub const MIN_KEY_TTL: Duration = Duration::from_secs(3600);
/// Shortest `ca_ttl` and `jwt_key_ttl` accepted with `allow_short_key_lifetimes = true`
/// (tests): six seconds, so that a sixth of it is still a whole second.
pub const MIN_SHORT_KEY_TTL: Duration = Duration::from_secs(6);
/// Longest `ca_ttl` and `jwt_key_ttl` accepted: ten years.
pub const MAX_KEY_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
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
    /// `ca_ttl` (default `24h`, at least `1h`): lifetime of each X.509 CA. The next CA
    /// is prepared and published when less than half of the active one's life remains
    /// and signs from when less than a sixth remains (`docs/ca.md`).
    pub ca_ttl: Duration,
    /// `jwt_key_ttl` (default `24h`, at least `1h`): lifetime of each JWT signing key,
    /// rotated on the same schedule as the CA.
    pub jwt_key_ttl: Duration,
    /// `allow_short_key_lifetimes` (default `false`): accept `ca_ttl` and `jwt_key_ttl`
    /// down to six seconds. For tests only: agents and workloads then renew constantly.
    pub allow_short_key_lifetimes: bool,
    /// `[server.key_manager]` (default `kind = "disk"`, directory `<data_dir>/keys`):
    /// where the CA and JWT private keys are generated and kept.
    pub key_manager: KeyManagerConfig,
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
    /// `[server.datastore]` (default `kind = "sqlite"`).
    pub datastore: DatastoreConfig,
    /// `[server.upstream_authority]` (default: none, the server's CAs are self-signed).
    pub upstream_authority: Option<UpstreamAuthorityConfig>,
    /// `[server.federation]`: the bundle endpoint and the polling of federated ones.
    pub federation: FederationConfig,
    /// `[[plugins.node_attestor]]` (default: none; `join_token` attestation is always
    /// available).
    pub node_attestors: NodeAttestorsConfig,
}

impl ServerConfig {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: File = load_toml(path)?;
        Self::from_file(file, path)
    }

    /// Parses configuration text (`path` only names the source in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: File = tessera_plugin_sdk::config::parse_toml(text, path)?;
        Self::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::from_raw(file.server, path)?;
        for (index, plugin) in file.plugins.node_attestor.into_iter().enumerate() {
            let key = format!("plugins.node_attestor[{index}]");
            let data = plugin.data.unwrap_or_default();
            let data_key = format!("{key}.data");
            match plugin.name.as_str() {
                "x509pop" => {
                    if config.node_attestors.x509pop.is_some() {
                        return Err(ConfigError::invalid(
                            path,
                            &format!("{key}.name"),
                            "x509pop is configured twice",
                        ));
                    }
                    let x509pop: X509PopConfig =
                        toml::Value::Table(data)
                            .try_into()
                            .map_err(|err: toml::de::Error| {
                                ConfigError::invalid(
                                    path,
                                    &data_key,
                                    err.message().replace('\n', " "),
                                )
                            })?;
                    if x509pop.max_intermediates > 6 {
                        return Err(ConfigError::invalid(
                            path,
                            &format!("{data_key}.max_intermediates"),
                            "must be at most 6",
                        ));
                    }
                    if !(2048..=8192).contains(&x509pop.max_rsa_key_size) {
                        return Err(ConfigError::invalid(
                            path,
                            &format!("{data_key}.max_rsa_key_size"),
                            "must be between 2048 and 8192 bits",
                        ));
                    }
                    config.node_attestors.x509pop = Some(x509pop);
                }
                other => {
                    return Err(ConfigError::invalid(
                        path,
                        &format!("{key}.name"),
                        format!(
                            "unknown node attestor `{}` (available: x509pop; join_token is always on)",
                            other.escape_debug()
                        ),
                    ));
                }
            }
        }
        Ok(config)
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
            jwt_key_ttl: raw.jwt_key_ttl.map_or(DEFAULT_JWT_KEY_TTL, |d| d.0),
            allow_short_key_lifetimes: raw.allow_short_key_lifetimes,
            key_manager: raw.key_manager,
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
            datastore: DatastoreConfig::from_raw(raw.datastore, path)?,
            upstream_authority: raw
                .upstream_authority
                .map(|raw| UpstreamAuthorityConfig::from_raw(raw, path))
                .transpose()?,
            federation: FederationConfig::from_raw(raw.federation, path)?,
            node_attestors: NodeAttestorsConfig::default(),
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
        let floor = if config.allow_short_key_lifetimes {
            MIN_SHORT_KEY_TTL
        } else {
            MIN_KEY_TTL
        };
        for (key, ttl) in [
            ("server.ca_ttl", config.ca_ttl),
            ("server.jwt_key_ttl", config.jwt_key_ttl),
        ] {
            if ttl < floor {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    format!(
                        "must be at least {} (shorter lifetimes need \
                         allow_short_key_lifetimes = true, for tests only)",
                        humantime::format_duration(floor)
                    ),
                ));
            }
            if ttl > MAX_KEY_TTL {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    "must be at most 87600h (10 years)",
                ));
            }
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    bind_address: Option<String>,
    profile: Option<String>,
    certificate_path: Option<PathBuf>,
    key_path: Option<PathBuf>,
    refresh_hint: Option<ConfigDuration>,
    min_refresh_interval: Option<ConfigDuration>,
    max_refresh_interval: Option<ConfigDuration>,
    web_trust_roots_path: Option<PathBuf>,
}

/// Default `[server.federation] refresh_hint`: five minutes.
pub const DEFAULT_FEDERATION_REFRESH_HINT: Duration = Duration::from_secs(300);
/// Default `[server.federation] min_refresh_interval`: ten seconds.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// Default `[server.federation] max_refresh_interval`: one hour.
pub const DEFAULT_MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(3600);

/// How the bundle endpoint authenticates itself (SPIFFE Federation §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleEndpointProfile {
    /// `https_spiffe` (the default): the server's own SVID,
    /// `spiffe://<trust_domain>/tessera/server`.
    HttpsSpiffe,
    /// `https_web`: a Web PKI certificate chain and its key, read from files at start.
    HttpsWeb {
        /// `certificate_path`: PEM chain, leaf first, naming the endpoint's host.
        certificate_path: PathBuf,
        /// `key_path`: PEM private key (PKCS#8, SEC1 or PKCS#1).
        key_path: PathBuf,
    },
}

/// The bundle endpoint this server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleEndpointConfig {
    /// `bind_address`: TCP address of the endpoint (port 0 picks a free port).
    pub bind_address: SocketAddr,
    /// `profile` (default `https_spiffe`) with `certificate_path` and `key_path` for
    /// `https_web`.
    pub profile: BundleEndpointProfile,
}

/// `[server.federation]`, every field optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// The bundle endpoint: served only when `bind_address` is set (default: none;
    /// federation relationships are polled either way).
    pub endpoint: Option<BundleEndpointConfig>,
    /// `refresh_hint` (default `5m`): the `spiffe_refresh_hint` published with the
    /// trust domain's bundle, on the endpoint and to agents.
    pub refresh_hint: Duration,
    /// `min_refresh_interval` (default `10s`): a federated bundle endpoint is polled
    /// at its bundle's refresh hint, never more often than this.
    pub min_refresh_interval: Duration,
    /// `max_refresh_interval` (default `1h`): ... and never less often than this.
    pub max_refresh_interval: Duration,
    /// `web_trust_roots_path` (default `/etc/ssl/certs/ca-certificates.crt`): PEM CA
    /// certificates that authenticate the `https_web` bundle endpoints polled.
    pub web_trust_roots_path: Option<PathBuf>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            refresh_hint: DEFAULT_FEDERATION_REFRESH_HINT,
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            max_refresh_interval: DEFAULT_MAX_REFRESH_INTERVAL,
            web_trust_roots_path: None,
        }
    }
}

impl FederationConfig {
    fn from_raw(raw: RawFederation, path: &Path) -> Result<Self, ConfigError> {
        let key = |name: &str| format!("server.federation.{name}");
        let endpoint = match raw.bind_address {
            None => {
                if raw.profile.is_some() || raw.certificate_path.is_some() || raw.key_path.is_some()
                {
                    return Err(ConfigError::invalid(
                        path,
                        &key("bind_address"),
                        "is required when the bundle endpoint is configured",
                    ));
                }
                None
            }
            Some(text) => {
                let bind_address = text.parse().map_err(|err| {
                    ConfigError::invalid(path, &key("bind_address"), format!("`{text}`: {err}"))
                })?;
                let profile = match (raw.profile.as_deref(), raw.certificate_path, raw.key_path) {
                    (None | Some("https_spiffe"), None, None) => BundleEndpointProfile::HttpsSpiffe,
                    (Some("https_web"), Some(certificate_path), Some(key_path)) => {
                        BundleEndpointProfile::HttpsWeb {
                            certificate_path,
                            key_path,
                        }
                    }
                    (Some("https_web"), _, _) => {
                        return Err(ConfigError::invalid(
                            path,
                            &key("profile"),
                            "https_web needs certificate_path and key_path",
                        ));
                    }
                    (None | Some("https_spiffe"), _, _) => {
                        return Err(ConfigError::invalid(
                            path,
                            &key("certificate_path"),
                            "only with profile = \"https_web\" (https_spiffe uses the server's SVID)",
                        ));
                    }
                    (Some(other), _, _) => {
                        return Err(ConfigError::invalid(
                            path,
                            &key("profile"),
                            format!(
                                "`{}`: expected \"https_web\" or \"https_spiffe\"",
                                other.escape_debug()
                            ),
                        ));
                    }
                };
                Some(BundleEndpointConfig {
                    bind_address,
                    profile,
                })
            }
        };
        let config = Self {
            endpoint,
            refresh_hint: raw
                .refresh_hint
                .map_or(DEFAULT_FEDERATION_REFRESH_HINT, |d| d.0),
            min_refresh_interval: raw
                .min_refresh_interval
                .map_or(DEFAULT_MIN_REFRESH_INTERVAL, |d| d.0),
            max_refresh_interval: raw
                .max_refresh_interval
                .map_or(DEFAULT_MAX_REFRESH_INTERVAL, |d| d.0),
            web_trust_roots_path: raw.web_trust_roots_path,
        };
        if config.refresh_hint < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                path,
                &key("refresh_hint"),
                "must be at least 1s",
            ));
        }
        if config.min_refresh_interval < Duration::from_secs(1)
            || config.min_refresh_interval > config.max_refresh_interval
        {
            return Err(ConfigError::invalid(
                path,
                &key("min_refresh_interval"),
                "must be at least 1s and at most max_refresh_interval",
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
    fn x509pop_node_attestor() {
        let c = ServerConfig::parse(MINIMAL, Path::new("s.toml")).unwrap();
        assert_eq!(c.node_attestors.x509pop, None);
        let text = format!(
            "{MINIMAL}[[plugins.node_attestor]]\nname = \"x509pop\"\n\
             [plugins.node_attestor.data]\nca_bundle_path = \"/etc/ca.pem\"\n"
        );
        let c = ServerConfig::parse(&text, Path::new("s.toml")).unwrap();
        assert_eq!(
            c.node_attestors.x509pop,
            Some(X509PopConfig {
                ca_bundle_path: PathBuf::from("/etc/ca.pem"),
                max_intermediates: 4,
                max_rsa_key_size: 8192,
            })
        );
        for (extra, key) in [
            ("max_intermediates = 7\n", "max_intermediates"),
            ("max_rsa_key_size = 1024\n", "max_rsa_key_size"),
            ("colour = 1\n", "plugins.node_attestor[0].data"),
        ] {
            let err = ServerConfig::parse(&format!("{text}{extra}"), Path::new("s.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = ServerConfig::parse(
            &format!("{MINIMAL}[[plugins.node_attestor]]\nname = \"tpm\"\n"),
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown node attestor `tpm`"), "{err}");
        let twice = format!("{text}{}", &text[MINIMAL.len()..]);
        let err = ServerConfig::parse(&twice, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let c = ServerConfig::parse(MINIMAL, Path::new("s.toml")).unwrap();
        assert_eq!(c.bind_address.port(), 8081);
        assert_eq!(c.ca_ttl, DEFAULT_CA_TTL);
        assert_eq!(c.datastore, DatastoreConfig::Sqlite);
        assert_eq!(c.upstream_authority, None);
    }

    #[test]
    fn upstream_authority_section() {
        let section = "[server.upstream_authority]\nkind = \"disk\"\n\
                       cert_file_path = \"/etc/tessera/upstream.pem\"\n\
                       key_file_path = \"/etc/tessera/upstream.key\"\n";
        let c = ServerConfig::parse(&format!("{MINIMAL}{section}"), Path::new("s.toml")).unwrap();
        assert_eq!(
            c.upstream_authority,
            Some(UpstreamAuthorityConfig::Disk {
                cert_file_path: PathBuf::from("/etc/tessera/upstream.pem"),
                key_file_path: PathBuf::from("/etc/tessera/upstream.key"),
                bundle_file_path: None,
            })
        );
        let with_bundle =
            format!("{MINIMAL}{section}bundle_file_path = \"/etc/tessera/roots.pem\"\n");
        let c = ServerConfig::parse(&with_bundle, Path::new("s.toml")).unwrap();
        assert!(matches!(
            c.upstream_authority,
            Some(UpstreamAuthorityConfig::Disk {
                bundle_file_path: Some(_),
                ..
            })
        ));
        for (text, key) in [
            (
                format!("{MINIMAL}{section}bundle_file_path = \"\"\n"),
                "server.upstream_authority.bundle_file_path",
            ),
            (
                format!(
                    "{MINIMAL}{}",
                    section.replace("/etc/tessera/upstream.key", "")
                ),
                "server.upstream_authority.key_file_path",
            ),
            (
                format!("{MINIMAL}{}", section.replace("\"disk\"", "\"vault\"")),
                "vault",
            ),
            (format!("{MINIMAL}{section}colour = 1\n"), "colour"),
        ] {
            let err = ServerConfig::parse(&text, Path::new("s.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
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
    fn key_lifetimes_and_key_manager() {
        let c = ServerConfig::parse(MINIMAL, Path::new("s.toml")).unwrap();
        assert_eq!(c.jwt_key_ttl, DEFAULT_JWT_KEY_TTL);
        assert_eq!(c.key_manager, KeyManagerConfig::default());
        let short = format!(
            "{MINIMAL}ca_ttl = \"12s\"\ndefault_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"4s\"\n"
        );
        let err = ServerConfig::parse(&short, Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.ca_ttl") && err.contains("allow_short_key_lifetimes"),
            "{err}"
        );
        let c = ServerConfig::parse(
            &format!("{short}allow_short_key_lifetimes = true\njwt_key_ttl = \"9s\"\n"),
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(c.ca_ttl, Duration::from_secs(12));
        assert_eq!(c.jwt_key_ttl, Duration::from_secs(9));
        let err = ServerConfig::parse(
            &format!("{MINIMAL}allow_short_key_lifetimes = true\njwt_key_ttl = \"5s\"\n"),
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("server.jwt_key_ttl"), "{err}");
        let c = ServerConfig::parse(
            &format!("{MINIMAL}[server.key_manager]\nkind = \"memory\"\n"),
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(c.key_manager, KeyManagerConfig::Memory);
    }

    #[test]
    fn unknown_datastore_kind_is_refused() {
        let text = format!("{MINIMAL}[server.datastore]\nkind = \"oracle\"\n");
        assert!(ServerConfig::parse(&text, Path::new("s.toml")).is_err());
    }
}
