//! The node API (`tessera.node.v1.Node`): agent attestation with join tokens, agent SVID
//! renewal bound to the current serial, the `Sync` push stream, and X.509-SVID signing
//! for the entries an agent is authorized for.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use futures::Stream;
use tessera_plugin_join_token::{JoinToken, agent_path_segments};
use tessera_plugin_sdk::{RegistrationEntry, SpiffeId, TemplateValues};
use tessera_proto::convert::entry_to_proto;
use tessera_proto::node::node_server::Node;
use tessera_proto::node::{
    AgentSvid, AttestAgentRequest, AttestAgentResponse, BatchNewX509svidRequest,
    BatchNewX509svidResponse, ItemError, NewJwtsvidRequest, NewJwtsvidResponse, RenewAgentRequest,
    RenewAgentResponse, SyncRequest, SyncResponse, X509Svid, X509svidResult, attest_agent_request,
    attest_agent_response, x509svid_result,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::{self, CaError};
use crate::datastore::{AttestedAgent, ChangeKind, ChangeSet, MAX_JWT_AUDIENCES, TokenOutcome};
use crate::error::ApiError;
use crate::state::{ServerState, is_reserved_path, unix_seconds};
use crate::tls::NodePeer;

/// Most SVIDs one `BatchNewX509SVID` call may ask for.
pub const MAX_BATCH: usize = 1000;

/// The node API service.
#[derive(Debug, Clone)]
pub struct NodeService {
    state: Arc<ServerState>,
}

/// An authenticated agent: its ID, the aliases it serves, the serial it presented.
#[derive(Debug, Clone)]
struct AgentContext {
    id: SpiffeId,
    aliases: Vec<SpiffeId>,
}

impl AgentContext {
    /// An agent may serve entries whose parent is its ID or one of its aliases (exact
    /// comparison of canonical IDs).
    fn may_serve(&self, entry: &RegistrationEntry) -> bool {
        entry.parent_id == self.id || self.aliases.contains(&entry.parent_id)
    }

    fn parent_ids(&self) -> Vec<SpiffeId> {
        std::iter::once(self.id.clone())
            .chain(self.aliases.iter().cloned())
            .collect()
    }
}

impl NodeService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// Identifies the agent behind a request from the client certificate verified during
    /// the TLS handshake, and checks that the certificate's serial is the one bound to
    /// the agent (SECURITY.md §2 rule 4).
    async fn authenticate(&self, peer: Option<&NodePeer>) -> Result<AgentContext, ApiError> {
        let leaf = peer
            .and_then(|peer| peer.certificates.first())
            .ok_or_else(|| ApiError::Unauthenticated("an agent SVID is required".into()))?;
        let id = ca::spiffe_id_of_certificate(leaf)
            .map_err(|err| ApiError::Unauthenticated(format!("client certificate: {err}")))?;
        let serial = ca::serial_of_certificate(leaf)
            .map_err(|err| ApiError::Unauthenticated(format!("client certificate: {err}")))?;
        if !id.is_member_of(self.state.trust_domain()) || !id.has_path_prefix("/tessera/agent") {
            return Err(ApiError::PermissionDenied(format!(
                "{id} is not an agent identity; workload SVIDs cannot use the node API"
            )));
        }
        let agent = self
            .state
            .datastore
            .get_agent(&id)
            .await?
            .ok_or_else(|| ApiError::PermissionDenied("agent is not attested".into()))?;
        if serial == agent.serial {
            if agent.previous_serial.is_some() {
                self.state
                    .datastore
                    .confirm_agent_serial(&id, &serial)
                    .await?;
            }
        } else if agent.previous_serial.as_deref() != Some(serial.as_str()) {
            tracing::warn!(
                agent_id = %id,
                presented_serial = %serial,
                "agent presented a superseded SVID serial: possible stolen credentials"
            );
            return Err(ApiError::PermissionDenied(
                "agent SVID is no longer active".into(),
            ));
        }
        Ok(AgentContext {
            id,
            aliases: agent.aliases,
        })
    }

    async fn attest_join_token(
        &self,
        payload: &[u8],
        csr: &[u8],
    ) -> Result<AttestAgentResponse, ApiError> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| ApiError::InvalidArgument("join token is not UTF-8".into()))?;
        let token = JoinToken::parse(text)
            .map_err(|err| ApiError::InvalidArgument(format!("invalid join token: {err}")))?;
        let public_key = ca::public_key_from_csr(csr)?;
        let agent_id =
            SpiffeId::from_segments(self.state.trust_domain(), &agent_path_segments(token.id()))
                .map_err(|err| {
                    ApiError::InvalidArgument(format!("invalid join token id: {err}"))
                })?;
        // Sign first, then spend the token and record the agent in one transaction: a
        // token is never used up without an agent to show for it. An SVID signed for a
        // token that turns out invalid is dropped unseen.
        let svid = self.sign_agent_svid(&public_key, &agent_id)?;
        let now = SystemTime::now();
        let agent = AttestedAgent {
            spiffe_id: agent_id.clone(),
            attestation_type: "join_token".into(),
            serial: svid.serial_hex.clone(),
            previous_serial: None,
            expires_at: svid.not_after,
            aliases: Vec::new(),
            first_attested_at: now,
            last_seen_at: now,
        };
        match self
            .state
            .datastore
            .attest_with_join_token(token.id(), &token.secret_hash(), now, agent)
            .await?
        {
            TokenOutcome::Consumed { .. } => {}
            TokenOutcome::Expired => {
                tracing::info!(token_id = token.id(), "refused an expired join token");
                return Err(ApiError::InvalidArgument("join token has expired".into()));
            }
            TokenOutcome::Invalid => {
                tracing::info!(
                    token_id = token.id(),
                    "refused an unknown or used join token"
                );
                return Err(ApiError::InvalidArgument(
                    "join token does not exist or has already been used".into(),
                ));
            }
        };
        self.state.publish_revision().await;
        tracing::info!(agent_id = %agent_id, serial = %svid.serial_hex, "agent attested with a join token");
        Ok(AttestAgentResponse {
            step: Some(attest_agent_response::Step::Result(
                self.agent_svid_message(&agent_id, svid.der).await?,
            )),
        })
    }

    fn sign_agent_svid(
        &self,
        public_key: &[u8],
        agent_id: &SpiffeId,
    ) -> Result<ca::IssuedCertificate, ApiError> {
        Ok(self.state.ca.sign_x509_svid(
            public_key,
            agent_id,
            &[],
            self.state.config.agent_svid_ttl,
        )?)
    }

    async fn agent_svid_message(
        &self,
        agent_id: &SpiffeId,
        der: Vec<u8>,
    ) -> Result<AgentSvid, ApiError> {
        Ok(AgentSvid {
            spiffe_id: agent_id.to_string(),
            cert_chain: vec![der],
            bundle: Some(self.state.bundle().await?),
            revision: self.state.datastore.current_revision().await?,
        })
    }

    /// One `Sync` message: a snapshot when asked for (or when the feed no longer reaches
    /// back to `since`), else the changes after `since`. `None` when nothing changed.
    async fn sync_message(
        &self,
        agent: &AgentContext,
        since: u64,
        first: bool,
    ) -> Result<Option<SyncResponse>, ApiError> {
        let datastore = &self.state.datastore;
        let changes = if since == 0 {
            ChangeSet::TooOld
        } else {
            datastore.changes_since(since).await?
        };
        let changes = match changes {
            ChangeSet::Complete(changes) => changes,
            ChangeSet::TooOld => {
                // Read the revision before the entries: a write racing with this
                // snapshot is then replayed by the next delta (upserts are idempotent).
                let revision = datastore.current_revision().await?;
                let entries = datastore
                    .list_entries_by_parent(&agent.parent_ids())
                    .await?;
                return Ok(Some(SyncResponse {
                    revision,
                    snapshot: true,
                    entries: entries.iter().map(entry_to_proto).collect(),
                    deleted_entry_ids: Vec::new(),
                    bundle: Some(self.state.bundle().await?),
                    ..SyncResponse::default()
                }));
            }
        };
        if changes.is_empty() && !first {
            return Ok(None);
        }

        let mut revision = since;
        let mut entry_ids = BTreeSet::new();
        let mut bundle_changed = first;
        let parents = agent.parent_ids();
        for change in &changes {
            revision = revision.max(change.revision);
            match change.kind {
                // Only entries of this agent's parents (before or after the change): an
                // agent never learns the ids of other agents' entries.
                ChangeKind::EntryUpserted | ChangeKind::EntryDeleted
                    if change.scope.is_empty()
                        || change
                            .scope
                            .iter()
                            .any(|p| parents.iter().any(|own| own.as_str() == p)) =>
                {
                    entry_ids.insert(change.object_id.clone());
                }
                ChangeKind::EntryUpserted | ChangeKind::EntryDeleted => {}
                ChangeKind::BundleUpdated => bundle_changed = true,
                ChangeKind::AgentUpdated => {}
            }
        }
        let mut message = SyncResponse {
            revision,
            ..SyncResponse::default()
        };
        for id in entry_ids {
            match datastore.get_entry(&id).await? {
                Some(entry) if agent.may_serve(&entry) => {
                    message.entries.push(entry_to_proto(&entry))
                }
                _ => message.deleted_entry_ids.push(id),
            }
        }
        if bundle_changed {
            message.bundle = Some(self.state.bundle().await?);
        }
        Ok(Some(message))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Node for NodeService {
    type AttestAgentStream = BoxStream<AttestAgentResponse>;
    type SyncStream = ReceiverStream<Result<SyncResponse, Status>>;

    async fn attest_agent(
        &self,
        request: Request<Streaming<AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty attestation stream"))?;
        let Some(attest_agent_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument(
                "the first message must carry attestation parameters",
            ));
        };
        let response = match params.r#type.as_str() {
            "join_token" => self.attest_join_token(&params.payload, &params.csr).await?,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unsupported node attestation type `{}`",
                    other.escape_debug()
                )));
            }
        };
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(response)
        }))))
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let peer = request.extensions().get::<NodePeer>().cloned();
        let agent = self.authenticate(peer.as_ref()).await?;
        let presented = peer
            .as_ref()
            .and_then(|peer| peer.certificates.first())
            .map(|leaf| ca::serial_of_certificate(leaf))
            .transpose()
            .map_err(|err: CaError| Status::unauthenticated(err.to_string()))?
            .unwrap_or_default();
        let public_key = ca::public_key_from_csr(&request.get_ref().csr).map_err(ApiError::from)?;
        let svid = self.sign_agent_svid(&public_key, &agent.id)?;
        let rotated = self
            .state
            .datastore
            .rotate_agent_serial(&agent.id, &presented, &svid.serial_hex, svid.not_after)
            .await
            .map_err(ApiError::from)?;
        if !rotated {
            tracing::warn!(agent_id = %agent.id, "renewal with a serial that is no longer current");
            return Err(ApiError::PermissionDenied("agent SVID is no longer active".into()).into());
        }
        self.state.publish_revision().await;
        tracing::info!(agent_id = %agent.id, serial = %svid.serial_hex, "agent SVID renewed");
        Ok(Response::new(RenewAgentResponse {
            svid: Some(self.agent_svid_message(&agent.id, svid.der).await?),
        }))
    }

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>())
            .await?;
        let mut since = request.get_ref().since_revision;
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        let mut revisions = self.state.revisions.subscribe();
        tokio::spawn(async move {
            let mut first = true;
            loop {
                match service.sync_message(&agent, since, first).await {
                    Ok(Some(message)) => {
                        since = message.revision;
                        // Changes that concerned other agents only: nothing to send,
                        // but the stream moves past them.
                        let empty = !message.snapshot
                            && message.entries.is_empty()
                            && message.deleted_entry_ids.is_empty()
                            && message.bundle.is_none();
                        if (!empty || first) && tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(err) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                }
                first = false;
                tokio::select! {
                    () = service.state.shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = revisions.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn batch_new_x509svid(
        &self,
        request: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>())
            .await?;
        let params = request.into_inner().params;
        if params.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} SVIDs per call"
            )));
        }
        // Look every entry up first (async), then sign the whole batch on a blocking
        // thread: a 1000-item batch is ~20 ms of CPU that must not stall the runtime.
        let mut work = Vec::with_capacity(params.len());
        for param in params {
            let entry = match self.state.datastore.get_entry(&param.entry_id).await {
                Ok(Some(entry)) if agent.may_serve(&entry) => {
                    render_spiffe_id(&entry, &param.template_values).map(|id| (entry, id))
                }
                Ok(_) => Err(Status::not_found("entry not found or not authorized")),
                Err(err) => Err(ApiError::from(err).into()),
            };
            work.push((param, entry));
        }
        let state = Arc::clone(&self.state);
        let agent_id = agent.id.clone();
        let results = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(param, entry)| {
                    let result = match entry {
                        Ok((entry, spiffe_id)) => sign_workload_svid(
                            &state,
                            &agent_id,
                            &entry,
                            &spiffe_id,
                            &param.public_key,
                        ),
                        Err(status) => item_error(status),
                    };
                    X509svidResult {
                        entry_id: param.entry_id,
                        result: Some(result),
                    }
                })
                .collect()
        })
        .await
        .map_err(|err| ApiError::Internal(format!("signing task: {err}")))?;
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>())
            .await?;
        let request = request.into_inner();
        if request.audiences.is_empty() {
            return Err(Status::invalid_argument(
                "at least one audience is required",
            ));
        }
        if request.audiences.len() > MAX_JWT_AUDIENCES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_JWT_AUDIENCES} audiences"
            )));
        }
        for audience in &request.audiences {
            crate::admin::validate_audience(audience).map_err(Status::invalid_argument)?;
        }
        let entry = match self
            .state
            .datastore
            .get_entry(&request.entry_id)
            .await
            .map_err(ApiError::from)?
        {
            Some(entry) if agent.may_serve(&entry) => entry,
            _ => return Err(Status::not_found("entry not found or not authorized")),
        };
        let spiffe_id = render_spiffe_id(&entry, &request.template_values)?;
        let mut audiences = request.audiences;
        audiences.sort();
        audiences.dedup();
        if audiences.len() > 1 && !entry.jwt_multi_audience {
            return Err(Status::permission_denied(
                "this entry allows one audience per JWT-SVID",
            ));
        }
        let refused = (!entry.jwt_audiences.is_empty())
            .then(|| audiences.iter().find(|a| !entry.jwt_audiences.contains(a)))
            .flatten();
        if let Some(refused) = refused {
            tracing::info!(agent_id = %agent.id, spiffe_id = %entry.spiffe_id, audience = %refused.escape_debug(), "JWT-SVID refused: audience not allowed");
            return Err(Status::permission_denied(
                "audience is not allowed for this identity",
            ));
        }
        let ttl = entry
            .jwt_svid_ttl
            .unwrap_or(self.state.config.default_jwt_svid_ttl)
            .min(self.state.config.max_jwt_svid_ttl);
        let signed = self
            .state
            .jwt
            .current()
            .sign(&spiffe_id, &audiences, ttl, std::time::SystemTime::now())
            .map_err(|err| ApiError::Internal(format!("JWT signing: {err}")))?;
        self.state.jwt_svids_signed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent_id = %agent.id, %spiffe_id, jti = %signed.jti, "signed JWT-SVID");
        Ok(Response::new(NewJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            token: signed.token,
            issued_at: unix_seconds(signed.issued_at),
            expires_at: unix_seconds(signed.expires_at),
        }))
    }
}

