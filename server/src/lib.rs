//! The tessera server library: signing CA, datastore, node API for agents and admin
//! API for operators. `main.rs` is a thin wrapper over [`start`] and the [`cli`].
//!
//! It owns the trust domain's CA and the registration data; it does not attest
//! workloads (agents do) and it never sees a workload's private key.

pub mod admin;
pub mod ca;
pub mod cli;
pub mod config;
pub mod datastore;
pub mod error;
pub mod federation;
pub mod jwt_authority;
pub mod node;
pub mod rotation;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::socket::{prepare_socket_dir, remove_stale_socket, set_socket_mode};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

use crate::config::{DatastoreConfig, ServerConfig};
use crate::datastore::Datastore;
use crate::rotation::{Rotation, RotationConfig};
use crate::state::{CurrentCrl, ServerState};
use crate::tls::{BundleClientVerifier, ServerCertSlot};
use tessera_audit::{AuditLog, ServerEvent};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A file or socket could not be prepared.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA could not be loaded or created.
    #[error("CA: {0}")]
    Ca(#[from] ca::CaError),
    /// The signing keys could not be loaded, created, rotated or published.
    #[error("signing keys: {0}")]
    Rotation(#[from] rotation::RotationError),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Datastore(#[from] datastore::DatastoreError),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// The audit log could not be opened.
    #[error("audit log: {0}")]
    Audit(#[from] tessera_audit::AuditError),
    /// A task of the server failed.
    #[error("{0}")]
    Task(String),
    /// A node attestor could not be set up from its configuration.
    #[error("node attestor: {0}")]
    NodeAttestor(#[from] tessera_plugin_x509pop::ConfigError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// A started server. Dropping it does not stop it: call [`RunningServer::stop`].
#[derive(Debug)]
pub struct RunningServer {
    node_address: SocketAddr,
    admin_socket: PathBuf,
    federation_address: Option<SocketAddr>,
    state: Arc<ServerState>,
    tasks: JoinSet<Result<(), ServerError>>,
}

impl RunningServer {
    /// The address the node API listens on.
    pub fn node_address(&self) -> SocketAddr {
        self.node_address
    }

    /// The address of the bundle endpoint, when `[server.federation]` configures one.
    pub fn federation_address(&self) -> Option<SocketAddr> {
        self.federation_address
    }

    /// The admin API socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The CA certificate (DER), i.e. what an agent bootstraps from.
    pub fn ca_certificate_der(&self) -> Vec<u8> {
        self.state.ca.certificate_der().to_vec()
    }

    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Stops accepting, ends streams, removes the admin socket and waits for every task.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.state.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server stops (after its shutdown token is cancelled or a task
    /// fails), then cleans up.
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        let mut result = Ok(());
        while let Some(joined) = self.tasks.join_next().await {
            let outcome = joined
                .map_err(|err| ServerError::Task(err.to_string()))
                .and_then(|r| r);
            if let Err(err) = outcome {
                self.state.shutdown.cancel();
                if result.is_ok() {
                    result = Err(err);
                }
            }
        }
        let _ = std::fs::remove_file(&self.admin_socket);
        let audit = self.state.audit.clone();
        match tokio::task::spawn_blocking(move || audit.flush_blocking()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "cannot flush the audit log"),
            Err(err) => tracing::error!(error = %err, "audit log flush task failed"),
        }
        tracing::info!("server stopped");
        result
    }
}

/// Starts the server: audit log, CA, datastore, node API on TCP, admin API on its Unix
/// socket.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let state = prepare_state(config).await?;
    serve(state).await
}

/// Everything the APIs share, before anything is served: opens the audit log (its first
/// record is `audit_started`), loads or creates the CA and the JWT key, opens the
/// datastore, publishes the bundle and builds the CRL.
pub async fn prepare_state(config: ServerConfig) -> Result<Arc<ServerState>, ServerError> {
    let data_dir = config.data_dir.clone();
    let audit_path = config.audit_log_path.clone();
    let audit = tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
        // First, so that nothing is served unaudited; `audit_started` is its first record.
        let audit = match audit_path {
            Some(path) => AuditLog::<ServerEvent>::open(&path, "server")?,
            None => AuditLog::disabled(),
        };
        audit.record(ServerEvent::AuditStarted {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        });
        tessera_plugin_sdk::fs::ensure_private_dir(&data_dir)
            .map_err(io_error(format!("data_dir {}", data_dir.display())))?;
        Ok(audit)
    })
    .await
    .map_err(|err| ServerError::Task(err.to_string()))??;

    // The x509pop CA bundle is read once, at start: a bad bundle stops the server.
    let x509pop = match config.node_attestors.x509pop.clone() {
        Some(x509pop) => Some(Arc::new(
            tokio::task::spawn_blocking(move || {
                let cas = tessera_plugin_x509pop::load_ca_bundle(&x509pop.ca_bundle_path)?;
                tessera_plugin_x509pop::X509PopVerifier::new(
                    cas,
                    tessera_plugin_x509pop::Limits::default()
                        .with_max_intermediates(x509pop.max_intermediates)
                        .with_max_rsa_key_size(x509pop.max_rsa_key_size),
                )
            })
            .await
            .map_err(|err| ServerError::Task(err.to_string()))??,
        )),
        None => None,
    };

    let datastore: Arc<dyn Datastore> = match &config.datastore {
        DatastoreConfig::Sqlite => {
            datastore::open_sqlite(&config.data_dir.join("datastore.sqlite3")).await?
        }
        DatastoreConfig::Postgres(pg) => datastore::open_postgres(pg).await.map_err(|err| {
            // `err` alone says "datastore unavailable" (the words agents get); at start
            // the operator needs the cause, which names the server, never the password.
            let mut message = format!("datastore: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            ServerError::Task(message)
        })?,
    };
    // The keys, from the key manager and the rotation journal; published before
    // anything signs with them.
    let stored = datastore.get_bundle(config.trust_domain.name()).await?;
    let rotation = Arc::new(
        Rotation::open(
            RotationConfig::from_server(&config),
            &config.key_manager,
            &config.data_dir,
            stored.as_ref(),
            SystemTime::now(),
        )
        .await?,
    );
    rotation
        .publish(datastore.as_ref(), SystemTime::now())
        .await?;
    let ca = Arc::clone(rotation.x509());
    let jwt = Arc::clone(rotation.jwt());

    let revision = datastore.current_revision().await?;
    let (revisions, _) = watch::channel(revision);
    let shutdown = CancellationToken::new();
    let state = Arc::new(ServerState {
        config,
        datastore,
        ca,
        jwt,
        rotation,
        x509_svids_signed: AtomicU64::new(0),
        jwt_svids_signed: AtomicU64::new(0),
        revisions,
        crl: watch::channel(Arc::new(CurrentCrl::default())).0,
        crl_refresh: tokio::sync::Mutex::new(()),
        audit,
        shutdown,
        federation: federation::FederationState::default(),
        x509pop,
    });
    if let Err(err) = state.refresh_crl().await {
        tracing::error!(error = %err, "cannot build the CRL; agents get none until it can be");
    }
    Ok(state)
}

/// Serves the node and admin APIs over `state` and starts the background tasks.
async fn serve(state: Arc<ServerState>) -> Result<RunningServer, ServerError> {
    let provider = tls::provider();
    let server_id = state
        .server_id()
        .map_err(|err| ServerError::Task(err.to_string()))?;
    let (server_key, renew_in) = issue_server_svid(&state, &server_id)?;
    let cert_slot = Arc::new(ServerCertSlot::new(server_key));
    // Agents may hold SVIDs of any server sharing the datastore: trust the stored
    // bundle, which holds every server's CAs.
    let authorities = trusted_authorities(&state).await?;
    let verifier = Arc::new(BundleClientVerifier::new(
        &authorities,
        Arc::clone(&provider),
    )?);
    let tls_config = tls::server_config(Arc::clone(&cert_slot), Arc::clone(&verifier), provider)?;

    let listener = TcpListener::bind(state.config.bind_address)
        .await
        .map_err(io_error(format!(
            "bind node API on {}",
            state.config.bind_address
        )))?;
    let node_address = listener
        .local_addr()
        .map_err(io_error("node API address"))?;

    let admin_socket = state.config.admin_socket_path.clone();
    let admin_listener = bind_admin_socket(&admin_socket, !state.config.admin_uids.is_empty())?;

    let mut tasks = JoinSet::new();
    let (conn_tx, conn_rx) = mpsc::channel(64);
    tasks.spawn(tls_accept(
        listener,
        tls_config,
        conn_tx,
        state.shutdown.clone(),
    ));
    let node_service = tessera_proto::node::node_server::NodeServer::new(node::NodeService::new(
        Arc::clone(&state),
    ));
    let node_shutdown = state.shutdown.clone();
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(node_service)
            .serve_with_incoming_shutdown(
                ReceiverStream::new(conn_rx),
                node_shutdown.cancelled_owned(),
            )
            .await
            .map_err(|err| ServerError::Task(format!("node API: {err}")))
    });
    let admin_service = tessera_proto::admin::admin_server::AdminServer::new(
        admin::AdminService::new(Arc::clone(&state)),
    );
    let admin_shutdown = state.shutdown.clone();
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(admin_service)
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(admin_listener),
                admin_shutdown.cancelled_owned(),
            )
            .await
            .map_err(|err| ServerError::Task(format!("admin API: {err}")))
    });
    let federation_address = federation::start(&state, Arc::clone(&cert_slot), &mut tasks).await?;
    tasks.spawn(renew_server_svid(
        Arc::clone(&state),
        server_id,
        cert_slot,
        renew_in,
    ));
    tasks.spawn(maintenance(Arc::clone(&state)));
    tasks.spawn(rotate_keys(Arc::clone(&state)));
    tasks.spawn(follow_bundle(Arc::clone(&state), verifier));
    if let Some(notifications) = state.datastore.change_notifications() {
        tasks.spawn(follow_other_servers(Arc::clone(&state), notifications));
    }

    tracing::info!(
        trust_domain = %state.config.trust_domain,
        node_address = %node_address,
        admin_socket = %admin_socket.display(),
        "server started"
    );
    Ok(RunningServer {
        node_address,
        admin_socket,
        federation_address,
        state,
        tasks,
    })
}

