//! The agent's side of the node API: channels to the server over mutual TLS, failover
//! between the configured servers, node attestation with a join token or x509pop, and
//! agent SVID renewal.
//!
//! **Failover.** `server_address` may list several servers of one trust domain (they
//! share one datastore, and the bundle holds every server's CA, so the agent SVID one
//! issued is accepted by all). Every node API call goes through
//! [`ServerConnection::call`]: it uses the current server; when the server cannot be
//! reached (a transport failure: refused, reset, TLS handshake or identity check failed,
//! timeout), answers `Unavailable` or does not answer in time, the next address is tried, round robin, until
//! each was tried once in this call; then the caller's own backoff applies before the
//! next round. A server that answers is kept (the agent does not hop on every call).
//! Any other answer, `PermissionDenied` (banned, evicted) above all, is the answer: no
//! other server is asked. Every address is authenticated the same way
//! (`spiffe://<td>/tessera/server`, chained to the current bundle).
//!
//! **Deadlines.** A server may accept connections, and even answer HTTP/2 keepalive
//! PINGs, while its handlers hang (its datastore connection is half-open, say). So every
//! attempt of a call on one server has a deadline: [`CALL_DEADLINE`] for
//! the agent's own calls (`RenewAgent`, the SVID manager's `BatchNewX509SVID`, an
//! `AttestAgent` stream as a whole, a `Sync` stream up to its first message), the
//! shorter [`WORKLOAD_SIGNING_DEADLINE`] for signings a workload is waiting for
//! (`NewJWTSVID`, a templated X.509-SVID). A deadline that elapses is a reason to try
//! the next server, like `Unavailable` (logged at warn with the server's address); after
//! a full round the caller gets `DeadlineExceeded`, which it retries with backoff. Once
//! open, a `Sync` stream may rightly stay silent for hours (the server sends nothing
//! while nothing changes for the agent): a dead connection under it is found by HTTP/2
//! keepalive ([`KEEPALIVE_INTERVAL`], [`KEEPALIVE_TIMEOUT`]), and when another call
//! leaves the stream's server for the next one ([`ServerConnection::watch_current`]),
//! the stream moves there too.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::node::{
    AgentSvid, AttestAgentRequest, AttestationParams, RenewAgentRequest, SyncRequest, SyncResponse,
    attest_agent_request, attest_agent_response,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::AgentError;

/// How long a connection attempt to the server may take (the TCP connection, then the
/// TLS handshake, each).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one attempt (on one server) of the agent's own node API calls:
/// `RenewAgent`, the SVID manager's `BatchNewX509SVID`, an `AttestAgent` stream from
/// its start to its result, a `Sync` stream from its opening to its first message.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one attempt of a signing a workload waits for (`NewJWTSVID`, a templated
/// X.509-SVID): short enough that trying two more servers still fits in the Workload
/// API's 30 s wait for a first answer
/// ([`crate::workload_api::FIRST_RESPONSE_DEADLINE`]).
pub const WORKLOAD_SIGNING_DEADLINE: Duration = Duration::from_secs(10);
/// HTTP/2 keepalive: a PING after this long without a frame from the server, also while
/// no call is open (the server sends nothing on a `Sync` stream while nothing changes).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// A PING not acknowledged within this closes the connection, and fails every call and
/// stream on it (a dead connection is noticed within the interval plus this).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The time limits of the node API connections (see the constants; tests shorten them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// [`CONNECT_TIMEOUT`].
    pub(crate) connect: Duration,
    /// [`CALL_DEADLINE`].
    pub(crate) call: Duration,
    /// [`WORKLOAD_SIGNING_DEADLINE`].
    pub(crate) workload_signing: Duration,
    /// [`KEEPALIVE_INTERVAL`].
    pub(crate) keepalive_interval: Duration,
    /// [`KEEPALIVE_TIMEOUT`].
    pub(crate) keepalive_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: CONNECT_TIMEOUT,
            call: CALL_DEADLINE,
            workload_signing: WORKLOAD_SIGNING_DEADLINE,
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_timeout: KEEPALIVE_TIMEOUT,
        }
    }
}

