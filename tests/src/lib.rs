//! The scenario harness of tessera: starts real servers and agents (through their
//! libraries, in this process) on temporary directories, loopback TCP and Unix sockets,
//! and drives them with real clients: the admin API, the node API with hand-made
//! credentials, the agent's Workload API through the Rust `spiffe` crate in a child
//! process, and the CLI binaries.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: a failed setup step is a failed scenario"
)]

pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera_agent::{AgentConfig, RunningAgent};
use tessera_proto::admin::admin_client::AdminClient;
use tessera_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest};
use tessera_proto::types::{Entry, Selector};
use tessera_server::RunningServer;
use tessera_server::config::ServerConfig;
use tonic::transport::Channel;

/// The trust domain every scenario uses.
pub const TRUST_DOMAIN: &str = "example.org";

/// A server under test plus the directory everything lives in.
pub struct Harness {
    /// Root of every file of the scenario.
    pub dir: tempfile::TempDir,
    /// The running server (None while stopped).
    pub server: Option<RunningServer>,
    /// Extra `[server]` lines for the config.
    server_extra: String,
    /// Port of the node API, kept across restarts.
    port: u16,
    /// The trust domain of this deployment ([`TRUST_DOMAIN`] unless
    /// [`Harness::start_in`] says otherwise).
    trust_domain: String,
}

impl Harness {
    /// Starts a server with default settings.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts a server with extra `[server]` config lines.
    pub async fn start_with(server_extra: &str) -> Self {
        Self::start_in(TRUST_DOMAIN, server_extra).await
    }

    /// Starts a server of `trust_domain` (a second deployment, for federation) with
    /// extra `[server]` config lines; its agents are of that trust domain too.
    pub async fn start_in(trust_domain: &str, server_extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-test")
            .tempdir()
            .expect("temp dir");
        // Other uids (the scenarios run workloads as nobody) must reach the agents'
        // sockets; the secret directories inside are 0700 on their own.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod temp dir");
        let mut harness = Self {
            dir,
            server: None,
            server_extra: server_extra.to_owned(),
            port: 0,
            trust_domain: trust_domain.to_owned(),
        };
        harness.start_server().await;
        harness
    }

    /// The server's config text.
    pub fn server_config_text(&self) -> String {
        format!(
            "[server]\ntrust_domain = \"{}\"\nbind_address = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\nadmin_socket_path = \"{}\"\n{}\n",
            self.trust_domain,
            self.port,
            self.path("server-data").display(),
            self.admin_socket().display(),
            self.server_extra
        )
    }

    /// (Re)starts the server on the same port and data directory.
    pub async fn start_server(&mut self) {
        let config = ServerConfig::parse(&self.server_config_text(), Path::new("test-server.toml"))
            .expect("server config parses");
        let server = tessera_server::start(config).await.expect("server starts");
        self.port = server.node_address().port();
        let pem = tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", &server.ca_certificate_der());
        std::fs::write(self.bootstrap_bundle(), pem).expect("write bootstrap bundle");
        self.server = Some(server);
    }

    /// Stops the server.
    pub async fn stop_server(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("server stops cleanly");
        }
    }

    /// The trust domain of this deployment.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A path under the scenario directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.path("admin/admin.sock")
    }

    /// The node API address.
    pub fn node_address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// An admin API client.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(
            tessera_proto::uds::connect(&self.admin_socket())
                .await
                .expect("admin socket"),
        )
    }

    /// A fresh join token (`<id>.<secret>`), optionally giving the agent `alias`.
    pub async fn join_token(&self, alias: Option<&str>) -> String {
        self.admin()
            .await
            .create_join_token(CreateJoinTokenRequest {
                ttl_seconds: 0,
                alias_spiffe_id: alias.unwrap_or_default().to_owned(),
            })
            .await
            .expect("token")
            .into_inner()
            .token
    }

    /// Creates an entry; returns the server's answer.
    pub async fn create_entry(
        &self,
        parent_id: &str,
        spiffe_id: &str,
        selectors: &[&str],
        x509_ttl_seconds: i64,
    ) -> Result<Entry, tonic::Status> {
        let selectors = selectors
            .iter()
            .map(|s| {
                let (kind, value) = s.split_once(':').unwrap_or((s, ""));
                Selector {
                    r#type: kind.to_owned(),
                    value: value.to_owned(),
                }
            })
            .collect();
        self.admin()
            .await
            .create_entry(CreateEntryRequest {
                entry: Some(Entry {
                    spiffe_id: spiffe_id.to_owned(),
                    parent_id: parent_id.to_owned(),
                    selectors,
                    x509_svid_ttl_seconds: x509_ttl_seconds,
                    ..Entry::default()
                }),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The agents' bootstrap bundle (the CA certificate, written when the server starts).
    pub fn bootstrap_bundle(&self) -> PathBuf {
        self.path("bootstrap.pem")
    }

    /// The config of agent `name` (its own data dir and socket).
    pub fn agent_config(&self, name: &str) -> AgentConfig {
        self.agent_config_with_servers(name, &[self.node_address()])
    }

    /// The config of agent `name` whose `server_address` lists `servers` (in order, for
    /// failover; one address is written as a plain string).
    pub fn agent_config_with_servers(&self, name: &str, servers: &[String]) -> AgentConfig {
        std::fs::create_dir_all(self.path(name)).expect("agent dir");
        let server_address = match servers {
            [one] => format!("{one:?}"),
            many => format!("{many:?}"),
        };
        let text = format!(
            "[agent]\ntrust_domain = \"{}\"\nserver_address = {}\nsocket_path = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n",
            self.trust_domain,
            server_address,
            self.agent_socket(name).display(),
            self.path(&format!("{name}/data")).display(),
            self.bootstrap_bundle().display(),
        );
        AgentConfig::parse(&text, Path::new("test-agent.toml")).expect("agent config parses")
    }

    /// The Workload API socket of agent `name`.
    pub fn agent_socket(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}/sock/agent.sock"))
    }

    /// Starts agent `name` with `token` and waits until it has synced.
    pub async fn start_agent(&self, name: &str, token: Option<String>) -> RunningAgent {
        let agent = tessera_agent::start(self.agent_config(name), token)
            .await
            .expect("agent starts");
        wait_until("agent synced", Duration::from_secs(10), || {
            agent.is_synced()
        })
        .await;
        agent
    }
}

/// Polls `condition` every 20 ms until it holds or `limit` passes (then panics with
/// `what`).
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the test workload `bin` (the `spiffe` crate's client in a child process; the
/// scenarios pass `env!("CARGO_BIN_EXE_tessera-test-workload")`) once in `fetch` mode as
/// `uid` (None = this process's uid) and returns its JSON answer.
pub async fn fetch_as(bin: &Path, socket: &Path, uid: Option<u32>) -> serde_json::Value {
    let mut command = Command::new(bin);
    command.arg("fetch").arg(socket);
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(uid);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run workload");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "workload printed no JSON (status {:?}): {stdout} {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// The uid of this test process.
pub fn my_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}
