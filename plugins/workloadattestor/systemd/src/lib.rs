//! The systemd workload attestor of tessera ([`SystemdAttestor`], name `systemd`): the
//! unit, slice and invocation ID of a pinned process, and its user unit when it runs
//! under a user's service manager.
//!
//! Sources, all kernel-owned (SECURITY.md §2 rule 1):
//! - the unit and slice come from the process's cgroup path in `/proc/<pid>/cgroup`,
//!   read through the pinned `/proc/<pid>` directory fd (never by asking systemd about a
//!   pid, which may have been recycled: spire#6035). The unified (v2) line is used; a
//!   host without one (legacy cgroup v1) uses the `name=systemd` hierarchy;
//! - the invocation ID is the `trusted.invocation_id` extended attribute of the unit's
//!   cgroup directory under `cgroupfs_root` (`user.invocation_id` only as a fallback, on
//!   root-owned cgroups; see the docs page).
//!
//! SECURITY.md §3.4 item 44 (a unit restarted between the lookup and the query): after
//! reading the attribute, the cgroup file is read again through the pinned directory and
//! the pidfd is checked. If the process left its cgroup or exited, attestation fails, so
//! an invocation ID is only reported for the cgroup the live process is still in.
//!
//! Selectors (type `systemd`):
//!
//! | value | meaning |
//! |---|---|
//! | `unit:<name>` | the system manager's unit: first component after the leading `.slice` chain |
//! | `slice:<name>` | innermost slice of that chain (`-.slice` for a unit directly below the root) |
//! | `invocation_id:<32 hex>` | the system unit's invocation ID, when readable |
//! | `user_unit:<name>` | the unit of `user@<uid>.service`'s manager, for user processes |
//!
//! Unit names are reported exactly as systemd names them (`foo\x2dbar.service` stays
//! written so). A process outside any unit (`/`, `/docker/<id>`) gets no selector.
//! It owns no policy about which selectors an entry needs.

mod config;
mod invocation;
mod units;

use tessera_plugin_sdk::cgroup::CgroupFile;
use tessera_plugin_sdk::{AttestError, Selector, Workload, WorkloadAttestor, WorkloadError};

pub use config::{DEFAULT_CGROUPFS_ROOT, SystemdAttestorConfig};

use invocation::{CgroupFs, Hierarchy, InvocationIds};

/// The selector type and attestor name.
pub const NAME: &str = "systemd";

/// The systemd workload attestor.
#[derive(Debug)]
pub struct SystemdAttestor {
    config: SystemdAttestorConfig,
    ids: Box<dyn InvocationIds>,
}

impl SystemdAttestor {
    /// Builds the attestor from its configuration.
    pub fn new(config: SystemdAttestorConfig) -> Self {
        let ids = Box::new(CgroupFs::new(config.cgroupfs_root.clone()));
        Self::with_invocation_ids(config, ids)
    }

    /// Builds the attestor with another source of invocation IDs.
    pub(crate) fn with_invocation_ids(
        config: SystemdAttestorConfig,
        ids: Box<dyn InvocationIds>,
    ) -> Self {
        Self { config, ids }
    }

    /// The configuration in use.
    pub fn config(&self) -> &SystemdAttestorConfig {
        &self.config
    }
}

impl WorkloadAttestor for SystemdAttestor {
    fn name(&self) -> &str {
        NAME
    }

    fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError> {
        let file = CgroupFile::read(workload)?;
        let (path, hierarchy) = match (file.unified(), file.hierarchy("name=systemd")) {
            (Some(path), _) => (path, Hierarchy::Unified),
            (None, Some(legacy)) => (&legacy.path, Hierarchy::Legacy),
            (None, None) => {
                tracing::debug!(pid = workload.pid(), "no systemd cgroup hierarchy");
                return Ok(Vec::new());
            }
        };
        if path.is_namespace_relative() {
            return Err(AttestError::Failed(
                "the process's cgroup is outside the agent's cgroup namespace (path starts \
                 with `..`); run the agent in the host cgroup namespace"
                    .to_owned(),
            ));
        }
        if path.maybe_deleted() {
            return Err(AttestError::Failed(
                "the process's cgroup was removed (process exiting)".to_owned(),
            ));
        }
        let Some(units) = units::units(path) else {
            tracing::debug!(pid = workload.pid(), "process is in no systemd unit");
            return Ok(Vec::new());
        };
        let unit_cgroup = path.prefix(units.unit_depth).ok_or_else(|| {
            AttestError::Failed("internal: unit depth beyond the cgroup path".to_owned())
        })?;
        let invocation_id = self.ids.invocation_id(hierarchy, &unit_cgroup)?;
        if invocation_id.is_none() && self.config.require_invocation_id {
            return Err(AttestError::Failed(
                "the unit's invocation id cannot be read and require_invocation_id is set"
                    .to_owned(),
            ));
        }
        // SECURITY.md §3.4 item 44: the attribute was read by path. If the unit was
        // restarted meanwhile, the pinned process has exited or moved: check both.
        if CgroupFile::read(workload)? != file {
            return Err(AttestError::Failed(
                "the process's cgroup changed during attestation (unit restarted or process \
                 moved)"
                    .to_owned(),
            ));
        }
        if !workload.is_alive()? {
            return Err(WorkloadError::ProcessExited.into());
        }

        let mut out = Vec::with_capacity(4);
        push(&mut out, "unit", &units.unit);
        push(&mut out, "slice", &units.slice);
        if let Some(id) = &invocation_id {
            push(&mut out, "invocation_id", id);
        }
        if let Some(user_unit) = &units.user_unit {
            push(&mut out, "user_unit", user_unit);
        }
        tracing::debug!(
            pid = workload.pid(),
            selectors = out.len(),
            "systemd attestation done"
        );
        Ok(out)
    }
}

/// Adds `systemd:<key>:<value>` when it is a valid selector value (unit names are at
/// most 255 bytes of printable ASCII, so in practice always).
fn push(out: &mut Vec<Selector>, key: &str, value: &str) {
    match Selector::new(NAME, &format!("{key}:{value}")) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(error = %e, "systemd selector value not representable; omitted"),
    }
}

#[cfg(test)]
mod tests;
