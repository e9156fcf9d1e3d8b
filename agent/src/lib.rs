//! The tessera agent library: node attestation and agent SVID renewal, the `Sync`
//! stream and SVID manager, caller identification, per-caller (templated) identities,
//! revocations, the audit log, and the SPIFFE Workload API on a Unix socket. `main.rs`
//! is a thin wrapper over [`start`] and the [`cli`].
//!
//! It never signs anything: every SVID comes from the server, for a key the agent
//! generated; the agent decides only which caller receives which of them.
//!
//! When the server bans or evicts the agent (the last `Sync` message says so, or a node
//! call answers `PermissionDenied` "agent is banned" / "agent must re-attest"), the
//! agent logs one error line, stops serving, deletes its SVID and key from `data_dir`,
//! and [`RunningAgent::wait`] returns [`AgentError::Banned`] or [`AgentError::Evicted`]
//! (`tessera-agent run` exits 1). Other node API failures are retried with backoff; with
//! several servers configured, a server that cannot be reached, answers `Unavailable` or
//! does not answer within the call's deadline is left for the next one first ([`node`]).

pub mod attest;
mod backoff;
pub mod cache;
pub mod cli;
pub mod config;
pub mod error;
pub mod federation;
pub mod instances;
pub mod interpreters;
pub mod jwt_cache;
pub mod limits;
pub mod manager;
pub mod node;
pub mod peer;
pub mod signer;
pub mod store;
#[cfg(test)]
mod testing;
pub mod tls;
pub mod workload_api;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tessera_audit::{AgentEvent, AuditLog};
use tessera_plugin_sdk::socket::{prepare_socket_dir, remove_stale_socket, set_socket_mode};
use tessera_plugin_sdk::{SpiffeId, WorkloadAttestor};
use tessera_proto::node::{AgentStatus, SyncResponse};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use crate::config::AgentConfig;
pub use crate::error::AgentError;

use crate::backoff::Backoff;
use crate::cache::{CacheSnapshot, TrustBundle};
use crate::config::WorkloadAttestorConfig;
use crate::instances::Instances;
use crate::jwt_cache::JwtCache;
use crate::manager::{SvidManager, renewal_time};
use crate::node::ServerConnection;
use crate::store::{AgentSvidFiles, Store, parse_pem_certificates};
use crate::tls::{AgentCredentials, ServerTrust, ServerVerifier};

/// A stored agent SVID this close to expiry is not reused at start.
const MIN_REMAINING_AT_START: Duration = Duration::from_secs(30);

/// A started agent. Call [`RunningAgent::stop`] (or cancel its shutdown token and
/// [`RunningAgent::wait`]). [`RunningAgent::wait`] also returns by itself when the agent
/// stops on its own: [`AgentError::Banned`] / [`AgentError::Evicted`] when the server
/// removed it, another error when a task failed.
#[derive(Debug)]
pub struct RunningAgent {
    agent_id: SpiffeId,
    socket_path: PathBuf,
    cache: watch::Receiver<Arc<CacheSnapshot>>,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), AgentError>>,
    store: Store,
    audit: AuditLog<AgentEvent>,
    instances: Instances,
    finished: bool,
}

impl RunningAgent {
    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    /// The Workload API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// True once the first `Sync` message has been applied.
    pub fn is_synced(&self) -> bool {
        self.cache.borrow().synced
    }

    /// The current cache snapshot.
    pub fn snapshot(&self) -> Arc<CacheSnapshot> {
        Arc::clone(&self.cache.borrow())
    }

    /// A token that stops the agent when cancelled (it is also cancelled when the agent
    /// stops on its own).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// (templated identities, processes holding them) held now.
    pub fn instance_identities(&self) -> (usize, usize) {
        self.instances.len()
    }

    /// Stops the agent: streams end, the socket is removed.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the agent stops: the shutdown token was cancelled (`Ok`), the server
    /// banned or evicted it ([`AgentError::Banned`], [`AgentError::Evicted`]: its SVID
    /// and key are deleted by then), or a task failed. Removes the socket, writes the
    /// `agent_stopping` audit record and flushes the audit log. A second call returns
    /// `Ok` at once.
    pub async fn wait(&mut self) -> Result<(), AgentError> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined
                .map_err(|err| AgentError::Task(err.to_string()))
                .and_then(|r| r);
            if let Err(err) = outcome {
                if !err.is_removed_by_server() {
                    // A removal was logged, once, where it was noticed.
                    tracing::error!(error = %err, "agent task failed; stopping");
                }
                self.shutdown.cancel();
                // The server's verdict explains every failure it causes: it wins.
                let removed = matches!(&result, Err(e) if AgentError::is_removed_by_server(e));
                if result.is_ok() || (err.is_removed_by_server() && !removed) {
                    result = Err(err);
                }
            }
        }
        if std::mem::replace(&mut self.finished, true) {
            return Ok(());
        }
        if matches!(&result, Err(err) if err.is_removed_by_server()) {
            // Again, now that no task can write it any more.
            let store = self.store.clone();
            if let Err(err) = blocking(move || store.delete_svid()).await {
                tracing::warn!(error = %err, "cannot delete the agent SVID");
            }
        }
        let _ = std::fs::remove_file(&self.socket_path);
        let reason = match &result {
            Ok(()) => "stopped".to_owned(),
            Err(AgentError::Banned) => "banned by the server".to_owned(),
            Err(AgentError::Evicted) => "evicted by the server: must attest again".to_owned(),
            Err(err) => format!("failed: {err}"),
        };
        self.audit.record(AgentEvent::AgentStopping { reason });
        flush_audit(&self.audit).await;
        tracing::info!("agent stopped");
        result
    }
}

