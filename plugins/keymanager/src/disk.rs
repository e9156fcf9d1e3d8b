//! The `disk` key manager: one PKCS#8 DER file per key, `<directory>/<id>.key`, mode
//! `0600`, in a directory of mode `0700` owned by the server's effective uid.
//!
//! Rules (SECURITY.md §2 rule 8, §3.5 items 50-51):
//!
//! - [`DiskKeyManager::open`] creates the directory (`0700`) or checks it: a real
//!   directory (not a symlink), owned by the effective uid, no group or other permission
//!   bits, in a parent nobody else can rename it out of. A directory that fails is
//!   refused with an error naming it, never repaired.
//! - `open` loads and parses every key once; keys then stay parsed in memory. A key file
//!   is opened with `O_NOFOLLOW` and must be a regular file owned by the effective uid
//!   with no group or other permission bits; anything else (a symlink, a FIFO, a
//!   world-readable file someone planted) makes `open` fail. Such a file is never read,
//!   repaired or written through.
//! - Every write goes to a new temporary file `.<id>.key.tmp-<32 random hex>` created
//!   with `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC` mode `0600` in the same directory; it is
//!   written, `fsync`ed, checked with `fstat` (regular, ours, exactly `0600`, one link,
//!   full length), renamed over `<id>.key` and the directory is `fsync`ed. Readers see
//!   the old key or the new one. A failed write (disk full) removes the temporary file
//!   and leaves the previous key file and the in-memory key untouched.
//! - All file operations are relative to the directory descriptor opened by `open`, so
//!   replacing the directory path later (rename, symlink) does not redirect them; the
//!   descriptor's owner and mode are checked again before each write.
//!
//! One process per directory: files added by others after `open` are not seen, and two
//! servers sharing a directory would overwrite each other's keys.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat, renameat};
use nix::sys::stat::Mode;
use nix::unistd::{UnlinkatFlags, geteuid, unlinkat};
use tessera_plugin_sdk::keymanager::{
    KeyManager, KeyManagerError, KeyType, SigningKey, validate_key_id,
};

use crate::blocking;
use crate::software::{SecretBytes, SoftwareKey};

/// The plugin name (`kind = "disk"`).
pub const NAME: &str = "disk";
/// The default key directory, under the server's `data_dir`.
pub const DEFAULT_DIRECTORY_NAME: &str = "keys";
/// The suffix of key files: the key `<id>` is stored in `<id>.key`.
pub const KEY_FILE_SUFFIX: &str = ".key";
/// Largest key file `open` reads (a PKCS#8 RSA-4096 key is about 2.4 KiB).
pub const MAX_KEY_FILE_SIZE: u64 = 64 * 1024;

/// Between the key file name and the random part of a temporary file name.
const TEMP_MARKER: &str = ".tmp-";
/// Random bytes in a temporary name (printed as twice as many hex digits).
const TEMP_RANDOM_BYTES: usize = 16;
/// How many fresh temporary names one write tries before giving up.
const TEMP_ATTEMPTS: u32 = 8;
/// Permission bits of `st_mode`.
const PERM_MASK: u32 = 0o7777;
/// Group and other permission bits.
const GROUP_OTHER: u32 = 0o077;
/// The mode of key files.
const KEY_FILE_MODE: u32 = 0o600;

/// Keys in PKCS#8 files in one private directory. See the [module docs](self).
pub struct DiskKeyManager {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The key directory, opened `O_DIRECTORY|O_NOFOLLOW` once; every file operation is
    /// relative to it.
    dir_fd: File,
    keys: RwLock<BTreeMap<String, Arc<SoftwareKey>>>,
    /// Serialises writes and deletes so the file and the in-memory key of an id always
    /// agree (the last writer wins in both).
    write_lock: Mutex<()>,
}

