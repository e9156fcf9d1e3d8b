//! The writer thread: numbers, serializes and appends records.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use humantime::Rfc3339Timestamp;
use serde::{Serialize, Serializer};

use crate::{Entry, LogEvent};

/// Records are written to the file when this much is buffered, even if more are queued.
const BUF_LIMIT: usize = 64 * 1024;

/// How often an idle writer looks for records dropped on a full queue (a `record` call
/// that found the queue full may count its loss just after the writer went idle).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What the handles send to the writer.
pub(crate) enum Msg<E> {
    /// A record to write, timestamped when it was recorded.
    Record {
        /// When `record` was called.
        time: SystemTime,
        /// The event.
        event: E,
    },
    /// Write everything queued before this, fdatasync, and answer.
    Flush(SyncSender<io::Result<()>>),
}

/// One line of the file.
#[derive(Serialize)]
struct Line<'a, E> {
    seq: u64,
    #[serde(serialize_with = "display")]
    time: Rfc3339Timestamp,
    component: &'static str,
    #[serde(flatten)]
    entry: Entry<&'a E>,
}

fn display<S: Serializer>(time: &Rfc3339Timestamp, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(time)
}

/// `time` in RFC 3339 with milliseconds, clamped to the range humantime can format
/// (1970 to 9999) so that formatting cannot fail.
fn timestamp(time: SystemTime) -> Rfc3339Timestamp {
    const MAX: Duration = Duration::new(253_402_300_799, 999_999_999);
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default().min(MAX);
    humantime::format_rfc3339_millis(UNIX_EPOCH.checked_add(since).unwrap_or(UNIX_EPOCH))
}

/// The state of the writer thread.
pub(crate) struct Writer {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) component: &'static str,
    /// The sequence number of the next line.
    pub(crate) next_seq: u64,
    /// Whether the file ends with a newline (or is empty).
    pub(crate) at_line_start: bool,
    /// Records lost and not yet reported, shared with the handles.
    pub(crate) dropped: Arc<AtomicU64>,
    /// Serialized lines not yet written.
    ///
    /// Not a `BufWriter`: on a failed write we need to know which records did not make it,
    /// to count them in the next `records_dropped`, and never to write them twice.
    pub(crate) buf: Vec<u8>,
    /// For each line in `buf`: where it ends, and how many records it stands for (1 for
    /// an event, `count` for a `records_dropped` line, whose loss carries its count over).
    pub(crate) lines: Vec<(usize, u64)>,
    /// Whether the last write failed (errors are logged once per streak).
    pub(crate) failing: bool,
    /// Whether an unserializable event was already reported.
    pub(crate) bad_event_logged: bool,
}

impl Writer {
    /// Runs until every handle is gone, then writes what is queued and syncs.
    pub(crate) fn run<E: Serialize>(mut self, rx: Receiver<Msg<E>>, gate: Option<Receiver<()>>) {
        if let Some(gate) = gate {
            // Test hook: hold the writer until the test lets it go (or drops the sender).
            let _ = gate.recv();
        }
        loop {
            self.take_dropped();
            let msg = match rx.try_recv() {
                Ok(msg) => msg,
                Err(TryRecvError::Empty) => {
                    // The queue is momentarily empty: put what we have in the file.
                    if !self.buf.is_empty() {
                        let _ = self.write_out();
                    }
                    match rx.recv_timeout(IDLE_CHECK) {
                        Ok(msg) => msg,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                Err(TryRecvError::Disconnected) => break,
            };
            match msg {
                Msg::Record { time, event } => {
                    self.append(time, Entry::Event(&event), 1);
                    if self.buf.len() >= BUF_LIMIT {
                        let _ = self.write_out();
                    }
                }
                Msg::Flush(reply) => {
                    let _ = reply.send(self.flush_and_sync());
                }
            }
        }
        if let Err(error) = self.flush_and_sync() {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "cannot write or sync the audit log while closing it",
            );
        }
    }

    /// Appends a `records_dropped` line if records were lost since the last one.
    fn take_dropped(&mut self) {
        let count = self.dropped.swap(0, Ordering::Relaxed);
        if count > 0 {
            let entry: Entry<&()> = Entry::Log(LogEvent::RecordsDropped { count });
            self.append(SystemTime::now(), entry, count);
        }
    }

    /// Numbers and serializes one line into `buf`.
    fn append<E: Serialize>(&mut self, time: SystemTime, entry: Entry<&E>, weight: u64) {
        if self.buf.is_empty() && !self.at_line_start {
            // The file ends with a line cut short: start ours on a line of its own.
            self.buf.push(b'\n');
        }
        let mark = self.buf.len();
        let line = Line {
            seq: self.next_seq,
            time: timestamp(time),
            component: self.component,
            entry,
        };
        match serde_json::to_writer(&mut self.buf, &line) {
            Ok(()) => {
                self.buf.push(b'\n');
                self.lines.push((self.buf.len(), weight));
                self.next_seq = self.next_seq.saturating_add(1);
            }
            Err(error) => {
                self.buf.truncate(mark);
                self.dropped.fetch_add(weight, Ordering::Relaxed);
                if !self.bad_event_logged {
                    self.bad_event_logged = true;
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        "cannot serialize an audit event (a bug: events must serialize as \
                         maps); such records are counted as dropped",
                    );
                }
            }
        }
    }

