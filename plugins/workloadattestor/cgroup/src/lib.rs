//! The cgroup workload attestor of tessera ([`CgroupAttestor`], name `cgroup`): one
//! selector, `cgroup:path:<path>`, the pinned process's cgroup v2 (unified hierarchy)
//! path as the kernel prints it in `/proc/<pid>/cgroup`.
//!
//! The file is read through the pinned `/proc/<pid>` directory fd and parsed strictly by
//! [`tessera_plugin_sdk::cgroup`] (SECURITY.md §2 rule 1). Any read or parse error fails
//! attestation. A path with leading `..` components (the process is outside the agent's
//! cgroup namespace, SECURITY.md §3.4 item 40) or marked ` (deleted)` fails too: the
//! agent cannot tell where such a cgroup really is.
//!
//! Hosts without a unified hierarchy (cgroup v1 only) get **no** selector: each v1
//! hierarchy has its own path, and picking one (even `name=systemd`) would give
//! `cgroup:path` a second meaning. The `systemd` attestor does use `name=systemd` there.
//!
//! It owns no interpretation of the path (units, containers): the `systemd` and
//! `container` attestors do that.

use tessera_plugin_sdk::cgroup::{CgroupFile, CgroupPath};
use tessera_plugin_sdk::{AttestError, Selector, Workload, WorkloadAttestor};

/// The selector type and attestor name.
pub const NAME: &str = "cgroup";

/// Configuration of the cgroup attestor: it has no settings; unknown keys are rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupAttestorConfig {}

/// The cgroup workload attestor.
#[derive(Debug, Default)]
pub struct CgroupAttestor {
    _config: CgroupAttestorConfig,
}

impl CgroupAttestor {
    /// Builds the attestor from its configuration.
    pub fn new(config: CgroupAttestorConfig) -> Self {
        Self { _config: config }
    }
}

impl WorkloadAttestor for CgroupAttestor {
    fn name(&self) -> &str {
        NAME
    }

    fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError> {
        let file = CgroupFile::read(workload)?;
        let Some(path) = file.unified() else {
            tracing::debug!(
                pid = workload.pid(),
                "no cgroup v2 hierarchy: no cgroup selector"
            );
            return Ok(Vec::new());
        };
        check_absolute(path)?;
        let mut out = Vec::with_capacity(1);
        match Selector::new(NAME, &format!("path:{path}")) {
            Ok(s) => out.push(s),
            // Over 1 KiB: no entry can hold it, so leaving it out changes no match.
            Err(e) => tracing::debug!(error = %e, "cgroup path not representable; omitted"),
        }
        Ok(out)
    }
}

/// Refuses a path the agent cannot place: outside its cgroup namespace, or removed.
fn check_absolute(path: &CgroupPath) -> Result<(), AttestError> {
    if path.is_namespace_relative() {
        return Err(AttestError::Failed(
            "the process's cgroup is outside the agent's cgroup namespace (path starts with \
             `..`); run the agent in the host cgroup namespace"
                .to_owned(),
        ));
    }
    if path.maybe_deleted() {
        return Err(AttestError::Failed(
            "the process's cgroup was removed (process exiting)".to_owned(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