/// A lazily connecting gRPC channel to `address` through `tls`.
pub fn channel(address: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, AgentError> {
    channel_with(address, tls, &Timeouts::default())
}

fn channel_with(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
    timeouts: &Timeouts,
) -> Result<Channel, AgentError> {
    let target = address.to_owned();
    let connect_timeout = timeouts.connect;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|err| AgentError::Config(format!("server_address `{address}`: {err}")))?
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(timeouts.keepalive_interval)
        .keep_alive_timeout(timeouts.keepalive_timeout)
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let tls = Arc::clone(&tls);
            async move {
                let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(&target))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                tcp.set_nodelay(true)?;
                // The name only fills SNI: the verifier authenticates the server's SPIFFE ID.
                let name = ServerName::try_from("tessera-server")
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
                let stream = tokio::time::timeout(
                    connect_timeout,
                    TlsConnector::from(tls).connect(name, tcp),
                )
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        })),
    )
}

/// The text of `status` with the chain of its sources (a transport failure's message
/// alone says little: "transport error").
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Why a failed call should be tried on the next server, or `None` when the answer is
/// final: `Unavailable`, `DeadlineExceeded` (no answer in time: the agent's deadline
/// elapsed), or a failure below gRPC (the call carries a transport, HTTP/2 or I/O
/// error: the server could not be reached or the connection broke). A server that
/// answered anything else (`PermissionDenied` for a banned or evicted agent,
/// `NotFound`, `InvalidArgument`...) would answer the same elsewhere.
pub fn failover_reason(status: &tonic::Status) -> Option<String> {
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
    ) || transport_failure(status)
    {
        Some(describe(status))
    } else {
        None
    }
}

/// Whether a source of `status` is a transport or I/O error (the call never reached a
/// server's handler, or its connection broke).
fn transport_failure(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause.is::<tonic::transport::Error>() || cause.is::<io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// An error of one attempt of a [`ServerConnection::call`]: says whether the next
/// server should be tried.
pub trait Failover {
    /// Why the next server should be tried, or `None` when this error is the answer.
    fn failover_reason(&self) -> Option<String>;

    /// The error of an attempt that got no answer in time (`message` says from whom and
    /// how long it waited): a reason to try the next server.
    fn deadline_exceeded(message: String) -> Self
    where
        Self: Sized;
}

impl Failover for tonic::Status {
    fn failover_reason(&self) -> Option<String> {
        failover_reason(self)
    }

    fn deadline_exceeded(message: String) -> Self {
        tonic::Status::deadline_exceeded(message)
    }
}

/// One configured server.
#[derive(Debug)]
struct Server {
    address: String,
    channel: RwLock<Channel>,
}

/// The channels to the configured servers with the agent's current credentials (rebuilt
/// after the agent SVID is renewed so new calls present the new certificate), which of
/// them is in use, and whether the last call reached a server.
pub struct ServerConnection {
    servers: Vec<Server>,
    tls: Arc<rustls::ClientConfig>,
    timeouts: Timeouts,
    /// Index of the server in use (watched by the `Sync` stream, which follows it).
    current: watch::Sender<usize>,
    /// The last call found no server reachable.
    unreachable: AtomicBool,
    /// Bumped when a call succeeds after calls failed to reach any server: waiting
    /// retries can go at once instead of at the end of their backoff.
    reachable_again: watch::Sender<u64>,
}

impl fmt::Debug for ServerConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConnection")
            .field("servers", &self.addresses())
            .field("current", &self.current_address())
            .finish_non_exhaustive()
    }
}

impl ServerConnection {
    /// Connections to `addresses` (at least one), the first in use.
    pub fn new(addresses: &[String], tls: Arc<rustls::ClientConfig>) -> Result<Self, AgentError> {
        Self::with_timeouts(addresses, tls, Timeouts::default())
    }

    /// The same with other time limits (tests shorten them).
    pub(crate) fn with_timeouts(
        addresses: &[String],
        tls: Arc<rustls::ClientConfig>,
        timeouts: Timeouts,
    ) -> Result<Self, AgentError> {
        if addresses.is_empty() {
            return Err(AgentError::Config(
                "server_address lists no server".to_owned(),
            ));
        }
        let servers = addresses
            .iter()
            .map(|address| {
                Ok(Server {
                    address: address.clone(),
                    channel: RwLock::new(channel_with(address, Arc::clone(&tls), &timeouts)?),
                })
            })
            .collect::<Result<Vec<_>, AgentError>>()?;
        Ok(Self {
            servers,
            tls,
            timeouts,
            current: watch::Sender::new(0),
            unreachable: AtomicBool::new(false),
            reachable_again: watch::Sender::new(0),
        })
    }

