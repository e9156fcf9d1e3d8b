//! Tests of the container attestor: the fixture trees under `tests/fixtures/` (a
//! `cgroup` file and the `expected` selectors or `error: <text>`), the runtime query
//! against fake Docker-API servers on temporary Unix sockets (normal, chunked, 404, slow,
//! dripping, oversized, full backlog...; no real daemon can run here), and real processes
//! in real cgroups where the machine allows.

use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_plugin_sdk::testing::{
    TestCgroup, expected, fake_proc, fixture_cases, pin, reap, spawn_sleep, strings,
};

use super::*;

const A: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn fixture_trees() {
    let child = spawn_sleep();
    let attestor = ContainerAttestor::new(ContainerAttestorConfig::default());
    assert_eq!(attestor.name(), "container");
    let cases = fixture_cases(&fixtures());
    assert!(cases.len() >= 30, "{cases:?}");
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy();
        let root = fake_proc(&child, &std::fs::read(case.join("cgroup")).unwrap());
        let got = attestor
            .attest(&pin(&child, root.path()))
            .map(|s| strings(&s));
        match (expected(case), got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "{name}"),
            (Err(want), Err(err)) => {
                assert!(err.to_string().contains(&want), "{name}: {err}");
                // Failures never name the ids (SECURITY.md §2 rule 10).
                assert!(!err.to_string().contains(&A[..16]), "{name}: {err}");
            }
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
    reap(child);
}

#[test]
fn conflicts_are_attestor_failures() {
    let child = spawn_sleep();
    let root = fake_proc(
        &child,
        std::fs::read(fixtures().join("conflict_nested_cgroupfs/cgroup"))
            .unwrap()
            .as_slice(),
    );
    let err = ContainerAttestor::new(ContainerAttestorConfig::default())
        .attest(&pin(&child, root.path()))
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::Failed(m) if m == "container id conflict"),
        "{err:?}"
    );
    reap(child);
}

#[test]
fn cgroup_namespace_warning() {
    let root = tempfile::tempdir().unwrap();
    assert_eq!(
        ContainerAttestor::cgroup_namespace_warning(root.path()),
        None
    );
    std::fs::create_dir(root.path().join("self")).unwrap();
    std::fs::write(root.path().join("self/cgroup"), "0::/\n").unwrap();
    let warning = ContainerAttestor::cgroup_namespace_warning(root.path()).unwrap();
    assert!(warning.contains("host cgroup namespace"), "{warning}");
    std::fs::write(
        root.path().join("self/cgroup"),
        "0::/system.slice/tessera-agent.service\n",
    )
    .unwrap();
    assert_eq!(
        ContainerAttestor::cgroup_namespace_warning(root.path()),
        None
    );
    std::fs::write(root.path().join("self/cgroup"), "1:name=systemd:/\n").unwrap();
    assert!(ContainerAttestor::cgroup_namespace_warning(root.path()).is_some());
}

// ---- the runtime query, against fake Docker-API servers ------------------------------

