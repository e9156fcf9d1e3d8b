//! Files that hold secrets (private keys, join-token state) and the public material
//! written beside them (certificates, bundles).
//!
//! The rules (SECURITY.md §2 rule 8, §3.5 items 50–51):
//!
//! - secret files are `0600` in a `0700` directory owned by the effective uid; the
//!   directory's parent must not let anyone else rename entries in it;
//! - every write goes to a fresh temporary file created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` (so a file or symlink an attacker planted is never
//!   reused or followed), is `fsync`ed, renamed over the final name and the directory is
//!   `fsync`ed: a reader sees the old file or the new one, never a torn one, and a
//!   failed write (disk full) leaves the previous file intact;
//! - every file operation is relative to a directory descriptor opened with
//!   `O_NOFOLLOW|O_DIRECTORY`, so swapping the directory for a symlink between the check
//!   and the write does not redirect the write;
//! - the process umask is never changed: modes are set with `fchmod` on the descriptor.
//!
//! This module owns no policy on *where* files live; callers pass the directory.

use std::fs::{File, OpenOptions, Permissions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, geteuid, unlinkat};

/// Largest secret file [`read_private_file`] accepts (keys and tokens are a few KiB).
pub const MAX_PRIVATE_FILE_SIZE: u64 = 1024 * 1024;

/// How many fresh temporary names a write tries before giving up.
const TEMP_ATTEMPTS: u32 = 16;

/// Mode bits of `st_mode` that are permissions (no file type).
const PERM_MASK: u32 = 0o7777;
/// Group and other permission bits.
const GROUP_OTHER: u32 = 0o077;
/// Group and other write bits.
const GROUP_OTHER_WRITE: u32 = 0o022;
/// The sticky bit: in a sticky directory only an entry's owner may rename or delete it.
const STICKY: u32 = 0o1000;

/// Create `dir` (and only it, not its parents) with mode `0700` if it is missing; if it
/// exists it must be a real directory (not a symlink), owned by the effective uid, with
/// no group or other permission bits at all. Its parent must be owned by root or the
/// effective uid and, when group/other writable, sticky (like `/tmp`).
///
/// Errors name the path and the problem; a directory that fails a check is never
/// `chmod`ed or otherwise repaired.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_parent(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // Created by us: make the mode exactly 0700 whatever the umask says, through
            // the descriptor (never a path chmod).
            let handle = open_dir(dir)?;
            handle.set_permissions(Permissions::from_mode(0o700))?;
            check_private_dir(dir, &handle)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(dir)?;
            if meta.file_type().is_symlink() {
                return Err(problem(
                    dir,
                    "is a symlink, refusing to use it as a secret directory",
                ));
            }
            if !meta.is_dir() {
                return Err(problem(dir, "exists and is not a directory"));
            }
            let handle = open_dir(dir)?;
            check_private_dir(dir, &handle)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{}: cannot create directory: {e}", dir.display()),
        )),
    }
}

/// Write `contents` to `<dir>/<name>` atomically with mode `0600`.
///
/// `dir` must pass the checks of [`ensure_private_dir`] (call it first). The data goes to
/// `<dir>/.<name>.tmp-<random>` created with `O_CREAT|O_EXCL|O_NOFOLLOW|O_WRONLY|O_CLOEXEC`,
/// is `fsync`ed, renamed over `<dir>/<name>` and the directory is `fsync`ed. Whatever was at
/// `<dir>/<name>` before (even a world-readable file) is replaced, not rewritten in place.
/// On error the temporary file is removed and the previous file is intact.
pub fn write_private_file(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    check_name(dir, name)?;
    let handle = open_dir(dir)?;
    check_private_dir(dir, &handle)?;
    write_atomic(dir, &handle, name, contents, 0o600)
}

