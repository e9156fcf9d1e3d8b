//! The audit log of a full scenario with the real binaries at debug log level: the
//! server's and the agent's records appear in order, numbered without gaps, and bind
//! every identity to the process it was served to; then every log of the run (both
//! operational logs and both audit logs) is searched for the private keys, the JWT and
//! the join token it handled, which must appear nowhere (SECURITY.md §3.12 item 114).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tessera_tests::my_uid;

use crate::support::{arg, product_command, run_command, run_product, run_workload, wait_healthy};

const SERVER: &str = "tessera-server";
const AGENT: &str = "tessera-agent";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon binary with its standard error (its operational log) in `log`.
fn spawn_daemon(name: &str, args: &[&str], log: &Path) -> tokio::process::Child {
    let file = std::fs::File::create(log).unwrap();
    let mut command = product_command(name);
    command.args(args).stdout(Stdio::null()).stderr(file);
    command.spawn().unwrap()
}

/// Every line of an audit log, parsed as JSON (all must parse: nothing crashed).
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// Asserts `seq` runs 1, 2, 3... and every record names `component`.
fn assert_numbered(records: &[Value], component: &str) {
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["seq"], i + 1, "gap or reordering at {record}");
        assert_eq!(record["component"], component, "{record}");
        assert!(
            record["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{record}"
        );
    }
}

/// Asserts that records matching each predicate appear, in this order.
type Expected<'a> = (&'a str, &'a dyn Fn(&Value) -> bool);

