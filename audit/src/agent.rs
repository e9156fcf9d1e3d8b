//! Audit events recorded by the agent.
//!
//! Every field is an identifier or a fact about a caller; none carries a secret. A JWT-SVID
//! is recorded by its `jti`, never by its value; an X509-SVID by its serial number.

use serde::{Deserialize, Serialize};

use crate::Outcome;

/// One agent audit event; serialized with an `"event"` tag in `snake_case`
/// (`"workload_attested"`, `"x509_svid_served"`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    /// The audit log was opened; the first record the agent writes after starting.
    AuditStarted {
        /// The agent's process id.
        pid: u32,
        /// The agent's version (`CARGO_PKG_VERSION`).
        version: String,
    },
    /// A Workload API caller was attested (or attestation failed).
    WorkloadAttested {
        /// The caller's pid, from the socket peer credentials.
        pid: i32,
        /// The caller's uid, from the socket peer credentials.
        uid: u32,
        /// The caller's gid, from the socket peer credentials.
        gid: u32,
        /// The caller's cgroup path, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
        /// The caller's executable path, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exe: Option<String>,
        /// The hex SHA-256 of the caller's executable, when computed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// The selectors attestation produced, as `type:value` strings.
        selectors: Vec<String>,
        /// Whether attestation succeeded.
        result: Outcome,
        /// Why attestation failed, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An X509-SVID was served to a workload.
    X509SvidServed {
        /// The caller's pid.
        pid: i32,
        /// The caller's uid.
        uid: u32,
        /// The registration entry that matched.
        entry_id: String,
        /// The SVID's SPIFFE ID.
        spiffe_id: String,
        /// The certificate's serial number, in hex.
        serial: String,
        /// When the certificate expires, in seconds since the Unix epoch.
        expires_at: u64,
        /// The certificate's lifetime, in seconds.
        ttl_seconds: u64,
        /// The pinned process instance the SVID is bound to, when per-instance.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    /// A JWT-SVID was served to a workload (recorded by its `jti`, never its value).
    JwtSvidServed {
        /// The caller's pid.
        pid: i32,
        /// The caller's uid.
        uid: u32,
        /// The registration entry that matched.
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
        /// The pinned process instance the SVID is bound to, when per-instance.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    /// A Workload API call was refused.
    Refused {
        /// The caller's pid, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// The caller's uid, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// The RPC that was refused (e.g. `FetchX509SVID`).
        rpc: String,
        /// The gRPC status code returned (e.g. `permission_denied`).
        code: String,
        /// Why the call was refused.
        reason: String,
    },
    /// A pinned process instance went away and its SVIDs were dropped.
    InstanceDropped {
        /// The SPIFFE ID the instance held.
        spiffe_id: String,
        /// The instance's pid.
        pid: i32,
        /// Why it was dropped (e.g. `exited`).
        reason: String,
    },
    /// The agent is stopping; the last record it writes.
    AgentStopping {
        /// Why (e.g. `SIGTERM`).
        reason: String,
    },
}
