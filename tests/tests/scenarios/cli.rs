//! The command-line binaries as an operator and a workload use them: config errors and
//! usage errors exit 64 with one line; the admin commands against a running server;
//! `tessera-agent api fetch x509` and `healthcheck` against a running agent; and the
//! real daemons started from config files, stopped with SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tessera_tests::{Harness, my_uid};
use tokio::io::AsyncBufReadExt;

use crate::support::{
    CliOutput, arg, product_command, run_command, run_product, wait_healthy, workload_bin,
};

const SERVER: &str = "tessera-server";
const AGENT: &str = "tessera-agent";

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tessera-cli")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------
// 1. Config and usage errors
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_config_errors_exit_64_with_one_line() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    let base = format!(
        "[server]\ntrust_domain = \"example.org\"\ndata_dir = \"{}\"\n",
        data.display()
    );

    // Unknown key: named, with its line.
    let file = write(
        dir.path(),
        "unknown.toml",
        &format!("{base}bogus_key = 1\n"),
    );
    let out = run_product(SERVER, &["run", "-c", arg(&file)]).await;
    out.expect_code(64);
    let line = out.one_stderr_line();
    assert!(line.contains("bogus_key"), "{line}");
    assert!(line.contains("line 4"), "{line}");

    // Missing file.
    let missing = dir.path().join("absent.toml");
    let out = run_product(SERVER, &["run", "-c", arg(&missing)]).await;
    out.expect_code(64);
    let line = out.one_stderr_line();
    assert!(line.contains("absent.toml"), "{line}");

    // Invalid trust domain: the key is named.
    let file = write(
        dir.path(),
        "bad-td.toml",
        &base.replace("example.org", "Not A Domain"),
    );
    let out = run_product(SERVER, &["run", "-c", arg(&file)]).await;
    out.expect_code(64);
    let line = out.one_stderr_line();
    assert!(line.contains("server.trust_domain"), "{line}");

    // Nothing was started or created by a refused config.
    assert!(!data.exists(), "a refused config must not create data_dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_config_errors_exit_64_with_one_line() {
    let dir = temp_dir();
    let text = format!(
        "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:1\"\ndata_dir = \"{}\"\ninsecure_bootstrap = true\n",
        dir.path().join("data").display()
    );
    let file = write(dir.path(), "agent.toml", &text);
    let out = run_product(AGENT, &["run", "-c", arg(&file)]).await;
    out.expect_code(64);
    let line = out.one_stderr_line();
    assert!(line.contains("insecure_bootstrap"), "{line}");
    assert!(line.contains("line 5"), "{line}");

    let out = run_product(AGENT, &["run", "-c", arg(&dir.path().join("absent.toml"))]).await;
    out.expect_code(64);
    out.one_stderr_line();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_and_help_exits_0() {
    // Missing required flags: clap's own code would be 2; ours is 64.
    let out = run_product(SERVER, &["entry", "create"]).await;
    out.expect_code(64);
    assert!(out.stderr.contains("--parent-id"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    for (bin, args) in [
        (SERVER, &["frobnicate"][..]),
        (SERVER, &["run"][..]),
        (SERVER, &["token", "generate", "--ttl", "soon"][..]),
        (SERVER, &["entry", "list", "--output", "yaml"][..]),
        (AGENT, &["api", "fetch"][..]),
        (AGENT, &["healthcheck", "--timeout", "x"][..]),
    ] {
        run_product(bin, args).await.expect_code(64);
    }

    for (bin, args) in [
        (SERVER, &["--help"][..]),
        (SERVER, &["entry", "create", "--help"][..]),
        (AGENT, &["--help"][..]),
        (AGENT, &["api", "fetch", "x509", "--help"][..]),
    ] {
        let out = run_product(bin, args).await;
        out.expect_code(0);
        assert!(out.stdout.contains("Usage"), "{}", out.stdout);
    }
    let out = run_product(SERVER, &["--version"]).await;
    out.expect_code(0);
    assert!(out.stdout.starts_with("tessera-server "), "{}", out.stdout);
}

// ---------------------------------------------------------------------------------
// 2. Admin CLI against a running server
// ---------------------------------------------------------------------------------

/// Runs `tessera-server ARGS --socket <admin socket of h>`.
async fn admin(h: &Harness, args: &[&str]) -> CliOutput {
    let socket = h.admin_socket();
    let mut all = args.to_vec();
    all.extend(["--socket", arg(&socket)]);
    run_product(SERVER, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_generate_prints_the_token() {
    let h = Harness::start().await;
    let out = admin(&h, &["token", "generate"]).await;
    out.expect_code(0);
    assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
    let token = out.stdout.trim_end();
    let (id, secret) = token.split_once('.').unwrap();
    assert!(
        is_lower_hex(id, 32) && is_lower_hex(secret, 64),
        "token {token:?} is not <32 hex>.<64 hex>"
    );

    let json = admin(
        &h,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/a",
            "--ttl",
            "5m",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let token = json["token"].as_str().unwrap();
    let token_id = json["token_id"].as_str().unwrap();
    assert!(is_lower_hex(token_id, 32), "{json}");
    assert!(token.starts_with(&format!("{token_id}.")), "{json}");
    assert!(
        json["agent_spiffe_id"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://example.org/"),
        "{json}"
    );
    assert!(json["expires_at"].is_string(), "{json}");

    // A reserved alias is refused as invalid input.
    let out = admin(
        &h,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/tessera/n",
        ],
    )
    .await;
    out.expect_code(64);
    out.one_stderr_line();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_create_show_list_delete() {
    let h = Harness::start().await;
    let out = admin(
        &h,
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:gid:1000",
            "--x509-ttl",
            "10m",
            "--dns-name",
            "w.example.org",
            "--hint",
            "web",
        ],
    )
    .await;
    out.expect_code(0);
    let id = out.stdout.trim_end().to_owned();
    assert!(is_lower_hex(&id, 32), "entry id {id:?}");
    assert_eq!(out.stdout, format!("{id}\n"));

    // Text.
    let text = admin(&h, &["entry", "show", &id]).await;
    text.expect_code(0);
    for needle in [
        id.as_str(),
        "spiffe://example.org/w",
        "spiffe://example.org/node/a",
        "unix:uid:1000",
        "unix:gid:1000",
        "10m",
        "w.example.org",
        "web",
    ] {
        assert!(text.stdout.contains(needle), "{needle} in {}", text.stdout);
    }

    // JSON: the fields as created.
    let shown = admin(&h, &["entry", "show", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["spiffe_id"], "spiffe://example.org/w");
    assert_eq!(shown["parent_id"], "spiffe://example.org/node/a");
    let mut selectors: Vec<&str> = shown["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    selectors.sort_unstable();
    assert_eq!(selectors, ["unix:gid:1000", "unix:uid:1000"], "{shown}");
    assert_eq!(shown["x509_svid_ttl_seconds"], 600);
    assert_eq!(shown["dns_names"], serde_json::json!(["w.example.org"]));
    assert_eq!(shown["hint"], "web");

    // The same through the admin API: the CLI shows what the server holds.
    let listed = admin(&h, &["entry", "list", "--output", "json"])
        .await
        .json();
    let listed = listed.as_array().unwrap();
    assert!(listed.contains(&shown), "{listed:?} lacks {shown}");
    let text = admin(&h, &["entry", "list"]).await;
    text.expect_code(0);
    assert!(text.stdout.contains(&id), "{}", text.stdout);

    let out = admin(&h, &["entry", "delete", &id]).await;
    out.expect_code(0);
    assert!(out.stdout.contains(&id), "{}", out.stdout);
    let out = admin(&h, &["entry", "show", &id]).await;
    out.expect_code(1);
    assert!(out.one_stderr_line().contains("NotFound"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    // Deleting twice is a failure, not a usage error.
    admin(&h, &["entry", "delete", &id]).await.expect_code(1);
    let listed = admin(&h, &["entry", "list", "--output", "json"])
        .await
        .json();
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id.as_str()),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_entry_exits_64_with_a_clear_message() {
    let h = Harness::start().await;
    let out = admin(
        &h,
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--spiffe-id",
            "spiffe://example.org/tessera/x",
            "--selector",
            "unix:uid:1000",
        ],
    )
    .await;
    out.expect_code(64);
    let line = out.one_stderr_line();
    assert!(line.contains("InvalidArgument"), "{line}");
    assert!(line.contains("reserved"), "{line}");
    assert!(line.contains("spiffe://example.org/tessera/x"), "{line}");
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    // A foreign trust domain, and a selector the CLI itself cannot parse.
    let out = admin(
        &h,
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--spiffe-id",
            "spiffe://other.org/w",
            "--selector",
            "unix:uid:1000",
        ],
    )
    .await;
    out.expect_code(64);
    assert!(
        out.one_stderr_line().contains("other.org"),
        "{}",
        out.stderr
    );
    let out = admin(
        &h,
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/a",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--selector",
            "nocolon",
        ],
    )
    .await;
    out.expect_code(64);
    // Nothing was created.
    let listed = admin(&h, &["entry", "list", "--output", "json"])
        .await
        .json();
    assert_eq!(listed, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_list_shows_an_attested_agent() {
    let h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let agent_id = agent.agent_id().to_string();
    let listed = admin(&h, &["agent", "list", "--output", "json"])
        .await
        .json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["spiffe_id"], agent_id.as_str());
    assert_eq!(listed[0]["attestation_type"], "join_token");
    let text = admin(&h, &["agent", "list"]).await;
    text.expect_code(0);
    assert!(text.stdout.contains(&agent_id), "{}", text.stdout);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_show_prints_the_ca() {
    let h = Harness::start().await;
    let ca = h.server.as_ref().unwrap().ca_certificate_der();
    let out = admin(&h, &["bundle", "show"]).await;
    out.expect_code(0);
    let blocks = pem::parse_many(&out.stdout).unwrap();
    assert_eq!(blocks.len(), 1, "{}", out.stdout);
    assert_eq!(blocks[0].tag(), "CERTIFICATE");
    assert_eq!(blocks[0].contents(), ca.as_slice());

    let json = admin(&h, &["bundle", "show", "--output", "json"])
        .await
        .json();
    assert_eq!(json["trust_domain"], "example.org", "{json}");
    let authorities = json["x509_authorities"].as_array().unwrap();
    assert_eq!(authorities.len(), 1, "{json}");
    let block = pem::parse(authorities[0].as_str().unwrap()).unwrap();
    assert_eq!(block.contents(), ca.as_slice());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_healthcheck() {
    let h = Harness::start().await;
    let out = admin(&h, &["healthcheck"]).await;
    out.expect_code(0);
    assert!(out.stdout.contains("healthy"), "{}", out.stdout);
    let json = admin(&h, &["healthcheck", "--output", "json"]).await.json();
    assert_eq!(json["healthy"], true, "{json}");
    assert_eq!(json["trust_domain"], "example.org", "{json}");

    let missing = h.path("nowhere/admin.sock");
    let out = run_product(SERVER, &["healthcheck", "--socket", arg(&missing)]).await;
    out.expect_code(1);
    assert!(
        out.one_stderr_line().contains(arg(&missing)),
        "{}",
        out.stderr
    );
    // The env variable names the socket when the flag is absent.
    let mut command = product_command(SERVER);
    command
        .arg("healthcheck")
        .env("TESSERA_ADMIN_SOCKET", h.admin_socket());
    run_command(command).await.expect_code(0);
}

// ---------------------------------------------------------------------------------
// 3. Agent CLI against a running agent
// ---------------------------------------------------------------------------------

const WORKLOAD_ID: &str = "spiffe://example.org/workload/cli";

/// A harness with one agent and an entry for this process's uid.
async fn agent_with_entry() -> (Harness, tessera_agent::RunningAgent) {
    let h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    h.create_entry(
        agent.agent_id().as_ref(),
        WORKLOAD_ID,
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    // The entry reaches the agent by push; wait until this uid is served.
    let socket = agent.socket_path().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if crate::support::fetch_x509_raw(&socket).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "entry never reached the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (h, agent)
}

/// Checks the files `api fetch x509 --write` produced: the chain verifies against the
/// written bundle, the key is private and matches the leaf.
fn check_written_svid(dir: &Path, ca: &[u8]) {
    let read_pem = |name: &str, tag: &str| -> Vec<Vec<u8>> {
        let blocks = pem::parse_many(std::fs::read(dir.join(name)).unwrap()).unwrap();
        assert!(!blocks.is_empty(), "{name} is empty");
        blocks
            .into_iter()
            .map(|b| {
                assert_eq!(b.tag(), tag, "{name}");
                b.into_contents()
            })
            .collect()
    };
    let chain: Vec<CertificateDer<'static>> = read_pem("svid.pem", "CERTIFICATE")
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle = read_pem("bundle.pem", "CERTIFICATE");
    assert!(
        bundle.iter().any(|der| der == ca),
        "bundle.pem lacks the CA"
    );
    let anchors: Vec<_> = bundle
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
    leaf.verify_for_usage(
        algs.all,
        &anchors,
        &chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("svid.pem verifies against bundle.pem");
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let uri = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    assert_eq!(uri, Some(WORKLOAD_ID));

    let key_path = dir.join("svid.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "svid.key mode {mode:o}");
    let key = read_pem("svid.key", "PRIVATE KEY").remove(0);
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key),
    ))
    .unwrap();
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .expect("svid.key matches svid.pem");
    // No temporary files left behind.
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["bundle.pem", "svid.key", "svid.pem"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fetch_x509_prints_and_writes_the_svid() {
    let (h, agent) = agent_with_entry().await;
    let socket = agent.socket_path().to_owned();
    let ca = h.server.as_ref().unwrap().ca_certificate_der();

    let out = run_product(AGENT, &["api", "fetch", "x509", "--socket", arg(&socket)]).await;
    out.expect_code(0);
    assert!(out.stdout.contains(WORKLOAD_ID), "{}", out.stdout);

    let json = run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            arg(&socket),
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let svids = json["svids"].as_array().unwrap();
    assert_eq!(svids.len(), 1, "{json}");
    assert_eq!(svids[0]["spiffe_id"], WORKLOAD_ID);
    assert!(svids[0]["serial"].is_string(), "{json}");
    assert!(svids[0]["expires_at"].is_string(), "{json}");

    let dir = h.path("out");
    let out = run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            arg(&socket),
            "--write",
            arg(&dir),
        ],
    )
    .await;
    out.expect_code(0);
    check_written_svid(&dir, &ca);
    // Writing again replaces the files in place.
    run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "x509",
            "--socket",
            &format!("unix://{}", socket.display()),
            "--write",
            arg(&dir),
        ],
    )
    .await
    .expect_code(0);
    check_written_svid(&dir, &ca);

    // SPIFFE_ENDPOINT_SOCKET, as every SPIFFE client reads it.
    let mut command = product_command(AGENT);
    command
        .args(["api", "fetch", "x509", "--output", "json"])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        );
    let json = run_command(command).await.json();
    assert_eq!(json["svids"][0]["spiffe_id"], WORKLOAD_ID, "{json}");

    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_fetch_x509_failures() {
    let (h, agent) = agent_with_entry().await;
    let missing = h.path("nowhere/agent.sock");
    let out = run_product(AGENT, &["api", "fetch", "x509", "--socket", arg(&missing)]).await;
    out.expect_code(1);
    assert!(
        out.one_stderr_line().contains(arg(&missing)),
        "{}",
        out.stderr
    );
    // Not a unix endpoint, or relative: usage errors.
    for socket in ["tcp://127.0.0.1:1", "relative.sock"] {
        run_product(AGENT, &["api", "fetch", "x509", "--socket", socket])
            .await
            .expect_code(64);
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_healthcheck() {
    let (h, agent) = agent_with_entry().await;
    let socket = agent.socket_path().to_owned();
    let out = run_product(AGENT, &["healthcheck", "--socket", arg(&socket)]).await;
    out.expect_code(0);
    assert!(out.stdout.contains("healthy"), "{}", out.stdout);
    let json = run_product(
        AGENT,
        &["healthcheck", "--socket", arg(&socket), "--output", "json"],
    )
    .await
    .json();
    assert_eq!(json["healthy"], true, "{json}");

    let missing = h.path("nowhere/agent.sock");
    let out = run_product(AGENT, &["healthcheck", "--socket", arg(&missing)]).await;
    out.expect_code(1);
    out.one_stderr_line();
    agent.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------
// 4. The real daemons, stopped with SIGTERM
// ---------------------------------------------------------------------------------

/// A daemon started from its binary; its stdout and stderr go to `log`. Killed if
/// dropped (a failed test leaves no process behind).
struct Daemon {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn start(name: &str, args: &[&str], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut command = product_command(name);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test, showing the daemon's log, if it has already exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("daemon exited early ({status}):\n{}", self.log());
        }
    }

    /// Sends SIGTERM and returns the exit code (panics if it takes over `limit`).
    async fn terminate(&mut self, limit: Duration) -> i32 {
        let pid = self.child.id().expect("daemon still running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("no exit within {limit:?} of SIGTERM:\n{}", self.log()),
        };
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal ({status}):\n{}", self.log()))
    }
}

/// The workload's next JSON line within 5 s (None at end of output).
async fn next_json(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> Option<serde_json::Value> {
    let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("workload output within 5 s")
        .unwrap();
    line.map(|l| serde_json::from_str(&l).unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_stop_cleanly_on_sigterm() {
    let dir = temp_dir();
    let root = dir.path();
    let port = free_port();
    let admin_socket = root.join("admin/admin.sock");
    let agent_socket = root.join("agent/sock/agent.sock");
    let bootstrap = root.join("bootstrap.pem");
    std::fs::create_dir_all(root.join("agent")).unwrap();
    let server_toml = write(
        root,
        "server.toml",
        &format!(
            "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_socket_path = \"{}\"\n",
            root.join("server-data").display(),
            admin_socket.display(),
        ),
    );
    let agent_toml = write(
        root,
        "agent.toml",
        &format!(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{port}\"\nsocket_path = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n",
            agent_socket.display(),
            root.join("agent/data").display(),
            bootstrap.display(),
        ),
    );

    // Server, bootstrap bundle, token, entry: all through the CLI.
    let mut server = Daemon::start(
        SERVER,
        &["run", "-c", arg(&server_toml)],
        root.join("server.log"),
    );
    wait_healthy(SERVER, &admin_socket, Duration::from_secs(10)).await;
    server.assert_running();
    let socket = arg(&admin_socket);
    let out = run_product(SERVER, &["bundle", "show", "--socket", socket]).await;
    out.expect_code(0);
    std::fs::write(&bootstrap, &out.stdout).unwrap();
    let out = run_product(
        SERVER,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/node/n",
            "--socket",
            socket,
        ],
    )
    .await;
    out.expect_code(0);
    let token = out.stdout.trim().to_owned();
    run_product(
        SERVER,
        &[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/node/n",
            "--spiffe-id",
            "spiffe://example.org/workload/sigterm",
            "--selector",
            &format!("unix:uid:{}", my_uid()),
            "--socket",
            socket,
        ],
    )
    .await
    .expect_code(0);

    // Agent, attested with the token; a workload watching its SVIDs.
    let mut agent = Daemon::start(
        AGENT,
        &["run", "-c", arg(&agent_toml), "--join-token", &token],
        root.join("agent.log"),
    );
    wait_healthy(AGENT, &agent_socket, Duration::from_secs(10)).await;
    agent.assert_running();
    let mut watcher = tokio::process::Command::new(workload_bin())
        .arg("watch")
        .arg(&agent_socket)
        .arg("2")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first = next_json(&mut lines).await.expect("a first line");
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(
        first["svids"][0]["spiffe_id"],
        "spiffe://example.org/workload/sigterm"
    );

    // SIGTERM the agent: exit 0 promptly, socket gone, the open stream ended.
    let code = agent.terminate(Duration::from_secs(5)).await;
    assert_eq!(code, 0, "agent exit code; log:\n{}", agent.log());
    assert!(
        !agent_socket.exists(),
        "agent socket left behind; log:\n{}",
        agent.log()
    );
    let last = next_json(&mut lines)
        .await
        .expect("the workload reports the end");
    assert_eq!(last["ok"], false, "{last}");
    assert!(
        next_json(&mut lines).await.is_none(),
        "workload printed more"
    );
    let status = tokio::time::timeout(Duration::from_secs(5), watcher.wait())
        .await
        .expect("workload exits")
        .unwrap();
    assert!(status.success(), "{status}");

    // SIGTERM the server: exit 0, admin socket gone; the CLI now fails cleanly.
    let code = server.terminate(Duration::from_secs(5)).await;
    assert_eq!(code, 0, "server exit code; log:\n{}", server.log());
    assert!(
        !admin_socket.exists(),
        "admin socket left behind; log:\n{}",
        server.log()
    );
    run_product(SERVER, &["healthcheck", "--socket", socket])
        .await
        .expect_code(1);
}