/// Writes what the audit log has queued and syncs it, off the runtime.
async fn flush_audit(audit: &AuditLog<AgentEvent>) {
    if !audit.is_enabled() {
        return;
    }
    let audit = audit.clone();
    match tokio::task::spawn_blocking(move || audit.flush_blocking()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "cannot flush the audit log"),
        Err(err) => tracing::warn!(error = %err, "cannot flush the audit log"),
    }
}

/// Opens the audit log (`None`: disabled) and records `audit_started`.
async fn open_audit(path: Option<&Path>) -> Result<AuditLog<AgentEvent>, AgentError> {
    let audit = match path {
        Some(path) => {
            let path = path.to_owned();
            blocking(move || {
                AuditLog::open(&path, "agent").map_err(|err| {
                    let mut text = err.to_string();
                    let mut source = std::error::Error::source(&err);
                    while let Some(cause) = source {
                        text.push_str(": ");
                        text.push_str(&cause.to_string());
                        source = cause.source();
                    }
                    AgentError::Audit(text)
                })
            })
            .await?
        }
        None => AuditLog::disabled(),
    };
    audit.record(AgentEvent::AuditStarted {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    Ok(audit)
}

/// How the server removed this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Banned,
    Evicted,
}

impl Removal {
    /// The removal a node API status announces: `PermissionDenied` "agent is banned" or
    /// "agent must re-attest".
    fn from_status(status: &tonic::Status) -> Option<Self> {
        if status.code() != tonic::Code::PermissionDenied {
            return None;
        }
        let message = status.message();
        if message.contains("agent is banned") {
            Some(Self::Banned)
        } else if message.contains("agent must re-attest") {
            Some(Self::Evicted)
        } else {
            None
        }
    }

    /// The removal the `agent_status` of a `Sync` message announces.
    fn from_sync(message: &SyncResponse) -> Option<Self> {
        match AgentStatus::try_from(message.agent_status) {
            Ok(AgentStatus::Banned) => Some(Self::Banned),
            Ok(AgentStatus::Evicted) => Some(Self::Evicted),
            _ => None,
        }
    }
}

/// What the agent does when the server removes it: stop serving, delete its SVID and
/// key, say so once.
#[derive(Debug)]
struct Ouster {
    store: Store,
    shutdown: CancellationToken,
    socket_path: PathBuf,
    done: AtomicBool,
}

impl Ouster {
    async fn oust(&self, removal: Removal) -> AgentError {
        let error = match removal {
            Removal::Banned => AgentError::Banned,
            Removal::Evicted => AgentError::Evicted,
        };
        if self.done.swap(true, Ordering::SeqCst) {
            return error;
        }
        match removal {
            Removal::Banned => tracing::error!(
                "this agent was banned by the server; stopping and deleting its SVID"
            ),
            Removal::Evicted => tracing::error!(
                "this agent was evicted by the server; stopping and deleting its SVID (start it again with a new join token)"
            ),
        }
        self.shutdown.cancel();
        let store = self.store.clone();
        if let Err(err) = blocking(move || store.delete_svid()).await {
            tracing::warn!(error = %err, "cannot delete the agent SVID");
        }
        let _ = std::fs::remove_file(&self.socket_path);
        error
    }
}

fn attestors(config: &AgentConfig) -> attest::Attestors {
    let plugins = config
        .workload_attestors
        .iter()
        .map(|plugin| match plugin {
            WorkloadAttestorConfig::Unix(unix) => {
                Arc::new(tessera_plugin_unix::UnixAttestor::new(unix.clone()))
                    as Arc<dyn WorkloadAttestor>
            }
            WorkloadAttestorConfig::Systemd(systemd) => Arc::new(
                tessera_plugin_systemd::SystemdAttestor::new(systemd.clone()),
            ),
            WorkloadAttestorConfig::Cgroup(cgroup) => {
                Arc::new(tessera_plugin_cgroup::CgroupAttestor::new(cgroup.clone()))
            }
            WorkloadAttestorConfig::Container(container) => {
                // SECURITY.md §3.4 item 41: containers are only visible from the host
                // cgroup namespace.
                if let Some(warning) =
                    tessera_plugin_container::ContainerAttestor::cgroup_namespace_warning(
                        &config.proc_root,
                    )
                {
                    tracing::warn!("container attestor: {warning}");
                }
                Arc::new(tessera_plugin_container::ContainerAttestor::new(
                    container.clone(),
                ))
            }
        })
        .collect();
    attest::Attestors::new(plugins, config.attestation_timeout)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| AgentError::Task(err.to_string()))?
}

