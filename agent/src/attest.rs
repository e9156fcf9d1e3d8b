//! Runs every configured workload attestor for one caller, concurrently, on blocking
//! threads (they read `/proc`), under one deadline, and caches the result per pinned
//! process instance. Any attestor error fails the whole attestation: a partial selector
//! set could match a less specific entry.
//!
//! The cache ([`Attestors::resolve`]) is keyed by the process instance (pid, start time)
//! and the credentials the socket reported; an entry holds its own pidfd and is dropped
//! as soon as that pidfd becomes readable (the process exited), so it can never serve a
//! recycled pid. Every use re-validates it cheaply: the caller is alive, and the
//! fingerprint (the `exe` inode, the credential lines of `status`, the `cgroup` file) is
//! the one seen at attestation; a changed fingerprint (an `execve`, a credential change,
//! a cgroup move) runs the attestors again. The cache is bounded: at capacity, exited
//! entries go first, then the least recently used.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tessera_plugin_sdk::workload::pidfd_is_alive;
use tessera_plugin_sdk::{Selector, Workload, WorkloadAttestor, WorkloadError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Most cached process instances (each holds a pidfd); lowered to a quarter of the
/// open-file limit when that is smaller.
pub const DEFAULT_CACHE_CAPACITY: usize = 16 * 1024;
/// Number of attestation gates: concurrent attestations of one process instance wait
/// for the first instead of repeating it.
const GATES: usize = 256;
/// Largest `status` / `cgroup` file read for the fingerprint.
const FINGERPRINT_FILE_LIMIT: usize = 1 << 20;

/// Why a caller could not be attested. The message is for the agent's log; callers
/// only learn that attestation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationFailure {
    /// An attestor failed.
    #[error("attestor {attestor}: {reason}")]
    Attestor {
        /// The attestor's name.
        attestor: String,
        /// Its error.
        reason: String,
    },
    /// The deadline passed.
    #[error("workload attestation timed out after {0:?}")]
    Timeout(Duration),
    /// The caller has exited (zombies included).
    #[error("the caller is no longer running")]
    Exited,
    /// A `/proc` file of the caller needed to identify the process instance cannot be
    /// read (e.g. `exe` without the permission to inspect the process).
    #[error("cannot inspect the caller: {0}")]
    Inspect(#[source] WorkloadError),
    /// The process changed (exec, credentials, cgroup) while it was being attested.
    #[error("the caller changed while it was being attested")]
    Changed,
}

impl AttestationFailure {
    /// True when the agent lacks the permission to inspect the caller (`EACCES` or
    /// `EPERM` on its `/proc` files, e.g. `exe` of another user's process for a
    /// non-root agent).
    pub fn is_permission_problem(&self) -> bool {
        match self {
            Self::Inspect(WorkloadError::Io { source, .. }) => matches!(
                source.raw_os_error().map(Errno::from_raw),
                Some(Errno::EACCES | Errno::EPERM)
            ),
            _ => false,
        }
    }
}

/// The pinned process of one connection plus what is read about it once.
#[derive(Debug)]
pub struct PinnedCaller {
    workload: Arc<Workload>,
    start_time: OnceLock<u64>,
}

impl PinnedCaller {
    /// Wraps a process pinned at accept.
    pub fn new(workload: Workload) -> Self {
        Self {
            workload: Arc::new(workload),
            start_time: OnceLock::new(),
        }
    }

    /// The pinned process.
    pub fn workload(&self) -> &Arc<Workload> {
        &self.workload
    }

    /// Whether the pinned process is still running (`false` on any error).
    pub fn is_alive(&self) -> bool {
        matches!(self.workload.is_alive(), Ok(true))
    }

    /// Start time (clock ticks since boot), read once per connection (by the first
    /// attestation, so later calls do not touch `/proc`).
    pub fn start_time(&self) -> Result<u64, WorkloadError> {
        if let Some(&t) = self.start_time.get() {
            return Ok(t);
        }
        let t = self.workload.start_time()?;
        Ok(*self.start_time.get_or_init(|| t))
    }
}

/// A caller's selectors, and a token cancelled when the attested process exits.
#[derive(Debug, Clone)]
pub struct Attested {
    /// Sorted, deduplicated selectors.
    pub selectors: Arc<[Selector]>,
    /// Cancelled once the process is seen to exit (while the result is cached).
    pub exited: CancellationToken,
    /// True when the attestors ran for this result (false: served from the cache), so
    /// that each attestation is audited once.
    pub fresh: bool,
}

/// One process instance as seen through one socket's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ProcessKey {
    pid: i32,
    start_time: u64,
    uid: u32,
    gid: u32,
}

