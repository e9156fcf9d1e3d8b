//! The agent's side of the node API: channels to the server over mutual TLS, failover
//! between the configured servers, node attestation with a join token or x509pop, and
//! agent SVID renewal.
//!
//! **Failover.** `server_address` may list several servers of one trust domain (they
//! share one datastore, and the bundle holds every server's CA, so the agent SVID one
//! issued is accepted by all). Every node API call goes through
//! [`ServerConnection::call`]: it uses the current server; when the server cannot be
//! reached (a transport failure: refused, reset, TLS handshake or identity check failed,
//! timeout) or answers `Unavailable`, the next address is tried, round robin, until
//! each was tried once in this call; then the caller's own backoff applies before the
//! next round. A server that answers is kept (the agent does not hop on every call).
//! Any other answer, `PermissionDenied` (banned, evicted) above all, is the answer: no
//! other server is asked. Every address is authenticated the same way
//! (`spiffe://<td>/tessera/server`, chained to the current bundle).

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tessera_proto::node::node_client::NodeClient;
use tessera_proto::node::{
    AgentSvid, AttestAgentRequest, AttestationParams, RenewAgentRequest, attest_agent_request,
    attest_agent_response,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::AgentError;

/// How long a connection attempt to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting gRPC channel to `address` through `tls`.
pub fn channel(address: &str, tls: Arc<rustls::ClientConfig>) -> Result<Channel, AgentError> {
    let target = address.to_owned();
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|err| AgentError::Config(format!("server_address `{address}`: {err}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let tls = Arc::clone(&tls);
            async move {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
                tcp.set_nodelay(true)?;
                // The name only fills SNI: the verifier authenticates the server's SPIFFE ID.
                let name = ServerName::try_from("tessera-server")
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
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
/// final: `Unavailable`, or a failure below gRPC (the call carries a transport, HTTP/2
/// or I/O error: the server could not be reached or the connection broke). A server
/// that answered anything else (`PermissionDenied` for a banned or evicted agent,
/// `NotFound`, `InvalidArgument`...) would answer the same elsewhere.
pub fn failover_reason(status: &tonic::Status) -> Option<String> {
    if status.code() == tonic::Code::Unavailable || transport_failure(status) {
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
}

impl Failover for tonic::Status {
    fn failover_reason(&self) -> Option<String> {
        failover_reason(self)
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
    /// Index of the server in use.
    current: AtomicUsize,
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
                    channel: RwLock::new(channel(address, Arc::clone(&tls))?),
                })
            })
            .collect::<Result<Vec<_>, AgentError>>()?;
        Ok(Self {
            servers,
            tls,
            current: AtomicUsize::new(0),
            unreachable: AtomicBool::new(false),
            reachable_again: watch::Sender::new(0),
        })
    }

    /// The same, starting with the server at `index` (the one node attestation used).
    #[must_use]
    pub fn starting_at(self, index: usize) -> Self {
        self.current
            .store(index % self.servers.len(), Ordering::SeqCst);
        self
    }

    /// The configured addresses, in order.
    pub fn addresses(&self) -> Vec<&str> {
        self.servers.iter().map(|s| s.address.as_str()).collect()
    }

    /// Index of the server in use.
    pub fn current_index(&self) -> usize {
        self.current.load(Ordering::SeqCst) % self.servers.len()
    }

    /// Address of the server in use.
    pub fn current_address(&self) -> &str {
        &self.servers[self.current_index()].address
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
    /// use; when it fails in a way another server may not ([`Failover`]), on the next
    /// one, round robin, until every server was tried once. Returns the first answer
    /// that is not such a failure, or the last failure. The server that answered stays
    /// in use.
    pub async fn call<T, E, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, E>
    where
        E: Failover,
        F: FnMut(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let count = self.servers.len();
        let mut index = self.current_index();
        let mut tried = 0;
        loop {
            match attempt(self.client_at(index)).await {
                Ok(value) => {
                    self.answered(index);
                    return Ok(value);
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
        let previous = self.current.swap(index, Ordering::SeqCst) % self.servers.len();
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
        let switched = self
            .current
            .compare_exchange(index, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
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
            let fresh = channel(&server.address, Arc::clone(&self.tls))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeCa, NodeMode, closed_address};

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

    #[test]
    fn only_unreachable_or_unavailable_servers_are_left() {
        assert!(failover_reason(&tonic::Status::unavailable("down")).is_some());
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