/// Starts the agent: opens the audit log, loads or obtains its SVID (`join_token`
/// overrides the config's), connects to the server, binds the Workload API socket.
pub async fn start(
    config: AgentConfig,
    join_token: Option<String>,
) -> Result<RunningAgent, AgentError> {
    let audit = open_audit(config.audit_log_path.as_deref()).await?;
    match start_with(config, join_token, audit.clone()).await {
        Ok(agent) => Ok(agent),
        Err(err) => {
            audit.record(AgentEvent::AgentStopping {
                reason: format!("start failed: {err}"),
            });
            flush_audit(&audit).await;
            Err(err)
        }
    }
}

async fn start_with(
    config: AgentConfig,
    join_token: Option<String>,
    audit: AuditLog<AgentEvent>,
) -> Result<RunningAgent, AgentError> {
    // Checked again here (the config check ran at load): from now on every `/proc`
    // access goes through this descriptor, whatever the path names later.
    let proc_root = Arc::new(
        peer::ProcRoot::open(&config.proc_root)
            .map_err(|err| AgentError::Config(format!("agent.proc_root: {err}")))?,
    );
    let boot_id = proc_root.boot_id();
    if boot_id.is_none() {
        tracing::warn!(
            "cannot read the boot id from proc_root: entries with {{instance}} will not apply to any caller"
        );
    }
    if let Some(limit) = limits::raise_open_file_limit() {
        tracing::debug!(limit, "open-file limit");
    }
    // Refuse an unsafe socket directory or path before anything else (a join token is
    // single-use: do not spend it and then fail on the socket).
    check_workload_socket(&config.socket_path)?;
    let data_dir = config.data_dir.clone();
    let store = blocking(move || Store::open(&data_dir)).await?;
    let bootstrap = config.trust_bundle_path.clone();
    let stored_bundle = {
        let store = store.clone();
        blocking(move || store.load_bundle()).await?
    };
    let authorities = match (stored_bundle, bootstrap) {
        (Some(bundle), _) => bundle,
        (None, Some(path)) => {
            let text = tokio::fs::read(&path)
                .await
                .map_err(AgentError::io(format!(
                    "trust_bundle_path {}",
                    path.display()
                )))?;
            parse_pem_certificates(&text).map_err(|err| {
                AgentError::Config(format!("trust_bundle_path {}: {err}", path.display()))
            })?
        }
        (None, None) => {
            return Err(AgentError::Config(
                "no trust bundle: set trust_bundle_path for the first start (insecure bootstrap is not supported)"
                    .into(),
            ));
        }
    };
    let trust = Arc::new(ServerTrust::default());
    trust.set(&authorities);
    let server_id = SpiffeId::from_segments(&config.trust_domain, &["tessera", "server"])
        .map_err(|err| AgentError::Config(format!("server id: {err}")))?;
    let provider = tls::provider();
    let verifier = Arc::new(ServerVerifier::new(
        Arc::clone(&trust),
        server_id,
        Arc::clone(&provider),
    ));

    let stored = {
        let store = store.clone();
        blocking(move || store.load_svid()).await?
    };
    let now = SystemTime::now();
    // Index of the server to use first: the one that attested this agent, if it did.
    let mut first_server = 0;
    let own = match stored {
        Some(svid)
            if svid.not_after > now + MIN_REMAINING_AT_START
                && svid.spiffe_id.is_member_of(&config.trust_domain) =>
        {
            tracing::info!(agent_id = %svid.spiffe_id, "using the stored agent SVID");
            svid
        }
        stored => {
            if stored.is_some() {
                tracing::info!("the stored agent SVID has expired; attesting again");
            }
            let method = match (
                join_token.or_else(|| config.join_token.clone()),
                &config.x509pop,
            ) {
                (Some(token), _) => NodeAttestation::JoinToken(token),
                (None, Some(x509pop)) => NodeAttestation::X509Pop(x509pop.clone()),
                (None, None) => {
                    return Err(AgentError::Config(
                        "the agent has no valid SVID; attestation needs a join token (--join-token or join_token) or the x509pop node attestor".into(),
                    ));
                }
            };
            let (svid, server) = attest_agent(
                &config,
                &store,
                &trust,
                Arc::clone(&verifier),
                Arc::clone(&provider),
                method,
            )
            .await?;
            first_server = server;
            svid
        }
    };

    let credentials = Arc::new(AgentCredentials::default());
    credentials
        .set(own.chain.clone(), own.key_pkcs8.clone())
        .map_err(|err| AgentError::Crypto(format!("agent key: {err}")))?;
    let tls_config = tls::client_config(verifier, Some(Arc::clone(&credentials)), provider)
        .map_err(|err| AgentError::Crypto(err.to_string()))?;
    let connection = Arc::new(
        ServerConnection::new(&config.server_addresses, Arc::new(tls_config))?
            .starting_at(first_server),
    );

    let initial = CacheSnapshot {
        synced: false,
        revision: 0,
        bundle: Arc::new(TrustBundle {
            trust_domain: config.trust_domain.clone(),
            authorities,
            jwt: tessera_plugin_sdk::jwt::JwtBundle::new(config.trust_domain.clone(), Vec::new()),
            sequence_number: 0,
        }),
        entries: Arc::new(BTreeMap::new()),
        svids: Arc::new(HashMap::new()),
        revoked: Arc::new(cache::RevokedSet::default()),
        crls: Arc::new(Vec::new()),
        federated: Arc::default(),
        failing: Arc::default(),
    };
    let (cache_tx, cache_rx) = watch::channel(Arc::new(initial));
    let shutdown = CancellationToken::new();
    let listener = bind_workload_socket(&config.socket_path)?;

    let mut tasks = JoinSet::new();
    let (sync_tx, sync_rx) = mpsc::channel(64);
    let manager = SvidManager {
        trust_domain: config.trust_domain.clone(),
        connection: Arc::clone(&connection),
        cache: cache_tx,
        store: store.clone(),
        server_trust: trust,
    };
    let manager_shutdown = shutdown.clone();
    tasks.spawn(async move {
        manager.run(sync_rx, manager_shutdown).await;
        Ok(())
    });
    let ouster = Arc::new(Ouster {
        store: store.clone(),
        shutdown: shutdown.clone(),
        socket_path: config.socket_path.clone(),
        done: AtomicBool::new(false),
    });
    tasks.spawn(sync_loop(
        Arc::clone(&connection),
        sync_tx,
        Arc::clone(&ouster),
        shutdown.clone(),
    ));
    tasks.spawn(renew_loop(
        Arc::clone(&connection),
        store.clone(),
        credentials,
        own.clone(),
        ouster,
        shutdown.clone(),
    ));

    let signer: Arc<dyn signer::Signer> = connection;
    let jwts = Arc::new(JwtCache::default());
    let instances = Instances::new(
        config.max_instance_identities,
        boot_id,
        Arc::clone(&signer),
        Arc::clone(&jwts),
        audit.clone(),
        shutdown.clone(),
    );
    instances.follow(cache_rx.clone());
    let api = workload_api::WorkloadApi::new(workload_api::ApiParts {
        cache: cache_rx.clone(),
        attestors: attestors(&config),
        signer,
        instances: instances.clone(),
        jwts,
        requests: limits::RateLimiter::new(
            config.max_requests_per_second_per_uid,
            config.max_request_burst_per_uid,
        ),
        audit: audit.clone(),
        shutdown: shutdown.clone(),
    });
    let (conn_tx, conn_rx) = mpsc::channel(128);
    let accept_shutdown = shutdown.clone();
    let acceptor = workload_api::Acceptor {
        proc_root,
        sys: Arc::new(peer::KernelPeerSys),
        connections: limits::ConnectionLimiter::new(config.max_connections_per_uid),
    };
    tasks.spawn(async move {
        workload_api::accept_loop(listener, acceptor, conn_tx, accept_shutdown).await;
        Ok(())
    });
    let serve_shutdown = shutdown.clone();
    tasks.spawn(async move {
        workload_api::serve(api, conn_rx, serve_shutdown)
            .await
            .map_err(|err| AgentError::Task(format!("Workload API: {err}")))
    });

    tracing::info!(
        agent_id = %own.spiffe_id,
        socket = %config.socket_path.display(),
        server = %connection_address(&config, first_server),
        servers = config.server_addresses.len(),
        "agent started"
    );
    Ok(RunningAgent {
        agent_id: own.spiffe_id,
        socket_path: config.socket_path,
        cache: cache_rx,
        shutdown,
        tasks,
        store,
        audit,
        instances,
        finished: false,
    })
}

