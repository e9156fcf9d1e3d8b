//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Every call must carry exactly one `workload.spiffe.io: true` metadata value
//! (`InvalidArgument` otherwise, before any attestation). The caller was pinned at
//! accept ([`crate::peer`]), after its uid's connection cap was checked
//! ([`crate::limits`]); each call takes a token of its uid's request budget
//! (`ResourceExhausted` when spent), resolves the caller's selectors through the
//! per-process attestation cache ([`Attestors::resolve`]), checks it is still alive, and
//! answers from the cache. Streams push again when an SVID rotates, the bundle, the CRLs
//! or the caller's entries change, or an identity is revoked; before every push the
//! caller is re-validated (alive, same executable, credentials and cgroup, else attested
//! again), and a stream whose caller exits or is left with no identity ends with
//! `PermissionDenied`.
//!
//! Templated entries (`{instance}`, `{uid}`, `{systemd_unit}`) are rendered for each
//! caller and held for it by [`crate::instances`]; an entry whose placeholder has no
//! valid value for the caller does not apply to it (logged and audited, never a
//! mangled ID). Revoked identities are never served, and `ValidateJWTSVID` rejects
//! tokens whose `sub` is revoked. Every attestation, every SVID served and every
//! refusal is written to the audit log.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_audit::{AgentEvent, AuditLog, Outcome};
use tessera_plugin_sdk::{RegistrationEntry, Selector, SpiffeId, TemplateValues, TrustDomain};
use tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::attest::{AttestationFailure, Attested, Attestors, PinnedCaller};
use crate::cache::{CacheSnapshot, WorkloadSvid};
use crate::instances::{AcquireError, CallerFacts, Instances, Rendered, SlotState};
use crate::jwt_cache::JwtCache;
use crate::limits::{ConnectionLimiter, ConnectionPermit, RateLimiter};
use crate::peer::{PeerSys, ProcRoot};
use crate::signer::Signer;

/// The metadata key every Workload API call must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long a stream waits for its first SVIDs to be minted before `Unavailable`.
pub const FIRST_RESPONSE_DEADLINE: Duration = Duration::from_secs(30);
/// At most one "connection refused" warning per this interval (a flood must not flood
/// the log too).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a handler knows about its caller: the pinned process and the connection's slot
/// in its uid's connection cap (given back when the connection and every call on it
/// are done).
#[derive(Debug, Clone)]
pub struct Caller {
    process: Arc<PinnedCaller>,
    _slot: Option<Arc<ConnectionPermit>>,
}

impl Caller {
    /// A caller pinned at accept, holding `slot`.
    pub fn new(process: PinnedCaller, slot: Option<ConnectionPermit>) -> Self {
        Self {
            process: Arc::new(process),
            _slot: slot.map(Arc::new),
        }
    }

    /// The pinned process.
    pub fn process(&self) -> &Arc<PinnedCaller> {
        &self.process
    }

    fn pid(&self) -> i32 {
        self.process.workload().pid()
    }

    fn uid(&self) -> u32 {
        self.process.workload().uid()
    }
}

/// A Workload API connection whose peer was identified at accept.
pub type WorkloadConnection = tessera_proto::connection::PeerConnection<UnixStream, Caller>;

/// What the accept loop needs: where `/proc` is, the system calls that identify a peer,
/// and the per-uid connection cap.
#[derive(Debug, Clone)]
pub struct Acceptor {
    /// The checked procfs mount.
    pub proc_root: Arc<ProcRoot>,
    /// The peer identification system calls ([`crate::peer::KernelPeerSys`] in
    /// production).
    pub sys: Arc<dyn PeerSys>,
    /// Concurrent connections per uid.
    pub connections: Arc<ConnectionLimiter>,
}

/// Accepts connections, identifies each peer (SO_PEERCRED, then the uid's connection
/// cap, then pidfd and `/proc` dirfd) and hands identified connections to tonic. A peer
/// that cannot be identified (no credentials, pid 0, already exited) or whose uid has too
/// many connections open is dropped at once, before any `/proc` access in the latter
/// case.
pub async fn accept_loop(
    listener: UnixListener,
    acceptor: Acceptor,
    out: mpsc::Sender<std::io::Result<WorkloadConnection>>,
    shutdown: CancellationToken,
) {
    let mut last_refusal_log: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "Workload API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let at = std::time::Instant::now();
        let sys = acceptor.sys.as_ref();
        use std::os::fd::AsFd as _;
        let cred = match crate::peer::peer_credentials(sys, stream.as_fd()) {
            Ok(cred) => cred,
            Err(err) => {
                tracing::info!(error = %error_chain(&err), "Workload API connection refused: caller not identified");
                continue;
            }
        };
        let Some(slot) = acceptor.connections.try_acquire(cred.uid) else {
            let now = tokio::time::Instant::now();
            if last_refusal_log.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL) {
                last_refusal_log = Some(now);
                tracing::warn!(
                    uid = cred.uid,
                    "Workload API connection refused: too many connections from this uid \
                     (max_connections_per_uid); further refusals are logged at debug level"
                );
            } else {
                tracing::debug!(
                    uid = cred.uid,
                    "Workload API connection refused: connection cap"
                );
            }
            continue;
        };
        match crate::peer::pin_peer(sys, stream.as_fd(), cred, &acceptor.proc_root, at) {
            Ok(workload) => {
                let caller = Caller::new(PinnedCaller::new(workload), Some(slot));
                let connection = WorkloadConnection::new(stream, caller);
                if out.send(Ok(connection)).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                tracing::info!(error = %error_chain(&err), pid = cred.pid, uid = cred.uid, "Workload API connection refused: caller not identified");
            }
        }
    }
}

