//! The unix workload attestor of tessera ([`UnixAttestor`], name `unix`): selectors for
//! a pinned process's effective uid and gid, their names, its supplementary groups, the
//! path of its executable and the SHA-256 of the running image.
//!
//! Everything is read relative to the pinned `/proc/<pid>` directory of a
//! [`Workload`]: the credential lines of `status`, the `exe` link and the `exe` inode
//! (SECURITY.md §1 step 4, §2 rules 1-2). Any read failure is an attestation failure.
//! It owns no policy about which selectors an entry needs, and does not check liveness
//! after attesting (the agent does).
//!
//! Selectors (type `unix`):
//!
//! | value | source |
//! |---|---|
//! | `uid:<euid>`, `gid:<egid>` | `status` `Uid:`/`Gid:`, required equal to `SO_PEERCRED` |
//! | `user:<name>`, `group:<name>` | NSS lookup of euid/egid; omitted when there is no name |
//! | `supplementary_gid:<g>`, `supplementary_group:<name>` | each gid of `status` `Groups:` |
//! | `path:<path>` | target of `exe`; omitted for deleted files and memfds, and when the workload is in another mount namespace than the agent |
//! | `sha256:<hex>` | SHA-256 of the running image through `exe`; omitted over `max_binary_size` and (by default) on FUSE/network filesystems |
//!
//! The `exe` link names a path in the workload's mount namespace, which for a
//! containerised workload is a path in the container's filesystem view: such workloads
//! get no `path` selector at all (SECURITY.md §3.3 item 36) and are matched by
//! `container:id` and `sha256`.

mod config;
mod hash;
mod status;

use std::os::unix::ffi::OsStrExt as _;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, readlinkat};
use nix::sys::stat::{fstatat, stat};
use nix::unistd::{Gid, Group, Uid, User};
use tessera_plugin_sdk::{AttestError, Selector, Workload, WorkloadAttestor, WorkloadError};

pub use config::{DEFAULT_MAX_BINARY_SIZE, NetworkFsHash, UnixAttestorConfig, parse_size};

use hash::ExeHasher;
use status::parse_status;

/// The selector type and attestor name.
pub const NAME: &str = "unix";

/// Largest `status` file read (the `Groups:` line can list up to 65 536 gids).
const STATUS_LIMIT: usize = 1 << 20;

/// Suffix the kernel appends to the `exe` link of an executable that was unlinked.
const DELETED_SUFFIX: &str = " (deleted)";

/// The agent's own mount namespace, read once at construction.
const SELF_MNT_NS: &str = "/proc/self/ns/mnt";

/// The identity of a mount namespace: (device, inode) of its `nsfs` file.
type NsId = (u64, u64);

/// The unix workload attestor. Cheap to share; the binary hash cache is internal.
#[derive(Debug)]
pub struct UnixAttestor {
    config: UnixAttestorConfig,
    hasher: ExeHasher,
    /// The agent's mount namespace; `None` when it could not be read, and then no
    /// workload gets a `path` selector (the path cannot be shown to be in our view).
    own_mnt_ns: Option<NsId>,
}

