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
pub mod jwt_authority;
pub mod node;
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

use crate::ca::CertificateAuthority;
use crate::config::{DatastoreKind, ServerConfig};
use crate::datastore::{Datastore, StoredBundle, StoredJwtAuthority};
use crate::jwt_authority::JwtAuthority;
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
    /// The JWT signing key could not be loaded or created.
    #[error("JWT key: {0}")]
    Jwt(#[from] jwt_authority::JwtAuthorityError),
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
    state: Arc<ServerState>,
    tasks: JoinSet<Result<(), ServerError>>,
}

impl RunningServer {
    /// The address the node API listens on.
    pub fn node_address(&self) -> SocketAddr {
        self.node_address
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
    let td = config.trust_domain.clone();
    let ca_ttl = config.ca_ttl;
    let audit_path = config.audit_log_path.clone();
    let (audit, ca, jwt) = tokio::task::spawn_blocking(move || -> Result<_, ServerError> {
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
        let ca_dir = data_dir.join("ca");
        let ca = CertificateAuthority::load_or_create(&ca_dir, &td, ca_ttl)?;
        let jwt = JwtAuthority::load_or_create(&ca_dir)?;
        Ok((audit, ca, jwt))
    })
    .await
    .map_err(|err| ServerError::Task(err.to_string()))??;
    let ca = Arc::new(ca);
    let jwt = Arc::new(jwt);

    let datastore: Arc<dyn Datastore> = match config.datastore {
        DatastoreKind::Sqlite => {
            datastore::open_sqlite(&config.data_dir.join("datastore.sqlite3")).await?
        }
    };
    let current = jwt.current();
    let keys = JwtKeys {
        current: &current,
        prepared: None,
        retired: None,
    };
    publish_own_bundle(datastore.as_ref(), &config, &ca, keys).await?;

    let revision = datastore.current_revision().await?;
    let (revisions, _) = watch::channel(revision);
    let shutdown = CancellationToken::new();
    let state = Arc::new(ServerState {
        config,
        datastore,
        ca,
        jwt,
        x509_svids_signed: AtomicU64::new(0),
        jwt_svids_signed: AtomicU64::new(0),
        revisions,
        crl: watch::channel(Arc::new(CurrentCrl::default())).0,
        crl_refresh: tokio::sync::Mutex::new(()),
        audit,
        shutdown,
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
    let verifier = Arc::new(BundleClientVerifier::new(
        &[state.ca.certificate_der().to_vec()],
        Arc::clone(&provider),
    )?);
    let tls_config = tls::server_config(Arc::clone(&cert_slot), verifier, provider)?;

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
    tasks.spawn(renew_server_svid(
        Arc::clone(&state),
        server_id,
        cert_slot,
        renew_in,
    ));
    tasks.spawn(maintenance(Arc::clone(&state)));

    tracing::info!(
        trust_domain = %state.config.trust_domain,
        node_address = %node_address,
        admin_socket = %admin_socket.display(),
        "server started"
    );
    Ok(RunningServer {
        node_address,
        admin_socket,
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

/// The JWT keys a bundle publication is about.
#[derive(Debug, Clone, Copy)]
pub struct JwtKeys<'a> {
    /// The key that signs now.
    pub current: &'a tessera_plugin_sdk::jwt::JwtSigner,
    /// The next key, published before it signs anything.
    pub prepared: Option<&'a tessera_plugin_sdk::jwt::JwtSigner>,
    /// A key replaced just now: published until its tokens have expired.
    pub retired: Option<&'a StoredJwtAuthority>,
}

/// Publishes the trust domain's bundle: the CA certificate, the current (and prepared)
/// JWT key and the replaced JWT keys whose tokens may still be valid. Stores it,
/// bumping the sequence number, only when it changed; agents receive it through `Sync`.
/// Returns whether it changed.
pub async fn publish_own_bundle(
    datastore: &dyn Datastore,
    config: &ServerConfig,
    ca: &CertificateAuthority,
    keys: JwtKeys<'_>,
) -> Result<bool, ServerError> {
    let td = config.trust_domain.name();
    let x509_authorities = vec![ca.certificate_der().to_vec()];
    let stored = datastore.get_bundle(td).await?;
    let mut earlier: Vec<StoredJwtAuthority> = stored
        .as_ref()
        .map(|b| b.jwt_authorities.clone())
        .unwrap_or_default();
    earlier.splice(0..0, keys.retired.cloned());
    let jwt_authorities = jwt_authority::published_authorities(
        keys.current,
        keys.prepared,
        &earlier,
        config.max_jwt_svid_ttl,
        SystemTime::now(),
    );
    if stored.as_ref().is_some_and(|b| {
        b.x509_authorities == x509_authorities && b.jwt_authorities == jwt_authorities
    }) {
        return Ok(false);
    }
    let sequence_number = stored.map_or(1, |b| b.sequence_number + 1);
    datastore
        .set_bundle(StoredBundle {
            trust_domain: td.to_owned(),
            x509_authorities,
            jwt_authorities,
            sequence_number,
        })
        .await?;
    Ok(true)
}

/// How often the server checks whether its CA nears expiry.
const CA_EXPIRY_CHECK: Duration = Duration::from_secs(3600);

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
    let certified = tls::certified_key(vec![issued.der], key.serialize_der())?;
    Ok((certified, lifetime / 2))
}

async fn renew_server_svid(
    state: Arc<ServerState>,
    server_id: tessera_plugin_sdk::SpiffeId,
    slot: Arc<ServerCertSlot>,
    renew_in: Duration,
) -> Result<(), ServerError> {
    let mut renew_at = tokio::time::Instant::now() + renew_in;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(CA_EXPIRY_CHECK) => {
                state.ca.warn_if_expiring();
                // Drops replaced JWT keys whose tokens have all expired.
                let current = state.jwt.current();
                let keys = JwtKeys { current: &current, prepared: None, retired: None };
                match publish_own_bundle(state.datastore.as_ref(), &state.config, &state.ca, keys).await {
                    Ok(true) => state.publish_revision().await,
                    Ok(false) => {}
                    Err(err) => tracing::warn!(error = %err, "cannot refresh the bundle"),
                }
                continue;
            }
            () = tokio::time::sleep_until(renew_at) => {}
        }
        match issue_server_svid(&state, &server_id) {
            Ok((key, next)) => {
                slot.replace(key);
                renew_at = tokio::time::Instant::now() + next;
                tracing::info!("server SVID renewed");
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot renew the server SVID; retrying in 30s");
                renew_at = tokio::time::Instant::now() + Duration::from_secs(30);
            }
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
