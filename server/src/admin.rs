//! The admin API (`tessera.admin.v1.Admin`) on a local Unix socket, authorized by the
//! caller's uid (root, the server's own uid, or a configured admin uid). Every request
//! is validated here, at the boundary: IDs, selectors, TTLs and DNS names are parsed
//! before anything reaches the datastore.

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

use crate::datastore::{MAX_JWT_AUDIENCE_LEN, NewEntry, NewJoinToken};
use crate::error::ApiError;
use crate::state::{RESERVED_PREFIX, ServerState, is_reserved_path, unix_seconds};

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

    fn authorize<T>(&self, request: &Request<T>, action: &str) -> Result<(), Status> {
        let uid = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(()),
            Some(uid) => {
                tracing::warn!(uid, action, "admin API call refused: uid not authorized");
                Err(Status::permission_denied(format!(
                    "uid {uid} may not use the admin API"
                )))
            }
            None => Err(Status::permission_denied("caller credentials unavailable")),
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

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        self.authorize(&request, "token generate")?;
        let request = request.into_inner();
        let ttl = match request.ttl_seconds {
            0 => self.state.config.join_token_ttl,
            secs if secs < 0 => return Err(Status::invalid_argument("ttl must not be negative")),
            secs => Duration::from_secs(secs.unsigned_abs()),
        };
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(Status::invalid_argument("ttl must be at most 720h"));
        }
        let alias = match request.alias_spiffe_id.as_str() {
            "" => None,
            text => {
                let alias = self.parse_id("spiffe_id", text)?;
                if alias.is_trust_domain_id() || alias.has_path_prefix(RESERVED_PREFIX) {
                    return Err(Status::invalid_argument(format!(
                        "alias {alias} must have a path outside {RESERVED_PREFIX}/"
                    )));
                }
                Some(alias)
            }
        };
        let token = JoinToken::generate();
        let agent_id =
            SpiffeId::from_segments(self.state.trust_domain(), &agent_path_segments(token.id()))
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
            .await
            .map_err(ApiError::from)?;
        tracing::info!(token_id = token.id(), "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.expose(),
            token_id: token.id().to_owned(),
            agent_spiffe_id: agent_id.to_string(),
            expires_at: unix_seconds(expires_at),
        }))
    }

    async fn create_entry(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        self.authorize(&request, "entry create")?;
        let entry = request
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let new = self.validate_entry(&entry)?;
        let created = self
            .state
            .datastore
            .create_entry(new)
            .await
            .map_err(ApiError::from)?;
        self.state.publish_revision().await;
        tracing::info!(entry_id = %created.id, spiffe_id = %created.spiffe_id, "entry created");
        Ok(Response::new(entry_to_proto(&created)))
    }

    async fn update_entry(
        &self,
        request: Request<UpdateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        self.authorize(&request, "entry update")?;
        let entry = request
            .into_inner()
            .entry
            .ok_or_else(|| Status::invalid_argument("entry is required"))?;
        let new = self.validate_entry(&entry)?;
        let updated = self
            .state
            .datastore
            .update_entry(&entry.id, new)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| Status::not_found("entry not found"))?;
        self.state.publish_revision().await;
        tracing::info!(entry_id = %updated.id, spiffe_id = %updated.spiffe_id, "entry updated");
        Ok(Response::new(entry_to_proto(&updated)))
    }

    async fn get_entry(
        &self,
        request: Request<GetEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        self.authorize(&request, "entry show")?;
        let entry = self
            .state
            .datastore
            .get_entry(&request.get_ref().id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| Status::not_found("entry not found"))?;
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn list_entries(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        self.authorize(&request, "entry list")?;
        let entries = self
            .state
            .datastore
            .list_entries()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        self.authorize(&request, "entry delete")?;
        let id = &request.get_ref().id;
        if !self
            .state
            .datastore
            .delete_entry(id)
            .await
            .map_err(ApiError::from)?
        {
            return Err(Status::not_found("entry not found"));
        }
        self.state.publish_revision().await;
        tracing::info!(entry_id = %id, "entry deleted");
        Ok(Response::new(DeleteEntryResponse {}))
    }

    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        self.authorize(&request, "agent list")?;
        let agents = self
            .state
            .datastore
            .list_agents()
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListAgentsResponse {
            agents: agents
                .into_iter()
                .map(|agent| Agent {
                    spiffe_id: agent.spiffe_id.to_string(),
                    attestation_type: agent.attestation_type,
                    serial: agent.serial,
                    expires_at: unix_seconds(agent.expires_at),
                    aliases: agent.aliases.iter().map(ToString::to_string).collect(),
                    first_attested_at: unix_seconds(agent.first_attested_at),
                    last_seen_at: unix_seconds(agent.last_seen_at),
                    banned_at: 0,
                })
                .collect(),
        }))
    }

    async fn get_agent(
        &self,
        _request: Request<GetAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        Err(Status::unimplemented("WIP"))
    }

    async fn ban_agent(
        &self,
        _request: Request<BanAgentRequest>,
    ) -> Result<Response<Agent>, Status> {
        Err(Status::unimplemented("WIP"))
    }

    async fn evict_agent(
        &self,
        _request: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        Err(Status::unimplemented("WIP"))
    }

    async fn revoke_instance(
        &self,
        _request: Request<RevokeInstanceRequest>,
    ) -> Result<Response<RevokeInstanceResponse>, Status> {
        Err(Status::unimplemented("WIP"))
    }

    async fn list_revocations(
        &self,
        _request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        Err(Status::unimplemented("WIP"))
    }

    async fn get_bundle(
        &self,
        request: Request<GetBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        self.authorize(&request, "bundle show")?;
        Ok(Response::new(self.state.bundle().await?))
    }

    async fn rotate_jwt_authority(
        &self,
        request: Request<RotateJwtAuthorityRequest>,
    ) -> Result<Response<RotateJwtAuthorityResponse>, Status> {
        self.authorize(&request, "authority rotate-jwt-key")?;
        // Publish the next key first and give agents time to receive it, then sign
        // with it: a token must never reach a verifier before its key does.
        let jwt = Arc::clone(&self.state.jwt);
        let next = tokio::task::spawn_blocking(move || jwt.prepare())
            .await
            .map_err(|err| ApiError::Internal(err.to_string()))?
            .map_err(|err| ApiError::Internal(format!("JWT key rotation: {err}")))?;
        let current = self.state.jwt.current();
        let keys = crate::JwtKeys {
            current: &current,
            prepared: Some(&next),
            retired: None,
        };
        crate::publish_own_bundle(
            self.state.datastore.as_ref(),
            &self.state.config,
            &self.state.ca,
            keys,
        )
        .await
        .map_err(|err| ApiError::Internal(err.to_string()))?;
        self.state.publish_revision().await;
        tokio::time::sleep(JWT_KEY_PROPAGATION).await;

        let jwt = Arc::clone(&self.state.jwt);
        let old = tokio::task::spawn_blocking(move || jwt.activate(next))
            .await
            .map_err(|err| ApiError::Internal(err.to_string()))?
            .map_err(|err| ApiError::Internal(format!("JWT key rotation: {err}")))?;
        let current = self.state.jwt.current();
        let retired = crate::jwt_authority::retire(
            &old,
            self.state.config.max_jwt_svid_ttl,
            SystemTime::now(),
        );
        let keys = crate::JwtKeys {
            current: &current,
            prepared: None,
            retired: Some(&retired),
        };
        crate::publish_own_bundle(
            self.state.datastore.as_ref(),
            &self.state.config,
            &self.state.ca,
            keys,
        )
        .await
        .map_err(|err| ApiError::Internal(err.to_string()))?;
        self.state.publish_revision().await;
        tracing::info!(
            old_kid = old.kid(),
            new_kid = current.kid(),
            "JWT signing key replaced"
        );
        Ok(Response::new(RotateJwtAuthorityResponse {
            kid: current.kid().to_owned(),
        }))
    }

    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.authorize(&request, "healthcheck")?;
        self.state.datastore.ping().await.map_err(ApiError::from)?;
        Ok(Response::new(HealthResponse {
            trust_domain: self.state.trust_domain().to_string(),
            revision: self
                .state
                .datastore
                .current_revision()
                .await
                .map_err(ApiError::from)?,
            ca_not_after: unix_seconds(self.state.ca.not_after()),
            x509_svids_signed: self
                .state
                .x509_svids_signed
                .load(std::sync::atomic::Ordering::Relaxed),
            jwt_svids_signed: self
                .state
                .jwt_svids_signed
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::validate_dns_name;

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
