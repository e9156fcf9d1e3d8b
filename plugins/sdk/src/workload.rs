//! The pinned caller process ([`Workload`]): a pidfd plus a `/proc/<pid>` directory fd
//! taken at accept time, liveness checks on the pidfd, and bounded reads of `/proc` files
//! relative to the pinned directory (SECURITY.md §1 steps 3-5).
//!
//! It owns pinning and reading; it does not decide who the caller is (the agent's peer
//! module gets pid, uid, gid and the pidfd from the socket) nor which selectors a process
//! has (workload attestors do that).

use std::ffi::OsStr;
use std::fmt;
use std::io::Read as _;
use std::os::fd::{AsFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::{Mode, fstatat};

/// Largest `stat` file accepted by [`Workload::start_time`]; the real one is a few hundred
/// bytes.
const STAT_LIMIT: usize = 4096;

/// An error while pinning or reading a workload process.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The process has exited (it may still be a zombie) or its pid was reaped.
    #[error("the workload process has exited")]
    ProcessExited,
    /// The pid is not a positive process id.
    #[error("invalid pid {0}")]
    InvalidPid(i32),
    /// A system call on the process or one of its `/proc` files failed.
    #[error("could not {what}")]
    Io {
        /// What was being done, e.g. `read /proc/<pid>/status`.
        what: String,
        /// The operating system error.
        #[source]
        source: std::io::Error,
    },
    /// A `/proc` file is larger than the caller's limit.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// Which file.
        what: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// A `/proc` file name that is not a plain relative path below the process
    /// directory (absolute, empty, or with `.`/`..` components).
    #[error("invalid /proc file name")]
    InvalidName,
    /// A `/proc` file does not have the expected format.
    #[error("malformed {0}")]
    Malformed(String),
}

impl WorkloadError {
    fn io(what: impl Into<String>, errno: Errno) -> Self {
        Self::Io {
            what: what.into(),
            source: errno.into(),
        }
    }
}

/// A process pinned at accept time: pidfd + `/proc/<pid>` directory fd.
///
/// The pidfd keeps referring to the same process even if its pid is recycled; the
/// directory fd was opened only after the pidfd existed and while it was still live, so
/// it refers to the same process too. Every read goes through the directory fd, never
/// through a path built from the pid again.
#[derive(Debug)]
pub struct Workload {
    pid: i32,
    uid: u32,
    gid: u32,
    pidfd: OwnedFd,
    pidfd_degraded: bool,
    proc_dir: OwnedFd,
}

impl Workload {
    /// Pins `pid`: given the pidfd obtained for it, opens `<proc_root>/<pid>` as
    /// `O_DIRECTORY|O_NOFOLLOW|O_CLOEXEC` (only after the pidfd exists), then checks
    /// liveness again (a live pidfd proves the pid was not recycled).
    ///
    /// `uid` and `gid` are the effective ids the kernel reported for the peer
    /// (`SO_PEERCRED`). `pidfd` must refer to `pid` (obtained with `SO_PEERPIDFD` on the
    /// same socket, or `pidfd_open(pid)` in the degraded fallback, then
    /// `pidfd_degraded` is true). Fails with [`WorkloadError::ProcessExited`] when the
    /// process has exited, before or during pinning.
    pub fn pin(
        pid: i32,
        uid: u32,
        gid: u32,
        pidfd: OwnedFd,
        pidfd_degraded: bool,
        proc_root: &Path,
    ) -> Result<Self, WorkloadError> {
        let root = open(
            proc_root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_PATH,
            Mode::empty(),
        )
        .map_err(|errno| WorkloadError::io(format!("open {}", proc_root.display()), errno))?;
        Self::pin_at(pid, uid, gid, pidfd, pidfd_degraded, root.as_fd())
    }

    /// [`Workload::pin`] with the procfs mount given as an open directory: the pid
    /// directory is opened relative to `proc_root` (`openat`), so a path swapped after
    /// the agent checked and opened its proc root cannot redirect the reads.
    pub fn pin_at(
        pid: i32,
        uid: u32,
        gid: u32,
        pidfd: OwnedFd,
        pidfd_degraded: bool,
        proc_root: BorrowedFd<'_>,
    ) -> Result<Self, WorkloadError> {
        if pid <= 0 {
            return Err(WorkloadError::InvalidPid(pid));
        }
        if !pidfd_is_alive(pidfd.as_fd())? {
            return Err(WorkloadError::ProcessExited);
        }
        let name = pid.to_string();
        let proc_dir = openat(
            proc_root,
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| match errno {
            Errno::ENOENT | Errno::ESRCH => WorkloadError::ProcessExited,
            errno => WorkloadError::io(format!("open /proc/{pid}"), errno),
        })?;
        // The pid may have been recycled between the pidfd and the open: while the pidfd's
        // process is alive its pid cannot be reused, so the directory is the caller's.
        if !pidfd_is_alive(pidfd.as_fd())? {
            return Err(WorkloadError::ProcessExited);
        }
        Ok(Self {
            pid,
            uid,
            gid,
            pidfd,
            pidfd_degraded,
            proc_dir,
        })
    }