/// What must not change for a cached attestation to stay valid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    exe: (u64, u64),
    /// SHA-256 of the `Uid:`, `Gid:`, `Groups:` lines of `status` and of `cgroup`.
    digest: [u8; 32],
}

#[derive(Debug)]
struct Probe {
    key: ProcessKey,
    fingerprint: Fingerprint,
}

/// The configured attestors and their per-process cache.
#[derive(Debug, Clone)]
pub struct Attestors {
    plugins: Vec<Arc<dyn WorkloadAttestor>>,
    timeout: Duration,
    cache: Arc<AttestationCache>,
}

impl Attestors {
    /// `plugins` run concurrently; all must finish within `timeout`. The cache holds at
    /// most [`DEFAULT_CACHE_CAPACITY`] processes (fewer under a low open-file limit).
    pub fn new(plugins: Vec<Arc<dyn WorkloadAttestor>>, timeout: Duration) -> Self {
        Self::with_capacity(plugins, timeout, default_capacity())
    }

    /// [`Attestors::new`] with an explicit cache capacity (0 disables the cache).
    pub fn with_capacity(
        plugins: Vec<Arc<dyn WorkloadAttestor>>,
        timeout: Duration,
        capacity: usize,
    ) -> Self {
        Self {
            plugins,
            timeout,
            cache: Arc::new(AttestationCache::new(capacity)),
        }
    }

    /// The union of every attestor's selectors, sorted and deduplicated (no cache).
    pub async fn attest(
        &self,
        workload: Arc<Workload>,
    ) -> Result<Vec<Selector>, AttestationFailure> {
        tokio::time::timeout(self.timeout, self.run(workload))
            .await
            .map_err(|_| AttestationFailure::Timeout(self.timeout))?
    }

    /// The caller's selectors: from the cache when this process instance was attested
    /// before and has not changed since, else by running the attestors (once, however
    /// many calls of the same process ask at the same time). Fails when the caller has
    /// exited.
    pub async fn resolve(
        &self,
        caller: &Arc<PinnedCaller>,
    ) -> Result<Attested, AttestationFailure> {
        let before = probe(caller).await?;
        if let Some(hit) = self.cache.lookup(&before) {
            return Ok(hit);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timed_out = |_| AttestationFailure::Timeout(self.timeout);
        let gate = self.cache.gate(&before.key);
        let _turn = tokio::time::timeout_at(deadline, gate.lock())
            .await
            .map_err(timed_out)?;
        if let Some(hit) = self.cache.lookup(&before) {
            return Ok(hit);
        }
        let selectors = tokio::time::timeout_at(deadline, self.run(Arc::clone(&caller.workload)))
            .await
            .map_err(timed_out)??;
        let after = probe(caller).await?;
        if after.fingerprint != before.fingerprint || after.key != before.key {
            return Err(AttestationFailure::Changed);
        }
        Ok(self.cache.insert(after, selectors.into(), &caller.workload))
    }

    /// Processes cached now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Drops every cached entry and stops their exit watchers (agent shutdown).
    pub fn close(&self) {
        self.cache.close();
    }

    async fn run(&self, workload: Arc<Workload>) -> Result<Vec<Selector>, AttestationFailure> {
        let mut tasks = JoinSet::new();
        for plugin in &self.plugins {
            let plugin = Arc::clone(plugin);
            let workload = Arc::clone(&workload);
            tasks.spawn_blocking(move || {
                let name = plugin.name().to_owned();
                (name, plugin.attest(&workload))
            });
        }
        let mut selectors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (attestor, result) = joined.map_err(|err| AttestationFailure::Attestor {
                attestor: "?".into(),
                reason: err.to_string(),
            })?;
            match result {
                Ok(found) => selectors.extend(found),
                Err(err) => {
                    return Err(AttestationFailure::Attestor {
                        attestor,
                        reason: err.to_string(),
                    });
                }
            }
        }
        selectors.sort();
        selectors.dedup();
        Ok(selectors)
    }
}

