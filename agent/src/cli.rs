//! The `tessera-agent` command line: `run`, and the Workload API client commands
//! (`api fetch x509`, `healthcheck`) that any workload can use. Exit codes: 0 ok,
//! 1 failure, 64 usage or configuration error.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{X509BundlesRequest, X509svidRequest, X509svidResponse};
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
}

/// `api fetch` subcommands.
#[derive(Debug, Subcommand)]
pub enum FetchCommand {
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