/// Read the secret file `<dir>/<name>`, opened with `O_NOFOLLOW`.
///
/// Refuses a symlink, a non-regular file, a file not owned by the effective uid, one
/// with any group or other permission bit, one larger than [`MAX_PRIVATE_FILE_SIZE`],
/// and a directory that others can write to.
pub fn read_private_file(dir: &Path, name: &str) -> io::Result<Vec<u8>> {
    check_name(dir, name)?;
    let handle = open_dir(dir)?;
    check_dir_not_shared(dir, &handle)?;
    let path = dir.join(name);
    let fd = openat(
        handle.as_fd(),
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| errno_error(&path, "cannot open secret file", e))?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(problem(&path, "is not a regular file"));
    }
    let euid = geteuid().as_raw();
    if meta.uid() != euid {
        return Err(problem(
            &path,
            &format!(
                "is owned by uid {} but this process runs as uid {euid}",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & PERM_MASK;
    if mode & GROUP_OTHER != 0 {
        return Err(problem(
            &path,
            &format!(
                "has mode {mode:04o}; a secret file must not be accessible by group or others (want 0600)"
            ),
        ));
    }
    if meta.len() > MAX_PRIVATE_FILE_SIZE {
        return Err(problem(
            &path,
            &format!("is larger than {MAX_PRIVATE_FILE_SIZE} bytes"),
        ));
    }
    let mut out = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_PRIVATE_FILE_SIZE + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_PRIVATE_FILE_SIZE {
        return Err(problem(
            &path,
            &format!("is larger than {MAX_PRIVATE_FILE_SIZE} bytes"),
        ));
    }
    Ok(out)
}

/// Write public material (certificates, bundles) to `<dir>/<name>` atomically with mode
/// `0644`, exactly as [`write_private_file`] does.
///
/// `dir` must be owned by the effective uid and not writable by group or others (a
/// private directory qualifies).
pub fn write_public_file(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    check_name(dir, name)?;
    let handle = open_dir(dir)?;
    check_dir_not_shared(dir, &handle)?;
    write_atomic(dir, &handle, name, contents, 0o644)
}

/// The shared body of the two writers: temp file, write, fsync, rename, fsync dir.
fn write_atomic(
    dir: &Path,
    handle: &File,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> io::Result<()> {
    let (tmp_name, file) = create_temp(dir, handle, name)?;
    let tmp_path = dir.join(&tmp_name);
    let result = (|| {
        let mut file = file;
        // The open mode is filtered by the umask; set the exact mode on the descriptor.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| context(&tmp_path, "cannot set mode", e))?;
        file.write_all(contents)
            .map_err(|e| context(&tmp_path, "cannot write", e))?;
        file.sync_all()
            .map_err(|e| context(&tmp_path, "cannot fsync", e))?;
        drop(file);
        renameat(handle.as_fd(), tmp_name.as_str(), handle.as_fd(), name)
            .map_err(|e| errno_error(&dir.join(name), "cannot rename temporary file over", e))
    })();
    if let Err(e) = result {
        // Best effort: the write already failed, and a leftover temp file is harmless
        // (0600, never read, replaced by name on the next attempt).
        let _ = unlinkat(
            handle.as_fd(),
            tmp_name.as_str(),
            UnlinkatFlags::NoRemoveDir,
        );
        return Err(e);
    }
    handle
        .sync_all()
        .map_err(|e| context(dir, "cannot fsync directory", e))
}

/// Create `.<name>.tmp-<random>` in `handle` with `O_EXCL|O_NOFOLLOW`, retrying on a
/// name collision (which includes a planted file or symlink).
fn create_temp(dir: &Path, handle: &File, name: &str) -> io::Result<(String, File)> {
    let mut last = None;
    for _ in 0..TEMP_ATTEMPTS {
        let tmp_name = format!(".{name}.tmp-{:016x}", random_u64());
        match openat(
            handle.as_fd(),
            tmp_name.as_str(),
            OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_WRONLY
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((tmp_name, File::from(fd))),
            Err(nix::errno::Errno::EEXIST) => last = Some(tmp_name),
            Err(e) => {
                return Err(errno_error(
                    &dir.join(&tmp_name),
                    "cannot create temporary file",
                    e,
                ));
            }
        }
    }
    Err(problem(
        &dir.join(last.unwrap_or_default()),
        &format!("{TEMP_ATTEMPTS} temporary names in a row already existed; refusing to write"),
    ))
}

/// 64 unpredictable bits for temporary names, without a dependency on a RNG crate.
///
/// `RandomState` is seeded from the OS RNG; mixing in a counter, the pid and the time
/// keeps successive names distinct. Unpredictability is defence in depth only:
/// `O_EXCL|O_NOFOLLOW` is what makes a planted file harmless.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(d.as_nanos());
    }
    hasher.finish()
}

/// Open a directory without following a symlink in its last component.
fn open_dir(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(dir)
        .map_err(|e| {
            // With O_DIRECTORY|O_NOFOLLOW Linux reports a symlink as ENOTDIR, not ELOOP.
            let is_symlink =
                std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            if is_symlink || e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
                problem(dir, "is a symlink, refusing to follow it")
            } else if e.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32) {
                problem(dir, "is not a directory")
            } else {
                context(dir, "cannot open directory", e)
            }
        })
}