    /// The process id (in the agent's pid namespace) at accept time.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The effective uid the kernel reported for the peer at connect time.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The effective gid the kernel reported for the peer at connect time.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// True when the pidfd came from the `pidfd_open(pid)` fallback (kernel without
    /// `SO_PEERPIDFD`): the pid could have been recycled between connect and
    /// `pidfd_open`, so the attestation is racy.
    pub fn pidfd_degraded(&self) -> bool {
        self.pidfd_degraded
    }

    /// The pidfd of the process (e.g. to wait for its exit).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Whether the process is still running: polls the pidfd for `POLLIN` with a zero
    /// timeout; a readable pidfd means the process exited (zombies included).
    ///
    /// Never uses `pidfd_send_signal(fd, 0)`, which succeeds on zombies.
    pub fn is_alive(&self) -> Result<bool, WorkloadError> {
        pidfd_is_alive(self.pidfd.as_fd())
    }

    /// The pidfs inode of the process ([`pidfd_inode`]), `None` before Linux 6.9.
    pub fn pidfs_inode(&self) -> Option<u64> {
        pidfd_inode(self.pidfd.as_fd())
    }

    /// The pinned `/proc/<pid>` directory.
    pub fn proc_dir(&self) -> BorrowedFd<'_> {
        self.proc_dir.as_fd()
    }

    /// Reads the file `name` (relative, e.g. `status` or `task/12/stat`) of the pinned
    /// process directory: `openat(proc_dir, name, O_RDONLY|O_NOFOLLOW|O_CLOEXEC)`, reading
    /// at most `limit + 1` bytes; a file longer than `limit` is an error.
    pub fn read_proc_file(&self, name: &str, limit: usize) -> Result<Vec<u8>, WorkloadError> {
        check_relative(name)?;
        let fd = openat(
            self.proc_dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| self.proc_error("open", name, errno))?;
        let file = std::fs::File::from(fd);
        let mut buf = Vec::new();
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        file.take(cap).read_to_end(&mut buf).map_err(|source| {
            if source.raw_os_error() == Some(Errno::ESRCH as i32) {
                WorkloadError::ProcessExited
            } else {
                WorkloadError::Io {
                    what: format!("read /proc/{}/{name}", self.pid),
                    source,
                }
            }
        })?;
        if buf.len() > limit {
            return Err(WorkloadError::TooLarge {
                what: format!("/proc/{}/{name}", self.pid),
                limit,
            });
        }
        Ok(buf)
    }

    /// The start time of the process (field 22 of `stat`, in clock ticks since boot).
    ///
    /// The fields are counted after the last `)` of the command name, which the process
    /// controls and which may itself contain spaces and parentheses.
    pub fn start_time(&self) -> Result<u64, WorkloadError> {
        let stat = self.read_proc_file("stat", STAT_LIMIT)?;
        parse_start_time(&stat)
    }

    /// `(st_dev, st_ino)` of the running executable (`stat` through the `exe` magic link
    /// of the pinned directory), to notice an `execve` cheaply.
    pub fn exe_inode(&self) -> Result<(u64, u64), WorkloadError> {
        let st = fstatat(self.proc_dir.as_fd(), "exe", AtFlags::empty())
            .map_err(|errno| self.proc_error("stat", "exe", errno))?;
        Ok((st.st_dev, st.st_ino))
    }

    fn proc_error(&self, op: &str, name: &str, errno: Errno) -> WorkloadError {
        if errno == Errno::ESRCH {
            WorkloadError::ProcessExited
        } else {
            WorkloadError::io(format!("{op} /proc/{}/{name}", self.pid), errno)
        }
    }
}

