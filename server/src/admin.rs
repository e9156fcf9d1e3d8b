//! The admin API (`tessera.admin.v1.Admin`) on a local Unix socket, authorized by the
//! caller's uid (root, the server's own uid, or a configured admin uid). Every request
//! is validated here, at the boundary: IDs, selectors, TTLs and DNS names are parsed
//! before anything reaches the datastore. Every call is audited (`admin_call`, with the
//! caller's uid, the action as the CLI names it, e.g. `entry create`, the object and
//! the outcome); bans, evictions and revocations get their own records too.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_plugin_join_token::{JoinToken, agent_path_segments};
use tessera_plugin_sdk::{SpiffeId, SpiffeIdTemplate};
use tessera_proto::admin::admin_server::Admin;
use tessera_proto::admin::{
    Agent, BanAgentRequest, CreateEntryRequest, CreateJoinTokenRequest, CreateJoinTokenResponse,
    DeleteEntryRequest, DeleteEntryResponse, EvictAgentRequest, EvictAgentResponse,
    GetAgentRequest, GetBundleRequest, GetEntryRequest, HealthRequest, HealthResponse,
    ListAgentsRequest, ListAgentsResponse, ListEntriesRequest, ListEntriesResponse,
    ListRevocationsRequest, ListRevocationsResponse, RevokeInstanceRequest, RevokeInstanceResponse,
    RotateJwtAuthorityRequest, RotateJwtAuthorityResponse, UpdateEntryRequest,
};
use tessera_proto::convert::{entry_to_proto, selector_from_proto, ttl_from_proto};
use tessera_proto::types::{Bundle, Entry};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::datastore::{AttestedAgent, MAX_JWT_AUDIENCE_LEN, NewEntry, NewJoinToken, Revocation};
use crate::error::ApiError;
use crate::state::{RESERVED_PREFIX, ServerState, is_reserved_path, unix_seconds};
use tessera_audit::{Outcome, ServerEvent};

mod federation;

/// How long a new JWT key is published before it signs: connected agents receive a
/// bundle change within milliseconds; this leaves a wide margin.
pub const JWT_KEY_PROPAGATION: Duration = Duration::from_secs(1);

/// Longest join token lifetime an operator may ask for.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest hint accepted on an entry.
pub const MAX_HINT_LEN: usize = 1024;

/// The admin API service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<ServerState>,
    allowed_uids: Vec<u32>,
}

impl AdminService {
    /// A service over `state`; root, the server's effective uid and the configured
    /// `admin_uids` may call it.
    pub fn new(state: Arc<ServerState>) -> Self {
        let mut allowed_uids = vec![0, nix::unistd::geteuid().as_raw()];
        allowed_uids.extend(state.config.admin_uids.iter().copied());
        Self {
            state,
            allowed_uids,
        }
    }

