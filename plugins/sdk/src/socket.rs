//! Safe placement of the daemons' Unix sockets (SECURITY.md §2 rule 8, §3.5): the
//! directory is created by us or checked, a stale socket is removed only when it is a
//! socket we own, and the socket's mode is set relative to the directory fd without
//! changing the process umask.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use nix::fcntl::{AtFlags, OFlag, open};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstatat};

fn refuse(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {why}", path.display()),
    )
}

/// Creates `dir` with `mode` when missing (its parent must exist), then checks it: a
/// real directory (not a symlink), owned by root or by us, and not writable by group or
/// others. A directory someone else prepared is refused rather than trusted.
pub fn prepare_socket_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => {
            return Err(io::Error::new(
                err.kind(),
                format!("{}: {err}", dir.display()),
            ));
        }
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(refuse(
            dir,
            "socket directory is not a directory (or is a symlink)",
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(refuse(
            dir,
            &format!("socket directory is owned by uid {}, not by us", meta.uid()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(
            dir,
            "socket directory is writable by group or others",
        ));
    }
    Ok(())
}

/// Removes a leftover socket at `path` from an earlier run of ours. A regular file, a
/// symlink, a socket owned by another uid (a squatter), or a socket some process still
/// accepts connections on (another instance of ours) is refused, never unlinked.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(refuse(
            path,
            "exists and is not a socket; refusing to replace it",
        ));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(refuse(
            path,
            &format!(
                "a socket owned by uid {} is already there; refusing to replace it",
                meta.uid()
            ),
        ));
    }
    // A socket of ours that still accepts connections belongs to a running instance:
    // unlinking it would silently take over its clients.
    if is_served(path)? {
        return Err(refuse(
            path,
            "another process is serving on this socket; refusing to replace it",
        ));
    }
    std::fs::remove_file(path)
}

/// Whether something listens on the Unix socket at `path`: a non-blocking connect
/// succeeds, or finds the listen queue full (`EAGAIN`), rather than being refused.
fn is_served(path: &Path) -> io::Result<bool> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS) => Ok(true),
        Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => Ok(false),
        Err(errno) => Err(io::Error::new(
            io::Error::from(errno).kind(),
            format!("{}: cannot probe the socket: {errno}", path.display()),
        )),
    }
}

/// Sets the mode of the socket we just bound at `path`, relative to its directory fd.
/// The name is checked to be a socket owned by us first (`fstatat` without following);
/// since [`prepare_socket_dir`] made sure nobody else can write the directory, the
/// entry cannot be swapped between the check and the `fchmodat`, and the `fchmodat`
/// itself does not follow a symlink either (`AT_SYMLINK_NOFOLLOW`: `fchmodat2`, or the
/// C library's `O_PATH` emulation), so no file outside the directory can change mode.
pub fn set_socket_mode(path: &Path, mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| refuse(path, "socket path has no file name"))?;
    let dirfd = open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    let stat = fstatat(&dirfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(io::Error::from)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(refuse(path, "is not the socket we bound"));
    }
    if stat.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(refuse(path, "socket is not owned by us"));
    }
    fchmodat(
        &dirfd,
        name,
        Mode::from_bits_truncate(mode),
        FchmodatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_and_checks_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sock");
        prepare_socket_dir(&dir, 0o755).unwrap();
        prepare_socket_dir(&dir, 0o755).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        assert!(
            prepare_socket_dir(&dir, 0o755).is_err(),
            "world-writable dir accepted"
        );
    }

    #[test]
    fn symlinked_dir_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(prepare_socket_dir(&link, 0o755).is_err());
    }

    #[test]
    fn stale_socket_removed_but_file_and_symlink_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("a.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
        std::fs::write(&sock, b"x").unwrap();
        assert!(remove_stale_socket(&sock).is_err());
        assert!(sock.exists(), "regular file was removed");
        let link = tmp.path().join("b.sock");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(remove_stale_socket(&link).is_err());
        assert!(
            std::fs::symlink_metadata(&link).is_ok(),
            "symlink was removed"
        );
    }

    #[test]
    fn live_socket_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("a.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = remove_stale_socket(&sock).unwrap_err();
        assert!(err.to_string().contains("serving"), "{err}");
        assert!(sock.exists());
        drop(listener);
        remove_stale_socket(&sock).unwrap();
        assert!(!sock.exists());
    }

    #[test]
    fn squatter_socket_is_not_replaced() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to create a socket owned by another uid");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("a.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        std::os::unix::fs::lchown(&sock, Some(65534), Some(65534)).unwrap();
        let err = remove_stale_socket(&sock).unwrap_err();
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
        assert!(sock.exists(), "squatter socket was removed");
    }

    #[test]
    fn socket_mode_set_without_following() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("a.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        set_socket_mode(&sock, 0o777).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o777);
        let target = tmp.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        let link = tmp.path().join("link.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(set_socket_mode(&link, 0o777).is_err());
        assert_ne!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o777);
        // A symlink to a socket is refused too: only the entry itself counts.
        let other = tmp.path().join("other.sock");
        let _other = std::os::unix::net::UnixListener::bind(&other).unwrap();
        std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let link = tmp.path().join("link2.sock");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(set_socket_mode(&link, 0o777).is_err());
        assert_eq!(std::fs::metadata(&other).unwrap().mode() & 0o777, 0o700);
    }
}
