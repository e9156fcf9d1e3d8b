//! The invocation ID of a unit, read from the `trusted.invocation_id` extended attribute
//! systemd sets on the unit's cgroup directory ([`CgroupFs`]), behind the
//! [`InvocationIds`] seam so tests can stand in for cgroupfs.
//!
//! systemd (since v232) writes the 32-hex-digit ID as `trusted.invocation_id` and, since
//! v248, also as `user.invocation_id`. Only `trusted.*` attributes are proof: they can be
//! set only with `CAP_SYS_ADMIN`. `user.*` ones can be set by whoever may write the
//! directory, which for a `Delegate=yes` unit is the unit's own user. So `user.` is read
//! only as a fallback, and only when the directory belongs to root (the agent without
//! `CAP_SYS_ADMIN` sees no `trusted.*` attributes at all).

use std::fmt;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{Mode, fstat};
use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, FsType, fstatfs};
use tessera_plugin_sdk::AttestError;

/// Length of an invocation ID: 128 bits as lowercase hex.
const ID_LEN: usize = 32;

/// Which cgroup hierarchy the unit path was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Hierarchy {
    /// The cgroup v2 (unified) hierarchy: `<root>` if it is cgroup2, else `<root>/unified`
    /// (hybrid hosts).
    Unified,
    /// The v1 `name=systemd` hierarchy of legacy hosts: `<root>/systemd`.
    Legacy,
}

/// Looks up the invocation ID of the unit whose cgroup is `unit_cgroup` (absolute,
/// components as the kernel prints them).
pub(crate) trait InvocationIds: Send + Sync + fmt::Debug {
    /// `Ok(None)` when the cgroup carries no (trusted) invocation ID; an error when the
    /// cgroup cannot be read or the attribute is malformed.
    fn invocation_id(
        &self,
        hierarchy: Hierarchy,
        unit_cgroup: &str,
    ) -> Result<Option<String>, AttestError>;
}

/// Reads invocation IDs from the cgroup filesystem mounted at `root`.
#[derive(Debug)]
pub(crate) struct CgroupFs {
    root: PathBuf,
}

impl CgroupFs {
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The mount of `hierarchy`, checked to be a cgroup filesystem of the right version.
    fn open_mount(&self, hierarchy: Hierarchy) -> Result<(OwnedFd, FsType), AttestError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let root = open(&self.root, flags, Mode::empty())
            .map_err(|e| self.failed("open the cgroupfs root", e))?;
        let (fd, want, name) = match hierarchy {
            Hierarchy::Unified => {
                if fs_type(&root)? == CGROUP2_SUPER_MAGIC {
                    return Ok((root, CGROUP2_SUPER_MAGIC));
                }
                let fd = openat(
                    root.as_fd(),
                    "unified",
                    flags | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| {
                    self.failed(
                        "find a cgroup2 mount at the cgroupfs root or its `unified`",
                        e,
                    )
                })?;
                (fd, CGROUP2_SUPER_MAGIC, "unified")
            }
            Hierarchy::Legacy => {
                let fd = openat(
                    root.as_fd(),
                    "systemd",
                    flags | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| {
                    self.failed(
                        "open the name=systemd hierarchy `systemd` below the cgroupfs root",
                        e,
                    )
                })?;
                (fd, CGROUP_SUPER_MAGIC, "systemd")
            }
        };
        if fs_type(&fd)? != want {
            return Err(AttestError::Failed(format!(
                "{}/{name} is not the expected cgroup filesystem",
                self.root.display()
            )));
        }
        Ok((fd, want))
    }

    fn failed(&self, what: &str, errno: Errno) -> AttestError {
        AttestError::Failed(format!(
            "systemd attestor: {what} ({}): {errno}",
            self.root.display()
        ))
    }
}

