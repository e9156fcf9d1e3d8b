//! PostgreSQL for scenarios: a fresh database per test on the shared throwaway server
//! that `scripts/postgres.sh` starts (`TESSERA_TEST_POSTGRES`), and private clusters
//! that a test may stop and start again (a datastore outage).
//!
//! Without `TESSERA_TEST_POSTGRES` a test skips, saying so loudly on stderr, unless
//! `TESSERA_REQUIRE_POSTGRES=1` (set by `scripts/test.sh` when the server is up, and by
//! `.ci/run`): then it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The shared server's superuser URL, or `None` (after saying so) when the test must
/// skip. Panics when PostgreSQL is required and missing.
pub fn shared_server(test: &str) -> Option<String> {
    match std::env::var("TESSERA_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("TESSERA_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "{test}: TESSERA_REQUIRE_POSTGRES=1 but TESSERA_TEST_POSTGRES is not set \
                 (scripts/postgres.sh start prints it)"
            );
            eprintln!(
                "\n!!! SKIPPED {test}: no PostgreSQL (set TESSERA_TEST_POSTGRES, e.g. \
                 `export TESSERA_TEST_POSTGRES=$(scripts/postgres.sh start)`)\n"
            );
            None
        }
    }
}

/// Creates an empty database on the server at `admin_url` and returns its URL.
pub fn create_database(admin_url: &str) -> String {
    let mut bytes = [0_u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    let name: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("tessera_s_{name}");
    psql(admin_url, &format!("CREATE DATABASE {name}"));
    replace_database(admin_url, &name)
}

/// A fresh database on the shared server for `test`, or `None` when the test skips.
pub fn fresh_database(test: &str) -> Option<String> {
    shared_server(test).map(|url| create_database(&url))
}

/// A `[server.datastore]` section for `url`.
pub fn datastore_config(url: &str) -> String {
    format!("[server.datastore]\nkind = \"postgres\"\nconnection_string = \"{url}\"\n")
}

/// Runs one SQL command with `psql`, panicking with its output when it fails.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            url,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql `{sql}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn replace_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = match base.rfind('/') {
        Some(slash) if slash > "postgres://".len() => &base[..slash],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// The newest installed PostgreSQL server's program directory.
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| d.join("postgres").exists() && d.join("pg_ctl").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop()
}

/// A PostgreSQL cluster of one test, in a temporary directory, on a loopback port of
/// its own; stopped and removed on drop.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivateCluster {
    /// Creates and starts a cluster, or `None` (the test skips, as [`shared_server`]
    /// says) when PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<Self> {
        shared_server(test)?;
        let Some(bin) = bin_dir() else {
            panic!(
                "{test}: TESSERA_TEST_POSTGRES is set but no /usr/lib/postgresql/*/bin/postgres"
            );
        };
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let data = dir.path().join("data");
        run_as_owner(
            &bin.join("initdb"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "--auth=trust".as_ref(),
                "--username=postgres".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        let port = free_port();
        let cluster = Self { dir, bin, port };
        cluster.resume();
        Some(cluster)
    }

    /// The superuser URL of its `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop(&self) {
        let data = self.data();
        run_as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        );
    }

    /// Starts the server again (or for the first time) and waits until it accepts
    /// connections.
    pub fn resume(&self) {
        let data = self.data();
        let log = self.dir.path().join("server.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            self.port,
            self.dir.path().display()
        );
        run_as_owner(
            &self.bin.join("pg_ctl"),
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private PostgreSQL did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = owner_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn owner_command(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run_as_owner(program: &Path, args: &[&std::ffi::OsStr]) {
    let out = owner_command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run a PostgreSQL program");
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
