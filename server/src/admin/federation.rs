//! The federation calls of the admin API: relationships (`federation create|list|show|
//! update|delete|refresh`) and federated bundles (`bundle set|list|delete`). Requests
//! are validated here; the refresh itself is [`crate::federation::refresh`].

use tessera_plugin_sdk::{SpiffeId, TrustDomain};
use tessera_proto::admin::{
    DeleteFederatedBundleRequest, DeleteFederatedBundleResponse,
    DeleteFederationRelationshipRequest, DeleteFederationRelationshipResponse,
    FederationRelationship as WireRelationship, GetFederationRelationshipRequest,
    ListFederatedBundlesRequest, ListFederatedBundlesResponse, ListFederationRelationshipsRequest,
    ListFederationRelationshipsResponse, RefreshFederatedBundleRequest,
    RefreshFederatedBundleResponse, SetFederatedBundleRequest,
};
use tessera_proto::types::{Bundle, JwtAuthority};
use tonic::{Request, Response, Status};

use super::AdminService;
use crate::datastore::{EndpointProfile, FederationRelationship, StoredBundle};
use crate::error::ApiError;
use crate::federation::{self, FederationError, RefreshOutcome};
use crate::state::{ServerState, unix_seconds};

/// Most trust domains one entry may federate with.
pub(crate) const MAX_FEDERATES_WITH: usize = 32;

impl From<FederationError> for ApiError {
    fn from(err: FederationError) -> Self {
        match err {
            FederationError::Datastore(err) => err.into(),
            FederationError::NoRelationship(td) => {
                Self::NotFound(format!("no federation relationship with {td}"))
            }
            FederationError::Internal(detail) => Self::Internal(detail),
            // A fetch that failed is the peer's or the network's fault: retryable.
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// Parses a trust domain name an operator gave (a `spiffe://` prefix is accepted).
fn parse_trust_domain(field: &str, text: &str) -> Result<TrustDomain, ApiError> {
    TrustDomain::new(text.strip_prefix("spiffe://").unwrap_or(text)).map_err(|err| {
        ApiError::InvalidArgument(format!("{field} `{}`: {err}", text.escape_debug()))
    })
}

/// A foreign trust domain: valid and not `own`.
fn foreign_trust_domain(
    own: &TrustDomain,
    field: &str,
    text: &str,
) -> Result<TrustDomain, ApiError> {
    let td = parse_trust_domain(field, text)?;
    if &td == own {
        return Err(ApiError::InvalidArgument(format!(
            "{field} {td} is this server's own trust domain"
        )));
    }
    Ok(td)
}

/// The `federates_with` of an entry: foreign trust domains, sorted and deduplicated.
pub(super) fn validate_federates_with(
    own: &TrustDomain,
    names: &[String],
) -> Result<Vec<TrustDomain>, ApiError> {
    let mut domains = names
        .iter()
        .map(|name| foreign_trust_domain(own, "federates_with", name))
        .collect::<Result<Vec<_>, _>>()?;
    domains.sort();
    domains.dedup();
    if domains.len() > MAX_FEDERATES_WITH {
        return Err(ApiError::InvalidArgument(format!(
            "an entry may federate with at most {MAX_FEDERATES_WITH} trust domains"
        )));
    }
    Ok(domains)
}

/// Wire form of a stored bundle.
fn bundle_to_proto(stored: StoredBundle) -> Bundle {
    Bundle {
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
    }
}

impl AdminService {
    /// Checks a relationship request; returns it and the bundle to store first, if any.
    fn validate_relationship(
        &self,
        wire: &WireRelationship,
    ) -> Result<
        (
            FederationRelationship,
            Option<tessera_federation::SpiffeBundle>,
        ),
        ApiError,
    > {
        let trust_domain = foreign_trust_domain(
            self.state.trust_domain(),
            "trust_domain",
            &wire.trust_domain,
        )?;
        let url = tessera_federation::check_endpoint_url(&wire.bundle_endpoint_url)
            .map_err(|err| ApiError::InvalidArgument(format!("bundle_endpoint_url: {err}")))?;
        let profile = match wire.profile.as_str() {
            "https_web" => {
                if !wire.endpoint_spiffe_id.is_empty() {
                    return Err(ApiError::InvalidArgument(
                        "endpoint_spiffe_id is only for the https_spiffe profile".into(),
                    ));
                }
                EndpointProfile::HttpsWeb
            }
            "https_spiffe" => {
                let endpoint_spiffe_id = if wire.endpoint_spiffe_id.is_empty() {
                    SpiffeId::from_segments(&trust_domain, &["tessera", "server"])
                        .map_err(|err| ApiError::Internal(err.to_string()))?
                } else {
                    SpiffeId::parse(&wire.endpoint_spiffe_id).map_err(|err| {
                        ApiError::InvalidArgument(format!("endpoint_spiffe_id: {err}"))
                    })?
                };
                // The endpoint is authenticated with its own trust domain's bundle only
                // (SECURITY.md §3.7 item 71).
                if !endpoint_spiffe_id.is_member_of(&trust_domain) {
                    return Err(ApiError::InvalidArgument(format!(
                        "endpoint_spiffe_id {endpoint_spiffe_id} is not in trust domain {trust_domain}"
                    )));
                }
                EndpointProfile::HttpsSpiffe { endpoint_spiffe_id }
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "profile `{}`: expected https_web or https_spiffe",
                    other.escape_debug()
                )));
            }
        };
        let bundle = if wire.trust_domain_bundle.is_empty() {
            None
        } else {
            Some(
                federation::parse_bundle_file(&trust_domain, &wire.trust_domain_bundle).map_err(
                    |err| ApiError::InvalidArgument(format!("trust_domain_bundle: {err}")),
                )?,
            )
        };
        Ok((
            FederationRelationship {
                trust_domain,
                bundle_endpoint_url: url,
                profile,
            },
            bundle,
        ))
    }

