//! The `tessera-agent` command line: `run`, and the Workload API client commands
//! (`api fetch x509`, `healthcheck`) that any workload can use. Exit codes: 0 ok,
//! 1 failure, 64 usage or configuration error.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest, X509svidResponse,
};
use tonic::transport::Channel;

use crate::workload_api::SECURITY_HEADER;

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/run/tessera/agent.sock";

/// tessera-agent: the node agent that attests workloads on its Unix socket and serves
/// them SPIFFE identities over the Workload API.
#[derive(Debug, Parser)]
#[command(name = "tessera-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground until SIGTERM or SIGINT.
    Run {
        /// Path to the agent configuration file (TOML).
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: PathBuf,
        /// Join token for the first attestation (overrides `join_token` in the config);
        /// not needed while the agent holds a valid SVID in its data directory.
        #[arg(long = "join-token", value_name = "TOKEN")]
        join_token: Option<String>,
    },
    /// Talk to the Workload API as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Check that the agent serves the Workload API and has synchronised with the
    /// server (a caller without an identity still counts as healthy).
    Healthcheck(Endpoint),
}

/// `api` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetch identities.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate credentials through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print every update of the X.509-SVID stream (rotations, entry and bundle
    /// changes) until interrupted, or until `--count` updates.
    Watch {
        /// Stop after this many updates.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
        /// Socket, timeout (for the first update) and output options.
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// `api validate` subcommands.
#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validate a JWT-SVID for an audience; prints its SPIFFE ID and claims.
    Jwt {
        /// The audience the token must carry.
        #[arg(long, value_name = "AUDIENCE")]
        audience: String,
        /// The token; read from standard input when absent.
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
        /// Socket, timeout and output options.
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// `api fetch` subcommands.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// Fetch JWT-SVIDs for an audience; prints each token with its SPIFFE ID.
    Jwt {
        /// Audience of the token; repeat for a multi-audience token (only where the
        /// entry allows it).
        #[arg(long, value_name = "AUDIENCE", required = true)]
        audience: Vec<String>,
        /// Only this identity (when the process has several).
        #[arg(long = "spiffe-id", value_name = "ID")]
        spiffe_id: Option<String>,
        /// Socket, timeout and output options.
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Fetch this process's X.509-SVIDs; prints SPIFFE ID, serial and expiry of each.
    X509 {
        /// Write svid.pem, svid.key (0600) and bundle.pem into DIR (for several SVIDs
        /// the second and later get an index: svid.1.pem ...).
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        /// Socket, timeout and output options.
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

/// Where the Workload API is and how to print.
#[derive(Debug, Args, Clone)]
pub struct Endpoint {
    /// Workload API socket: a path, or `unix:///path` as in SPIFFE_ENDPOINT_SOCKET
    /// [default: $SPIFFE_ENDPOINT_SOCKET, else /run/tessera/agent.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = tessera_plugin_sdk::config::parse_duration)]
    pub timeout: Duration,
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

/// A failed command: one line for stderr and the exit code.
#[derive(Debug)]
pub struct CommandError {
    /// Exit code (1 failure, 64 usage).
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

fn failure(message: impl Into<String>) -> CommandError {
    CommandError {
        code: 1,
        message: message.into(),
    }
}

/// Resolves the socket: the flag, else `SPIFFE_ENDPOINT_SOCKET`, else the default.
/// Accepts a bare path, `unix:///path` or `unix:/path`.
pub fn socket_path(flag: Option<&str>) -> Result<PathBuf, CommandError> {
    let from_env = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok();
    let text = flag
        .map(str::to_owned)
        .or(from_env)
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
    let path = if let Some(rest) = text.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = text.strip_prefix("unix:") {
        rest
    } else if text.contains("://") {
        return Err(CommandError {
            code: 64,
            message: format!("unsupported endpoint `{text}`: only unix sockets"),
        });
    } else {
        text.as_str()
    };
    if !path.starts_with('/') {
        return Err(CommandError {
            code: 64,
            message: format!("endpoint `{text}` must be an absolute socket path"),
        });
    }
    Ok(PathBuf::from(path))
}

async fn client(endpoint: &Endpoint) -> Result<SpiffeWorkloadApiClient<Channel>, CommandError> {
    let path = socket_path(endpoint.socket.as_deref())?;
    let channel = tessera_proto::uds::connect(&path).await.map_err(|err| {
        failure(format!(
            "cannot connect to the Workload API at {}: {err}",
            path.display()
        ))
    })?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// Adds the Workload API security header.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

async fn first_x509(endpoint: &Endpoint) -> Result<X509svidResponse, CommandError> {
    let mut client = client(endpoint).await?;
    let call = async {
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await
    };
    match tokio::time::timeout(endpoint.timeout, call).await {
        Err(_) => Err(failure("timed out waiting for an X.509-SVID")),
        Ok(Err(status)) => Err(failure(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
        Ok(Ok(None)) => Err(failure("the agent closed the stream without an answer")),
        Ok(Ok(Some(response))) => Ok(response),
    }
}

fn write_svids(dir: &Path, response: &X509svidResponse) -> Result<(), CommandError> {
    std::fs::create_dir_all(dir).map_err(|err| failure(format!("{}: {err}", dir.display())))?;
    for (index, svid) in response.svids.iter().enumerate() {
        let suffix = if index == 0 {
            String::new()
        } else {
            format!(".{index}")
        };
        let certs = split_der_certificates(&svid.x509_svid).map_err(failure)?;
        let bundle = split_der_certificates(&svid.bundle).map_err(failure)?;
        write_file(
            dir,
            &format!("svid{suffix}.pem"),
            pem_blocks("CERTIFICATE", &certs).as_bytes(),
            0o644,
        )?;
        write_file(
            dir,
            &format!("svid{suffix}.key"),
            pem_blocks("PRIVATE KEY", std::slice::from_ref(&svid.x509_svid_key)).as_bytes(),
            0o600,
        )?;
        write_file(
            dir,
            &format!("bundle{suffix}.pem"),
            pem_blocks("CERTIFICATE", &bundle).as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

/// Writes `name` in `dir` with `mode` from creation on (never world-readable first): a
/// fresh temporary file created with O_EXCL, then renamed over the target.
fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), CommandError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&temp)
        .and_then(|mut file| file.write_all(contents).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temp, &target));
    result.map_err(|err| {
        let _ = std::fs::remove_file(&temp);
        failure(format!("{}: {err}", target.display()))
    })
}

fn pem_blocks(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|der| pem::encode(&pem::Pem::new(tag, der.clone())))
        .collect()
}

/// Splits concatenated DER certificates (the Workload API's encoding) apart.
pub fn split_der_certificates(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(bytes)
            .map_err(|err| format!("invalid certificate in the response: {err}"))?;
        let used = bytes.len() - rest.len();
        out.push(bytes[..used].to_vec());
        bytes = rest;
    }
    Ok(out)
}

/// Prints each X.509-SVID update as it arrives (to stdout directly: a watch has no
/// end to collect output for).
async fn watch(count: Option<usize>, endpoint: &Endpoint) -> Result<String, CommandError> {
    use std::io::Write;
    let mut client = client(endpoint).await?;
    let open = client.fetch_x509svid(with_header(X509svidRequest {}));
    let mut stream = match tokio::time::timeout(endpoint.timeout, open).await {
        Err(_) => return Err(failure("timed out waiting for the agent")),
        Ok(Err(status)) => {
            return Err(failure(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            )));
        }
        Ok(Ok(response)) => response.into_inner(),
    };
    let mut seen = 0;
    while count.is_none_or(|count| seen < count) {
        let update = match stream.message().await {
            Ok(Some(update)) => update,
            Ok(None) => return Err(failure("the agent ended the stream")),
            Err(status) => {
                return Err(failure(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )));
            }
        };
        seen += 1;
        let mut svids = Vec::new();
        for svid in &update.svids {
            let certs = split_der_certificates(&svid.x509_svid).map_err(failure)?;
            let leaf = certs.first().ok_or_else(|| failure("empty X.509-SVID"))?;
            let info = tessera_plugin_sdk::x509::leaf_info(leaf)
                .map_err(|err| failure(err.to_string()))?;
            svids.push(info);
        }
        let line = match endpoint.output {
            Output::Text => {
                let mut text = format!("Update {seen}: {} svid(s)\n", svids.len());
                for info in &svids {
                    text.push_str(&format!(
                        "  {}  serial {}  expires {}\n",
                        info.spiffe_id,
                        info.serial_hex,
                        rfc3339(info.not_after)
                    ));
                }
                text
            }
            Output::Json => format!(
                "{}\n",
                json!({ "update": seen, "svids": svids.iter().map(|i| json!({
                    "spiffe_id": i.spiffe_id.to_string(), "serial": i.serial_hex, "expires_at": rfc3339(i.not_after),
                })).collect::<Vec<_>>() })
            ),
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }
    Ok(String::new())
}

fn struct_to_json(value: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    value
        .fields
        .into_iter()
        .map(|(key, value)| (key, value_to_json(value)))
        .collect()
}

fn value_to_json(value: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(|n| {
                // Whole numbers (exp, iat) print as integers.
                if n.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                {
                    serde_json::Value::from(n.as_f64().map_or(0, |f| f as i64))
                } else {
                    serde_json::Value::Number(n)
                }
            })
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.into_iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(object)) => serde_json::Value::Object(struct_to_json(object)),
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Runs a client command; returns what to print.
pub async fn run_client(command: Command) -> Result<String, CommandError> {
    match command {
        Command::Run { .. } => Err(CommandError {
            code: 64,
            message: "`run` is not a client command".into(),
        }),
        Command::Api(ApiCommand::Fetch(FetchCommand::X509 { write, endpoint })) => {
            let response = first_x509(&endpoint).await?;
            let mut described = Vec::new();
            for svid in &response.svids {
                let certs = split_der_certificates(&svid.x509_svid).map_err(failure)?;
                let leaf = certs.first().ok_or_else(|| failure("empty X.509-SVID"))?;
                let info = tessera_plugin_sdk::x509::leaf_info(leaf)
                    .map_err(|err| failure(err.to_string()))?;
                described.push((svid, info, certs.len()));
            }
            if let Some(dir) = &write {
                write_svids(dir, &response)?;
            }
            Ok(match endpoint.output {
                Output::Text => {
                    let mut out = format!("Received {} svid(s)\n", described.len());
                    for (svid, info, chain_len) in &described {
                        out.push_str(&format!(
                            "\nSPIFFE ID        : {}\nSerial           : {}\nExpires at       : {}\nChain length     : {}\n",
                            info.spiffe_id,
                            info.serial_hex,
                            rfc3339(info.not_after),
                            chain_len
                        ));
                        if !svid.hint.is_empty() {
                            out.push_str(&format!("Hint             : {}\n", svid.hint));
                        }
                    }
                    if let Some(dir) = &write {
                        out.push_str(&format!(
                            "\nWrote svid.pem, svid.key and bundle.pem to {}\n",
                            dir.display()
                        ));
                    }
                    out
                }
                Output::Json => format!(
                    "{}\n",
                    json!({
                        "svids": described.iter().map(|(svid, info, chain_len)| json!({
                            "spiffe_id": info.spiffe_id.to_string(),
                            "serial": info.serial_hex,
                            "not_before": rfc3339(info.not_before),
                            "expires_at": rfc3339(info.not_after),
                            "chain_length": chain_len,
                            "hint": svid.hint,
                        })).collect::<Vec<_>>(),
                        "written_to": write.as_ref().map(|d| d.display().to_string()),
                    })
                ),
            })
        }
        Command::Api(ApiCommand::Fetch(FetchCommand::Jwt {
            audience,
            spiffe_id,
            endpoint,
        })) => {
            let mut client = client(&endpoint).await?;
            let request = with_header(JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.unwrap_or_default(),
            });
            let response =
                match tokio::time::timeout(endpoint.timeout, client.fetch_jwtsvid(request)).await {
                    Err(_) => return Err(failure("timed out waiting for a JWT-SVID")),
                    Ok(Err(status)) => {
                        return Err(failure(format!(
                            "{:?}: {}",
                            status.code(),
                            status.message()
                        )));
                    }
                    Ok(Ok(response)) => response.into_inner(),
                };
            Ok(match endpoint.output {
                Output::Text => response
                    .svids
                    .iter()
                    .map(|svid| {
                        let hint = if svid.hint.is_empty() {
                            String::new()
                        } else {
                            format!(" (hint {})", svid.hint)
                        };
                        format!("token({}){hint}:\n\t{}\n", svid.spiffe_id, svid.svid)
                    })
                    .collect(),
                Output::Json => format!(
                    "{}\n",
                    json!({ "svids": response.svids.iter().map(|s| json!({
                        "spiffe_id": s.spiffe_id, "token": s.svid, "hint": s.hint,
                    })).collect::<Vec<_>>() })
                ),
            })
        }
        Command::Api(ApiCommand::Validate(ValidateCommand::Jwt {
            audience,
            token,
            endpoint,
        })) => {
            let token = match token {
                Some(token) => token,
                None => {
                    let mut text = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(
                        |err| failure(format!("cannot read the token from stdin: {err}")),
                    )?;
                    text.trim().to_owned()
                }
            };
            let mut client = client(&endpoint).await?;
            let request = with_header(ValidateJwtsvidRequest {
                audience,
                svid: token,
            });
            let response = match tokio::time::timeout(
                endpoint.timeout,
                client.validate_jwtsvid(request),
            )
            .await
            {
                Err(_) => return Err(failure("timed out waiting for the agent")),
                Ok(Err(status)) => {
                    return Err(failure(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    )));
                }
                Ok(Ok(response)) => response.into_inner(),
            };
            let claims = response.claims.map(struct_to_json).unwrap_or_default();
            Ok(match endpoint.output {
                Output::Text => format!(
                    "SVID is valid.\nSPIFFE ID : {}\nClaims    : {}\n",
                    response.spiffe_id,
                    serde_json::Value::Object(claims)
                ),
                Output::Json => format!(
                    "{}\n",
                    json!({ "valid": true, "spiffe_id": response.spiffe_id, "claims": claims })
                ),
            })
        }
        Command::Api(ApiCommand::Watch { count, endpoint }) => watch(count, &endpoint).await,
        Command::Healthcheck(endpoint) => {
            let mut client = client(&endpoint).await?;
            let call = async {
                let mut stream = client
                    .fetch_x509_bundles(with_header(X509BundlesRequest {}))
                    .await?
                    .into_inner();
                stream.message().await
            };
            let (healthy, detail) = match tokio::time::timeout(endpoint.timeout, call).await {
                Err(_) => (false, "timed out".to_owned()),
                Ok(Ok(_)) => (true, "serving".to_owned()),
                Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
                    (true, "serving (this caller has no identity)".to_owned())
                }
                Ok(Err(status)) => (false, format!("{:?}: {}", status.code(), status.message())),
            };
            let text = match endpoint.output {
                Output::Text if healthy => format!("Agent is healthy: {detail}\n"),
                Output::Text => String::new(),
                Output::Json => format!("{}\n", json!({ "healthy": healthy, "detail": detail })),
            };
            if healthy {
                Ok(text)
            } else {
                Err(failure(format!("agent is unhealthy: {detail}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(
            socket_path(Some("/a/b.sock")).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert_eq!(
            socket_path(Some("unix:///a/b.sock")).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert_eq!(
            socket_path(Some("unix:/a/b.sock")).unwrap(),
            PathBuf::from("/a/b.sock")
        );
        assert_eq!(socket_path(Some("tcp://127.0.0.1:1")).unwrap_err().code, 64);
        assert_eq!(socket_path(Some("relative.sock")).unwrap_err().code, 64);
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
