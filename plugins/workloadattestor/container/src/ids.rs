//! Container id and pod UID of a process, from its cgroup file only (SECURITY.md §2
//! rule 1, §3.4 items 37-41), always by whole path component.
//!
//! Two scans over every line of the file:
//!
//! 1. **Conflict scan** (anywhere): every maximal run of exactly 64 lowercase hex digits
//!    in any component, and every pod UID in a `pod<uid>` component or a
//!    `...-pod<uid>.slice` slice. Two different ids (or pod UIDs) fail attestation: a
//!    process inside a container can create a nested cgroup named after another
//!    container, and neither can be trusted then.
//! 2. **Runtime position** (where only root can create cgroups): a runtime's cgroup is
//!    recognised only
//!    - right after the leading chain of `.slice` components (systemd cgroup driver):
//!      `docker-<id>.scope`, `libpod-<id>.scope`, `cri-containerd-<id>.scope`,
//!      `crio-<id>.scope`; the pod UID then comes from the slice just above;
//!    - at a cgroupfs-driver location (after optional leading slices): `docker/<id>`,
//!      `libpod_parent/libpod-<id>`, `kubepods[/besteffort|/burstable]/pod<uid>/<id>`
//!      (or `crio-<id>`).
//!
//!    An id anywhere else (below a `Delegate=yes` unit such as `user@1000.service`, or
//!    a custom cgroup parent) is not reported: whoever owns that subtree could have
//!    named a cgroup after someone else's container. Rootless containers, which live
//!    below `user@<uid>.service`, therefore get no container selectors.

use std::collections::BTreeSet;

use tessera_plugin_sdk::AttestError;
use tessera_plugin_sdk::cgroup::{CgroupFile, CgroupPath};

/// Length of a container id in hex digits.
const ID_LEN: usize = 64;

/// The runtime whose cgroup naming gave the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runtime {
    /// Docker (`docker-<id>.scope`, `/docker/<id>`).
    Docker,
    /// Podman (`libpod-<id>.scope`, `/libpod_parent/libpod-<id>`).
    Podman,
    /// containerd's CRI plugin (`cri-containerd-<id>.scope`).
    Containerd,
    /// CRI-O (`crio-<id>.scope`, `crio-<id>`).
    Crio,
    /// A Kubernetes container named by its bare id (containerd or dockershim with the
    /// cgroupfs driver).
    Kubernetes,
}

impl Runtime {
    /// Whether the runtime serves the Docker Engine API (`GET /containers/<id>/json`).
    pub(crate) fn speaks_docker_api(self) -> bool {
        matches!(self, Self::Docker | Self::Podman)
    }
}

/// The container a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Container {
    /// 64 lowercase hex digits.
    pub(crate) id: String,
    /// Which naming scheme the id came from.
    pub(crate) runtime: Runtime,
    /// The Kubernetes pod UID, when the container's parent cgroup names one: a lowercase
    /// UUID, or 32 hex digits for static pods.
    pub(crate) pod_uid: Option<String>,
}

/// The container of the process whose cgroup file is `file`: `Ok(None)` when it is in
/// none (at a runtime position), an error on any ambiguity.
pub(crate) fn find(file: &CgroupFile) -> Result<Option<Container>, AttestError> {
    let mut ids = BTreeSet::new();
    let mut pods = BTreeSet::new();
    for path in file.paths() {
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
        for component in path.components() {
            ids.extend(hex64_runs(component));
            pods.extend(pod_uid_of(component));
        }
    }
    if ids.len() > 1 {
        return Err(AttestError::Failed("container id conflict".to_owned()));
    }
    if pods.len() > 1 {
        return Err(AttestError::Failed("pod uid conflict".to_owned()));
    }
    let mut found: Option<Container> = None;
    for path in file.paths() {
        if let Some(container) = at_runtime_position(path) {
            match &mut found {
                None => found = Some(container),
                // Same id (the conflict scan saw to that); keep a pod UID if any line had it.
                Some(prev) => {
                    if prev.pod_uid.is_none() {
                        prev.pod_uid = container.pod_uid;
                    }
                }
            }
        }
    }
    if found.is_none() && !ids.is_empty() {
        tracing::debug!(
            "a container-like id is in the cgroup path, but not where a runtime creates \
             cgroups: no container selectors"
        );
    }
    Ok(found)
}

