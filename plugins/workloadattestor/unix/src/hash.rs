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
use nix::sys::statfs::fstatfs;
use tessera_plugin_sdk::{AttestError, Workload, WorkloadError};

use crate::config::NetworkFsHash;

/// Most cached hashes; when full an arbitrary entry is evicted.
pub(crate) const CACHE_CAPACITY: usize = 4096;

/// Read buffer size for hashing.
const CHUNK: usize = 64 * 1024;

/// `f_type` magic numbers of filesystems whose contents come from a file server or a
/// user-space daemon rather than the kernel (SECURITY.md §3.3 item 31): FUSE, NFS, CIFS,
/// SMB2, 9P, AFS, Ceph.
const NETWORK_FS_MAGICS: [u64; 7] = [
    0x6573_5546, // FUSE_SUPER_MAGIC
    0x6969,      // NFS_SUPER_MAGIC
    0xFF53_4D42, // CIFS_SUPER_MAGIC
    0xFE53_4D42, // SMB2_SUPER_MAGIC
    0x0102_1997, // V9FS_MAGIC
    0x5346_414F, // AFS_SUPER_MAGIC
    0x00C3_6400, // CEPH_SUPER_MAGIC
];

/// Whether `f_type` (from `statfs`) names a FUSE or network filesystem. Only the low 32
/// bits are compared: `f_type` is a signed word on some ABIs, and every magic is 32 bits.
pub(crate) fn is_network_fs(fs_type: u64) -> bool {
    NETWORK_FS_MAGICS.contains(&(fs_type & 0xFFFF_FFFF))
}

/// SECURITY.md §3.3 item 30: the file hashed must be the file stat'ed before the read,
/// byte for byte as many as it said. A write in between changes mtime/ctime (or the
/// size), so the hash is refused rather than attributed to the wrong version.
fn ensure_unchanged(
    before: &FileKey,
    after: &FileKey,
    read: u64,
    size: u64,
) -> Result<(), AttestError> {
    if before != after || read != size {
        return Err(AttestError::BinaryChanged);
    }
    Ok(())
}

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
    network_fs: NetworkFsHash,
    cache: Mutex<HashMap<FileKey, [u8; 32]>>,
}

impl fmt::Debug for ExeHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = self.cache.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("ExeHasher")
            .field("limit", &self.limit)
            .field("network_fs", &self.network_fs)
            .field("cached", &cached)
            .finish()
    }
}

impl ExeHasher {
    pub(crate) fn new(limit: u64, network_fs: NetworkFsHash) -> Self {
        Self {
            limit,
            network_fs,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// SHA-256 of the running image of `workload`, or `None` when the image is on a
    /// FUSE or network filesystem and the policy is [`NetworkFsHash::Omit`].
    ///
    /// `cacheable` is false for executables without a stable file behind them (memfd,
    /// deleted files): those are always hashed in full. So are executables on network
    /// filesystems, whose attributes (the cache key) come from the file server.
    pub(crate) fn hash(
        &self,
        workload: &Workload,
        cacheable: bool,
    ) -> Result<Option<[u8; 32]>, AttestError> {
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
        let fs = fstatfs(fd.as_fd()).map_err(|errno| exe_error(workload, "statfs", errno))?;
        #[allow(
            clippy::cast_sign_loss,
            clippy::unnecessary_cast,
            reason = "f_type is a signed or unsigned word depending on the ABI; only its low 32 bits are a magic"
        )]
        let fs_type = fs.filesystem_type().0 as u64;
        let network = is_network_fs(fs_type);
        if network {
            let omit = self.network_fs == NetworkFsHash::Omit;
            tracing::info!(
                pid = workload.pid(),
                fs_type = format_args!("{fs_type:#x}"),
                policy = if omit { "omit" } else { "allow" },
                "executable on a FUSE or network filesystem (network_fs_hash)"
            );
            if omit {
                return Ok(None);
            }
        }
        let cacheable = cacheable && !network;
        let key = FileKey::from(&before);
        if cacheable && let Some(hash) = self.cached(&key) {
            return Ok(Some(hash));
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
        ensure_unchanged(&key, &FileKey::from(&after), read, size)?;
        if cacheable {
            self.insert(key, hash);
        }
        Ok(Some(hash))
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

    /// Item 30, the decision itself. (The race cannot be staged for real: Linux refuses
    /// to open a running executable for writing, ETXTBSY, which the scenario below also
    /// shows; the check guards filesystems and kernels that allow it.)
    #[test]
    fn a_file_changed_while_hashed_is_refused() {
        let key = |mtime_nsec, size| FileKey {
            dev: 1,
            ino: 2,
            size,
            mtime_sec: 3,
            mtime_nsec,
            ctime_sec: 3,
            ctime_nsec: mtime_nsec,
        };
        assert!(ensure_unchanged(&key(0, 10), &key(0, 10), 10, 10).is_ok());
        assert!(matches!(
            ensure_unchanged(&key(0, 10), &key(5, 10), 10, 10),
            Err(AttestError::BinaryChanged)
        ));
        assert!(matches!(
            ensure_unchanged(&key(0, 10), &key(0, 12), 10, 10),
            Err(AttestError::BinaryChanged)
        ));
        assert!(matches!(
            ensure_unchanged(&key(0, 10), &key(0, 10), 9, 10),
            Err(AttestError::BinaryChanged)
        ));
    }

    #[test]
    fn a_running_executable_cannot_be_opened_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleepy");
        std::fs::copy(tessera_plugin_sdk::testing::sleep_binary(), &copy).unwrap();
        let mut child = std::process::Command::new(&copy).arg("30").spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/exe", child.id()))
            .ok()
            .as_deref()
            != Some(copy.as_path())
        {
            assert!(std::time::Instant::now() < deadline, "child did not exec");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::ETXTBSY as i32));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn cache_is_bounded() {
        let h = ExeHasher::new(10, NetworkFsHash::Omit);
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

    /// The classification of `f_type` values. A real FUSE or NFS mount is not available
    /// in the test environment (no `/dev/fuse`, no NFS server), so the `network_fs_hash`
    /// path of [`ExeHasher::hash`] is covered only through this pure function and the
    /// local-filesystem tests, which must keep their hash.
    #[test]
    fn classifies_network_filesystems() {
        for magic in [
            0x6573_5546_u64,
            0x6969,
            0xFF53_4D42,
            0xFE53_4D42,
            0x0102_1997,
            0x5346_414F,
            0x00C3_6400,
        ] {
            assert!(is_network_fs(magic), "{magic:#x}");
        }
        // A sign-extended 32-bit magic (f_type as a negative signed word) still counts.
        assert!(is_network_fs(0xFFFF_FFFF_FF53_4D42));
        for local in [
            0xEF53_u64,  // ext4
            0x5846_5342, // xfs
            0x9123_683E, // btrfs
            0x0102_1994, // tmpfs
            0x794C_7630, // overlayfs
            0x2FC1_2FC1, // zfs
            0x9FA0,      // proc
            0,
        ] {
            assert!(!is_network_fs(local), "{local:#x}");
        }
    }
}