    /// Checks the caller's uid; a refused call is audited here, an allowed one by
    /// [`AdminService::finish`].
    fn authorize<T>(&self, request: &Request<T>, action: &'static str) -> Result<Caller, Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(Caller { uid, action }),
            Some(uid) => {
                tracing::warn!(uid, action, "admin API call refused: uid not authorized");
                let err =
                    ApiError::PermissionDenied(format!("uid {uid} may not use the admin API"));
                self.state.audit.record(ServerEvent::AdminCall {
                    caller_uid: uid,
                    action: action.to_owned(),
                    object: None,
                    result: Outcome::Error,
                    reason: Some(err.to_string()),
                });
                Err(err.into())
            }
            None => {
                tracing::warn!(action, "admin API call refused: no peer credentials");
                Err(ApiError::PermissionDenied("caller credentials unavailable".into()).into())
            }
        }
    }

    fn parse_id(&self, field: &str, text: &str) -> Result<SpiffeId, ApiError> {
        let id = SpiffeId::parse(text).map_err(|err| {
            ApiError::InvalidArgument(format!("{field} `{}`: {err}", text.escape_debug()))
        })?;
        if !id.is_member_of(self.state.trust_domain()) {
            return Err(ApiError::InvalidArgument(format!(
                "{field} {id} is not in trust domain {}",
                self.state.trust_domain()
            )));
        }
        Ok(id)
    }

    fn validate_entry(&self, entry: &Entry) -> Result<NewEntry, ApiError> {
        let spiffe_id = SpiffeIdTemplate::parse(&entry.spiffe_id).map_err(|err| {
            ApiError::InvalidArgument(format!(
                "spiffe_id `{}`: {err}",
                entry.spiffe_id.escape_debug()
            ))
        })?;
        if spiffe_id.trust_domain_name() != self.state.trust_domain().name() {
            return Err(ApiError::InvalidArgument(format!(
                "spiffe_id {spiffe_id} is not in trust domain {}",
                self.state.trust_domain()
            )));
        }
        // A rendered ID is checked again at signing, for placeholders in the first
        // segment.
        if is_reserved_path(spiffe_id.literal_path_prefix()) {
            return Err(ApiError::InvalidArgument(format!(
                "spiffe_id {spiffe_id}: the path prefix {RESERVED_PREFIX}/ is reserved for tessera"
            )));
        }
        let parent_id = self.parse_id("parent_id", &entry.parent_id)?;
        if entry.selectors.is_empty() {
            return Err(ApiError::InvalidArgument(
                "at least one selector is required".into(),
            ));
        }
        let mut selectors = entry
            .selectors
            .iter()
            .map(|s| {
                let selector = selector_from_proto(s)
                    .map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
                // Only forms an attestor emits: a misspelt selector would never match
                // (SECURITY.md §3.6 item 62).
                tessera_plugin_sdk::selector_schema::validate(&selector)
                    .map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
                Ok(selector)
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        selectors.sort();
        selectors.dedup();
        let x509_svid_ttl = ttl_from_proto("x509_svid_ttl", entry.x509_svid_ttl_seconds)
            .map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
        if x509_svid_ttl.is_some_and(|ttl| ttl >= self.state.config.ca_ttl) {
            return Err(ApiError::InvalidArgument(
                "x509_svid_ttl must be shorter than the CA lifetime".into(),
            ));
        }
        let jwt_svid_ttl = ttl_from_proto("jwt_svid_ttl", entry.jwt_svid_ttl_seconds)
            .map_err(|err| ApiError::InvalidArgument(err.to_string()))?;
        if let Some(ttl) = jwt_svid_ttl.filter(|ttl| *ttl > self.state.config.max_jwt_svid_ttl) {
            return Err(ApiError::InvalidArgument(format!(
                "jwt_svid_ttl {}s exceeds the server's max_jwt_svid_ttl of {}s",
                ttl.as_secs(),
                self.state.config.max_jwt_svid_ttl.as_secs()
            )));
        }
        // Sorting and deduplication happen once, in the datastore.
        for audience in &entry.jwt_audiences {
            validate_audience(audience).map_err(ApiError::InvalidArgument)?;
        }
        for name in &entry.dns_names {
            validate_dns_name(name).map_err(ApiError::InvalidArgument)?;
        }
        if entry.hint.len() > MAX_HINT_LEN || entry.hint.chars().any(char::is_control) {
            return Err(ApiError::InvalidArgument(format!(
                "hint must be at most {MAX_HINT_LEN} bytes without control characters"
            )));
        }
        let federates_with =
            federation::validate_federates_with(self.state.trust_domain(), &entry.federates_with)?;
        Ok(NewEntry {
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            jwt_audiences: entry.jwt_audiences.clone(),
            jwt_multi_audience: entry.jwt_multi_audience,
            dns_names: entry.dns_names.clone(),
            hint: entry.hint.clone(),
            federates_with,
        })
    }
}

/// A JWT audience: 1 to [`MAX_JWT_AUDIENCE_LEN`] bytes, no control characters (the
/// datastore's rule for entries, applied to requests too).
pub fn validate_audience(audience: &str) -> Result<(), String> {
    if audience.is_empty()
        || audience.len() > MAX_JWT_AUDIENCE_LEN
        || audience.chars().any(char::is_control)
    {
        return Err(format!(
            "audiences must be 1 to {MAX_JWT_AUDIENCE_LEN} bytes without control characters"
        ));
    }
    Ok(())
}

/// A DNS SAN: 1-253 bytes of dot-separated labels, each 1-63 bytes of `[a-z0-9-]`
/// (case-insensitive), not starting or ending with `-`; a single leading `*.` wildcard
/// label is allowed only when at least two labels follow it.
pub fn validate_dns_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("dns name `{}`: {why}", name.escape_debug()));
    if name.is_empty() || name.len() > 253 {
        return bad("must be 1 to 253 bytes");
    }
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    if wildcard && labels.len() < 2 {
        return bad("a wildcard must be followed by at least two labels");
    }
    for label in labels {
        if label.is_empty() || label.len() > 63 {
            return bad("every label must be 1 to 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return bad("labels may contain only letters, digits and `-`");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("labels must not start or end with `-`");
        }
    }
    Ok(())
}