fn assert_in_order(records: &[Value], expected: &[Expected]) {
    let mut from = 0;
    for (what, matches) in expected {
        let found = records[from..].iter().position(matches).unwrap_or_else(|| {
            panic!(
                "no `{what}` record after seq {from}:\n{}",
                records
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        from += found + 1;
    }
}

fn event(name: &'static str) -> impl Fn(&Value) -> bool {
    move |r: &Value| r["event"] == name
}

/// The base64 body of every PEM block in `path` (the secret part of a key file).
fn pem_bodies(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    pem::parse_many(&text)
        .unwrap()
        .iter()
        .map(|p| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, p.contents()))
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_logs_of_a_full_scenario_are_complete_ordered_and_leak_nothing() {
    let dir = tempfile::Builder::new()
        .prefix("tessera-audit")
        .tempdir()
        .unwrap();
    let root = dir.path();
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = free_port();
    let admin_socket = root.join("admin/admin.sock");
    let agent_socket = root.join("agent/sock/agent.sock");
    let (server_audit, agent_audit) = (
        root.join("server-audit.jsonl"),
        root.join("agent-audit.jsonl"),
    );
    let (server_log, agent_log) = (root.join("server.log"), root.join("agent.log"));
    std::fs::create_dir_all(root.join("agent")).unwrap();
    let server_toml = root.join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nadmin_socket_path = \"{}\"\naudit_log_path = \"{}\"\nlog_level = \"debug\"\n",
            root.join("server-data").display(),
            admin_socket.display(),
            server_audit.display(),
        ),
    )
    .unwrap();

    let mut server = spawn_daemon(SERVER, &["run", "-c", arg(&server_toml)], &server_log);
    wait_healthy(SERVER, &admin_socket, Duration::from_secs(15)).await;
    let socket = arg(&admin_socket);
    let bundle = run_product(SERVER, &["bundle", "show", "--socket", socket]).await;
    bundle.expect_code(0);
    std::fs::write(root.join("bootstrap.pem"), &bundle.stdout).unwrap();
    let alias = "spiffe://example.org/node/audited";
    let out = run_product(
        SERVER,
        &[
            "token",
            "generate",
            "--spiffe-id",
            alias,
            "--socket",
            socket,
        ],
    )
    .await;
    out.expect_code(0);
    let token = out.stdout.trim().to_owned();
    let (token_id, token_secret) = token.split_once('.').unwrap();
    let selector = format!("unix:uid:{}", my_uid());
    for spiffe_id in [
        "spiffe://example.org/audit/fixed",
        "spiffe://example.org/audit/bot/{instance}",
    ] {
        run_product(
            SERVER,
            &[
                "entry",
                "create",
                "--parent-id",
                alias,
                "--spiffe-id",
                spiffe_id,
                "--selector",
                &selector,
                "--socket",
                socket,
            ],
        )
        .await
        .expect_code(0);
    }

    // The join token goes in the agent's 0600 config file, never on a command line.
    let agent_toml = root.join("agent/agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"127.0.0.1:{port}\"\nsocket_path = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\naudit_log_path = \"{}\"\nlog_level = \"debug\"\njoin_token = \"{token}\"\n",
            agent_socket.display(),
            root.join("agent/data").display(),
            root.join("bootstrap.pem").display(),
            agent_audit.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &agent_toml,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut agent = spawn_daemon(AGENT, &["run", "-c", arg(&agent_toml)], &agent_log);
    wait_healthy(AGENT, &agent_socket, Duration::from_secs(15)).await;

    // A workload's keys and a JWT, through the CLI.
    let written = root.join("fetched");
    let mut fetched = None;
    for _ in 0..100 {
        let out = run_product(
            AGENT,
            &[
                "api",
                "fetch",
                "x509",
                "--write",
                arg(&written),
                "--socket",
                arg(&agent_socket),
                "--output",
                "json",
            ],
        )
        .await;
        if out.code == 0 && out.json()["svids"].as_array().is_some_and(|s| s.len() == 2) {
            fetched = Some(out.json());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fetched = fetched.expect("two SVIDs for the CLI");
    let jwt_out = run_product(
        AGENT,
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "tickets",
            "--spiffe-id",
            "spiffe://example.org/audit/fixed",
            "--socket",
            arg(&agent_socket),
            "--output",
            "json",
        ],
    )
    .await;
    jwt_out.expect_code(0);
    let jwt = jwt_out.json()["svids"][0]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut validate = product_command(AGENT);
    validate.args([
        "api",
        "validate",
        "jwt",
        "--audience",
        "tickets",
        "--token",
        &jwt,
        "--socket",
        arg(&agent_socket),
    ]);
    run_command(validate).await.expect_code(0);
    // A refusal: a uid without an entry.
    let refused = run_workload(&["fetch", arg(&agent_socket)], Some(65534)).await;
    assert_eq!(refused[0]["ok"], false, "{refused:?}");

    // Keys to look for afterwards: the workload's (written by the CLI), the agent's own.
    let mut secrets: Vec<(String, String)> = vec![
        ("join token".into(), token.clone()),
        ("join token secret".into(), token_secret.to_owned()),
        ("JWT-SVID".into(), jwt.clone()),
        (
            "JWT-SVID signature".into(),
            jwt.rsplit('.').next().unwrap().to_owned(),
        ),
    ];
    for path in files_under(&written)
        .into_iter()
        .chain(files_under(&root.join("agent/data")))
    {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".key") || name.contains("key") {
            for body in pem_bodies(&path) {
                secrets.push((format!("private key {}", path.display()), body));
            }
        }
    }
    assert!(secrets.len() >= 6, "keys found: {secrets:?}");

    // Revoke the CLI's (exited) instance, then ban the agent: it exits 1.
    let instance_id = fetched["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .find(|id| id.contains("/audit/bot/i-"))
        .unwrap();
    run_product(
        SERVER,
        &["instance", "revoke", &instance_id, "--socket", socket],
    )
    .await
    .expect_code(0);
    let agent_id = {
        let out = run_product(
            SERVER,
            &["agent", "list", "--socket", socket, "--output", "json"],
        )
        .await;
        out.expect_code(0);
        out.json()[0]["spiffe_id"].as_str().unwrap().to_owned()
    };
    run_product(SERVER, &["agent", "ban", &agent_id, "--socket", socket])
        .await
        .expect_code(0);
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the banned agent exits")
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "{}",
        std::fs::read_to_string(&agent_log).unwrap()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits on SIGTERM")
        .unwrap();
    assert!(status.success());

    // The server's audit log.
    let server_records = records(&server_audit);
    assert_numbered(&server_records, "server");
    let token_id = token_id.to_owned();
    let instance = instance_id.clone();
    let agent = agent_id.clone();
    assert_in_order(
        &server_records,
        &[
            ("audit_started", &event("audit_started")),
            ("admin_call token generate", &|r: &Value| {
                r["event"] == "admin_call" && r["action"] == "token generate" && r["result"] == "ok"
            }),
            ("admin_call entry create", &|r: &Value| {
                r["event"] == "admin_call" && r["action"] == "entry create"
            }),
            ("node_attested with the token id", &|r: &Value| {
                r["event"] == "node_attested"
                    && r["token_id"] == token_id.as_str()
                    && r["result"] == "ok"
            }),
            ("x509_svid_signed", &event("x509_svid_signed")),
            ("jwt_svid_signed", &|r: &Value| {
                r["event"] == "jwt_svid_signed" && r["audience"] == serde_json::json!(["tickets"])
            }),
            ("instance_revoked", &|r: &Value| {
                r["event"] == "instance_revoked" && r["spiffe_id"] == instance.as_str()
            }),
            ("agent_banned", &|r: &Value| {
                r["event"] == "agent_banned" && r["agent_id"] == agent.as_str()
            }),
        ],
    );
    for record in &server_records {
        if record["event"] == "admin_call" {
            assert_eq!(record["caller_uid"], my_uid(), "{record}");
        }
    }

    // The agent's audit log.
    let agent_records = records(&agent_audit);
    assert_numbered(&agent_records, "agent");
    let instance = instance_id.clone();
    assert_in_order(
        &agent_records,
        &[
            ("audit_started", &event("audit_started")),
            ("workload_attested", &|r: &Value| {
                r["event"] == "workload_attested"
                    && r["result"] == "ok"
                    && r["uid"] == my_uid()
                    && r["exe"]
                        .as_str()
                        .is_some_and(|e| e.ends_with("tessera-agent"))
                    && r["sha256"].as_str().is_some_and(|h| h.len() == 64)
                    && r["selectors"].as_array().is_some_and(|s| !s.is_empty())
            }),
            ("x509_svid_served to the instance", &|r: &Value| {
                r["event"] == "x509_svid_served"
                    && r["spiffe_id"] == instance.as_str()
                    && r["instance"]
                        .as_str()
                        .is_some_and(|i| instance.ends_with(i))
            }),
            ("jwt_svid_served", &|r: &Value| {
                r["event"] == "jwt_svid_served" && r["audience"] == serde_json::json!(["tickets"])
            }),
            ("refused for uid 65534", &|r: &Value| {
                r["event"] == "refused" && r["uid"] == 65534
            }),
            ("agent_stopping", &|r: &Value| {
                r["event"] == "agent_stopping"
                    && r["reason"].as_str().is_some_and(|s| s.contains("banned"))
            }),
        ],
    );

    // Nothing secret in any log of the run (operational logs at debug level included).
    let logs = [&server_log, &agent_log, &server_audit, &agent_audit];
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.is_empty(), "{} is empty", log.display());
        for (what, secret) in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{what} found in {}",
                log.display()
            );
            // Also any 40-character piece of it (a key logged in another wrapping).
            if secret.len() > 80 {
                for start in (0..secret.len() - 40).step_by(40) {
                    assert!(
                        !text.contains(&secret[start..start + 40]),
                        "part of {what} found in {}",
                        log.display()
                    );
                }
            }
        }
    }
}
