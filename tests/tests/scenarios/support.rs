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
