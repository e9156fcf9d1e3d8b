//! Caller identification at accept (SECURITY.md §1 steps 1-4): peer credentials and a
//! pidfd from the socket, the `pidfd_open` fallback for old kernels, and pinning the
//! process as a [`Workload`]; and the procfs mount it reads from ([`ProcRoot`], checked
//! to be a real, root-owned procfs: SECURITY.md §3.2 item 27).
//!
//! It owns only who is on the other end of one accepted Unix stream; running attestors,
//! re-checking liveness later and mapping [`PeerError`] to a gRPC status belong to the
//! Workload API code. The syscalls go through [`PeerSys`] so tests can force the
//! fallback and error paths.

use std::fmt;
use std::io::Read as _;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{Mode, fstat};
use nix::sys::statfs::{PROC_SUPER_MAGIC, fstatfs};
use nix::unistd::{SysconfVar, sysconf};
use tessera_plugin_sdk::{Workload, WorkloadError};

/// Inode number of the root directory of every procfs mount.
const PROC_ROOT_INO: u64 = 1;
/// Largest `/proc/uptime` accepted.
const UPTIME_LIMIT: u64 = 256;
/// Largest `uid_map`/`gid_map` or `overflowuid` file accepted (a map has at most 340
/// lines).
const ID_FILE_LIMIT: u64 = 64 * 1024;

/// Why the configured proc root cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcRootError {
    /// The directory could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The configured path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// It is not a procfs mount (anyone could fabricate `/proc/<pid>/status` files in a
    /// plain directory).
    #[error("{path} is not a procfs mount (filesystem magic {magic:#x}, procfs is {procfs:#x})")]
    NotProcfs {
        /// The configured path.
        path: PathBuf,
        /// The filesystem magic found.
        magic: i64,
        /// `PROC_SUPER_MAGIC`.
        procfs: i64,
    },
    /// It is a directory inside procfs, not the root of a procfs mount.
    #[error("{path} is inside procfs, not the root of a procfs mount")]
    NotProcfsRoot {
        /// The configured path.
        path: PathBuf,
    },
    /// The procfs root is not owned by root (a procfs mounted in another user namespace).
    #[error("{path} is owned by uid {uid}, not root")]
    NotRootOwned {
        /// The configured path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
}

/// The procfs mount the agent reads callers from (`proc_root`, normally `/proc`),
/// opened once and checked: a procfs (`statfs` magic `PROC_SUPER_MAGIC`) whose root is
/// owned by root. Every pid directory is opened relative to this descriptor, so changing
/// what the path names later has no effect.
#[derive(Debug)]
pub struct ProcRoot {
    path: PathBuf,
    dir: OwnedFd,
    unmapped: UnmappedIds,
}

/// The overflow uid/gid when they are not mapped in the agent's user namespace: a peer
/// reported with one of them has credentials the agent cannot see (SECURITY.md §3.2
/// item 20). `None` when the overflow id is also a real, mapped id (e.g. `nobody` in the
/// initial user namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct UnmappedIds {
    uid: Option<u32>,
    gid: Option<u32>,
}

impl ProcRoot {
    /// Opens and checks `path`.
    #[allow(
        clippy::useless_conversion,
        reason = "f_type is i64 here but narrower or unsigned on other targets"
    )]
    pub fn open(path: &Path) -> Result<Self, ProcRootError> {
        let open_error = |source| ProcRootError::Open {
            path: path.to_owned(),
            source,
        };
        let dir = open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(open_error)?;
        let fs = fstatfs(&dir).map_err(open_error)?;
        let magic = fs.filesystem_type();
        if magic != PROC_SUPER_MAGIC {
            return Err(ProcRootError::NotProcfs {
                path: path.to_owned(),
                magic: i64::from(magic.0),
                procfs: i64::from(PROC_SUPER_MAGIC.0),
            });
        }
        let st = fstat(&dir).map_err(open_error)?;
        if st.st_ino != PROC_ROOT_INO {
            return Err(ProcRootError::NotProcfsRoot {
                path: path.to_owned(),
            });
        }
        if st.st_uid != 0 {
            return Err(ProcRootError::NotRootOwned {
                path: path.to_owned(),
                uid: st.st_uid,
            });
        }
        let unmapped = unmapped_ids(dir.as_fd());
        Ok(Self {
            path: path.to_owned(),
            dir,
            unmapped,
        })
    }

    /// The configured path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open procfs root.
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The boot id (`sys/kernel/random/boot_id`, a UUID that changes at every boot),
    /// read through this procfs; `None` when it cannot be read or is not a UUID.
    pub fn boot_id(&self) -> Option<String> {
        let text = read_at(self.dir.as_fd(), "sys/kernel/random/boot_id", BOOT_ID_LIMIT).ok()?;
        parse_boot_id(&text)
    }
}

