//! The node API (`tessera.node.v1.Node`): agent attestation with join tokens or x509pop
//! (one challenge on the same stream), agent SVID
//! renewal bound to the current serial, the `Sync` push stream (entries, bundle,
//! revocations, CRL, and the final word to a banned or evicted agent), and X.509- and
//! JWT-SVID signing for the entries an agent is authorized for, never for a revoked
//! identity. Every signing, attestation, renewal and refusal is audited.
//!
//! Refusals an agent must act on (`PermissionDenied`, exact messages): [`AGENT_BANNED`]
//! (stop, delete the SVID, exit), [`AGENT_MUST_REATTEST`] (evicted or unknown: attest
//! again), [`AGENT_NOT_ACTIVE`] (a superseded SVID), [`IDENTITY_REVOKED`].

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use futures::Stream;
use tessera_audit::{Outcome, ServerEvent};
use tessera_plugin_join_token::{JoinToken, agent_path_segments};
use tessera_plugin_sdk::{RegistrationEntry, SpiffeId, TemplateValues, TrustDomain};
use tessera_plugin_x509pop::{AttestationError, Candidate, Challenge, X509PopVerifier};
use tessera_proto::convert::entry_to_proto;
use tessera_proto::node::FederatedBundles;
use tessera_proto::node::node_server::Node;
use tessera_proto::node::{
    AgentStatus, AgentSvid, AttestAgentRequest, AttestAgentResponse, AttestationParams,
    BatchNewX509svidRequest, BatchNewX509svidResponse, ItemError, NewJwtsvidRequest,
    NewJwtsvidResponse, NewX509svidParams, RenewAgentRequest, RenewAgentResponse, RevokedIdentity,
    SyncRequest, SyncResponse, X509Svid, X509svidResult, attest_agent_request,
    attest_agent_response, x509svid_result,
};
use tessera_proto::types::{Bundle, JwtAuthority};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca;
use crate::datastore::{
    AttestedAgent, ChangeKind, ChangeSet, DatastoreError, InstanceSvid, MAX_JWT_AUDIENCES,
    Revocation, TokenOutcome,
};
use crate::error::ApiError;
use crate::state::{CurrentCrl, ServerState, is_reserved_path, unix_seconds};
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
    serial: String,
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

    /// Whether a change (or revocation) with this scope concerns the agent: an empty
    /// scope concerns every agent, else one of its parent IDs must be in it.
    fn concerns<'a>(&self, scope: impl IntoIterator<Item = &'a str>) -> bool {
        let mut scope = scope.into_iter().peekable();
        scope.peek().is_none()
            || scope.any(|p| p == self.id.as_str() || self.aliases.iter().any(|a| a.as_str() == p))
    }
}

/// What one turn of a `Sync` stream produced.
enum SyncStep {
    /// A message to send (a snapshot, or a delta that may be empty).
    Message(SyncResponse),
    /// The agent was banned or evicted: send this and end the stream.
    Final(SyncResponse),
}

/// What an attestation attempt learnt, for the audit record.
#[derive(Debug, Default)]
struct AttestAudit {
    method: String,
    token_id: Option<String>,
    agent_id: Option<String>,
}

/// A workload X.509-SVID to sign: the request item with its entry and rendered ID, or
/// why it cannot be signed.
type SignWork = (
    NewX509svidParams,
    Result<(RegistrationEntry, SpiffeId), ApiError>,
);

impl NodeService {
    /// A service over `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// Records (and logs) a refused agent call.
    fn refused(&self, agent_id: &SpiffeId, serial: Option<&str>, rpc: &str, reason: &str) {
        tracing::info!(agent_id = %agent_id, rpc, reason, "agent call refused");
        self.state.audit.record(ServerEvent::AgentRefused {
            agent_id: agent_id.to_string(),
            serial: serial.map(str::to_owned),
            rpc: rpc.to_owned(),
            reason: reason.to_owned(),
        });
    }

