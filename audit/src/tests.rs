//! Tests on real files in a temporary directory.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

fn served(i: u64) -> AgentEvent {
    AgentEvent::X509SvidServed {
        pid: 1000 + i as i32,
        uid: 1000,
        entry_id: format!("entry-{i}"),
        spiffe_id: "spiffe://example.org/web".into(),
        serial: format!("{i:x}"),
        expires_at: 1_800_000_000,
        ttl_seconds: 3600,
        instance: None,
    }
}

/// Every line of the file, parsed; panics on a line that does not parse.
fn read_back(path: &Path) -> Vec<Record<AgentEvent>> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

fn seqs<E>(records: &[Record<E>]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

#[test]
fn records_appear_in_order_and_parse_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    assert!(log.is_enabled());
    log.record(AgentEvent::AuditStarted {
        pid: std::process::id(),
        version: "0.1.0".into(),
    });
    for i in 0..100 {
        log.record(served(i));
    }
    log.flush_blocking().unwrap();

    let records = read_back(&path);
    assert_eq!(seqs(&records), (1..=101).collect::<Vec<_>>());
    assert!(records.iter().all(|r| r.component == "agent"));
    for record in &records {
        assert_eq!(
            record.time.len(),
            "2026-11-24T09:00:00.123Z".len(),
            "{}",
            record.time
        );
        humantime::parse_rfc3339(&record.time).unwrap();
    }
    for (i, record) in records.iter().skip(1).enumerate() {
        assert_eq!(record.entry, Entry::Event(served(i as u64)));
    }

    // The header comes first and the event's tag follows it.
    let text = fs::read_to_string(&path).unwrap();
    let first = text.lines().nth(1).unwrap();
    assert!(
        first.starts_with(r#"{"seq":2,"time":""#)
            && first.contains(r#"Z","component":"agent","event":"x509_svid_served","pid":1000,"#),
        "{first}"
    );
    assert!(
        !first.contains("instance"),
        "None fields are omitted: {first}"
    );
}

#[test]
fn new_file_has_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let _log = AuditLog::<AgentEvent>::open(&path, "agent").unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o600);
}

#[test]
fn reopening_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    for _ in 0..3 {
        let log = AuditLog::open(&path, "agent").unwrap();
        log.record(served(1));
        log.record(served(2));
        drop(log); // writes what is queued and joins the writer
    }
    assert_eq!(seqs(&read_back(&path)), (1..=6).collect::<Vec<_>>());
}

#[test]
fn reopening_a_file_larger_than_the_tail_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    for i in 0..2000 {
        log.record(served(i));
    }
    drop(log);
    assert!(fs::metadata(&path).unwrap().len() > 3 * open::TAIL_BYTES);
    let log = AuditLog::open(&path, "agent").unwrap();
    log.record(served(0));
    drop(log);
    assert_eq!(seqs(&read_back(&path)), (1..=2001).collect::<Vec<_>>());
}

#[test]
fn a_line_cut_short_does_not_break_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    log.record(served(1));
    log.record(served(2));
    drop(log);
    // A crash in the middle of writing record 3.
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(r#"{"seq":3,"time":"2026-11-24T09:0"#);
    fs::write(&path, &text).unwrap();

    let log = AuditLog::open(&path, "agent").unwrap();
    log.record(served(3));
    log.flush_blocking().unwrap();

    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines[2], r#"{"seq":3,"time":"2026-11-24T09:0"#,
        "left alone"
    );
    let records: Vec<Record<AgentEvent>> = lines
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    assert_eq!(seqs(&records), [1, 2, 3]);
    assert_eq!(records[2].entry, Entry::Event(served(3)));
}

#[test]
fn an_existing_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    fs::write(&path, "").unwrap();
    for mode in [0o644, 0o620, 0o604] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = AuditLog::<AgentEvent>::open(&path, "agent").unwrap_err();
        assert!(
            matches!(&err, AuditError::Permissions { mode: m, .. } if *m == mode),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("group or other"), "{message}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    AuditLog::<AgentEvent>::open(&path, "agent").unwrap();
}

#[test]
fn a_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target.log");
    fs::write(&target, "").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("audit.log");
    symlink(&target, &link).unwrap();
    let err = AuditLog::<AgentEvent>::open(&link, "agent").unwrap_err();
    assert!(matches!(err, AuditError::Symlink { .. }), "{err:?}");
    assert!(err.to_string().contains("symbolic link"), "{err}");

    // A dangling link is not followed to create its target either.
    let dangling = dir.path().join("dangling.log");
    symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let err = AuditLog::<AgentEvent>::open(&dangling, "agent").unwrap_err();
    assert!(matches!(err, AuditError::Symlink { .. }), "{err:?}");
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn what_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = AuditLog::<AgentEvent>::open(dir.path(), "agent").unwrap_err();
    assert!(matches!(err, AuditError::NotRegularFile { .. }), "{err:?}");

    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = AuditLog::<AgentEvent>::open(&fifo, "agent").unwrap_err();
    assert!(matches!(err, AuditError::NotRegularFile { .. }), "{err:?}");
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = AuditLog::<AgentEvent>::open(&dir.path().join("no/audit.log"), "agent").unwrap_err();
    assert!(matches!(err, AuditError::Open { .. }), "{err:?}");
}