    /// The same, starting with the server at `index` (the one node attestation used).
    #[must_use]
    pub fn starting_at(self, index: usize) -> Self {
        self.current.send_replace(index % self.servers.len());
        self
    }

    /// The time limits in force.
    pub(crate) fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// The configured addresses, in order.
    pub fn addresses(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.address.as_str()).collect()
    }

    /// Index of the server in use.
    pub fn current_index(&self) -> usize {
        *self.current.borrow() % self.servers.len()
    }

    /// Address of the server in use.
    pub fn current_address(&self) -> &str {
        self.address_at(self.current_index())
    }

    /// Address of the server at `index`.
    pub fn address_at(&self, index: usize) -> &str {
        &self.servers[index % self.servers.len()].address
    }

    /// Changes when the server in use changes (its value is not reduced modulo the
    /// number of servers: read [`ServerConnection::current_index`]).
    pub fn watch_current(&self) -> watch::Receiver<usize> {
        self.current.subscribe()
    }

    /// Changes (the value is bumped) whenever a call succeeds after calls could reach no
    /// server: a retry waiting for its backoff can go now.
    pub fn reachable_again(&self) -> watch::Receiver<u64> {
        self.reachable_again.subscribe()
    }

    fn client_at(&self, index: usize) -> NodeClient<Channel> {
        let slot = &self.servers[index % self.servers.len()].channel;
        let channel = match slot.read() {
            Ok(channel) => channel.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        NodeClient::new(channel)
    }

    /// Runs `attempt` (one node API call, `what` names it in logs) on the server in
    /// use; when it fails in a way another server may not ([`Failover`]), or gets no
    /// answer within [`CALL_DEADLINE`], on the next one, round robin, until every server
    /// was tried once. Returns the first answer that is not such a failure, or the last
    /// failure. The server that answered stays in use.
    pub async fn call<T, E, F, Fut>(&self, what: &str, attempt: F) -> Result<T, E>
    where
        E: Failover,
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_within(what, self.timeouts.call, attempt).await
    }

    /// [`ServerConnection::call`] with `deadline` for each attempt.
    pub async fn call_within<T, E, F, Fut>(
        &self,
        what: &str,
        deadline: Duration,
        attempt: F,
    ) -> Result<T, E>
    where
        E: Failover,
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_on(what, deadline, attempt)
            .await
            .map(|(value, _)| value)
    }

    /// [`ServerConnection::call_within`], also returning the index of the server that
    /// answered.
    async fn call_on<T, E, F, Fut>(
        &self,
        what: &str,
        deadline: Duration,
        mut attempt: F,
    ) -> Result<(T, usize), E>
    where
        E: Failover,
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let count = self.servers.len();
        let mut index = self.current_index();
        let mut tried = 0;
        loop {
            let answer = match tokio::time::timeout(deadline, attempt(self.client_at(index))).await
            {
                Ok(answer) => answer,
                Err(_) => Err(E::deadline_exceeded(format!(
                    "{what}: no answer from {} within {deadline:?}",
                    self.servers[index].address
                ))),
            };
            match answer {
                Ok(value) => {
                    self.answered(index);
                    return Ok((value, index));
                }
                Err(err) => match err.failover_reason() {
                    None => {
                        self.answered(index);
                        return Err(err);
                    }
                    Some(reason) => {
                        tried += 1;
                        index = self.failed(index, what, &reason, tried < count);
                        if tried >= count {
                            self.unreachable.store(true, Ordering::SeqCst);
                            return Err(err);
                        }
                    }
                },
            }
        }
    }

    /// The server at `index` answered: keep it; if no server could be reached before,
    /// say so and wake the waiting retries.
    fn answered(&self, index: usize) {
        let mut previous = index;
        self.current.send_if_modified(|current| {
            previous = *current % self.servers.len();
            *current = index;
            previous != index
        });
        if previous != index && self.servers.len() > 1 {
            tracing::info!(server = %self.servers[index].address, "node API: using server");
        }
        if self.unreachable.swap(false, Ordering::SeqCst) {
            tracing::info!(server = %self.servers[index].address, "node API: server reachable again");
            self.reachable_again.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The server at `index` failed (`reason`): move to the next one (unless another
    /// call already did) and return its index. `more` is false when this call has
    /// tried every server.
    fn failed(&self, index: usize, what: &str, reason: &str, more: bool) -> usize {
        let count = self.servers.len();
        let next = (index + 1) % count;
        if count == 1 {
            // The caller reports it and backs off; there is nowhere to switch to.
            return next;
        }
        let from = &self.servers[index].address;
        let to = &self.servers[next].address;
        let switched = self.current.send_if_modified(|current| {
            if *current % count == index {
                *current = next;
                true
            } else {
                false
            }
        });
        if more {
            tracing::warn!(server = %from, call = what, %reason, "node API: server failed; trying the next one");
            if switched {
                tracing::info!(server = %to, previous = %from, "node API: switched to the next server");
            }
        } else {
            // The next round starts where this one did.
            tracing::warn!(server = %from, call = what, %reason, "node API: server failed, and so did every other one; retrying with backoff");
        }
        next
    }

    /// Drops the current connections; the next calls dial again with the current
    /// credentials.
    pub fn reconnect(&self) -> Result<(), AgentError> {
        for server in &self.servers {
            let fresh = channel_with(&server.address, Arc::clone(&self.tls), &self.timeouts)?;
            if let Ok(mut slot) = server.channel.write() {
                *slot = fresh;
            }
        }
        Ok(())
    }
}

/// A failure of one attestation attempt: the server's answer or a failure below it
/// (tried on the next server), or a local failure (final).
enum AttemptError {
    Status(tonic::Status),
    Local(AgentError),
}

impl Failover for AttemptError {
    fn failover_reason(&self) -> Option<String> {
        match self {
            Self::Status(status) => failover_reason(status),
            Self::Local(_) => None,
        }
    }

    fn deadline_exceeded(message: String) -> Self {
        Self::Status(tonic::Status::deadline_exceeded(message))
    }
}

impl From<tonic::Status> for AttemptError {
    fn from(status: tonic::Status) -> Self {
        Self::Status(status)
    }
}

impl From<AttemptError> for AgentError {
    fn from(err: AttemptError) -> Self {
        match err {
            AttemptError::Status(status) => {
                let text = match failover_reason(&status) {
                    Some(reason) => format!("no server reachable: {reason}"),
                    None => status.message().to_owned(),
                };
                AgentError::Attestation(text)
            }
            AttemptError::Local(err) => err,
        }
    }
}

fn attestation_error(text: &str) -> AttemptError {
    AttemptError::Local(AgentError::Attestation(text.to_owned()))
}

/// Node attestation with a join token: sends the token and a CSR for `key`, returns
/// the agent SVID, bundle and revision. `connection` has no client certificate.
pub async fn attest_with_join_token(
    connection: &ServerConnection,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, AgentError> {
    let attempt = |mut client: NodeClient<Channel>| {
        let request = AttestAgentRequest {
            step: Some(attest_agent_request::Step::Params(AttestationParams {
                r#type: "join_token".into(),
                payload: token.as_bytes().to_vec(),
                csr: csr_der.clone(),
            })),
        };
        async move {
            let mut responses = client
                .attest_agent(futures::stream::iter([request]))
                .await?
                .into_inner();
            loop {
                let message = responses.message().await?.ok_or_else(|| {
                    attestation_error("server ended attestation without a result")
                })?;
                match message.step {
                    Some(attest_agent_response::Step::Result(svid)) => return Ok(svid),
                    Some(attest_agent_response::Step::Challenge(_)) => {
                        return Err(attestation_error(
                            "join_token attestation takes no challenge",
                        ));
                    }
                    None => {}
                }
            }
        }
    };
    Ok(connection.call("AttestAgent", attempt).await?)
}

/// Node attestation with x509pop: sends the chain of `credentials` and a CSR, answers
/// the server's one challenge with the leaf key (on a blocking thread), returns the
/// agent SVID, bundle and revision. `connection` has no client certificate.
pub async fn attest_with_x509pop(
    connection: &ServerConnection,
    credentials: Arc<tessera_plugin_x509pop::AgentCredentials>,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, AgentError> {
    let attempt = |mut client: NodeClient<Channel>| {
        let credentials = Arc::clone(&credentials);
        let csr = csr_der.clone();
        async move {
            let closed = || attestation_error("attestation stream closed");
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let params = AttestAgentRequest {
                step: Some(attest_agent_request::Step::Params(AttestationParams {
                    r#type: tessera_plugin_x509pop::PLUGIN_NAME.into(),
                    payload: credentials.attestation_payload(),
                    csr,
                })),
            };
            tx.send(params).await.map_err(|_| closed())?;
            let mut responses = client
                .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut answered = false;
            loop {
                let message = responses.message().await?.ok_or_else(|| {
                    attestation_error("server ended attestation without a result")
                })?;
                match message.step {
                    Some(attest_agent_response::Step::Result(svid)) => return Ok(svid),
                    Some(attest_agent_response::Step::Challenge(challenge)) => {
                        if answered {
                            return Err(attestation_error(
                                "x509pop attestation takes one challenge only",
                            ));
                        }
                        answered = true;
                        let credentials = Arc::clone(&credentials);
                        let signature =
                            tokio::task::spawn_blocking(move || credentials.respond(&challenge))
                                .await
                                .map_err(|err| {
                                    AttemptError::Local(AgentError::Task(err.to_string()))
                                })?
                                .map_err(|err| attestation_error(&err.to_string()))?;
                        tx.send(AttestAgentRequest {
                            step: Some(attest_agent_request::Step::ChallengeResponse(signature)),
                        })
                        .await
                        .map_err(|_| closed())?;
                    }
                    None => {}
                }
            }
        }
    };
    Ok(connection.call("AttestAgent", attempt).await?)
}

/// Asks the server for a new agent SVID for the key behind `csr_der`.
pub async fn renew(
    connection: &ServerConnection,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, tonic::Status> {
    connection
        .call("RenewAgent", |mut client| {
            let request = RenewAgentRequest {
                csr: csr_der.clone(),
            };
            async move { client.renew_agent(request).await }
        })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| tonic::Status::internal("server sent no SVID"))
}

/// A `Sync` stream that a server opened.
#[derive(Debug)]
pub struct SyncStream {
    /// Index of the server it runs on.
    pub server: usize,
    /// Its first message (the server always sends one at once: the snapshot, or the
    /// changes since the revision asked); `None` when the server ended it at once.
    pub first: Option<SyncResponse>,
    /// The messages after the first.
    pub rest: tonic::Streaming<SyncResponse>,
}

/// Opens a `Sync` stream from `since_revision` on the server in use, or the next: the
/// attempt on one server lasts until the first message, within [`CALL_DEADLINE`] (a
/// server whose handler hangs, or that answers that first message with `Unavailable`,
/// is left for the next like one that cannot be reached).
pub async fn open_sync(
    connection: &ServerConnection,
    since_revision: u64,
) -> Result<SyncStream, tonic::Status> {
    let ((first, rest), server) = connection
        .call_on("Sync", connection.timeouts.call, |mut client| async move {
            let mut rest = client
                .sync(SyncRequest { since_revision })
                .await?
                .into_inner();
            let first = rest.message().await?;
            Ok::<_, tonic::Status>((first, rest))
        })
        .await?;
    Ok(SyncStream {
        server,
        first,
        rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeCa, NodeMode, closed_address, short_timeouts};

    const SERVER_ID: &str = "spiffe://example.org/tessera/server";

    fn connection(ca: &FakeCa, addresses: &[&str]) -> ServerConnection {
        let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
        ServerConnection::new(&addresses, ca.client_tls()).unwrap()
    }

    /// Who answered a renewal (the fake puts its name in the SVID), or the error code.
    async fn renewed_by(connection: &ServerConnection) -> Result<String, tonic::Code> {
        renew(connection, vec![1])
            .await
            .map(|svid| svid.spiffe_id)
            .map_err(|status| status.code())
    }

    fn connection_with(ca: &FakeCa, addresses: &[&str], timeouts: Timeouts) -> ServerConnection {
        let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
        ServerConnection::with_timeouts(&addresses, ca.client_tls(), timeouts).unwrap()
    }

    #[test]
    fn only_unreachable_or_unavailable_servers_are_left() {
        assert!(failover_reason(&tonic::Status::unavailable("down")).is_some());
        assert!(failover_reason(&tonic::Status::deadline_exceeded("no answer in time")).is_some());
        for status in [
            tonic::Status::permission_denied("agent is banned"),
            tonic::Status::permission_denied("agent must re-attest"),
            tonic::Status::not_found("no such entry"),
            tonic::Status::invalid_argument("bad csr"),
            tonic::Status::unauthenticated("agent SVID is required"),
            tonic::Status::internal("boom"),
        ] {
            assert_eq!(failover_reason(&status), None, "{status:?}");
        }
        // A failure below gRPC (connection broke) carries an I/O error as its source.
        let broken = tonic::Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert!(failover_reason(&broken).is_some(), "{broken:?}");
    }

    #[tokio::test]
    async fn calls_fail_over_round_robin_and_stay_on_a_server_that_answers() {
        let ca = FakeCa::new();
        let down = closed_address().await;
        // Answers, but is not the server of this trust domain: refused at the handshake.
        let impostor = ca
            .serve("impostor", "spiffe://example.org/tessera/agent/x")
            .await;
        let a = ca.serve("a", SERVER_ID).await;
        let b = ca.serve("b", SERVER_ID).await;
        let servers = connection(&ca, &[&down, &impostor.address, &a.address, &b.address]);
        assert_eq!(servers.current_address(), down);

        // The first two cannot be used: the call lands on a, which stays in use.
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert_eq!(servers.current_address(), a.address);
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert_eq!((a.calls(), b.calls()), (2, 0), "no hopping while a answers");
        assert_eq!(impostor.calls(), 0, "the impostor never got a call through");

        // a is unavailable: b answers, and stays in use after a recovers.
        a.set_mode(NodeMode::Unavailable);
        assert_eq!(renewed_by(&servers).await, Ok("b".into()));
        assert_eq!((a.calls(), b.calls()), (3, 1));
        a.set_mode(NodeMode::Serve);
        assert_eq!(renewed_by(&servers).await, Ok("b".into()));
        assert_eq!((a.calls(), b.calls()), (3, 2));

        // b goes away: round robin wraps past the unusable two back to a.
        b.stop().await;
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert_eq!(servers.current_address(), a.address);

        // A ban is an answer, not an outage: no other server is asked.
        a.set_mode(NodeMode::Banned);
        let before = (a.calls(), impostor.calls());
        assert_eq!(
            renewed_by(&servers).await,
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!((a.calls(), impostor.calls()), (before.0 + 1, before.1));
        assert_eq!(servers.current_address(), a.address);

        // Nothing reachable: one full round, then the last failure for the caller's
        // backoff; the next success is announced.
        a.set_mode(NodeMode::Unavailable);
        let mut again = servers.reachable_again();
        let calls = a.calls();
        assert_eq!(renewed_by(&servers).await, Err(tonic::Code::Unavailable));
        assert_eq!(a.calls(), calls + 1, "each server once per round");
        assert!(!again.has_changed().unwrap());
        a.set_mode(NodeMode::Serve);
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert!(again.has_changed().unwrap(), "reachable again is announced");
        again.mark_unchanged();
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert!(!again.has_changed().unwrap(), "only after an outage");
    }

    /// The review's case: a server that accepts connections (and answers HTTP/2 PINGs)
    /// but whose handlers hang. Every call leaves it at its deadline for the next server;
    /// alone, it makes the call fail (retryably) at the deadline instead of hanging.
    #[tokio::test]
    async fn a_server_that_never_answers_is_left_at_the_deadline() {
        use crate::signer::Signer as _;
        let ca = FakeCa::new();
        let a = ca.serve("a", SERVER_ID).await;
        let b = ca.serve("b", SERVER_ID).await;
        a.set_mode(NodeMode::Hang);
        let timeouts = short_timeouts();
        let within = |elapsed: Duration, deadline: Duration| {
            assert!(elapsed >= deadline, "{elapsed:?} < {deadline:?}");
            assert!(elapsed < deadline + Duration::from_secs(2), "{elapsed:?}");
        };

        // Renewal: a hangs, b answers once a's deadline (400 ms) has passed.
        let servers = connection_with(&ca, &[&a.address, &b.address], timeouts);
        let asked = tokio::time::Instant::now();
        assert_eq!(renewed_by(&servers).await, Ok("b".into()));
        within(asked.elapsed(), timeouts.call);
        assert_eq!((a.calls(), b.calls()), (1, 1));
        assert_eq!(servers.current_address(), b.address, "b stays in use");

        // Signing for a workload: its own, shorter deadline (250 ms).
        let servers = connection_with(&ca, &[&a.address, &b.address], timeouts);
        let asked = tokio::time::Instant::now();
        let jwt = servers
            .new_jwt("e1", &["aud".to_owned()], &Default::default())
            .await
            .unwrap();
        assert_eq!(jwt.spiffe_id, "b");
        within(asked.elapsed(), timeouts.workload_signing);
        assert!(asked.elapsed() < timeouts.call, "{:?}", asked.elapsed());
        let servers = connection_with(&ca, &[&a.address, &b.address], timeouts);
        let asked = tokio::time::Instant::now();
        assert!(
            servers
                .new_x509("e1", vec![1], &Default::default())
                .await
                .is_err_and(|status| status.code() == tonic::Code::Internal),
            "b answered (with no result)"
        );
        within(asked.elapsed(), timeouts.workload_signing);
        assert_eq!(servers.current_address(), b.address);

        // Attestation, a stream, as a whole.
        let servers = connection_with(&ca, &[&a.address, &b.address], timeouts);
        let asked = tokio::time::Instant::now();
        let svid = attest_with_join_token(&servers, "id.secret", vec![1])
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id, "b");
        within(asked.elapsed(), timeouts.call);

        // a alone: the call ends at the deadline with a retryable error, and the next
        // success is announced like after any outage.
        let servers = connection_with(&ca, &[&a.address], timeouts);
        let again = servers.reachable_again();
        let asked = tokio::time::Instant::now();
        let status = renew(&servers, vec![1]).await.unwrap_err();
        within(asked.elapsed(), timeouts.call);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains(&a.address), "{status:?}");
        assert!(failover_reason(&status).is_some(), "retryable");
        assert!(
            crate::Removal::from_status(&status).is_none(),
            "not a removal"
        );
        let err = attest_with_join_token(&servers, "id.secret", vec![1])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no server reachable"), "{err}");
        a.set_mode(NodeMode::Serve);
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
        assert!(again.has_changed().unwrap());

        // The default deadlines.
        let defaults = Timeouts::default();
        assert_eq!(defaults.call, Duration::from_secs(30));
        assert_eq!(defaults.workload_signing, Duration::from_secs(10));
        assert!(
            defaults.workload_signing * 3 <= crate::workload_api::FIRST_RESPONSE_DEADLINE,
            "three servers fit in a workload's first wait"
        );
    }

    #[tokio::test]
    async fn a_single_server_is_retried_by_the_caller_only() {
        let ca = FakeCa::new();
        let a = ca.serve("a", SERVER_ID).await;
        let servers = connection(&ca, &[&a.address]);
        a.set_mode(NodeMode::Unavailable);
        assert_eq!(renewed_by(&servers).await, Err(tonic::Code::Unavailable));
        assert_eq!(a.calls(), 1);
        a.set_mode(NodeMode::Serve);
        assert_eq!(renewed_by(&servers).await, Ok("a".into()));
    }

    #[tokio::test]
    async fn attestation_fails_over_and_says_which_server_attested() {
        let ca = FakeCa::new();
        let down = closed_address().await;
        let a = ca.serve("a", SERVER_ID).await;
        let servers = connection(&ca, &[&down, &a.address]);
        let svid = attest_with_join_token(&servers, "id.secret", vec![1])
            .await
            .unwrap();
        assert_eq!(svid.spiffe_id, "a");
        assert_eq!(servers.current_index(), 1);
        // Nothing reachable: the error says so.
        a.stop().await;
        let err = attest_with_join_token(&servers, "id.secret", vec![1])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no server reachable"), "{err}");
        // A refusal is reported as the server's answer.
        let b = ca.serve("b", SERVER_ID).await;
        b.set_mode(NodeMode::Banned);
        let servers = connection(&ca, &[&b.address, &down]);
        let err = attest_with_join_token(&servers, "id.secret", vec![1])
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(err, "node attestation failed: agent is banned");
    }
}