fn default_capacity() -> usize {
    let by_files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft / 4).unwrap_or(usize::MAX))
        .unwrap_or(DEFAULT_CACHE_CAPACITY);
    DEFAULT_CACHE_CAPACITY.min(by_files)
}

/// Liveness, instance key and fingerprint of the caller, read on a blocking thread.
async fn probe(caller: &Arc<PinnedCaller>) -> Result<Probe, AttestationFailure> {
    let caller = Arc::clone(caller);
    tokio::task::spawn_blocking(move || probe_blocking(&caller))
        .await
        .map_err(|err| AttestationFailure::Attestor {
            attestor: "?".into(),
            reason: err.to_string(),
        })?
}

fn probe_blocking(caller: &PinnedCaller) -> Result<Probe, AttestationFailure> {
    let inspect = |err: WorkloadError| match err {
        WorkloadError::ProcessExited => AttestationFailure::Exited,
        err => AttestationFailure::Inspect(err),
    };
    if !caller.is_alive() {
        return Err(AttestationFailure::Exited);
    }
    let w = &caller.workload;
    let start_time = caller.start_time().map_err(inspect)?;
    let exe = w.exe_inode().map_err(inspect)?;
    let status = w
        .read_proc_file("status", FINGERPRINT_FILE_LIMIT)
        .map_err(inspect)?;
    let cgroup = w
        .read_proc_file("cgroup", FINGERPRINT_FILE_LIMIT)
        .map_err(inspect)?;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for line in status.split(|&b| b == b'\n') {
        if line.starts_with(b"Uid:") || line.starts_with(b"Gid:") || line.starts_with(b"Groups:") {
            ctx.update(line);
            ctx.update(b"\n");
        }
    }
    ctx.update(b"\0cgroup\0");
    ctx.update(&cgroup);
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ctx.finish().as_ref());
    // A zombie's files can still be read: liveness once more, after the reads.
    if !caller.is_alive() {
        return Err(AttestationFailure::Exited);
    }
    Ok(Probe {
        key: ProcessKey {
            pid: w.pid(),
            start_time,
            uid: w.uid(),
            gid: w.gid(),
        },
        fingerprint: Fingerprint { exe, digest },
    })
}

#[derive(Debug)]
struct CacheEntry {
    id: u64,
    selectors: Arc<[Selector]>,
    fingerprint: Fingerprint,
    pidfd: OwnedFd,
    last_used: u64,
    exited: CancellationToken,
    watch: Arc<ExitWatch>,
}

impl Drop for CacheEntry {
    fn drop(&mut self) {
        // The pidfd is a duplicate: its open file description may outlive it (the
        // connection holds the original), so deregister explicitly.
        let _ = self.watch.epoll.delete(self.pidfd.as_fd());
    }
}

#[derive(Debug, Default)]
struct CacheState {
    entries: HashMap<ProcessKey, CacheEntry>,
    by_id: HashMap<u64, ProcessKey>,
}

impl CacheState {
    fn remove(&mut self, key: &ProcessKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.by_id.remove(&entry.id);
        }
    }
}

/// The epoll instance the exit-watcher thread waits on: every cached pidfd (one-shot,
/// its entry id as data) plus an eventfd that wakes the thread to stop.
#[derive(Debug)]
struct ExitWatch {
    epoll: Epoll,
    wake: EventFd,
}

/// Epoll data of the wake-up eventfd (entry ids start at 0 and never reach it).
const WAKE: u64 = u64::MAX;

