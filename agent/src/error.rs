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
    /// A task failed.
    #[error("{0}")]
    Task(String),
}

impl AgentError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}
