//! Audit events recorded by the server.
//!
//! Every field is an identifier or a fact about a caller; none carries a secret. A join
//! token is recorded by its id, never its value; a JWT-SVID by its `jti`; an X509-SVID by
//! its serial number.

use serde::{Deserialize, Serialize};

use crate::Outcome;

/// One server audit event; serialized with an `"event"` tag in `snake_case`
/// (`"admin_call"`, `"x509_svid_signed"`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The audit log was opened; the first record the server writes after starting.
    AuditStarted {
        /// The server's process id.
        pid: u32,
        /// The server's version (`CARGO_PKG_VERSION`).
        version: String,
    },
    /// A call on the admin socket.
    AdminCall {
        /// The caller's uid, from the socket peer credentials.
        caller_uid: u32,
        /// What was asked (e.g. `entry.create`, `agent.ban`).
        action: String,
        /// The object acted on (an entry id, agent id, ...), when there is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object: Option<String>,
        /// Whether the call succeeded.
        result: Outcome,
        /// Why the call failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An X509-SVID was signed for an agent to hand to a workload.
    X509SvidSigned {
        /// The SPIFFE ID of the agent that asked.
        agent_id: String,
        /// The registration entry signed for.
        entry_id: String,
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// The certificate's serial number, in hex.
        serial: String,
        /// When the certificate expires, in seconds since the Unix epoch.
        expires_at: u64,
        /// The certificate's lifetime, in seconds.
        ttl_seconds: u64,
    },
    /// A JWT-SVID was signed (recorded by its `jti`, never its value).
    JwtSvidSigned {
        /// The SPIFFE ID of the agent that asked.
        agent_id: String,
        /// The registration entry signed for.
        entry_id: String,
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// The token's `jti` claim, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        jwt_id: Option<String>,
        /// The token's audiences.
        audience: Vec<String>,
        /// When the token expires, in seconds since the Unix epoch.
        expires_at: u64,
        /// The token's lifetime, in seconds.
        ttl_seconds: u64,
    },
    /// A node attestation attempt.
    NodeAttested {
        /// The node attestation method (e.g. `join_token`).
        method: String,
        /// The agent SPIFFE ID issued, when attestation succeeded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
        /// The join token's id, when the method uses one: never the token's value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_id: Option<String>,
        /// The peer's network address, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        /// Whether attestation succeeded.
        result: Outcome,
        /// Why attestation failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An agent renewed its own SVID.
    AgentRenewed {
        /// The agent's SPIFFE ID.
        agent_id: String,
        /// The serial number of the SVID it presented, in hex.
        old_serial: String,
        /// The serial number of the SVID it received, in hex.
        new_serial: String,
    },
    /// A call from an agent was refused (banned, evicted, unknown or stale SVID, ...).
    AgentRefused {
        /// The agent's SPIFFE ID.
        agent_id: String,
        /// The serial number of the SVID it presented, in hex, when it presented one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serial: Option<String>,
        /// The RPC that was refused.
        rpc: String,
        /// Why it was refused.
        reason: String,
    },
    /// An agent was banned by an admin.
    AgentBanned {
        /// The agent's SPIFFE ID.
        agent_id: String,
        /// The uid of the admin caller.
        caller_uid: u32,
    },
    /// An agent was evicted by an admin.
    AgentEvicted {
        /// The agent's SPIFFE ID.
        agent_id: String,
        /// The uid of the admin caller.
        caller_uid: u32,
    },
    /// The SVIDs of a pinned process instance were revoked by an admin.
    InstanceRevoked {
        /// The SPIFFE ID revoked.
        spiffe_id: String,
        /// The uid of the admin caller.
        caller_uid: u32,
        /// The serial numbers revoked, in hex.
        serials: Vec<String>,
    },
}