    /// Writes `buf` to the file. On failure the records not (completely) written are
    /// counted as dropped; nothing is ever written twice.
    fn write_out(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut written = 0;
        let result = loop {
            let Some(rest) = self.buf.get(written..).filter(|rest| !rest.is_empty()) else {
                break Ok(());
            };
            match self.file.write(rest) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => break Err(error),
            }
        };
        if let Some(&last) = written.checked_sub(1).and_then(|i| self.buf.get(i)) {
            self.at_line_start = last == b'\n';
        }
        let lost: u64 = self
            .lines
            .iter()
            .filter(|(end, _)| *end > written)
            .map(|(_, weight)| weight)
            .sum();
        self.buf.clear();
        self.lines.clear();
        match &result {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(path = %self.path.display(), "the audit log is writable again");
            }
            Ok(()) => {}
            Err(error) => {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        "cannot write the audit log; records are lost until it is writable \
                         again, and counted in a records_dropped record",
                    );
                }
            }
        }
        result
    }

    /// Writes everything buffered (with any pending `records_dropped`) and fdatasyncs.
    fn flush_and_sync(&mut self) -> io::Result<()> {
        self.take_dropped();
        self.write_out()?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;

    use crate::{AgentEvent, Entry, LogEvent, Record};

    use super::Writer;

    #[test]
    fn records_lost_to_a_failed_write_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        fs::write(&path, "").unwrap();
        let dropped = Arc::new(AtomicU64::new(0));
        let mut writer = Writer {
            // Read-only: every write fails.
            file: fs::File::open(&path).unwrap(),
            path: path.clone(),
            component: "agent",
            next_seq: 1,
            at_line_start: true,
            dropped: Arc::clone(&dropped),
            buf: Vec::new(),
            lines: Vec::new(),
            failing: false,
            bad_event_logged: false,
        };
        let event = AgentEvent::AgentStopping {
            reason: "test".into(),
        };
        writer.append(SystemTime::now(), Entry::Event(&event), 1);
        writer.append(SystemTime::now(), Entry::Event(&event), 1);
        writer.write_out().unwrap_err();
        assert!(writer.failing);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        // A records_dropped line lost in turn carries its count over.
        writer.take_dropped();
        writer.write_out().unwrap_err();
        assert_eq!(dropped.load(Ordering::Relaxed), 2);

        writer.file = OpenOptions::new().append(true).open(&path).unwrap();
        writer.append(SystemTime::now(), Entry::Event(&event), 1);
        writer.flush_and_sync().unwrap();
        assert!(!writer.failing);
        assert_eq!(dropped.load(Ordering::Relaxed), 0);

        let records: Vec<Record<AgentEvent>> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        // Seqs 1 to 3 were lost (a gap), then the event and the count of what was lost.
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0].seq, 4);
        assert_eq!(records[0].entry, Entry::Event(event));
        assert_eq!(records[1].seq, 5);
        assert_eq!(
            records[1].entry,
            Entry::Log(LogEvent::RecordsDropped { count: 2 })
        );
    }

    #[test]
    fn an_event_that_does_not_serialize_as_a_map_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let dropped = Arc::new(AtomicU64::new(0));
        let mut writer = Writer {
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap(),
            path,
            component: "agent",
            next_seq: 1,
            at_line_start: true,
            dropped: Arc::clone(&dropped),
            buf: Vec::new(),
            lines: Vec::new(),
            failing: false,
            bad_event_logged: false,
        };
        writer.append(SystemTime::now(), Entry::Event(&"a bare string"), 1);
        assert!(writer.buf.is_empty());
        assert_eq!(writer.next_seq, 1);
        assert_eq!(dropped.load(Ordering::Relaxed), 1);
    }
}
