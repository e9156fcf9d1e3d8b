//! Helpers shared by the scenario modules.

use std::path::Path;

use tessera_agent::cli::with_header;
use tessera_proto::workload::X509svidRequest;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::Channel;

/// The test workload binary of this package.
pub fn workload_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tessera-test-workload"))
}

/// A raw Workload API client (our generated one), for calls the `spiffe` crate would
/// not make (missing or odd headers).
pub async fn raw_workload_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(tessera_proto::uds::connect(socket).await.unwrap())
}

/// The first X.509-SVID response for this process, as raw wire message.
pub async fn fetch_x509_raw(
    socket: &Path,
) -> Result<tessera_proto::workload::X509svidResponse, tonic::Status> {
    let mut client = raw_workload_client(socket).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await?
        .into_inner();
    stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::aborted("stream ended"))
}

/// A `FetchX509SVID` stream for this process, opened as soon as the agent answers one
/// (within 20 s).
pub async fn open_x509_stream(
    socket: &Path,
) -> tonic::Streaming<tessera_proto::workload::X509svidResponse> {
    let mut client = raw_workload_client(socket).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            if let Ok(stream) = client.fetch_x509svid(with_header(X509svidRequest {})).await {
                break stream.into_inner();
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the stream opens")
}

/// A binary of the product (`tessera-server`, `tessera-agent`) from the same target
/// directory as this test binary (`<target>/debug/deps/scenarios-<hash>` ->
/// `<target>/debug/<name>`). Cargo does not build other packages' binaries for an
/// integration test, so they must have been built beforehand.
pub fn product_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// What a finished CLI invocation printed, and its exit code.
#[derive(Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Asserts the exit code; the message shows everything the command printed.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "`{}` exited {} (expected {code})\nstdout: {}\nstderr: {}",
            self.command, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts exit 0 and returns stdout parsed as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        self.expect_code(0);
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|err| {
            panic!(
                "`{}` printed no JSON ({err}): {}",
                self.command, self.stdout
            )
        })
    }

    /// Asserts stderr is exactly one non-empty line and returns it.
    #[track_caller]
    pub fn one_stderr_line(&self) -> &str {
        let text = self.stderr.trim_end_matches('\n');
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "`{}`: stderr is not one line: {:?}",
            self.command,
            self.stderr
        );
        text
    }
}