/// An authorized admin caller, for the audit record of its call.
#[derive(Debug, Clone, Copy)]
struct Caller {
    uid: u32,
    action: &'static str,
}

impl AdminService {
    /// Audits the outcome of an admin call and converts it for the gRPC edge: the one
    /// place admin errors become a `Status`.
    fn finish<T>(
        &self,
        caller: Caller,
        object: Option<String>,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let (outcome, reason) = match &result {
            Ok(_) => (Outcome::Ok, None),
            Err(err) => (Outcome::Error, Some(err.to_string())),
        };
        self.state.audit.record(ServerEvent::AdminCall {
            caller_uid: caller.uid,
            action: caller.action.to_owned(),
            object,
            result: outcome,
            reason,
        });
        result.map(Response::new).map_err(Status::from)
    }

    /// An agent ID named by an operator: a SPIFFE ID in our trust domain.
    fn parse_agent_id(&self, text: &str) -> Result<SpiffeId, ApiError> {
        self.parse_id("spiffe_id", text)
    }

    async fn get_agent_record(&self, id: &SpiffeId) -> Result<AttestedAgent, ApiError> {
        self.state
            .datastore
            .get_agent(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(AGENT_NOT_FOUND.into()))
    }

    /// `instance revoke`: checks that `text` names an instance of a templated entry
    /// (never a fixed entry ID), stores the revocation for as long as any SVID of it can
    /// live, rebuilds the CRL, wakes `Sync` streams, and records `instance_revoked`
    /// with `caller_uid`. Revoking again returns the revocation in force.
    pub(crate) async fn revoke(&self, caller_uid: u32, text: &str) -> Result<Revocation, ApiError> {
        let id = self.parse_id("spiffe_id", text)?;
        if id.is_trust_domain_id() {
            return Err(ApiError::InvalidArgument(format!(
                "spiffe_id {id} is a trust domain ID; name one instance's SPIFFE ID"
            )));
        }
        if is_reserved_path(id.path()) {
            return Err(ApiError::InvalidArgument(format!(
                "spiffe_id {id} is a tessera identity; use `agent ban` or `agent evict` for agents"
            )));
        }
        let entries = self.state.datastore.list_entries().await?;
        if let Some(entry) = entries.iter().find(|e| e.spiffe_id.as_fixed() == Some(&id)) {
            return Err(ApiError::InvalidArgument(format!(
                "{id} is the fixed SPIFFE ID of entry {}, not an instance of a template; \
                 to stop serving it, delete or update that entry instead",
                entry.id
            )));
        }
        let matching: Vec<_> = entries
            .iter()
            .filter(|e| e.spiffe_id.is_template() && e.spiffe_id.matches(&id))
            .collect();
        if matching.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "{id} is not an instance of any templated entry (one whose SPIFFE ID holds \
                 {{instance}}, {{uid}} or {{systemd_unit}}); to stop serving an identity \
                 that is not such an instance, delete or update its entry instead"
            )));
        }
        // Long enough for every SVID of the identity that can exist to expire.
        let config = &self.state.config;
        let longest_x509 = matching
            .iter()
            .map(|e| e.x509_svid_ttl.unwrap_or(config.default_x509_svid_ttl))
            .max()
            .unwrap_or(config.default_x509_svid_ttl);
        let lifetime = longest_x509.max(config.max_jwt_svid_ttl) + REVOCATION_SKEW;
        let scope: Vec<SpiffeId> = matching.iter().map(|e| e.parent_id.clone()).collect();
        let now = SystemTime::now();
        let (revocation, created) = self
            .state
            .datastore
            .revoke_identity(&id, now, now + lifetime, &scope)
            .await?;
        if created {
            // The CRL first, then the wake-up: the delta that tells agents about the
            // revocation carries the CRL listing its serials.
            if let Err(err) = self.state.refresh_crl().await {
                tracing::error!(error = %err, "revocation stored but the CRL cannot be rebuilt");
            }
            self.state.publish_revision().await;
            self.state.audit.record(ServerEvent::InstanceRevoked {
                spiffe_id: id.to_string(),
                caller_uid,
                serials: revocation.serials.clone(),
            });
            tracing::info!(spiffe_id = %id, serials = revocation.serials.len(), "identity revoked");
        }
        Ok(revocation)
    }
}

