//! The tessera audit log (issue #6): who was given which identity, and who changed what.
//!
//! It owns the audit file and its format; it does not own what is recorded (the agent and
//! the server choose their [`AgentEvent`]s and [`ServerEvent`]s) nor the operational log,
//! which stays on `tracing` and is a separate stream.
//!
//! # Format
//!
//! JSON lines: one UTF-8 JSON object per line, each ending with `\n`:
//!
//! ```text
//! {"seq":41,"time":"2026-11-24T09:00:00.123Z","component":"agent","event":"x509_svid_served","pid":812,...}
//! {"seq":42,"time":"2026-11-24T09:00:01.004Z","component":"agent","event":"records_dropped","count":3}
//! ```
//!
//! - `seq` numbers the lines written to the file, 1, 2, 3, ... without reuse. It continues
//!   across restarts from the last complete line (found in the last 64 KiB of the file).
//! - `time` is when [`AuditLog::record`] was called (UTC, RFC 3339, milliseconds). Lines
//!   are in `seq` order; records made at the same moment on different threads may have
//!   times slightly out of order.
//! - `component` is the name given to [`AuditLog::open`] (`"agent"`, `"server"`).
//! - `event` names the event; the event's own fields follow. The log itself writes one
//!   event, `records_dropped` ([`LogEvent::RecordsDropped`]), with the `count` of records
//!   lost since the previous one; [`Record`] reads any line back.
//!
//! # Guarantees
//!
//! - **Loss is visible.** [`AuditLog::record`] never blocks and never fails: when the
//!   queue (65536 records) is full the record is counted, and the writer writes a
//!   `records_dropped` line as soon as it can. When a write fails, the records that did
//!   not reach the file are counted the same way (and their `seq` numbers are skipped: a
//!   gap in `seq` is always followed by a `records_dropped` line, while records dropped on
//!   a full queue were never numbered).
//! - **Prompt, and durable on request.** A record reaches the file (the page cache)
//!   within milliseconds; [`AuditLog::flush_blocking`] and dropping the last handle write
//!   everything queued and `fdatasync`. A crash can lose the last records and leave the
//!   last line cut short; such a line is never continued (the next record starts on a new
//!   line), and readers should skip lines that do not parse.
//! - **The file is private.** It is created with mode 0600 and never opened through a
//!   symbolic link; an existing file that is not a regular file owned by this process's
//!   uid with no group or other permission is refused.
//! - **No secrets.** The event types have no field for a private key, a JWT or a join
//!   token value: a JWT-SVID is recorded by its `jti`, a join token by its id.
//!
//! It is not tamper-evident: whoever runs as the same uid can rewrite the file. Rotate it
//! with `copytruncate` (writes use `O_APPEND`) or by renaming it and restarting; it is
//! never reopened. One process writes one file.

mod agent;
mod error;
mod open;
mod server;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use agent::AgentEvent;
pub use error::AuditError;
pub use server::ServerEvent;

use writer::{Msg, Writer};

/// How many records may wait for the writer before new ones are dropped (and counted).
pub const QUEUE_CAPACITY: usize = 65536;

/// Whether what an event records succeeded; serialized as `"ok"` or `"error"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed; the event's `reason` says why.
    Error,
}

/// Events written by the audit log itself, in any component's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LogEvent {
    /// Records were lost since the previous line: the queue was full, or writing failed.
    RecordsDropped {
        /// How many.
        count: u64,
    },
}

/// What a line carries after its header: a component's event, or the log's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Entry<E> {
    /// An event written by the log itself.
    Log(LogEvent),
    /// A component's event.
    Event(E),
}

/// One line of an audit log, as read back (e.g. `serde_json::from_str::<Record<AgentEvent>>`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Record<E> {
    /// The line's sequence number.
    pub seq: u64,
    /// When the record was made, RFC 3339 in UTC (`humantime::parse_rfc3339` reads it).
    pub time: String,
    /// The component that wrote it.
    pub component: String,
    /// The event.
    #[serde(flatten)]
    pub entry: Entry<E>,
}

/// A handle on an audit log; cheap to clone, shared by every task that records.
///
/// `E` is the component's event type, an enum with `#[serde(tag = "event")]` such as
/// [`AgentEvent`] or [`ServerEvent`]. Its fields must not be named `seq`, `time` or
/// `component`.
///
/// Dropping the last handle writes what is queued, syncs the file and joins the writer
/// thread: it can block briefly, so drop it at shutdown, not on a serving path.
pub struct AuditLog<E> {
    inner: Option<Arc<Inner<E>>>,
}