#[test]
fn records_dropped_on_a_full_queue_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let (open_gate, gate) = mpsc::channel();
    let log = AuditLog::open_with(&path, "agent", 2, Some(gate)).unwrap();
    for i in 0..5 {
        log.record(served(i));
    }
    assert!(format!("{log:?}").contains("dropped: 3"), "{log:?}");
    open_gate.send(()).unwrap();
    log.flush_blocking().unwrap();
    log.record(served(5));
    log.flush_blocking().unwrap();

    let records = read_back(&path);
    assert_eq!(seqs(&records), [1, 2, 3, 4], "dropped records take no seq");
    let dropped: Vec<_> = records
        .iter()
        .filter(|r| matches!(r.entry, Entry::Log(_)))
        .collect();
    assert_eq!(dropped.len(), 1, "{records:?}");
    assert_eq!(
        dropped[0].entry,
        Entry::Log(LogEvent::RecordsDropped { count: 3 })
    );
    let events: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.entry {
            Entry::Event(e) => Some(e.clone()),
            Entry::Log(_) => None,
        })
        .collect();
    assert_eq!(events, [served(0), served(1), served(5)]);
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        text.contains(r#","component":"agent","event":"records_dropped","count":3}"#),
        "{text}"
    );
}

#[test]
fn flush_blocking_makes_records_visible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    for i in 0..10 {
        log.record(served(i));
        log.flush_blocking().unwrap();
        assert_eq!(read_back(&path).len() as u64, i + 1);
    }
}

#[test]
fn records_reach_the_file_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    log.record(served(1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_back(&path).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the record never reached the file"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(log);
}

#[test]
fn clones_on_many_threads_share_one_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::open(&path, "agent").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let log = log.clone();
            std::thread::spawn(move || (0..1000).for_each(|i| log.record(served(i))))
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    drop(log);
    let records = read_back(&path);
    assert_eq!(seqs(&records), (1..=4000).collect::<Vec<_>>());
    assert!(records.iter().all(|r| matches!(r.entry, Entry::Event(_))));
}

#[test]
fn a_disabled_log_records_nothing() {
    let log = AuditLog::<ServerEvent>::disabled();
    assert!(!log.is_enabled());
    log.record(ServerEvent::AgentBanned {
        agent_id: "spiffe://example.org/agent/1".into(),
        caller_uid: 0,
    });
    log.flush_blocking().unwrap();
    assert_eq!(format!("{log:?}"), "AuditLog(disabled)");
}

#[test]
fn handles_are_send_sync_and_clone() {
    fn check<T: Send + Sync + Clone + fmt::Debug + 'static>() {}
    check::<AuditLog<AgentEvent>>();
    check::<AuditLog<ServerEvent>>();
}

#[test]
fn event_names_and_fields() {
    let json = |e: &ServerEvent| serde_json::to_value(e).unwrap();
    let signed = ServerEvent::X509SvidSigned {
        agent_id: "spiffe://example.org/agent/1".into(),
        entry_id: "e1".into(),
        spiffe_id: "spiffe://example.org/web".into(),
        serial: "0a".into(),
        expires_at: 1,
        ttl_seconds: 2,
    };
    assert_eq!(json(&signed)["event"], "x509_svid_signed");
    let attested = ServerEvent::NodeAttested {
        method: "join_token".into(),
        agent_id: None,
        token_id: Some("t1".into()),
        peer: None,
        result: Outcome::Error,
        reason: Some("expired".into()),
    };
    assert_eq!(
        serde_json::to_string(&attested).unwrap(),
        r#"{"event":"node_attested","method":"join_token","token_id":"t1","result":"error","reason":"expired"}"#
    );
    for event in [signed, attested] {
        let back: ServerEvent = serde_json::from_value(json(&event)).unwrap();
        assert_eq!(back, event);
    }
    let refused = AgentEvent::Refused {
        pid: None,
        uid: Some(7),
        rpc: "FetchJWTSVID".into(),
        code: "permission_denied".into(),
        reason: "no entry".into(),
    };
    let value = serde_json::to_value(&refused).unwrap();
    assert_eq!(value["event"], "refused");
    assert!(value.get("pid").is_none());
    assert_eq!(
        serde_json::from_value::<AgentEvent>(value).unwrap(),
        refused
    );
    assert_eq!(serde_json::to_value(Outcome::Ok).unwrap(), "ok");
}

#[test]
fn times_outside_the_formattable_range_are_clamped() {
    // An event recorded with a clock before 1970 must not break the writer.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::<AgentEvent>::open(&path, "agent").unwrap();
    let inner = log.inner.as_ref().unwrap();
    for time in [
        std::time::UNIX_EPOCH - Duration::from_secs(10),
        std::time::UNIX_EPOCH + Duration::from_secs(400_000_000_000),
    ] {
        inner
            .tx
            .as_ref()
            .unwrap()
            .send(Msg::Record {
                time,
                event: served(0),
            })
            .unwrap();
    }
    log.flush_blocking().unwrap();
    let times: Vec<String> = read_back(&path).into_iter().map(|r| r.time).collect();
    assert_eq!(
        times,
        ["1970-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"]
    );
}