/// A fake runtime on a temporary Unix socket. Each connection is handled on its own
/// thread by `respond(stream, request_head)`; the request heads are recorded.
struct FakeRuntime {
    _dir: tempfile::TempDir,
    path: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeRuntime {
    fn start(respond: impl Fn(&mut UnixStream, &str) + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let respond = Arc::new(respond);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let seen = Arc::clone(&seen);
                let respond = Arc::clone(&respond);
                std::thread::spawn(move || {
                    let head = read_head(&mut stream);
                    seen.lock().unwrap().push(head.clone());
                    respond(&mut stream, &head);
                });
            }
        });
        Self {
            _dir: dir,
            path,
            requests,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn read_head(stream: &mut UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn inspect_json(id: &str) -> String {
    format!(
        r#"{{"Id":"{id}","Created":"2025-01-01T00:00:00Z","Name":"/web","State":{{"Pid":42}},"Config":{{"Image":"docker.io/library/nginx:1.27","Env":["SECRET=x"]}},"Image":"sha256:{}"}}"#,
        "ab".repeat(32)
    )
}

fn ok_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn attestor_with(socket: &Path, timeout: Duration) -> ContainerAttestor {
    ContainerAttestor::new(ContainerAttestorConfig {
        runtime_socket: Some(socket.to_owned()),
        runtime_timeout: timeout,
    })
}

/// Attests a process whose cgroup file is `cgroup` with the given attestor.
fn attest_cgroup(attestor: &ContainerAttestor, cgroup: &str) -> Result<Vec<String>, AttestError> {
    let child = spawn_sleep();
    let root = fake_proc(&child, cgroup.as_bytes());
    let result = attestor
        .attest(&pin(&child, root.path()))
        .map(|s| strings(&s));
    reap(child);
    result
}

fn docker_cgroup() -> String {
    format!("0::/system.slice/docker-{A}.scope\n")
}

#[test]
fn runtime_query_adds_image_and_name() {
    let server = FakeRuntime::start(|s, _| {
        s.write_all(ok_response(&inspect_json(A)).as_bytes())
            .unwrap();
    });
    let got = attest_cgroup(
        &attestor_with(&server.path, Duration::from_secs(2)),
        &docker_cgroup(),
    )
    .unwrap();
    assert_eq!(
        got,
        [
            format!("container:id:{A}"),
            "container:image:docker.io/library/nginx:1.27".to_owned(),
            "container:name:web".to_owned(),
        ]
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert!(
        requests[0].starts_with(&format!("GET /containers/{A}/json HTTP/1.1\r\n")),
        "{requests:?}"
    );
    assert!(requests[0].contains("\r\nHost: "), "{requests:?}");
}

#[test]
fn runtime_query_chunked_and_podman() {
    let server = FakeRuntime::start(|s, _| {
        let body = inspect_json(A);
        let (a, b) = body.split_at(10);
        let response = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        // Sent in small pieces, with a pause, to exercise incremental parsing.
        for piece in response.as_bytes().chunks(7) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        // Keep the connection open: the client must stop at the last chunk by itself.
        std::thread::sleep(Duration::from_secs(3));
    });
    let started = Instant::now();
    let got = attest_cgroup(
        &attestor_with(&server.path, Duration::from_secs(2)),
        &format!("0::/machine.slice/libpod-{A}.scope/container\n"),
    )
    .unwrap();
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(got.contains(&"container:name:web".to_owned()), "{got:?}");
}

#[test]
fn runtime_not_queried_for_non_docker_runtimes_or_no_container() {
    let server = FakeRuntime::start(|s, _| {
        s.write_all(ok_response(&inspect_json(A)).as_bytes())
            .unwrap();
    });
    let a = attestor_with(&server.path, Duration::from_secs(2));
    let got = attest_cgroup(
        &a,
        &format!(
            "0::/kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/cri-containerd-{A}.scope\n"
        ),
    )
    .unwrap();
    assert_eq!(
        got,
        [
            format!("container:id:{A}"),
            "container:pod_uid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".to_owned()
        ]
    );
    assert!(
        attest_cgroup(&a, "0::/system.slice/sshd.service\n")
            .unwrap()
            .is_empty()
    );
    assert!(server.requests().is_empty());
}

/// A failing runtime query: the attestation still succeeds within the deadline with the
/// kernel-derived id only (item 42: only entries needing image/name lose out); the
/// query's own error, asked for directly, says why.
fn query_error(server: &FakeRuntime, timeout: Duration) -> (String, Duration) {
    let started = Instant::now();
    let selectors = attest_cgroup(&attestor_with(&server.path, timeout), &docker_cgroup()).unwrap();
    let elapsed = started.elapsed();
    assert_eq!(selectors, vec![format!("container:id:{A}")]);
    let started_direct = Instant::now();
    let message = format!(
        "container runtime query failed: {}",
        crate::runtime::inspect(&server.path, A, timeout).unwrap_err()
    );
    assert!(!message.contains(&A[..16]), "{message}");
    (message, elapsed.max(started_direct.elapsed()))
}

#[test]
fn runtime_404_and_errors_fail() {
    let server = FakeRuntime::start(|s, _| {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
    });
    let (m, _) = query_error(&server, Duration::from_secs(2));
    assert!(m.contains("does not know"), "{m}");

    let server = FakeRuntime::start(|s, _| {
        s.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let (m, _) = query_error(&server, Duration::from_secs(2));
    assert!(m.contains("HTTP 500"), "{m}");

    let server = FakeRuntime::start(|s, _| {
        s.write_all(ok_response("{not json").as_bytes()).unwrap();
    });
    let (m, _) = query_error(&server, Duration::from_secs(2));
    assert!(m.contains("malformed JSON"), "{m}");

    let other = "ab".repeat(32);
    let server = FakeRuntime::start(move |s, _| {
        s.write_all(ok_response(&inspect_json(&other)).as_bytes())
            .unwrap();
    });
    let (m, _) = query_error(&server, Duration::from_secs(2));
    assert!(m.contains("another container"), "{m}");

    let server = FakeRuntime::start(|_, _| {});
    let (m, _) = query_error(&server, Duration::from_secs(2));
    assert!(m.contains("closed"), "{m}");
}

#[test]
fn runtime_socket_missing_fails() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let selectors = attest_cgroup(
        &attestor_with(&missing, Duration::from_secs(1)),
        &docker_cgroup(),
    )
    .unwrap();
    assert_eq!(selectors, vec![format!("container:id:{A}")]);
    let err = crate::runtime::inspect(&missing, A, Duration::from_secs(1)).unwrap_err();
    assert!(err.contains("connect"), "{err}");
}

/// SECURITY.md §3.4 item 42: a runtime that accepts and never answers.
#[test]
fn slow_runtime_fails_within_the_deadline() {
    let server = FakeRuntime::start(|_, _| std::thread::sleep(Duration::from_secs(5)));
    let (m, elapsed) = query_error(&server, Duration::from_millis(300));
    assert!(m.contains("timed out"), "{m}");
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// A runtime that sends a byte every 50 ms: each read succeeds, the deadline still holds.
#[test]
fn dripping_runtime_fails_within_the_deadline() {
    let server = FakeRuntime::start(|s, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        for _ in 0..200 {
            if s.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (m, elapsed) = query_error(&server, Duration::from_millis(400));
    assert!(m.contains("timed out"), "{m}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// A listener that never accepts and whose backlog is full: connect itself must honour
/// the deadline.
#[test]
fn full_backlog_fails_within_the_deadline() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sock");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    listen(&fd.as_fd(), Backlog::new(0).unwrap()).unwrap();
    // Fill the accept queue (these connects succeed or would block; keep them open).
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        let _ = nix::sys::socket::connect(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            &UnixAddr::new(&path).unwrap(),
        );
        fillers.push(s);
    }
    let started = Instant::now();
    let err = crate::runtime::inspect(&path, A, Duration::from_millis(300)).unwrap_err();
    let elapsed = started.elapsed();
    assert!(err.contains("timed out while connecting"), "{err}");
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    drop(fillers);
}

#[test]
fn oversized_runtime_response_fails() {
    let server = FakeRuntime::start(|s, _| {
        let size = 2 << 20;
        let _ =
            s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").as_bytes());
        let block = vec![b' '; 64 * 1024];
        for _ in 0..(size / block.len()) {
            if s.write_all(&block).is_err() {
                return;
            }
        }
    });
    let (m, _) = query_error(&server, Duration::from_secs(5));
    assert!(m.contains("larger than"), "{m}");

    // Chunked framing does not get around the cap either.
    let server = FakeRuntime::start(|s, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let block = vec![b' '; 0x8000];
        for _ in 0..64 {
            if s.write_all(b"8000\r\n").is_err()
                || s.write_all(&block).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                return;
            }
        }
    });
    let (m, _) = query_error(&server, Duration::from_secs(5));
    assert!(m.contains("larger than"), "{m}");
}

#[test]
fn unrepresentable_runtime_values_are_left_out() {
    let server = FakeRuntime::start(|s, _| {
        let body = format!(r#"{{"Id":"{A}","Name":"/","Config":{{"Image":"bad\u0001image"}}}}"#);
        s.write_all(ok_response(&body).as_bytes()).unwrap();
    });
    let got = attest_cgroup(
        &attestor_with(&server.path, Duration::from_secs(2)),
        &docker_cgroup(),
    )
    .unwrap();
    assert_eq!(got, [format!("container:id:{A}")]);
}

// ---- real processes ---------------------------------------------------------------

/// The real `/proc`: on this machine processes are at `0::/`, in no container.
#[test]
fn real_process() {
    let child = spawn_sleep();
    let w = pin(&child, Path::new("/proc"));
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    let got = ContainerAttestor::new(ContainerAttestorConfig::default())
        .attest(&w)
        .unwrap();
    if text.lines().any(|l| l == "0::/") {
        assert!(got.is_empty(), "{got:?}");
    }
    reap(child);
}

/// A child in a docker-named scope created in the real unified hierarchy, with a fake
/// runtime (needs root and a writable cgroup2 mount; skipped otherwise).
#[test]
fn real_process_in_a_container_cgroup() {
    let id = format!("{:016x}", u64::from(std::process::id())).repeat(4);
    let Some(cg) = TestCgroup::create(&["tessera-ctrtest.slice", &format!("docker-{id}.scope")])
    else {
        eprintln!("skipped: needs root and a writable cgroup2 mount");
        return;
    };
    let child = spawn_sleep();
    cg.add(&child);
    let w = pin(&child, Path::new("/proc"));
    let got = strings(
        &ContainerAttestor::new(ContainerAttestorConfig::default())
            .attest(&w)
            .unwrap(),
    );
    assert_eq!(got, [format!("container:id:{id}")]);

    let reply_id = id.clone();
    let server = FakeRuntime::start(move |s, _| {
        s.write_all(ok_response(&inspect_json(&reply_id)).as_bytes())
            .unwrap();
    });
    let got = strings(
        &attestor_with(&server.path, Duration::from_secs(2))
            .attest(&w)
            .unwrap(),
    );
    assert_eq!(
        got,
        [
            format!("container:id:{id}"),
            "container:image:docker.io/library/nginx:1.27".to_owned(),
            "container:name:web".to_owned(),
        ]
    );
    reap(child);
}

/// SECURITY.md §3.4 item 37 with real cgroups: a nested cgroup named after another
/// container fails closed.
#[test]
fn real_nested_container_conflict() {
    let outer = format!("{:016x}", u64::from(std::process::id())).repeat(4);
    let victim = "e".repeat(64);
    let Some(cg) = TestCgroup::create(&[
        "tessera-ctrconf.slice",
        &format!("docker-{outer}.scope"),
        &victim,
    ]) else {
        eprintln!("skipped: needs root and a writable cgroup2 mount");
        return;
    };
    let child = spawn_sleep();
    cg.add(&child);
    let err = ContainerAttestor::new(ContainerAttestorConfig::default())
        .attest(&pin(&child, Path::new("/proc")))
        .unwrap_err();
    assert_eq!(err.to_string(), "container id conflict");
    reap(child);
}