impl fmt::Debug for DiskKeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("DiskKeyManager")
            .field("directory", &self.inner.dir)
            .field("keys", &keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl DiskKeyManager {
    /// Open the key directory `dir`, creating it with mode `0700` if it does not exist
    /// (its parent must), and load every key in it.
    ///
    /// Fails with [`KeyManagerError::Insecure`] if the directory or a key file fails a
    /// permission or ownership check, [`KeyManagerError::InvalidKeyFile`] if a key file
    /// cannot be parsed, and [`KeyManagerError::Unavailable`] on I/O errors. Leftover
    /// temporary files of interrupted writes are removed; other files that are not
    /// `<valid id>.key` are ignored with a warning.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self, KeyManagerError> {
        let dir = dir.into();
        let inner = blocking(move || Inner::open(dir)).await?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The key directory, as given to [`open`](Self::open).
    pub fn directory(&self) -> &Path {
        &self.inner.dir
    }
}

#[async_trait]
impl KeyManager for DiskKeyManager {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn generate_key(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> Result<Arc<dyn SigningKey>, KeyManagerError> {
        validate_key_id(id)?;
        let inner = Arc::clone(&self.inner);
        let id = id.to_owned();
        // The whole operation runs on one blocking thread: if the caller stops waiting,
        // it still completes, and the file and the in-memory key stay in agreement.
        blocking(move || inner.generate(&id, key_type)).await
    }

    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn SigningKey>>, KeyManagerError> {
        validate_key_id(id)?;
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(keys.get(id).map(|k| Arc::clone(k) as Arc<dyn SigningKey>))
    }

    async fn list_keys(&self) -> Result<Vec<Arc<dyn SigningKey>>, KeyManagerError> {
        let keys = self
            .inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(keys
            .values()
            .map(|k| Arc::clone(k) as Arc<dyn SigningKey>)
            .collect())
    }

    async fn delete_key(&self, id: &str) -> Result<bool, KeyManagerError> {
        validate_key_id(id)?;
        let inner = Arc::clone(&self.inner);
        let id = id.to_owned();
        blocking(move || inner.delete(&id)).await
    }
}

/// Why a key file write failed: before the rename (nothing changed) or after it (the new
/// key is in place but the directory `fsync` failed, so it may not survive a crash).
enum WriteFailure {
    NotWritten(KeyManagerError),
    NotDurable(KeyManagerError),
}

impl Inner {
    fn open(dir: PathBuf) -> Result<Self, KeyManagerError> {
        tessera_plugin_sdk::fs::ensure_private_dir(&dir).map_err(|e| dir_error(&dir, e))?;
        let dir_fd = open_dir(&dir)?;
        check_dir(&dir, &dir_fd)?;
        let keys = load_keys(&dir, &dir_fd)?;
        tracing::info!(
            directory = %dir.display(),
            keys = keys.len(),
            "disk key manager opened"
        );
        Ok(Self {
            dir,
            dir_fd,
            keys: RwLock::new(keys),
            write_lock: Mutex::new(()),
        })
    }

    fn generate(
        &self,
        id: &str,
        key_type: KeyType,
    ) -> Result<Arc<dyn SigningKey>, KeyManagerError> {
        // Generate outside the lock: RSA keys take a while.
        let (key, pkcs8) = SoftwareKey::generate(id, key_type)?;
        let key = Arc::new(key);
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match self.write_key_file(id, &pkcs8) {
            Ok(()) => {
                self.install(id, &key);
                tracing::info!(key_id = id, %key_type, directory = %self.dir.display(), "stored a new key");
                Ok(key)
            }
            Err(WriteFailure::NotWritten(error)) => Err(error),
            Err(WriteFailure::NotDurable(error)) => {
                // The rename happened: the file holds the new key, so memory must too.
                self.install(id, &key);
                Err(error)
            }
        }
    }

    fn install(&self, id: &str, key: &Arc<SoftwareKey>) {
        // The map only ever holds complete keys, so a poisoned lock is still consistent.
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), Arc::clone(key));
    }

    fn delete(&self, id: &str) -> Result<bool, KeyManagerError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let name = key_file_name(id);
        let path = self.dir.join(&name);
        // unlinkat removes a symlink itself, never its target.
        let on_disk = match unlinkat(
            self.dir_fd.as_fd(),
            name.as_str(),
            UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => true,
            Err(Errno::ENOENT) => false,
            Err(e) => {
                return Err(io_error(
                    format!("cannot delete key file {}", path.display()),
                    e.into(),
                ));
            }
        };
        let in_memory = self
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id)
            .is_some();
        if on_disk {
            self.dir_fd.sync_all().map_err(|e| {
                io_error(
                    format!(
                        "deleted {} but cannot fsync the key directory",
                        path.display()
                    ),
                    e,
                )
            })?;
            tracing::info!(key_id = id, directory = %self.dir.display(), "deleted a key");
        }
        Ok(on_disk || in_memory)
    }

    /// Atomically replace `<id>.key` with `pkcs8`. See the module docs for the steps.
    fn write_key_file(&self, id: &str, pkcs8: &SecretBytes) -> Result<(), WriteFailure> {
        check_dir(&self.dir, &self.dir_fd).map_err(WriteFailure::NotWritten)?;
        let name = key_file_name(id);
        let path = self.dir.join(&name);
        let (tmp_name, file) =
            create_temp(&self.dir, self.dir_fd.as_fd(), &name).map_err(WriteFailure::NotWritten)?;
        let tmp_path = self.dir.join(&tmp_name);
        let written = fill_temp(file, &tmp_path, &path, pkcs8.as_bytes()).and_then(|()| {
            renameat(
                self.dir_fd.as_fd(),
                tmp_name.as_str(),
                self.dir_fd.as_fd(),
                name.as_str(),
            )
            .map_err(|e| {
                io_error(
                    format!(
                        "cannot rename {} over {}",
                        tmp_path.display(),
                        path.display()
                    ),
                    e.into(),
                )
            })
        });
        if let Err(error) = written {
            if let Err(e) = unlinkat(
                self.dir_fd.as_fd(),
                tmp_name.as_str(),
                UnlinkatFlags::NoRemoveDir,
            ) {
                // Harmless: 0600, never read, and removed by the next `open`.
                tracing::warn!(file = %tmp_path.display(), error = %e, "cannot remove a temporary key file");
            }
            return Err(WriteFailure::NotWritten(error));
        }
        self.dir_fd.sync_all().map_err(|e| {
            WriteFailure::NotDurable(io_error(
                format!(
                    "wrote {} but cannot fsync the key directory; the new key may not survive a crash",
                    path.display()
                ),
                e,
            ))
        })
    }
}