/// The container at a runtime position of `path`, if any.
fn at_runtime_position(path: &CgroupPath) -> Option<Container> {
    let components: Vec<&str> = path.components().collect();
    let slices = components.iter().take_while(|c| is_slice(c)).count();
    let rest = components.get(slices..).unwrap_or_default();

    // systemd cgroup driver: <slices>/<runtime>-<id>.scope
    if let Some((runtime, id)) = rest.first().and_then(|c| runtime_scope(c)) {
        let pod_uid = slices
            .checked_sub(1)
            .and_then(|i| components.get(i))
            .and_then(|parent| slice_pod_uid(parent));
        return Some(Container {
            id: id.to_owned(),
            runtime,
            pod_uid,
        });
    }

    // cgroupfs driver.
    match rest {
        ["docker", id, ..] if is_id(id) => Some(Container {
            id: (*id).to_owned(),
            runtime: Runtime::Docker,
            pod_uid: None,
        }),
        ["libpod_parent", ctr, ..] => {
            ctr.strip_prefix("libpod-")
                .filter(|id| is_id(id))
                .map(|id| Container {
                    id: id.to_owned(),
                    runtime: Runtime::Podman,
                    pod_uid: None,
                })
        }
        ["kubepods", tail @ ..] => {
            let tail = match tail {
                ["besteffort" | "burstable", tail @ ..] => tail,
                tail => tail,
            };
            let [pod, ctr, ..] = tail else {
                return None;
            };
            let pod_uid = pod.strip_prefix("pod").and_then(pod_uid)?;
            let (runtime, id) = if is_id(ctr) {
                (Runtime::Kubernetes, *ctr)
            } else {
                (
                    Runtime::Crio,
                    ctr.strip_prefix("crio-").filter(|id| is_id(id))?,
                )
            };
            Some(Container {
                id: id.to_owned(),
                runtime,
                pod_uid: Some(pod_uid),
            })
        }
        _ => None,
    }
}

/// `<runtime>-<id>.scope` for the runtimes that name systemd scopes so.
fn runtime_scope(component: &str) -> Option<(Runtime, &str)> {
    let stem = component.strip_suffix(".scope")?;
    [
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
    ]
    .into_iter()
    .find_map(|(prefix, runtime)| {
        stem.strip_prefix(prefix)
            .filter(|id| is_id(id))
            .map(|id| (runtime, id))
    })
}

/// A systemd slice name (`[A-Za-z0-9:_.\-\\@]+\.slice`).
fn is_slice(component: &str) -> bool {
    component.strip_suffix(".slice").is_some_and(|stem| {
        !stem.is_empty()
            && stem.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-' | b'\\' | b'@')
            })
    })
}

/// Exactly 64 lowercase hex digits.
fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(is_lower_hex)
}

fn is_lower_hex(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

/// Every maximal run of lowercase hex digits in `component` that is exactly 64 long.
fn hex64_runs(component: &str) -> impl Iterator<Item = String> + '_ {
    component
        .split(|c: char| !c.is_ascii() || !is_lower_hex(c as u8))
        .filter(|run| run.len() == ID_LEN)
        .map(str::to_owned)
}

/// The pod UID named by a component, in either form: `pod<uid>` (cgroupfs driver) or a
/// slice whose last `-` segment is `pod<uid with _ for ->` (systemd driver).
fn pod_uid_of(component: &str) -> Option<String> {
    component
        .strip_prefix("pod")
        .and_then(pod_uid)
        .or_else(|| slice_pod_uid(component))
}

/// The pod UID of `kubepods-<qos>-pod<uid>.slice` (underscores stand for dashes).
fn slice_pod_uid(component: &str) -> Option<String> {
    let stem = component.strip_suffix(".slice")?;
    let last = stem.rsplit('-').next()?;
    pod_uid(&last.strip_prefix("pod")?.replace('_', "-"))
}

/// A pod UID: a lowercase UUID (8-4-4-4-12), or 32 lowercase hex digits (the UID of a
/// static pod is a hash without dashes).
fn pod_uid(s: &str) -> Option<String> {
    let uuid = {
        let groups: Vec<&str> = s.split('-').collect();
        groups.len() == 5
            && groups
                .iter()
                .zip([8, 4, 4, 4, 12])
                .all(|(g, len)| g.len() == len && g.bytes().all(is_lower_hex))
    };
    let hash = s.len() == 32 && s.bytes().all(is_lower_hex);
    (uuid || hash).then(|| s.to_owned())
}

