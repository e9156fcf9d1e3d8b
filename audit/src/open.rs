//! Opening the file safely and finding where the sequence left off.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;
use serde::Deserialize;

use crate::AuditError;

/// How much of the end of an existing file is read to find the last sequence number.
pub(crate) const TAIL_BYTES: u64 = 64 * 1024;

/// An opened, checked audit file and where to continue in it.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The file, opened for appending (and reading).
    pub(crate) file: File,
    /// The sequence number of the next record.
    pub(crate) next_seq: u64,
    /// Whether the file is empty or ends with a newline (else the next record must start
    /// with one, after a line cut short by a crash).
    pub(crate) at_line_start: bool,
}

/// Opens (creating with mode 0600) and checks `path`, then reads its tail.
pub(crate) fn open_file(path: &Path) -> Result<Opened, AuditError> {
    // Refuse early, without opening, what is plainly not a regular file: opening a device
    // or FIFO can have side effects. The checks on the opened fd below are the ones that
    // count (this one races with renames).
    if let Ok(meta) = path.symlink_metadata() {
        if meta.file_type().is_symlink() {
            return Err(AuditError::Symlink { path: path.into() });
        }
        if !meta.file_type().is_file() {
            return Err(AuditError::NotRegularFile { path: path.into() });
        }
    }
    let flags = OFlag::O_RDWR
        | OFlag::O_APPEND
        | OFlag::O_CREAT
        | OFlag::O_NOFOLLOW
        | OFlag::O_CLOEXEC
        // Never block in open() on a FIFO swapped in after the check above; O_NONBLOCK has
        // no effect on the regular file we keep.
        | OFlag::O_NONBLOCK;
    let fd = open(path, flags, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|errno| match errno {
        Errno::ELOOP => AuditError::Symlink { path: path.into() },
        Errno::EISDIR | Errno::ENXIO => AuditError::NotRegularFile { path: path.into() },
        other => AuditError::Open {
            path: path.into(),
            source: other.into(),
        },
    })?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|source| AuditError::Open {
        path: path.into(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(AuditError::NotRegularFile { path: path.into() });
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(AuditError::WrongOwner {
            path: path.into(),
            owner: meta.uid(),
            expected: euid,
        });
    }
    if meta.mode() & 0o077 != 0 {
        return Err(AuditError::Permissions {
            path: path.into(),
            mode: meta.mode() & 0o7777,
        });
    }

    let len = meta.len();
    let start = len.saturating_sub(TAIL_BYTES);
    let mut tail = vec![0; usize::try_from(len - start).unwrap_or(0)];
    file.read_exact_at(&mut tail, start)
        .map_err(|source| AuditError::Read {
            path: path.into(),
            source,
        })?;
    let last = last_seq(&tail, start == 0);
    if last.is_none() && len > 0 {
        tracing::warn!(
            path = %path.display(),
            "no complete audit record in the last {} KiB of the audit log; numbering restarts at 1",
            TAIL_BYTES / 1024
        );
    }
    Ok(Opened {
        file,
        next_seq: last.map_or(1, |seq| seq.saturating_add(1)),
        at_line_start: tail.last().is_none_or(|&b| b == b'\n'),
    })
}

/// The `seq` of the last complete, parseable line of `tail` (the end of the file).
///
/// A line is complete when a newline ends it: a last line without one was cut short (a
/// crash mid-write) and is ignored, as are lines that do not parse. When `tail` does not
/// start at the beginning of the file, its first line may be a fragment and is ignored.
fn last_seq(tail: &[u8], whole_file: bool) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let end = tail.iter().rposition(|&b| b == b'\n')?;
    let lines: Vec<&[u8]> = tail.get(..end)?.split(|&b| b == b'\n').collect();
    let lines = if whole_file {
        &lines[..]
    } else {
        lines.get(1..).unwrap_or_default()
    };
    lines
        .iter()
        .rev()
        .find_map(|line| serde_json::from_slice::<Seq>(line).ok().map(|s| s.seq))
}

#[cfg(test)]
mod tests {
    use super::last_seq;

    #[test]
    fn last_seq_cases() {
        assert_eq!(last_seq(b"", true), None);
        assert_eq!(
            last_seq(b"{\"seq\":1}", true),
            None,
            "no newline: incomplete"
        );
        assert_eq!(last_seq(b"{\"seq\":1}\n", true), Some(1));
        assert_eq!(last_seq(b"{\"seq\":1}\n{\"seq\":2}\n{\"se", true), Some(2));
        assert_eq!(
            last_seq(b"{\"seq\":1}\n{\"seq\":2}\ngarbage\n", true),
            Some(2)
        );
        assert_eq!(
            last_seq(b"{\"seq\":7}\n", false),
            None,
            "first line may be a fragment"
        );
        assert_eq!(last_seq(b"{\"seq\":7}\n{\"seq\":8}\n", false), Some(8));
        assert_eq!(last_seq(b"{\"seq\":1}\n\n", true), Some(1));
    }
}