impl UnixAttestor {
    /// Builds the attestor from its configuration.
    pub fn new(config: UnixAttestorConfig) -> Self {
        let hasher = ExeHasher::new(config.max_binary_size, config.network_fs_hash);
        let own_mnt_ns = match stat(SELF_MNT_NS) {
            Ok(st) => Some((st.st_dev, st.st_ino)),
            Err(errno) => {
                tracing::warn!(
                    error = %errno,
                    "cannot read {SELF_MNT_NS}: no workload will get a unix:path selector"
                );
                None
            }
        };
        Self {
            config,
            hasher,
            own_mnt_ns,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &UnixAttestorConfig {
        &self.config
    }
}

impl WorkloadAttestor for UnixAttestor {
    fn name(&self) -> &str {
        NAME
    }

    fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError> {
        let status = workload.read_proc_file("status", STATUS_LIMIT)?;
        let creds = parse_status(&status)?;
        if creds.euid != workload.uid() {
            return Err(AttestError::CredentialMismatch {
                field: "euid",
                expected: workload.uid(),
                found: creds.euid,
            });
        }
        if creds.egid != workload.gid() {
            return Err(AttestError::CredentialMismatch {
                field: "egid",
                expected: workload.gid(),
                found: creds.egid,
            });
        }

        let mut out = Vec::with_capacity(8 + 2 * creds.groups.len());
        push(&mut out, &format!("uid:{}", creds.euid));
        if let Some(name) = user_name(creds.euid)? {
            push(&mut out, &format!("user:{name}"));
        }
        push(&mut out, &format!("gid:{}", creds.egid));
        if let Some(name) = group_name(creds.egid)? {
            push(&mut out, &format!("group:{name}"));
        }
        for &gid in &creds.groups {
            push(&mut out, &format!("supplementary_gid:{gid}"));
            if let Some(name) = group_name(gid)? {
                push(&mut out, &format!("supplementary_group:{name}"));
            }
        }

        let same_mnt_ns = self.same_mount_namespace(workload)?;
        let link = exe_link(workload)?;
        let path = exe_path(&link);
        // A binary over `max_binary_size` gets no sha256 selector (the read is never
        // longer than the limit), but keeps its uid/gid/path selectors: the hash is
        // supplementary, and refusing every identity to large binaries would be worse.
        let hash = match self.hasher.hash(workload, path.is_some()) {
            Ok(hash) => hash,
            Err(AttestError::BinaryTooLarge { size, limit }) => {
                tracing::info!(
                    pid = workload.pid(),
                    size,
                    limit,
                    "binary larger than max_binary_size: no sha256 selector"
                );
                None
            }
            Err(err) => return Err(err),
        };
        // An execve between reading the link and opening `exe` would pair one binary's
        // path with another's hash: read the link again.
        if exe_link(workload)? != link {
            return Err(AttestError::BinaryChanged);
        }
        if let Some(path) = path {
            if same_mnt_ns {
                push(&mut out, &format!("path:{path}"));
            } else {
                tracing::debug!(
                    pid = workload.pid(),
                    "workload in another mount namespace: no path selector"
                );
            }
        }
        if let Some(hash) = hash {
            push(&mut out, &format!("sha256:{}", hex::encode(hash)));
        }
        tracing::debug!(
            pid = workload.pid(),
            selectors = out.len(),
            "unix attestation done"
        );
        Ok(out)
    }
}

impl UnixAttestor {
    /// Whether `workload` shares the agent's mount namespace, by the (dev, ino) of
    /// `ns/mnt` read through the pinned directory. A read error fails attestation like
    /// any other; an unknown own namespace answers false.
    fn same_mount_namespace(&self, workload: &Workload) -> Result<bool, AttestError> {
        let theirs = fstatat(workload.proc_dir(), "ns/mnt", AtFlags::empty()).map_err(|errno| {
            if errno == Errno::ESRCH {
                AttestError::from(WorkloadError::ProcessExited)
            } else {
                WorkloadError::Io {
                    what: format!("stat /proc/{}/ns/mnt", workload.pid()),
                    source: errno.into(),
                }
                .into()
            }
        })?;
        Ok(self.own_mnt_ns == Some((theirs.st_dev, theirs.st_ino)))
    }
}

/// Adds `unix:<value>` when it is a valid selector value. A value that cannot be a
/// selector (control characters, over 1 KiB) cannot be in any entry either, so leaving
/// it out changes no match.
fn push(out: &mut Vec<Selector>, value: &str) {
    match Selector::new(NAME, value) {
        Ok(s) => out.push(s),
        Err(e) => tracing::debug!(error = %e, "unix selector value not representable; omitted"),
    }
}

fn user_name(uid: u32) -> Result<Option<String>, AttestError> {
    User::from_uid(Uid::from_raw(uid))
        .map(|u| u.map(|u| u.name))
        .map_err(|e| AttestError::Failed(format!("user lookup for uid {uid} failed: {e}")))
}

fn group_name(gid: u32) -> Result<Option<String>, AttestError> {
    Group::from_gid(Gid::from_raw(gid))
        .map(|g| g.map(|g| g.name))
        .map_err(|e| AttestError::Failed(format!("group lookup for gid {gid} failed: {e}")))
}

/// The raw target of `/proc/<pid>/exe`. Unreadable (zombie, kernel thread, no
/// permission) is an error.
fn exe_link(workload: &Workload) -> Result<Vec<u8>, AttestError> {
    readlinkat(workload.proc_dir(), "exe")
        .map(|target| target.as_bytes().to_vec())
        .map_err(|errno| {
            if errno == Errno::ESRCH {
                WorkloadError::ProcessExited.into()
            } else {
                WorkloadError::Io {
                    what: format!("read the link /proc/{}/exe", workload.pid()),
                    source: errno.into(),
                }
                .into()
            }
        })
}

/// The filesystem path of the executable, or `None` when the link does not name one:
/// a deleted file (` (deleted)` suffix), a memfd (`/memfd:`), anything not absolute, or
/// not UTF-8.
fn exe_path(link: &[u8]) -> Option<&str> {
    let path = std::str::from_utf8(link).ok()?;
    if !path.starts_with('/') || path.starts_with("/memfd:") || path.ends_with(DELETED_SUFFIX) {
        return None;
    }
    Some(path)
}

#[cfg(test)]
mod tests;
