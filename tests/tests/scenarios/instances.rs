//! Per-instance identities end to end: an `{instance}` entry gives every process its
//! own SPIFFE ID, stable for the life of the process and never reused, even by a process
//! that receives a recycled pid (forced for real in a PID namespace with a small
//! `pid_max`); the identity dies with the process; `{uid}` renders the caller's uid;
//! the server checks every template value it is sent (SECURITY.md §3.6 item 61).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use tessera_audit::{AgentEvent, Entry, Record};
use tessera_proto::node::{BatchNewX509svidRequest, NewX509svidParams, x509svid_result};
use tessera_tests::{Harness, my_uid, wait_until};

use crate::support::{
    arg, attested_agent, fetch_x509_raw, new_key_and_csr, node_client, product_bin, run_workload,
};

const TEMPLATE: &str = "spiffe://example.org/ai/research-bot/{instance}";
const PREFIX: &str = "spiffe://example.org/ai/research-bot/i-";

/// The agent's audit records (skipping a line cut short by a crash, as readers must).
pub fn agent_audit(path: &Path) -> Vec<Record<AgentEvent>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn served_x509(records: &[Record<AgentEvent>]) -> Vec<(i32, String, Option<String>)> {
    records
        .iter()
        .filter_map(|r| match &r.entry {
            Entry::Event(AgentEvent::X509SvidServed {
                pid,
                spiffe_id,
                instance,
                ..
            }) => Some((*pid, spiffe_id.clone(), instance.clone())),
            _ => None,
        })
        .collect()
}

