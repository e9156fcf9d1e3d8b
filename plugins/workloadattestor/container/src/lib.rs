//! The container workload attestor of tessera ([`ContainerAttestor`], name `container`):
//! the id of the container a pinned process runs in, its Kubernetes pod UID, and
//! optionally its image and name from a Docker-API-compatible runtime.
//!
//! The id and pod UID come **only** from `/proc/<pid>/cgroup`, read through the pinned
//! `/proc/<pid>` directory fd, never from mountinfo, the environment or files the
//! workload controls (SECURITY.md §2 rule 1, §3.4 item 39). The rules (parse by whole
//! component, fail closed on two different ids or pod UIDs, recognise an id only where a
//! runtime creates cgroups) are in the private `ids` module and on the plugin's docs
//! page. A process in no container gets no selector; any read error, ambiguity, or a
//! path outside the agent's cgroup namespace fails attestation.
//!
//! With `runtime_socket` set, Docker and Podman containers are looked up with
//! `GET /containers/<id>/json` under `runtime_timeout`; a failed or late query fails
//! attestation (SECURITY.md §3.4 item 42).
//!
//! Selectors (type `container`):
//!
//! | value | source |
//! |---|---|
//! | `id:<64 hex>` | cgroup path |
//! | `pod_uid:<uuid>` | cgroup path (the pod cgroup just above the container) |
//! | `image:<ref>` | runtime API `Config.Image` |
//! | `name:<name>` | runtime API `Name`, without the leading `/` |

mod config;
mod ids;
mod runtime;

use std::path::Path;

use tessera_plugin_sdk::cgroup::CgroupFile;
use tessera_plugin_sdk::{AttestError, Selector, Workload, WorkloadAttestor};

pub use config::{ContainerAttestorConfig, DEFAULT_RUNTIME_TIMEOUT};

/// The selector type and attestor name.
pub const NAME: &str = "container";

/// The container workload attestor.
#[derive(Debug)]
pub struct ContainerAttestor {
    config: ContainerAttestorConfig,
}

impl ContainerAttestor {
    /// Builds the attestor from its configuration.
    pub fn new(config: ContainerAttestorConfig) -> Self {
        Self { config }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ContainerAttestorConfig {
        &self.config
    }

    /// A warning for the agent's log at startup when the agent itself looks like it runs
    /// in a private cgroup namespace (its own cgroup is `/`): then every container shows
    /// up with a path starting with `..` and fails attestation, or as `/` with no
    /// container selectors (SECURITY.md §3.4 item 41). `None` when all looks right or
    /// `<proc_root>/self/cgroup` cannot be read.
    pub fn cgroup_namespace_warning(proc_root: &Path) -> Option<String> {
        let bytes = std::fs::read(proc_root.join("self/cgroup")).ok()?;
        let file = CgroupFile::parse(&bytes).ok()?;
        let own = file.systemd_path()?;
        own.is_root().then(|| {
            "the agent's own cgroup is `/`: if it runs in a private cgroup namespace, \
             containers cannot be identified; run it in the host cgroup namespace \
             (for docker: --cgroupns=host)"
                .to_owned()
        })
    }
}

impl WorkloadAttestor for ContainerAttestor {
    fn name(&self) -> &str {
        NAME
    }

    fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError> {
        let file = CgroupFile::read(workload)?;
        let Some(container) = ids::find(&file)? else {
            tracing::debug!(pid = workload.pid(), "process is in no container");
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(4);
        push(&mut out, "id", &container.id);
        if let Some(pod_uid) = container.pod_uid.as_deref().filter(|p| ids::is_uuid(p)) {
            push(&mut out, "pod_uid", pod_uid);
        }
        if let Some(socket) = &self.config.runtime_socket
            && container.runtime.speaks_docker_api()
        {
            // A runtime that is down or slow costs only the image and name selectors:
            // entries that need them are not issued, every other entry (including those
            // on the kernel-derived id) still is (SECURITY.md §3.4 item 42). Fewer
            // selectors can only withhold identities, never grant one.
            match runtime::inspect(socket, &container.id, self.config.runtime_timeout) {
                Ok(info) => {
                    if let Some(image) = &info.image {
                        push(&mut out, "image", image);
                    }
                    if let Some(name) = &info.name {
                        push(&mut out, "name", name);
                    }
                }
                Err(reason) => tracing::warn!(
                    pid = workload.pid(),
                    socket = %socket.display(),
                    %reason,
                    "container runtime query failed: no image or name selectors"
                ),
            }
        }
        tracing::debug!(
            pid = workload.pid(),
            selectors = out.len(),
            "container attestation done"
        );
        Ok(out)
    }
}

/// Adds `container:<key>:<value>` when it is a valid selector value; one that is not
/// (control characters, over 1 KiB) cannot be in any entry, so leaving it out changes
/// no match.
fn push(out: &mut Vec<Selector>, key: &str, value: &str) {
    match Selector::new(NAME, &format!("{key}:{value}")) {
        Ok(s) => out.push(s),
        Err(e) => {
            tracing::debug!(error = %e, "container selector value not representable; omitted");
        }
    }
}

#[cfg(test)]
mod tests;