async fn tls_accept(
    listener: TcpListener,
    config: rustls::ServerConfig,
    out: mpsc::Sender<std::io::Result<tls::NodeConnection>>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    tls::accept_loop(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        out,
        shutdown,
    )
    .await;
    Ok(())
}

/// Lifetime of the server's own TLS SVID.
const SERVER_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// Issues the server's TLS SVID with a fresh key; returns it and when to renew it.
fn issue_server_svid(
    state: &ServerState,
    server_id: &tessera_plugin_sdk::SpiffeId,
) -> Result<(rustls::sign::CertifiedKey, Duration), ServerError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|err| ServerError::Task(format!("server key: {err}")))?;
    let issued = state.ca.sign_x509_svid(
        &rcgen::PublicKeyData::subject_public_key_info(&key),
        server_id,
        &[],
        SERVER_SVID_TTL,
    )?;
    let lifetime = issued
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    // With an upstream authority the chain carries the CA and the upstream
    // intermediates, so agents verify it up to the upstream root.
    let certified = tls::certified_key(issued.cert_chain(), key.serialize_der())?;
    Ok((certified, (lifetime / 2).max(Duration::from_millis(500))))
}

async fn renew_server_svid(
    state: Arc<ServerState>,
    server_id: tessera_plugin_sdk::SpiffeId,
    slot: Arc<ServerCertSlot>,
    renew_in: Duration,
) -> Result<(), ServerError> {
    let mut renew_at = tokio::time::Instant::now() + renew_in;
    // A new CA or JWT key became active: renew at once, so the server's SVID comes
    // from the CA that signs now.
    let mut activations = state.rotation.activations();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            changed = activations.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(renew_at) => {}
        }
        match issue_server_svid(&state, &server_id) {
            Ok((key, next)) => {
                slot.replace(key);
                renew_at = tokio::time::Instant::now() + next;
                tracing::debug!("server SVID renewed");
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot renew the server SVID; retrying in 30s");
                renew_at = tokio::time::Instant::now() + Duration::from_secs(30);
            }
        }
    }
}