/// Largest `boot_id` file accepted (a UUID and a newline).
const BOOT_ID_LIMIT: u64 = 64;

/// A boot id as the kernel writes it: a lowercase UUID (8-4-4-4-12 hex digits) and a
/// newline.
fn parse_boot_id(text: &str) -> Option<String> {
    let id = text.trim_end_matches('\n');
    let groups: Vec<&str> = id.split('-').collect();
    let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    shape_ok.then(|| id.to_owned())
}

/// Reads a small file relative to `dir` without following a final symlink.
fn read_at(dir: BorrowedFd<'_>, name: &str, limit: u64) -> std::io::Result<String> {
    let fd = openat(dir, name, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(limit)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Which overflow ids are unmapped in the agent's own user namespace. Unreadable files
/// mean "unknown": nothing is treated as unmapped (the unix attestor still requires the
/// `status` ids to equal the socket's).
fn unmapped_ids(proc_root: BorrowedFd<'_>) -> UnmappedIds {
    let one = |overflow: &str, map: &str| -> Option<u32> {
        let id: u32 = read_at(proc_root, overflow, ID_FILE_LIMIT)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let map = read_at(proc_root, map, ID_FILE_LIMIT).ok()?;
        (!id_is_mapped(&map, id)).then_some(id)
    };
    UnmappedIds {
        uid: one("sys/kernel/overflowuid", "self/uid_map"),
        gid: one("sys/kernel/overflowgid", "self/gid_map"),
    }
}

/// Whether `id` falls inside one of the `uid_map`/`gid_map` lines (`inside outside
/// count`, the first column being ids as this namespace sees them). A malformed line
/// counts as mapping everything (fail open: the check only adds a refusal).
fn id_is_mapped(map: &str, id: u32) -> bool {
    map.lines().filter(|l| !l.trim().is_empty()).any(|line| {
        let mut fields = line.split_ascii_whitespace().map(str::parse::<u64>);
        match (fields.next(), fields.next(), fields.next()) {
            (Some(Ok(inside)), Some(Ok(_)), Some(Ok(count))) => {
                let id = u64::from(id);
                id >= inside && id < inside.saturating_add(count)
            }
            _ => true,
        }
    })
}

/// Why the peer of a connection could not be identified. Every variant means: refuse
/// the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// `SO_PEERCRED` reported pid 0: the peer lives in a PID namespace the agent cannot
    /// see.
    #[error("could not resolve caller: peer pid is not visible to the agent")]
    Unresolved,
    /// `SO_PEERCRED` failed (not a connected Unix socket).
    #[error("could not read the peer credentials")]
    PeerCredentials(#[source] Errno),
    /// `SO_PEERPIDFD` failed with an error other than "unsupported" (`EINVAL`, `ESRCH`:
    /// the peer is gone or was never a process).
    #[error("could not get a pidfd for the peer")]
    PeerPidfd(#[source] Errno),
    /// The fallback `pidfd_open(pid)` failed.
    #[error("could not open a pidfd for the peer pid")]
    PidfdOpen(#[source] Errno),
    /// The peer process has already exited (its pidfd is readable).
    #[error("the peer process has exited")]
    PeerExited,
    /// Fallback path only: the process now holding the peer's pid started after the
    /// connection was accepted, so the pid was recycled.
    #[error("the peer pid was recycled")]
    PidRecycled,
    /// Pinning or reading `/proc/<pid>` failed.
    #[error("could not pin the peer process")]
    Workload(#[source] WorkloadError),
    /// The peer's uid or gid is the overflow id of a user namespace that does not map
    /// its real credentials: who it is cannot be known (SECURITY.md §3.2 item 20).
    #[error("could not resolve caller: peer {0} is not mapped in the agent's user namespace")]
    Unmapped(&'static str),
}

impl From<WorkloadError> for PeerError {
    fn from(e: WorkloadError) -> Self {
        match e {
            WorkloadError::ProcessExited => Self::PeerExited,
            e => Self::Workload(e),
        }
    }
}

/// The peer's credentials as `SO_PEERCRED` reports them (effective ids at connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id of the peer (thread-group id) in the agent's PID namespace; 0 when not
    /// visible.
    pub pid: i32,
    /// Effective uid at connect time.
    pub uid: u32,
    /// Effective gid at connect time.
    pub gid: u32,
}

/// The kernel calls behind [`identify_peer`]; [`KernelPeerSys`] is the real one, tests
/// inject fakes to force `ENOPROTOOPT`, `EINVAL`, pid 0 and the like.
pub trait PeerSys: Send + Sync + fmt::Debug {
    /// `getsockopt(SO_PEERCRED)`.
    fn peer_credentials(&self, sock: BorrowedFd<'_>) -> Result<PeerCred, Errno>;
    /// `getsockopt(SO_PEERPIDFD)` (Linux >= 6.5).
    fn peer_pidfd(&self, sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno>;
    /// `pidfd_open(pid, 0)`.
    fn pidfd_open(&self, pid: i32) -> Result<OwnedFd, Errno>;
}

/// The real system calls (`nix` 0.31 `sockopt::PeerCredentials` / `sockopt::PeerPidfd`,
/// and the SDK's `pidfd_open`).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelPeerSys;

impl PeerSys for KernelPeerSys {
    fn peer_credentials(&self, sock: BorrowedFd<'_>) -> Result<PeerCred, Errno> {
        let cred = getsockopt(&sock, sockopt::PeerCredentials)?;
        Ok(PeerCred {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }

    fn peer_pidfd(&self, sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
        getsockopt(&sock, sockopt::PeerPidfd)
    }

    fn pidfd_open(&self, pid: i32) -> Result<OwnedFd, Errno> {
        tessera_plugin_sdk::workload::pidfd_open(pid)
    }
}

/// Set after the first "attestation is racy" warning, so it is logged once.
static WARNED_DEGRADED: AtomicBool = AtomicBool::new(false);

/// Identify the peer of an accepted Unix stream (SECURITY.md §1 steps 1-4).
///
/// Call right after accept. `proc_root` is the procfs mount to read (normally `/proc`).
/// The returned [`Workload`] is pinned: later liveness checks and `/proc` reads refer to
/// this process even if its pid is recycled.
pub fn identify_peer(
    stream: &tokio::net::UnixStream,
    proc_root: &ProcRoot,
) -> Result<Workload, PeerError> {
    identify_peer_with(&KernelPeerSys, stream.as_fd(), proc_root)
}

/// [`identify_peer`] through the given system-call seam, on any connected Unix socket.
pub fn identify_peer_with(
    sys: &dyn PeerSys,
    sock: BorrowedFd<'_>,
    proc_root: &ProcRoot,
) -> Result<Workload, PeerError> {
    let accepted = Instant::now();
    let cred = peer_credentials(sys, sock)?;
    pin_peer(sys, sock, cred, proc_root, accepted)
}

/// Step 1 alone: `SO_PEERCRED`, refusing pid 0 (a peer in a PID namespace the agent
/// cannot see). Cheap (no `/proc` access), so limits keyed by uid can run before
/// [`pin_peer`].
pub fn peer_credentials(sys: &dyn PeerSys, sock: BorrowedFd<'_>) -> Result<PeerCred, PeerError> {
    let cred = sys
        .peer_credentials(sock)
        .map_err(PeerError::PeerCredentials)?;
    if cred.pid <= 0 {
        return Err(PeerError::Unresolved);
    }
    Ok(cred)
}

/// Steps 2-4 for a peer whose credentials [`peer_credentials`] returned: the pidfd
/// (or the degraded `pidfd_open`), then pinning `/proc/<pid>` relative to `proc_root`.
/// `accepted` is when the connection was accepted (the degraded path refuses a process
/// that started later).
pub fn pin_peer(
    sys: &dyn PeerSys,
    sock: BorrowedFd<'_>,
    cred: PeerCred,
    proc_root: &ProcRoot,
    accepted: Instant,
) -> Result<Workload, PeerError> {
    if cred.pid <= 0 {
        return Err(PeerError::Unresolved);
    }
    if proc_root.unmapped.uid == Some(cred.uid) {
        return Err(PeerError::Unmapped("uid"));
    }
    if proc_root.unmapped.gid == Some(cred.gid) {
        return Err(PeerError::Unmapped("gid"));
    }

    // 2. SO_PEERPIDFD, or pidfd_open(pid) on kernels without it.
    let (pidfd, degraded) = match sys.peer_pidfd(sock) {
        Ok(fd) => (fd, false),
        Err(Errno::ENOPROTOOPT) => {
            if !WARNED_DEGRADED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the kernel has no SO_PEERPIDFD (Linux < 6.5): falling back to \
                     pidfd_open(pid); workload attestation is racy against pid reuse"
                );
            } else {
                tracing::debug!(pid = cred.pid, "degraded peer pidfd via pidfd_open");
            }
            let fd = sys.pidfd_open(cred.pid).map_err(|errno| match errno {
                Errno::ESRCH => PeerError::PeerExited,
                errno => PeerError::PidfdOpen(errno),
            })?;
            (fd, true)
        }
        Err(errno) => return Err(PeerError::PeerPidfd(errno)),
    };

    // 3-4. Liveness (a readable pidfd = exited, zombies included), then the /proc dirfd,
    // then liveness again: all inside `Workload::pin`.
    let workload = Workload::pin_at(
        cred.pid,
        cred.uid,
        cred.gid,
        pidfd,
        degraded,
        proc_root.dir(),
    )?;

    if degraded {
        // The pidfd was opened by pid after the fact: a process that started after the
        // accept cannot be the one that connected.
        let accept_ticks = accept_boot_ticks(proc_root.dir(), accepted)?;
        let start = workload.start_time()?;
        if start > accept_ticks.saturating_add(1) {
            return Err(PeerError::PidRecycled);
        }
    }
    Ok(workload)
}

/// The accept time in clock ticks since boot (the unit of `stat` field 22): the
/// boot-time clock of `<proc_root>/uptime` minus the time elapsed since `accepted`.
fn accept_boot_ticks(proc_root: BorrowedFd<'_>, accepted: Instant) -> Result<u64, PeerError> {
    let malformed = || PeerError::Workload(WorkloadError::Malformed("uptime".to_owned()));
    let uptime = read_at(proc_root, "uptime", UPTIME_LIMIT).map_err(|source| {
        PeerError::Workload(WorkloadError::Io {
            what: "read /proc/uptime".to_owned(),
            source,
        })
    })?;
    let first = uptime
        .split_ascii_whitespace()
        .next()
        .ok_or_else(malformed)?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, "0"));
    let secs: u128 = secs.parse().map_err(|_| malformed())?;
    // Fraction to nanoseconds: right-pad to 9 digits.
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let nanos: u128 = format!("{frac:0<9}").parse().map_err(|_| malformed())?;
    let now_ns = secs.saturating_mul(1_000_000_000).saturating_add(nanos);
    let accept_ns = now_ns.saturating_sub(accepted.elapsed().as_nanos());

    let hz = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u128::try_from(v).ok())
        .filter(|&v| v > 0)
        .unwrap_or(100);
    // Round up: `uptime` is truncated to 1/100 s.
    let ticks = accept_ns.saturating_mul(hz).div_ceil(1_000_000_000);
    u64::try_from(ticks).map_err(|_| malformed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::net::{UnixListener, UnixStream};

    const PROC: &str = "/proc";

    fn proc_root() -> ProcRoot {
        ProcRoot::open(Path::new(PROC)).unwrap()
    }

    fn python_connect(path: &Path, then: &str) -> Child {
        let script = format!(
            "import socket, time, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect({path:?})\n\
             sys.stdout.write('connected\\n'); sys.stdout.flush()\n\
             {then}\n"
        );
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn wait_connected(child: &mut Child) {
        use std::io::BufRead as _;
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).unwrap();
        assert_eq!(line, "connected\n");
    }

    async fn listen() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    fn reap(mut child: Child) {
        let _ = child.kill();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn identifies_a_live_peer() {
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(&path, "time.sleep(30)");
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);

        let w = identify_peer(&stream, &proc_root()).unwrap();
        assert_eq!(w.pid(), i32::try_from(child.id()).unwrap());
        assert_eq!(w.uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(w.gid(), nix::unistd::getegid().as_raw());
        assert!(!w.pidfd_degraded(), "this kernel has SO_PEERPIDFD");
        assert!(w.is_alive().unwrap());
        assert!(w.start_time().unwrap() > 0);

        reap(child);
        assert!(!w.is_alive().unwrap());
    }

    #[tokio::test]
    async fn rejects_a_peer_that_exited_and_was_reaped() {
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(&path, "pass");
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);
        child.wait().unwrap();

        let err = identify_peer(&stream, &proc_root()).unwrap_err();
        eprintln!("kernel answer for an exited peer: {err:?}");
        assert!(
            matches!(
                err,
                PeerError::PeerExited | PeerError::PeerPidfd(Errno::ESRCH)
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn rejects_a_zombie_peer() {
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(&path, "pass");
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);
        // Exited but not reaped: /proc/<pid> still exists.
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            if stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z')
            {
                break;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = identify_peer(&stream, &proc_root()).unwrap_err();
        assert!(matches!(err, PeerError::PeerExited), "{err:?}");
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn forked_child_holding_the_socket_does_not_count() {
        // The connecting process exits; its child keeps the socket open (§3.2 row 14).
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(
            &path,
            "import os\nif os.fork() == 0:\n    time.sleep(5)\n    os._exit(0)\nos._exit(0)",
        );
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);
        child.wait().unwrap();
        let err = identify_peer(&stream, &proc_root()).unwrap_err();
        eprintln!("kernel answer for an exited peer: {err:?}");
        assert!(
            matches!(
                err,
                PeerError::PeerExited | PeerError::PeerPidfd(Errno::ESRCH)
            ),
            "{err:?}"
        );
        // The forked child, reparented, still holds the socket and exits after 5 s.
    }

    /// A seam that answers from a script and records what was called.
    #[derive(Debug, Default)]
    struct FakeSys {
        cred: Option<PeerCred>,
        peer_pidfd_err: Option<Errno>,
        spawn_in_cred: bool,
        calls: Mutex<Vec<&'static str>>,
        children: Mutex<Vec<KillOnDrop>>,
    }

    impl PeerSys for FakeSys {
        fn peer_credentials(&self, sock: BorrowedFd<'_>) -> Result<PeerCred, Errno> {
            self.calls.lock().unwrap().push("peer_credentials");
            if self.spawn_in_cred {
                // A process that starts only after the accept, posing as the peer.
                std::thread::sleep(Duration::from_millis(100));
                let child = Command::new("sleep").arg("30").spawn().unwrap();
                let pid = i32::try_from(child.id()).unwrap();
                self.children.lock().unwrap().push(KillOnDrop(child));
                return Ok(PeerCred {
                    pid,
                    uid: nix::unistd::geteuid().as_raw(),
                    gid: nix::unistd::getegid().as_raw(),
                });
            }
            match self.cred {
                Some(c) => Ok(c),
                None => KernelPeerSys.peer_credentials(sock),
            }
        }

        fn peer_pidfd(&self, sock: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
            self.calls.lock().unwrap().push("peer_pidfd");
            match self.peer_pidfd_err {
                Some(e) => Err(e),
                None => KernelPeerSys.peer_pidfd(sock),
            }
        }

        fn pidfd_open(&self, pid: i32) -> Result<OwnedFd, Errno> {
            self.calls.lock().unwrap().push("pidfd_open");
            KernelPeerSys.pidfd_open(pid)
        }
    }

    /// Kills and reaps a child when dropped.
    #[derive(Debug)]
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn enoprotoopt_falls_back_to_pidfd_open_and_is_degraded() {
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(&path, "time.sleep(30)");
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);

        let sys = FakeSys {
            peer_pidfd_err: Some(Errno::ENOPROTOOPT),
            ..FakeSys::default()
        };
        let w = identify_peer_with(&sys, stream.as_fd(), &proc_root()).unwrap();
        assert!(w.pidfd_degraded());
        assert_eq!(w.pid(), i32::try_from(child.id()).unwrap());
        assert_eq!(
            *sys.calls.lock().unwrap(),
            ["peer_credentials", "peer_pidfd", "pidfd_open"]
        );
        assert!(
            WARNED_DEGRADED.load(Ordering::Relaxed),
            "the degraded path was logged"
        );
        // Twice: the warning is logged once, the path still works.
        let w2 = identify_peer_with(&sys, stream.as_fd(), &proc_root()).unwrap();
        assert!(w2.pidfd_degraded());
        reap(child);
    }

    #[tokio::test]
    async fn einval_and_esrch_reject_without_fallback() {
        let (_dir, path, listener) = listen().await;
        let mut child = python_connect(&path, "time.sleep(30)");
        let (stream, _) = listener.accept().await.unwrap();
        wait_connected(&mut child);

        for errno in [Errno::EINVAL, Errno::ESRCH] {
            let sys = FakeSys {
                peer_pidfd_err: Some(errno),
                ..FakeSys::default()
            };
            let err = identify_peer_with(&sys, stream.as_fd(), &proc_root()).unwrap_err();
            assert!(
                matches!(err, PeerError::PeerPidfd(e) if e == errno),
                "{err:?}"
            );
            assert!(!sys.calls.lock().unwrap().contains(&"pidfd_open"));
        }
        reap(child);
    }

    #[tokio::test]
    async fn pid_zero_is_unresolved() {
        let (a, _b) = UnixStream::pair().unwrap();
        let sys = FakeSys {
            cred: Some(PeerCred {
                pid: 0,
                uid: 0,
                gid: 0,
            }),
            ..FakeSys::default()
        };
        let err = identify_peer_with(&sys, a.as_fd(), &proc_root()).unwrap_err();
        assert!(matches!(err, PeerError::Unresolved), "{err:?}");
        assert!(err.to_string().contains("could not resolve caller"));
        assert_eq!(*sys.calls.lock().unwrap(), ["peer_credentials"]);
    }

    #[tokio::test]
    async fn fallback_rejects_a_process_started_after_accept() {
        let (a, _b) = UnixStream::pair().unwrap();
        let sys = FakeSys {
            spawn_in_cred: true,
            peer_pidfd_err: Some(Errno::ENOPROTOOPT),
            ..FakeSys::default()
        };
        let err = identify_peer_with(&sys, a.as_fd(), &proc_root()).unwrap_err();
        assert!(matches!(err, PeerError::PidRecycled), "{err:?}");
    }

    #[tokio::test]
    async fn socketpair_peer_is_ourselves() {
        // Not a listener, but the same calls: the peer of a socketpair is this process.
        let (a, _b) = UnixStream::pair().unwrap();
        let w = identify_peer(&a, &proc_root()).unwrap();
        assert_eq!(w.pid(), i32::try_from(std::process::id()).unwrap());
        assert!(w.is_alive().unwrap());
        // And through the fallback the start-time check passes for a process that
        // started before the accept.
        let sys = FakeSys {
            peer_pidfd_err: Some(Errno::ENOPROTOOPT),
            ..FakeSys::default()
        };
        let w = identify_peer_with(&sys, a.as_fd(), &proc_root()).unwrap();
        assert!(w.pidfd_degraded());
    }

    #[test]
    fn uptime_parsing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("uptime"), "12.34 56.78\n").unwrap();
        let hz = u64::try_from(sysconf(SysconfVar::CLK_TCK).unwrap().unwrap()).unwrap();
        let fd = |p: &Path| open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        let ticks = accept_boot_ticks(fd(dir.path()).as_fd(), Instant::now()).unwrap();
        assert!(
            ticks <= 1234 * hz / 100 && ticks + 1 >= 1234 * hz / 100,
            "{ticks}"
        );
        for bad in ["", "x 1", "-1.0 2", "1.x 2", "1. 2", "1.1234567891 2"] {
            std::fs::write(dir.path().join("uptime"), bad).unwrap();
            assert!(
                accept_boot_ticks(fd(dir.path()).as_fd(), Instant::now()).is_err(),
                "{bad:?}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(accept_boot_ticks(fd(empty.path()).as_fd(), Instant::now()).is_err());
    }

    #[test]
    fn proc_root_must_be_a_root_owned_procfs() {
        let root = proc_root();
        assert_eq!(root.path(), Path::new(PROC));
        // In the initial user namespace every id is mapped: nobody is a real user.
        assert_eq!(
            std::fs::read_to_string("/proc/self/uid_map")
                .unwrap()
                .split_ascii_whitespace()
                .collect::<Vec<_>>(),
            ["0", "0", "4294967295"],
            "this test expects the initial user namespace"
        );
        assert_eq!(root.unmapped, UnmappedIds::default());

        let plain = tempfile::tempdir().unwrap();
        let err = ProcRoot::open(plain.path()).unwrap_err();
        assert!(matches!(err, ProcRootError::NotProcfs { .. }), "{err:?}");
        assert!(err.to_string().contains("not a procfs mount"), "{err}");
        // A fabricated tree that looks like /proc is still not procfs.
        std::fs::create_dir_all(plain.path().join("1")).unwrap();
        std::fs::write(plain.path().join("1/status"), "Uid:\t0\t0\t0\t0\n").unwrap();
        assert!(ProcRoot::open(plain.path()).is_err());
        let err = ProcRoot::open(Path::new("/nonexistent-proc")).unwrap_err();
        assert!(matches!(err, ProcRootError::Open { .. }), "{err:?}");
        // A file, or a directory of procfs that is not its root, are refused.
        assert!(ProcRoot::open(Path::new("/proc/self/status")).is_err());
        let sub = ProcRoot::open(Path::new("/proc/self")).unwrap_err();
        assert!(
            matches!(sub, ProcRootError::NotProcfsRoot { .. }),
            "{sub:?}"
        );
        let sub = ProcRoot::open(Path::new("/proc/sys")).unwrap_err();
        assert!(
            matches!(sub, ProcRootError::NotProcfsRoot { .. }),
            "{sub:?}"
        );
    }

    #[test]
    fn boot_id_is_read_through_the_proc_root() {
        let id = proc_root().boot_id().expect("this kernel has a boot id");
        assert_eq!(
            id,
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
        );
        assert_eq!(
            parse_boot_id("e8b29955-a05e-447e-aab4-2b2f92488a93\n").as_deref(),
            Some("e8b29955-a05e-447e-aab4-2b2f92488a93")
        );
        for bad in [
            "",
            "e8b29955-a05e-447e-aab4-2b2f92488a9\n",
            "E8B29955-A05E-447E-AAB4-2B2F92488A93\n",
            "e8b29955a05e447eaab42b2f92488a93\n",
            "e8b29955-a05e-447e-aab4-2b2f92488a93-\n",
        ] {
            assert_eq!(parse_boot_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn id_maps() {
        let init = "         0          0 4294967295\n";
        assert!(id_is_mapped(init, 65534));
        let root_only = "         0       1000          1\n";
        assert!(!id_is_mapped(root_only, 65534));
        assert!(id_is_mapped(root_only, 0));
        let two = "0 100000 65536\n70000 200000 10\n";
        assert!(id_is_mapped(two, 65535));
        assert!(!id_is_mapped(two, 65536));
        assert!(id_is_mapped(two, 70009));
        assert!(!id_is_mapped(two, 70010));
        assert!(!id_is_mapped("", 0));
        assert!(id_is_mapped("garbage\n", 7));
    }

    #[tokio::test]
    async fn overflow_ids_unmapped_in_our_namespace_are_refused() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut root = proc_root();
        let me = PeerCred {
            pid: i32::try_from(std::process::id()).unwrap(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        root.unmapped = UnmappedIds {
            uid: Some(me.uid),
            gid: None,
        };
        let err = pin_peer(&KernelPeerSys, a.as_fd(), me, &root, Instant::now()).unwrap_err();
        assert!(matches!(err, PeerError::Unmapped("uid")), "{err:?}");
        root.unmapped = UnmappedIds {
            uid: None,
            gid: Some(me.gid),
        };
        let err = pin_peer(&KernelPeerSys, a.as_fd(), me, &root, Instant::now()).unwrap_err();
        assert!(matches!(err, PeerError::Unmapped("gid")), "{err:?}");
        root.unmapped = UnmappedIds::default();
        pin_peer(&KernelPeerSys, a.as_fd(), me, &root, Instant::now()).unwrap();
    }
}