/// Opens a pidfd for `pid` with `pidfd_open(2)` (close-on-exec).
///
/// This is the degraded path: the pid may already belong to another process by the time
/// the call runs. Prefer `SO_PEERPIDFD` on a connected socket. Exists here because
/// neither `nix` 0.31 nor stable `std` wraps `pidfd_open`.
#[allow(
    unsafe_code,
    reason = "pidfd_open has no safe wrapper in nix 0.31 or stable std"
)]
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    if pid <= 0 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: pidfd_open takes a pid and a flags word and only returns a new fd or -1;
    // no memory is passed. A non-negative return value is a fresh fd owned by nobody
    // else, so wrapping it in OwnedFd is sound.
    unsafe {
        let ret = nix::libc::syscall(
            nix::libc::SYS_pidfd_open,
            pid as nix::libc::pid_t,
            0 as nix::libc::c_uint,
        );
        if ret < 0 {
            return Err(Errno::last());
        }
        let fd = i32::try_from(ret).map_err(|_| Errno::EBADF)?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Liveness of the process behind `pidfd`: polls it for `POLLIN` with a zero timeout;
/// not readable means alive. A readable pidfd (exited, zombies included), `POLLHUP` or
/// `POLLERR` count as not alive.
pub fn pidfd_is_alive(pidfd: BorrowedFd<'_>) -> Result<bool, WorkloadError> {
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return Ok(true),
            Ok(_) => {
                let revents = fds
                    .first()
                    .and_then(PollFd::revents)
                    .unwrap_or(PollFlags::empty());
                if revents.contains(PollFlags::POLLNVAL) {
                    return Err(WorkloadError::io("poll the pidfd", Errno::EBADF));
                }
                // POLLIN (exited), POLLHUP (reaped) or POLLERR: not alive, fail closed.
                return Ok(false);
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(WorkloadError::io("poll the pidfd", errno)),
        }
    }
}

/// `statfs` magic of pidfs, the filesystem pidfds live on since Linux 6.9.
const PIDFS_MAGIC: i64 = 0x5049_4446;

/// The pidfs inode number of the process behind `pidfd`: on Linux 6.9 and later every
/// pidfd of one process shares one inode whose number is unique per process for the
/// life of the boot (it is never reused for another process). `None` on older kernels,
/// where pidfds are anonymous inodes that every process shares, or when `fstat` fails.
#[allow(
    clippy::useless_conversion,
    reason = "f_type is i64 here but narrower or unsigned on other targets"
)]
pub fn pidfd_inode(pidfd: BorrowedFd<'_>) -> Option<u64> {
    let fs = nix::sys::statfs::fstatfs(pidfd).ok()?;
    if i64::from(fs.filesystem_type().0) != PIDFS_MAGIC {
        return None;
    }
    let st = nix::sys::stat::fstat(pidfd).ok()?;
    Some(st.st_ino)
}

