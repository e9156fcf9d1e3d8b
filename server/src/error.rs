//! The server's API error type and its one conversion to `tonic::Status`. Handlers
//! return [`ApiError`]; the gRPC edge converts it exactly once, here.

use tonic::Status;

use crate::ca::CaError;
use crate::datastore::DatastoreError;

/// A failed API call, by the status it maps to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed or names something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The object does not exist, or the caller may not see it (the two are
    /// indistinguishable on purpose).
    #[error("{0}")]
    NotFound(String),
    /// The object already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is known but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not authenticate.
    #[error("{0}")]
    Unauthenticated(String),
    /// A dependency (the datastore) is down; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a corrupt store; details are logged, not returned.
    #[error("internal error")]
    Internal(String),
}

impl From<DatastoreError> for ApiError {
    fn from(err: DatastoreError) -> Self {
        match err {
            DatastoreError::Unavailable(_) => {
                Self::Unavailable(format!("datastore unavailable: {err}"))
            }
            DatastoreError::Conflict(message) => Self::AlreadyExists(message),
            DatastoreError::InvalidArgument(message) => Self::InvalidArgument(message),
            DatastoreError::AgentBanned => {
                Self::PermissionDenied(crate::node::AGENT_BANNED.to_owned())
            }
            other => Self::Internal(format!("datastore: {other}")),
        }
    }
}

impl From<CaError> for ApiError {
    fn from(err: CaError) -> Self {
        match err {
            CaError::InvalidCsr(message) => {
                Self::InvalidArgument(format!("invalid CSR: {message}"))
            }
            CaError::KeyPolicy(message) => {
                Self::InvalidArgument(format!("public key refused by policy: {message}"))
            }
            CaError::InvalidRequest(message) => Self::InvalidArgument(message),
            CaError::Expired => Self::Unavailable("the CA has expired".into()),
            other => Self::Internal(format!("CA: {other}")),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
