//! The agent's error type.

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration cannot work (bad address, missing bootstrap bundle...).
    #[error("configuration: {0}")]
    Config(String),
    /// A file of the data directory or the socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Node attestation failed.
    #[error("node attestation failed: {0}")]
    Attestation(String),
    /// Key generation, CSR or TLS setup failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// The server refused the agent for good (its SVID is no longer accepted).
    #[error("the server no longer accepts this agent: {0}")]
    Rejected(String),
    /// The server banned this agent: it stopped serving and deleted its SVID and key.
    /// It cannot attest again with the same identity.
    #[error("this agent was banned by the server")]
    Banned,
    /// The server evicted this agent: it stopped serving and deleted its SVID and key;
    /// it must attest again (with a new join token) to serve.
    #[error("this agent was evicted by the server and must attest again")]
    Evicted,
    /// The audit log could not be opened or written.
    #[error("audit log: {0}")]
    Audit(String),
    /// A task failed.
    #[error("{0}")]
    Task(String),
}

impl AgentError {
    /// True when the server removed this agent ([`AgentError::Banned`] or
    /// [`AgentError::Evicted`]).
    pub fn is_removed_by_server(&self) -> bool {
        matches!(self, Self::Banned | Self::Evicted)
    }

    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