/// Checks the rotation schedule of the CA and JWT keys and publishes this server's keys
/// when they change (agents receive the bundle through `Sync`; [`follow_bundle`] makes
/// the node API trust it). A key manager or datastore failure keeps the current keys;
/// the step is retried at the next check.
async fn rotate_keys(state: Arc<ServerState>) -> Result<(), ServerError> {
    let interval = state.rotation.check_interval();
    // A publication that failed is retried even when the keys did not change since.
    let mut unpublished = false;
    let mut published_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
        // Published again now and then even without a change: a datastore restored
        // from a backup, or another server that wrote under this server's id, gets
        // this server's keys back. Storing an unchanged contribution records nothing.
        if published_at.elapsed() >= REPUBLISH_INTERVAL {
            unpublished = true;
        }
        match state.rotation.tick(SystemTime::now()).await {
            Ok(changed) => unpublished |= changed,
            Err(err) if err.is_unavailable() => {
                tracing::warn!(error = %err, "key rotation postponed; keeping the current keys");
            }
            Err(err) => {
                tracing::error!(error = %err, "key rotation failed; keeping the current keys")
            }
        }
        if !unpublished {
            continue;
        }
        match state
            .rotation
            .publish(state.datastore.as_ref(), SystemTime::now())
            .await
        {
            Ok(changed) => {
                unpublished = false;
                published_at = tokio::time::Instant::now();
                if changed {
                    state.publish_revision().await;
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot publish the bundle; retrying"),
        }
    }
}

/// Makes the node API trust the trust domain's bundle as stored, whoever changed it
/// (this server's rotation, or another server sharing the datastore), plus this
/// server's own keys whatever the stored bundle says: a datastore restored from an old
/// backup, or a contribution overwritten by a server with the same id, must never lock
/// this server out of its own agents. Re-read after every revision of the change feed
/// and every [`BUNDLE_RECHECK`]; applied when the set of authorities changed.
async fn follow_bundle(
    state: Arc<ServerState>,
    verifier: Arc<BundleClientVerifier>,
) -> Result<(), ServerError> {
    let mut revisions = state.revisions.subscribe();
    let mut trusted: Vec<Vec<u8>> = Vec::new();
    loop {
        match trusted_authorities(&state).await {
            Ok(authorities) if authorities != trusted => match verifier.update(&authorities) {
                Ok(()) => {
                    tracing::debug!(
                        authorities = authorities.len(),
                        "node API trusts the current bundle"
                    );
                    trusted = authorities;
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot trust the new bundle on the node API");
                }
            },
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot read the bundle; retrying"),
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            changed = revisions.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(BUNDLE_RECHECK) => {}
        }
    }
}

/// The X.509 authorities the node API trusts: the stored bundle's, then this server's
/// own that it lacks.
async fn trusted_authorities(state: &ServerState) -> Result<Vec<Vec<u8>>, ServerError> {
    let mut authorities = state
        .bundle()
        .await
        .map_err(|err| ServerError::Task(format!("trust bundle: {err}")))?
        .x509_authorities;
    let (own, _) = state.rotation.bundle_content().await?;
    for der in own {
        if !authorities.contains(&der) {
            authorities.push(der);
        }
    }
    Ok(authorities)
}

/// How often [`follow_other_servers`] reads the change feed's revision without a
/// notification.
const FEED_POLL: Duration = Duration::from_secs(5);

/// How often [`rotate_keys`] stores this server's keys even when they did not change.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(300);

/// How often [`follow_bundle`] re-reads the bundle without a revision to wake it.
const BUNDLE_RECHECK: Duration = Duration::from_secs(30);

/// Wakes this server's `Sync` streams for changes written by other servers sharing the
/// datastore (PostgreSQL `LISTEN`), and rebuilds the CRL when their revocations change
/// what it lists. Also polls every [`FEED_POLL`]: a listening connection that died
/// without the kernel noticing delivers nothing, and nothing else would tell.
async fn follow_other_servers(
    state: Arc<ServerState>,
    mut notifications: watch::Receiver<u64>,
) -> Result<(), ServerError> {
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            changed = notifications.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(FEED_POLL) => {}
        }
        state.publish_revision().await;
        if let Err(err) = state.refresh_crl().await {
            tracing::warn!(error = %err, "cannot rebuild the CRL after another server's change");
        }
    }
}