impl InvocationIds for CgroupFs {
    fn invocation_id(
        &self,
        hierarchy: Hierarchy,
        unit_cgroup: &str,
    ) -> Result<Option<String>, AttestError> {
        let (mount, fs) = self.open_mount(hierarchy)?;
        let relative = unit_cgroup.trim_start_matches('/');
        let dir = if relative.is_empty() {
            mount
        } else {
            // cgroupfs has no symlinks; O_NOFOLLOW and the type check below refuse a
            // path that leaves it anyway.
            openat(
                mount.as_fd(),
                relative,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|errno| match errno {
                Errno::ENOENT => AttestError::Failed(
                    "the unit's cgroup no longer exists (unit stopped or restarted)".to_owned(),
                ),
                errno => AttestError::Failed(format!("open the unit's cgroup: {errno}")),
            })?
        };
        if fs_type(&dir)? != fs {
            return Err(AttestError::Failed(
                "the unit's cgroup is not on the cgroup filesystem".to_owned(),
            ));
        }
        if let Some(id) = read_id(&dir, "trusted.invocation_id")? {
            return Ok(Some(id));
        }
        let owner = fstat(dir.as_fd())
            .map_err(|e| AttestError::Failed(format!("stat the unit's cgroup: {e}")))?
            .st_uid;
        if owner == 0 {
            return read_id(&dir, "user.invocation_id");
        }
        Ok(None)
    }
}

fn fs_type(fd: &OwnedFd) -> Result<FsType, AttestError> {
    fstatfs(fd.as_fd())
        .map(|s| s.filesystem_type())
        .map_err(|e| AttestError::Failed(format!("statfs a cgroup directory: {e}")))
}

/// The attribute `name` of `dir` as an invocation ID: `None` when absent (or when the
/// filesystem has no extended attributes), an error when malformed.
fn read_id(dir: &OwnedFd, name: &str) -> Result<Option<String>, AttestError> {
    let mut buf = [0u8; ID_LEN + 1];
    match rustix::fs::fgetxattr(dir, name, &mut buf[..]) {
        Ok(len) => {
            let value = buf.get(..len).unwrap_or_default();
            parse_id(value).map(Some).ok_or_else(malformed)
        }
        Err(e) if e == rustix::io::Errno::NODATA || e == rustix::io::Errno::OPNOTSUPP => Ok(None),
        Err(e) if e == rustix::io::Errno::RANGE => Err(malformed()),
        Err(e) => Err(AttestError::Failed(format!(
            "read the invocation id of the unit's cgroup: {e}"
        ))),
    }
}

fn malformed() -> AttestError {
    AttestError::Failed("the unit's invocation id attribute is malformed".to_owned())
}

/// Exactly 32 lowercase hex digits.
pub(crate) fn parse_id(value: &[u8]) -> Option<String> {
    if value.len() != ID_LEN || !value.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    String::from_utf8(value.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_lowercase_hex() {
        assert_eq!(
            parse_id(b"0123456789abcdef0123456789abcdef").as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        for bad in [
            &b"0123456789ABCDEF0123456789ABCDEF"[..],
            b"0123456789abcdef0123456789abcde",
            b"0123456789abcdef0123456789abcdef\n",
            b"0123456789abcdef0123456789abcdef\0",
            b"01234567-89ab-cdef-0123-456789abcdef",
            b"",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_root_that_is_not_cgroupfs_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let fs = CgroupFs::new(dir.path().to_owned());
        let err = fs
            .invocation_id(Hierarchy::Unified, "/system.slice/x.service")
            .unwrap_err();
        assert!(err.to_string().contains("cgroup2"), "{err}");
        // A directory named `unified` on another filesystem is not accepted either.
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        let err = fs
            .invocation_id(Hierarchy::Unified, "/system.slice/x.service")
            .unwrap_err();
        assert!(err.to_string().contains("not the expected cgroup"), "{err}");
        std::fs::create_dir(dir.path().join("systemd")).unwrap();
        let err = fs
            .invocation_id(Hierarchy::Legacy, "/system.slice/x.service")
            .unwrap_err();
        assert!(err.to_string().contains("not the expected cgroup"), "{err}");
        let fs = CgroupFs::new(dir.path().join("missing"));
        assert!(fs.invocation_id(Hierarchy::Unified, "/").is_err());
    }
}