/// True for the hyphenated UUID form (the only one a `container:pod_uid` selector takes).
pub(crate) fn is_uuid(s: &str) -> bool {
    s.len() == 36 && s.contains('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const B: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    fn parse(text: &str) -> Result<Option<Container>, AttestError> {
        find(&CgroupFile::parse(text.as_bytes()).unwrap())
    }

    #[test]
    fn hex_runs_are_exactly_64() {
        assert_eq!(hex64_runs(A).collect::<Vec<_>>(), [A]);
        assert_eq!(
            hex64_runs(&format!("docker-{A}.scope")).collect::<Vec<_>>(),
            [A]
        );
        assert_eq!(hex64_runs(&format!("{A}0")).count(), 0);
        assert_eq!(hex64_runs(&A.to_uppercase()).count(), 0);
        assert_eq!(hex64_runs(&format!("{A}é{B}")).count(), 2);
        assert_eq!(hex64_runs("").count(), 0);
    }

    #[test]
    fn pod_uids_in_both_forms() {
        let uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        assert_eq!(pod_uid_of(&format!("pod{uuid}")).as_deref(), Some(uuid));
        assert_eq!(
            pod_uid_of("kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice")
                .as_deref(),
            Some(uuid)
        );
        assert_eq!(
            pod_uid_of("kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice").as_deref(),
            Some(uuid)
        );
        let hash = "6b8a2f0c3e7d4a1b9c0d1e2f3a4b5c6d";
        assert_eq!(pod_uid_of(&format!("pod{hash}")).as_deref(), Some(hash));
        for not in [
            "pod",
            "podx",
            "pod0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "mypod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            "kubepods-besteffort.slice",
            "kubepods.slice",
        ] {
            assert_eq!(pod_uid_of(not), None, "{not}");
        }
        assert!(is_uuid(uuid));
        assert!(!is_uuid(hash));
    }

    #[test]
    fn runtime_positions() {
        let c = parse(&format!("0::/system.slice/docker-{A}.scope\n"))
            .unwrap()
            .unwrap();
        assert_eq!((c.id.as_str(), c.runtime), (A, Runtime::Docker));
        let c = parse(&format!("0::/docker/{A}\n")).unwrap().unwrap();
        assert_eq!(c.runtime, Runtime::Docker);
        let c = parse(&format!("0::/machine.slice/libpod-{A}.scope/container\n"))
            .unwrap()
            .unwrap();
        assert_eq!(c.runtime, Runtime::Podman);
        assert!(c.runtime.speaks_docker_api());
        let c = parse(&format!(
            "0::/kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{A}\n"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(c.runtime, Runtime::Kubernetes);
        assert!(!c.runtime.speaks_docker_api());
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
        );
    }

    #[test]
    fn untrusted_positions_and_shapes_give_nothing() {
        for path in [
            format!("/system.slice/app.service/docker-{A}.scope"),
            format!("/user.slice/user-1000.slice/user@1000.service/docker/{A}"),
            format!("/system.slice/notdocker-{A}.scope"),
            format!("/system.slice/docker-{A}.service"),
            format!("/machine.slice/libpod-conmon-{A}.scope"),
            format!("/custom/{A}"),
            format!("/kubepods/{A}"),
            format!("/kubepods/besteffort/notapod/{A}"),
            format!("/docker/{}", A.to_uppercase()),
            format!("/docker/{A}0"),
        ] {
            assert_eq!(parse(&format!("0::{path}\n")).unwrap(), None, "{path}");
        }
    }

    #[test]
    fn conflicts_fail_closed() {
        for text in [
            format!("0::/docker/{A}/{B}\n"),
            format!("0::/system.slice/docker-{A}.scope/x-{B}\n"),
            format!("4:memory:/docker/{A}\n0::/docker/{B}\n"),
        ] {
            let err = parse(&text).unwrap_err();
            assert_eq!(err.to_string(), "container id conflict", "{text}");
        }
        let err = parse(&format!(
            "0::/kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/{A}/pod11111111-2222-3333-4444-555555555555\n"
        ))
        .unwrap_err();
        assert_eq!(err.to_string(), "pod uid conflict");
        // The same id twice is no conflict.
        let c = parse(&format!("0::/system.slice/docker-{A}.scope/{A}\n"))
            .unwrap()
            .unwrap();
        assert_eq!(c.id, A);
    }
}
