//! Templated identities: entries whose SPIFFE ID holds `{instance}`, `{uid}` or
//! `{systemd_unit}` give each caller its own ID, rendered from facts about the caller
//! ([`CallerFacts`]), never from anything it says.
//!
//! An identity is keyed by (entry id, rendered SPIFFE ID) ([`IdentityKey`]) and held by
//! the live processes it was rendered for: one process for `{instance}`, possibly several
//! for `{uid}` or `{systemd_unit}`. [`Instances::acquire`] registers a caller as a
//! holder; the first caller that needs the X.509-SVID starts the identity's task, which
//! mints it with one server round trip (callers arriving meanwhile wait on the same
//! `watch` channel, so they cause no second signing), renews it at about half-life while
//! a holder lives, and backs off while the server fails. Each holder's pinned pidfd is
//! watched ([`tokio::io::unix::AsyncFd`]: a pidfd becomes readable when its process
//! exits); when the last holder exits the identity is dropped from memory at once, with
//! its key, its JWT-SVIDs and an `instance_dropped` audit record, and it is never
//! renewed again (its task also re-checks liveness before every signing).
//!
//! Revocations and entry changes come from the cache ([`Instances::follow`]): a revoked
//! identity is dropped and refused to the processes that held it for as long as they
//! live, even after the revocation itself is forgotten; an identity of a changed or
//! deleted entry is dropped, and callers that still match acquire it again.
//!
//! Memory is bounded: at most `max_instance_identities` identities and as many holder
//! processes; beyond that [`AcquireError::Exhausted`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tessera_audit::{AgentEvent, AuditLog};
use tessera_plugin_sdk::template::instance_value;
use tessera_plugin_sdk::workload::pidfd_is_alive;
use tessera_plugin_sdk::{
    Placeholder, RegistrationEntry, Selector, SpiffeId, TemplateValues, Workload, WorkloadError,
};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::attest::PinnedCaller;
use crate::backoff::{Backoff, MAX_BACKOFF};
use crate::cache::{CacheSnapshot, RevokedSet, WorkloadSvid};
use crate::jwt_cache::JwtCache;
use crate::manager::build_svid;
use crate::signer::{Signer, new_workload_key};

/// Default `max_instance_identities`.
pub const DEFAULT_MAX_INSTANCE_IDENTITIES: usize = 10_000;
/// Most signings of templated identities in flight at once.
const MAX_SIGNINGS_IN_FLIGHT: usize = 32;
/// How often a process whose pidfd cannot be watched is polled for liveness.
const LIVENESS_POLL: Duration = Duration::from_millis(250);

/// One process instance while it lives: pid, start time (clock ticks since boot) and
/// pidfs inode (Linux >= 6.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId {
    /// Process id in the agent's pid namespace.
    pub pid: i32,
    /// `stat` field 22.
    pub start_time: u64,
    /// Inode of its pidfd on pidfs, when the kernel has pidfs.
    pub pidfs_inode: Option<u64>,
}

/// One templated identity: the entry and the SPIFFE ID rendered for a caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey {
    /// The entry's id.
    pub entry_id: String,
    /// The rendered SPIFFE ID.
    pub spiffe_id: SpiffeId,
}

/// The facts a caller's placeholder values come from, gathered once per evaluation.
#[derive(Debug, Clone)]
pub struct CallerFacts {
    process: ProcessId,
    workload: Arc<Workload>,
    values: TemplateValues,
    /// Why a placeholder has no value (no raw selector value in these texts: they reach
    /// the operational log).
    missing: BTreeMap<Placeholder, &'static str>,
}

impl CallerFacts {
    /// The values of every placeholder for `caller` with `selectors`:
    /// `{instance}` from the boot id, pid, start time and pidfs inode of the pinned
    /// process; `{uid}` from `SO_PEERCRED`; `{systemd_unit}` from the caller's single
    /// `systemd:unit:` selector, when it is a valid path segment.
    pub fn gather(
        boot_id: Option<&str>,
        caller: &PinnedCaller,
        selectors: &[Selector],
    ) -> Result<Self, WorkloadError> {
        let workload = Arc::clone(caller.workload());
        let process = ProcessId {
            pid: workload.pid(),
            start_time: caller.start_time()?,
            pidfs_inode: workload.pidfs_inode(),
        };
        let mut values = TemplateValues::new();
        let mut missing = BTreeMap::new();
        match boot_id {
            Some(boot_id) => {
                let value = instance_value(
                    boot_id,
                    process.pid,
                    process.start_time,
                    process.pidfs_inode,
                );
                if values.set(Placeholder::Instance, value).is_err() {
                    missing.insert(Placeholder::Instance, "the instance value is malformed");
                }
            }
            None => {
                missing.insert(
                    Placeholder::Instance,
                    "the agent could not read the boot id at start",
                );
            }
        }
        if values
            .set(Placeholder::Uid, workload.uid().to_string())
            .is_err()
        {
            missing.insert(Placeholder::Uid, "the caller's uid is malformed");
        }
        let mut units = selectors
            .iter()
            .filter(|s| s.kind() == "systemd")
            .filter_map(|s| s.value().strip_prefix("unit:"))
            .collect::<Vec<_>>();
        units.dedup();
        match units.as_slice() {
            [] => {
                missing.insert(
                    Placeholder::SystemdUnit,
                    "the caller has no systemd:unit selector",
                );
            }
            [unit] => {
                if values
                    .set(Placeholder::SystemdUnit, (*unit).to_owned())
                    .is_err()
                {
                    missing.insert(
                        Placeholder::SystemdUnit,
                        "the caller's systemd unit is not a valid SPIFFE ID path segment \
                         ([A-Za-z0-9._-], at most 255 bytes)",
                    );
                }
            }
            _ => {
                missing.insert(
                    Placeholder::SystemdUnit,
                    "the caller has several systemd:unit selectors",
                );
            }
        }
        Ok(Self {
            process,
            workload,
            values,
            missing,
        })
    }

