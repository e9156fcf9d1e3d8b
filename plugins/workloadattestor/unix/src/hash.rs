//! Hashing the running executable of a pinned process through `/proc/<pid>/exe`, with a
//! bounded read, fstat before and after, and a bounded cache keyed by file identity
//! (SECURITY.md §2 rule 2, §3.3).

use std::collections::HashMap;
use std::fmt;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::sync::Mutex;

use aws_lc_rs::digest;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use tessera_plugin_sdk::{AttestError, Workload, WorkloadError};

/// Most cached hashes; when full an arbitrary entry is evicted.
pub(crate) const CACHE_CAPACITY: usize = 4096;

/// Read buffer size for hashing.
const CHUNK: usize = 64 * 1024;

/// The identity of one version of a file: (dev, ino, size, mtime, ctime). A write changes
/// mtime and ctime, and ctime cannot be set from user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ctime_sec: i64,
    ctime_nsec: i64,
}

impl From<&FileStat> for FileKey {
    fn from(st: &FileStat) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
            ctime_sec: st.st_ctime,
            ctime_nsec: st.st_ctime_nsec,
        }
    }
}

/// Hashes executables and remembers the result per [`FileKey`].
pub(crate) struct ExeHasher {
    limit: u64,
    cache: Mutex<HashMap<FileKey, [u8; 32]>>,
}

impl fmt::Debug for ExeHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.cache.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("ExeHasher")
            .field("limit", &self.limit)
            .field("cached", &cached)
            .finish()
    }
}

impl ExeHasher {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// SHA-256 of the running image of `workload`.
    ///
    /// `cacheable` is false for executables without a stable file behind them (memfd,
    /// deleted files): those are always hashed in full.
    pub(crate) fn hash(
        &self,
        workload: &Workload,
        cacheable: bool,
    ) -> Result<[u8; 32], AttestError> {
        // Follows the magic link to the running inode, even when deleted or a memfd.
        let fd = openat(
            workload.proc_dir(),
            "exe",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| exe_error(workload, "open", errno))?;
        let before = fstat(fd.as_fd()).map_err(|errno| exe_error(workload, "stat", errno))?;
        if SFlag::from_bits_truncate(before.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(AttestError::Failed(
                "executable is not a regular file".to_owned(),
            ));
        }
        let key = FileKey::from(&before);
        if cacheable && let Some(hash) = self.cached(&key) {
            return Ok(hash);
        }
        let size = u64::try_from(before.st_size)
            .map_err(|_| AttestError::Failed("executable has a negative size".to_owned()))?;
        if size > self.limit {
            return Err(AttestError::BinaryTooLarge {
                size,
                limit: self.limit,
            });
        }
        let file = std::fs::File::from(fd);
        let (hash, read) = self.read_bounded(workload, &file)?;
        let after = fstat(file.as_fd()).map_err(|errno| exe_error(workload, "stat", errno))?;
        if FileKey::from(&after) != key || read != size {
            return Err(AttestError::BinaryChanged);
        }
        if cacheable {
            self.insert(key, hash);
        }
        Ok(hash)
    }

    /// Reads at most `limit + 1` bytes of `file`; returns the digest and the bytes read.
    fn read_bounded(
        &self,
        workload: &Workload,
        file: &std::fs::File,
    ) -> Result<([u8; 32], u64), AttestError> {
        let mut reader = file.take(self.limit.saturating_add(1));
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut total: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(WorkloadError::Io {
                        what: format!("read /proc/{}/exe", workload.pid()),
                        source,
                    }
                    .into());
                }
            };
            ctx.update(buf.get(..n).unwrap_or_default());
            total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        }
        if total > self.limit {
            // Grew while being read.
            return Err(AttestError::BinaryTooLarge {
                size: total,
                limit: self.limit,
            });
        }
        let digest = ctx.finish();
        let out: [u8; 32] = digest
            .as_ref()
            .try_into()
            .map_err(|_| AttestError::Failed("unexpected digest length".to_owned()))?;
        Ok((out, total))
    }

    fn cached(&self, key: &FileKey) -> Option<[u8; 32]> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).copied()
    }

    fn insert(&self, key: FileKey, hash: [u8; 32]) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_CAPACITY
            && !cache.contains_key(&key)
            && let Some(victim) = cache.keys().next().copied()
        {
            cache.remove(&victim);
        }
        cache.insert(key, hash);
    }

    #[cfg(test)]
    pub(crate) fn cached_len(&self) -> usize {
        self.cache.lock().map(|c| c.len()).unwrap_or_default()
    }
}

fn exe_error(workload: &Workload, op: &str, errno: Errno) -> AttestError {
    if errno == Errno::ESRCH {
        return WorkloadError::ProcessExited.into();
    }
    WorkloadError::Io {
        what: format!("{op} /proc/{}/exe", workload.pid()),
        source: errno.into(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded() {
        let h = ExeHasher::new(10);
        for i in 0..(CACHE_CAPACITY as u64 + 100) {
            let key = FileKey {
                dev: 1,
                ino: i,
                size: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                ctime_sec: 0,
                ctime_nsec: 0,
            };
            h.insert(key, [0; 32]);
            assert!(h.cached_len() <= CACHE_CAPACITY);
        }
        assert_eq!(h.cached_len(), CACHE_CAPACITY);
    }
}
