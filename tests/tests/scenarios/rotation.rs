//! CA and JWT key rotation (issue 7, SECURITY.md §3.10 item 97): very short key
//! lifetimes across several rotations with an open Workload API stream, and a real
//! `tessera-server` killed with SIGKILL between preparing and activating a CA.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_agent::cli::with_header;
use tessera_proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};
use tessera_tests::Harness;

use crate::support::{
    ServerProcess, arg, open_x509_stream, raw_workload_client, run_product, split_der, verify,
    wait_healthy,
};

/// Key lifetimes of seconds: a CA is prepared 6 s after the previous one and signs
/// from 10 s after; a rotation every 6 s.
const SHORT_LIFETIMES: &str = "ca_ttl = \"12s\"\njwt_key_ttl = \"12s\"\nallow_short_key_lifetimes = true\n\
default_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"6s\"\ndefault_jwt_svid_ttl = \"4s\"\nmax_jwt_svid_ttl = \"4s\"\n";

fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_and_jwts_stay_valid_across_three_rotations() {
    let h = Harness::start_with(SHORT_LIFETIMES).await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    h.create_entry(
        agent.agent_id().as_ref(),
        "spiffe://example.org/workload/rot",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    let mut stream = open_x509_stream(agent.socket_path()).await;

    let mut issuers = BTreeSet::new();
    let mut kids = BTreeSet::new();
    let mut tokens: Vec<String> = Vec::new();
    let mut updates = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(75);
    // Four CAs seen signing = three rotations.
    while issuers.len() < 4 || kids.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} CAs and {} JWT keys seen signing in 75 s",
            issuers.len(),
            kids.len()
        );
        let response = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an update within 10 s (SVIDs live 4 s)")
            .expect("stream healthy")
            .expect("stream open");
        updates += 1;
        let svid = &response.svids[0];
        let chain = split_der(&svid.x509_svid);
        let bundle = split_der(&svid.bundle);
        issuers.insert(verify(&chain, &bundle));

        let mut jwt_client = raw_workload_client(agent.socket_path()).await;
        let token = jwt_client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["rotation".into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect("a JWT-SVID")
            .into_inner()
            .svids[0]
            .svid
            .clone();
        let header = token.split('.').next().unwrap();
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap(),
        )
        .unwrap();
        kids.insert(header["kid"].as_str().unwrap().to_owned());
        tokens.push(token);
        // Every token still within its lifetime validates, whichever key signed it.
        let now = std::time::SystemTime::now();
        for token in &tokens {
            let claims = token.split('.').nth(1).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                    .unwrap(),
            )
            .unwrap();
            let exp = claims["exp"].as_u64().unwrap();
            let now_secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            if exp <= now_secs + 1 {
                continue;
            }
            jwt_client
                .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                    audience: "rotation".into(),
                    svid: token.clone(),
                }))
                .await
                .unwrap_or_else(|status| {
                    panic!("a valid token is refused after a rotation: {status}")
                });
        }
    }
    assert!(updates >= 4, "{updates} updates");

    // authority show lists the states.
    let out = run_product(
        "tessera-server",
        &[
            "authority",
            "show",
            "--output",
            "json",
            "--socket",
            arg(&h.admin_socket()),
        ],
    )
    .await;
    let json = out.json();
    let states: Vec<&str> = json["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "active").count(),
        1,
        "{json}"
    );
    assert!(
        states
            .iter()
            .all(|s| ["prepared", "active", "old"].contains(s)),
        "{json}"
    );
    agent.stop().await.unwrap();
}

async fn authorities(socket: &Path) -> serde_json::Value {
    run_product(
        "tessera-server",
        &[
            "authority",
            "show",
            "--output",
            "json",
            "--socket",
            arg(socket),
        ],
    )
    .await
    .json()
}

fn with_state<'a>(json: &'a serde_json::Value, state: &str) -> Option<&'a serde_json::Value> {
    json["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["state"] == state)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// SECURITY.md §3.10 item 97: SIGKILL after the next CA is prepared and before it is
/// active; the restarted server publishes the same prepared CA and activates it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_prepare_and_activate_keeps_the_prepared_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("admin/admin.sock");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nadmin_socket_path = \"{}\"\nca_ttl = \"24s\"\njwt_key_ttl = \"1h\"\n\
             allow_short_key_lifetimes = true\ndefault_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"4s\"\n",
            data.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut server = ServerProcess::start(&config, dir.path().join("server-1.log"));
    wait_healthy("tessera-server", &socket, Duration::from_secs(20)).await;

    // Prepared 12 s after the CA was made, active from 20 s: kill in between.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (prepared, active) = loop {
        let json = authorities(&socket).await;
        if let Some(prepared) = with_state(&json, "prepared") {
            break (
                prepared.clone(),
                with_state(&json, "active").unwrap().clone(),
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no CA prepared: {json}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    server.sigkill().await;
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(
        !log.contains("activated the next CA"),
        "activated before the kill:\n{log}"
    );

    // Key custody: 0600 files in a 0700 directory; the journal is 0600 too.
    let keys = data.join("keys");
    assert_eq!(mode(&keys), 0o700);
    let files: Vec<PathBuf> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    assert!(
        keys.join(format!("{}.key", prepared["key_id"].as_str().unwrap()))
            .exists()
    );
    assert_eq!(mode(&data.join("rotation.json")), 0o600);
    assert!(
        !data.join("ca/ca_key.pem").exists(),
        "no PEM key outside the key manager"
    );

    let mut server = ServerProcess::start(&config, dir.path().join("server-2.log"));
    wait_healthy("tessera-server", &socket, Duration::from_secs(20)).await;
    let json = authorities(&socket).await;
    let again = with_state(&json, "prepared")
        .or_else(|| with_state(&json, "active").filter(|a| a["serial"] == prepared["serial"]))
        .expect("the prepared CA survived the restart");
    assert_eq!(again["serial"], prepared["serial"]);
    assert_eq!(
        again["certificate"], prepared["certificate"],
        "the same certificate and key"
    );
    // Published in the bundle agents receive.
    let bundle = run_product(
        "tessera-server",
        &[
            "bundle",
            "show",
            "--output",
            "json",
            "--socket",
            arg(&socket),
        ],
    )
    .await
    .json();
    let published: Vec<&str> = bundle["x509_authorities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        published.contains(&prepared["certificate"].as_str().unwrap()),
        "{bundle}"
    );
    assert!(
        published.contains(&active["certificate"].as_str().unwrap()),
        "{bundle}"
    );
    assert!(bundle["keys"]["x509_authorities"].is_array(), "{bundle}");

    // ... and activated on schedule; the old CA stays published as `old`.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let json = authorities(&socket).await;
        let now_active = with_state(&json, "active").unwrap();
        if now_active["serial"] == prepared["serial"] {
            assert_eq!(now_active["certificate"], prepared["certificate"]);
            let old = with_state(&json, "old").expect("the old CA stays published");
            assert_eq!(old["serial"], active["serial"]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never activated: {json}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The text form names the states too.
    let text = run_product(
        "tessera-server",
        &["authority", "show", "--socket", arg(&socket)],
    )
    .await;
    assert!(
        text.stdout.contains("State         : active"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("State         : old"),
        "{}",
        text.stdout
    );
    server.sigkill().await;
}