    /// The process these facts describe.
    pub fn process(&self) -> ProcessId {
        self.process
    }

    /// Every placeholder value this caller has.
    pub fn values(&self) -> &TemplateValues {
        &self.values
    }

    /// `entry`'s SPIFFE ID for this caller, or why the entry does not apply to it (a
    /// placeholder without a valid value: never an escaped or truncated ID).
    pub fn render(&self, entry: &Arc<RegistrationEntry>) -> Result<Rendered, String> {
        let template = &entry.spiffe_id;
        for placeholder in template.placeholders() {
            if self.values.get(placeholder).is_none() {
                let why = self
                    .missing
                    .get(&placeholder)
                    .copied()
                    .unwrap_or("no value");
                return Err(format!("{{{}}} has no value: {why}", placeholder.name()));
            }
        }
        let values = self.values.restricted_to(template);
        let spiffe_id = template
            .render(&values)
            .map_err(|err| format!("cannot render the SPIFFE ID: {err}"))?;
        let instance = template
            .is_per_instance()
            .then(|| values.get(Placeholder::Instance).map(str::to_owned))
            .flatten();
        Ok(Rendered {
            entry: Arc::clone(entry),
            key: IdentityKey {
                entry_id: entry.id.clone(),
                spiffe_id,
            },
            values,
            instance,
        })
    }
}

/// A templated entry rendered for one caller.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The entry, as it was when rendered.
    pub entry: Arc<RegistrationEntry>,
    /// Entry id and rendered ID.
    pub key: IdentityKey,
    /// The values the template uses (what the server gets to render the ID itself).
    pub values: TemplateValues,
    /// The `{instance}` value, when the template has one.
    pub instance: Option<String>,
}

/// What the holders of one identity see.
#[derive(Debug, Clone, Default)]
pub struct SlotState {
    /// The current X.509-SVID, once minted.
    pub svid: Option<Arc<WorkloadSvid>>,
    /// Why the server refused to sign the identity (it does not apply meanwhile; asked
    /// again later).
    pub refused: Option<String>,
    /// The identity was dropped (its holders exited, it was revoked, its entry changed):
    /// acquire it again.
    pub dropped: bool,
    /// The last signing attempt failed (the server could not be reached, or failed) and
    /// is retried with backoff: without a valid SVID, callers are served their other
    /// identities, or get `Unavailable`, rather than wait.
    pub failing: bool,
}

/// Why [`Instances::acquire`] did not register the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The identity is revoked (now, or earlier for this process).
    #[error("identity revoked")]
    Revoked,
    /// `max_instance_identities` identities or holder processes are held.
    #[error("too many templated identities held by this agent")]
    Exhausted,
    /// The caller has exited.
    #[error("the caller is no longer running")]
    Exited,
    /// The caller's pidfd could not be duplicated, or the agent is stopping.
    #[error("{0}")]
    Unavailable(String),
}

/// The agent's templated identities; cheap to clone.
#[derive(Clone)]
pub struct Instances {
    inner: Arc<Inner>,
}

impl fmt::Debug for Instances {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (identities, processes) = self.len();
        f.debug_struct("Instances")
            .field("identities", &identities)
            .field("processes", &processes)
            .field("max", &self.inner.max)
            .finish_non_exhaustive()
    }
}

struct Inner {
    max: usize,
    boot_id: Option<Arc<str>>,
    signer: Arc<dyn Signer>,
    jwts: Arc<JwtCache>,
    audit: AuditLog<AgentEvent>,
    state: Mutex<State>,
    signings: Semaphore,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct State {
    identities: HashMap<IdentityKey, Identity>,
    processes: HashMap<ProcessId, Process>,
    closed: bool,
}

struct Identity {
    entry_revision: u64,
    holders: BTreeSet<ProcessId>,
    state: Arc<watch::Sender<SlotState>>,
    /// Set while the X.509 task runs; cancelling it stops the task.
    x509: Option<CancellationToken>,
}

struct Process {
    /// A duplicate of the pinned pidfd, for liveness checks.
    pidfd: OwnedFd,
    identities: BTreeSet<IdentityKey>,
    /// Identities revoked while this process held them: refused to it for its life.
    revoked: BTreeSet<SpiffeId>,
    /// Stops its exit watcher.
    stop: CancellationToken,
}

impl Process {
    fn idle(&self) -> bool {
        self.identities.is_empty() && self.revoked.is_empty()
    }

