//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Every call must carry exactly one `workload.spiffe.io: true` metadata value
//! (`InvalidArgument` otherwise, before any attestation). The caller was pinned at
//! accept ([`crate::peer`]), after its uid's connection cap was checked
//! ([`crate::limits`]); each call takes a token of its uid's request budget
//! (`ResourceExhausted` when spent), resolves the caller's selectors through the
//! per-process attestation cache ([`Attestors::resolve`]), checks it is still alive, and
//! answers from the cache. Streams push again when an SVID rotates, the bundle or the
//! caller's entries change; before every push the caller is re-validated (alive, same
//! executable, credentials and cgroup, else attested again), and a stream whose caller
//! exits or no longer matches any entry ends with `PermissionDenied`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::{Selector, SpiffeId, TrustDomain};
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
use crate::cache::{CacheSnapshot, Entitlement, WorkloadSvid};
use crate::jwt_cache::JwtCache;
use crate::limits::{ConnectionLimiter, ConnectionPermit, RateLimiter};
use crate::node::ServerConnection;
use crate::peer::{PeerSys, ProcRoot};

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

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: watch::Receiver<Arc<CacheSnapshot>>,
    attestors: Attestors,
    connection: Arc<ServerConnection>,
    jwts: Arc<JwtCache>,
    requests: Arc<RateLimiter>,
    shutdown: CancellationToken,
}

/// What a stream does with one cache snapshot: send a message (with the key that
/// tells whether it differs from the last one), keep waiting, or refuse the caller.
enum Push<T, K> {
    Send(T, K),
    Wait,
    Deny,
}