    /// Identifies the agent behind a request from the client certificate verified during
    /// the TLS handshake, and checks that the agent is attested, not banned, and that
    /// the certificate's serial is the one bound to it (SECURITY.md §2 rule 4, §3.9
    /// items 89-91). Every refusal is audited as `agent_refused` for `rpc`.
    async fn authenticate(
        &self,
        peer: Option<&NodePeer>,
        rpc: &str,
    ) -> Result<AgentContext, ApiError> {
        let leaf = peer
            .and_then(|peer| peer.certificates.first())
            .ok_or_else(|| ApiError::Unauthenticated("an agent SVID is required".into()))?;
        let id = ca::spiffe_id_of_certificate(leaf)
            .map_err(|err| ApiError::Unauthenticated(format!("client certificate: {err}")))?;
        let serial = ca::serial_of_certificate(leaf)
            .map_err(|err| ApiError::Unauthenticated(format!("client certificate: {err}")))?;
        if !id.is_member_of(self.state.trust_domain()) || !id.has_path_prefix("/tessera/agent") {
            self.refused(&id, Some(&serial), rpc, "not an agent identity");
            return Err(ApiError::PermissionDenied(format!(
                "{id} is not an agent identity; workload SVIDs cannot use the node API"
            )));
        }
        let Some(agent) = self.state.datastore.get_agent(&id).await? else {
            // Never attested, or evicted since.
            self.refused(&id, Some(&serial), rpc, AGENT_MUST_REATTEST);
            return Err(ApiError::PermissionDenied(AGENT_MUST_REATTEST.into()));
        };
        if agent.banned_at.is_some() {
            self.refused(&id, Some(&serial), rpc, AGENT_BANNED);
            return Err(ApiError::PermissionDenied(AGENT_BANNED.into()));
        }
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
                rpc,
                "agent presented a superseded SVID serial: possible stolen credentials"
            );
            self.refused(&id, Some(&serial), rpc, "superseded agent SVID serial");
            return Err(ApiError::PermissionDenied(AGENT_NOT_ACTIVE.into()));
        }
        Ok(AgentContext {
            id,
            aliases: agent.aliases,
            serial,
        })
    }

    /// Node attestation from the first message of an `AttestAgent` stream; every
    /// attempt is audited (`node_attested`, with the join token's id, never its value).
    async fn attest(
        &self,
        params: Result<AttestationParams, ApiError>,
        peer: Option<String>,
    ) -> Result<AttestAgentResponse, ApiError> {
        let mut audit = AttestAudit::default();
        let result = match params {
            Ok(params) => match params.r#type.as_str() {
                "join_token" => {
                    audit.method = "join_token".into();
                    self.attest_join_token(&params.payload, &params.csr, &mut audit)
                        .await
                }
                other => Err(ApiError::InvalidArgument(format!(
                    "unsupported node attestation type `{}`",
                    other.escape_debug()
                ))),
            },
            Err(err) => Err(err),
        };
        self.record_attestation(audit, peer, result.as_ref().err());
        result
    }

    /// Audits one attestation attempt (`node_attested`): `error` is `None` on success.
    fn record_attestation(
        &self,
        audit: AttestAudit,
        peer: Option<String>,
        error: Option<&ApiError>,
    ) {
        let (outcome, reason) = match error {
            None => (Outcome::Ok, None),
            Some(err) => (Outcome::Error, Some(err.to_string())),
        };
        self.state.audit.record(ServerEvent::NodeAttested {
            method: audit.method,
            agent_id: error.is_none().then_some(audit.agent_id).flatten(),
            token_id: audit.token_id,
            peer,
            result: outcome,
            reason,
        });
    }

    /// x509pop attestation (`docs/plugin_server_nodeattestor_x509pop.md`): checks the
    /// payload and the CSR, then answers with a stream that carries the challenge and,
    /// once the agent's response on `inbound` verifies, the agent SVID. Failures before
    /// the challenge are the call's status; later ones end the stream. Every attempt is
    /// audited once.
    async fn attest_x509pop(
        &self,
        verifier: Arc<X509PopVerifier>,
        params: AttestationParams,
        inbound: Streaming<AttestAgentRequest>,
        peer: Option<String>,
    ) -> Result<BoxStream<AttestAgentResponse>, ApiError> {
        let mut audit = AttestAudit {
            method: tessera_plugin_x509pop::PLUGIN_NAME.into(),
            ..AttestAudit::default()
        };
        let started = async {
            let public_key = ca::public_key_from_csr(&params.csr)?;
            let payload = params.payload;
            let checker = Arc::clone(&verifier);
            let candidate = tokio::task::spawn_blocking(move || {
                checker.verify_payload(&payload, SystemTime::now())
            })
            .await
            .map_err(|err| ApiError::Internal(format!("x509pop task: {err}")))?
            .map_err(x509pop_error)?;
            Ok::<_, ApiError>((public_key, candidate))
        }
        .await;
        let (public_key, candidate) = match started {
            Ok(started) => started,
            Err(err) => {
                tracing::info!(reason = %err, "refused an x509pop attestation");
                self.record_attestation(audit, peer, Some(&err));
                return Err(err);
            }
        };
        let challenge = verifier.challenge();
        let first = AttestAgentResponse {
            step: Some(attest_agent_response::Step::Challenge(
                challenge.encoded().to_vec(),
            )),
        };
        let (tx, rx) = mpsc::channel(2);
        let service = self.clone();
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let shutdown = service.state.shutdown.clone();
            let result = tokio::select! {
                result = service.finish_x509pop(
                    &verifier, &candidate, challenge, inbound, &public_key, &mut audit,
                ) => result,
                () = shutdown.cancelled() => Err(ApiError::Unavailable("the server is stopping".into())),
            };
            if let Err(err) = &result {
                tracing::info!(reason = %err, "refused an x509pop attestation");
            }
            service.record_attestation(audit, peer, result.as_ref().err());
            let _ = tx.send(result.map_err(Status::from)).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// The second half of x509pop: waits (bounded by the challenge timeout) for the
    /// agent's answer, verifies it, refuses a banned agent, signs and records.
    async fn finish_x509pop(
        &self,
        verifier: &Arc<X509PopVerifier>,
        candidate: &Candidate,
        challenge: Challenge,
        mut inbound: Streaming<AttestAgentRequest>,
        public_key: &[u8],
        audit: &mut AttestAudit,
    ) -> Result<AttestAgentResponse, ApiError> {
        let wait = verifier.limits().challenge_timeout;
        let response = match tokio::time::timeout(wait, inbound.message()).await {
            Err(_) => return Err(x509pop_error(AttestationError::ChallengeExpired)),
            Ok(Ok(Some(AttestAgentRequest {
                step: Some(attest_agent_request::Step::ChallengeResponse(response)),
            }))) => response,
            Ok(Ok(Some(_))) => {
                return Err(ApiError::InvalidArgument(
                    "expected the x509pop challenge response".into(),
                ));
            }
            Ok(Ok(None)) => {
                return Err(ApiError::InvalidArgument(
                    "the attestation stream ended before the challenge response".into(),
                ));
            }
            Ok(Err(status)) => return Err(ApiError::InvalidArgument(status.message().to_owned())),
        };
        let node = {
            let verifier = Arc::clone(verifier);
            let candidate = candidate.clone();
            tokio::task::spawn_blocking(move || {
                verifier.verify_response(&candidate, challenge, &response)
            })
            .await
            .map_err(|err| ApiError::Internal(format!("x509pop task: {err}")))?
            .map_err(x509pop_error)?
        };
        let agent_id = node
            .agent_id(self.state.trust_domain())
            .map_err(|err| ApiError::Internal(format!("x509pop agent id: {err}")))?;
        audit.agent_id = Some(agent_id.to_string());
        // Re-attestation is allowed (same certificate, same ID), a ban is not: checked
        // before signing, and again by the upsert in the same statement as the write.
        let existing = self.state.datastore.get_agent(&agent_id).await?;
        if existing.as_ref().is_some_and(|a| a.banned_at.is_some()) {
            tracing::warn!(agent_id = %agent_id, "a banned agent tried to attest");
            return Err(ApiError::PermissionDenied(AGENT_BANNED.into()));
        }
        let svid = self.sign_agent_svid(public_key, &agent_id)?;
        let now = SystemTime::now();
        let agent = AttestedAgent {
            spiffe_id: agent_id.clone(),
            attestation_type: tessera_plugin_x509pop::PLUGIN_NAME.into(),
            serial: svid.serial_hex.clone(),
            previous_serial: None,
            expires_at: svid.not_after,
            // Aliases an operator gave the agent survive its re-attestation.
            aliases: existing.map(|a| a.aliases).unwrap_or_default(),
            first_attested_at: now,
            last_seen_at: now,
            banned_at: None,
        };
        match self.state.datastore.upsert_agent(agent).await {
            Err(DatastoreError::AgentBanned) => {
                tracing::warn!(agent_id = %agent_id, "a banned agent tried to attest");
                return Err(ApiError::PermissionDenied(AGENT_BANNED.into()));
            }
            other => other?,
        }
        self.state.publish_revision().await;
        tracing::info!(
            agent_id = %agent_id,
            serial = %svid.serial_hex,
            selectors = node.selectors().len(),
            "agent attested with x509pop"
        );
        Ok(AttestAgentResponse {
            step: Some(attest_agent_response::Step::Result(
                self.agent_svid_message(&agent_id, svid.cert_chain())
                    .await?,
            )),
        })
    }

    async fn attest_join_token(
        &self,
        payload: &[u8],
        csr: &[u8],
        audit: &mut AttestAudit,
    ) -> Result<AttestAgentResponse, ApiError> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| ApiError::InvalidArgument("join token is not UTF-8".into()))?;
        let token = JoinToken::parse(text)
            .map_err(|err| ApiError::InvalidArgument(format!("invalid join token: {err}")))?;
        audit.token_id = Some(token.id().to_owned());
        let public_key = ca::public_key_from_csr(csr)?;
        let agent_id =
            SpiffeId::from_segments(self.state.trust_domain(), &agent_path_segments(token.id()))
                .map_err(|err| {
                    ApiError::InvalidArgument(format!("invalid join token id: {err}"))
                })?;
        audit.agent_id = Some(agent_id.to_string());
        // Sign first, then spend the token and record the agent in one transaction: a
        // token is never used up without an agent to show for it. An SVID signed for a
        // token that turns out invalid (or for a banned ID) is dropped unseen.
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
            banned_at: None,
        };
        let outcome = match self
            .state
            .datastore
            .attest_with_join_token(token.id(), &token.secret_hash(), now, agent)
            .await
        {
            Err(DatastoreError::AgentBanned) => {
                tracing::warn!(agent_id = %agent_id, token_id = token.id(), "a banned agent tried to attest");
                return Err(ApiError::PermissionDenied(AGENT_BANNED.into()));
            }
            other => other?,
        };
        match outcome {
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
                self.agent_svid_message(&agent_id, svid.cert_chain())
                    .await?,
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

    /// The agent's SVID message; `cert_chain` is the leaf, then the CA and upstream
    /// intermediates when the CA is not a root ([`ca::IssuedCertificate::cert_chain`]).
    async fn agent_svid_message(
        &self,
        agent_id: &SpiffeId,
        cert_chain: Vec<Vec<u8>>,
    ) -> Result<AgentSvid, ApiError> {
        Ok(AgentSvid {
            spiffe_id: agent_id.to_string(),
            cert_chain,
            bundle: Some(self.state.bundle().await?),
            revision: self.state.datastore.current_revision().await?,
        })
    }

    async fn renew(
        &self,
        peer: Option<&NodePeer>,
        csr: &[u8],
    ) -> Result<RenewAgentResponse, ApiError> {
        const RPC: &str = "RenewAgent";
        let agent = self.authenticate(peer, RPC).await?;
        let public_key = ca::public_key_from_csr(csr)?;
        let svid = self.sign_agent_svid(&public_key, &agent.id)?;
        let rotated = self
            .state
            .datastore
            .rotate_agent_serial(&agent.id, &agent.serial, &svid.serial_hex, svid.not_after)
            .await?;
        if !rotated {
            // Superseded (or banned) between authentication and now.
            tracing::warn!(
                agent_id = %agent.id,
                presented_serial = %agent.serial,
                "renewal with a serial that is no longer current: possible stolen credentials"
            );
            self.refused(
                &agent.id,
                Some(&agent.serial),
                RPC,
                "superseded agent SVID serial",
            );
            return Err(ApiError::PermissionDenied(AGENT_NOT_ACTIVE.into()));
        }
        self.state.publish_revision().await;
        self.state.audit.record(ServerEvent::AgentRenewed {
            agent_id: agent.id.to_string(),
            old_serial: agent.serial.clone(),
            new_serial: svid.serial_hex.clone(),
        });
        tracing::info!(agent_id = %agent.id, serial = %svid.serial_hex, "agent SVID renewed");
        Ok(RenewAgentResponse {
            svid: Some(
                self.agent_svid_message(&agent.id, svid.cert_chain())
                    .await?,
            ),
        })
    }

    /// One turn of a `Sync` stream: a snapshot when asked for (or when the feed no
    /// longer reaches back to `since`), else the changes after `since` that concern
    /// the agent; [`SyncStep::Final`] when the agent was banned or evicted. `crl` is
    /// the CRL to send with a delta (a snapshot always carries the current one).
    async fn sync_message(
        &self,
        agent: &AgentContext,
        since: u64,
        crl: Option<&CurrentCrl>,
    ) -> Result<SyncStep, ApiError> {
        let datastore = &self.state.datastore;
        let changes = if since == 0 {
            ChangeSet::TooOld
        } else {
            datastore.changes_since(since).await?
        };
        let now = SystemTime::now();
        let changes = match changes {
            ChangeSet::Complete(changes) => changes,
            ChangeSet::TooOld => {
                // Read the revision before anything else: a write racing with this
                // snapshot is then replayed by the next delta (every item is
                // idempotent).
                let revision = datastore.current_revision().await?;
                match datastore.get_agent(&agent.id).await? {
                    None => return Ok(final_status(revision, AgentStatus::Evicted)),
                    Some(a) if a.banned_at.is_some() => {
                        return Ok(final_status(revision, AgentStatus::Banned));
                    }
                    Some(_) => {}
                }
                let entries = datastore
                    .list_entries_by_parent(&agent.parent_ids())
                    .await?;
                let revoked = datastore
                    .list_revocations()
                    .await?
                    .iter()
                    // Every agent: revocations are public like a CRL, and every agent's
                    // ValidateJWTSVID must reject the identity's tokens.
                    .filter(|r| r.expires_at > now)
                    .map(revoked_to_proto)
                    .collect();
                let crl = Arc::clone(&self.state.crl.borrow());
                let federated_bundles = Some(self.federated_bundles(&entries).await?);
                return Ok(SyncStep::Message(SyncResponse {
                    revision,
                    snapshot: true,
                    entries: entries.iter().map(entry_to_proto).collect(),
                    deleted_entry_ids: Vec::new(),
                    bundle: Some(self.state.bundle().await?),
                    revoked,
                    crls: Some(crl.to_proto()),
                    agent_status: AgentStatus::Active.into(),
                    federated_bundles,
                }));
            }
        };

        let mut revision = since;
        let mut entry_ids = BTreeSet::new();
        let mut revoked_ids = BTreeSet::new();
        let mut bundle_changed = false;
        let mut federated_changed = false;
        let mut status = None;
        let own = self.state.trust_domain().name();
        for change in &changes {
            revision = revision.max(change.revision);
            let concerned = agent.concerns(change.scope.iter().map(String::as_str));
            match change.kind {
                // Only entries of this agent's parents (before or after the change): an
                // agent never learns the ids of other agents' entries.
                ChangeKind::EntryUpserted | ChangeKind::EntryDeleted if concerned => {
                    entry_ids.insert(change.object_id.clone());
                    // The entry may name other federated trust domains now.
                    federated_changed = true;
                }
                ChangeKind::EntryUpserted | ChangeKind::EntryDeleted => {}
                ChangeKind::BundleUpdated if change.object_id == own => bundle_changed = true,
                ChangeKind::BundleUpdated | ChangeKind::BundleDeleted => federated_changed = true,
                ChangeKind::FederationUpdated => {}
                ChangeKind::AgentUpdated => {}
                ChangeKind::AgentBanned if change.object_id == agent.id.as_str() => {
                    status = Some((change.revision, AgentStatus::Banned));
                }
                ChangeKind::AgentEvicted if change.object_id == agent.id.as_str() => {
                    status = Some((change.revision, AgentStatus::Evicted));
                }
                ChangeKind::AgentBanned | ChangeKind::AgentEvicted => {}
                ChangeKind::IdentityRevoked => {
                    revoked_ids.insert(change.object_id.clone());
                }
            }
        }
        if let Some((at, status)) = status {
            return Ok(final_status(at, status));
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
        for id in revoked_ids {
            let Ok(id) = SpiffeId::parse(&id) else {
                return Err(ApiError::Internal(
                    "change feed: a revoked identity is not a SPIFFE ID".into(),
                ));
            };
            if let Some(revocation) = datastore.get_revocation(&id).await?
                && revocation.expires_at > now
            {
                message.revoked.push(revoked_to_proto(&revocation));
            }
        }
        if bundle_changed {
            message.bundle = Some(self.state.bundle().await?);
        }
        if federated_changed {
            let entries = datastore
                .list_entries_by_parent(&agent.parent_ids())
                .await?;
            message.federated_bundles = Some(self.federated_bundles(&entries).await?);
        }
        message.crls = crl.map(CurrentCrl::to_proto);
        Ok(SyncStep::Message(message))
    }

    /// The stored bundles of the trust domains `entries` federate with (those without
    /// a stored bundle are left out), one per trust domain.
    async fn federated_bundles(
        &self,
        entries: &[RegistrationEntry],
    ) -> Result<FederatedBundles, ApiError> {
        let wanted: BTreeSet<&str> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter().map(TrustDomain::name))
            .filter(|td| *td != self.state.trust_domain().name())
            .collect();
        let mut bundles = Vec::with_capacity(wanted.len());
        for td in wanted {
            if let Some(stored) = self.state.datastore.get_bundle(td).await? {
                bundles.push(Bundle {
                    trust_domain: stored.trust_domain,
                    x509_authorities: stored.x509_authorities,
                    sequence_number: stored.sequence_number,
                    refresh_hint_seconds: 0,
                    jwt_authorities: stored
                        .jwt_authorities
                        .into_iter()
                        .map(|a| JwtAuthority {
                            kid: a.kid,
                            public_key: a.public_key,
                            expires_at: a.expires_at.map_or(0, unix_seconds),
                        })
                        .collect(),
                });
            }
        }
        Ok(FederatedBundles { bundles })
    }

    /// Runs one `Sync` stream until the agent goes away, is banned or evicted, or the
    /// server stops.
    async fn run_sync(
        self,
        agent: AgentContext,
        mut since: u64,
        tx: mpsc::Sender<Result<SyncResponse, Status>>,
    ) {
        let mut revisions = self.state.revisions.subscribe();
        let mut crls = self.state.crl.subscribe();
        let mut crl_sent: Option<u64> = None;
        let mut federated_sent: Option<FederatedBundles> = None;
        let mut first = true;
        loop {
            let crl = Arc::clone(&crls.borrow_and_update());
            let send_crl = crl_sent != Some(crl.number);
            match self
                .sync_message(&agent, since, send_crl.then_some(&*crl))
                .await
            {
                Ok(SyncStep::Message(mut message)) => {
                    since = message.revision;
                    // Federated bundles go only when the set the agent holds changes.
                    if message.federated_bundles.is_some()
                        && message.federated_bundles == federated_sent
                        && !message.snapshot
                    {
                        message.federated_bundles = None;
                    }
                    if message.federated_bundles.is_some() {
                        federated_sent.clone_from(&message.federated_bundles);
                    }
                    // Changes that concerned other agents only: nothing to send, but
                    // the stream moves past them. The first message always goes: it
                    // tells the agent it is up to date.
                    let empty = !message.snapshot
                        && message.entries.is_empty()
                        && message.deleted_entry_ids.is_empty()
                        && message.bundle.is_none()
                        && message.revoked.is_empty()
                        && message.crls.is_none()
                        && message.federated_bundles.is_none();
                    if !empty || first {
                        if message.crls.is_some() {
                            crl_sent = Some(crl.number);
                        }
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(SyncStep::Final(message)) => {
                    tracing::info!(
                        agent_id = %agent.id,
                        status = ?message.agent_status(),
                        "agent banned or evicted: ending its Sync stream"
                    );
                    let _ = tx.send(Ok(message)).await;
                    return;
                }
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            }
            first = false;
            tokio::select! {
                () = self.state.shutdown.cancelled() => return,
                () = tx.closed() => return,
                changed = revisions.changed() => if changed.is_err() { return },
                changed = crls.changed() => if changed.is_err() { return },
            }
        }
    }

    /// `BatchNewX509SVID` after authentication.
    async fn batch_new_x509svid(
        &self,
        agent: &AgentContext,
        params: Vec<NewX509svidParams>,
    ) -> Result<Vec<X509svidResult>, ApiError> {
        const RPC: &str = "BatchNewX509SVID";
        if params.len() > MAX_BATCH {
            return Err(ApiError::InvalidArgument(format!(
                "at most {MAX_BATCH} SVIDs per call"
            )));
        }
        // Look every entry up first (async), then sign the whole batch on a blocking
        // thread: a 1000-item batch is ~20 ms of CPU that must not stall the runtime.
        let mut work: Vec<SignWork> = Vec::with_capacity(params.len());
        for param in params {
            let entry = match self.state.datastore.get_entry(&param.entry_id).await {
                Ok(Some(entry)) if agent.may_serve(&entry) => {
                    render_spiffe_id(&entry, &param.template_values).map(|id| (entry, id))
                }
                Ok(_) => Err(ApiError::NotFound(ENTRY_NOT_FOUND.into())),
                Err(err) => Err(err.into()),
            };
            work.push((param, entry));
        }
        // Revoked identities are never signed again.
        let ids: Vec<SpiffeId> = work
            .iter()
            .filter_map(|(_, w)| w.as_ref().ok().map(|(_, id)| id.clone()))
            .collect();
        let revoked = self
            .state
            .datastore
            .revoked_among(&ids, SystemTime::now())
            .await?;
        for (_, item) in &mut work {
            if let Ok((_, id)) = item
                && revoked.contains(id.as_str())
            {
                self.refused(
                    &agent.id,
                    Some(&agent.serial),
                    RPC,
                    &format!("identity {id} is revoked"),
                );
                *item = Err(ApiError::PermissionDenied(IDENTITY_REVOKED.into()));
            }
        }

        let state = Arc::clone(&self.state);
        let signed = tokio::task::spawn_blocking(move || {
            work.into_iter()
                .map(|(param, item)| {
                    let signed = item.and_then(|(entry, id)| {
                        sign_workload_svid(&state, &entry, &id, &param.public_key)
                            .map(|cert| (entry, id, cert))
                    });
                    (param.entry_id, signed)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|err| ApiError::Internal(format!("signing task: {err}")))?;

        // Serials of templated identities are recorded before any SVID leaves, so that
        // a revocation can list them; one revoked meanwhile is withdrawn here.
        let instances: Vec<(usize, InstanceSvid)> = signed
            .iter()
            .enumerate()
            .filter_map(|(i, (_, item))| match item {
                Ok((entry, id, cert)) if entry.spiffe_id.is_template() => Some((
                    i,
                    InstanceSvid {
                        spiffe_id: id.clone(),
                        serial: cert.serial_hex.clone(),
                        expires_at: cert.not_after,
                    },
                )),
                _ => None,
            })
            .collect();
        let recorded: Result<Vec<bool>, ApiError> = if instances.is_empty() {
            Ok(Vec::new())
        } else {
            let rows: Vec<InstanceSvid> = instances.iter().map(|(_, s)| s.clone()).collect();
            self.state
                .datastore
                .record_instance_svids(&rows)
                .await
                .map_err(ApiError::from)
        };
        let mut signed = signed;
        match recorded {
            Ok(recorded) => {
                for ((i, svid), ok) in instances.iter().zip(recorded) {
                    if !ok && let Some((_, item)) = signed.get_mut(*i) {
                        self.refused(
                            &agent.id,
                            Some(&agent.serial),
                            RPC,
                            &format!("identity {} is revoked", svid.spiffe_id),
                        );
                        *item = Err(ApiError::PermissionDenied(IDENTITY_REVOKED.into()));
                    }
                }
            }
            Err(err) => {
                // Without the record a revocation could miss these serials: none of
                // them leaves.
                tracing::warn!(error = %err, "cannot record instance SVID serials");
                let status = Status::from(err);
                for (i, _) in &instances {
                    if let Some((_, item)) = signed.get_mut(*i) {
                        *item = Err(ApiError::Unavailable(status.message().to_owned()));
                    }
                }
            }
        }

        Ok(signed
            .into_iter()
            .map(|(entry_id, item)| {
                let result = match item {
                    Ok((entry, id, cert)) => {
                        self.state.x509_svids_signed.fetch_add(1, Ordering::Relaxed);
                        let ttl = cert
                            .not_after
                            .duration_since(cert.not_before + ca::BACKDATE)
                            .unwrap_or_default();
                        tracing::debug!(agent_id = %agent.id, spiffe_id = %id, serial = %cert.serial_hex, "signed X.509-SVID");
                        self.state.audit.record(ServerEvent::X509SvidSigned {
                            agent_id: agent.id.to_string(),
                            entry_id: entry.id.clone(),
                            spiffe_id: id.to_string(),
                            serial: cert.serial_hex.clone(),
                            expires_at: unix_seconds(cert.not_after).unsigned_abs(),
                            ttl_seconds: ttl.as_secs(),
                        });
                        x509svid_result::Result::Svid(X509Svid {
                            spiffe_id: id.to_string(),
                            cert_chain: cert.cert_chain(),
                            expires_at: unix_seconds(cert.not_after),
                        })
                    }
                    Err(err) => item_error(err),
                };
                X509svidResult {
                    entry_id,
                    result: Some(result),
                }
            })
            .collect())
    }

    /// `NewJWTSVID` after authentication.
    async fn new_jwt_svid(
        &self,
        agent: &AgentContext,
        request: NewJwtsvidRequest,
    ) -> Result<NewJwtsvidResponse, ApiError> {
        const RPC: &str = "NewJWTSVID";
        if request.audiences.is_empty() {
            return Err(ApiError::InvalidArgument(
                "at least one audience is required".into(),
            ));
        }
        if request.audiences.len() > MAX_JWT_AUDIENCES {
            return Err(ApiError::InvalidArgument(format!(
                "at most {MAX_JWT_AUDIENCES} audiences"
            )));
        }
        for audience in &request.audiences {
            crate::admin::validate_audience(audience).map_err(ApiError::InvalidArgument)?;
        }
        let entry = match self.state.datastore.get_entry(&request.entry_id).await? {
            Some(entry) if agent.may_serve(&entry) => entry,
            _ => return Err(ApiError::NotFound(ENTRY_NOT_FOUND.into())),
        };
        let spiffe_id = render_spiffe_id(&entry, &request.template_values)?;
        let mut audiences = request.audiences;
        audiences.sort();
        audiences.dedup();
        if audiences.len() > 1 && !entry.jwt_multi_audience {
            return Err(ApiError::PermissionDenied(
                "this entry allows one audience per JWT-SVID".into(),
            ));
        }
        let refused = (!entry.jwt_audiences.is_empty())
            .then(|| audiences.iter().find(|a| !entry.jwt_audiences.contains(a)))
            .flatten();
        if let Some(refused) = refused {
            tracing::info!(agent_id = %agent.id, spiffe_id = %entry.spiffe_id, audience = %refused.escape_debug(), "JWT-SVID refused: audience not allowed");
            self.refused(
                &agent.id,
                Some(&agent.serial),
                RPC,
                "audience is not allowed for this identity",
            );
            return Err(ApiError::PermissionDenied(
                "audience is not allowed for this identity".into(),
            ));
        }
        let now = SystemTime::now();
        if !self
            .state
            .datastore
            .revoked_among(std::slice::from_ref(&spiffe_id), now)
            .await?
            .is_empty()
        {
            self.refused(
                &agent.id,
                Some(&agent.serial),
                RPC,
                &format!("identity {spiffe_id} is revoked"),
            );
            return Err(ApiError::PermissionDenied(IDENTITY_REVOKED.into()));
        }
        let ttl = entry
            .jwt_svid_ttl
            .unwrap_or(self.state.config.default_jwt_svid_ttl)
            .min(self.state.config.max_jwt_svid_ttl);
        let signed = self
            .state
            .jwt
            .current()
            .sign(&spiffe_id, &audiences, ttl, now)
            .map_err(|err| ApiError::Internal(format!("JWT signing: {err}")))?;
        self.state.jwt_svids_signed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent_id = %agent.id, %spiffe_id, jti = %signed.jti, "signed JWT-SVID");
        self.state.audit.record(ServerEvent::JwtSvidSigned {
            agent_id: agent.id.to_string(),
            entry_id: entry.id.clone(),
            spiffe_id: spiffe_id.to_string(),
            jwt_id: Some(signed.jti.clone()),
            audience: audiences,
            expires_at: unix_seconds(signed.expires_at).unsigned_abs(),
            ttl_seconds: signed
                .expires_at
                .duration_since(signed.issued_at)
                .unwrap_or_default()
                .as_secs(),
        });
        Ok(NewJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            token: signed.token,
            issued_at: unix_seconds(signed.issued_at),
            expires_at: unix_seconds(signed.expires_at),
        })
    }
}

/// An x509pop refusal: malformed or over-the-cap input is `InvalidArgument`, a failed
/// verification `PermissionDenied`.
fn x509pop_error(err: AttestationError) -> ApiError {
    if err.is_invalid_input() {
        ApiError::InvalidArgument(err.to_string())
    } else {
        ApiError::PermissionDenied(err.to_string())
    }
}

/// `PermissionDenied` message for a banned agent (SECURITY.md §3.9 item 89).
pub const AGENT_BANNED: &str = "agent is banned";
/// `PermissionDenied` message for an agent that is not (or no longer) attested.
pub const AGENT_MUST_REATTEST: &str = "agent must re-attest";
/// `PermissionDenied` message for a superseded agent SVID (SECURITY.md §3.9 item 91).
pub const AGENT_NOT_ACTIVE: &str = "agent SVID is no longer active";
/// `PermissionDenied` message for a revoked identity.
pub const IDENTITY_REVOKED: &str = "identity revoked";
/// `NotFound` message for an entry that does not exist or is not the agent's.
const ENTRY_NOT_FOUND: &str = "entry not found or not authorized";

fn final_status(revision: u64, status: AgentStatus) -> SyncStep {
    SyncStep::Final(SyncResponse {
        revision,
        agent_status: status.into(),
        ..SyncResponse::default()
    })
}

fn revoked_to_proto(revocation: &Revocation) -> RevokedIdentity {
    RevokedIdentity {
        spiffe_id: revocation.spiffe_id.to_string(),
        revoked_at: unix_seconds(revocation.revoked_at),
        expires_at: unix_seconds(revocation.expires_at),
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
        let peer = request
            .extensions()
            .get::<NodePeer>()
            .map(|peer| peer.remote_addr.to_string());
        let mut inbound = request.into_inner();
        let params = match inbound.message().await {
            Ok(Some(AttestAgentRequest {
                step: Some(attest_agent_request::Step::Params(params)),
            })) => Ok(params),
            Ok(Some(_)) => Err(ApiError::InvalidArgument(
                "the first message must carry attestation parameters".into(),
            )),
            Ok(None) => Err(ApiError::InvalidArgument("empty attestation stream".into())),
            Err(status) => Err(ApiError::InvalidArgument(status.message().to_owned())),
        };
        if let Ok(params) = &params
            && params.r#type == tessera_plugin_x509pop::PLUGIN_NAME
            && let Some(verifier) = self.state.x509pop.clone()
        {
            let params = params.clone();
            return Ok(Response::new(
                self.attest_x509pop(verifier, params, inbound, peer).await?,
            ));
        }
        let response = self.attest(params, peer).await?;
        Ok(Response::new(Box::pin(futures::stream::once(async move {
            Ok(response)
        }))))
    }

    async fn renew_agent(
        &self,
        request: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let peer = request.extensions().get::<NodePeer>().cloned();
        Ok(Response::new(
            self.renew(peer.as_ref(), &request.get_ref().csr).await?,
        ))
    }

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>(), "Sync")
            .await?;
        let since = request.get_ref().since_revision;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.clone().run_sync(agent, since, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn batch_new_x509svid(
        &self,
        request: Request<BatchNewX509svidRequest>,
    ) -> Result<Response<BatchNewX509svidResponse>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>(), "BatchNewX509SVID")
            .await?;
        let results = self
            .batch_new_x509svid(&agent, request.into_inner().params)
            .await?;
        Ok(Response::new(BatchNewX509svidResponse { results }))
    }

    async fn new_jwtsvid(
        &self,
        request: Request<NewJwtsvidRequest>,
    ) -> Result<Response<NewJwtsvidResponse>, Status> {
        let agent = self
            .authenticate(request.extensions().get::<NodePeer>(), "NewJWTSVID")
            .await?;
        Ok(Response::new(
            self.new_jwt_svid(&agent, request.into_inner()).await?,
        ))
    }
}

/// The SPIFFE ID to sign for an entry: the entry's own ID, or its template rendered
/// with the caller's values as sent by the agent. Each value is checked against its
/// placeholder's shape (a path segment, SECURITY.md §3.6 item 61); a value the template
/// does not use, or a rendered ID in the reserved prefix, is refused.
fn render_spiffe_id(
    entry: &RegistrationEntry,
    wire_values: &std::collections::HashMap<String, String>,
) -> Result<SpiffeId, ApiError> {
    let invalid = |message: String| ApiError::InvalidArgument(message);
    let values = TemplateValues::from_map(wire_values)
        .map_err(|err| invalid(format!("template_values: {err}")))?;
    if values.restricted_to(&entry.spiffe_id) != values {
        return Err(invalid(
            "template_values: a value for a placeholder the entry does not use".into(),
        ));
    }
    let id = entry
        .spiffe_id
        .render(&values)
        .map_err(|err| invalid(format!("template_values: {err}")))?;
    if is_reserved_path(id.path()) {
        return Err(invalid(
            "template_values: the rendered ID lies in the reserved path prefix".into(),
        ));
    }
    Ok(id)
}

/// Signs one workload X.509-SVID: ID, DNS names and TTL from the entry, only the key
/// from the request. Blocking (CPU): runs on a blocking thread.
fn sign_workload_svid(
    state: &ServerState,
    entry: &RegistrationEntry,
    spiffe_id: &SpiffeId,
    public_key: &[u8],
) -> Result<ca::IssuedCertificate, ApiError> {
    let ttl = entry
        .x509_svid_ttl
        .unwrap_or(state.config.default_x509_svid_ttl);
    Ok(state
        .ca
        .sign_x509_svid(public_key, spiffe_id, &entry.dns_names, ttl)?)
}

fn item_error(err: ApiError) -> x509svid_result::Result {
    let status = Status::from(err);
    x509svid_result::Result::Error(ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData as _};
    use rustls::pki_types::CertificateDer;
    use tessera_plugin_sdk::template::instance_value;
    use tessera_plugin_sdk::{Selector, SpiffeIdTemplate};

    use super::*;
    use crate::admin::AdminService;
    use crate::config::ServerConfig;
    use crate::datastore::NewEntry;

    struct Harness {
        _dir: tempfile::TempDir,
        audit_path: PathBuf,
        state: Arc<ServerState>,
        node: NodeService,
        admin: AdminService,
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("server-audit.jsonl");
        let text = format!(
            "[server]\ntrust_domain = \"example.org\"\ndata_dir = \"{}\"\n\
             audit_log_path = \"{}\"\ndefault_x509_svid_ttl = \"30m\"\n\
             max_jwt_svid_ttl = \"20m\"\n",
            dir.path().join("data").display(),
            audit_path.display()
        );
        let config = ServerConfig::parse(&text, Path::new("test.toml")).unwrap();
        let state = crate::prepare_state(config).await.unwrap();
        Harness {
            _dir: dir,
            audit_path,
            node: NodeService::new(Arc::clone(&state)),
            admin: AdminService::new(Arc::clone(&state)),
            state,
        }
    }

    fn agent_id(name: &str) -> SpiffeId {
        SpiffeId::parse(&format!(
            "spiffe://example.org/tessera/agent/join_token/{name}"
        ))
        .unwrap()
    }

    fn peer(der: Vec<u8>) -> NodePeer {
        NodePeer {
            remote_addr: "127.0.0.1:40000".parse().unwrap(),
            certificates: Arc::new(vec![CertificateDer::from(der)]),
        }
    }

    /// An SVID for `id` as the TLS layer would present it, and its serial.
    fn svid_peer(h: &Harness, id: &SpiffeId) -> (NodePeer, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let svid = h
            .state
            .ca
            .sign_x509_svid(
                &key.subject_public_key_info(),
                id,
                &[],
                Duration::from_secs(3600),
            )
            .unwrap();
        (peer(svid.der), svid.serial_hex)
    }

    /// Records an attested agent and returns its TLS peer.
    async fn attested(h: &Harness, name: &str) -> NodePeer {
        let id = agent_id(name);
        let (peer, serial) = svid_peer(h, &id);
        let now = SystemTime::now();
        h.state
            .datastore
            .upsert_agent(AttestedAgent {
                spiffe_id: id,
                attestation_type: "join_token".into(),
                serial,
                previous_serial: None,
                expires_at: now + Duration::from_secs(3600),
                aliases: Vec::new(),
                first_attested_at: now,
                last_seen_at: now,
                banned_at: None,
            })
            .await
            .unwrap();
        peer
    }

    async fn templated_entry(h: &Harness, template: &str, parent: &SpiffeId) -> RegistrationEntry {
        h.state
            .datastore
            .create_entry(NewEntry {
                spiffe_id: SpiffeIdTemplate::parse(template).unwrap(),
                parent_id: parent.clone(),
                selectors: vec![Selector::parse("unix:uid:1000").unwrap()],
                x509_svid_ttl: Some(Duration::from_secs(600)),
                jwt_svid_ttl: None,
                jwt_audiences: Vec::new(),
                jwt_multi_audience: false,
                dns_names: Vec::new(),
                hint: String::new(),
                federates_with: Vec::new(),
            })
            .await
            .unwrap()
    }

    fn csr(key: &KeyPair) -> Vec<u8> {
        CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .der()
            .to_vec()
    }

    fn spki() -> Vec<u8> {
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .subject_public_key_info()
    }

    fn instance_params(entry: &RegistrationEntry, instance: &str) -> NewX509svidParams {
        NewX509svidParams {
            entry_id: entry.id.clone(),
            public_key: spki(),
            template_values: [("instance".to_owned(), instance.to_owned())].into(),
        }
    }

    fn denied(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Err(ApiError::PermissionDenied(message)) => message,
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    /// The audit log as written so far, one JSON value per line.
    fn audit_records(h: &Harness) -> Vec<serde_json::Value> {
        h.state.audit.flush_blocking().unwrap();
        std::fs::read_to_string(&h.audit_path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    fn events<'a>(records: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
        records.iter().filter(|r| r["event"] == event).collect()
    }

    #[tokio::test]
    async fn authenticate_refuses_unknown_evicted_banned_and_superseded_agents() {
        let h = harness().await;
        // Never attested.
        let (stranger, _) = svid_peer(&h, &agent_id("stranger"));
        assert_eq!(
            denied(h.node.authenticate(Some(&stranger), "Sync").await),
            AGENT_MUST_REATTEST
        );
        // Attested: fine; a second SVID of the same ID that the server never bound is
        // a superseded (possibly stolen) serial.
        let a = attested(&h, "a").await;
        let ctx = h.node.authenticate(Some(&a), "Sync").await.unwrap();
        assert_eq!(ctx.id, agent_id("a"));
        let (copy, _) = svid_peer(&h, &agent_id("a"));
        assert_eq!(
            denied(h.node.authenticate(Some(&copy), "NewJWTSVID").await),
            AGENT_NOT_ACTIVE
        );
        // A workload SVID cannot use the node API.
        let (workload, _) = svid_peer(&h, &SpiffeId::parse("spiffe://example.org/web").unwrap());
        assert!(
            denied(h.node.authenticate(Some(&workload), "Sync").await)
                .contains("not an agent identity")
        );
        // Banned.
        h.state
            .datastore
            .ban_agent(&agent_id("a"), SystemTime::now())
            .await
            .unwrap();
        assert_eq!(
            denied(h.node.authenticate(Some(&a), "Sync").await),
            AGENT_BANNED
        );
        // Evicted.
        let b = attested(&h, "b").await;
        assert!(h.state.datastore.evict_agent(&agent_id("b")).await.unwrap());
        assert_eq!(
            denied(h.node.authenticate(Some(&b), "BatchNewX509SVID").await),
            AGENT_MUST_REATTEST
        );
        // No certificate at all.
        assert!(matches!(
            h.node.authenticate(None, "Sync").await,
            Err(ApiError::Unauthenticated(_))
        ));

        // Every refusal is audited with its RPC and reason.
        let records = audit_records(&h);
        assert_eq!(records[0]["event"], "audit_started");
        let refused: Vec<(String, String)> = events(&records, "agent_refused")
            .iter()
            .map(|r| {
                (
                    r["rpc"].as_str().unwrap().to_owned(),
                    r["reason"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            refused,
            vec![
                ("Sync".into(), AGENT_MUST_REATTEST.into()),
                ("NewJWTSVID".into(), "superseded agent SVID serial".into()),
                ("Sync".into(), "not an agent identity".into()),
                ("Sync".into(), AGENT_BANNED.into()),
                ("BatchNewX509SVID".into(), AGENT_MUST_REATTEST.into()),
            ]
        );
    }

    #[tokio::test]
    async fn renewal_binds_the_new_serial_and_refuses_the_superseded_one() {
        let h = harness().await;
        let old = attested(&h, "a").await;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let renewed = h.node.renew(Some(&old), &csr(&key)).await.unwrap();
        let new_der = renewed.svid.unwrap().cert_chain.remove(0);
        let new = peer(new_der);
        // The new SVID in use confirms it; the old one is then superseded.
        h.node.authenticate(Some(&new), "Sync").await.unwrap();
        assert_eq!(
            denied(h.node.renew(Some(&old), &csr(&key)).await),
            AGENT_NOT_ACTIVE
        );
        let records = audit_records(&h);
        assert_eq!(events(&records, "agent_renewed").len(), 1);
        let refused = events(&records, "agent_refused");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0]["rpc"], "RenewAgent");
        assert_eq!(refused[0]["agent_id"], agent_id("a").as_str());
    }

    #[tokio::test]
    async fn a_banned_agent_id_cannot_attest_again() {
        let h = harness().await;
        let secret = "s3cretS3cretS3cret-value";
        let token = JoinToken::parse(&format!("banned-node.{secret}")).unwrap();
        h.state
            .datastore
            .create_join_token(crate::datastore::NewJoinToken {
                id: token.id().to_owned(),
                secret_hash: token.secret_hash(),
                alias: None,
                expires_at: SystemTime::now() + Duration::from_secs(600),
            })
            .await
            .unwrap();
        attested(&h, "banned-node").await;
        h.state
            .datastore
            .ban_agent(&agent_id("banned-node"), SystemTime::now())
            .await
            .unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = || {
            Ok(AttestationParams {
                r#type: "join_token".into(),
                payload: format!("banned-node.{secret}").into_bytes(),
                csr: csr(&key),
            })
        };
        assert_eq!(
            denied(h.node.attest(params(), Some("10.0.0.9:5000".into())).await),
            AGENT_BANNED
        );
        // The token was not spent by the refused attempt, and is still refused.
        assert_eq!(denied(h.node.attest(params(), None).await), AGENT_BANNED);
        // An evicted ID may attest again (the ban goes with the record).
        assert!(
            h.state
                .datastore
                .evict_agent(&agent_id("banned-node"))
                .await
                .unwrap()
        );
        let response = h.node.attest(params(), None).await.unwrap();
        assert!(matches!(
            response.step,
            Some(attest_agent_response::Step::Result(_))
        ));

        let records = audit_records(&h);
        let attested = events(&records, "node_attested");
        assert_eq!(attested.len(), 3);
        assert_eq!(attested[0]["result"], "error");
        assert_eq!(attested[0]["reason"], AGENT_BANNED);
        assert_eq!(attested[0]["token_id"], "banned-node");
        assert_eq!(attested[0]["peer"], "10.0.0.9:5000");
        assert_eq!(attested[2]["result"], "ok");
        assert_eq!(attested[2]["agent_id"], agent_id("banned-node").as_str());
        // The join token's secret never reaches the audit log (SECURITY.md §3.12).
        let text = std::fs::read_to_string(&h.audit_path).unwrap();
        assert!(!text.contains(secret));
    }

    #[tokio::test]
    async fn a_revoked_instance_is_never_signed_again_and_lands_in_the_crl() {
        let h = harness().await;
        let a = attested(&h, "a").await;
        let ctx = h.node.authenticate(Some(&a), "test").await.unwrap();
        let entry = templated_entry(&h, "spiffe://example.org/ai/bot/{instance}", &ctx.id).await;
        let x = instance_value("boot", 100, 1, None);
        let y = instance_value("boot", 101, 1, None);
        let x_id = format!("spiffe://example.org/ai/bot/{x}");

        let first = h
            .node
            .batch_new_x509svid(&ctx, vec![instance_params(&entry, &x)])
            .await
            .unwrap();
        let Some(x509svid_result::Result::Svid(svid)) = &first[0].result else {
            panic!("{first:?}");
        };
        assert_eq!(svid.spiffe_id, x_id);
        let serial = ca::serial_of_certificate(&svid.cert_chain[0]).unwrap();

        let revocation = h.admin.revoke(0, &x_id).await.unwrap();
        assert_eq!(revocation.serials, vec![serial.clone()]);
        // Expires after the longest SVID it may have: max(x509 600 s, max JWT 20 min)
        // plus 10 s of skew.
        let lifetime = revocation
            .expires_at
            .duration_since(revocation.revoked_at)
            .unwrap();
        assert_eq!(lifetime, Duration::from_secs(1200 + 10));

        // X.509: refused per item; another instance of the same entry is still signed.
        let again = h
            .node
            .batch_new_x509svid(
                &ctx,
                vec![instance_params(&entry, &x), instance_params(&entry, &y)],
            )
            .await
            .unwrap();
        match &again[0].result {
            Some(x509svid_result::Result::Error(err)) => {
                assert_eq!(err.code, tonic::Code::PermissionDenied as i32);
                assert_eq!(err.message, IDENTITY_REVOKED);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            again[1].result,
            Some(x509svid_result::Result::Svid(_))
        ));
        // JWT: refused too.
        let jwt = |instance: &str| NewJwtsvidRequest {
            entry_id: entry.id.clone(),
            audiences: vec!["https://api.example.org".into()],
            template_values: [("instance".to_owned(), instance.to_owned())].into(),
        };
        assert_eq!(
            denied(h.node.new_jwt_svid(&ctx, jwt(&x)).await),
            IDENTITY_REVOKED
        );
        let token = h.node.new_jwt_svid(&ctx, jwt(&y)).await.unwrap();

        // The CRL lists exactly the revoked serial.
        let crl = Arc::clone(&h.state.crl.borrow());
        let der = crl.der.clone().expect("a CRL while something is revoked");
        let (_, parsed) = x509_parser::parse_x509_crl(&der).unwrap();
        let listed: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| {
                hex::encode(r.raw_serial())
                    .trim_start_matches('0')
                    .to_owned()
            })
            .collect();
        assert_eq!(listed, vec![serial.trim_start_matches('0').to_owned()]);

        // Revoking again is idempotent and does not rebuild the CRL.
        let number = crl.number;
        let same = h.admin.revoke(0, &x_id).await.unwrap();
        assert_eq!(same, revocation);
        assert_eq!(h.state.crl.borrow().number, number);

        // Audit: signings with serial / jti, the refusals, the revocation with serials,
        // and never the JWT itself.
        let records = audit_records(&h);
        let x509 = events(&records, "x509_svid_signed");
        assert_eq!(x509.len(), 2);
        assert_eq!(x509[0]["serial"], serial.as_str());
        assert_eq!(x509[0]["spiffe_id"], x_id.as_str());
        assert_eq!(x509[0]["entry_id"], entry.id.as_str());
        assert_eq!(x509[0]["ttl_seconds"], 600);
        let jwts = events(&records, "jwt_svid_signed");
        assert_eq!(jwts.len(), 1);
        assert_eq!(
            jwts[0]["audience"],
            serde_json::json!(["https://api.example.org"])
        );
        assert_eq!(jwts[0]["ttl_seconds"], 300);
        assert!(jwts[0]["jwt_id"].as_str().is_some_and(|j| j.len() == 32));
        let revoked = events(&records, "instance_revoked");
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0]["serials"], serde_json::json!([serial]));
        assert_eq!(revoked[0]["caller_uid"], 0);
        assert_eq!(events(&records, "agent_refused").len(), 2);
        let text = std::fs::read_to_string(&h.audit_path).unwrap();
        assert!(!text.contains(&token.token));
    }

    async fn next(rx: &mut mpsc::Receiver<Result<SyncResponse, Status>>) -> SyncResponse {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a Sync message within 10 s")
            .expect("the stream is open")
            .expect("not an error")
    }

    /// Waits for the stream to end; fails if it sends anything else first.
    async fn ended(rx: &mut mpsc::Receiver<Result<SyncResponse, Status>>) {
        let end = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the stream ends within 10 s");
        assert!(end.is_none(), "{end:?}");
    }

    fn start_sync(
        h: &Harness,
        ctx: AgentContext,
        since: u64,
    ) -> mpsc::Receiver<Result<SyncResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(h.node.clone().run_sync(ctx, since, tx));
        rx
    }

    /// A datastore restored from an older backup: its revision is below the one the
    /// server published. The server follows it back, and a stream that had seen the
    /// newer revision gets a snapshot instead of waiting for the feed to catch up.
    #[tokio::test]
    async fn a_revision_that_went_back_gives_streams_a_snapshot() {
        let h = harness().await;
        let a = attested(&h, "a").await;
        let ctx = h.node.authenticate(Some(&a), "test").await.unwrap();
        let real = h.state.datastore.current_revision().await.unwrap();
        // The stream and the server believe in a revision far ahead of the datastore.
        h.state.revisions.send_replace(real + 1000);
        let parent = ctx.id.clone();
        let mut sync = start_sync(&h, ctx, real + 1000);
        let first = next(&mut sync).await;
        assert!(first.snapshot, "ahead of the datastore: a snapshot at once");
        assert_eq!(first.revision, real);
        h.state.publish_revision().await;
        assert_eq!(
            *h.state.revisions.borrow(),
            real,
            "followed the datastore back"
        );
        // A write now reaches the stream as a delta from the datastore's revision.
        templated_entry(&h, "spiffe://example.org/ai/late/{instance}", &parent).await;
        h.state.publish_revision().await;
        let delta = next(&mut sync).await;
        assert!(!delta.snapshot);
        assert_eq!(delta.entries.len(), 1, "{delta:?}");
    }

    #[tokio::test]
    async fn sync_carries_revocations_to_every_agent_crls_and_the_final_status() {
        let h = harness().await;
        let a = attested(&h, "a").await;
        let b = attested(&h, "b").await;
        let ctx_a = h.node.authenticate(Some(&a), "test").await.unwrap();
        let ctx_b = h.node.authenticate(Some(&b), "test").await.unwrap();
        let entry_a =
            templated_entry(&h, "spiffe://example.org/ai/bot/{instance}", &ctx_a.id).await;
        templated_entry(&h, "spiffe://example.org/ai/other/{instance}", &ctx_b.id).await;
        let x = instance_value("boot", 7, 1, None);
        let x_id = format!("spiffe://example.org/ai/bot/{x}");

        let mut sync_a = start_sync(&h, ctx_a.clone(), 0);
        let mut sync_b = start_sync(&h, ctx_b.clone(), 0);
        let snapshot = next(&mut sync_a).await;
        assert!(snapshot.snapshot);
        assert_eq!(snapshot.entries.len(), 1);
        assert!(snapshot.revoked.is_empty());
        assert_eq!(snapshot.crls, Some(tessera_proto::node::CrlSet::default()));
        assert_eq!(snapshot.agent_status(), AgentStatus::Active);
        next(&mut sync_b).await;

        h.node
            .batch_new_x509svid(&ctx_a, vec![instance_params(&entry_a, &x)])
            .await
            .unwrap();
        h.admin.revoke(0, &x_id).await.unwrap();

        // A: one delta with the revocation and the new CRL.
        let delta = next(&mut sync_a).await;
        assert!(!delta.snapshot);
        assert_eq!(delta.revoked.len(), 1, "{delta:?}");
        assert_eq!(delta.revoked[0].spiffe_id, x_id);
        assert!(delta.revoked[0].expires_at > delta.revoked[0].revoked_at);
        assert_eq!(delta.crls.as_ref().map(|c| c.crls.len()), Some(1));
        // B serves no instance of that entry, yet receives the revocation too: its
        // ValidateJWTSVID must reject the identity's tokens.
        let delta_b = next(&mut sync_b).await;
        assert_eq!(delta_b.revoked.len(), 1, "{delta_b:?}");
        assert_eq!(delta_b.crls.as_ref().map(|c| c.crls.len()), Some(1));

        // A fresh snapshot carries the revocation in force and the CRL, on every agent.
        let mut again = start_sync(&h, ctx_a.clone(), 0);
        let snapshot = next(&mut again).await;
        assert_eq!(
            snapshot
                .revoked
                .iter()
                .map(|r| r.spiffe_id.as_str())
                .collect::<Vec<_>>(),
            vec![x_id.as_str()]
        );
        assert_eq!(snapshot.crls.as_ref().map(|c| c.crls.len()), Some(1));
        drop(again);
        let mut again_b = start_sync(&h, ctx_b.clone(), 0);
        assert_eq!(next(&mut again_b).await.revoked.len(), 1);
        drop(again_b);

        // A reconnect from an old revision gets the revocation as a delta, with the CRL.
        let mut resumed = start_sync(&h, ctx_a.clone(), snapshot.revision - 1);
        let delta = next(&mut resumed).await;
        assert!(!delta.snapshot);
        assert_eq!(delta.revoked.len(), 1);
        assert!(delta.crls.is_some());
        drop(resumed);

        // Ban A: its stream gets the final word and ends.
        h.state
            .datastore
            .ban_agent(&ctx_a.id, SystemTime::now())
            .await
            .unwrap();
        h.state.publish_revision().await;
        let last = next(&mut sync_a).await;
        assert_eq!(last.agent_status(), AgentStatus::Banned);
        ended(&mut sync_a).await;
        // B hears nothing of it.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sync_b.recv())
                .await
                .is_err()
        );
        // Evict B: its record is gone, yet its open stream is told.
        assert!(h.state.datastore.evict_agent(&ctx_b.id).await.unwrap());
        h.state.publish_revision().await;
        let last = next(&mut sync_b).await;
        assert_eq!(last.agent_status(), AgentStatus::Evicted);
        ended(&mut sync_b).await;
        // A stream opened from scratch for a banned agent (after authentication raced
        // the ban) is told at once too.
        let mut late = start_sync(&h, ctx_a.clone(), 0);
        assert_eq!(next(&mut late).await.agent_status(), AgentStatus::Banned);
        ended(&mut late).await;
    }
}