/// `NotFound` message for an unknown agent.
const AGENT_NOT_FOUND: &str = "agent not found";

/// Added to the longest SVID lifetime of a revoked identity: clock skew between the
/// server, agents and verifiers.
pub const REVOCATION_SKEW: Duration = Duration::from_secs(10);

fn agent_to_proto(agent: AttestedAgent) -> Agent {
    Agent {
        spiffe_id: agent.spiffe_id.to_string(),
        attestation_type: agent.attestation_type,
        serial: agent.serial,
        expires_at: unix_seconds(agent.expires_at),
        aliases: agent.aliases.iter().map(ToString::to_string).collect(),
        first_attested_at: unix_seconds(agent.first_attested_at),
        last_seen_at: unix_seconds(agent.last_seen_at),
        banned_at: agent.banned_at.map_or(0, unix_seconds),
    }
}

fn revocation_to_proto(revocation: Revocation) -> tessera_proto::admin::Revocation {
    tessera_proto::admin::Revocation {
        spiffe_id: revocation.spiffe_id.to_string(),
        revoked_at: unix_seconds(revocation.revoked_at),
        expires_at: unix_seconds(revocation.expires_at),
        serials: revocation.serials,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = self.authorize(&request, "token generate")?;
        let request = request.into_inner();
        let result = async {
            let ttl = match request.ttl_seconds {
                0 => self.state.config.join_token_ttl,
                secs if secs < 0 => {
                    return Err(ApiError::InvalidArgument("ttl must not be negative".into()));
                }
                secs => Duration::from_secs(secs.unsigned_abs()),
            };
            if ttl > MAX_JOIN_TOKEN_TTL {
                return Err(ApiError::InvalidArgument("ttl must be at most 720h".into()));
            }
            let alias = match request.alias_spiffe_id.as_str() {
                "" => None,
                text => {
                    let alias = self.parse_id("spiffe_id", text)?;
                    if alias.is_trust_domain_id() || alias.has_path_prefix(RESERVED_PREFIX) {
                        return Err(ApiError::InvalidArgument(format!(
                            "alias {alias} must have a path outside {RESERVED_PREFIX}/"
                        )));
                    }
                    Some(alias)
                }
            };
            let token = JoinToken::generate();
            let agent_id = SpiffeId::from_segments(
                self.state.trust_domain(),
                &agent_path_segments(token.id()),
            )
            .map_err(|err| ApiError::Internal(format!("agent id: {err}")))?;
            let expires_at = SystemTime::now() + ttl;
            self.state
                .datastore
                .create_join_token(NewJoinToken {
                    id: token.id().to_owned(),
                    secret_hash: token.secret_hash(),
                    alias,
                    expires_at,
                })
                .await?;
            tracing::info!(token_id = token.id(), "join token created");
            Ok(CreateJoinTokenResponse {
                token: token.expose(),
                token_id: token.id().to_owned(),
                agent_spiffe_id: agent_id.to_string(),
                expires_at: unix_seconds(expires_at),
            })
        }
        .await;
        // The token id only: the value never reaches the audit log.
        let object = result.as_ref().ok().map(|r| r.token_id.clone());
        self.finish(caller, object, result)
    }

    async fn create_entry(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let caller = self.authorize(&request, "entry create")?;
        let result = async {
            let entry = request
                .into_inner()
                .entry
                .ok_or_else(|| ApiError::InvalidArgument("entry is required".into()))?;
            let new = self.validate_entry(&entry)?;
            let created = self.state.datastore.create_entry(new).await?;
            self.state.publish_revision().await;
            tracing::info!(entry_id = %created.id, spiffe_id = %created.spiffe_id, "entry created");
            Ok(entry_to_proto(&created))
        }
        .await;
        let object = result.as_ref().ok().map(|e| e.id.clone());
        self.finish(caller, object, result)
    }

    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let caller = self.authorize(&request, "entry update")?;
        let entry = request.into_inner().entry;
        let object = entry.as_ref().map(|e| e.id.clone());
        let result = async {
            let entry =
                entry.ok_or_else(|| ApiError::InvalidArgument("entry is required".into()))?;
            let new = self.validate_entry(&entry)?;
            let updated = self
                .state
                .datastore
                .update_entry(&entry.id, new)
                .await?
                .ok_or_else(|| ApiError::NotFound("entry not found".into()))?;
            self.state.publish_revision().await;
            tracing::info!(entry_id = %updated.id, spiffe_id = %updated.spiffe_id, "entry updated");
            Ok(entry_to_proto(&updated))
        }
        .await;
        self.finish(caller, object, result)
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let caller = self.authorize(&request, "entry show")?;
        let id = request.into_inner().id;
        let result = async {
            let entry = self
                .state
                .datastore
                .get_entry(&id)
                .await?
                .ok_or_else(|| ApiError::NotFound("entry not found".into()))?;
            Ok(entry_to_proto(&entry))
        }
        .await;
        self.finish(caller, Some(id), result)
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let caller = self.authorize(&request, "entry list")?;
        let result = async {
            let entries = self.state.datastore.list_entries().await?;
            Ok(ListEntriesResponse {
                entries: entries.iter().map(entry_to_proto).collect(),
            })
        }
        .await;
        self.finish(caller, None, result)
    }

    async fn delete_entry(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        let caller = self.authorize(&request, "entry delete")?;
        let id = request.into_inner().id;
        let result = async {
            if !self.state.datastore.delete_entry(&id).await? {
                return Err(ApiError::NotFound("entry not found".into()));
            }
            self.state.publish_revision().await;
            tracing::info!(entry_id = %id, "entry deleted");
            Ok(DeleteEntryResponse {})
        }
        .await;
        self.finish(caller, Some(id), result)
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let caller = self.authorize(&request, "agent list")?;
        let result = async {
            let agents = self.state.datastore.list_agents().await?;
            Ok(ListAgentsResponse {
                agents: agents.into_iter().map(agent_to_proto).collect(),
            })
        }
        .await;
        self.finish(caller, None, result)
    }

    async fn get_agent(
        &self,
        request: Request<GetAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let caller = self.authorize(&request, "agent show")?;
        let text = request.into_inner().spiffe_id;
        let result = async {
            let id = self.parse_agent_id(&text)?;
            Ok(agent_to_proto(self.get_agent_record(&id).await?))
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    async fn ban_agent(
        &self,
        request: Request<BanAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        let caller = self.authorize(&request, "agent ban")?;
        let text = request.into_inner().spiffe_id;
        let result = async {
            let id = self.parse_agent_id(&text)?;
            let agent = self
                .state
                .datastore
                .ban_agent(&id, SystemTime::now())
                .await?
                .ok_or_else(|| ApiError::NotFound(AGENT_NOT_FOUND.into()))?;
            self.state.publish_revision().await;
            self.state.audit.record(ServerEvent::AgentBanned {
                agent_id: id.to_string(),
                caller_uid: caller.uid,
            });
            tracing::warn!(agent_id = %id, caller_uid = caller.uid, "agent banned");
            Ok(agent_to_proto(agent))
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    async fn evict_agent(
        &self,
        request: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let caller = self.authorize(&request, "agent evict")?;
        let text = request.into_inner().spiffe_id;
        let result = async {
            let id = self.parse_agent_id(&text)?;
            if !self.state.datastore.evict_agent(&id).await? {
                return Err(ApiError::NotFound(AGENT_NOT_FOUND.into()));
            }
            self.state.publish_revision().await;
            self.state.audit.record(ServerEvent::AgentEvicted {
                agent_id: id.to_string(),
                caller_uid: caller.uid,
            });
            tracing::warn!(agent_id = %id, caller_uid = caller.uid, "agent evicted");
            Ok(EvictAgentResponse {})
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    async fn revoke_instance(
        &self,
        request: Request<RevokeInstanceRequest>,
    ) -> Result<Response<RevokeInstanceResponse>, Status> {
        let caller = self.authorize(&request, "instance revoke")?;
        let text = request.into_inner().spiffe_id;
        let result = self
            .revoke(caller.uid, &text)
            .await
            .map(|r| RevokeInstanceResponse {
                revocation: Some(revocation_to_proto(r)),
            });
        self.finish(caller, Some(text), result)
    }

    async fn list_revocations(
        &self,
        request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        let caller = self.authorize(&request, "instance list")?;
        let result = async {
            let now = SystemTime::now();
            let revocations = self.state.datastore.list_revocations().await?;
            Ok(ListRevocationsResponse {
                revocations: revocations
                    .into_iter()
                    .filter(|r| r.expires_at > now)
                    .map(revocation_to_proto)
                    .collect(),
            })
        }
        .await;
        self.finish(caller, None, result)
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let caller = self.authorize(&request, "bundle show")?;
        let result = self.state.bundle().await;
        self.finish(caller, None, result)
    }

    async fn rotate_jwt_authority(
        &self,
        request: Request<RotateJwtAuthorityRequest>,
    ) -> Result<Response<RotateJwtAuthorityResponse>, Status> {
        let caller = self.authorize(&request, "authority rotate-jwt-key")?;
        let result = self.rotate_jwt().await;
        let object = result.as_ref().ok().map(|r| r.kid.clone());
        self.finish(caller, object, result)
    }

    async fn list_authorities(
        &self,
        request: Request<tessera_proto::admin::ListAuthoritiesRequest>,
    ) -> Result<Response<tessera_proto::admin::ListAuthoritiesResponse>, Status> {
        let caller = self.authorize(&request, "authority show")?;
        let result: Result<_, ApiError> = Ok(crate::rotation::list_authorities(&self.state).await);
        self.finish(caller, None, result)
    }

    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let caller = self.authorize(&request, "healthcheck")?;
        let result = async {
            self.state.datastore.ping().await?;
            Ok(HealthResponse {
                trust_domain: self.state.trust_domain().to_string(),
                revision: self.state.datastore.current_revision().await?,
                ca_not_after: unix_seconds(self.state.ca.not_after()),
                x509_svids_signed: self
                    .state
                    .x509_svids_signed
                    .load(std::sync::atomic::Ordering::Relaxed),
                jwt_svids_signed: self
                    .state
                    .jwt_svids_signed
                    .load(std::sync::atomic::Ordering::Relaxed),
            })
        }
        .await;
        self.finish(caller, None, result)
    }

    async fn create_federation_relationship(
        &self,
        request: Request<tessera_proto::admin::FederationRelationship>,
    ) -> Result<Response<tessera_proto::admin::FederationRelationship>, Status> {
        self.create_federation(request).await
    }

    async fn update_federation_relationship(
        &self,
        request: Request<tessera_proto::admin::FederationRelationship>,
    ) -> Result<Response<tessera_proto::admin::FederationRelationship>, Status> {
        self.update_federation(request).await
    }

    async fn get_federation_relationship(
        &self,
        request: Request<tessera_proto::admin::GetFederationRelationshipRequest>,
    ) -> Result<Response<tessera_proto::admin::FederationRelationship>, Status> {
        self.show_federation(request).await
    }

    async fn list_federation_relationships(
        &self,
        request: Request<tessera_proto::admin::ListFederationRelationshipsRequest>,
    ) -> Result<Response<tessera_proto::admin::ListFederationRelationshipsResponse>, Status> {
        self.list_federation(request).await
    }

    async fn delete_federation_relationship(
        &self,
        request: Request<tessera_proto::admin::DeleteFederationRelationshipRequest>,
    ) -> Result<Response<tessera_proto::admin::DeleteFederationRelationshipResponse>, Status> {
        self.delete_federation(request).await
    }

    async fn refresh_federated_bundle(
        &self,
        request: Request<tessera_proto::admin::RefreshFederatedBundleRequest>,
    ) -> Result<Response<tessera_proto::admin::RefreshFederatedBundleResponse>, Status> {
        self.refresh_federation(request).await
    }

    async fn set_federated_bundle(
        &self,
        request: Request<tessera_proto::admin::SetFederatedBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        self.set_bundle_of(request).await
    }

    async fn list_federated_bundles(
        &self,
        request: Request<tessera_proto::admin::ListFederatedBundlesRequest>,
    ) -> Result<Response<tessera_proto::admin::ListFederatedBundlesResponse>, Status> {
        self.list_bundles_of(request).await
    }

    async fn delete_federated_bundle(
        &self,
        request: Request<tessera_proto::admin::DeleteFederatedBundleRequest>,
    ) -> Result<Response<tessera_proto::admin::DeleteFederatedBundleResponse>, Status> {
        self.delete_bundle_of(request).await
    }
}

impl AdminService {
    /// `authority rotate-jwt-key`: publish the next key first and give agents time to
    /// receive it, then sign with it; a token must never reach a verifier before its
    /// key does.
    async fn rotate_jwt(&self) -> Result<RotateJwtAuthorityResponse, ApiError> {
        let kid = crate::rotation::rotate_jwt_key(&self.state, JWT_KEY_PROPAGATION).await?;
        Ok(RotateJwtAuthorityResponse { kid })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tessera_plugin_sdk::Selector;
    use tessera_plugin_sdk::template::instance_value;

    use super::*;

    async fn service(dir: &Path) -> AdminService {
        let text = format!(
            "[server]\ntrust_domain = \"example.org\"\ndata_dir = \"{}\"\n\
             audit_log_path = \"{}\"\ndefault_x509_svid_ttl = \"1h\"\n\
             max_jwt_svid_ttl = \"10m\"\n",
            dir.join("data").display(),
            dir.join("audit.jsonl").display()
        );
        let config = crate::config::ServerConfig::parse(&text, Path::new("t.toml")).unwrap();
        AdminService::new(crate::prepare_state(config).await.unwrap())
    }

    async fn entry(
        admin: &AdminService,
        spiffe_id: &str,
        parent: &str,
        ttl: Option<u64>,
    ) -> String {
        admin
            .state
            .datastore
            .create_entry(NewEntry {
                spiffe_id: SpiffeIdTemplate::parse(spiffe_id).unwrap(),
                parent_id: SpiffeId::parse(parent).unwrap(),
                selectors: vec![Selector::parse("unix:uid:1000").unwrap()],
                x509_svid_ttl: ttl.map(Duration::from_secs),
                jwt_svid_ttl: None,
                jwt_audiences: Vec::new(),
                jwt_multi_audience: false,
                dns_names: Vec::new(),
                hint: String::new(),
                federates_with: Vec::new(),
            })
            .await
            .unwrap()
            .id
    }

    fn invalid(result: Result<Revocation, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    const NODE_1: &str = "spiffe://example.org/node/1";
    const NODE_2: &str = "spiffe://example.org/node/2";

    #[tokio::test]
    async fn revoke_accepts_only_instances_of_templated_entries() {
        let dir = tempfile::tempdir().unwrap();
        let admin = service(dir.path()).await;
        let fixed = entry(&admin, "spiffe://example.org/web", NODE_1, None).await;
        entry(
            &admin,
            "spiffe://example.org/ai/bot/{instance}",
            NODE_1,
            Some(300),
        )
        .await;
        entry(
            &admin,
            "spiffe://example.org/ai/bot/{instance}",
            NODE_2,
            None,
        )
        .await;
        entry(&admin, "spiffe://example.org/u/{uid}", NODE_2, Some(60)).await;

        // A fixed entry ID: delete or update the entry instead.
        let message = invalid(admin.revoke(0, "spiffe://example.org/web").await);
        assert!(
            message.contains(&fixed) && message.contains("delete or update"),
            "{message}"
        );
        // Matches no template.
        for not_an_instance in [
            "spiffe://example.org/ai/bot/research",
            "spiffe://example.org/ai/bot",
            "spiffe://example.org/u/007",
            "spiffe://example.org/elsewhere",
        ] {
            let message = invalid(admin.revoke(0, not_an_instance).await);
            assert!(
                message.contains("not an instance of any templated entry"),
                "{message}"
            );
        }
        // Not ours, not a leaf, reserved, malformed.
        for bad in [
            "spiffe://other.org/ai/bot/x",
            "spiffe://example.org",
            "spiffe://example.org/tessera/agent/join_token/a",
            "spiffe://example.org/ai/../bot",
            "",
        ] {
            invalid(admin.revoke(0, bad).await);
        }
        assert!(
            admin
                .state
                .datastore
                .list_revocations()
                .await
                .unwrap()
                .is_empty()
        );

        // An instance of two entries (two parents): both parents are in scope; it lasts
        // for the longest SVID either could have (1 h default X.509 TTL of the second
        // entry, beyond the 10 min JWT maximum) plus 10 s.
        let x = instance_value("boot", 1, 2, None);
        let x_id = format!("spiffe://example.org/ai/bot/{x}");
        let revocation = admin.revoke(0, &x_id).await.unwrap();
        assert_eq!(
            revocation.scope,
            vec![
                SpiffeId::parse(NODE_1).unwrap(),
                SpiffeId::parse(NODE_2).unwrap()
            ]
        );
        assert_eq!(
            revocation
                .expires_at
                .duration_since(revocation.revoked_at)
                .unwrap(),
            Duration::from_secs(3600 + 10)
        );
        // A `{uid}` instance whose entry has a short TTL: the JWT maximum decides.
        let uid = admin
            .revoke(0, "spiffe://example.org/u/1000")
            .await
            .unwrap();
        assert_eq!(
            uid.expires_at.duration_since(uid.revoked_at).unwrap(),
            Duration::from_secs(600 + 10)
        );
        // Idempotent.
        assert_eq!(admin.revoke(0, &x_id).await.unwrap(), revocation);
        assert_eq!(
            admin
                .state
                .datastore
                .list_revocations()
                .await
                .unwrap()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn every_admin_call_is_audited_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let admin = service(dir.path()).await;
        let caller = Caller {
            uid: 1234,
            action: "entry delete",
        };
        let failed: Result<Response<DeleteEntryResponse>, Status> = admin.finish(
            caller,
            Some("abc".into()),
            Err(ApiError::NotFound("entry not found".into())),
        );
        assert_eq!(failed.unwrap_err().code(), tonic::Code::NotFound);
        let ok = admin.finish(
            Caller {
                uid: 0,
                action: "agent ban",
            },
            Some("spiffe://example.org/tessera/agent/join_token/a".into()),
            Ok(()),
        );
        assert!(ok.is_ok());
        let internal: Result<Response<()>, Status> = admin.finish(
            caller,
            None,
            Err(ApiError::Internal("the secret detail".into())),
        );
        assert_eq!(internal.unwrap_err().message(), "internal error");

        admin.state.audit.flush_blocking().unwrap();
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(!text.contains("the secret detail"));
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let calls: Vec<_> = records
            .iter()
            .filter(|r| r["event"] == "admin_call")
            .collect();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0]["caller_uid"], 1234);
        assert_eq!(calls[0]["action"], "entry delete");
        assert_eq!(calls[0]["object"], "abc");
        assert_eq!(calls[0]["result"], "error");
        assert_eq!(calls[0]["reason"], "entry not found");
        assert_eq!(calls[1]["result"], "ok");
        assert!(calls[1].get("reason").is_none());
        assert_eq!(calls[2]["reason"], "internal error");
    }

    #[test]
    fn dns_names() {
        for good in [
            "example.org",
            "a-b.example.org",
            "*.svc.example.org",
            "localhost",
        ] {
            assert!(validate_dns_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-a.org",
            "a-.org",
            "a..org",
            "*.org",
            "a_b.org",
            "a.org.",
            "é.org",
            "*.*.a.org",
        ] {
            assert!(validate_dns_name(bad).is_err(), "{bad}");
        }
    }
}
