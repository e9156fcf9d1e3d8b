//! The agent's side of the node API: channels to the server over mutual TLS, node
//! attestation with a join token or x509pop, and agent SVID renewal.

use std::io;
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
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                // The name only fills SNI: the verifier authenticates the server's SPIFFE ID.
                let name = ServerName::try_from("tessera-server")
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
                let stream = TlsConnector::from(tls).connect(name, tcp).await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        })),
    )
}

/// The channel to the server with the agent's current credentials; replaced after the
/// agent SVID is renewed so new calls present the new certificate.
#[derive(Debug)]
pub struct ServerConnection {
    address: String,
    tls: Arc<rustls::ClientConfig>,
    channel: RwLock<Channel>,
}

impl ServerConnection {
    /// A connection to `address`.
    pub fn new(address: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, AgentError> {
        let channel = channel(address, Arc::clone(&tls))?;
        Ok(Self {
            address: address.to_owned(),
            tls,
            channel: RwLock::new(channel),
        })
    }

    /// A client on the current channel.
    pub fn client(&self) -> NodeClient<Channel> {
        let channel = match self.channel.read() {
            Ok(channel) => channel.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        NodeClient::new(channel)
    }

    /// Drops the current connection; the next call dials again with the current
    /// credentials.
    pub fn reconnect(&self) -> Result<(), AgentError> {
        let fresh = channel(&self.address, Arc::clone(&self.tls))?;
        if let Ok(mut slot) = self.channel.write() {
            *slot = fresh;
        }
        Ok(())
    }
}

/// Node attestation with a join token: sends the token and a CSR for `key`, returns
/// the agent SVID, bundle and revision.
pub async fn attest_with_join_token(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, AgentError> {
    let mut client = NodeClient::new(channel(address, tls)?);
    let request = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestationParams {
            r#type: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr: csr_der,
        })),
    };
    let mut responses = client
        .attest_agent(futures::stream::iter([request]))
        .await
        .map_err(|status| AgentError::Attestation(status.message().to_owned()))?
        .into_inner();
    loop {
        let message = responses
            .message()
            .await
            .map_err(|status| AgentError::Attestation(status.message().to_owned()))?
            .ok_or_else(|| {
                AgentError::Attestation("server ended attestation without a result".into())
            })?;
        match message.step {
            Some(attest_agent_response::Step::Result(svid)) => return Ok(svid),
            Some(attest_agent_response::Step::Challenge(_)) => {
                return Err(AgentError::Attestation(
                    "join_token attestation takes no challenge".into(),
                ));
            }
            None => {}
        }
    }
}

/// Node attestation with x509pop: sends the chain of `credentials` and a CSR, answers
/// the server's one challenge with the leaf key (on a blocking thread), returns the
/// agent SVID, bundle and revision.
pub async fn attest_with_x509pop(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
    credentials: Arc<tessera_plugin_x509pop::AgentCredentials>,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, AgentError> {
    let mut client = NodeClient::new(channel(address, tls)?);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let params = AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestationParams {
            r#type: tessera_plugin_x509pop::PLUGIN_NAME.into(),
            payload: credentials.attestation_payload(),
            csr: csr_der,
        })),
    };
    tx.send(params)
        .await
        .map_err(|_| AgentError::Attestation("attestation stream closed".into()))?;
    let mut responses = client
        .attest_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|status| AgentError::Attestation(status.message().to_owned()))?
        .into_inner();
    let mut answered = false;
    loop {
        let message = responses
            .message()
            .await
            .map_err(|status| AgentError::Attestation(status.message().to_owned()))?
            .ok_or_else(|| {
                AgentError::Attestation("server ended attestation without a result".into())
            })?;
        match message.step {
            Some(attest_agent_response::Step::Result(svid)) => return Ok(svid),
            Some(attest_agent_response::Step::Challenge(challenge)) => {
                if answered {
                    return Err(AgentError::Attestation(
                        "x509pop attestation takes one challenge only".into(),
                    ));
                }
                answered = true;
                let credentials = Arc::clone(&credentials);
                let signature =
                    tokio::task::spawn_blocking(move || credentials.respond(&challenge))
                        .await
                        .map_err(|err| AgentError::Task(err.to_string()))?
                        .map_err(|err| AgentError::Attestation(err.to_string()))?;
                tx.send(AttestAgentRequest {
                    step: Some(attest_agent_request::Step::ChallengeResponse(signature)),
                })
                .await
                .map_err(|_| AgentError::Attestation("attestation stream closed".into()))?;
            }
            None => {}
        }
    }
}

/// Asks the server for a new agent SVID for the key behind `csr_der`.
pub async fn renew(
    connection: &ServerConnection,
    csr_der: Vec<u8>,
) -> Result<AgentSvid, tonic::Status> {
    connection
        .client()
        .renew_agent(RenewAgentRequest { csr: csr_der })
        .await?
        .into_inner()
        .svid
        .ok_or_else(|| tonic::Status::internal("server sent no SVID"))
}