/// How long connections get to close by themselves once the agent stops (streams end,
/// HTTP/2 GOAWAY) before they are cut: a client that never reads must not hold the
/// agent's shutdown forever.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves the Workload API on the connections `accept_loop` identified until
/// `shutdown`, then gives them [`SHUTDOWN_GRACE`] to close before cutting them.
/// Requests over [`crate::limits::MAX_REQUEST_SIZE`] are refused with
/// `ResourceExhausted` before they are buffered; a connection carries at most
/// [`crate::limits::MAX_STREAMS_PER_CONNECTION`] calls at a time.
pub async fn serve(
    api: WorkloadApi,
    connections: mpsc::Receiver<std::io::Result<WorkloadConnection>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    use tokio_stream::StreamExt as _;
    let cut = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        let cut = cut.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = cut.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(SHUTDOWN_GRACE) => {}
                () = cut.cancelled() => return,
            }
            cut.cancel();
        });
    }
    let served_cut = cut.clone();
    let incoming = ReceiverStream::new(connections)
        .map(move |accepted| accepted.map(|connection| Cuttable::new(connection, &cut)));
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(crate::limits::MAX_STREAMS_PER_CONNECTION))
        .layer(tower::util::MapResponseLayer::new(
            crate::limits::map_size_refusal::<tonic::body::Body>,
        ))
        .add_service(
            tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(api)
                .max_decoding_message_size(crate::limits::MAX_REQUEST_SIZE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    // Every connection is closed: stop the grace timer.
    served_cut.cancel();
    served
}

/// A connection that fails every read and write once `cut` is cancelled, so hyper
/// drops it even when the peer never answers the graceful HTTP/2 shutdown.
struct Cuttable {
    inner: WorkloadConnection,
    cut: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Cuttable {
    fn new(inner: WorkloadConnection, cut: &CancellationToken) -> Self {
        Self {
            inner,
            cut: Box::pin(cut.clone().cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut std::task::Context<'_>) -> Result<(), std::io::Error> {
        use std::future::Future as _;
        match self.cut.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "agent shutting down",
            )),
            std::task::Poll::Pending => Ok(()),
        }
    }
}

impl tonic::transport::server::Connected for Cuttable {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for Cuttable {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(err) = self.check(cx) {
            return std::task::Poll::Ready(Err(err));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Cuttable {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Err(err) = self.check(cx) {
            return std::task::Poll::Ready(Err(err));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Err(err) = self.check(cx) {
            return std::task::Poll::Ready(Err(err));
        }
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Checks the security header: exactly one value, exactly `true`.
pub fn check_security_header(metadata: &MetadataMap) -> Result<(), Status> {
    let mut values = metadata.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The RPC names recorded in the audit log.
mod rpc {
    pub(super) const FETCH_X509_SVID: &str = "FetchX509SVID";
    pub(super) const FETCH_X509_BUNDLES: &str = "FetchX509Bundles";
    pub(super) const FETCH_JWT_SVID: &str = "FetchJWTSVID";
    pub(super) const FETCH_JWT_BUNDLES: &str = "FetchJWTBundles";
    pub(super) const VALIDATE_JWT_SVID: &str = "ValidateJWTSVID";
    pub(super) const FETCH_WIT_SVID: &str = "FetchWITSVID";
    pub(super) const FETCH_WIT_BUNDLES: &str = "FetchWITBundles";
}

/// What the Workload API is built from.
#[derive(Debug)]
pub struct ApiParts {
    /// The cache the SVID manager publishes.
    pub cache: watch::Receiver<Arc<CacheSnapshot>>,
    /// The workload attestors and their per-process cache.
    pub attestors: Attestors,
    /// Signs JWT-SVIDs (the server connection in production).
    pub signer: Arc<dyn Signer>,
    /// Templated (per-caller) identities.
    pub instances: Instances,
    /// JWT-SVIDs held (shared with `instances`, which forgets dropped identities' tokens).
    pub jwts: Arc<JwtCache>,
    /// Calls per uid.
    pub requests: RateLimiter,
    /// The audit log (disabled when no path is configured).
    pub audit: AuditLog<AgentEvent>,
    /// Cancelled when the agent stops.
    pub shutdown: CancellationToken,
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: watch::Receiver<Arc<CacheSnapshot>>,
    attestors: Attestors,
    signer: Arc<dyn Signer>,
    instances: Instances,
    jwts: Arc<JwtCache>,
    requests: Arc<RateLimiter>,
    audit: AuditLog<AgentEvent>,
    shutdown: CancellationToken,
}

/// What a stream does with one evaluation: send a message (with the key that tells
/// whether it differs from the last one, and the audit records of what it serves),
/// keep waiting, or refuse the caller.
enum Push<T, K> {
    Send(T, K, Vec<AgentEvent>),
    Wait,
    Deny,
    /// Every identity of the caller keeps failing to sign: a retryable error rather
    /// than a wait without end.
    Unavailable(&'static str),
}

/// One identity a caller is entitled to.
enum Grant {
    /// An entry with a fixed SPIFFE ID (its SVID is in the cache).
    Fixed(Arc<RegistrationEntry>, SpiffeId),
    /// A templated entry rendered for the caller, and its state.
    Templated(Rendered, watch::Receiver<SlotState>),
}

impl Grant {
    fn entry(&self) -> &Arc<RegistrationEntry> {
        match self {
            Self::Fixed(entry, _) => entry,
            Self::Templated(rendered, _) => &rendered.entry,
        }
    }

    fn spiffe_id(&self) -> &SpiffeId {
        match self {
            Self::Fixed(_, id) => id,
            Self::Templated(rendered, _) => &rendered.key.spiffe_id,
        }
    }
}

/// The identities of one caller at one moment.
#[derive(Default)]
struct Resolution {
    /// In entry order.
    grants: Vec<Grant>,
    /// Matching entries that do not apply to this caller: (entry id, why).
    skipped: Vec<(String, String)>,
    /// The state of every templated identity involved (a change re-evaluates a stream).
    watching: Vec<watch::Receiver<SlotState>>,
}

/// What a stream's message builder sees.
struct Ctx<'a> {
    snapshot: &'a CacheSnapshot,
    selectors: &'a [Selector],
    resolution: &'a Resolution,
    pid: i32,
    uid: u32,
}

/// Waits until one of `receivers` changes (forever when there is none).
async fn any_changed(receivers: &mut [watch::Receiver<SlotState>]) {
    if receivers.is_empty() {
        return std::future::pending().await;
    }
    let changes = receivers.iter_mut().map(|rx| Box::pin(rx.changed()));
    let _ = futures::future::select_all(changes).await;
}

/// A gRPC code as the audit log writes it (`permission_denied`).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Seconds since the Unix epoch (0 before it).
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Largest `cgroup` file read for an audit record.
const AUDIT_CGROUP_LIMIT: usize = 64 * 1024;

/// The cgroup v2 path (`0::` line) and the executable path of a process, read for the
/// audit record when no selector carries them (blocking).
fn process_paths(workload: &tessera_plugin_sdk::Workload) -> (Option<String>, Option<String>) {
    let cgroup = workload
        .read_proc_file("cgroup", AUDIT_CGROUP_LIMIT)
        .ok()
        .and_then(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_owned))
        });
    let exe = nix::fcntl::readlinkat(workload.proc_dir(), "exe")
        .ok()
        .map(|path| path.to_string_lossy().into_owned());
    (cgroup, exe)
}

impl WorkloadApi {
    /// A service built from `parts`. The attestation cache is closed when the agent
    /// stops.
    pub fn new(parts: ApiParts) -> Self {
        {
            let attestors = parts.attestors.clone();
            let shutdown = parts.shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                attestors.close();
            });
        }
        Self {
            cache: parts.cache,
            attestors: parts.attestors,
            signer: parts.signer,
            instances: parts.instances,
            jwts: parts.jwts,
            requests: Arc::new(parts.requests),
            audit: parts.audit,
            shutdown: parts.shutdown,
        }
    }

    /// Records a refused call. A caller that has exited is not refused anything (nobody
    /// is left to answer; the identities it held are recorded as dropped): not recorded.
    fn refused(&self, rpc: &str, caller: Option<&Caller>, status: &Status) {
        if status.message() == GONE && caller.is_some_and(|c| !c.process().is_alive()) {
            return;
        }
        self.audit.record(AgentEvent::Refused {
            pid: caller.map(Caller::pid),
            uid: caller.map(Caller::uid),
            rpc: rpc.to_owned(),
            code: code_name(status.code()).to_owned(),
            reason: status.message().to_owned(),
        });
    }

    /// Records `result` when it is a refusal, and returns it.
    fn audited<T>(
        &self,
        rpc: &str,
        caller: Option<&Caller>,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        if let Err(status) = &result {
            self.refused(rpc, caller, status);
        }
        result
    }

    /// Records an attestation: its selectors (or why it failed), and the caller's
    /// cgroup, executable and hash, from the selectors when they carry them, else read
    /// from the pinned process.
    async fn audit_attestation(
        &self,
        caller: &Caller,
        outcome: Result<&[Selector], &AttestationFailure>,
    ) {
        if !self.audit.is_enabled() {
            return;
        }
        let selectors: Vec<String> = match outcome {
            Ok(selectors) => selectors.iter().map(ToString::to_string).collect(),
            Err(_) => Vec::new(),
        };
        let find = |prefix: &str| {
            selectors
                .iter()
                .find_map(|s| s.strip_prefix(prefix).map(str::to_owned))
        };
        let sha256 = find("unix:sha256:");
        let mut exe = find("unix:path:");
        let mut cgroup = find("cgroup:path:");
        if exe.is_none() || cgroup.is_none() {
            let workload = Arc::clone(caller.process().workload());
            if let Ok((read_cgroup, read_exe)) =
                tokio::task::spawn_blocking(move || process_paths(&workload)).await
            {
                exe = exe.or(read_exe);
                cgroup = cgroup.or(read_cgroup);
            }
        }
        let workload = caller.process().workload();
        self.audit.record(AgentEvent::WorkloadAttested {
            pid: workload.pid(),
            uid: workload.uid(),
            gid: workload.gid(),
            cgroup,
            exe,
            sha256,
            selectors,
            result: if outcome.is_ok() {
                Outcome::Ok
            } else {
                Outcome::Error
            },
            reason: outcome.err().map(|err| error_chain(err)),
        });
    }

    /// Attests the caller (from the per-process cache when possible), auditing a fresh
    /// attestation or a failure.
    async fn attest(&self, caller: &Caller) -> Result<Attested, Status> {
        match self.attestors.resolve(caller.process()).await {
            Ok(attested) => {
                if attested.fresh {
                    self.audit_attestation(caller, Ok(&attested.selectors))
                        .await;
                }
                Ok(attested)
            }
            Err(err) => {
                self.audit_attestation(caller, Err(&err)).await;
                Err(failure_status(caller, &err))
            }
        }
    }

    /// Header check, rate limit, sync check, attestation, liveness: what every call
    /// goes through.
    async fn admit<T>(&self, request: &Request<T>) -> Result<(Caller, Attested), Status> {
        check_security_header(request.metadata())?;
        let caller = request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| Status::unauthenticated("caller could not be identified"))?
            .clone();
        if !self.requests.check(caller.uid()) {
            tracing::debug!(
                uid = caller.uid(),
                "Workload API request refused: rate limit"
            );
            return Err(Status::resource_exhausted(
                "too many Workload API requests from this uid; retry later",
            ));
        }
        if !self.cache.borrow().synced {
            return Err(Status::unavailable(
                "agent has not synchronised with the server yet; retry",
            ));
        }
        let attested = self.attest(&caller).await?;
        ensure_alive(&caller)?;
        tracing::debug!(
            pid = caller.pid(),
            uid = caller.uid(),
            selectors = attested.selectors.len(),
            "workload attested"
        );
        Ok((caller, attested))
    }

    /// The identities of `caller` with `selectors` in `snapshot`: every matching entry,
    /// fixed IDs as they are, templated ones rendered for the caller and held for it
    /// (minting the X.509-SVID now when `want_x509`). Revoked identities and entries
    /// whose placeholders have no valid value for this caller are skipped, with why.
    fn resolve(
        &self,
        caller: &Caller,
        selectors: &[Selector],
        snapshot: &CacheSnapshot,
        want_x509: bool,
    ) -> Result<Resolution, Status> {
        let now = SystemTime::now();
        let mut out = Resolution::default();
        let mut facts: Option<CallerFacts> = None;
        for entry in snapshot.matching_entries(selectors) {
            if let Some(id) = entry.spiffe_id.as_fixed() {
                if snapshot.revoked.is_revoked(id, now) {
                    out.skipped
                        .push((entry.id.clone(), "identity revoked".to_owned()));
                } else {
                    let id = id.clone();
                    out.grants.push(Grant::Fixed(entry, id));
                }
                continue;
            }
            let facts = match &mut facts {
                Some(facts) => facts,
                slot => slot.insert(
                    self.instances
                        .facts(caller.process(), selectors)
                        .map_err(|err| {
                            tracing::info!(pid = caller.pid(), uid = caller.uid(), error = %error_chain(&err), "cannot read the caller's process facts");
                            Status::permission_denied("workload attestation failed")
                        })?,
                ),
            };
            let rendered = match facts.render(&entry) {
                Ok(rendered) => rendered,
                Err(reason) => {
                    out.skipped.push((entry.id.clone(), reason));
                    continue;
                }
            };
            match self
                .instances
                .acquire(facts, &rendered, want_x509, &snapshot.revoked)
            {
                Ok(state) => {
                    let refused = state.borrow().refused.clone();
                    out.watching.push(state.clone());
                    match refused {
                        Some(reason) => out.skipped.push((entry.id.clone(), reason)),
                        None => out.grants.push(Grant::Templated(rendered, state)),
                    }
                }
                Err(AcquireError::Revoked) => out
                    .skipped
                    .push((entry.id.clone(), "identity revoked".to_owned())),
                Err(AcquireError::Exhausted) => {
                    tracing::warn!(
                        pid = caller.pid(),
                        uid = caller.uid(),
                        "templated identity refused: max_instance_identities reached"
                    );
                    return Err(Status::resource_exhausted(
                        "too many per-instance identities are held by this agent; retry later",
                    ));
                }
                Err(AcquireError::Exited) => return Err(gone()),
                Err(err @ AcquireError::Unavailable(_)) => {
                    return Err(Status::unavailable(format!(
                        "identity not available: {err}"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Logs and audits, once per (entry, reason), the entries that do not apply.
    fn report_skipped(
        &self,
        rpc: &str,
        caller: &Caller,
        skipped: &[(String, String)],
        reported: &mut HashSet<(String, String)>,
    ) {
        for item in skipped {
            if !reported.insert(item.clone()) {
                continue;
            }
            let (entry_id, reason) = item;
            tracing::info!(
                pid = caller.pid(),
                uid = caller.uid(),
                %entry_id,
                %reason,
                "entry does not apply to this caller"
            );
            self.audit.record(AgentEvent::Refused {
                pid: Some(caller.pid()),
                uid: Some(caller.uid()),
                rpc: rpc.to_owned(),
                code: code_name(tonic::Code::PermissionDenied).to_owned(),
                reason: format!("entry {entry_id} does not apply to this caller: {reason}"),
            });
        }
    }

    /// Runs a push stream: `build` turns each evaluation (cache snapshot, the caller's
    /// current selectors and, with `want_identities`, its identities) into a message
    /// (or says to wait, or that the caller is entitled to nothing); a message equal to
    /// the last one sent is not sent again. Before each evaluation after the first the
    /// caller is re-validated (and re-attested when its executable, credentials or
    /// cgroup changed); a caller that exits ends the stream at once. Every message sent
    /// is audited, and so is the refusal that ends a stream.
    fn stream<T, K>(
        &self,
        rpc: &'static str,
        caller: Caller,
        attested: Attested,
        want_identities: bool,
        build: impl Fn(&Ctx<'_>) -> Push<T, K> + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        K: PartialEq + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let api = self.clone();
        let mut cache = self.cache.clone();
        tokio::spawn(async move {
            let refuse = |status: Status| {
                api.refused(rpc, Some(&caller), &status);
                status
            };
            let mut attested = attested;
            let mut fresh = true;
            let mut last: Option<K> = None;
            let mut reported = HashSet::new();
            let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_DEADLINE;
            loop {
                let snapshot = Arc::clone(&cache.borrow_and_update());
                if !fresh {
                    match api.attest(&caller).await {
                        Ok(now) => attested = now,
                        Err(status) => {
                            let _ = tx.send(Err(refuse(status))).await;
                            return;
                        }
                    }
                }
                fresh = false;
                let mut resolution = if want_identities {
                    match api.resolve(&caller, &attested.selectors, &snapshot, true) {
                        Ok(resolution) => resolution,
                        Err(status) => {
                            let _ = tx.send(Err(refuse(status))).await;
                            return;
                        }
                    }
                } else {
                    Resolution::default()
                };
                api.report_skipped(rpc, &caller, &resolution.skipped, &mut reported);
                let push = build(&Ctx {
                    snapshot: &snapshot,
                    selectors: &attested.selectors,
                    resolution: &resolution,
                    pid: caller.pid(),
                    uid: caller.uid(),
                });
                match push {
                    Push::Deny => {
                        if last.is_some() {
                            tracing::info!(
                                pid = caller.pid(),
                                uid = caller.uid(),
                                "caller no longer matches any entry: identity withdrawn, stream ended"
                            );
                        }
                        let status = refuse(Status::permission_denied("no identity issued"));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Push::Wait => {}
                    Push::Unavailable(reason) => {
                        let _ = tx.send(Err(refuse(Status::unavailable(reason)))).await;
                        return;
                    }
                    Push::Send(message, key, served) => {
                        if last.as_ref() != Some(&key) {
                            if let Err(status) = ensure_alive(&caller) {
                                let _ = tx.send(Err(refuse(status))).await;
                                return;
                            }
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                            for event in served {
                                api.audit.record(event);
                            }
                            last = Some(key);
                        }
                    }
                }
                let waiting_for_first = last.is_none();
                tokio::select! {
                    () = api.shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = cache.changed() => if changed.is_err() { return },
                    () = any_changed(&mut resolution.watching) => {}
                    () = attested.exited.cancelled() => {
                        tracing::info!(
                            pid = caller.pid(),
                            uid = caller.uid(),
                            "stream caller exited: stream ended"
                        );
                        let _ = tx.send(Err(refuse(gone()))).await;
                        return;
                    }
                    () = tokio::time::sleep_until(deadline), if waiting_for_first => {
                        let status = Status::unavailable("identity not yet available; retry");
                        let _ = tx.send(Err(refuse(status))).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// `FetchJWTSVID` after the caller was identified by the handler.
    async fn jwt_svids(
        &self,
        request: &Request<JwtsvidRequest>,
    ) -> Result<JwtsvidResponse, Status> {
        check_security_header(request.metadata())?;
        let mut audiences = request.get_ref().audience.clone();
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        audiences.sort();
        audiences.dedup();
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => None,
            text => Some(SpiffeId::parse_leaf(text).map_err(|err| {
                Status::invalid_argument(format!("spiffe_id is not a valid SPIFFE ID: {err}"))
            })?),
        };
        let (caller, attested) = self.admit(request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let resolution = self.resolve(&caller, &attested.selectors, &snapshot, false)?;
        self.report_skipped(
            rpc::FETCH_JWT_SVID,
            &caller,
            &resolution.skipped,
            &mut HashSet::new(),
        );
        // `spiffe_id` is compared with the rendered IDs, exactly.
        let grants: Vec<&Grant> = resolution
            .grants
            .iter()
            .filter(|grant| wanted.as_ref().is_none_or(|id| grant.spiffe_id() == id))
            .collect();
        if grants.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        // Without a requested ID, identities whose audience policy forbids this request
        // are skipped (a restricted second identity must not break the first); the
        // server still decides for the ones asked for.
        let grants: Vec<&Grant> = if wanted.is_some() {
            grants
        } else {
            grants
                .into_iter()
                .filter(|grant| audience_policy_allows(grant.entry(), &audiences))
                .collect()
        };
        if grants.is_empty() {
            return Err(Status::permission_denied(
                "audience is not allowed for this identity",
            ));
        }
        let no_values = TemplateValues::new();
        let mut signed = Vec::with_capacity(grants.len());
        for grant in grants {
            let values = match grant {
                Grant::Fixed(..) => &no_values,
                Grant::Templated(rendered, _) => &rendered.values,
            };
            let jwt = self
                .jwts
                .get(
                    self.signer.as_ref(),
                    grant.entry(),
                    grant.spiffe_id(),
                    values,
                    &audiences,
                )
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => status,
                    _ => Status::unavailable(format!(
                        "cannot obtain a JWT-SVID: {}",
                        status.message()
                    )),
                })?;
            signed.push((grant, jwt));
        }
        ensure_alive(&caller)?;
        // Revoked, or dropped (all its processes exited), while it was being signed: not
        // served, and forgotten.
        let revoked = Arc::clone(&self.cache.borrow().revoked);
        let now = SystemTime::now();
        signed.retain(|(grant, _)| {
            let gone = revoked.is_revoked(grant.spiffe_id(), now)
                || matches!(grant, Grant::Templated(rendered, _) if !self.instances.is_held(&rendered.key));
            if gone {
                self.jwts.forget(grant.spiffe_id());
            }
            !gone
        });
        if signed.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        let mut svids = Vec::with_capacity(signed.len());
        for (grant, jwt) in signed {
            let instance = match grant {
                Grant::Fixed(..) => None,
                Grant::Templated(rendered, _) => rendered.instance.clone(),
            };
            self.audit.record(AgentEvent::JwtSvidServed {
                pid: caller.pid(),
                uid: caller.uid(),
                entry_id: grant.entry().id.clone(),
                spiffe_id: grant.spiffe_id().to_string(),
                jwt_id: jwt.jti.clone(),
                audience: audiences.clone(),
                expires_at: unix_secs(jwt.expires_at),
                ttl_seconds: jwt
                    .expires_at
                    .duration_since(jwt.issued_at)
                    .map_or(0, |d| d.as_secs()),
                instance,
            });
            svids.push(Jwtsvid {
                spiffe_id: grant.spiffe_id().to_string(),
                svid: jwt.token,
                hint: grant.entry().hint.clone(),
            });
        }
        Ok(JwtsvidResponse { svids })
    }

    /// `ValidateJWTSVID` after the handler.
    async fn validate(
        &self,
        request: &Request<ValidateJwtsvidRequest>,
    ) -> Result<ValidateJwtsvidResponse, Status> {
        check_security_header(request.metadata())?;
        if request.get_ref().audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if request.get_ref().svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // The caller must be an identified, live process; it needs no identity of its
        // own to validate a token.
        let (caller, _attested) = self.admit(request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let bundle = &snapshot.bundle;
        let now = SystemTime::now();
        let validated = tessera_plugin_sdk::jwt::validate(
            &request.get_ref().svid,
            &request.get_ref().audience,
            // The key is chosen by the token's trust domain: the own bundle, or the
            // federated bundle of that trust domain (never another's; SECURITY.md
            // items 71, 73).
            &|td: &TrustDomain| {
                if td == &bundle.trust_domain {
                    Some(bundle.jwt.clone())
                } else {
                    snapshot.federated.get(td).map(|b| b.jwt.clone())
                }
            },
            now,
        )
        .map_err(|err| Status::invalid_argument(format!("invalid JWT-SVID: {err}")))?;
        if snapshot.revoked.is_revoked(&validated.spiffe_id, now) {
            return Err(Status::invalid_argument(
                "invalid JWT-SVID: its identity was revoked",
            ));
        }
        ensure_alive(&caller)?;
        Ok(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(validated.claims)),
        })
    }
}

/// Why a caller that exited is not served.
const GONE: &str = "caller is no longer running";

fn gone() -> Status {
    Status::permission_denied(GONE)
}

fn ensure_alive(caller: &Caller) -> Result<(), Status> {
    if caller.process().is_alive() {
        Ok(())
    } else {
        Err(gone())
    }
}

/// The status for a failed attestation; the details go to the log only.
fn failure_status(caller: &Caller, err: &AttestationFailure) -> Status {
    match err {
        AttestationFailure::Exited => {
            tracing::info!(
                pid = caller.pid(),
                uid = caller.uid(),
                "caller exited before it was served"
            );
            gone()
        }
        err if err.is_permission_problem() => {
            tracing::warn!(
                pid = caller.pid(),
                uid = caller.uid(),
                error = %error_chain(err),
                "workload attestation failed: the agent may not inspect this process \
                 (reading another user's /proc/<pid>/exe needs root or CAP_SYS_PTRACE)"
            );
            Status::permission_denied(
                "workload attestation failed: the agent is not allowed to inspect the calling process",
            )
        }
        err => {
            tracing::info!(pid = caller.pid(), uid = caller.uid(), error = %error_chain(err), "workload attestation failed");
            Status::permission_denied("workload attestation failed")
        }
    }
}

/// An error and its sources, `: `-separated (for the log).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The identity of an X.509-SVID response: which SVID objects (by address and serial),
/// which bundle and which CRLs it carried.
#[derive(PartialEq)]
struct SentX509 {
    svids: Vec<usize>,
    serials: Vec<String>,
    bundle_sequence: u64,
    crls: Arc<Vec<Vec<u8>>>,
    federated: crate::federation::SentKey,
}

/// The identity of a bundles response (with the federated bundles sent, by address).
type SentBundles = (
    u64,
    Vec<Vec<u8>>,
    Arc<Vec<Vec<u8>>>,
    crate::federation::SentKey,
);

/// One SVID ready to send, with the entry it serves and its `{instance}` value.
type Ready = (Arc<RegistrationEntry>, Arc<WorkloadSvid>, Option<String>);

fn x509_push(ctx: &Ctx<'_>) -> Push<X509svidResponse, SentX509> {
    let snapshot = ctx.snapshot;
    if !snapshot.synced {
        return Push::Wait;
    }
    if ctx.resolution.grants.is_empty() {
        return Push::Deny;
    }
    let now = SystemTime::now();
    let mut ready: Vec<Ready> = Vec::with_capacity(ctx.resolution.grants.len());
    for grant in &ctx.resolution.grants {
        match grant {
            Grant::Fixed(entry, _) => match snapshot.svids.get(&entry.id) {
                Some(svid) if svid.not_after > now && svid.entry_revision == entry.revision => {
                    ready.push((Arc::clone(entry), Arc::clone(svid), None));
                }
                // The server refused it and the manager retries with backoff: serve the
                // caller's other identities rather than none until it succeeds.
                _ if snapshot.failing.contains(&entry.id) => {}
                _ => return Push::Wait,
            },
            Grant::Templated(rendered, state) => {
                let state = state.borrow();
                match &state.svid {
                    Some(svid)
                        if !state.dropped
                            && svid.not_after > now
                            && svid.entry_revision == rendered.entry.revision =>
                    {
                        ready.push((
                            Arc::clone(&rendered.entry),
                            Arc::clone(svid),
                            rendered.instance.clone(),
                        ));
                    }
                    // As for a fixed ID: signing keeps failing (the server is down),
                    // so serve the others, or say `Unavailable`, rather than wait.
                    _ if !state.dropped && state.failing => {}
                    _ => return Push::Wait,
                }
            }
        }
    }
    if ready.is_empty() {
        // Every identity is failing (the server refuses or cannot be reached; the
        // manager retries with backoff): never an empty answer, never a silent wait.
        return Push::Unavailable(
            "identity not yet available: the server has not signed it; retrying",
        );
    }
    let bundle = snapshot.bundle.concatenated_der();
    let federated = crate::federation::bundles_for(
        &snapshot.federated,
        ready.iter().map(|(entry, _, _)| entry.as_ref()),
    );
    let response = X509svidResponse {
        svids: ready
            .iter()
            .map(|(entry, svid, _)| X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: svid.cert_chain.concat(),
                x509_svid_key: svid.private_key.clone(),
                bundle: bundle.clone(),
                hint: entry.hint.clone(),
            })
            .collect(),
        crl: snapshot.crls.to_vec(),
        federated_bundles: federated
            .iter()
            .map(|b| (b.trust_domain.id_string(), b.concatenated_der()))
            .collect(),
    };
    let served = ready
        .iter()
        .map(|(entry, svid, instance)| AgentEvent::X509SvidServed {
            pid: ctx.pid,
            uid: ctx.uid,
            entry_id: entry.id.clone(),
            spiffe_id: svid.spiffe_id.to_string(),
            serial: svid.serial_hex.clone(),
            expires_at: unix_secs(svid.not_after),
            ttl_seconds: svid
                .not_after
                .duration_since(svid.not_before)
                .map_or(0, |d| d.as_secs()),
            instance: instance.clone(),
        })
        .collect();
    let key = SentX509 {
        // Addresses of Arcs the stream holds no reference to could be reused; so the key
        // also includes each serial, and a reused address with the same serial is the
        // same SVID.
        svids: ready
            .iter()
            .map(|(_, svid, _)| Arc::as_ptr(svid) as usize)
            .collect(),
        serials: ready
            .iter()
            .map(|(_, svid, _)| svid.serial_hex.clone())
            .collect(),
        bundle_sequence: snapshot.bundle.sequence_number,
        crls: Arc::clone(&snapshot.crls),
        federated: crate::federation::sent_key(&federated),
    };
    Push::Send(response, key, served)
}

/// Whether the caller matches any entry (bundles are served to callers with an
/// identity, or one being minted).
fn matches_any(ctx: &Ctx<'_>) -> bool {
    ctx.snapshot
        .entries
        .values()
        .any(|entry| entry.matches(ctx.selectors))
}

/// The federated bundles of the trust domains the caller's matching entries name.
fn federated_for(ctx: &Ctx<'_>) -> Vec<Arc<crate::cache::TrustBundle>> {
    crate::federation::bundles_for(
        &ctx.snapshot.federated,
        ctx.snapshot
            .entries
            .values()
            .filter(|entry| entry.matches(ctx.selectors))
            .map(AsRef::as_ref),
    )
}

fn bundles_push(ctx: &Ctx<'_>) -> Push<X509BundlesResponse, SentBundles> {
    let snapshot = ctx.snapshot;
    if !snapshot.synced {
        return Push::Wait;
    }
    if !matches_any(ctx) {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.concatenated_der());
    let federated = federated_for(ctx);
    for b in &federated {
        bundles.insert(b.trust_domain.id_string(), b.concatenated_der());
    }
    Push::Send(
        X509BundlesResponse {
            crl: snapshot.crls.to_vec(),
            bundles,
        },
        (
            bundle.sequence_number,
            bundle.authorities.clone(),
            Arc::clone(&snapshot.crls),
            crate::federation::sent_key(&federated),
        ),
        Vec::new(),
    )
}

fn jwt_bundles_push(ctx: &Ctx<'_>) -> Push<JwtBundlesResponse, (u64, crate::federation::SentKey)> {
    let snapshot = ctx.snapshot;
    if !snapshot.synced {
        return Push::Wait;
    }
    if !matches_any(ctx) {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.jwks());
    let federated = federated_for(ctx);
    for b in &federated {
        bundles.insert(b.trust_domain.id_string(), b.jwks());
    }
    Push::Send(
        JwtBundlesResponse { bundles },
        (
            bundle.sequence_number,
            crate::federation::sent_key(&federated),
        ),
        Vec::new(),
    )
}

/// The entry's JWT audience policy as the server applies it: one audience per token
/// unless multi-audience tokens are allowed, and only allowed audiences.
fn audience_policy_allows(
    entry: &tessera_plugin_sdk::RegistrationEntry,
    audiences: &[String],
) -> bool {
    (audiences.len() == 1 || entry.jwt_multi_audience)
        && (entry.jwt_audiences.is_empty()
            || audiences.iter().all(|a| entry.jwt_audiences.contains(a)))
}

/// JSON claims as a protobuf `Struct`.
fn json_object_to_struct(
    object: serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .into_iter()
            .map(|(key, value)| (key, json_to_value(value)))
            .collect(),
    }
}

fn json_to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(object) => Kind::StructValue(json_object_to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

/// The caller identified at accept, if any (for audit records of refusals).
fn caller_of<T>(request: &Request<T>) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<WitsvidResponse>;
    type FetchWITBundlesStream = Stream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let rpc = rpc::FETCH_X509_SVID;
        let result = self.admit(&request).await.map(|(caller, attested)| {
            Response::new(self.stream(rpc, caller, attested, true, x509_push))
        });
        self.audited(rpc, caller_of(&request).as_ref(), result)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let rpc = rpc::FETCH_X509_BUNDLES;
        let result = self.admit(&request).await.map(|(caller, attested)| {
            Response::new(self.stream(rpc, caller, attested, false, bundles_push))
        });
        self.audited(rpc, caller_of(&request).as_ref(), result)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let result = self.jwt_svids(&request).await.map(Response::new);
        self.audited(rpc::FETCH_JWT_SVID, caller_of(&request).as_ref(), result)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let rpc = rpc::FETCH_JWT_BUNDLES;
        let result = self.admit(&request).await.map(|(caller, attested)| {
            Response::new(self.stream(rpc, caller, attested, false, jwt_bundles_push))
        });
        self.audited(rpc, caller_of(&request).as_ref(), result)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let result = self.validate(&request).await.map(Response::new);
        self.audited(rpc::VALIDATE_JWT_SVID, caller_of(&request).as_ref(), result)
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        let result = check_security_header(request.metadata()).and_then(|()| {
            Err(Status::unimplemented(
                "WIT-SVIDs are not served by this agent",
            ))
        });
        self.audited(rpc::FETCH_WIT_SVID, caller_of(&request).as_ref(), result)
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        let result = check_security_header(request.metadata()).and_then(|()| {
            Err(Status::unimplemented(
                "WIT bundles are not served by this agent",
            ))
        });
        self.audited(rpc::FETCH_WIT_BUNDLES, caller_of(&request).as_ref(), result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};
    use std::os::fd::{BorrowedFd, OwnedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nix::errno::Errno;
    use tessera_plugin_sdk::{AttestError, WorkloadAttestor};
    use tokio::io::AsyncReadExt as _;
    use tonic::metadata::MetadataValue;

    use crate::cache::TrustBundle;
    use crate::peer::{KernelPeerSys, PeerCred};

    /// An identity the server keeps refusing must not hold back the caller's others:
    /// with one SVID cached and the other entry failing, the answer carries the first;
    /// while the other is merely pending (not failing), the answer waits; with every
    /// identity failing, the caller gets a retryable `Unavailable`, not a wait without end.
    #[test]
    fn a_failing_identity_does_not_hold_back_the_others() {
        let good = Arc::new(crate::testing::entry(
            "good",
            "spiffe://example.org/good",
            &["unix:uid:1"],
        ));
        let bad = Arc::new(crate::testing::entry(
            "bad",
            "spiffe://example.org/bad",
            &["unix:uid:1"],
        ));
        let mut snapshot = crate::testing::snapshot_with(&[Arc::clone(&good), Arc::clone(&bad)]);
        let svid = crate::cache::WorkloadSvid {
            entry_id: "good".into(),
            entry_revision: good.revision,
            spiffe_id: SpiffeId::parse("spiffe://example.org/good").unwrap(),
            cert_chain: vec![vec![0x30, 0x00]],
            private_key: vec![1, 2, 3],
            serial_hex: "01".into(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + std::time::Duration::from_secs(3600),
            renew_at: SystemTime::now() + std::time::Duration::from_secs(1800),
        };
        snapshot.svids = Arc::new(HashMap::from([("good".to_owned(), Arc::new(svid))]));
        let grants = |entries: &[&Arc<RegistrationEntry>]| Resolution {
            grants: entries
                .iter()
                .map(|e| Grant::Fixed(Arc::clone(e), e.spiffe_id.as_fixed().unwrap().clone()))
                .collect(),
            skipped: Vec::new(),
            watching: Vec::new(),
        };
        let both = grants(&[&good, &bad]);
        let push = |snapshot: &CacheSnapshot, resolution: &Resolution| {
            x509_push(&Ctx {
                snapshot,
                selectors: &[],
                resolution,
                pid: 1,
                uid: 1,
            })
        };
        assert!(
            matches!(push(&snapshot, &both), Push::Wait),
            "pending: wait"
        );
        snapshot.failing = Arc::new(std::collections::BTreeSet::from(["bad".to_owned()]));
        match push(&snapshot, &both) {
            Push::Send(message, _, _) => {
                let ids: Vec<&str> = message.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                assert_eq!(ids, ["spiffe://example.org/good"]);
            }
            _ => panic!("the cached identity was held back"),
        }
        assert!(
            matches!(push(&snapshot, &grants(&[&bad])), Push::Unavailable(_)),
            "all failing: a retryable error"
        );

        // The same for a templated identity whose signing keeps failing (the server is
        // down): pending, it is waited for; failing without a valid SVID, it does not
        // hold back the others, and alone it is `Unavailable`. An expired SVID is never
        // sent, failing or not.
        let signer = crate::testing::LocalSigner::new();
        let templated = signer.entry("t", "spiffe://example.org/bot/{instance}", &["unix:uid:1"]);
        let (id, values) = signer.render(&templated, "p1");
        let rendered = crate::instances::Rendered {
            entry: Arc::clone(&templated),
            key: crate::instances::IdentityKey {
                entry_id: "t".into(),
                spiffe_id: id.clone(),
            },
            values,
            instance: None,
        };
        let (slot, state) = tokio::sync::watch::channel(crate::instances::SlotState::default());
        let with_templated = |fixed: &[&Arc<RegistrationEntry>]| {
            let mut resolution = grants(fixed);
            resolution
                .grants
                .push(Grant::Templated(rendered.clone(), state.clone()));
            resolution
        };
        snapshot.failing = Arc::default();
        let only_good = grants(&[&good]);
        assert!(matches!(push(&snapshot, &only_good), Push::Send(..)));
        assert!(
            matches!(push(&snapshot, &with_templated(&[&good])), Push::Wait),
            "templated pending: wait"
        );
        let expired = crate::cache::WorkloadSvid {
            entry_id: "t".into(),
            entry_revision: templated.revision,
            spiffe_id: id,
            cert_chain: vec![vec![0x30, 0x00]],
            private_key: vec![1, 2, 3],
            serial_hex: "02".into(),
            not_before: SystemTime::now() - std::time::Duration::from_secs(20),
            not_after: SystemTime::now() - std::time::Duration::from_secs(1),
            renew_at: SystemTime::now() - std::time::Duration::from_secs(10),
        };
        slot.send_modify(|s| {
            s.svid = Some(Arc::new(expired));
            s.failing = true;
        });
        match push(&snapshot, &with_templated(&[&good])) {
            Push::Send(message, _, _) => {
                let ids: Vec<&str> = message.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
                assert_eq!(ids, ["spiffe://example.org/good"], "never the expired one");
            }
            _ => panic!("a failing templated identity held back the others"),
        }
        assert!(
            matches!(push(&snapshot, &with_templated(&[])), Push::Unavailable(_)),
            "templated alone, failing and expired: a retryable error"
        );
        slot.send_modify(|s| s.failing = false);
        assert!(
            matches!(push(&snapshot, &with_templated(&[])), Push::Wait),
            "expired, renewal pending: wait, never the expired SVID"
        );
    }

    /// The kernel's answers, except credentials when `cred` says otherwise; counts the
    /// pidfd calls (= connections that got past the connection cap).
    #[derive(Debug, Default)]
    struct Sys {
        cred: Option<Result<PeerCred, Errno>>,
        pidfd_calls: AtomicUsize,
    }

    impl PeerSys for Sys {
        fn peer_credentials(&self, sock: BorrowedFd<'_>) -> Result<PeerCred, Errno> {
            match self.cred {
                Some(answer) => answer,
                None => KernelPeerSys.peer_credentials(sock),
            }
        }
        fn peer_pidfd(&self, sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
            self.pidfd_calls.fetch_add(1, Ordering::SeqCst);
            KernelPeerSys.peer_pidfd(sock)
        }
        fn pidfd_open(&self, pid: i32) -> Result<OwnedFd, Errno> {
            KernelPeerSys.pidfd_open(pid)
        }
    }

    /// Sleeps, then answers one selector; counts starts and ends.
    #[derive(Debug, Default)]
    struct Slow {
        started: AtomicUsize,
        finished: AtomicUsize,
    }

    impl WorkloadAttestor for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn attest(&self, _: &tessera_plugin_sdk::Workload) -> Result<Vec<Selector>, AttestError> {
            self.started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(400));
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(vec![Selector::new("unix", "uid:4242").unwrap()])
        }
    }

    /// A served Workload API on a temporary socket (synced, no entries).
    struct Served {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        attestors: Attestors,
        connections: Arc<ConnectionLimiter>,
        shutdown: CancellationToken,
        cache: watch::Sender<Arc<CacheSnapshot>>,
        instances: Instances,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn serve_with(
        attestor: Arc<dyn WorkloadAttestor>,
        sys: Arc<dyn PeerSys>,
        max_connections: usize,
    ) -> Served {
        let td = TrustDomain::new("example.org").unwrap();
        let snapshot = CacheSnapshot {
            synced: true,
            revision: 1,
            bundle: Arc::new(TrustBundle {
                trust_domain: td.clone(),
                authorities: Vec::new(),
                jwt: tessera_plugin_sdk::jwt::JwtBundle::new(td.clone(), Vec::new()),
                sequence_number: 1,
            }),
            entries: Arc::new(BTreeMap::new()),
            svids: Arc::new(HashMap::new()),
            revoked: Arc::new(crate::cache::RevokedSet::default()),
            crls: Arc::new(Vec::new()),
            federated: Arc::default(),
            failing: Arc::default(),
        };
        let verifier = Arc::new(crate::tls::ServerVerifier::new(
            Arc::new(crate::tls::ServerTrust::default()),
            SpiffeId::from_segments(&td, &["tessera", "server"]).unwrap(),
            crate::tls::provider(),
        ));
        let tls = crate::tls::client_config(verifier, None, crate::tls::provider()).unwrap();
        let connection = Arc::new(
            crate::node::ServerConnection::new(&["127.0.0.1:1".to_owned()], Arc::new(tls)).unwrap(),
        );
        serve_full(
            attestor,
            sys,
            max_connections,
            snapshot,
            connection,
            AuditLog::disabled(),
            None,
        )
        .await
    }

    async fn serve_full(
        attestor: Arc<dyn WorkloadAttestor>,
        sys: Arc<dyn PeerSys>,
        max_connections: usize,
        snapshot: CacheSnapshot,
        signer: Arc<dyn Signer>,
        audit: AuditLog<AgentEvent>,
        boot_id: Option<&str>,
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (cache_tx, cache_rx) = watch::channel(Arc::new(snapshot));
        let attestors = Attestors::with_capacity(vec![attestor], Duration::from_secs(5), 16);
        let shutdown = CancellationToken::new();
        let jwts = Arc::new(JwtCache::default());
        let instances = Instances::new(
            10,
            boot_id.map(str::to_owned),
            Arc::clone(&signer),
            Arc::clone(&jwts),
            audit.clone(),
            shutdown.clone(),
        );
        instances.follow(cache_rx.clone());
        let api = WorkloadApi::new(ApiParts {
            cache: cache_rx,
            attestors: attestors.clone(),
            signer,
            instances: instances.clone(),
            jwts,
            requests: RateLimiter::new(0, 1),
            audit,
            shutdown: shutdown.clone(),
        });
        let connections = ConnectionLimiter::new(max_connections);
        let acceptor = Acceptor {
            proc_root: Arc::new(ProcRoot::open(std::path::Path::new("/proc")).unwrap()),
            sys,
            connections: Arc::clone(&connections),
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(accept_loop(listener, acceptor, tx, shutdown.clone()));
        tokio::spawn(serve(api, rx, shutdown.clone()));
        Served {
            _dir: dir,
            socket,
            attestors,
            connections,
            shutdown,
            cache: cache_tx,
            instances,
        }
    }

    /// What the agent sends first on a fresh connection: its HTTP/2 preface (bytes), or
    /// nothing because it closed the connection (0).
    async fn first_bytes(stream: &mut UnixStream) -> usize {
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the agent answers or closes")
            .unwrap_or(0)
    }

    /// This process's open descriptors: (number, what it refers to), without the one
    /// used to list them.
    fn open_fds() -> std::collections::BTreeSet<(String, String)> {
        let listing = format!("/proc/{}/fd", std::process::id());
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let target = std::fs::read_link(entry.path()).ok()?;
                let target = target.to_string_lossy().into_owned();
                (target != listing)
                    .then(|| (entry.file_name().to_string_lossy().into_owned(), target))
            })
            .collect()
    }

    async fn settle(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_without_credentials_or_pid_are_dropped_at_accept() {
        // SECURITY.md §3.1 item 8 and §3.2 item 19: no SO_PEERCRED, or pid 0.
        for answer in [
            Err(Errno::ENOTCONN),
            Ok(PeerCred {
                pid: 0,
                uid: 0,
                gid: 0,
            }),
        ] {
            let sys = Arc::new(Sys {
                cred: Some(answer),
                ..Sys::default()
            });
            let served = serve_with(Arc::new(Slow::default()), sys.clone(), 0).await;
            let mut stream = UnixStream::connect(&served.socket).await.unwrap();
            assert_eq!(
                first_bytes(&mut stream).await,
                0,
                "{answer:?}: connection closed"
            );
            assert_eq!(sys.pidfd_calls.load(Ordering::SeqCst), 0);
        }
        // The real kernel answer for a live peer: served.
        let served = serve_with(Arc::new(Slow::default()), Arc::new(Sys::default()), 0).await;
        let mut stream = UnixStream::connect(&served.socket).await.unwrap();
        assert!(first_bytes(&mut stream).await > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn excess_connections_are_closed_before_any_proc_work() {
        let sys = Arc::new(Sys::default());
        let served = serve_with(Arc::new(Slow::default()), sys.clone(), 2).await;
        let mut a = UnixStream::connect(&served.socket).await.unwrap();
        let mut b = UnixStream::connect(&served.socket).await.unwrap();
        let mut c = UnixStream::connect(&served.socket).await.unwrap();
        assert!(first_bytes(&mut a).await > 0);
        assert!(first_bytes(&mut b).await > 0);
        assert_eq!(first_bytes(&mut c).await, 0, "third connection closed");
        // Only the two served connections were pinned (pidfd, /proc).
        assert_eq!(sys.pidfd_calls.load(Ordering::SeqCst), 2);
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!(served.connections.open_connections(me), 2);
        drop(a);
        settle("slot given back", || {
            served.connections.open_connections(me) == 1
        })
        .await;
        let mut d = UnixStream::connect(&served.socket).await.unwrap();
        assert!(first_bytes(&mut d).await > 0, "a freed slot serves again");
        drop((b, c, d));
        settle("every slot given back", || served.connections.total() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_gone_during_attestation_cancels_the_call_and_leaks_nothing() {
        // SECURITY.md §3.1 item 11.
        let _alone = crate::testing::DESCRIPTORS.write().await;
        let slow = Arc::new(Slow::default());
        let served = serve_with(slow.clone(), Arc::new(Sys::default()), 0).await;
        // Once a connection went through, every task of the service has started.
        let mut probe = UnixStream::connect(&served.socket).await.unwrap();
        assert!(first_bytes(&mut probe).await > 0);
        drop(probe);
        settle("probe connection closed", || {
            served.connections.total() == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let fds_before = open_fds();
        let tasks_before = metrics.num_alive_tasks();

        let socket = served.socket.clone();
        let call = tokio::spawn(async move {
            let mut client =
                tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
                    tessera_proto::uds::connect(&socket).await.unwrap(),
                );
            let mut request = Request::new(X509svidRequest {});
            request
                .metadata_mut()
                .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
            client.fetch_x509svid(request).await.map(|_| ())
        });
        settle("attestation started", || {
            slow.started.load(Ordering::SeqCst) == 1
        })
        .await;
        call.abort();
        let _ = call.await;
        // The attestor cannot be interrupted (it is on a blocking thread); once it is done
        // nothing of the call remains, and its result was thrown away, not cached.
        settle("attestation finished", || {
            slow.finished.load(Ordering::SeqCst) == 1
        })
        .await;
        // No descriptor the call opened is left (other tests of this binary may close
        // theirs meanwhile: only new ones count).
        settle("descriptors back to baseline", || {
            open_fds().is_subset(&fds_before)
        })
        .await;
        settle("tasks back to baseline", || {
            metrics.num_alive_tasks() == tasks_before
        })
        .await;
        assert_eq!(
            served.attestors.cached(),
            0,
            "the cancelled call cached nothing"
        );
        assert_eq!(served.connections.total(), 0);
    }

    #[test]
    fn security_header_must_be_exactly_one_true() {
        let mut ok = MetadataMap::new();
        ok.insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        assert!(check_security_header(&ok).is_ok());
        assert!(check_security_header(&MetadataMap::new()).is_err());
        for bad in ["True", "1", "", "true "] {
            let mut map = MetadataMap::new();
            map.insert(SECURITY_HEADER, MetadataValue::try_from(bad).unwrap());
            assert_eq!(
                check_security_header(&map).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        let mut twice = MetadataMap::new();
        twice.append(SECURITY_HEADER, MetadataValue::from_static("true"));
        twice.append(SECURITY_HEADER, MetadataValue::from_static("true"));
        assert_eq!(
            check_security_header(&twice).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// Answers `unix:uid:<peer uid>` at once.
    #[derive(Debug)]
    struct UidAttestor;

    impl WorkloadAttestor for UidAttestor {
        fn name(&self) -> &str {
            "uid"
        }
        fn attest(&self, w: &tessera_plugin_sdk::Workload) -> Result<Vec<Selector>, AttestError> {
            Ok(vec![
                Selector::new("unix", &format!("uid:{}", w.uid())).unwrap(),
            ])
        }
    }

    fn call<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        request
    }

    type Client = tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    >;

    async fn client(socket: &std::path::Path) -> Client {
        Client::new(tessera_proto::uds::connect(socket).await.unwrap())
    }

    fn ids(response: &X509svidResponse) -> Vec<String> {
        response.svids.iter().map(|s| s.spiffe_id.clone()).collect()
    }

    async fn next(
        stream: &mut tonic::Streaming<X509svidResponse>,
    ) -> Result<X509svidResponse, Status> {
        tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a message within 5 s")
            .map(|m| m.expect("stream open"))
    }

    fn fixed_svid(entry: &RegistrationEntry) -> Arc<WorkloadSvid> {
        let id = entry.spiffe_id.as_fixed().unwrap().clone();
        let der = crate::testing::certificate(&id, Duration::from_secs(3600));
        let info = tessera_plugin_sdk::x509::leaf_info(&der).unwrap();
        Arc::new(WorkloadSvid {
            entry_id: entry.id.clone(),
            entry_revision: entry.revision,
            spiffe_id: id,
            cert_chain: vec![der],
            private_key: vec![0x30, 0x00],
            serial_hex: info.serial_hex,
            not_before: info.not_before,
            not_after: info.not_after,
            renew_at: info.not_after,
        })
    }

    fn revoke(served: &Served, id: &str) {
        served.cache.send_modify(|s| {
            let mut next = (**s).clone();
            let mut revoked = (*next.revoked).clone();
            revoked.apply(
                false,
                &[tessera_proto::node::RevokedIdentity {
                    spiffe_id: id.to_owned(),
                    revoked_at: 0,
                    expires_at: i64::MAX / 2,
                }],
                SystemTime::now(),
            );
            next.revoked = Arc::new(revoked);
            *s = Arc::new(next);
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn templated_identities_revocations_and_crls_through_the_api() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        const BOOT: &str = "e8b29955-a05e-447e-aab4-2b2f92488a93";
        let signer = Arc::new(crate::testing::LocalSigner::new());
        let uid = nix::unistd::geteuid().as_raw();
        let selector = format!("unix:uid:{uid}");
        let web = signer.entry("e-web", "spiffe://example.org/web", &[&selector]);
        let bot = signer.entry("e-bot", "spiffe://example.org/bot/{instance}", &[&selector]);
        let unit = signer.entry(
            "e-unit",
            "spiffe://example.org/svc/{systemd_unit}",
            &[&selector],
        );
        let mut snapshot = crate::testing::snapshot_with(&[web.clone(), bot, unit]);
        snapshot.svids = Arc::new([(web.id.clone(), fixed_svid(&web))].into());
        snapshot.crls = Arc::new(vec![b"crl-1".to_vec()]);
        let td = TrustDomain::new("example.org").unwrap();
        snapshot.bundle = Arc::new(TrustBundle {
            trust_domain: td.clone(),
            authorities: Vec::new(),
            jwt: signer.jwt_bundle(&td),
            sequence_number: 1,
        });
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let audit = AuditLog::<AgentEvent>::open(&audit_path, "agent").unwrap();
        let served = serve_full(
            Arc::new(UidAttestor),
            Arc::new(KernelPeerSys),
            0,
            snapshot,
            signer.clone(),
            audit.clone(),
            Some(BOOT),
        )
        .await;

        // This process's own instance value.
        let me = i32::try_from(std::process::id()).unwrap();
        let myself = tessera_plugin_sdk::Workload::pin(
            me,
            uid,
            0,
            tessera_plugin_sdk::workload::pidfd_open(me).unwrap(),
            false,
            std::path::Path::new("/proc"),
        )
        .unwrap();
        let instance = tessera_plugin_sdk::template::instance_value(
            BOOT,
            me,
            myself.start_time().unwrap(),
            myself.pidfs_inode(),
        );
        let bot_id = format!("spiffe://example.org/bot/{instance}");

        // The fixed and the per-instance identity, with the CRLs; the entry whose
        // {systemd_unit} has no value does not apply (and does not block the others).
        let mut c = client(&served.socket).await;
        let mut stream = c
            .fetch_x509svid(call(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut stream).await.unwrap();
        // Entries in creation order (here: by id).
        assert_eq!(ids(&first), [bot_id.as_str(), "spiffe://example.org/web"]);
        assert_eq!(first.crl, vec![b"crl-1".to_vec()]);
        // The same process on another connection: the same ID, no second signing.
        let mut other = client(&served.socket).await;
        let again = next(
            &mut other
                .fetch_x509svid(call(X509svidRequest {}))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
        .unwrap();
        assert_eq!(ids(&again), ids(&first));
        assert_eq!(signer.x509_calls(), 1);
        assert_eq!(served.instances.len(), (1, 1));

        // JWT-SVIDs: `spiffe_id` is compared with the rendered ID.
        let jwt = c
            .fetch_jwtsvid(call(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: bot_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(jwt.svids.len(), 1);
        assert_eq!(jwt.svids[0].spiffe_id, bot_id);
        let bot_token = jwt.svids[0].svid.clone();
        let err = c
            .fetch_jwtsvid(call(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: format!("spiffe://example.org/bot/i-{}", "0".repeat(32)),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let web_token = c
            .fetch_jwtsvid(call(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: "spiffe://example.org/web".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .svids[0]
            .svid
            .clone();
        let validate = |token: String| ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: token,
        };
        c.validate_jwtsvid(call(validate(web_token.clone())))
            .await
            .unwrap();

        // A new CRL set is pushed.
        served.cache.send_modify(|s| {
            let mut next = (**s).clone();
            next.crls = Arc::new(vec![b"crl-2".to_vec()]);
            *s = Arc::new(next);
        });
        let pushed = next(&mut stream).await.unwrap();
        assert_eq!(pushed.crl, vec![b"crl-2".to_vec()]);
        assert_eq!(ids(&pushed), ids(&first));

        // Revoking the instance: pushed without it, dropped, its tokens refused.
        revoke(&served, &bot_id);
        let pushed = next(&mut stream).await.unwrap();
        assert_eq!(ids(&pushed), ["spiffe://example.org/web"]);
        assert_eq!(served.instances.len().0, 0);
        let err = c
            .validate_jwtsvid(call(validate(bot_token.clone())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("revoked"), "{}", err.message());
        // Revoking the last identity: the stream ends with PermissionDenied.
        revoke(&served, "spiffe://example.org/web");
        let err = next(&mut stream).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let err = c
            .validate_jwtsvid(call(validate(web_token.clone())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(signer.x509_calls(), 1, "never minted again");

        // The audit log: the attestation, each SVID served (with the instance), the
        // JWT by its jti, the refusals; never a key or a token.
        drop(served);
        tokio::task::spawn_blocking(move || audit.flush_blocking().unwrap())
            .await
            .unwrap();
        let text = std::fs::read_to_string(&audit_path).unwrap();
        let events: Vec<AgentEvent> = text
            .lines()
            .map(|line| serde_json::from_str::<tessera_audit::Record<AgentEvent>>(line).unwrap())
            .filter_map(|r| match r.entry {
                tessera_audit::Entry::Event(e) => Some(e),
                tessera_audit::Entry::Log(_) => None,
            })
            .collect();
        assert!(
            matches!(
                events.first(),
                Some(AgentEvent::WorkloadAttested { pid, result: Outcome::Ok, selectors, exe: Some(_), .. })
                    if *pid == me && *selectors == vec![selector.clone()]
            ),
            "{text}"
        );
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::X509SvidServed { spiffe_id, instance: Some(i), serial, ttl_seconds, .. }
                if *spiffe_id == bot_id && *i == instance && !serial.is_empty() && *ttl_seconds > 3000
        )), "{text}");
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::JwtSvidServed { spiffe_id, jwt_id: Some(_), audience, instance: Some(_), .. }
                if *spiffe_id == bot_id && *audience == vec!["svc".to_owned()]
        )), "{text}");
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::Refused { rpc, reason, .. }
                if rpc == "FetchX509SVID" && reason.contains("e-unit") && reason.contains("{systemd_unit}")
        )), "{text}");
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::InstanceDropped { spiffe_id, reason, .. } if *spiffe_id == bot_id && reason == "revoked"
        )), "{text}");
        assert!(events.iter().any(|e| matches!(e,
            AgentEvent::Refused { rpc, code, .. } if rpc == "ValidateJWTSVID" && code == "invalid_argument"
        )), "{text}");
        for secret in [&bot_token, &web_token] {
            assert!(!text.contains(secret.as_str()));
            assert!(!text.contains(secret.split('.').nth(2).unwrap()));
        }
        assert!(!text.contains("PRIVATE KEY"));
    }
}