/// `<id>.key`.
fn key_file_name(id: &str) -> String {
    format!("{id}{KEY_FILE_SUFFIX}")
}

/// Create `.<name>.tmp-<random>` in `dir_fd` with `O_EXCL|O_NOFOLLOW`, mode `0600`,
/// trying new random names if one exists (including a planted file or symlink).
fn create_temp(
    dir: &Path,
    dir_fd: BorrowedFd<'_>,
    name: &str,
) -> Result<(String, File), KeyManagerError> {
    for _ in 0..TEMP_ATTEMPTS {
        let mut random = [0u8; TEMP_RANDOM_BYTES];
        aws_lc_rs::rand::fill(&mut random).map_err(|_| KeyManagerError::Unavailable {
            context: "the system random number generator failed".to_owned(),
            source: None,
        })?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let tmp_name = format!(".{name}{TEMP_MARKER}{suffix}");
        match open_exclusive(dir_fd, &tmp_name) {
            Ok(fd) => return Ok((tmp_name, File::from(fd))),
            Err(Errno::EEXIST) => {
                tracing::warn!(file = %dir.join(&tmp_name).display(), "a temporary key file name already exists; trying another");
            }
            Err(e) => {
                return Err(io_error(
                    format!("cannot create a temporary key file in {}", dir.display()),
                    e.into(),
                ));
            }
        }
    }
    Err(KeyManagerError::Insecure {
        path: dir.to_owned(),
        problem: format!(
            "{TEMP_ATTEMPTS} random temporary file names in a row already existed; refusing to write"
        ),
    })
}

/// Create `name` in `dir_fd`: `O_CREAT|O_EXCL|O_NOFOLLOW|O_WRONLY|O_CLOEXEC`, mode `0600`.
/// Fails with `EEXIST` if anything (a file, a symlink) is already there.
fn open_exclusive(dir_fd: BorrowedFd<'_>, name: &str) -> nix::Result<OwnedFd> {
    openat(
        dir_fd,
        name,
        OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_NOFOLLOW
            | OFlag::O_WRONLY
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        Mode::from_bits_truncate(KEY_FILE_MODE),
    )
}