    /// Wire form of a relationship with its status.
    async fn relationship_to_proto(
        state: &ServerState,
        relationship: &FederationRelationship,
    ) -> Result<WireRelationship, ApiError> {
        let td = relationship.trust_domain.name();
        let stored = state.datastore.get_bundle(td).await?;
        let status = state.federation.status(td);
        Ok(WireRelationship {
            trust_domain: td.to_owned(),
            bundle_endpoint_url: relationship.bundle_endpoint_url.clone(),
            profile: relationship.profile.name().to_owned(),
            endpoint_spiffe_id: match &relationship.profile {
                EndpointProfile::HttpsWeb => String::new(),
                EndpointProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                    endpoint_spiffe_id.to_string()
                }
            },
            trust_domain_bundle: Vec::new(),
            bundle_sequence_number: stored.map_or(0, |b| b.sequence_number),
            last_refresh_at: status.last_success.map_or(0, unix_seconds),
            last_error: status.last_error.unwrap_or_default(),
        })
    }

    async fn write_relationship(
        &self,
        wire: WireRelationship,
        create: bool,
    ) -> Result<WireRelationship, ApiError> {
        let (relationship, bundle) = self.validate_relationship(&wire)?;
        if let Some(bundle) = bundle {
            // The operator's bundle replaces whatever is stored, whatever its sequence.
            federation::store_bundle(&self.state, bundle, true).await?;
        }
        if create {
            self.state
                .datastore
                .create_federation_relationship(relationship.clone())
                .await?;
        } else if !self
            .state
            .datastore
            .update_federation_relationship(relationship.clone())
            .await?
        {
            return Err(
                FederationError::NoRelationship(relationship.trust_domain.to_string()).into(),
            );
        }
        self.state.publish_revision().await;
        tracing::info!(trust_domain = %relationship.trust_domain, url = %relationship.bundle_endpoint_url, profile = relationship.profile.name(), "federation relationship stored");
        Self::relationship_to_proto(&self.state, &relationship).await
    }

    async fn get_relationship(&self, text: &str) -> Result<FederationRelationship, ApiError> {
        let td = parse_trust_domain("trust_domain", text)?;
        self.state
            .datastore
            .get_federation_relationship(td.name())
            .await?
            .ok_or_else(|| FederationError::NoRelationship(td.to_string()).into())
    }

    pub(super) async fn create_federation(
        &self,
        request: Request<WireRelationship>,
    ) -> Result<Response<WireRelationship>, Status> {
        let caller = self.authorize(&request, "federation create")?;
        let wire = request.into_inner();
        let object = Some(wire.trust_domain.clone());
        let result = self.write_relationship(wire, true).await;
        self.finish(caller, object, result)
    }

    pub(super) async fn update_federation(
        &self,
        request: Request<WireRelationship>,
    ) -> Result<Response<WireRelationship>, Status> {
        let caller = self.authorize(&request, "federation update")?;
        let wire = request.into_inner();
        let object = Some(wire.trust_domain.clone());
        let result = self.write_relationship(wire, false).await;
        self.finish(caller, object, result)
    }

    pub(super) async fn show_federation(
        &self,
        request: Request<GetFederationRelationshipRequest>,
    ) -> Result<Response<WireRelationship>, Status> {
        let caller = self.authorize(&request, "federation show")?;
        let text = request.into_inner().trust_domain;
        let result = async {
            let relationship = self.get_relationship(&text).await?;
            Self::relationship_to_proto(&self.state, &relationship).await
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    pub(super) async fn list_federation(
        &self,
        request: Request<ListFederationRelationshipsRequest>,
    ) -> Result<Response<ListFederationRelationshipsResponse>, Status> {
        let caller = self.authorize(&request, "federation list")?;
        let result = async {
            let mut relationships = Vec::new();
            for relationship in self.state.datastore.list_federation_relationships().await? {
                relationships.push(Self::relationship_to_proto(&self.state, &relationship).await?);
            }
            Ok(ListFederationRelationshipsResponse { relationships })
        }
        .await;
        self.finish(caller, None, result)
    }

    pub(super) async fn delete_federation(
        &self,
        request: Request<DeleteFederationRelationshipRequest>,
    ) -> Result<Response<DeleteFederationRelationshipResponse>, Status> {
        let caller = self.authorize(&request, "federation delete")?;
        let text = request.into_inner().trust_domain;
        let result = async {
            let td = parse_trust_domain("trust_domain", &text)?;
            if !self
                .state
                .datastore
                .delete_federation_relationship(td.name())
                .await?
            {
                return Err(FederationError::NoRelationship(td.to_string()).into());
            }
            federation::forget(&self.state, td.name());
            self.state.publish_revision().await;
            tracing::info!(trust_domain = %td, "federation relationship and its bundle deleted");
            Ok(DeleteFederationRelationshipResponse {})
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    pub(super) async fn refresh_federation(
        &self,
        request: Request<RefreshFederatedBundleRequest>,
    ) -> Result<Response<RefreshFederatedBundleResponse>, Status> {
        let caller = self.authorize(&request, "federation refresh")?;
        let request = request.into_inner();
        let text = request.trust_domain;
        let result = async {
            let relationship = self.get_relationship(&text).await?;
            let (outcome, _) =
                federation::refresh(&self.state, &relationship, request.accept_lower_sequence)
                    .await?;
            let bundle = self
                .state
                .datastore
                .get_bundle(relationship.trust_domain.name())
                .await?
                .map(bundle_to_proto);
            Ok(RefreshFederatedBundleResponse {
                outcome: outcome.as_str().to_owned(),
                bundle,
            })
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    pub(super) async fn set_bundle_of(
        &self,
        request: Request<SetFederatedBundleRequest>,
    ) -> Result<Response<Bundle>, Status> {
        let caller = self.authorize(&request, "bundle set")?;
        let request = request.into_inner();
        let text = request.trust_domain;
        let result = async {
            let td = foreign_trust_domain(self.state.trust_domain(), "trust_domain", &text)?;
            let bundle = federation::parse_bundle_file(&td, &request.bundle)
                .map_err(|err| ApiError::InvalidArgument(format!("bundle: {err}")))?;
            if federation::store_bundle(&self.state, bundle, true).await?
                == RefreshOutcome::RejectedEmpty
            {
                return Err(ApiError::InvalidArgument(
                    "the bundle holds no authority".into(),
                ));
            }
            self.state
                .datastore
                .get_bundle(td.name())
                .await?
                .map(bundle_to_proto)
                .ok_or_else(|| ApiError::Internal("bundle missing after storing it".into()))
        }
        .await;
        self.finish(caller, Some(text), result)
    }

    pub(super) async fn list_bundles_of(
        &self,
        request: Request<ListFederatedBundlesRequest>,
    ) -> Result<Response<ListFederatedBundlesResponse>, Status> {
        let caller = self.authorize(&request, "bundle list")?;
        let result = async {
            let own = self.state.trust_domain().name();
            Ok(ListFederatedBundlesResponse {
                bundles: self
                    .state
                    .datastore
                    .list_bundles()
                    .await?
                    .into_iter()
                    .filter(|b| b.trust_domain != own)
                    .map(bundle_to_proto)
                    .collect(),
            })
        }
        .await;
        self.finish(caller, None, result)
    }

    pub(super) async fn delete_bundle_of(
        &self,
        request: Request<DeleteFederatedBundleRequest>,
    ) -> Result<Response<DeleteFederatedBundleResponse>, Status> {
        let caller = self.authorize(&request, "bundle delete")?;
        let text = request.into_inner().trust_domain;
        let result = async {
            let td = foreign_trust_domain(self.state.trust_domain(), "trust_domain", &text)?;
            if !self.state.datastore.delete_bundle(td.name()).await? {
                return Err(ApiError::NotFound(format!("no bundle stored for {td}")));
            }
            self.state.publish_revision().await;
            tracing::info!(trust_domain = %td, "federated bundle deleted");
            Ok(DeleteFederatedBundleResponse {})
        }
        .await;
        self.finish(caller, Some(text), result)
    }
}