impl WorkloadApi {
    /// A service answering from `cache`, with at most `requests` calls per uid. The
    /// attestation cache is closed when `shutdown` is cancelled.
    pub fn new(
        cache: watch::Receiver<Arc<CacheSnapshot>>,
        attestors: Attestors,
        connection: Arc<ServerConnection>,
        requests: RateLimiter,
        shutdown: CancellationToken,
    ) -> Self {
        {
            let attestors = attestors.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                attestors.close();
            });
        }
        Self {
            cache,
            attestors,
            connection,
            jwts: Arc::new(JwtCache::default()),
            requests: Arc::new(requests),
            shutdown,
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
        let attested = self
            .attestors
            .resolve(caller.process())
            .await
            .map_err(|err| failure_status(&caller, &err))?;
        ensure_alive(&caller)?;
        tracing::debug!(
            pid = caller.pid(),
            uid = caller.uid(),
            selectors = attested.selectors.len(),
            "workload attested"
        );
        Ok((caller, attested))
    }

    /// Runs a push stream: `build` turns each cache snapshot and the caller's current
    /// selectors into a message (or says to wait, or that the caller is entitled to
    /// nothing); a message equal to the last one sent is not sent again. Before each
    /// snapshot after the first the caller is re-validated (and re-attested when its
    /// executable, credentials or cgroup changed); a caller that exits ends the stream
    /// at once.
    fn stream<T, K>(
        &self,
        caller: Caller,
        attested: Attested,
        build: impl Fn(&CacheSnapshot, &[Selector]) -> Push<T, K> + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        K: PartialEq + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let mut cache = self.cache.clone();
        let shutdown = self.shutdown.clone();
        let attestors = self.attestors.clone();
        tokio::spawn(async move {
            let mut attested = attested;
            let mut fresh = true;
            let mut last: Option<K> = None;
            let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_DEADLINE;
            loop {
                let snapshot = Arc::clone(&cache.borrow_and_update());
                if !fresh {
                    match attestors.resolve(caller.process()).await {
                        Ok(now) => attested = now,
                        Err(err) => {
                            let _ = tx.send(Err(failure_status(&caller, &err))).await;
                            return;
                        }
                    }
                }
                fresh = false;
                match build(&snapshot, &attested.selectors) {
                    Push::Deny => {
                        if last.is_some() {
                            tracing::info!(
                                pid = caller.pid(),
                                uid = caller.uid(),
                                "caller no longer matches any entry: identity withdrawn, stream ended"
                            );
                        }
                        let _ = tx
                            .send(Err(Status::permission_denied("no identity issued")))
                            .await;
                        return;
                    }
                    Push::Wait => {}
                    Push::Send(message, key) => {
                        if last.as_ref() != Some(&key) {
                            if let Err(status) = ensure_alive(&caller) {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                            last = Some(key);
                        }
                    }
                }
                let waiting_for_first = last.is_none();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = cache.changed() => if changed.is_err() { return },
                    () = attested.exited.cancelled() => {
                        tracing::info!(
                            pid = caller.pid(),
                            uid = caller.uid(),
                            "stream caller exited: stream ended"
                        );
                        let _ = tx.send(Err(gone())).await;
                        return;
                    }
                    () = tokio::time::sleep_until(deadline), if waiting_for_first => {
                        let _ = tx.send(Err(Status::unavailable("identity not yet available; retry"))).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

fn gone() -> Status {
    Status::permission_denied("caller is no longer running")
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

/// The identity of an X.509-SVID response: which SVID objects (by address and serial)
/// and which bundle it carried.
#[derive(PartialEq)]
struct SentX509 {
    svids: Vec<usize>,
    serials: Vec<String>,
    bundle_sequence: u64,
}

/// The identity of a bundles response.
type SentBundles = (u64, Vec<Vec<u8>>);

fn svid_key(
    svids: &[(
        Arc<tessera_plugin_sdk::RegistrationEntry>,
        Arc<WorkloadSvid>,
    )],
) -> Vec<usize> {
    // Addresses of Arcs the stream holds no reference to could be reused; so the key
    // also includes each serial (see `x509_push`), and a reused address with the same
    // serial is the same SVID.
    svids
        .iter()
        .map(|(_, svid)| Arc::as_ptr(svid) as usize)
        .collect()
}

fn x509_push(snapshot: &CacheSnapshot, selectors: &[Selector]) -> Push<X509svidResponse, SentX509> {
    if !snapshot.synced {
        return Push::Wait;
    }
    match snapshot.entitlement(selectors, SystemTime::now()) {
        Entitlement::None => Push::Deny,
        Entitlement::Pending => Push::Wait,
        Entitlement::Ready(svids) => {
            let bundle = snapshot.bundle.concatenated_der();
            let response = X509svidResponse {
                svids: svids
                    .iter()
                    .map(|(entry, svid)| X509svid {
                        spiffe_id: svid.spiffe_id.to_string(),
                        x509_svid: svid.cert_chain.concat(),
                        x509_svid_key: svid.private_key.clone(),
                        bundle: bundle.clone(),
                        hint: entry.hint.clone(),
                    })
                    .collect(),
                crl: Vec::new(),
                federated_bundles: Default::default(),
            };
            let serials = svids
                .iter()
                .map(|(_, svid)| svid.serial_hex.clone())
                .collect();
            let key = SentX509 {
                svids: svid_key(&svids),
                serials,
                bundle_sequence: snapshot.bundle.sequence_number,
            };
            Push::Send(response, key)
        }
    }
}

fn bundles_push(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Push<X509BundlesResponse, SentBundles> {
    if !snapshot.synced {
        return Push::Wait;
    }
    if !snapshot
        .entries
        .values()
        .any(|entry| entry.matches(selectors))
    {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.concatenated_der());
    Push::Send(
        X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        },
        (bundle.sequence_number, bundle.authorities.clone()),
    )
}

fn jwt_bundles_push(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Push<JwtBundlesResponse, u64> {
    if !snapshot.synced {
        return Push::Wait;
    }
    if !snapshot
        .entries
        .values()
        .any(|entry| entry.matches(selectors))
    {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.jwks());
    Push::Send(JwtBundlesResponse { bundles }, bundle.sequence_number)
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
        let (caller, attested) = self.admit(&request).await?;
        Ok(Response::new(self.stream(caller, attested, x509_push)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (caller, attested) = self.admit(&request).await?;
        Ok(Response::new(self.stream(caller, attested, bundles_push)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
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
        let (caller, attested) = self.admit(&request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let entries: Vec<_> = snapshot
            .matching_entries(&attested.selectors)
            .into_iter()
            .filter(|entry| {
                wanted
                    .as_ref()
                    .is_none_or(|id| entry.spiffe_id.as_fixed() == Some(id))
            })
            .collect();
        if entries.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        // Without a requested ID, identities whose audience policy forbids this request
        // are skipped (a restricted second identity must not break the first); the
        // server still decides for the ones asked for.
        let entries: Vec<_> = if wanted.is_some() {
            entries
        } else {
            entries
                .into_iter()
                .filter(|entry| audience_policy_allows(entry, &audiences))
                .collect()
        };
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "audience is not allowed for this identity",
            ));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for entry in entries {
            let jwt = self
                .jwts
                .get(&self.connection, &entry, &audiences)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => status,
                    _ => Status::unavailable(format!(
                        "cannot obtain a JWT-SVID: {}",
                        status.message()
                    )),
                })?;
            svids.push(Jwtsvid {
                spiffe_id: entry.spiffe_id.to_string(),
                svid: jwt.token,
                hint: entry.hint.clone(),
            });
        }
        ensure_alive(&caller)?;
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (caller, attested) = self.admit(&request).await?;
        Ok(Response::new(self.stream(
            caller,
            attested,
            jwt_bundles_push,
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(request.metadata())?;
        if request.get_ref().audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if request.get_ref().svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // The caller must be an identified, live process; it needs no identity of its
        // own to validate a token.
        let (caller, _attested) = self.admit(&request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let bundle = &snapshot.bundle;
        let validated = tessera_plugin_sdk::jwt::validate(
            &request.get_ref().svid,
            &request.get_ref().audience,
            &|td: &TrustDomain| (td == &bundle.trust_domain).then(|| bundle.jwt.clone()),
            SystemTime::now(),
        )
        .map_err(|err| Status::invalid_argument(format!("invalid JWT-SVID: {err}")))?;
        ensure_alive(&caller)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(validated.claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "WIT-SVIDs are not served by this agent",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "WIT bundles are not served by this agent",
        ))
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
        _cache: watch::Sender<Arc<CacheSnapshot>>,
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
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
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
        };
        let (cache_tx, cache_rx) = watch::channel(Arc::new(snapshot));
        let verifier = Arc::new(crate::tls::ServerVerifier::new(
            Arc::new(crate::tls::ServerTrust::default()),
            SpiffeId::from_segments(&td, &["tessera", "server"]).unwrap(),
            crate::tls::provider(),
        ));
        let tls = crate::tls::client_config(verifier, None, crate::tls::provider()).unwrap();
        let connection = Arc::new(ServerConnection::new("127.0.0.1:1", Arc::new(tls)).unwrap());
        let attestors = Attestors::with_capacity(vec![attestor], Duration::from_secs(5), 16);
        let shutdown = CancellationToken::new();
        let api = WorkloadApi::new(
            cache_rx,
            attestors.clone(),
            connection,
            RateLimiter::new(0, 1),
            shutdown.clone(),
        );
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
            _cache: cache_tx,
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

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
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
        settle("descriptors back to baseline", || open_fds() == fds_before).await;
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
}
