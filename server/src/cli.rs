//! The `tessera-server` command line: `run` and the admin commands that talk to a
//! running server over its admin socket. Output is text by default, JSON with
//! `--output json`. Exit codes: 0 ok, 1 failure, 64 usage or configuration error.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tessera_plugin_sdk::Selector;
use tessera_plugin_sdk::config::parse_duration;
use tessera_proto::admin::admin_client::AdminClient;
use tessera_proto::admin::{
    Agent, BanAgentRequest, CreateEntryRequest, CreateJoinTokenRequest, DeleteEntryRequest,
    EvictAgentRequest, GetAgentRequest, GetBundleRequest, GetEntryRequest, HealthRequest,
    ListAgentsRequest, ListEntriesRequest, ListRevocationsRequest, Revocation,
    RevokeInstanceRequest, RotateJwtAuthorityRequest, UpdateEntryRequest,
};
use tessera_proto::convert::selector_to_proto;
use tessera_proto::types::Entry;
use tonic::transport::Channel;

mod authority;

mod federation;

pub use federation::{EndpointProfileArg, FederationCommand};

/// Default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tessera-server/admin.sock";

/// tessera-server: the signing CA, registration store and node API of a tessera trust
/// domain.
#[derive(Debug, Parser)]
#[command(name = "tessera-server", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server in the foreground until SIGTERM or SIGINT.
    Run {
        /// Path to the server configuration file (TOML).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
    },
    /// Manage join tokens (single-use node attestation credentials).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Inspect, ban and evict attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Revoke one instance identity of a templated entry, and list revocations.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Show the trust bundle; set, list and delete federated bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Federate with other trust domains: relationships and their bundle endpoints.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Manage the signing keys.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Check that the server answers on its admin socket and its datastore is reachable.
    Healthcheck(Common),
}