/// Write `contents` to the new temporary file, `fsync` it, and check with `fstat` that it
/// is what we meant to create before it is renamed into place.
fn fill_temp(
    mut file: File,
    tmp_path: &Path,
    key_path: &Path,
    contents: &[u8],
) -> Result<(), KeyManagerError> {
    let failed = |what: &str, e: io::Error| {
        io_error(
            format!(
                "cannot write key file {} ({what} {})",
                key_path.display(),
                tmp_path.display()
            ),
            e,
        )
    };
    // The umask may have cleared bits of 0600; set the exact mode on the descriptor.
    file.set_permissions(Permissions::from_mode(KEY_FILE_MODE))
        .map_err(|e| failed("chmod", e))?;
    file.write_all(contents).map_err(|e| failed("write", e))?;
    file.sync_all().map_err(|e| failed("fsync", e))?;
    let meta = file.metadata().map_err(|e| failed("fstat", e))?;
    let euid = geteuid().as_raw();
    let mode = meta.mode() & PERM_MASK;
    let problem = if !meta.file_type().is_file() {
        Some("is not a regular file".to_owned())
    } else if meta.uid() != euid {
        Some(format!("is owned by uid {}, not {euid}", meta.uid()))
    } else if mode != KEY_FILE_MODE {
        Some(format!("has mode {mode:04o}, not 0600"))
    } else if meta.nlink() != 1 {
        Some(format!("has {} links, not 1", meta.nlink()))
    } else if meta.len() != contents.len() as u64 {
        Some(format!(
            "is {} bytes long, not {}",
            meta.len(),
            contents.len()
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(KeyManagerError::Insecure {
            path: tmp_path.to_owned(),
            problem: format!("temporary key file {problem}; refusing to use it"),
        }),
    }
}

/// Open the key directory without following a symlink.
fn open_dir(dir: &Path) -> Result<File, KeyManagerError> {
    match open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(File::from(fd)),
        // With O_DIRECTORY|O_NOFOLLOW Linux reports a symlink as ENOTDIR or ELOOP.
        Err(Errno::ELOOP | Errno::ENOTDIR) => Err(KeyManagerError::Insecure {
            path: dir.to_owned(),
            problem: "is a symlink or not a directory; refusing to use it as the key directory"
                .to_owned(),
        }),
        Err(e) => Err(io_error(
            format!("cannot open key directory {}", dir.display()),
            e.into(),
        )),
    }
}

/// The opened key directory is a directory owned by the effective uid with no group or
/// other permission bits.
fn check_dir(dir: &Path, dir_fd: &File) -> Result<(), KeyManagerError> {
    let meta = dir_fd
        .metadata()
        .map_err(|e| io_error(format!("cannot fstat key directory {}", dir.display()), e))?;
    let euid = geteuid().as_raw();
    let mode = meta.mode() & PERM_MASK;
    let problem = if !meta.is_dir() {
        Some("is not a directory".to_owned())
    } else if meta.uid() != euid {
        Some(format!(
            "is owned by uid {} but this process runs as uid {euid}",
            meta.uid()
        ))
    } else if mode & GROUP_OTHER != 0 {
        Some(format!(
            "has mode {mode:04o}; the key directory must not be accessible by group or others (want 0700)"
        ))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(KeyManagerError::Insecure {
            path: dir.to_owned(),
            problem,
        }),
    }
}

/// What a name in the key directory is.
#[derive(Debug, PartialEq, Eq)]
enum DirEntry<'a> {
    /// `<id>.key` with a valid id.
    Key(&'a str),
    /// `.<id>.key.tmp-<hex>`: left by an interrupted write.
    Temp,
    /// Anything else.
    Other,
}

fn classify(name: &str) -> DirEntry<'_> {
    if let Some(id) = name.strip_suffix(KEY_FILE_SUFFIX) {
        if validate_key_id(id).is_ok() {
            return DirEntry::Key(id);
        }
        return DirEntry::Other;
    }
    let temp = name.strip_prefix('.').and_then(|rest| {
        let (key_name, random) = rest.rsplit_once(TEMP_MARKER)?;
        let id = key_name.strip_suffix(KEY_FILE_SUFFIX)?;
        let hex = random.len() == 2 * TEMP_RANDOM_BYTES
            && random
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        (hex && validate_key_id(id).is_ok()).then_some(())
    });
    match temp {
        Some(()) => DirEntry::Temp,
        None => DirEntry::Other,
    }
}