/// Accepts only non-empty relative paths made of normal components.
fn check_relative(name: &str) -> Result<(), WorkloadError> {
    let path = Path::new(name);
    if name.is_empty()
        || name.as_bytes().contains(&0)
        || !path
            .components()
            .all(|c| matches!(c, Component::Normal(p) if p != OsStr::new("")))
    {
        return Err(WorkloadError::InvalidName);
    }
    Ok(())
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line.
fn parse_start_time(stat: &[u8]) -> Result<u64, WorkloadError> {
    let malformed = || WorkloadError::Malformed("stat".to_owned());
    let close = stat
        .iter()
        .rposition(|&b| b == b')')
        .ok_or_else(malformed)?;
    let rest = stat.get(close + 1..).ok_or_else(malformed)?;
    let rest = std::str::from_utf8(rest).map_err(|_| malformed())?;
    // After the comm field comes field 3 (state); field 22 is the 20th from there.
    rest.split_ascii_whitespace()
        .nth(19)
        .and_then(|f| f.parse::<u64>().ok())
        .ok_or_else(malformed)
}

impl fmt::Display for Workload {
    /// Only the pid and the peer credentials (never `/proc` contents).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} (uid {}, gid {})", self.pid, self.uid, self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Spawns `sleep 30` and waits until the exec is complete: `spawn` may return before
    /// the kernel has updated the command name.
    fn spawn_sleep() -> std::process::Child {
        let child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read(format!("/proc/{}/status", child.id()))
            .unwrap()
            .starts_with(b"Name:\tsleep\n")
        {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    fn pin_child(child: &std::process::Child) -> Workload {
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = pidfd_open(pid).unwrap();
        Workload::pin(pid, 0, 0, pidfd, false, Path::new("/proc")).unwrap()
    }

    #[test]
    fn pidfs_inode_is_per_process_and_shared_by_its_pidfds() {
        let mut a = spawn_sleep();
        let mut b = spawn_sleep();
        let wa = pin_child(&a);
        let wb = pin_child(&b);
        let again = pidfd_open(i32::try_from(a.id()).unwrap()).unwrap();
        match wa.pidfs_inode() {
            // Linux >= 6.9: one inode per process.
            Some(ino) => {
                assert_eq!(pidfd_inode(again.as_fd()), Some(ino));
                assert_ne!(wb.pidfs_inode(), Some(ino));
            }
            None => assert_eq!(wb.pidfs_inode(), None),
        }
        // Not a pidfd: no pidfs inode.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert_eq!(pidfd_inode(file.as_fd()), None);
        for child in [&mut a, &mut b] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    #[test]
    fn start_time_parses_after_last_paren() {
        let mut line = b"123 (a) b) (c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 ".to_vec();
        line.extend_from_slice(b"4242 19 20\n");
        // Fields after ')': S=3, 1=4 ... 18=21, 4242=22.
        assert_eq!(parse_start_time(&line).unwrap(), 4242);
        assert!(parse_start_time(b"123 (x S 1 2").is_err());
        assert!(parse_start_time(b"123 (x) S 1 2").is_err());
        assert!(
            parse_start_time(b"123 (x) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -1").is_err()
        );
    }

    #[test]
    fn names_must_be_plain_relative() {
        for bad in [
            "",
            "/etc/passwd",
            "../1/status",
            "a/../b",
            "./status",
            "a\0b",
        ] {
            assert!(
                matches!(check_relative(bad), Err(WorkloadError::InvalidName)),
                "{bad:?}"
            );
        }
        for good in ["status", "task/1/stat", "ns/mnt"] {
            check_relative(good).unwrap();
        }
    }

    #[test]
    fn pins_a_live_process_and_reads_its_files() {
        let mut child = spawn_sleep();
        let w = pin_child(&child);
        assert_eq!(w.pid(), i32::try_from(child.id()).unwrap());
        assert!(!w.pidfd_degraded());
        assert!(w.is_alive().unwrap());
        let status = w.read_proc_file("status", 1 << 20).unwrap();
        assert!(status.starts_with(b"Name:\tsleep"));
        assert!(w.start_time().unwrap() > 0);
        assert!(matches!(
            w.read_proc_file("status", 8),
            Err(WorkloadError::TooLarge { limit: 8, .. })
        ));
        assert!(matches!(
            w.read_proc_file("/etc/hostname", 100),
            Err(WorkloadError::InvalidName)
        ));
        // `exe` is a symlink: O_NOFOLLOW refuses it through read_proc_file.
        assert!(w.read_proc_file("exe", 100).is_err());
        let (dev, ino) = w.exe_inode().unwrap();
        let sleep =
            std::fs::metadata(std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap())
                .unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!((dev, ino), (sleep.dev(), sleep.ino()));

        child.kill().unwrap();
        // Not reaped yet: a zombie is not alive.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.is_alive().unwrap() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!w.is_alive().unwrap());
        // The pinned dirfd does not follow a recycled pid: reads fail now.
        assert!(w.read_proc_file("status", 1 << 20).is_err());
    }

    #[test]
    fn refuses_an_exited_process() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = pidfd_open(pid).unwrap();
        child.wait().unwrap();
        let err = Workload::pin(pid, 0, 0, pidfd, false, Path::new("/proc")).unwrap_err();
        assert!(matches!(err, WorkloadError::ProcessExited), "{err:?}");
    }

    #[test]
    fn refuses_a_zombie() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = pidfd_open(pid).unwrap();
        // Wait until it has exited without reaping it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pidfd_is_alive(pidfd.as_fd()).unwrap() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        let err = Workload::pin(pid, 0, 0, pidfd, false, Path::new("/proc")).unwrap_err();
        assert!(matches!(err, WorkloadError::ProcessExited), "{err:?}");
        child.wait().unwrap();
    }

    #[test]
    fn rejects_bad_pids() {
        assert_eq!(pidfd_open(0).unwrap_err(), Errno::EINVAL);
        assert_eq!(pidfd_open(-1).unwrap_err(), Errno::EINVAL);
        let child = spawn_sleep();
        let pidfd = pidfd_open(i32::try_from(child.id()).unwrap()).unwrap();
        assert!(matches!(
            Workload::pin(0, 0, 0, pidfd, false, Path::new("/proc")),
            Err(WorkloadError::InvalidPid(0))
        ));
        kill(child);
    }

    #[test]
    fn missing_proc_dir_means_exited() {
        let child = spawn_sleep();
        let pid = i32::try_from(child.id()).unwrap();
        let root = tempfile::tempdir().unwrap();
        let pidfd = pidfd_open(pid).unwrap();
        assert!(matches!(
            Workload::pin(pid, 0, 0, pidfd, false, root.path()),
            Err(WorkloadError::ProcessExited)
        ));
        // A symlink in place of the pid directory is refused (O_NOFOLLOW).
        std::os::unix::fs::symlink(format!("/proc/{pid}"), root.path().join(pid.to_string()))
            .unwrap();
        let pidfd = pidfd_open(pid).unwrap();
        assert!(matches!(
            Workload::pin(pid, 0, 0, pidfd, false, root.path()),
            Err(WorkloadError::Io { .. })
        ));
        kill(child);
    }

    fn kill(mut child: std::process::Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