/// Options every admin command takes.
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Path to the server's admin socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET, env = "TESSERA_ADMIN_SOCKET")]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// JSON.
    Json,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Generate a join token; prints `<id>.<secret>` (the secret is shown only once).
    Generate {
        /// Node alias given to the agent that uses the token (entries may name it as
        /// their parent).
        #[arg(long = "spiffe-id", value_name = "ALIAS")]
        spiffe_id: Option<String>,
        /// Token lifetime, e.g. `10m`, `1h` (default: the server's `join_token_ttl`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// `entry` subcommands.
#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Create a registration entry; prints its id. `--parent-id`, `--spiffe-id` and
    /// at least one `--selector` are required.
    Create {
        /// The entry's fields.
        #[command(flatten)]
        fields: EntryFields,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Change an entry: every field given replaces the stored one (lists as a whole),
    /// the others stay. Agents receive the change at once.
    Update {
        /// Entry id.
        id: String,
        /// The fields to replace.
        #[command(flatten)]
        fields: EntryFields,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Show one entry.
    Show {
        /// Entry id.
        id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// List all entries.
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Delete an entry; agents stop serving it at the next push.
    Delete {
        /// Entry id.
        id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// The fields of an entry, as flags.
#[derive(Debug, Args, Clone)]
pub struct EntryFields {
    /// The agent ID (or node alias) allowed to serve the entry.
    #[arg(long = "parent-id", value_name = "ID")]
    pub parent_id: Option<String>,
    /// The SPIFFE ID workloads matching the entry receive.
    #[arg(long = "spiffe-id", value_name = "ID")]
    pub spiffe_id: Option<String>,
    /// A selector `TYPE:VALUE` (e.g. `unix:uid:1000`); repeat for several, all must
    /// match.
    #[arg(long = "selector", value_name = "TYPE:VALUE", value_parser = Selector::parse)]
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime (default: the server's `default_x509_svid_ttl`).
    #[arg(long = "x509-ttl", value_name = "DURATION", value_parser = parse_duration)]
    pub x509_ttl: Option<Duration>,
    /// JWT-SVID lifetime (default: the server's `default_jwt_svid_ttl`, 5m; at most
    /// its `max_jwt_svid_ttl`).
    #[arg(long = "jwt-ttl", value_name = "DURATION", value_parser = parse_duration)]
    pub jwt_ttl: Option<Duration>,
    /// An audience JWT-SVIDs of this entry may carry; repeat for several. Without any,
    /// every audience is allowed.
    #[arg(long = "jwt-audience", value_name = "AUDIENCE")]
    pub jwt_audiences: Vec<String>,
    /// Allow one JWT-SVID to carry several audiences (default: one audience per
    /// token). `--jwt-multi-audience=false` turns it off again.
    #[arg(long = "jwt-multi-audience", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub jwt_multi_audience: Option<bool>,
    /// DNS name added to the X.509-SVID; repeat for several.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// Hint given to workloads to tell several identities apart.
    #[arg(long, value_name = "HINT")]
    pub hint: Option<String>,
    /// With `entry update`: remove every JWT audience (any audience allowed again).
    #[arg(long = "clear-jwt-audiences", conflicts_with = "jwt_audiences")]
    pub clear_jwt_audiences: bool,
    /// With `entry update`: remove every DNS name.
    #[arg(long = "clear-dns-names", conflicts_with = "dns_names")]
    pub clear_dns_names: bool,
    /// A federated trust domain (e.g. `example-federated.org`) whose bundle the
    /// entry's workloads receive; repeat for several. With `entry update`, replaces the
    /// stored list.
    #[arg(long = "federates-with", value_name = "TD")]
    pub federates_with: Vec<String>,
    /// With `entry update`: federate with no trust domain any more.
    #[arg(long = "clear-federates-with", conflicts_with = "federates_with")]
    pub clear_federates_with: bool,
}

fn seconds(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

impl EntryFields {
    /// Applies the given flags over `entry`.
    fn apply(self, entry: &mut Entry) {
        if let Some(parent_id) = self.parent_id {
            entry.parent_id = parent_id;
        }
        if let Some(spiffe_id) = self.spiffe_id {
            entry.spiffe_id = spiffe_id;
        }
        if !self.selectors.is_empty() {
            entry.selectors = self.selectors.iter().map(selector_to_proto).collect();
        }
        if let Some(ttl) = self.x509_ttl {
            entry.x509_svid_ttl_seconds = seconds(ttl);
        }
        if let Some(ttl) = self.jwt_ttl {
            entry.jwt_svid_ttl_seconds = seconds(ttl);
        }
        if !self.jwt_audiences.is_empty() || self.clear_jwt_audiences {
            entry.jwt_audiences = self.jwt_audiences;
        }
        if let Some(multi) = self.jwt_multi_audience {
            entry.jwt_multi_audience = multi;
        }
        if !self.dns_names.is_empty() || self.clear_dns_names {
            entry.dns_names = self.dns_names;
        }
        if let Some(hint) = self.hint {
            entry.hint = hint;
        }
        if !self.federates_with.is_empty() || self.clear_federates_with {
            entry.federates_with = self.federates_with;
        }
    }
}

/// `authority` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// Replace the JWT-SVID signing key now. The old public key stays in the bundle
    /// until every token it signed has expired (`max_jwt_svid_ttl`); prints the new
    /// key id.
    RotateJwtKey {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Show the X.509 CAs and JWT signing keys with their rotation state: `prepared`
    /// (published, not signing yet), `active` (signing) or `old` (replaced, published
    /// until what it signed has expired), with their validity.
    Show {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// Formats of `bundle show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// The X.509 authorities as PEM (what `trust_bundle_path` takes).
    Pem,
    /// The SPIFFE bundle document (JWKS with `x509-svid` and `jwt-svid` keys).
    Spiffe,
    /// Each key of the bundle with its rotation state and validity (as `authority
    /// show`).
    Keys,
}

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents, banned ones included.
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Show one attested agent.
    Show {
        /// The agent's SPIFFE ID, `spiffe://<td>/tessera/agent/<method>/<id>`.
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Ban an agent: refuse all its calls and any re-attestation of its ID.
    ///
    /// A banned agent can no longer renew, sync or obtain SVIDs, and its ID can never
    /// attest again (until evicted). A running agent is told at once; it stops serving,
    /// deletes its SVID and exits. Banning a banned agent changes nothing.
    Ban {
        /// The agent's SPIFFE ID.
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Evict an agent: delete its attestation record, so it must attest again.
    ///
    /// A running agent is told at once and must attest again (for join_token, with a
    /// new token, which gives it a new agent ID). Evicting a banned agent lifts the
    /// ban.
    Evict {
        /// The agent's SPIFFE ID.
        #[arg(value_name = "SPIFFE_ID")]
        id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// `instance` subcommands.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Revoke one identity rendered from a templated entry (e.g. one `{instance}`).
    ///
    /// Every agent serving it stops at once and rejects its JWT-SVIDs, the server
    /// never signs it again while the revocation lasts, and its X.509-SVID serials are
    /// published in the CRL that agents give workloads. The revocation lasts until
    /// every SVID the identity may hold has expired. Only instances of templated
    /// entries are accepted: for a fixed SPIFFE ID, delete or update its entry.
    /// Revoking again returns the existing revocation.
    Revoke {
        /// The rendered SPIFFE ID, e.g.
        /// `spiffe://example.org/ai/research-bot/i-5f3a9c0d1e2b4a6f8c7d9e0f1a2b3c4d`.
        #[arg(value_name = "SPIFFE_ID")]
        spiffe_id: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// List the revocations in force, with the serials each puts in the CRL.
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust bundle: by default the X.509 authorities as PEM, the bundle an
    /// agent bootstraps from (`trust_bundle_path`); `--format spiffe` prints the SPIFFE
    /// bundle document (JWKS) with the JWT keys.
    Show {
        /// Output format of the bundle (`--output json` prints a summary instead).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Store the bundle of a federated trust domain given as a file: PEM CA
    /// certificates or a SPIFFE bundle document (JSON). Replaces the stored one.
    Set {
        /// The federated trust domain.
        #[arg(long = "trust-domain", value_name = "TD")]
        trust_domain: String,
        /// The bundle file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// List the federated bundles (one per trust domain).
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
    /// Delete the bundle of a federated trust domain; agents drop it at once.
    Delete {
        /// The federated trust domain.
        #[arg(value_name = "TD")]
        trust_domain: String,
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// A failed admin command: a message for stderr and the exit code.
#[derive(Debug)]
pub struct CommandError {
    /// Exit code (1 failure, 64 usage).
    pub code: i32,
    /// One line for stderr.
    pub message: String,
}

impl From<tonic::Status> for CommandError {
    fn from(status: tonic::Status) -> Self {
        let code = if status.code() == tonic::Code::InvalidArgument {
            64
        } else {
            1
        };
        Self {
            code,
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    }
}

async fn client(common: &Common) -> Result<AdminClient<Channel>, CommandError> {
    let channel = tessera_proto::uds::connect(&common.socket)
        .await
        .map_err(|err| CommandError {
            code: 1,
            message: format!(
                "cannot connect to the admin socket {}: {err}",
                common.socket.display()
            ),
        })?;
    Ok(AdminClient::new(channel))
}

fn unix_to_rfc3339(secs: i64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

fn entry_json(entry: &Entry) -> serde_json::Value {
    json!({
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "selectors": entry.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect::<Vec<_>>(),
        "x509_svid_ttl_seconds": entry.x509_svid_ttl_seconds,
        "jwt_svid_ttl_seconds": entry.jwt_svid_ttl_seconds,
        "jwt_audiences": entry.jwt_audiences,
        "jwt_multi_audience": entry.jwt_multi_audience,
        "dns_names": entry.dns_names,
        "hint": entry.hint,
        "federates_with": entry.federates_with,
        "created_revision": entry.created_revision,
        "revision": entry.revision,
    })
}

fn entry_text(entry: &Entry) -> String {
    let mut out = format!(
        "Entry ID         : {}\nSPIFFE ID        : {}\nParent ID        : {}\n",
        entry.id, entry.spiffe_id, entry.parent_id
    );
    for s in &entry.selectors {
        out.push_str(&format!("Selector         : {}:{}\n", s.r#type, s.value));
    }
    let ttl = if entry.x509_svid_ttl_seconds == 0 {
        "default".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs(
            entry.x509_svid_ttl_seconds.unsigned_abs(),
        ))
        .to_string()
    };
    out.push_str(&format!("X509-SVID TTL    : {ttl}\n"));
    let jwt_ttl = if entry.jwt_svid_ttl_seconds == 0 {
        "default".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs(
            entry.jwt_svid_ttl_seconds.unsigned_abs(),
        ))
        .to_string()
    };
    out.push_str(&format!("JWT-SVID TTL     : {jwt_ttl}\n"));
    for audience in &entry.jwt_audiences {
        out.push_str(&format!("JWT audience     : {audience}\n"));
    }
    if entry.jwt_multi_audience {
        out.push_str("JWT multi-aud.   : allowed\n");
    }
    for name in &entry.dns_names {
        out.push_str(&format!("DNS name         : {name}\n"));
    }
    if !entry.hint.is_empty() {
        out.push_str(&format!("Hint             : {}\n", entry.hint));
    }
    for td in &entry.federates_with {
        out.push_str(&format!("Federates with   : {td}\n"));
    }
    out.push_str(&format!("Revision         : {}\n", entry.revision));
    out
}

fn agent_text(agent: &Agent) -> String {
    let mut out = format!(
        "Agent ID         : {}\nAttestation type : {}\nSerial           : {}\nExpires at       : {}\n",
        agent.spiffe_id,
        agent.attestation_type,
        agent.serial,
        unix_to_rfc3339(agent.expires_at)
    );
    for alias in &agent.aliases {
        out.push_str(&format!("Alias            : {alias}\n"));
    }
    if agent.banned_at != 0 {
        out.push_str(&format!(
            "Status           : banned since {}\n",
            unix_to_rfc3339(agent.banned_at)
        ));
    } else {
        out.push_str("Status           : active\n");
    }
    out
}

fn agent_json(agent: &Agent) -> serde_json::Value {
    json!({
        "spiffe_id": agent.spiffe_id,
        "attestation_type": agent.attestation_type,
        "serial": agent.serial,
        "expires_at": unix_to_rfc3339(agent.expires_at),
        "aliases": agent.aliases,
        "first_attested_at": unix_to_rfc3339(agent.first_attested_at),
        "last_seen_at": unix_to_rfc3339(agent.last_seen_at),
        "banned": agent.banned_at != 0,
        "banned_at": (agent.banned_at != 0).then(|| unix_to_rfc3339(agent.banned_at)),
    })
}

fn revocation_text(revocation: &Revocation) -> String {
    let mut out = format!(
        "SPIFFE ID        : {}\nRevoked at       : {}\nExpires at       : {}\n",
        revocation.spiffe_id,
        unix_to_rfc3339(revocation.revoked_at),
        unix_to_rfc3339(revocation.expires_at)
    );
    for serial in &revocation.serials {
        out.push_str(&format!("Serial           : {serial}\n"));
    }
    out
}

fn revocation_json(revocation: &Revocation) -> serde_json::Value {
    json!({
        "spiffe_id": revocation.spiffe_id,
        "revoked_at": unix_to_rfc3339(revocation.revoked_at),
        "expires_at": unix_to_rfc3339(revocation.expires_at),
        "serials": revocation.serials,
    })
}

fn pem(der: &[u8]) -> String {
    tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", der)
}

/// The SPIFFE bundle document (JWKS) of a wire bundle.
fn spiffe_bundle_document(bundle: &tessera_proto::types::Bundle) -> Result<String, CommandError> {
    let td =
        tessera_plugin_sdk::TrustDomain::new(&bundle.trust_domain).map_err(|err| CommandError {
            code: 1,
            message: format!("server sent a bad trust domain: {err}"),
        })?;
    let keys = bundle
        .jwt_authorities
        .iter()
        .map(|a| tessera_plugin_sdk::jwt::JwtPublicKey::from_spki_der(a.kid.clone(), &a.public_key))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| CommandError {
            code: 1,
            message: format!("server sent a bad JWT key: {err}"),
        })?;
    Ok(
        tessera_plugin_sdk::jwt::JwtBundle::new(td, keys).to_spiffe_bundle_json(
            &bundle.x509_authorities,
            bundle.sequence_number,
            bundle.refresh_hint_seconds.unsigned_abs(),
        ),
    )
}

/// Runs an admin command; returns what to print on stdout.
pub async fn run_admin(command: Command) -> Result<String, CommandError> {
    match command {
        Command::Run { .. } => Err(CommandError {
            code: 64,
            message: "`run` is not an admin command".into(),
        }),
        Command::Token(TokenCommand::Generate {
            spiffe_id,
            ttl,
            common,
        }) => {
            let response = client(&common)
                .await?
                .create_join_token(CreateJoinTokenRequest {
                    ttl_seconds: ttl.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                    alias_spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!("{}\n", response.token),
                Output::Json => format!(
                    "{}\n",
                    json!({
                        "token": response.token,
                        "token_id": response.token_id,
                        "agent_spiffe_id": response.agent_spiffe_id,
                        "expires_at": unix_to_rfc3339(response.expires_at),
                    })
                ),
            })
        }
        Command::Entry(EntryCommand::Create { fields, common }) => {
            for (missing, flag) in [
                (fields.parent_id.is_none(), "--parent-id"),
                (fields.spiffe_id.is_none(), "--spiffe-id"),
                (fields.selectors.is_empty(), "--selector"),
            ] {
                if missing {
                    return Err(CommandError {
                        code: 64,
                        message: format!("entry create needs {flag}"),
                    });
                }
            }
            let mut entry = Entry::default();
            fields.apply(&mut entry);
            let created = client(&common)
                .await?
                .create_entry(CreateEntryRequest { entry: Some(entry) })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!("{}\n", created.id),
                Output::Json => format!("{}\n", entry_json(&created)),
            })
        }
        Command::Entry(EntryCommand::Update { id, fields, common }) => {
            let mut admin = client(&common).await?;
            let mut entry = admin.get_entry(GetEntryRequest { id }).await?.into_inner();
            fields.apply(&mut entry);
            let updated = admin
                .update_entry(UpdateEntryRequest { entry: Some(entry) })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => entry_text(&updated),
                Output::Json => format!("{}\n", entry_json(&updated)),
            })
        }
        Command::Authority(AuthorityCommand::Show { common }) => {
            let response = client(&common)
                .await?
                .list_authorities(tessera_proto::admin::ListAuthoritiesRequest {})
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => authority::keys_text(&response),
                Output::Json => format!("{}\n", authority::keys_json(&response)),
            })
        }
        Command::Authority(AuthorityCommand::RotateJwtKey { common }) => {
            let response = client(&common)
                .await?
                .rotate_jwt_authority(RotateJwtAuthorityRequest {})
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!("{}\n", response.kid),
                Output::Json => format!("{}\n", json!({ "kid": response.kid })),
            })
        }
        Command::Entry(EntryCommand::Show { id, common }) => {
            let entry = client(&common)
                .await?
                .get_entry(GetEntryRequest { id })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => entry_text(&entry),
                Output::Json => format!("{}\n", entry_json(&entry)),
            })
        }
        Command::Entry(EntryCommand::List { common }) => {
            let entries = client(&common)
                .await?
                .list_entries(ListEntriesRequest {})
                .await?
                .into_inner()
                .entries;
            Ok(match common.output {
                Output::Text => {
                    let mut out = format!("Found {} entries\n", entries.len());
                    for entry in &entries {
                        out.push('\n');
                        out.push_str(&entry_text(entry));
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    serde_json::Value::Array(entries.iter().map(entry_json).collect())
                ),
            })
        }
        Command::Entry(EntryCommand::Delete { id, common }) => {
            client(&common)
                .await?
                .delete_entry(DeleteEntryRequest { id: id.clone() })
                .await?;
            Ok(match common.output {
                Output::Text => format!("Deleted entry {id}\n"),
                Output::Json => format!("{}\n", json!({ "deleted": id })),
            })
        }
        Command::Agent(AgentCommand::List { common }) => {
            let agents = client(&common)
                .await?
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            Ok(match common.output {
                Output::Text => {
                    let mut out = format!("Found {} attested agents\n", agents.len());
                    for agent in &agents {
                        out.push('\n');
                        out.push_str(&agent_text(agent));
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    serde_json::Value::Array(agents.iter().map(agent_json).collect())
                ),
            })
        }
        Command::Agent(AgentCommand::Show { id, common }) => {
            let agent = client(&common)
                .await?
                .get_agent(GetAgentRequest { spiffe_id: id })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => agent_text(&agent),
                Output::Json => format!("{}\n", agent_json(&agent)),
            })
        }
        Command::Agent(AgentCommand::Ban { id, common }) => {
            let agent = client(&common)
                .await?
                .ban_agent(BanAgentRequest { spiffe_id: id })
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!("Banned agent {}\n", agent.spiffe_id),
                Output::Json => format!("{}\n", agent_json(&agent)),
            })
        }
        Command::Agent(AgentCommand::Evict { id, common }) => {
            client(&common)
                .await?
                .evict_agent(EvictAgentRequest {
                    spiffe_id: id.clone(),
                })
                .await?;
            Ok(match common.output {
                Output::Text => format!("Evicted agent {id}\n"),
                Output::Json => format!("{}\n", json!({ "evicted": id })),
            })
        }
        Command::Instance(InstanceCommand::Revoke { spiffe_id, common }) => {
            let revocation = client(&common)
                .await?
                .revoke_instance(RevokeInstanceRequest { spiffe_id })
                .await?
                .into_inner()
                .revocation
                .ok_or_else(|| CommandError {
                    code: 1,
                    message: "the server sent no revocation".into(),
                })?;
            Ok(match common.output {
                Output::Text => revocation_text(&revocation),
                Output::Json => format!("{}\n", revocation_json(&revocation)),
            })
        }
        Command::Instance(InstanceCommand::List { common }) => {
            let revocations = client(&common)
                .await?
                .list_revocations(ListRevocationsRequest {})
                .await?
                .into_inner()
                .revocations;
            Ok(match common.output {
                Output::Text => {
                    let mut out = format!("Found {} revocations\n", revocations.len());
                    for revocation in &revocations {
                        out.push('\n');
                        out.push_str(&revocation_text(revocation));
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    serde_json::Value::Array(revocations.iter().map(revocation_json).collect())
                ),
            })
        }
        Command::Bundle(BundleCommand::Show { format, common }) => {
            let mut admin = client(&common).await?;
            let bundle = admin.get_bundle(GetBundleRequest {}).await?.into_inner();
            let keys = if common.output == Output::Json || format == BundleFormat::Keys {
                Some(
                    admin
                        .list_authorities(tessera_proto::admin::ListAuthoritiesRequest {})
                        .await?
                        .into_inner(),
                )
            } else {
                None
            };
            Ok(match (common.output, format) {
                (Output::Text, BundleFormat::Keys) => {
                    keys.as_ref().map(authority::keys_text).unwrap_or_default()
                }
                (Output::Text, BundleFormat::Pem) => {
                    bundle.x509_authorities.iter().map(|der| pem(der)).collect()
                }
                (Output::Text, BundleFormat::Spiffe) => {
                    format!("{}\n", spiffe_bundle_document(&bundle)?)
                }
                (Output::Json, _) => format!(
                    "{}\n",
                    json!({
                        "trust_domain": bundle.trust_domain,
                        "sequence_number": bundle.sequence_number,
                        "refresh_hint_seconds": bundle.refresh_hint_seconds,
                        "x509_authorities": bundle.x509_authorities.iter().map(|der| pem(der)).collect::<Vec<_>>(),
                        "jwt_authorities": bundle.jwt_authorities.iter().map(|a| json!({
                            "kid": a.kid,
                            "expires_at": (a.expires_at != 0).then(|| unix_to_rfc3339(a.expires_at)),
                        })).collect::<Vec<_>>(),
                        "keys": keys.as_ref().map(authority::keys_json),
                    })
                ),
            })
        }
        Command::Federation(command) => federation::run(command).await,
        Command::Bundle(BundleCommand::Set {
            trust_domain,
            file,
            common,
        }) => federation::set(trust_domain, file, common).await,
        Command::Bundle(BundleCommand::List { common }) => federation::list(common).await,
        Command::Bundle(BundleCommand::Delete {
            trust_domain,
            common,
        }) => federation::delete(trust_domain, common).await,
        Command::Healthcheck(common) => {
            let health = client(&common)
                .await?
                .health(HealthRequest {})
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => format!(
                    "Server is healthy (trust domain {}, revision {})\n",
                    health.trust_domain, health.revision
                ),
                Output::Json => format!(
                    "{}\n",
                    json!({
                        "healthy": true,
                        "trust_domain": health.trust_domain,
                        "revision": health.revision,
                        "ca_not_after": unix_to_rfc3339(health.ca_not_after),
                        "x509_svids_signed": health.x509_svids_signed,
                        "jwt_svids_signed": health.jwt_svids_signed,
                    })
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn agent_and_instance_verbs_parse() {
        let id = "spiffe://example.org/tessera/agent/join_token/abc";
        for (verb, want) in [("show", 0), ("ban", 1), ("evict", 2)] {
            let cli =
                Cli::try_parse_from(["tessera-server", "agent", verb, id, "--output", "json"])
                    .unwrap();
            let got = match cli.command {
                Command::Agent(AgentCommand::Show { id: got, common }) => {
                    assert_eq!(common.output, Output::Json);
                    (0, got)
                }
                Command::Agent(AgentCommand::Ban { id: got, .. }) => (1, got),
                Command::Agent(AgentCommand::Evict { id: got, .. }) => (2, got),
                other => panic!("{other:?}"),
            };
            assert_eq!(got, (want, id.to_owned()));
        }
        let cli = Cli::try_parse_from([
            "tessera-server",
            "instance",
            "revoke",
            "spiffe://example.org/ai/bot/i-0",
            "--socket",
            "/tmp/a.sock",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Instance(InstanceCommand::Revoke { ref spiffe_id, ref common })
                if spiffe_id == "spiffe://example.org/ai/bot/i-0"
                    && common.socket == std::path::Path::new("/tmp/a.sock")
        ));
        assert!(matches!(
            Cli::try_parse_from(["tessera-server", "instance", "list"])
                .unwrap()
                .command,
            Command::Instance(InstanceCommand::List { .. })
        ));
        // A missing ID is a usage error.
        assert!(Cli::try_parse_from(["tessera-server", "agent", "ban"]).is_err());
        assert!(Cli::try_parse_from(["tessera-server", "instance", "revoke"]).is_err());
    }

    #[test]
    fn agent_output_shows_the_ban() {
        let mut agent = Agent {
            spiffe_id: "spiffe://example.org/tessera/agent/join_token/abc".into(),
            attestation_type: "join_token".into(),
            serial: "0a".into(),
            expires_at: 1_900_000_000,
            aliases: vec![],
            first_attested_at: 1_800_000_000,
            last_seen_at: 1_800_000_000,
            banned_at: 0,
        };
        assert!(agent_text(&agent).contains("Status           : active\n"));
        assert_eq!(agent_json(&agent)["banned"], json!(false));
        assert_eq!(agent_json(&agent)["banned_at"], serde_json::Value::Null);
        agent.banned_at = 1_800_000_100;
        assert!(agent_text(&agent).contains("banned since 2027-01-15T08:01:40Z"));
        assert_eq!(agent_json(&agent)["banned"], json!(true));
        assert_eq!(
            agent_json(&agent)["banned_at"],
            json!("2027-01-15T08:01:40Z")
        );
    }
}