/// How often [`maintenance`] runs.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(600);

/// How many revisions of the change feed are kept; an agent that fell further behind
/// gets a snapshot.
pub const CHANGE_FEED_KEEP: u64 = 100_000;

/// Periodic housekeeping: prunes the change feed, expired revocations and instance
/// serials, and rebuilds the CRL when its content or age calls for it.
async fn maintenance(state: Arc<ServerState>) -> Result<(), ServerError> {
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
        }
        match state.datastore.prune_changes(CHANGE_FEED_KEEP).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "change feed pruned"),
            Err(err) => tracing::warn!(error = %err, "cannot prune the change feed"),
        }
        match state.datastore.prune_revocations(SystemTime::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                pruned = n,
                "expired revocations and instance serials pruned"
            ),
            Err(err) => tracing::warn!(error = %err, "cannot prune expired revocations"),
        }
        if let Err(err) = state.refresh_crl().await {
            tracing::warn!(error = %err, "cannot rebuild the CRL");
        }
    }
}

/// Binds the admin socket in its own directory: 0700 (0711 when other admin uids are
/// configured, with the socket 0666, since the uid check is then the gate).
fn bind_admin_socket(path: &Path, shared: bool) -> Result<UnixListener, ServerError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let what = format!("admin socket {}", path.display());
    prepare_socket_dir(dir, if shared { 0o711 } else { 0o700 }).map_err(io_error(what.clone()))?;
    // The admin socket needs a directory of its own: one others may list or enter
    // (the Workload API's 0755 directory, SECURITY.md §3.5 item 48) is refused.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::symlink_metadata(dir)
            .map_err(io_error(what.clone()))?
            .permissions(),
    );
    let allowed = if shared { 0o711 } else { 0o700 };
    if mode & 0o777 & !allowed != 0 {
        return Err(ServerError::Io {
            what: what.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "directory {} is mode {:o}: give the admin socket its own directory \
                     (mode {allowed:o}), never the Workload API socket's",
                    dir.display(),
                    mode & 0o777
                ),
            ),
        });
    }
    remove_stale_socket(path).map_err(io_error(what.clone()))?;
    let listener = UnixListener::bind(path).map_err(io_error(what.clone()))?;
    set_socket_mode(path, if shared { 0o666 } else { 0o600 }).map_err(io_error(what))?;
    Ok(listener)
}