/// A harness whose agent "a" writes an audit log, with an `{instance}` entry for this
/// uid.
async fn instance_agent() -> (Harness, tessera_agent::RunningAgent) {
    let h = Harness::start().await;
    let mut config = h.agent_config("a");
    config.audit_log_path = Some(h.path("a/audit.jsonl"));
    let agent = tessera_agent::start(config, Some(h.join_token(None).await))
        .await
        .unwrap();
    wait_until("agent synced", Duration::from_secs(10), || {
        agent.is_synced()
    })
    .await;
    h.create_entry(
        agent.agent_id().as_str(),
        TEMPLATE,
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    (h, agent)
}

fn ids_of(answer: &serde_json::Value) -> Vec<String> {
    answer["svids"]
        .as_array()
        .unwrap_or_else(|| panic!("no svids: {answer}"))
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_gets_its_own_id_that_lives_and_dies_with_it() {
    let (h, agent) = instance_agent().await;
    let socket = arg(agent.socket_path()).to_owned();

    // Two processes (the `spiffe` crate's client, one after the other).
    let first = run_workload(&["fetch", &socket], None).await.remove(0);
    let second = run_workload(&["fetch", &socket], None).await.remove(0);
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(second["ok"], true, "{second}");
    let (a, b) = (ids_of(&first), ids_of(&second));
    assert_eq!(a.len(), 1);
    assert_eq!(b.len(), 1);
    assert!(
        a[0].starts_with(PREFIX) && b[0].starts_with(PREFIX),
        "{a:?} {b:?}"
    );
    assert_ne!(a[0], b[0], "two processes share an instance identity");
    assert_eq!(first["svids"][0]["chain_verified"], true);

    // This process, on two connections: the same ID every time.
    let one = fetch_x509_raw(agent.socket_path()).await.unwrap();
    let two = fetch_x509_raw(agent.socket_path()).await.unwrap();
    assert_eq!(one.svids[0].spiffe_id, two.svids[0].spiffe_id);
    assert!(one.svids[0].spiffe_id.starts_with(PREFIX));
    assert!(![&a[0], &b[0]].contains(&&one.svids[0].spiffe_id));
    // The same SVID (not one per call): one signing per instance.
    assert_eq!(one.svids[0].x509_svid, two.svids[0].x509_svid);

    // The JWT-SVID of an instance carries its instance ID.
    let jwt = run_workload(&["fetch-jwt", &socket, "tickets.example.org"], None)
        .await
        .remove(0);
    let sub = jwt["svids"][0]["spiffe_id"].as_str().unwrap();
    assert!(sub.starts_with(PREFIX), "{jwt}");
    assert_eq!(jwt["svids"][0]["verified"], true, "{jwt}");

    // The exited processes' identities are gone from the agent's memory; this process's
    // remains.
    let audit = h.path("a/audit.jsonl");
    let pids: Vec<i32> = [&first, &second]
        .iter()
        .map(|v| i32::try_from(v["pid"].as_u64().unwrap()).unwrap())
        .collect();
    wait_until("exited instances dropped", Duration::from_secs(10), || {
        let dropped: Vec<i32> = agent_audit(&audit)
            .iter()
            .filter_map(|r| match &r.entry {
                Entry::Event(AgentEvent::InstanceDropped { pid, .. }) => Some(*pid),
                _ => None,
            })
            .collect();
        pids.iter().all(|p| dropped.contains(p))
    })
    .await;
    // The JWT client's process exited too: only this process's identity remains.
    wait_until(
        "only this process's identity held",
        Duration::from_secs(10),
        || agent.instance_identities().0 == 1,
    )
    .await;

    // The audit log binds each instance ID to the process it was served to.
    let served = served_x509(&agent_audit(&audit));
    for (answer, pid) in [(&first, pids[0]), (&second, pids[1])] {
        let id = &ids_of(answer)[0];
        let record = served
            .iter()
            .find(|(_, s, _)| s == id)
            .unwrap_or_else(|| panic!("no x509_svid_served for {id}: {served:?}"));
        assert_eq!(record.0, pid);
        assert_eq!(
            record.2.as_deref(),
            id.strip_prefix("spiffe://example.org/ai/research-bot/")
        );
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uid_placeholder_renders_the_callers_uid() {
    let h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    h.create_entry(
        agent.agent_id().as_str(),
        "spiffe://example.org/users/u{uid}",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(response) = fetch_x509_raw(agent.socket_path()).await {
            answer = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = answer.expect("an SVID");
    assert_eq!(
        answer.svids[0].spiffe_id,
        format!("spiffe://example.org/users/u{}", my_uid())
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_checks_every_template_value_an_agent_sends() {
    // SECURITY.md §3.6 item 61: attacker-controlled values never become a path.
    let h = Harness::start().await;
    let (credential, agent_id) = attested_agent(&h, None).await;
    let mut client = node_client(&h, Some(&credential));
    let entry = h
        .create_entry(&agent_id, TEMPLATE, &["unix:uid:1"], 0)
        .await
        .unwrap();
    let fixed = h
        .create_entry(&agent_id, "spiffe://example.org/fixed", &["unix:uid:1"], 0)
        .await
        .unwrap();
    let good = tessera_plugin_sdk::template::instance_value("boot", 42, 7, None);
    type Case<'a> = (&'a str, HashMap<String, String>, Result<String, &'a str>);
    let cases: Vec<Case> = vec![
        (
            &entry.id,
            HashMap::from([("instance".into(), good.clone())]),
            Ok(format!("spiffe://example.org/ai/research-bot/{good}")),
        ),
        (&entry.id, HashMap::new(), Err("no value")),
        (
            &entry.id,
            HashMap::from([("instance".into(), "../../admin".into())]),
            Err("not a valid SPIFFE ID path segment"),
        ),
        (
            &entry.id,
            HashMap::from([("instance".into(), "i-%2F".into())]),
            Err("not a valid SPIFFE ID path segment"),
        ),
        (
            &entry.id,
            HashMap::from([("instance".into(), "a/b".into())]),
            Err("not a valid SPIFFE ID path segment"),
        ),
        (
            &entry.id,
            HashMap::from([("pod_name".into(), "x".into())]),
            Err("unknown placeholder"),
        ),
        (
            &fixed.id,
            HashMap::from([("uid".into(), "0".into())]),
            Err("does not use"),
        ),
    ];
    for (entry_id, values, want) in cases {
        let (key, _) = new_key_and_csr();
        let response = client
            .batch_new_x509svid(BatchNewX509svidRequest {
                params: vec![NewX509svidParams {
                    entry_id: entry_id.to_owned(),
                    public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
                    template_values: values.clone(),
                }],
            })
            .await
            .unwrap()
            .into_inner();
        match (&response.results[0].result, want) {
            (Some(x509svid_result::Result::Svid(svid)), Ok(id)) => assert_eq!(svid.spiffe_id, id),
            (Some(x509svid_result::Result::Error(err)), Err(fragment)) => {
                assert_eq!(
                    err.code,
                    tonic::Code::InvalidArgument as i32,
                    "{values:?}: {err:?}"
                );
                assert!(
                    err.message.contains(fragment),
                    "{values:?}: {}",
                    err.message
                );
            }
            (other, want) => panic!("{values:?}: got {other:?}, want {want:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recycled_pid_gets_a_new_instance_id() {
    // The agent runs in its own PID namespace with pid_max = 1024, so a pid comes back
    // after ~1000 forks (the agent's own threads take pids from the same space); a process with the recycled pid must not inherit the identity.
    let probe = std::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
        ])
        .arg("echo 1024 > /proc/sys/kernel/pid_max")
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIPPED a_recycled_pid_gets_a_new_instance_id: this machine cannot create a PID \
             namespace with its own pid_max (unshare --pid --mount-proc as root, Linux >= 6.14)"
        );
        return;
    }
    let h = Harness::start().await;
    let alias = "spiffe://example.org/node/pidns";
    let token = h.join_token(Some(alias)).await;
    h.create_entry(alias, TEMPLATE, &[&format!("unix:uid:{}", my_uid())], 0)
        .await
        .unwrap();
    std::fs::create_dir_all(h.path("ns")).unwrap();
    let socket = h.path("ns/sock/agent.sock");
    let audit = h.path("ns/audit.jsonl");
    let config = h.path("ns/agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ntrust_domain = \"example.org\"\nserver_address = \"{}\"\nsocket_path = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\naudit_log_path = \"{}\"\nmax_requests_per_second_per_uid = 0\n",
            h.node_address(),
            socket.display(),
            h.path("ns/data").display(),
            h.bootstrap_bundle().display(),
            audit.display(),
        ),
    )
    .unwrap();
    let mut unshare = tokio::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
        ])
        .arg(r#"echo 1024 > /proc/sys/kernel/pid_max && exec "$0" run -c "$1" --join-token "$2""#)
        .arg(product_bin("tessera-agent"))
        .arg(&config)
        .arg(&token)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let unshare_pid = unshare.id().unwrap();
    let agent_pid: u32 = {
        let children = format!("/proc/{unshare_pid}/task/{unshare_pid}/children");
        let mut pid = None;
        for _ in 0..200 {
            if let Some(p) = std::fs::read_to_string(&children)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            {
                pid = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pid.expect("the agent runs in the new namespace")
    };
    let socket_for_wait = socket.clone();
    wait_until("agent socket", Duration::from_secs(20), || {
        socket_for_wait.exists()
    })
    .await;

    // Inside the namespace: fetch; then fork shells until one receives the first
    // fetch's pid, and let that one exec the same client (same pid, a new process).
    let script = r#"
W=$1; S=$2; OUT=$3
# After a wrap the kernel allocates from 300 up (RESERVED_PIDS): move past it first.
while :; do /bin/true & p=$!; wait $p; [ "$p" -gt 400 ] && break; done
for i in $(seq 1 100); do
  "$W" fetch "$S" > "$OUT/first"
  grep -q '"ok":true' "$OUT/first" && break
  sleep 0.1
done
p1=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$OUT/first")
i=0
while [ $i -lt 10000 ]; do
  sh -c '[ $$ -eq "$1" ] && exec "$2" fetch "$3" > "$4/second"; exit 0' sh "$p1" "$W" "$S" "$OUT"
  [ -s "$OUT/second" ] && { echo "$p1"; exit 0; }
  i=$((i + 1))
done
echo "no reuse"
exit 4
"#;
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("nsenter")
            .args([
                "--target",
                &agent_pid.to_string(),
                "--pid",
                "--mount",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(crate::support::workload_bin())
            .arg(&socket)
            .arg(h.path("ns"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the pid cycling finishes within 120 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "script failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pids: Vec<u32> = vec![stdout.trim().parse().unwrap()];
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(
            std::fs::read_to_string(h.path(&format!("ns/{name}")))
                .unwrap()
                .trim(),
        )
        .unwrap()
    };
    let (first, second) = (read("first"), read("second"));
    assert_eq!(
        first["pid"], second["pid"],
        "both answers come from the same pid"
    );
    let (a, b) = (ids_of(&first), ids_of(&second));
    assert!(
        a[0].starts_with(PREFIX) && b[0].starts_with(PREFIX),
        "{a:?} {b:?}"
    );
    assert_ne!(a, b, "a recycled pid inherited an instance identity");
    // The agent's audit log saw both, for the same pid.
    let served = served_x509(&agent_audit(&audit));
    let pid = i32::try_from(pids[0]).unwrap();
    for id in [&a[0], &b[0]] {
        assert!(
            served.iter().any(|(p, s, _)| *p == pid && s == id),
            "{id} not recorded for pid {pid}: {served:?}"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent_pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), unshare.wait())
        .await
        .expect("the agent stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