/// Attestation results per process instance; see the module documentation.
#[derive(Debug)]
struct AttestationCache {
    capacity: usize,
    state: Arc<Mutex<CacheState>>,
    gates: Box<[tokio::sync::Mutex<()>]>,
    clock: AtomicU64,
    closed: CancellationToken,
    /// `None` when no watcher could be started: nothing is cached then.
    watch: Option<Arc<ExitWatch>>,
}

fn lock(state: &Mutex<CacheState>) -> MutexGuard<'_, CacheState> {
    // Every update is a single insert or remove: a poisoned map is still consistent.
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AttestationCache {
    fn new(capacity: usize) -> Self {
        let state = Arc::new(Mutex::new(CacheState::default()));
        let closed = CancellationToken::new();
        let watch = if capacity == 0 {
            None
        } else {
            match start_exit_watcher(Arc::downgrade(&state), closed.clone()) {
                Ok(watch) => Some(watch),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot watch for caller exits: attestation results are not cached");
                    None
                }
            }
        };
        Self {
            capacity,
            state,
            gates: (0..GATES).map(|_| tokio::sync::Mutex::new(())).collect(),
            clock: AtomicU64::new(0),
            closed,
            watch,
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn len(&self) -> usize {
        lock(&self.state).entries.len()
    }

    fn gate(&self, key: &ProcessKey) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash as _, Hasher as _};
        // Fixed keys are fine: a collision only makes two attestations take turns.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % GATES as u64).unwrap_or(0);
        &self.gates[index % self.gates.len()]
    }

    /// The cached result for this probe, if still valid.
    fn lookup(&self, probe: &Probe) -> Option<Attested> {
        let now = self.tick();
        let mut state = lock(&self.state);
        let entry = state.entries.get_mut(&probe.key)?;
        // The entry's own pidfd being live proves its pid was not recycled, so it
        // describes the same process as the caller's (same pid, same start time).
        let same = entry.fingerprint == probe.fingerprint
            && matches!(pidfd_is_alive(entry.pidfd.as_fd()), Ok(true));
        if !same {
            state.remove(&probe.key);
            return None;
        }
        entry.last_used = now;
        Some(Attested {
            selectors: Arc::clone(&entry.selectors),
            exited: entry.exited.clone(),
            fresh: false,
        })
    }

    /// Caches `selectors` for the probed process (holding a duplicate of its pidfd,
    /// watched for exit) and returns them.
    fn insert(&self, probe: Probe, selectors: Arc<[Selector]>, workload: &Workload) -> Attested {
        let exited = CancellationToken::new();
        let attested = Attested {
            selectors: Arc::clone(&selectors),
            exited: exited.clone(),
            fresh: true,
        };
        let Some(watch) = &self.watch else {
            return attested;
        };
        if self.closed.is_cancelled() {
            return attested;
        }
        let pidfd = match workload.pidfd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(err) => {
                tracing::debug!(error = %err, "cannot duplicate the caller's pidfd; not caching");
                return attested;
            }
        };
        let id = self.tick();
        let mut state = lock(&self.state);
        state.remove(&probe.key);
        if state.entries.len() >= self.capacity {
            make_room(&mut state, self.capacity);
        }
        let event = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, id);
        if let Err(err) = watch.epoll.add(pidfd.as_fd(), event) {
            tracing::debug!(error = %err, "cannot watch the caller's pidfd; not caching");
            return attested;
        }
        state.by_id.insert(id, probe.key);
        state.entries.insert(
            probe.key,
            CacheEntry {
                id,
                selectors,
                fingerprint: probe.fingerprint,
                pidfd,
                last_used: id,
                exited,
                watch: Arc::clone(watch),
            },
        );
        attested
    }

    fn close(&self) {
        if !self.closed.is_cancelled() {
            self.closed.cancel();
            if let Some(watch) = &self.watch {
                let _ = watch.wake.write(1);
            }
        }
        let mut state = lock(&self.state);
        state.entries.clear();
        state.by_id.clear();
    }
}

impl Drop for AttestationCache {
    fn drop(&mut self) {
        self.close();
    }
}