/// The SPIFFE ID to sign for an entry: the entry's own ID, or its template rendered
/// with the caller's values as sent by the agent. Each value is checked against its
/// placeholder's shape (a path segment, SECURITY.md §3.6 item 61); a value the template
/// does not use, or a rendered ID in the reserved prefix, is refused.
fn render_spiffe_id(
    entry: &RegistrationEntry,
    wire_values: &std::collections::HashMap<String, String>,
) -> Result<SpiffeId, Status> {
    let values = TemplateValues::from_map(wire_values)
        .map_err(|err| Status::invalid_argument(format!("template_values: {err}")))?;
    if values.restricted_to(&entry.spiffe_id) != values {
        return Err(Status::invalid_argument(
            "template_values: a value for a placeholder the entry does not use",
        ));
    }
    let id = entry
        .spiffe_id
        .render(&values)
        .map_err(|err| Status::invalid_argument(format!("template_values: {err}")))?;
    if is_reserved_path(id.path()) {
        return Err(Status::invalid_argument(
            "template_values: the rendered ID lies in the reserved path prefix",
        ));
    }
    Ok(id)
}

/// Signs one workload X.509-SVID: ID, DNS names and TTL from the entry, only the key
/// from the request. Blocking (CPU): runs on a blocking thread.
fn sign_workload_svid(
    state: &ServerState,
    agent_id: &SpiffeId,
    entry: &RegistrationEntry,
    spiffe_id: &SpiffeId,
    public_key: &[u8],
) -> x509svid_result::Result {
    let ttl = entry
        .x509_svid_ttl
        .unwrap_or(state.config.default_x509_svid_ttl);
    match state
        .ca
        .sign_x509_svid(public_key, spiffe_id, &entry.dns_names, ttl)
    {
        Ok(cert) => {
            state.x509_svids_signed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(agent_id = %agent_id, %spiffe_id, serial = %cert.serial_hex, "signed X.509-SVID");
            x509svid_result::Result::Svid(X509Svid {
                spiffe_id: spiffe_id.to_string(),
                cert_chain: vec![cert.der],
                expires_at: unix_seconds(cert.not_after),
            })
        }
        Err(err) => item_error(ApiError::from(err).into()),
    }
}

fn item_error(status: Status) -> x509svid_result::Result {
    x509svid_result::Result::Error(ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    })
}