/// How the agent attests when it holds no valid SVID.
enum NodeAttestation {
    /// A join token (`--join-token` or `join_token`), used when given.
    JoinToken(String),
    /// The configured x509pop node attestor.
    X509Pop(config::X509PopAgentConfig),
}

/// A [`NodeAttestation`] ready to send: the x509pop files are loaded.
enum Prepared {
    JoinToken(String),
    X509Pop(Arc<tessera_plugin_x509pop::AgentCredentials>),
}

async fn attest_agent(
    config: &AgentConfig,
    store: &Store,
    trust: &ServerTrust,
    verifier: Arc<ServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    method: NodeAttestation,
) -> Result<(AgentSvidFiles, usize), AgentError> {
    // The x509pop files first: a bad certificate or key fails before any key is made.
    let credentials = match method {
        NodeAttestation::X509Pop(x509pop) => {
            let credentials = blocking(move || {
                tessera_plugin_x509pop::AgentCredentials::load(
                    &x509pop.certificate_path,
                    &x509pop.private_key_path,
                )
                .map_err(|err| AgentError::Config(format!("x509pop: {err}")))
            })
            .await?;
            tracing::info!(
                fingerprint = credentials.fingerprint(),
                "attesting with x509pop"
            );
            Prepared::X509Pop(Arc::new(credentials))
        }
        NodeAttestation::JoinToken(token) => Prepared::JoinToken(token),
    };
    let (key, csr) = blocking(store::new_key_and_csr).await?;
    let tls = Arc::new(
        tls::client_config(verifier, None, provider)
            .map_err(|err| AgentError::Crypto(err.to_string()))?,
    );
    // Every configured server may attest the agent: they share one datastore.
    let connection = ServerConnection::new(&config.server_addresses, tls)?;
    let svid = match credentials {
        Prepared::JoinToken(token) => {
            node::attest_with_join_token(&connection, &token, csr).await?
        }
        Prepared::X509Pop(x509pop) => node::attest_with_x509pop(&connection, x509pop, csr).await?,
    };
    let leaf = svid
        .cert_chain
        .first()
        .ok_or_else(|| AgentError::Attestation("server sent an empty certificate chain".into()))?;
    let info = tessera_plugin_sdk::x509::leaf_info(leaf)
        .map_err(|err| AgentError::Attestation(format!("agent SVID: {err}")))?;
    let chain = svid.cert_chain.clone();
    let bundle = svid
        .bundle
        .map(|b| b.x509_authorities)
        .filter(|a| !a.is_empty());
    if let Some(authorities) = &bundle {
        trust.set(authorities);
    }
    {
        let store = store.clone();
        let chain = chain.clone();
        let key = key.clone();
        blocking(move || {
            store.save_svid(&chain, &key)?;
            if let Some(authorities) = bundle {
                store.save_bundle(&authorities)?;
            }
            Ok(())
        })
        .await?;
    }
    tracing::info!(agent_id = %info.spiffe_id, server = %connection.current_address(), "node attestation succeeded");
    Ok((
        AgentSvidFiles {
            chain,
            key_pkcs8: key,
            spiffe_id: info.spiffe_id,
            not_after: info.not_after,
            not_before: info.not_before,
        },
        connection.current_index(),
    ))
}