/// Frees one slot: exited processes first, else the least recently used entry.
fn make_room(state: &mut CacheState, capacity: usize) {
    let dead: Vec<ProcessKey> = state
        .entries
        .iter()
        .filter(|(_, e)| !matches!(pidfd_is_alive(e.pidfd.as_fd()), Ok(true)))
        .map(|(k, _)| *k)
        .collect();
    for key in &dead {
        state.remove(key);
    }
    if state.entries.len() < capacity {
        return;
    }
    if let Some(oldest) = state
        .entries
        .iter()
        .min_by_key(|(_, e)| e.last_used)
        .map(|(k, _)| *k)
    {
        state.remove(&oldest);
    }
}

/// Starts the thread that drops cache entries whose process exited (their pidfd
/// became readable) and cancels their `exited` token. It stops when the cache is closed
/// or dropped.
fn start_exit_watcher(
    state: Weak<Mutex<CacheState>>,
    closed: CancellationToken,
) -> std::io::Result<Arc<ExitWatch>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
    let watch = Arc::new(ExitWatch { epoll, wake });
    let thread_watch = Arc::clone(&watch);
    std::thread::Builder::new()
        .name("tessera-exit-watch".into())
        .spawn(move || watch_exits(&thread_watch, &state, &closed))?;
    Ok(watch)
}