/// The directory is owned by the effective uid and has no group/other bits.
fn check_private_dir(dir: &Path, handle: &File) -> io::Result<()> {
    let meta = handle.metadata()?;
    check_owner(dir, meta.uid(), false)?;
    let mode = meta.mode() & PERM_MASK;
    if mode & GROUP_OTHER != 0 {
        return Err(problem(
            dir,
            &format!(
                "has mode {mode:04o}; a secret directory must not be accessible by group or others (want 0700)"
            ),
        ));
    }
    Ok(())
}

/// The directory is owned by the effective uid (or root) and nobody else can write to it.
fn check_dir_not_shared(dir: &Path, handle: &File) -> io::Result<()> {
    let meta = handle.metadata()?;
    check_owner(dir, meta.uid(), true)?;
    let mode = meta.mode() & PERM_MASK;
    if mode & GROUP_OTHER_WRITE != 0 {
        return Err(problem(
            dir,
            &format!("has mode {mode:04o}; it must not be writable by group or others"),
        ));
    }
    Ok(())
}

/// The parent of a secret directory: owned by root or us, and if others may write to
/// it, sticky (so they cannot rename our directory away and plant another).
fn check_parent(parent: &Path) -> io::Result<()> {
    let meta = std::fs::metadata(parent)
        .map_err(|e| context(parent, "cannot inspect parent directory", e))?;
    if !meta.is_dir() {
        return Err(problem(parent, "is not a directory"));
    }
    check_owner(parent, meta.uid(), true)?;
    let mode = meta.mode() & PERM_MASK;
    if mode & GROUP_OTHER_WRITE != 0 && mode & STICKY == 0 {
        return Err(problem(
            parent,
            &format!("has mode {mode:04o}: writable by group or others without the sticky bit"),
        ));
    }
    Ok(())
}

fn check_owner(path: &Path, uid: u32, root_ok: bool) -> io::Result<()> {
    let euid = geteuid().as_raw();
    if uid == euid || (root_ok && uid == 0) {
        return Ok(());
    }
    Err(problem(
        path,
        &format!("is owned by uid {uid} but this process runs as uid {euid}"),
    ))
}

/// A file name is one plain path component.
fn check_name(dir: &Path, name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: invalid file name {name:?}: must be a single path component",
                dir.display()
            ),
        ));
    }
    Ok(())
}

fn problem(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {what}", path.display()),
    )
}