/// Load every `<id>.key` in the directory; remove leftover temporary files.
fn load_keys(
    dir: &Path,
    dir_fd: &File,
) -> Result<BTreeMap<String, Arc<SoftwareKey>>, KeyManagerError> {
    let list_error = |e: rustix::io::Errno| {
        io_error(
            format!("cannot list key directory {}", dir.display()),
            e.into(),
        )
    };
    // Reads through a new descriptor for "." relative to `dir_fd`, not the path.
    let listing = rustix::fs::Dir::read_from(dir_fd).map_err(list_error)?;
    let mut names: Vec<String> = Vec::new();
    for entry in listing {
        let entry = entry.map_err(list_error)?;
        match entry.file_name().to_str() {
            Ok("." | "..") => {}
            Ok(name) => names.push(name.to_owned()),
            Err(_) => tracing::warn!(
                directory = %dir.display(),
                name = %entry.file_name().to_string_lossy(),
                "ignoring a file with a non-UTF-8 name in the key directory"
            ),
        }
    }
    let mut keys = BTreeMap::new();
    for name in &names {
        match classify(name) {
            DirEntry::Key(id) => {
                let key = load_key(dir, dir_fd.as_fd(), id)?;
                keys.insert(id.to_owned(), Arc::new(key));
            }
            DirEntry::Temp => {
                match unlinkat(dir_fd.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => tracing::warn!(
                        file = %dir.join(name).display(),
                        "removed a temporary key file left by an interrupted write"
                    ),
                    Err(e) => tracing::warn!(
                        file = %dir.join(name).display(),
                        error = %e,
                        "cannot remove a leftover temporary key file"
                    ),
                }
            }
            DirEntry::Other => tracing::warn!(
                file = %dir.join(name).display(),
                "ignoring a file that is not <key id>.key in the key directory"
            ),
        }
    }
    Ok(keys)
}

/// Read and parse `<id>.key`: opened with `O_NOFOLLOW`, checked with `fstat`.
fn load_key(dir: &Path, dir_fd: BorrowedFd<'_>, id: &str) -> Result<SoftwareKey, KeyManagerError> {
    let name = key_file_name(id);
    let path = dir.join(&name);
    let insecure = |problem: String| KeyManagerError::Insecure {
        path: path.clone(),
        problem,
    };
    let fd = match openat(
        dir_fd,
        name.as_str(),
        // O_NONBLOCK: a FIFO planted at the name must not block the open.
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => {
            return Err(insecure(
                "is a symlink; a key file is never followed".to_owned(),
            ));
        }
        Err(e) => {
            return Err(io_error(
                format!("cannot open key file {}", path.display()),
                e.into(),
            ));
        }
    };
    let mut file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| io_error(format!("cannot fstat key file {}", path.display()), e))?;
    let euid = geteuid().as_raw();
    let mode = meta.mode() & PERM_MASK;
    if !meta.file_type().is_file() {
        return Err(insecure("is not a regular file".to_owned()));
    }
    if meta.uid() != euid {
        return Err(insecure(format!(
            "is owned by uid {} but this process runs as uid {euid}",
            meta.uid()
        )));
    }
    if mode & GROUP_OTHER != 0 {
        return Err(insecure(format!(
            "has mode {mode:04o}; a key file must not be accessible by group or others (want 0600)"
        )));
    }
    if meta.len() > MAX_KEY_FILE_SIZE {
        return Err(KeyManagerError::InvalidKeyFile {
            path,
            reason: format!("larger than {MAX_KEY_FILE_SIZE} bytes"),
        });
    }
    // Sized up front so the buffer holding the key is never reallocated (and copied).
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut bytes = SecretBytes::new(Vec::with_capacity(capacity));
    (&mut file)
        .take(MAX_KEY_FILE_SIZE + 1)
        .read_to_end(bytes.as_vec_mut())
        .map_err(|e| io_error(format!("cannot read key file {}", path.display()), e))?;
    if bytes.as_bytes().len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(KeyManagerError::InvalidKeyFile {
            path,
            reason: format!("larger than {MAX_KEY_FILE_SIZE} bytes"),
        });
    }
    SoftwareKey::from_pkcs8(id, bytes.as_bytes())
        .map_err(|reason| KeyManagerError::InvalidKeyFile { path, reason })
}

/// An error of `ensure_private_dir` as a key manager error.
fn dir_error(dir: &Path, e: io::Error) -> KeyManagerError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        let message = e.to_string();
        let prefix = format!("{}: ", dir.display());
        let problem = message.strip_prefix(&prefix).unwrap_or(&message).to_owned();
        KeyManagerError::Insecure {
            path: dir.to_owned(),
            problem,
        }
    } else {
        io_error(format!("cannot prepare key directory {}", dir.display()), e)
    }
}

/// An I/O failure: the key manager is unavailable. `context` names the file.
fn io_error(context: String, source: io::Error) -> KeyManagerError {
    KeyManagerError::Unavailable {
        context: format!("{context}: {source}"),
        source: Some(source),
    }
}

#[cfg(test)]
mod tests;
