//! Errors opening, flushing and syncing the audit log.

use std::io;
use std::path::PathBuf;

/// Why the audit log could not be opened or flushed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The path is a symbolic link; the audit log is never opened through one.
    #[error("audit log {path} is a symbolic link; refusing to follow it")]
    Symlink {
        /// The configured path.
        path: PathBuf,
    },
    /// The path exists and is not a regular file (a directory, FIFO, socket, device...).
    #[error("audit log {path} is not a regular file")]
    NotRegularFile {
        /// The configured path.
        path: PathBuf,
    },
    /// The file is owned by another user than the one this process runs as.
    #[error("audit log {path} is owned by uid {owner}, not by this process's uid {expected}")]
    WrongOwner {
        /// The configured path.
        path: PathBuf,
        /// The file's owner.
        owner: u32,
        /// This process's effective uid.
        expected: u32,
    },
    /// The file can be read or written by its group or by others.
    #[error(
        "audit log {path} has mode {mode:04o}: it must not be readable or writable by group \
         or other (chmod 600 it)"
    )]
    Permissions {
        /// The configured path.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// Opening or creating the file failed (e.g. its directory does not exist).
    #[error("cannot open audit log {path}")]
    Open {
        /// The configured path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading the end of an existing file (to continue the sequence) failed.
    #[error("cannot read the end of audit log {path}")]
    Read {
        /// The configured path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the audit log writer thread")]
    Spawn(#[source] io::Error),
    /// Writing or syncing queued records failed.
    #[error("cannot write audit log {path}")]
    Write {
        /// The configured path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The writer thread is gone (it should only stop when the last handle is dropped).
    #[error("the audit log writer thread has stopped")]
    Closed,
}