    fn alive(&self) -> bool {
        matches!(pidfd_is_alive(self.pidfd.as_fd()), Ok(true))
    }
}

/// An identity removed under the lock; reported (state, JWTs, audit) after it.
struct Dropped {
    key: IdentityKey,
    pid: i32,
    reason: &'static str,
    state: Arc<watch::Sender<SlotState>>,
}

impl State {
    /// Removes a process that exited, and every identity only it held.
    fn remove_process(&mut self, id: &ProcessId, reason: &'static str, out: &mut Vec<Dropped>) {
        let Some(process) = self.processes.remove(id) else {
            return;
        };
        process.stop.cancel();
        for key in process.identities {
            let Some(identity) = self.identities.get_mut(&key) else {
                continue;
            };
            identity.holders.remove(id);
            if identity.holders.is_empty()
                && let Some(identity) = self.identities.remove(&key)
            {
                if let Some(task) = &identity.x509 {
                    task.cancel();
                }
                out.push(Dropped {
                    key,
                    pid: id.pid,
                    reason,
                    state: identity.state,
                });
            }
        }
    }

    /// Removes an identity whatever its holders (revoked: remembered by each holder).
    fn remove_identity(
        &mut self,
        key: &IdentityKey,
        reason: &'static str,
        revoked: bool,
        out: &mut Vec<Dropped>,
    ) {
        let Some(identity) = self.identities.remove(key) else {
            return;
        };
        if let Some(task) = &identity.x509 {
            task.cancel();
        }
        let pid = identity.holders.iter().next().map_or(0, |p| p.pid);
        for holder in &identity.holders {
            if let Some(process) = self.processes.get_mut(holder) {
                process.identities.remove(key);
                if revoked {
                    process.revoked.insert(key.spiffe_id.clone());
                }
            }
            self.forget_if_idle(holder);
        }
        out.push(Dropped {
            key: key.clone(),
            pid,
            reason,
            state: identity.state,
        });
    }

    fn forget_if_idle(&mut self, id: &ProcessId) {
        if self.processes.get(id).is_some_and(Process::idle)
            && let Some(process) = self.processes.remove(id)
        {
            process.stop.cancel();
        }
    }
}

impl Instances {
    /// An empty set: at most `max` identities (and holder processes); `boot_id` feeds
    /// `{instance}` (`None`: entries using it do not apply). Everything is dropped when
    /// `shutdown` is cancelled.
    pub fn new(
        max: usize,
        boot_id: Option<String>,
        signer: Arc<dyn Signer>,
        jwts: Arc<JwtCache>,
        audit: AuditLog<AgentEvent>,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            max,
            boot_id: boot_id.map(Arc::from),
            signer,
            jwts,
            audit,
            state: Mutex::new(State::default()),
            signings: Semaphore::new(MAX_SIGNINGS_IN_FLIGHT),
            shutdown: shutdown.clone(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if let Some(inner) = weak.upgrade() {
                inner.close();
            }
        });
        Self { inner }
    }

    /// The caller's placeholder values.
    pub fn facts(
        &self,
        caller: &PinnedCaller,
        selectors: &[Selector],
    ) -> Result<CallerFacts, WorkloadError> {
        CallerFacts::gather(self.inner.boot_id.as_deref(), caller, selectors)
    }

    /// Registers the caller of `facts` as a holder of `rendered` and returns the
    /// identity's state. With `want_x509`, the identity's X.509-SVID is minted now if
    /// nobody asked for it before (one round trip, shared by every caller waiting on the
    /// returned channel). Never blocks.
    pub fn acquire(
        &self,
        facts: &CallerFacts,
        rendered: &Rendered,
        want_x509: bool,
        revoked: &RevokedSet,
    ) -> Result<watch::Receiver<SlotState>, AcquireError> {
        let key = &rendered.key;
        if revoked.is_revoked(&key.spiffe_id, SystemTime::now()) {
            return Err(AcquireError::Revoked);
        }
        if !matches!(facts.workload.is_alive(), Ok(true)) {
            return Err(AcquireError::Exited);
        }
        let mut dropped = Vec::new();
        let result = self.acquire_locked(facts, rendered, want_x509, &mut dropped);
        self.inner.report(dropped);
        result
    }

    fn acquire_locked(
        &self,
        facts: &CallerFacts,
        rendered: &Rendered,
        want_x509: bool,
        dropped: &mut Vec<Dropped>,
    ) -> Result<watch::Receiver<SlotState>, AcquireError> {
        let key = &rendered.key;
        let id = facts.process;
        let mut state = self.inner.lock();
        if state.closed {
            return Err(AcquireError::Unavailable("the agent is stopping".into()));
        }
        // A process of the same id whose pidfd is dead has exited (a pid reused within one
        // clock tick, on a kernel without pidfs): it is not this caller.
        if state.processes.get(&id).is_some_and(|p| !p.alive()) {
            state.remove_process(&id, "exited", dropped);
        }
        // Held from an older revision of the entry (the cache follower has not dropped it
        // yet): replace it.
        if state
            .identities
            .get(key)
            .is_some_and(|identity| identity.entry_revision < rendered.entry.revision)
        {
            state.remove_identity(key, "entry changed", false, dropped);
        }
        if !state.processes.contains_key(&id) {
            if state.processes.len() >= self.inner.max {
                return Err(AcquireError::Exhausted);
            }
            let duplicate = || {
                facts
                    .workload
                    .pidfd()
                    .try_clone_to_owned()
                    .map_err(|err| AcquireError::Unavailable(format!("pidfd: {err}")))
            };
            let pidfd = duplicate()?;
            let watched = duplicate()?;
            let stop = CancellationToken::new();
            tokio::spawn(watch_process(
                Arc::downgrade(&self.inner),
                id,
                watched,
                stop.clone(),
            ));
            state.processes.insert(
                id,
                Process {
                    pidfd,
                    identities: BTreeSet::new(),
                    revoked: BTreeSet::new(),
                    stop,
                },
            );
        }
        if state
            .processes
            .get(&id)
            .is_some_and(|p| p.revoked.contains(&key.spiffe_id))
        {
            return Err(AcquireError::Revoked);
        }
        if !state.identities.contains_key(key) {
            if state.identities.len() >= self.inner.max {
                state.forget_if_idle(&id);
                return Err(AcquireError::Exhausted);
            }
            state.identities.insert(
                key.clone(),
                Identity {
                    entry_revision: rendered.entry.revision,
                    holders: BTreeSet::new(),
                    state: Arc::new(watch::channel(SlotState::default()).0),
                    x509: None,
                },
            );
        }
        if let Some(process) = state.processes.get_mut(&id) {
            process.identities.insert(key.clone());
        }
        let identity = state
            .identities
            .get_mut(key)
            .ok_or_else(|| AcquireError::Unavailable("identity vanished".into()))?;
        identity.holders.insert(id);
        if want_x509 && identity.x509.is_none() {
            let cancel = CancellationToken::new();
            identity.x509 = Some(cancel.clone());
            tokio::spawn(run_x509(
                Arc::clone(&self.inner),
                rendered.clone(),
                Arc::clone(&identity.state),
                cancel,
            ));
        }
        Ok(identity.state.subscribe())
    }