fn watch_exits(watch: &ExitWatch, state: &Weak<Mutex<CacheState>>, closed: &CancellationToken) {
    let mut events = [EpollEvent::empty(); 64];
    loop {
        let ready = match watch.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::error!(error = %err, "caller exit watcher failed; cached attestations now expire only on use");
                return;
            }
        };
        if closed.is_cancelled() {
            return;
        }
        let Some(state) = state.upgrade() else { return };
        let mut state = lock(&state);
        for event in events.iter().take(ready) {
            let id = event.data();
            if id == WAKE {
                let _ = watch.wake.read();
                continue;
            }
            if let Some(key) = state.by_id.remove(&id)
                && let Some(entry) = state.entries.remove(&key)
            {
                entry.exited.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::AtomicUsize;
    use tessera_plugin_sdk::AttestError;

    /// Counts its calls; answers `unix:uid:<uid>` after `delay`.
    #[derive(Debug, Default)]
    struct Counting {
        calls: AtomicUsize,
        delay: Duration,
    }

    impl WorkloadAttestor for Counting {
        fn name(&self) -> &str {
            "counting"
        }

        fn attest(&self, workload: &Workload) -> Result<Vec<Selector>, AttestError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            Ok(vec![
                Selector::new("unix", &format!("uid:{}", workload.uid())).unwrap(),
            ])
        }
    }

    fn spawn(program: &str, args: &[&str]) -> Child {
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn wait_for_exe(child: &Child, name: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let exe = std::fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
            if exe
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(name))
            {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{exe:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn pin(child: &Child) -> Arc<PinnedCaller> {
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = tessera_plugin_sdk::workload::pidfd_open(pid).unwrap();
        Arc::new(PinnedCaller::new(
            Workload::pin(
                pid,
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
                pidfd,
                false,
                std::path::Path::new("/proc"),
            )
            .unwrap(),
        ))
    }

    fn attestors(counting: &Arc<Counting>, capacity: usize) -> Attestors {
        Attestors::with_capacity(
            vec![Arc::clone(counting) as Arc<dyn WorkloadAttestor>],
            Duration::from_secs(5),
            capacity,
        )
    }

    fn reap(mut child: Child) {
        let _ = child.kill();
        let _ = child.wait();
    }

    #[tokio::test]
    async fn repeated_calls_and_connections_attest_once() {
        let counting = Arc::new(Counting::default());
        let a = attestors(&counting, 16);
        let child = spawn("sleep", &["30"]);
        wait_for_exe(&child, "sleep");
        let first = pin(&child);
        for _ in 0..5 {
            a.resolve(&first).await.unwrap();
        }
        // A second connection of the same process shares the entry.
        let second = pin(&child);
        let got = a.resolve(&second).await.unwrap();
        assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
        assert_eq!(got.selectors.len(), 1);
        assert_eq!(a.cached(), 1);
        reap(child);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_calls_share_one_attestation() {
        let counting = Arc::new(Counting {
            delay: Duration::from_millis(200),
            ..Counting::default()
        });
        let a = attestors(&counting, 16);
        let child = spawn("sleep", &["30"]);
        wait_for_exe(&child, "sleep");
        let caller = pin(&child);
        let mut set = JoinSet::new();
        for _ in 0..8 {
            let a = a.clone();
            let caller = Arc::clone(&caller);
            set.spawn(async move { a.resolve(&caller).await.map(|r| r.selectors.len()) });
        }
        while let Some(r) = set.join_next().await {
            assert_eq!(r.unwrap().unwrap(), 1);
        }
        assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
        reap(child);
    }

    #[tokio::test]
    async fn exit_drops_the_entry_and_fires_the_token() {
        let counting = Arc::new(Counting::default());
        let a = attestors(&counting, 16);
        let child = spawn("sleep", &["30"]);
        wait_for_exe(&child, "sleep");
        let caller = pin(&child);
        let got = a.resolve(&caller).await.unwrap();
        assert_eq!(a.cached(), 1);
        let mut child = child;
        child.kill().unwrap();
        // Zombie (not reaped): the pidfd is readable already.
        tokio::time::timeout(Duration::from_secs(5), got.exited.cancelled())
            .await
            .expect("exit noticed");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while a.cached() != 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let err = a.resolve(&caller).await.unwrap_err();
        assert!(matches!(err, AttestationFailure::Exited), "{err:?}");
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn exec_of_another_binary_attests_again() {
        let counting = Arc::new(Counting::default());
        let a = attestors(&counting, 16);
        // A shell that execs `sleep` when told to.
        let mut child = spawn("sh", &["-c", "read x; exec sleep 30"]);
        wait_for_exe(&child, "dash");
        let caller = pin(&child);
        a.resolve(&caller).await.unwrap();
        a.resolve(&caller).await.unwrap();
        assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
        use std::io::Write as _;
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        wait_for_exe(&child, "sleep");
        a.resolve(&caller).await.unwrap();
        assert_eq!(counting.calls.load(Ordering::SeqCst), 2, "exec noticed");
        assert_eq!(a.cached(), 1);
        reap(child);
    }

    #[tokio::test]
    async fn capacity_evicts_the_least_recently_used() {
        let counting = Arc::new(Counting::default());
        let a = attestors(&counting, 2);
        let children: Vec<Child> = (0..3).map(|_| spawn("sleep", &["30"])).collect();
        for c in &children {
            wait_for_exe(c, "sleep");
        }
        let callers: Vec<_> = children.iter().map(pin).collect();
        a.resolve(&callers[0]).await.unwrap();
        a.resolve(&callers[1]).await.unwrap();
        a.resolve(&callers[0]).await.unwrap(); // 1 is now the oldest
        a.resolve(&callers[2]).await.unwrap();
        assert_eq!(a.cached(), 2);
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3);
        a.resolve(&callers[0]).await.unwrap();
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3, "0 stayed cached");
        a.resolve(&callers[1]).await.unwrap();
        assert_eq!(counting.calls.load(Ordering::SeqCst), 4, "1 was evicted");
        a.close();
        assert_eq!(a.cached(), 0);
        for c in children {
            reap(c);
        }
    }

    #[tokio::test]
    async fn attestor_errors_fail_and_are_not_cached() {
        #[derive(Debug)]
        struct Failing;
        impl WorkloadAttestor for Failing {
            fn name(&self) -> &str {
                "failing"
            }
            fn attest(&self, _: &Workload) -> Result<Vec<Selector>, AttestError> {
                Err(AttestError::Failed("no".into()))
            }
        }
        let a = Attestors::with_capacity(vec![Arc::new(Failing)], Duration::from_secs(5), 4);
        let child = spawn("sleep", &["30"]);
        wait_for_exe(&child, "sleep");
        let caller = pin(&child);
        let err = a.resolve(&caller).await.unwrap_err();
        assert!(
            matches!(err, AttestationFailure::Attestor { .. }),
            "{err:?}"
        );
        assert_eq!(a.cached(), 0);
        reap(child);
    }
}