/// The configured server at `index` (for the start log line).
fn connection_address(config: &AgentConfig, index: usize) -> &str {
    config
        .server_addresses
        .get(index)
        .map_or("", String::as_str)
}

/// The checks of [`bind_workload_socket`] without binding: the directory is ours (or
/// root's) and not writable by others, and nothing but a stale socket of ours is at the
/// path (SECURITY.md §3.5 items 45, 46, 49).
fn check_workload_socket(path: &Path) -> Result<(), AgentError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let what = format!("socket_path {}", path.display());
    prepare_socket_dir(dir, 0o755).map_err(AgentError::io(what.clone()))?;
    remove_stale_socket(path).map_err(AgentError::io(what))
}

/// Binds the Workload API socket: directory created 0755 (or checked), stale socket of
/// ours removed, socket 0777 (attestation is the gate, as in SPIRE).
fn bind_workload_socket(path: &Path) -> Result<UnixListener, AgentError> {
    check_workload_socket(path)?;
    let what = format!("socket_path {}", path.display());
    let listener = UnixListener::bind(path).map_err(AgentError::io(what.clone()))?;
    set_socket_mode(path, 0o777).map_err(AgentError::io(what))?;
    Ok(listener)
}

/// Follows the server's `Sync` stream, reconnecting with backoff and resuming from the
/// last revision received (on whichever configured server answers: they share one
/// datastore, so revisions mean the same on all). Opening the stream includes its first
/// message, within the call deadline ([`node::open_sync`]); once open, the stream may
/// stay silent as long as nothing changes, so a dead connection under it is left to
/// HTTP/2 keepalive, and when another call leaves the stream's server for the next one
/// (that server failed it), the stream moves there too. Ends with
/// [`AgentError::Banned`] / [`AgentError::Evicted`] when the server removes the agent
/// (the stream's last message says so, or the call is refused for that reason); every
/// other failure is retried.
async fn sync_loop(
    connection: Arc<ServerConnection>,
    updates: mpsc::Sender<SyncResponse>,
    ouster: Arc<Ouster>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut since = 0;
    let mut backoff = Backoff::new();
    let mut reachable_again = connection.reachable_again();
    let mut current = connection.watch_current();
    loop {
        let opened = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            opened = node::open_sync(&connection, since) => opened,
        };
        match opened {
            Ok(node::SyncStream {
                server,
                first,
                mut rest,
            }) => {
                let address = connection.address_at(server);
                // Whether the server in use moved while the stream was being opened.
                current.mark_changed();
                let mut next = Some(Ok(first));
                let moved = loop {
                    let message = match next.take() {
                        Some(message) => message,
                        None => tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            message = rest.message() => message,
                            Ok(()) = current.changed() => {
                                current.borrow_and_update();
                                if connection.current_index() != server {
                                    break true;
                                }
                                continue;
                            }
                        },
                    };
                    match message {
                        Ok(Some(message)) => {
                            if let Some(removal) = Removal::from_sync(&message) {
                                return Err(ouster.oust(removal).await);
                            }
                            backoff.succeeded();
                            since = message.revision;
                            if updates.send(message).await.is_err() {
                                return Ok(());
                            }
                        }
                        Ok(None) => {
                            tracing::info!(server = %address, "server ended the sync stream; reconnecting");
                            break false;
                        }
                        Err(status) => {
                            if let Some(removal) = Removal::from_status(&status) {
                                return Err(ouster.oust(removal).await);
                            }
                            tracing::warn!(server = %address, error = %node::describe(&status), "sync stream failed");
                            break false;
                        }
                    }
                };
                if moved {
                    // Another call found this server failing: follow it to the next one
                    // now (no backoff: nothing failed here).
                    tracing::info!(server = %address, next = %connection.current_address(), "node API moved to another server; moving the sync stream there");
                    continue;
                }
            }
            Err(status) => {
                if let Some(removal) = Removal::from_status(&status) {
                    return Err(ouster.oust(removal).await);
                }
                tracing::warn!(error = %node::describe(&status), "cannot open the sync stream");
            }
        }
        backoff.failed();
        reachable_again.mark_unchanged();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(backoff.retry_at()) => break,
                // Another call reached a server: reconnect sooner than at the end of
                // the backoff (within the limits of [`Backoff::woken`]).
                Ok(()) = reachable_again.changed(), if backoff.is_wakeable() => {
                    backoff.woken();
                }
            }
        }
    }
}

