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
    CreateEntryRequest, CreateJoinTokenRequest, DeleteEntryRequest, GetBundleRequest,
    GetEntryRequest, HealthRequest, ListAgentsRequest, ListEntriesRequest,
};
use tessera_proto::convert::selector_to_proto;
use tessera_proto::types::Entry;
use tonic::transport::Channel;

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
    /// Inspect attested agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Show the trust bundle.
    #[command(subcommand)]
    Bundle(BundleCommand),
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
    /// Create a registration entry; prints its id.
    Create {
        /// The agent ID (or node alias) allowed to serve the entry.
        #[arg(long = "parent-id", value_name = "ID")]
        parent_id: String,
        /// The SPIFFE ID workloads matching the entry receive.
        #[arg(long = "spiffe-id", value_name = "ID")]
        spiffe_id: String,
        /// A selector `TYPE:VALUE` (e.g. `unix:uid:1000`); repeat for several, all must
        /// match.
        #[arg(long = "selector", value_name = "TYPE:VALUE", required = true, value_parser = Selector::parse)]
        selectors: Vec<Selector>,
        /// X.509-SVID lifetime (default: the server's `default_x509_svid_ttl`).
        #[arg(long = "x509-ttl", value_name = "DURATION", value_parser = parse_duration)]
        x509_ttl: Option<Duration>,
        /// DNS name added to the X.509-SVID; repeat for several.
        #[arg(long = "dns-name", value_name = "NAME")]
        dns_names: Vec<String>,
        /// Hint given to workloads to tell several identities apart.
        #[arg(long, value_name = "HINT", default_value = "")]
        hint: String,
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

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List {
        /// Socket and output options.
        #[command(flatten)]
        common: Common,
    },
}

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print the trust domain's X.509 authorities as PEM: the bundle an agent
    /// bootstraps from (`trust_bundle_path`).
    Show {
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
        "dns_names": entry.dns_names,
        "hint": entry.hint,
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
    for name in &entry.dns_names {
        out.push_str(&format!("DNS name         : {name}\n"));
    }
    if !entry.hint.is_empty() {
        out.push_str(&format!("Hint             : {}\n", entry.hint));
    }
    out.push_str(&format!("Revision         : {}\n", entry.revision));
    out
}

fn pem(der: &[u8]) -> String {
    tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", der)
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
        Command::Entry(EntryCommand::Create {
            parent_id,
            spiffe_id,
            selectors,
            x509_ttl,
            dns_names,
            hint,
            common,
        }) => {
            let entry = Entry {
                spiffe_id,
                parent_id,
                selectors: selectors.iter().map(selector_to_proto).collect(),
                x509_svid_ttl_seconds: x509_ttl
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                dns_names,
                hint,
                ..Entry::default()
            };
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
                        out.push_str(&format!(
                            "\nAgent ID         : {}\nAttestation type : {}\nSerial           : {}\nExpires at       : {}\n",
                            agent.spiffe_id,
                            agent.attestation_type,
                            agent.serial,
                            unix_to_rfc3339(agent.expires_at)
                        ));
                        for alias in &agent.aliases {
                            out.push_str(&format!("Alias            : {alias}\n"));
                        }
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    serde_json::Value::Array(
                        agents
                            .iter()
                            .map(|a| json!({
                                "spiffe_id": a.spiffe_id,
                                "attestation_type": a.attestation_type,
                                "serial": a.serial,
                                "expires_at": unix_to_rfc3339(a.expires_at),
                                "aliases": a.aliases,
                                "first_attested_at": unix_to_rfc3339(a.first_attested_at),
                                "last_seen_at": unix_to_rfc3339(a.last_seen_at),
                            }))
                            .collect()
                    )
                ),
            })
        }
        Command::Bundle(BundleCommand::Show { common }) => {
            let bundle = client(&common)
                .await?
                .get_bundle(GetBundleRequest {})
                .await?
                .into_inner();
            Ok(match common.output {
                Output::Text => bundle.x509_authorities.iter().map(|der| pem(der)).collect(),
                Output::Json => format!(
                    "{}\n",
                    json!({
                        "trust_domain": bundle.trust_domain,
                        "sequence_number": bundle.sequence_number,
                        "refresh_hint_seconds": bundle.refresh_hint_seconds,
                        "x509_authorities": bundle.x509_authorities.iter().map(|der| pem(der)).collect::<Vec<_>>(),
                    })
                ),
            })
        }
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
}