/// A command for product binary `name` with a clean environment for endpoint discovery
/// (no inherited `SPIFFE_ENDPOINT_SOCKET` or `TESSERA_ADMIN_SOCKET`), killed if dropped.
pub fn product_command(name: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(product_bin(name));
    command
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .env_remove("TESSERA_ADMIN_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `command` to completion (at most 20 s) without blocking the runtime.
pub async fn run_command(mut command: tokio::process::Command) -> CliOutput {
    let description = format!("{:?}", command.as_std());
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), command.output())
        .await
        .unwrap_or_else(|_| panic!("`{description}` did not finish within 20 s"))
        .unwrap_or_else(|err| panic!("`{description}` did not start: {err}"));
    CliOutput {
        command: description,
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs product binary `name` with `args`.
pub async fn run_product(name: &str, args: &[&str]) -> CliOutput {
    let mut command = product_command(name);
    command.args(args);
    run_command(command).await
}

/// A path as a CLI argument.
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Polls `tessera-server healthcheck` or `tessera-agent healthcheck` on `socket` until
/// it exits 0 (panics after `limit`).
pub async fn wait_healthy(name: &str, socket: &Path, limit: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let out = run_product(name, &["healthcheck", "--socket", arg(socket)]).await;
        if out.code == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not healthy on {} within {limit:?}: {}",
            socket.display(),
            out.stderr
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The node API with hand-made credentials (node_api.rs, and any scenario that plays an
// agent by hand).

/// The server's SPIFFE ID in the scenarios' trust domain.
pub const SERVER_ID: &str = "spiffe://example.org/tessera/server";

/// A private key (PKCS#8 DER) and the certificate chain issued for it (DER, leaf
/// first): an agent SVID or a workload SVID.
#[derive(Clone)]
pub struct Credential {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The key, PKCS#8 DER.
    pub pkcs8: Vec<u8>,
}

/// The CA certificate (DER) of the harness's running server.
pub fn ca_der(h: &tessera_tests::Harness) -> Vec<u8> {
    h.server
        .as_ref()
        .expect("server running")
        .ca_certificate_der()
}

/// A client TLS config like the agent's: trusts `ca`, expects `server_id`, presents
/// `credential` (None: no client certificate, as for node attestation).
pub fn node_tls(
    ca: Vec<u8>,
    credential: Option<&Credential>,
    server_id: &str,
) -> rustls::ClientConfig {
    use std::sync::Arc;
    use tessera_agent::tls::{
        AgentCredentials, ServerTrust, ServerVerifier, client_config, provider,
    };
    let trust = Arc::new(ServerTrust::default());
    trust.set(&[ca]);
    let verifier = Arc::new(ServerVerifier::new(
        trust,
        tessera_plugin_sdk::SpiffeId::parse(server_id).unwrap(),
        provider(),
    ));
    let credentials = credential.map(|c| {
        let credentials = Arc::new(AgentCredentials::default());
        credentials.set(c.chain.clone(), c.pkcs8.clone()).unwrap();
        credentials
    });
    client_config(verifier, credentials, provider()).unwrap()
}

/// A node API client on a fresh channel to `address` with `config`.
pub fn node_client_with(
    address: &str,
    config: rustls::ClientConfig,
) -> tessera_proto::node::node_client::NodeClient<Channel> {
    tessera_proto::node::node_client::NodeClient::new(
        tessera_agent::node::channel(address, std::sync::Arc::new(config)).unwrap(),
    )
}

/// A node API client of the harness's server presenting `credential`.
pub fn node_client(
    h: &tessera_tests::Harness,
    credential: Option<&Credential>,
) -> tessera_proto::node::node_client::NodeClient<Channel> {
    node_client_with(
        &h.node_address(),
        node_tls(ca_der(h), credential, SERVER_ID),
    )
}

/// A fresh P-256 key and a plain CSR (DER) for it.
pub fn new_key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    (key, csr)
}

/// Sends `messages` on an `AttestAgent` stream (no client certificate) and returns the
/// agent SVID of the first answer.
pub async fn attest_messages_at(
    address: &str,
    ca: Vec<u8>,
    messages: Vec<tessera_proto::node::AttestAgentRequest>,
) -> Result<tessera_proto::node::AgentSvid, tonic::Status> {
    use tessera_proto::node::attest_agent_response::Step;
    let mut client = node_client_with(address, node_tls(ca, None, SERVER_ID));
    let mut stream = client
        .attest_agent(futures::stream::iter(messages))
        .await?
        .into_inner();
    match stream.message().await?.and_then(|m| m.step) {
        Some(Step::Result(svid)) => Ok(svid),
        Some(Step::Challenge(_)) => Err(tonic::Status::internal("unexpected challenge")),
        None => Err(tonic::Status::aborted(
            "attestation stream ended without a result",
        )),
    }
}

/// One `join_token` attestation message.
pub fn join_token_params(token: &[u8], csr: Vec<u8>) -> tessera_proto::node::AttestAgentRequest {
    use tessera_proto::node::{AttestAgentRequest, AttestationParams, attest_agent_request};
    AttestAgentRequest {
        step: Some(attest_agent_request::Step::Params(AttestationParams {
            r#type: "join_token".into(),
            payload: token.to_vec(),
            csr,
        })),
    }
}

/// `join_token` attestation against the server at `address` trusting `ca`.
pub async fn attest_at(
    address: &str,
    ca: Vec<u8>,
    token: &[u8],
    csr: Vec<u8>,
) -> Result<tessera_proto::node::AgentSvid, tonic::Status> {
    attest_messages_at(address, ca, vec![join_token_params(token, csr)]).await
}

/// One `token` presented by concurrent attestations, one per `(address, ca)` target,
/// released together by a barrier; their results in target order.
pub async fn concurrent_attestations(
    targets: Vec<(String, Vec<u8>)>,
    token: &str,
) -> Vec<Result<tessera_proto::node::AgentSvid, tonic::Status>> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(targets.len()));
    let tasks: Vec<_> = targets
        .into_iter()
        .map(|(address, ca)| {
            let (csr, token) = (new_key_and_csr().1, token.to_owned());
            let barrier = std::sync::Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                attest_at(&address, ca, token.as_bytes(), csr).await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("attestation task"));
    }
    results
}

/// `join_token` attestation with `token` (raw bytes, so malformed tokens can be sent)
/// and `csr` against the harness's server.
pub async fn attest_raw(
    h: &tessera_tests::Harness,
    token: impl AsRef<[u8]>,
    csr: Vec<u8>,
) -> Result<tessera_proto::node::AgentSvid, tonic::Status> {
    attest_at(&h.node_address(), ca_der(h), token.as_ref(), csr).await
}

/// Attests a new agent with a fresh token (giving it `alias`); returns its credential
/// and agent ID.
pub async fn attested_agent(
    h: &tessera_tests::Harness,
    alias: Option<&str>,
) -> (Credential, String) {
    let token = h.join_token(alias).await;
    let (key, csr) = new_key_and_csr();
    let svid = attest_raw(h, &token, csr).await.unwrap();
    (
        Credential {
            chain: svid.cert_chain,
            pkcs8: key.serialize_der(),
        },
        svid.spiffe_id,
    )
}

/// One `BatchNewX509SVID` item for `entry_id` over `public_key` (SPKI DER); the
/// call's own failure is returned as `Err`.
pub async fn new_x509_svid(
    client: &mut tessera_proto::node::node_client::NodeClient<Channel>,
    entry_id: &str,
    public_key: Vec<u8>,
) -> Result<tessera_proto::node::x509svid_result::Result, tonic::Status> {
    use tessera_proto::node::{BatchNewX509svidRequest, NewX509svidParams};
    let mut results = client
        .batch_new_x509svid(BatchNewX509svidRequest {
            params: vec![NewX509svidParams {
                entry_id: entry_id.to_owned(),
                public_key,
                template_values: Default::default(),
            }],
        })
        .await?
        .into_inner()
        .results;
    assert_eq!(results.len(), 1, "one result per item");
    let result = results.remove(0);
    assert_eq!(result.entry_id, entry_id);
    Ok(result.result.expect("a result"))
}

/// A workload SVID for `entry_id`, minted through `client` (an agent allowed to serve
/// the entry) for a fresh key.
pub async fn workload_credential(
    client: &mut tessera_proto::node::node_client::NodeClient<Channel>,
    entry_id: &str,
) -> Credential {
    use rcgen::PublicKeyData;
    use tessera_proto::node::x509svid_result::Result as Item;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    match new_x509_svid(client, entry_id, key.subject_public_key_info())
        .await
        .unwrap()
    {
        Item::Svid(svid) => Credential {
            chain: svid.cert_chain,
            pkcs8: key.serialize_der(),
        },
        Item::Error(err) => panic!("no SVID for {entry_id}: {err:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The test workload (the `spiffe` crate's client in a child process) in any mode, and
// CLI runs fed on standard input (jwt.rs).

/// Runs the test workload with `args` (a mode, the socket, then the mode's arguments)
/// as `uid` (None = this process's uid) and returns every JSON line it printed.
pub async fn run_workload(args: &[&str], uid: Option<u32>) -> Vec<serde_json::Value> {
    let mut command = tokio::process::Command::new(workload_bin());
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let out = run_command(command).await;
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|err| {
                panic!("`{}` printed a non-JSON line ({err}): {l}", out.command)
            })
        })
        .collect();
    assert!(
        !lines.is_empty(),
        "`{}` printed nothing (exit {}): {}",
        out.command,
        out.code,
        out.stderr
    );
    lines
}

/// Runs `command` with `input` on its standard input (then closed), at most 20 s.
pub async fn run_with_stdin(mut command: tokio::process::Command, input: &str) -> CliOutput {
    use tokio::io::AsyncWriteExt;
    let description = format!("{:?}", command.as_std());
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("`{description}` did not start: {err}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input.as_bytes()).await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{description}` did not finish within 20 s"))
        .unwrap();
    CliOutput {
        command: description,
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Caller races and agent hardening (hardening.rs): descriptor counts, and a Python
// process that holds one Workload API connection and hands it to a child.

/// Open file descriptors of this process (the agents run in it).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (at most 5 s) until this process has no more than `baseline` open
/// descriptors again, for work the agent finishes after a client left.
pub async fn settle_fds(baseline: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = open_fds();
        if now <= baseline {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {now} descriptors open, {baseline} before"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A Python 3 script that connects to the socket (argv 1), waits until the agent has
/// accepted and identified it (the agent's HTTP/2 preface arrives; peeked, so it is
/// still there for whoever speaks gRPC on the connection), prints `connected`, then obeys
/// commands on stdin:
///
/// - `fork-client FLAG ARGS...`: fork; the child waits until the file FLAG exists, puts
///   the connection on its stdin and execs the test workload (argv 2) with ARGS (an
///   `inherit-stdin-*` mode). Prints `child <pid>`.
/// - `exec PATH ARGS...`: exec PATH (the connection is close-on-exec; the forked
///   client keeps its copy).
/// - `exit`: exit at once.
///
/// With `HOLDER_NOT_DUMPABLE=1` in its environment it first makes itself non-dumpable.
pub const HOLDER_PY: &str = r#"
import os, socket, sys, time
sock_path, workload = sys.argv[1], sys.argv[2]
if os.environ.get("HOLDER_NOT_DUMPABLE"):
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        sys.exit("prctl failed")
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
first = s.recv(1, socket.MSG_PEEK)
print("connected" if first else "refused", flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "fork-client":
        flag, args = cmd[1], cmd[2:]
        pid = os.fork()
        if pid == 0:
            deadline = time.time() + 20
            while not os.path.exists(flag):
                if time.time() > deadline:
                    os._exit(3)
                time.sleep(0.005)
            os.dup2(s.fileno(), 0)
            os.execv(workload, [workload] + args)
        print("child %d" % pid, flush=True)
    elif cmd[0] == "exec":
        os.execv(cmd[1], cmd[1:])
    elif cmd[0] == "exit":
        os._exit(0)
"#;

/// A Python script: a non-leader thread connects (argv 1); then the thread-group leader
/// exits with the raw `exit` system call (the process lives on in the thread); once the
/// leader is a zombie the thread prints `leader-gone`, forks, and the child execs the
/// test workload (argv 2) `inherit-stdin-fetch` on the connection (SECURITY.md §3.2
/// item 23).
pub const THREAD_HOLDER_PY: &str = r#"
import ctypes, os, socket, sys, threading, time
sock_path, workload = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
SYS_exit = {"x86_64": 60, "aarch64": 93}[os.uname().machine]
tgid = os.getpid()
connected = threading.Event()
def worker():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.recv(1, socket.MSG_PEEK)
    connected.set()
    deadline = time.time() + 10
    while True:
        with open("/proc/%d/task/%d/stat" % (tgid, tgid)) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            break
        if time.time() > deadline:
            os._exit(3)
        time.sleep(0.005)
    print("leader-gone", flush=True)
    pid = os.fork()
    if pid == 0:
        os.dup2(s.fileno(), 0)
        os.execv(workload, [workload, "inherit-stdin-fetch"])
    os.waitpid(pid, 0)
    print("client-done", flush=True)
    time.sleep(30)
threading.Thread(target=worker).start()
connected.wait()
libc.syscall(SYS_exit, 0)
"#;

/// A Python process running `script` with the agent `socket` and the test workload as
/// arguments, as `uid` (None = ours), with extra `env`; its stdout lines (its own and its
/// forked clients') arrive on a channel. Killed and reaped when dropped. Uses std's
/// process API: std never reaps a child behind our back (the zombie scenario needs it).
pub struct Holder {
    pub child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Holder {
    pub fn spawn(script: &str, socket: &Path, uid: Option<u32>, env: &[(&str, &str)]) -> Self {
        use std::io::BufRead as _;
        use std::os::unix::process::CommandExt as _;
        let mut command = std::process::Command::new("/usr/bin/python3");
        command
            .arg("-c")
            .arg(script)
            .arg(socket)
            .arg(workload_bin())
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        let mut child = command.spawn().expect("python3 starts");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command line.
    pub fn send(&mut self, command: &str) {
        use std::io::Write as _;
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next stdout line (10 s at most).
    pub async fn line(&mut self) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.lines.recv())
            .await
            .expect("a line within 10 s")
            .expect("the holder and its clients printed a line")
    }

    /// The next line that is JSON (what a forked client printed).
    pub async fn json(&mut self) -> serde_json::Value {
        loop {
            let line = self.line().await;
            if line.starts_with('{') {
                return serde_json::from_str(&line).unwrap();
            }
        }
    }

    /// Waits for `connected` (the agent accepted and identified the holder).
    pub async fn connected(&mut self) {
        assert_eq!(self.line().await, "connected");
    }

    /// Forks a client that waits for `flag` and runs the workload with `args`.
    pub async fn fork_client(&mut self, flag: &Path, args: &str) -> u32 {
        self.send(&format!("fork-client {} {args}", flag.display()));
        let line = self.line().await;
        line.strip_prefix("child ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected holder output {line:?}"))
    }

    /// Waits for the holder to exit and reaps it.
    pub fn reap(&mut self) {
        self.child.wait().unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Field 3 (state) of `/proc/<pid>/stat`, `None` once the process is gone.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Waits (10 s at most) until `condition` holds, checking every 5 ms on a blocking
/// thread.
pub async fn poll_until(what: &str, condition: impl Fn() -> bool + Send + 'static) {
    let what = what.to_owned();
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !condition() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    })
    .await
    .unwrap();
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle`).
pub fn split_der(bytes: &[u8]) -> Vec<Vec<u8>> {
    tessera_agent::cli::split_der_certificates(bytes).expect("concatenated DER certificates")
}

/// Whether `chain` (leaf first) verifies against `bundle` with webpki at `at` for
/// `usage`.
pub fn chain_verifies(
    chain: &[Vec<u8>],
    bundle: &[Vec<u8>],
    at: std::time::SystemTime,
    usage: webpki::KeyUsage,
) -> Result<(), webpki::Error> {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let anchors: Vec<_> = bundle
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf_der = CertificateDer::from(chain[0].as_slice());
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    let at = UnixTime::since_unix_epoch(at.duration_since(std::time::UNIX_EPOCH).unwrap());
    leaf.verify_for_usage(algs.all, &anchors, &intermediates, at, usage, None, None)
        .map(|_| ())
}

/// Verifies `chain` (leaf first) against `bundle` with webpki, now, for client
/// authentication; returns the issuer's subject (it names the CA serial).
pub fn verify(chain: &[Vec<u8>], bundle: &[Vec<u8>]) -> String {
    chain_verifies(
        chain,
        bundle,
        std::time::SystemTime::now(),
        webpki::KeyUsage::client_auth(),
    )
    .expect("the SVID verifies against the bundle");
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    cert.issuer().to_string()
}

/// `tessera-server run` as a child process (killed on drop), its output in `log`.
pub struct ServerProcess {
    /// The process.
    pub child: tokio::process::Child,
    /// Where its stdout and stderr go.
    pub log: std::path::PathBuf,
}

impl ServerProcess {
    /// Starts `tessera-server run --config <config>` at log level info.
    pub fn start(config: &Path, log: std::path::PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut command = product_command("tessera-server");
        command
            .args(["run", "--config", arg(config)])
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true);
        Self {
            child: command.spawn().unwrap(),
            log,
        }
    }

    /// SIGKILL, and checks that the signal is what ended it.
    pub async fn sigkill(&mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(status.code().is_none(), "killed by a signal: {status}");
    }
}