fn context(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

fn errno_error(path: &Path, what: &str, e: nix::errno::Errno) -> io::Error {
    let e = io::Error::from(e);
    if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
        return problem(
            path,
            &format!("{what}: is a symlink, refusing to follow it"),
        );
    }
    context(path, what, e)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & PERM_MASK
    }

    fn private_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("secrets");
        ensure_private_dir(&dir).unwrap();
        (root, dir)
    }

    #[test]
    fn creates_dir_0700_and_files_with_exact_modes() {
        let (_root, dir) = private_dir();
        assert_eq!(mode_of(&dir), 0o700);
        // Idempotent on a good directory.
        ensure_private_dir(&dir).unwrap();

        write_private_file(&dir, "key.pem", b"secret").unwrap();
        assert_eq!(mode_of(&dir.join("key.pem")), 0o600);
        assert_eq!(read_private_file(&dir, "key.pem").unwrap(), b"secret");

        write_public_file(&dir, "cert.pem", b"public").unwrap();
        assert_eq!(mode_of(&dir.join("cert.pem")), 0o644);
        assert_eq!(std::fs::read(dir.join("cert.pem")).unwrap(), b"public");

        // Overwrite keeps the mode, replaces the content, leaves no temp files.
        write_private_file(&dir, "key.pem", b"secret2").unwrap();
        assert_eq!(read_private_file(&dir, "key.pem").unwrap(), b"secret2");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn symlinked_dir_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let real = root.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, Permissions::from_mode(0o700)).unwrap();
        let link = root.path().join("link");
        symlink(&real, &link).unwrap();

        let err = ensure_private_dir(&link).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(err.to_string().contains("link"), "{err}");
        let err = write_private_file(&link, "k", b"x").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!real.join("k").exists());
        assert!(read_private_file(&link, "k").is_err());
    }

    #[test]
    fn symlinked_file_is_not_read() {
        let (_root, dir) = private_dir();
        write_private_file(&dir, "real", b"secret").unwrap();
        symlink(dir.join("real"), dir.join("alias")).unwrap();
        let err = read_private_file(&dir, "alias").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn world_readable_file_at_final_name_is_replaced_by_0600() {
        let (_root, dir) = private_dir();
        let target = dir.join("key.pem");
        std::fs::write(&target, b"attacker").unwrap();
        std::fs::set_permissions(&target, Permissions::from_mode(0o666)).unwrap();
        let before = std::fs::metadata(&target).unwrap().ino();

        // Reading the planted world-readable file is refused.
        let err = read_private_file(&dir, "key.pem").unwrap_err();
        assert!(err.to_string().contains("0666"), "{err}");

        write_private_file(&dir, "key.pem", b"secret").unwrap();
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert_eq!(meta.mode() & PERM_MASK, 0o600);
        assert_ne!(
            meta.ino(),
            before,
            "a new inode, not the attacker's file rewritten"
        );
        assert_eq!(read_private_file(&dir, "key.pem").unwrap(), b"secret");
    }

    #[test]
    fn planted_symlinks_are_not_followed() {
        let (root, dir) = private_dir();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::fs::set_permissions(&victim, Permissions::from_mode(0o644)).unwrap();

        // A symlink at a temp-like path: O_EXCL|O_NOFOLLOW never opens it.
        symlink(&victim, dir.join(".key.pem.tmp")).unwrap();
        symlink(&victim, dir.join(".key.pem.tmp-0000000000000000")).unwrap();
        // A symlink at the final name is replaced by the rename, not written through.
        symlink(&victim, dir.join("key.pem")).unwrap();

        write_private_file(&dir, "key.pem", b"secret").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(mode_of(&victim), 0o644);
        let meta = std::fs::symlink_metadata(dir.join("key.pem")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & PERM_MASK, 0o600);
    }

    #[test]
    fn temp_creation_refuses_existing_names() {
        // Exercise the O_EXCL path directly: a planted file at the exact temp name makes
        // the open fail with EEXIST rather than reuse it.
        let (_root, dir) = private_dir();
        let handle = open_dir(&dir).unwrap();
        symlink("/etc/passwd", dir.join("planted")).unwrap();
        let err = openat(
            handle.as_fd(),
            "planted",
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o600),
        )
        .unwrap_err();
        assert_eq!(err, nix::errno::Errno::EEXIST);
    }

    #[test]
    fn dir_with_bad_mode_is_refused_and_not_repaired() {
        let root = tempfile::tempdir().unwrap();
        for mode in [0o755, 0o750, 0o701, 0o777] {
            let dir = root.path().join(format!("d{mode:o}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, Permissions::from_mode(mode)).unwrap();
            let err = ensure_private_dir(&dir).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
            assert!(err.to_string().contains(&format!("{mode:04o}")), "{err}");
            assert!(
                err.to_string().contains(&dir.display().to_string()),
                "{err}"
            );
            assert_eq!(mode_of(&dir), mode, "never chmod an existing directory");
            assert!(write_private_file(&dir, "k", b"x").is_err());
            assert!(!dir.join("k").exists());
        }
        // Public files need only a directory nobody else can write.
        let dir = root.path().join("d755");
        write_public_file(&dir, "bundle.pem", b"pub").unwrap();
        let dir = root.path().join("d777");
        assert!(write_public_file(&dir, "bundle.pem", b"pub").is_err());
    }

    #[test]
    fn non_directory_and_bad_parent_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = ensure_private_dir(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");

        let open = root.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, Permissions::from_mode(0o777)).unwrap();
        let err = ensure_private_dir(&open.join("secrets")).unwrap_err();
        assert!(err.to_string().contains("sticky"), "{err}");
        assert!(!open.join("secrets").exists());

        // Missing parents are not created.
        assert!(ensure_private_dir(&root.path().join("a/b")).is_err());
    }

    #[test]
    fn group_readable_secret_is_refused() {
        let (_root, dir) = private_dir();
        write_private_file(&dir, "key", b"s").unwrap();
        std::fs::set_permissions(dir.join("key"), Permissions::from_mode(0o640)).unwrap();
        let err = read_private_file(&dir, "key").unwrap_err();
        assert!(err.to_string().contains("0640"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let (_root, dir) = private_dir();
        for name in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert_eq!(
                write_private_file(&dir, name, b"x").unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{name:?}"
            );
        }
    }

    #[test]
    fn failed_write_leaves_previous_file_and_no_temp() {
        // Simulate a failure after the temp file exists: make the rename fail by putting
        // a non-empty directory at the final name.
        let (_root, dir) = private_dir();
        std::fs::create_dir(dir.join("busy")).unwrap();
        std::fs::write(dir.join("busy/inner"), b"").unwrap();
        assert!(write_private_file(&dir, "busy", b"new").is_err());
        assert!(dir.join("busy/inner").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