/// Renews the agent SVID at about half its lifetime (with jitter). A failed renewal is
/// retried with backoff while the SVID is valid; once it has expired the agent stops
/// loudly, since only a new attestation can help (SPIRE #2065). A ban or evict answer
/// stops the agent at once.
async fn renew_loop(
    connection: Arc<ServerConnection>,
    store: Store,
    credentials: Arc<AgentCredentials>,
    mut current: AgentSvidFiles,
    ouster: Arc<Ouster>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let mut next = renewal_time(SystemTime::now(), current.not_after);
    let mut backoff = Backoff::new();
    let mut reachable_again = connection.reachable_again();
    loop {
        reachable_again.mark_unchanged();
        loop {
            let wait = if backoff.is_failing() {
                backoff
                    .retry_at()
                    .saturating_duration_since(tokio::time::Instant::now())
            } else {
                next.duration_since(SystemTime::now()).unwrap_or_default()
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => break,
                // A failed renewal waits for its backoff, or until a call reaches a
                // server (within the limits of [`Backoff::woken`]).
                Ok(()) = reachable_again.changed(), if backoff.is_wakeable() => {
                    backoff.woken();
                }
            }
        }
        let (key, csr) = blocking(store::new_key_and_csr).await?;
        let renewed = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            renewed = node::renew(&connection, csr) => renewed,
        };
        match renewed {
            Ok(svid) => {
                let info = svid
                    .cert_chain
                    .first()
                    .map(|leaf| tessera_plugin_sdk::x509::leaf_info(leaf))
                    .transpose()
                    .map_err(|err| AgentError::Crypto(format!("renewed SVID: {err}")))?
                    .ok_or_else(|| AgentError::Crypto("renewed SVID: empty chain".into()))?;
                if shutdown.is_cancelled() {
                    // Stopping (perhaps removed by the server): keep nothing new on disk.
                    return Ok(());
                }
                {
                    let store = store.clone();
                    let chain = svid.cert_chain.clone();
                    let key = key.clone();
                    blocking(move || store.save_svid(&chain, &key)).await?;
                }
                credentials
                    .set(svid.cert_chain.clone(), key.clone())
                    .map_err(|err| AgentError::Crypto(err.to_string()))?;
                connection.reconnect()?;
                tracing::info!(agent_id = %info.spiffe_id, serial = %info.serial_hex, "agent SVID renewed");
                current = AgentSvidFiles {
                    chain: svid.cert_chain,
                    key_pkcs8: key,
                    spiffe_id: info.spiffe_id,
                    not_after: info.not_after,
                    not_before: info.not_before,
                };
                next = renewal_time(SystemTime::now(), current.not_after);
                backoff.succeeded();
            }
            Err(status) => {
                if let Some(removal) = Removal::from_status(&status) {
                    return Err(ouster.oust(removal).await);
                }
                if current.not_after <= SystemTime::now() {
                    return Err(AgentError::Rejected(format!(
                        "agent SVID expired and renewal failed ({}); re-attest with a new join token",
                        node::describe(&status)
                    )));
                }
                let wait = backoff.failed();
                tracing::warn!(error = %node::describe(&status), retry_in = ?wait, "agent SVID renewal failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sync_message(status: AgentStatus) -> SyncResponse {
        SyncResponse {
            agent_status: status as i32,
            ..SyncResponse::default()
        }
    }

    #[test]
    fn removals_are_recognised_and_nothing_else() {
        use tonic::Status;
        assert_eq!(
            Removal::from_status(&Status::permission_denied("agent is banned")),
            Some(Removal::Banned)
        );
        assert_eq!(
            Removal::from_status(&Status::permission_denied("agent must re-attest")),
            Some(Removal::Evicted)
        );
        for transient in [
            Status::unavailable("agent is banned"),
            Status::permission_denied("identity revoked"),
            Status::unavailable("connection refused"),
            Status::internal("boom"),
        ] {
            assert_eq!(Removal::from_status(&transient), None, "{transient:?}");
        }
        assert_eq!(
            Removal::from_sync(&sync_message(AgentStatus::Banned)),
            Some(Removal::Banned)
        );
        assert_eq!(
            Removal::from_sync(&sync_message(AgentStatus::Evicted)),
            Some(Removal::Evicted)
        );
        assert_eq!(Removal::from_sync(&sync_message(AgentStatus::Active)), None);
        let unknown = SyncResponse {
            agent_status: 99,
            ..SyncResponse::default()
        };
        assert_eq!(Removal::from_sync(&unknown), None);
    }

    fn test_ouster(dir: &Path) -> Arc<Ouster> {
        Arc::new(Ouster {
            store: Store::open(&dir.join("data")).unwrap(),
            shutdown: CancellationToken::new(),
            socket_path: dir.join("agent.sock"),
            done: AtomicBool::new(false),
        })
    }

    #[tokio::test]
    async fn the_sync_stream_moves_to_the_next_server_and_resumes_from_its_revision() {
        use crate::testing::{FakeCa, NodeMode};
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::new();
        let a = ca.serve("a", "spiffe://example.org/tessera/server").await;
        let b = ca.serve("b", "spiffe://example.org/tessera/server").await;
        let connection = Arc::new(
            ServerConnection::new(&[a.address.clone(), b.address.clone()], ca.client_tls())
                .unwrap(),
        );
        let (tx, mut rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sync_loop(
            Arc::clone(&connection),
            tx,
            test_ouster(dir.path()),
            shutdown.clone(),
        ));
        let next = async |rx: &mut mpsc::Receiver<SyncResponse>| {
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a sync message within 10 s")
                .expect("sync loop running")
        };
        assert_eq!(next(&mut rx).await.revision, 1, "a's snapshot");
        a.stop().await;
        // a is gone: b continues the stream from the last revision the agent holds.
        assert_eq!(next(&mut rx).await.revision, 2);
        assert_eq!(a.syncs(), [0]);
        assert_eq!(b.syncs(), [1], "resumed, not a new snapshot");
        assert_eq!(connection.current_address(), b.address);
        shutdown.cancel();
        task.await.unwrap().unwrap();

        // A ban is final: the loop ends with it, and no other server is asked.
        let c = ca.serve("c", "spiffe://example.org/tessera/server").await;
        let d = ca.serve("d", "spiffe://example.org/tessera/server").await;
        c.set_mode(NodeMode::Banned);
        let connection = Arc::new(
            ServerConnection::new(&[c.address.clone(), d.address.clone()], ca.client_tls())
                .unwrap(),
        );
        let (tx, _rx) = mpsc::channel(8);
        let dir = tempfile::tempdir().unwrap();
        let err = sync_loop(
            connection,
            tx,
            test_ouster(dir.path()),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AgentError::Banned), "{err}");
        assert_eq!((c.calls(), d.calls()), (1, 0));
    }

    /// A sync loop on `connection` (shortened time limits), its messages, and its
    /// shutdown token.
    fn spawn_sync_loop(
        connection: &Arc<ServerConnection>,
        dir: &Path,
    ) -> (
        mpsc::Receiver<SyncResponse>,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), AgentError>>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sync_loop(
            Arc::clone(connection),
            tx,
            test_ouster(dir),
            shutdown.clone(),
        ));
        (rx, shutdown, task)
    }

    async fn next_within(rx: &mut mpsc::Receiver<SyncResponse>, limit: Duration) -> SyncResponse {
        tokio::time::timeout(limit, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no sync message within {limit:?}"))
            .expect("sync loop running")
    }

    fn short_connection(ca: &testing::FakeCa, addresses: &[&str]) -> Arc<ServerConnection> {
        let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
        Arc::new(
            ServerConnection::with_timeouts(&addresses, ca.client_tls(), testing::short_timeouts())
                .unwrap(),
        )
    }

    /// A server that accepts the `Sync` call but never sends its first message is left
    /// at the call deadline; a stream whose connection goes dead without a word is
    /// found by keepalive; a stream follows the other calls off a failing server.
    #[tokio::test]
    async fn a_silent_or_stuck_sync_stream_moves_to_the_next_server() {
        use crate::testing::{FakeCa, NodeMode, Relay};
        const SERVER: &str = "spiffe://example.org/tessera/server";
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::new();
        let timeouts = testing::short_timeouts();

        // The first message never comes from a: b's, after a's deadline.
        let a = ca.serve("a", SERVER).await;
        let b = ca.serve("b", SERVER).await;
        a.set_mode(NodeMode::Hang);
        let connection = short_connection(&ca, &[&a.address, &b.address]);
        let started = tokio::time::Instant::now();
        let (mut rx, shutdown, task) = spawn_sync_loop(&connection, dir.path());
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            1
        );
        assert!(
            started.elapsed() >= timeouts.call,
            "{:?}",
            started.elapsed()
        );
        assert_eq!((a.sync_calls(), b.syncs()), (1, vec![0]));
        shutdown.cancel();
        task.await.unwrap().unwrap();

        // The connection to c goes dead without closing (c's host vanished): HTTP/2
        // keepalive (PING every 200 ms, 300 ms to answer) finds it, the stream resumes
        // on d.
        let c = ca.serve("c", SERVER).await;
        let d = ca.serve("d", SERVER).await;
        let relay = Relay::to(&c.address).await;
        let connection = short_connection(&ca, &[&relay.address, &d.address]);
        let (mut rx, shutdown, task) = spawn_sync_loop(&connection, dir.path());
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            1
        );
        relay.freeze();
        let frozen = tokio::time::Instant::now();
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            2
        );
        eprintln!("dead sync connection left after {:?}", frozen.elapsed());
        assert_eq!((c.syncs(), d.syncs()), (vec![0], vec![1]));
        assert_eq!(connection.current_address(), d.address);
        shutdown.cancel();
        task.await.unwrap().unwrap();

        // e's stream stays open and silent while e's handlers hang (the first message
        // was sent before): the renewal leaves e at its deadline, and the stream
        // follows it to f.
        let e = ca.serve("e", SERVER).await;
        let f = ca.serve("f", SERVER).await;
        let connection = short_connection(&ca, &[&e.address, &f.address]);
        let (mut rx, shutdown, task) = spawn_sync_loop(&connection, dir.path());
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            1
        );
        e.set_mode(NodeMode::Hang);
        let renewed = node::renew(&connection, vec![1]).await.unwrap();
        assert_eq!(renewed.spiffe_id, "f");
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            2
        );
        assert_eq!((e.syncs(), f.syncs()), (vec![0], vec![1]), "resumed on f");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    /// The review's partial outage: `Sync` fails on every server while other calls
    /// succeed (each announcing "reachable again"): the sync loop keeps (about) its
    /// backoff. After a full outage, a success still brings it back at once.
    #[tokio::test]
    async fn reachable_again_does_not_defeat_the_sync_backoff() {
        use crate::testing::{FakeCa, NodeMode};
        let dir = tempfile::tempdir().unwrap();
        let ca = FakeCa::new();
        let a = ca.serve("a", "spiffe://example.org/tessera/server").await;
        a.set_sync_mode(Some(NodeMode::Unavailable));
        let connection = short_connection(&ca, &[&a.address]);
        let (mut rx, shutdown, task) = spawn_sync_loop(&connection, dir.path());
        // A renewal every 20 ms for 3 s: each one succeeds after a failed Sync round.
        let started = tokio::time::Instant::now();
        let mut renewals = 0;
        while started.elapsed() < Duration::from_secs(3) {
            node::renew(&connection, vec![1]).await.unwrap();
            renewals += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let syncs = a.sync_calls();
        eprintln!("partial outage: {syncs} Sync calls, {renewals} renewals in 3 s");
        // Backoff alone: 0.5, 1, 2 s steps (jittered): 4 or 5 attempts; woken at most
        // every other step (never sooner than 0.5 s after a failure): at most 7.
        assert!((3..=7).contains(&syncs), "{syncs} Sync calls in 3 s");
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(rx.try_recv().is_err());

        // A full outage: the loop backs off to a 4 s step (a wait of 2 to 4 s after
        // the fourth failure); a success elsewhere brings it back within the floor.
        a.set_sync_mode(None);
        a.set_mode(NodeMode::Unavailable);
        let before = a.sync_calls();
        let (mut rx, shutdown, task) = spawn_sync_loop(&connection, dir.path());
        tokio::time::timeout(Duration::from_secs(10), async {
            while a.sync_calls() < before + 4 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("four Sync attempts within 10 s");
        a.set_mode(NodeMode::Serve);
        let back = tokio::time::Instant::now();
        node::renew(&connection, vec![1]).await.unwrap();
        assert_eq!(
            next_within(&mut rx, Duration::from_secs(5)).await.revision,
            1
        );
        let took = back.elapsed();
        eprintln!("full outage over: sync back after {took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_ban_stops_serving_and_deletes_the_svid_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data).unwrap();
        let (key, _) = store::new_key_and_csr().unwrap();
        let id = SpiffeId::parse_leaf("spiffe://example.org/tessera/agent/join_token/t").unwrap();
        let cert = testing::certificate(&id, Duration::from_secs(3600));
        store.save_svid(std::slice::from_ref(&cert), &key).unwrap();
        store.save_bundle(&[cert]).unwrap();
        let socket = dir.path().join("agent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let shutdown = CancellationToken::new();
        let ouster = Ouster {
            store: store.clone(),
            shutdown: shutdown.clone(),
            socket_path: socket.clone(),
            done: AtomicBool::new(false),
        };
        let err = ouster.oust(Removal::Banned).await;
        assert!(matches!(err, AgentError::Banned), "{err}");
        assert!(err.is_removed_by_server());
        assert_eq!(err.to_string(), "this agent was banned by the server");
        assert!(shutdown.is_cancelled(), "serving stops");
        assert!(store.load_svid().unwrap().is_none());
        assert!(!data.join("agent_key.pem").exists());
        assert!(!data.join("agent_svid.pem").exists());
        assert!(!socket.exists(), "the socket is closed and removed");
        assert!(store.load_bundle().unwrap().is_some());
        // Noticed again (another task): the same verdict, said once.
        assert!(matches!(
            ouster.oust(Removal::Banned).await,
            AgentError::Banned
        ));
        let evicted = Ouster {
            store,
            shutdown: CancellationToken::new(),
            socket_path: socket,
            done: AtomicBool::new(false),
        };
        assert!(matches!(
            evicted.oust(Removal::Evicted).await,
            AgentError::Evicted
        ));
    }

    #[tokio::test]
    async fn audit_log_starts_with_audit_started_and_refuses_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = open_audit(Some(&path)).await.unwrap();
        audit.record(AgentEvent::AgentStopping {
            reason: "stopped".into(),
        });
        flush_audit(&audit).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("\"event\":\"audit_started\""), "{text}");
        assert!(lines[1].contains("\"event\":\"agent_stopping\""), "{text}");
        // A world-readable file is refused: the agent does not start.
        let bad = dir.path().join("open.jsonl");
        std::fs::write(&bad, "").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = open_audit(Some(&bad)).await.unwrap_err();
        assert!(matches!(err, AgentError::Audit(_)), "{err}");
        assert!(open_audit(None).await.is_ok());
    }
}