    /// Follows the cache: identities of deleted or changed entries are dropped, revoked
    /// ones are dropped and refused to their holders, and JWT-SVIDs of every newly
    /// revoked ID are forgotten. Runs until shutdown.
    pub fn follow(&self, mut cache: watch::Receiver<Arc<CacheSnapshot>>) {
        let weak = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            let mut last: Option<Arc<CacheSnapshot>> = None;
            loop {
                let snapshot = Arc::clone(&cache.borrow_and_update());
                let Some(inner) = weak.upgrade() else { return };
                let relevant = last.as_ref().is_none_or(|last| {
                    !Arc::ptr_eq(&last.entries, &snapshot.entries)
                        || !Arc::ptr_eq(&last.revoked, &snapshot.revoked)
                });
                if relevant {
                    if last
                        .as_ref()
                        .is_none_or(|last| !Arc::ptr_eq(&last.revoked, &snapshot.revoked))
                    {
                        for id in snapshot.revoked.ids() {
                            inner.jwts.forget(id);
                        }
                    }
                    inner.apply_cache(&snapshot);
                }
                drop(inner);
                last = Some(snapshot);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = cache.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    /// (identities, holder processes) held now.
    pub fn len(&self) -> (usize, usize) {
        let state = self.inner.lock();
        (state.identities.len(), state.processes.len())
    }

    /// True when no identity is held.
    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }

    /// Whether `key` is held now by a live process.
    pub fn is_held(&self, key: &IdentityKey) -> bool {
        let state = self.inner.lock();
        state.identities.get(key).is_some_and(|identity| {
            identity
                .holders
                .iter()
                .any(|h| state.processes.get(h).is_some_and(Process::alive))
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent before anything can fail.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        for (_, identity) in state.identities.drain() {
            if let Some(task) = &identity.x509 {
                task.cancel();
            }
            identity.state.send_replace(SlotState {
                dropped: true,
                ..SlotState::default()
            });
        }
        for (_, process) in state.processes.drain() {
            process.stop.cancel();
        }
    }

    /// Publishes, logs and audits identities removed under the lock.
    fn report(&self, dropped: Vec<Dropped>) {
        for dropped in dropped {
            dropped.state.send_replace(SlotState {
                dropped: true,
                ..SlotState::default()
            });
            self.jwts.forget(&dropped.key.spiffe_id);
            tracing::info!(
                entry_id = %dropped.key.entry_id,
                spiffe_id = %dropped.key.spiffe_id,
                pid = dropped.pid,
                reason = dropped.reason,
                "templated identity dropped"
            );
            self.audit.record(AgentEvent::InstanceDropped {
                spiffe_id: dropped.key.spiffe_id.to_string(),
                pid: dropped.pid,
                reason: dropped.reason.to_owned(),
            });
        }
    }

    fn process_exited(&self, id: &ProcessId) {
        let mut dropped = Vec::new();
        {
            let mut state = self.lock();
            if state.processes.get(id).is_some_and(|p| !p.alive()) {
                state.remove_process(id, "exited", &mut dropped);
            }
        }
        self.report(dropped);
    }

    fn apply_cache(&self, snapshot: &CacheSnapshot) {
        let now = SystemTime::now();
        let mut dropped = Vec::new();
        {
            let mut state = self.lock();
            let mut doomed: Vec<(IdentityKey, &'static str, bool)> = Vec::new();
            for (key, identity) in &state.identities {
                if snapshot.revoked.is_revoked(&key.spiffe_id, now) {
                    doomed.push((key.clone(), "revoked", true));
                    continue;
                }
                match snapshot.entries.get(&key.entry_id) {
                    None => doomed.push((key.clone(), "entry deleted", false)),
                    Some(entry) if entry.revision != identity.entry_revision => {
                        doomed.push((key.clone(), "entry changed", false));
                    }
                    Some(_) => {}
                }
            }
            for (key, reason, revoked) in doomed {
                state.remove_identity(&key, reason, revoked, &mut dropped);
            }
        }
        self.report(dropped);
    }

    /// Whether the identity still exists with a live holder; drops holders that exited
    /// (and the identity with the last one). Checked before every signing, so an SVID
    /// is never minted or renewed for a process that is gone.
    fn still_wanted(&self, key: &IdentityKey) -> bool {
        let mut dropped = Vec::new();
        let wanted = {
            let mut state = self.lock();
            let holders: Vec<ProcessId> = match state.identities.get(key) {
                Some(identity) => identity.holders.iter().copied().collect(),
                None => return false,
            };
            let mut any = false;
            for holder in holders {
                if state.processes.get(&holder).is_some_and(Process::alive) {
                    any = true;
                } else {
                    state.remove_process(&holder, "exited", &mut dropped);
                }
            }
            any
        };
        self.report(dropped);
        wanted
    }

    /// One signing: a fresh key, one round trip, the result checked against the
    /// rendered ID.
    async fn mint(&self, rendered: &Rendered) -> Result<WorkloadSvid, MintError> {
        let _permit = self
            .signings
            .acquire()
            .await
            .map_err(|_| MintError::Failed("agent stopping".into()))?;
        let (pkcs8, spki) = new_workload_key().await.map_err(MintError::Failed)?;
        let chain = self
            .signer
            .new_x509(&rendered.entry.id, spki, &rendered.values)
            .await
            .map_err(|status| {
                let reason = format!("{:?}: {}", status.code(), status.message());
                match status.code() {
                    tonic::Code::PermissionDenied
                    | tonic::Code::NotFound
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition => MintError::Refused(reason),
                    _ => MintError::Failed(reason),
                }
            })?;
        build_svid(&rendered.entry, &rendered.key.spiffe_id, chain, pkcs8)
            .map_err(MintError::Failed)
    }
}

enum MintError {
    /// The server refused this identity (not authorized, revoked, bad value).
    Refused(String),
    /// Anything else: retried with backoff.
    Failed(String),
}

/// The X.509 task of one identity: mint, renew at about half-life, back off on failure,
/// stop when cancelled (the identity was dropped) or at shutdown.
async fn run_x509(
    inner: Arc<Inner>,
    rendered: Rendered,
    state: Arc<watch::Sender<SlotState>>,
    cancel: CancellationToken,
) {
    let key = &rendered.key;
    // Failed signings back off from 0.5 s to 30 s; a refusal is asked again after about
    // 30 s.
    let mut backoff = Backoff::new();
    let mut reachable_again = inner.signer.reachable_again();
    loop {
        if cancel.is_cancelled() || !inner.still_wanted(key) {
            return;
        }
        let minted = tokio::select! {
            () = cancel.cancelled() => return,
            () = inner.shutdown.cancelled() => return,
            minted = inner.mint(&rendered) => minted,
        };
        // The holders may have exited during the round trip: never publish for them.
        if cancel.is_cancelled() || !inner.still_wanted(key) {
            return;
        }
        let mut next = match minted {
            Ok(svid) => {
                backoff.succeeded();
                tracing::debug!(entry_id = %key.entry_id, spiffe_id = %key.spiffe_id, serial = %svid.serial_hex, "templated X.509-SVID minted");
                let renew_at = svid.renew_at;
                state.send_modify(|s| {
                    s.svid = Some(Arc::new(svid));
                    s.refused = None;
                    s.failing = false;
                });
                renew_at
            }
            Err(MintError::Refused(reason)) => {
                let wait = backoff.refused(MAX_BACKOFF);
                tracing::warn!(entry_id = %key.entry_id, spiffe_id = %key.spiffe_id, %reason, "the server refused a templated identity");
                state.send_modify(|s| {
                    s.svid = None;
                    s.refused = Some(format!("the server refused it ({reason})"));
                    s.failing = false;
                });
                SystemTime::now() + wait
            }
            Err(MintError::Failed(reason)) => {
                let wait = backoff.failed();
                tracing::warn!(entry_id = %key.entry_id, spiffe_id = %key.spiffe_id, %reason, retry_in = ?wait, "cannot obtain a templated X.509-SVID");
                state.send_if_modified(|s| !std::mem::replace(&mut s.failing, true));
                SystemTime::now() + wait
            }
        };
        // Wait for the renewal or retry time; an SVID that expires meanwhile is
        // withdrawn at its expiry. A retry after a failure goes sooner when a call
        // reaches a server again (within the limits of [`Backoff::woken`]).
        if let Some(rx) = &mut reachable_again {
            rx.mark_unchanged();
        }
        loop {
            let expiry = state.borrow().svid.as_ref().map(|s| s.not_after);
            let until = expiry.map_or(next, |e| e.min(next));
            let sleep = until.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                () = cancel.cancelled() => return,
                () = inner.shutdown.cancelled() => return,
                () = tokio::time::sleep(sleep) => {}
                () = changed(reachable_again.as_mut()), if backoff.is_wakeable() => {
                    if backoff.woken() {
                        let sooner = backoff
                            .retry_at()
                            .saturating_duration_since(tokio::time::Instant::now());
                        next = next.min(SystemTime::now() + sooner);
                    }
                    continue;
                }
            }
            let now = SystemTime::now();
            if expiry.is_some_and(|e| e <= now) {
                state.send_modify(|s| s.svid = None);
            }
            if now >= next {
                break;
            }
        }
    }
}

/// Waits until `rx` changes (forever without one, or once its sender is gone).
async fn changed(rx: Option<&mut watch::Receiver<u64>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Registers a pidfd with the runtime for readability (a pidfd becomes readable when
/// its process exits).
#[allow(
    unsafe_code,
    reason = "tokio 1.54 deprecated the safe AsyncFd constructors; register_with_interest is \
              the replacement and is unsafe only because of its I/O safety contract"
)]
fn register(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the contract is that the raw fd stays open and refers to the same open file
    // description for the AsyncFd's lifetime. The AsyncFd takes ownership of the
    // `OwnedFd`, which closes its fd only when dropped (by the AsyncFd, after
    // deregistering) and always returns the same raw fd.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(|err| std::io::Error::other(err.to_string()))
}

/// Waits for the process to exit (its pidfd becomes readable), then drops it and the
/// identities only it held. Falls back to polling when the pidfd cannot be registered
/// with the runtime.
async fn watch_process(inner: Weak<Inner>, id: ProcessId, pidfd: OwnedFd, stop: CancellationToken) {
    let poll_fd = pidfd.try_clone().ok();
    let exited = async {
        match register(pidfd) {
            Ok(fd) => {
                while let Ok(mut guard) = fd.readable().await {
                    if !matches!(pidfd_is_alive(fd.get_ref().as_fd()), Ok(true)) {
                        return;
                    }
                    guard.clear_ready();
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, pid = id.pid, "cannot watch a pidfd; polling it");
            }
        }
        let Some(fd) = poll_fd else { return };
        while matches!(pidfd_is_alive(fd.as_fd()), Ok(true)) {
            tokio::time::sleep(LIVENESS_POLL).await;
        }
    };
    tokio::select! {
        () = stop.cancelled() => {}
        () = exited => {
            if let Some(inner) = inner.upgrade() {
                inner.process_exited(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{LocalSigner, snapshot_with};
    use tessera_audit::Record;
    use tessera_plugin_sdk::testing::{reap, spawn_sleep};

    fn pinned(child: &std::process::Child) -> Arc<PinnedCaller> {
        let pid = i32::try_from(child.id()).unwrap();
        let pidfd = tessera_plugin_sdk::workload::pidfd_open(pid).unwrap();
        let workload = Workload::pin(
            pid,
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
            pidfd,
            false,
            std::path::Path::new("/proc"),
        )
        .unwrap();
        Arc::new(PinnedCaller::new(workload))
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap()
    }

    const BOOT: &str = "e8b29955-a05e-447e-aab4-2b2f92488a93";

    async fn settle(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn minted(rx: &mut watch::Receiver<SlotState>) -> Arc<WorkloadSvid> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(svid) = rx.borrow_and_update().svid.clone() {
                    return svid;
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("minted")
    }

    fn instances(signer: &Arc<LocalSigner>, max: usize, audit: AuditLog<AgentEvent>) -> Instances {
        Instances::new(
            max,
            Some(BOOT.to_owned()),
            Arc::clone(signer) as Arc<dyn Signer>,
            Arc::new(JwtCache::default()),
            audit,
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn values_are_derived_per_caller_and_rendered() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        let a = spawn_sleep();
        let b = spawn_sleep();
        let (pa, pb) = (pinned(&a), pinned(&b));
        let uid = nix::unistd::geteuid().as_raw();
        let selectors = [sel("systemd:unit:research-bot.service"), sel("unix:uid:0")];
        let fa = CallerFacts::gather(Some(BOOT), &pa, &selectors).unwrap();
        let fa2 = CallerFacts::gather(Some(BOOT), &pa, &selectors).unwrap();
        let fb = CallerFacts::gather(Some(BOOT), &pb, &selectors).unwrap();
        let signer = LocalSigner::new();
        let entry = signer.entry(
            "e1",
            "spiffe://example.org/u{uid}/{systemd_unit}/{instance}",
            &["unix:uid:0"],
        );
        let ra = fa.render(&entry).unwrap();
        let rb = fb.render(&entry).unwrap();
        // Same process: same ID, every time; another process: another ID.
        assert_eq!(ra.key, fa2.render(&entry).unwrap().key);
        assert_ne!(ra.key, rb.key);
        let instance = ra.instance.clone().unwrap();
        assert_eq!(
            instance,
            instance_value(
                BOOT,
                pa.workload().pid(),
                pa.start_time().unwrap(),
                pa.workload().pidfs_inode()
            )
        );
        assert!(instance.starts_with("i-") && instance.len() == 34);
        assert_eq!(
            ra.key.spiffe_id.as_str(),
            format!("spiffe://example.org/u{uid}/research-bot.service/{instance}")
        );
        // Only the values the template uses travel to the server.
        let only_uid = signer.entry("e2", "spiffe://example.org/user/{uid}", &["unix:uid:0"]);
        let r = fa.render(&only_uid).unwrap();
        assert_eq!(r.values.to_map().len(), 1);
        assert_eq!(r.instance, None);
        assert_eq!(
            r.key,
            fb.render(&only_uid).unwrap().key,
            "same uid, same ID"
        );
        // A fixed ID renders as itself.
        let fixed = signer.entry("e3", "spiffe://example.org/web", &["unix:uid:0"]);
        assert_eq!(
            fa.render(&fixed).unwrap().key.spiffe_id.as_str(),
            "spiffe://example.org/web"
        );

        // A unit that is not a path segment, no unit, two units, no boot id: the entry
        // does not apply, with a reason that does not repeat the raw value.
        let unit = signer.entry(
            "e4",
            "spiffe://example.org/svc/{systemd_unit}",
            &["unix:uid:0"],
        );
        for (selectors, why) in [
            (
                vec![sel("systemd:unit:getty@tty1.service")],
                "not a valid SPIFFE ID path segment",
            ),
            (vec![], "no systemd:unit selector"),
            (
                vec![sel("systemd:unit:a.service"), sel("systemd:unit:b.service")],
                "several systemd:unit selectors",
            ),
        ] {
            let facts = CallerFacts::gather(Some(BOOT), &pa, &selectors).unwrap();
            let err = facts.render(&unit).unwrap_err();
            assert!(err.contains(why) && !err.contains("getty"), "{err}");
        }
        let no_boot = CallerFacts::gather(None, &pa, &selectors).unwrap();
        let err = no_boot.render(&entry).unwrap_err();
        assert!(err.contains("boot id"), "{err}");
        assert!(no_boot.render(&only_uid).is_ok());
        reap(a);
        reap(b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_signing_per_identity_keyed_by_entry_and_rendered_id() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        let a = spawn_sleep();
        let b = spawn_sleep();
        let (pa, pb) = (pinned(&a), pinned(&b));
        let signer = Arc::new(LocalSigner::new());
        let registry = instances(&signer, 100, AuditLog::disabled());
        let per_instance =
            signer.entry("e1", "spiffe://example.org/bot/{instance}", &["unix:uid:0"]);
        let per_uid = signer.entry("e2", "spiffe://example.org/user/{uid}", &["unix:uid:0"]);
        let fa = registry.facts(&pa, &[]).unwrap();
        let fb = registry.facts(&pb, &[]).unwrap();
        let revoked = RevokedSet::default();

        // Ten concurrent callers of one identity: one signing.
        let ra = fa.render(&per_instance).unwrap();
        let mut receivers: Vec<_> = (0..10)
            .map(|_| registry.acquire(&fa, &ra, true, &revoked).unwrap())
            .collect();
        let first = minted(&mut receivers[0]).await;
        for rx in &mut receivers {
            assert!(Arc::ptr_eq(&minted(rx).await, &first));
        }
        assert_eq!(signer.x509_calls(), 1);
        assert_eq!(first.spiffe_id, ra.key.spiffe_id);
        // Another process: its own identity and signing.
        let rb = fb.render(&per_instance).unwrap();
        let mut rx = registry.acquire(&fb, &rb, true, &revoked).unwrap();
        assert_ne!(minted(&mut rx).await.spiffe_id, first.spiffe_id);
        assert_eq!(signer.x509_calls(), 2);
        // {uid}: both processes hold one identity.
        let ua = fa.render(&per_uid).unwrap();
        let ub = fb.render(&per_uid).unwrap();
        assert_eq!(ua.key, ub.key);
        let mut rx = registry.acquire(&fa, &ua, true, &revoked).unwrap();
        registry.acquire(&fb, &ub, true, &revoked).unwrap();
        minted(&mut rx).await;
        assert_eq!(signer.x509_calls(), 3);
        assert_eq!(registry.len(), (3, 2));
        // JWT-only use registers the holder without minting an X.509-SVID.
        let jwt_only = signer.entry("e3", "spiffe://example.org/jwt/{instance}", &["unix:uid:0"]);
        let rj = fa.render(&jwt_only).unwrap();
        let rx = registry.acquire(&fa, &rj, false, &revoked).unwrap();
        assert!(rx.borrow().svid.is_none());
        assert!(registry.is_held(&rj.key));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(signer.x509_calls(), 3);
        // A revoked identity is refused before anything is held.
        let mut set = RevokedSet::default();
        set.apply(
            false,
            &[tessera_proto::node::RevokedIdentity {
                spiffe_id: ra.key.spiffe_id.to_string(),
                revoked_at: 0,
                expires_at: i64::MAX / 2,
            }],
            SystemTime::now(),
        );
        assert_eq!(
            registry.acquire(&fa, &ra, true, &set).unwrap_err(),
            AcquireError::Revoked
        );
        reap(a);
        reap(b);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_identity_is_dropped_as_soon_as_its_process_exits() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = AuditLog::<AgentEvent>::open(&path, "agent").unwrap();
        let signer = Arc::new(LocalSigner::new());
        let registry = instances(&signer, 100, audit.clone());
        let entry = signer.entry("e1", "spiffe://example.org/bot/{instance}", &["unix:uid:0"]);
        let child = spawn_sleep();
        let caller = pinned(&child);
        let facts = registry.facts(&caller, &[]).unwrap();
        let rendered = facts.render(&entry).unwrap();
        let mut rx = registry
            .acquire(&facts, &rendered, true, &RevokedSet::default())
            .unwrap();
        let svid = minted(&mut rx).await;
        assert_eq!(svid.spiffe_id, rendered.key.spiffe_id);
        assert!(registry.is_held(&rendered.key));

        let mut child = child;
        child.kill().unwrap();
        let killed = tokio::time::Instant::now();
        // Dropped promptly (the pidfd became readable), before the child is even reaped.
        tokio::time::timeout(Duration::from_secs(2), async {
            while !rx.borrow_and_update().dropped {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("dropped on exit");
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "{:?}",
            killed.elapsed()
        );
        assert!(rx.borrow().svid.is_none(), "the key is gone from the slot");
        assert_eq!(registry.len(), (0, 0));
        assert!(!registry.is_held(&rendered.key));
        // The exited caller cannot acquire anything again.
        assert_eq!(
            registry
                .acquire(&facts, &rendered, true, &RevokedSet::default())
                .unwrap_err(),
            AcquireError::Exited
        );
        child.wait().unwrap();
        // Never renewed after exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(signer.x509_calls(), 1);

        tokio::task::spawn_blocking(move || audit.flush_blocking().unwrap())
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let records: Vec<Record<AgentEvent>> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            records.iter().any(|r| matches!(
                &r.entry,
                tessera_audit::Entry::Event(AgentEvent::InstanceDropped { spiffe_id, pid, reason })
                    if *spiffe_id == rendered.key.spiffe_id.to_string()
                        && *pid == caller.workload().pid()
                        && reason == "exited"
            )),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renewed_at_half_life_while_the_process_lives_never_after() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        let signer = Arc::new(LocalSigner::new());
        signer.set_x509_lifetime(Duration::from_secs(3));
        let registry = instances(&signer, 10, AuditLog::disabled());
        let entry = signer.entry("e1", "spiffe://example.org/bot/{instance}", &["unix:uid:0"]);
        let mut child = spawn_sleep();
        let caller = pinned(&child);
        let facts = registry.facts(&caller, &[]).unwrap();
        let rendered = facts.render(&entry).unwrap();
        let mut rx = registry
            .acquire(&facts, &rendered, true, &RevokedSet::default())
            .unwrap();
        let first = minted(&mut rx).await;
        // Renewed (a new serial) at about half of its 3 s, with no caller asking.
        let renewed = tokio::time::timeout(Duration::from_secs(4), async {
            loop {
                rx.changed().await.unwrap();
                if let Some(svid) = rx.borrow_and_update().svid.clone()
                    && svid.serial_hex != first.serial_hex
                {
                    return svid;
                }
            }
        })
        .await
        .expect("renewed before expiry");
        assert!(renewed.not_after > first.not_after);
        assert_eq!(renewed.spiffe_id, first.spiffe_id);
        child.kill().unwrap();
        child.wait().unwrap();
        settle("dropped", || registry.is_empty()).await;
        let calls = signer.x509_calls();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(signer.x509_calls(), calls, "never renewed after exit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn capacity_revocation_and_entry_changes() {
        let _shared = crate::testing::DESCRIPTORS.read().await;
        let a = spawn_sleep();
        let b = spawn_sleep();
        let (pa, pb) = (pinned(&a), pinned(&b));
        let signer = Arc::new(LocalSigner::new());
        let registry = instances(&signer, 2, AuditLog::disabled());
        let bot = signer.entry("e1", "spiffe://example.org/bot/{instance}", &["unix:uid:0"]);
        let user = signer.entry(
            "e2",
            "spiffe://example.org/user/{instance}",
            &["unix:uid:0"],
        );
        let fa = registry.facts(&pa, &[]).unwrap();
        let fb = registry.facts(&pb, &[]).unwrap();
        let (ra, ra2) = (fa.render(&bot).unwrap(), fa.render(&user).unwrap());
        let rb = fb.render(&bot).unwrap();
        let none = RevokedSet::default();
        let mut rx = registry.acquire(&fa, &ra, true, &none).unwrap();
        minted(&mut rx).await;
        registry.acquire(&fa, &ra2, false, &none).unwrap();
        // The cap: a third identity is refused, and nothing of it stays behind.
        assert_eq!(
            registry.acquire(&fb, &rb, true, &none).unwrap_err(),
            AcquireError::Exhausted
        );
        assert_eq!(registry.len(), (2, 1));

        // Revocation: dropped at once, and refused to that process for its life, even
        // once the revocation itself is forgotten.
        let (cache_tx, cache_rx) = watch::channel(Arc::new(snapshot_with(&[
            Arc::clone(&bot),
            Arc::clone(&user),
        ])));
        registry.follow(cache_rx);
        let mut revoked = RevokedSet::default();
        revoked.apply(
            false,
            &[tessera_proto::node::RevokedIdentity {
                spiffe_id: ra.key.spiffe_id.to_string(),
                revoked_at: 0,
                expires_at: i64::MAX / 2,
            }],
            SystemTime::now(),
        );
        cache_tx.send_modify(|s| {
            let mut next = (**s).clone();
            next.revoked = Arc::new(revoked);
            *s = Arc::new(next);
        });
        tokio::time::timeout(Duration::from_secs(2), async {
            while !rx.borrow_and_update().dropped {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("dropped on revocation");
        assert!(rx.borrow().svid.is_none());
        assert_eq!(
            registry.acquire(&fa, &ra, true, &none).unwrap_err(),
            AcquireError::Revoked
        );
        assert_eq!(registry.len(), (1, 1));

        // The freed slot serves b; an entry change drops b's identity.
        let mut rx = registry.acquire(&fb, &rb, true, &none).unwrap();
        minted(&mut rx).await;
        let mut changed = (*bot).clone();
        changed.revision += 1;
        cache_tx.send_modify(|s| {
            let mut next = (**s).clone();
            let mut entries = (*next.entries).clone();
            entries.insert(changed.id.clone(), Arc::new(changed));
            next.entries = Arc::new(entries);
            *s = Arc::new(next);
        });
        tokio::time::timeout(Duration::from_secs(2), async {
            while !rx.borrow_and_update().dropped {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("dropped on entry change");
        settle("b's identity gone", || !registry.is_held(&rb.key)).await;
        assert_eq!(registry.len(), (1, 1), "a still holds its other identity");
        reap(a);
        reap(b);
    }
}