/// The open log; its drop stops the writer thread.
struct Inner<E> {
    path: PathBuf,
    component: &'static str,
    /// `None` only while dropping (closing the channel stops the writer).
    tx: Option<SyncSender<Msg<E>>>,
    /// Records dropped on a full queue (and lost writes), not yet reported.
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl<E: Serialize + Send + 'static> AuditLog<E> {
    /// Opens the audit log at `path`, creating it with mode 0600 (`O_APPEND | O_CREAT |
    /// O_NOFOLLOW | O_CLOEXEC`); its parent directory must exist.
    ///
    /// Refuses a path that is a symbolic link or not a regular file, and a file owned by
    /// another uid or readable or writable by group or other (the error says which).
    /// Continues the sequence from the last complete record in the file (read from its last
    /// 64 KiB), starting at 1 for a new or empty file. Starts the writer thread,
    /// `audit-writer`, fed by a queue of [`QUEUE_CAPACITY`] records.
    ///
    /// `component` is written in every line (`"agent"`, `"server"`). This does blocking
    /// I/O: call it at startup, or on `spawn_blocking`.
    pub fn open(path: &Path, component: &'static str) -> Result<Self, AuditError> {
        Self::open_with(path, component, QUEUE_CAPACITY, None)
    }

    /// [`AuditLog::open`] with a given queue capacity and, for tests, a gate the writer
    /// waits on before it starts taking records.
    pub(crate) fn open_with(
        path: &Path,
        component: &'static str,
        capacity: usize,
        gate: Option<Receiver<()>>,
    ) -> Result<Self, AuditError> {
        let opened = open::open_file(path)?;
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            file: opened.file,
            path: path.to_path_buf(),
            component,
            next_seq: opened.next_seq,
            at_line_start: opened.at_line_start,
            dropped: Arc::clone(&dropped),
            buf: Vec::new(),
            lines: Vec::new(),
            failing: false,
            bad_event_logged: false,
        };
        let (tx, rx) = mpsc::sync_channel(capacity);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run::<E>(rx, gate))
            .map_err(AuditError::Spawn)?;
        Ok(Self {
            inner: Some(Arc::new(Inner {
                path: path.to_path_buf(),
                component,
                tx: Some(tx),
                dropped,
                thread: Some(thread),
            })),
        })
    }

    /// An audit log that records nothing (no path configured).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Whether records are written anywhere (false for [`AuditLog::disabled`]).
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues `event`, timestamped now. Never blocks on I/O and never fails: if the queue
    /// is full the record is counted as dropped, and the writer writes a
    /// `records_dropped` line (with its own `seq`) as soon as it can.
    pub fn record(&self, event: E) {
        let Some(inner) = &self.inner else {
            return;
        };
        let msg = Msg::Record {
            time: SystemTime::now(),
            event,
        };
        let sent = inner.tx.as_ref().is_some_and(|tx| tx.try_send(msg).is_ok());
        if !sent {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes everything queued so far (by any handle), flushes it and `fdatasync`s the
    /// file. Blocks the calling thread (also while the queue is full): async callers wrap
    /// it in `tokio::task::spawn_blocking`. A no-op on a disabled log.
    pub fn flush_blocking(&self) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let tx = inner.tx.as_ref().ok_or(AuditError::Closed)?;
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(reply_tx))
            .map_err(|_| AuditError::Closed)?;
        reply_rx
            .recv()
            .map_err(|_| AuditError::Closed)?
            .map_err(|source| AuditError::Write {
                path: inner.path.clone(),
                source,
            })
    }
}

impl<E> Clone for AuditLog<E> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<E> fmt::Debug for AuditLog<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Some(inner) => f
                .debug_struct("AuditLog")
                .field("path", &inner.path)
                .field("component", &inner.component)
                .field("dropped", &inner.dropped.load(Ordering::Relaxed))
                .finish(),
            None => f.write_str("AuditLog(disabled)"),
        }
    }
}

impl<E> Drop for Inner<E> {
    fn drop(&mut self) {
        // Closing the channel tells the writer to write what is queued, sync and stop.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "the audit log writer thread panicked");
        }
    }
}

#[cfg(test)]
mod tests;
