//! Several servers of one trust domain on one PostgreSQL database (DESIGN.md §5,
//! `docs/high-availability.md`): each keeps its own CA and both are published in the
//! shared bundle, the change feed wakes every server, an agent fails over to the other
//! server when the first is killed, a join token has one winner across servers, and a
//! stopped database gives `Unavailable` without consuming a token, then recovers by
//! itself (SECURITY.md §3.10 item 101).

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_proto::admin::admin_client::AdminClient;
use tessera_proto::admin::{CreateEntryRequest, CreateJoinTokenRequest, GetBundleRequest};
use tessera_proto::types::{Entry, Selector};
use tessera_tests::postgres::{PrivateCluster, create_database, datastore_config, fresh_database};
use tessera_tests::{Harness, my_uid};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    ServerProcess, attest_at, ca_der, concurrent_attestations, fetch_x509_raw, new_key_and_csr,
    split_der, verify, wait_healthy,
};

async fn admin_at(socket: &Path) -> AdminClient<Channel> {
    AdminClient::new(tessera_proto::uds::connect(socket).await.unwrap())
}

async fn bundle_at(socket: &Path) -> tessera_proto::types::Bundle {
    admin_at(socket)
        .await
        .get_bundle(GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The serial of the only agent the server at `socket` knows.
async fn only_agent_serial(socket: &Path) -> String {
    let agents = admin_at(socket)
        .await
        .list_agents(tessera_proto::admin::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    agents[0].serial.clone()
}

fn entry(parent: &str, spiffe_id: &str) -> CreateEntryRequest {
    CreateEntryRequest {
        entry: Some(Entry {
            spiffe_id: spiffe_id.to_owned(),
            parent_id: parent.to_owned(),
            selectors: vec![Selector {
                r#type: "unix".into(),
                value: format!("uid:{}", my_uid()),
            }],
            x509_svid_ttl_seconds: 8,
            ..Entry::default()
        }),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The leaf and chain of `spiffe_id` in this process's X.509-SVID response, with the
/// bundle of that response; `None` while the agent serves no such SVID.
async fn svid_of(socket: &Path, spiffe_id: &str) -> Option<(Vec<Vec<u8>>, Vec<Vec<u8>>)> {
    let response = fetch_x509_raw(socket).await.ok()?;
    response
        .svids
        .iter()
        .find(|s| s.spiffe_id == spiffe_id)
        .map(|s| (split_der(&s.x509_svid), split_der(&s.bundle)))
}

/// Waits until the agent serves `spiffe_id` with a leaf that `accept` likes.
async fn wait_for_svid(
    socket: &Path,
    spiffe_id: &str,
    limit: Duration,
    accept: impl Fn(&[Vec<u8>]) -> bool,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let deadline = Instant::now() + limit;
    loop {
        if let Some((chain, bundle)) = svid_of(socket, spiffe_id).await
            && accept(&chain)
        {
            return (chain, bundle);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for an SVID of {spiffe_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates an entry for this process under `agent_id` through the admin API at
/// `admin_socket`, then waits (up to `limit`) until the agent at `agent_socket` serves
/// its SVID; returns the chain and bundle served.
async fn create_and_wait(
    admin_socket: &Path,
    agent_socket: &Path,
    agent_id: &str,
    spiffe_id: &str,
    limit: Duration,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    admin_at(admin_socket)
        .await
        .create_entry(entry(agent_id, spiffe_id))
        .await
        .unwrap();
    wait_for_svid(agent_socket, spiffe_id, limit, |_| true).await
}

/// Whether `ca` (DER) signed `leaf` (DER).
fn signed_by(leaf: &[u8], ca: &[u8]) -> bool {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn serial(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.raw_serial_as_string()
}

const SHORT_SVIDS: &str = "agent_svid_ttl = \"10s\"\ndefault_x509_svid_ttl = \"8s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_postgres_and_the_agent_fails_over_when_one_is_killed() {
    let Some(db) = fresh_database("two_servers_share_postgres") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    // Server A: the real binary, so that it can be SIGKILLed.
    let port_a = free_port();
    let socket_a = dir.path().join("admin-a/admin.sock");
    let config_a = dir.path().join("server-a.toml");
    std::fs::write(
        &config_a,
        format!(
            "[server]\ntrust_domain = \"example.org\"\nbind_address = \"127.0.0.1:{port_a}\"\n\
             data_dir = \"{}\"\nadmin_socket_path = \"{}\"\n{SHORT_SVIDS}{}",
            dir.path().join("data-a").display(),
            socket_a.display(),
            datastore_config(&db),
        ),
    )
    .unwrap();
    let mut server_a = ServerProcess::start(&config_a, dir.path().join("server-a.log"));
    wait_healthy("tessera-server", &socket_a, Duration::from_secs(30)).await;

    // Server B: in this process, its own data directory and CA, the same database.
    let b = Harness::start_with(&format!("{SHORT_SVIDS}{}", datastore_config(&db))).await;
    let ca_b = ca_der(&b);

    // Both CAs are in the one bundle, whichever server is asked.
    let bundle = bundle_at(&socket_a).await;
    assert_eq!(bundle.x509_authorities.len(), 2, "one CA per server");
    assert!(bundle.x509_authorities.contains(&ca_b));
    assert_eq!(bundle, bundle_at(&b.admin_socket()).await);
    let ca_a = bundle
        .x509_authorities
        .iter()
        .find(|ca| **ca != ca_b)
        .unwrap()
        .clone();
    assert_eq!(bundle.jwt_authorities.len(), 2, "one JWT key per server");

    // The agent knows both servers; A first.
    let pem: String = bundle
        .x509_authorities
        .iter()
        .map(|der| tessera_plugin_sdk::x509::pem_encode("CERTIFICATE", der))
        .collect();
    let trust = dir.path().join("bootstrap.pem");
    std::fs::write(&trust, pem).unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent_socket = agent_dir.join("sock/agent.sock");
    let agent_config = tessera_agent::AgentConfig::parse(
        &format!(
            "[agent]\ntrust_domain = \"example.org\"\n\
             server_address = [\"127.0.0.1:{port_a}\", \"{}\"]\n\
             socket_path = \"{}\"\ndata_dir = \"{}\"\ntrust_bundle_path = \"{}\"\n",
            b.node_address(),
            agent_socket.display(),
            agent_dir.join("data").display(),
            trust.display()
        ),
        Path::new("agent.toml"),
    )
    .unwrap();
    let token = admin_at(&socket_a)
        .await
        .create_join_token(CreateJoinTokenRequest::default())
        .await
        .unwrap()
        .into_inner()
        .token;
    let agent = tessera_agent::start(agent_config, Some(token))
        .await
        .unwrap();
    tessera_tests::wait_until("agent synced", Duration::from_secs(15), || {
        agent.is_synced()
    })
    .await;
    let agent_id = agent.agent_id().to_string();

    // An entry written through B reaches the agent synced with A: B's write wakes A.
    let started = Instant::now();
    let (chain, served_bundle) = create_and_wait(
        &b.admin_socket(),
        &agent_socket,
        &agent_id,
        "spiffe://example.org/ha/before",
        Duration::from_secs(10),
    )
    .await;
    let woke = started.elapsed();
    eprintln!("entry written through B served via A after {woke:?}");
    // Well inside the servers' 5 s fallback poll of the feed: A was woken by
    // PostgreSQL's NOTIFY, not by its poll.
    assert!(
        woke < Duration::from_secs(4),
        "B's write reached A only after {woke:?}"
    );
    assert!(
        signed_by(&chain[0], &ca_a),
        "signed by A, the agent's server"
    );
    assert_eq!(served_bundle.len(), 2);
    verify(&chain, &served_bundle);
    let first_serial = serial(&chain[0]);

    let serial_via_a = only_agent_serial(&b.admin_socket()).await;

    // A dies without a goodbye.
    server_a.sigkill().await;
    let killed = Instant::now();

    // The agent moves to B: a new entry written through B arrives, signed by B, and
    // the first workload's SVID is renewed by B before it expires.
    let (chain, served_bundle) = create_and_wait(
        &b.admin_socket(),
        &agent_socket,
        &agent_id,
        "spiffe://example.org/ha/after",
        Duration::from_secs(20),
    )
    .await;
    eprintln!("served by B {:?} after A was killed", killed.elapsed());
    assert!(signed_by(&chain[0], &ca_b), "signed by B");
    verify(&chain, &served_bundle);
    let (renewed, served_bundle) = wait_for_svid(
        &agent_socket,
        "spiffe://example.org/ha/before",
        Duration::from_secs(20),
        |chain| serial(&chain[0]) != first_serial,
    )
    .await;
    assert!(signed_by(&renewed[0], &ca_b), "renewed by B");
    verify(&renewed, &served_bundle);

    // The agent's own SVID (10 s, renewed at half-life) is renewed through B: a new
    // serial is bound while A is dead, and the agent stays synced past the lifetime of
    // the SVID it had when A died.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let serial = only_agent_serial(&b.admin_socket()).await;
        if serial != serial_via_a {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent SVID was not renewed through B"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(killed.elapsed())).await;
    assert!(agent.is_synced());
    let (chain, _) = svid_of(&agent_socket, "spiffe://example.org/ha/after")
        .await
        .expect("still served");
    assert!(signed_by(&chain[0], &ca_b));
    agent.stop().await.unwrap();
    let log = std::fs::read_to_string(&server_a.log).unwrap();
    assert!(log.contains("server started"), "{log}");
}

/// SECURITY.md §3.9 item 82 across servers: one token, eight concurrent attestations
/// spread over two servers, one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_token_use_across_two_servers_has_one_winner() {
    let Some(db) = fresh_database("concurrent_token_use_across_two_servers") else {
        return;
    };
    let a = Harness::start_with(&datastore_config(&db)).await;
    let b = Harness::start_with(&datastore_config(&db)).await;
    let token = a.join_token(None).await;
    let targets = (0..8)
        .map(|i| {
            let server = if i % 2 == 0 { &a } else { &b };
            (server.node_address(), ca_der(server))
        })
        .collect();
    let results = concurrent_attestations(targets, &token).await;
    let mut winners = 0;
    for result in results {
        match result {
            Ok(_) => winners += 1,
            Err(status) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        }
    }
    assert_eq!(
        winners, 1,
        "exactly one attestation wins across both servers"
    );
    for h in [&a, &b] {
        let agents = h
            .admin()
            .await
            .list_agents(tessera_proto::admin::ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents;
        assert_eq!(agents.len(), 1);
    }
}

/// SECURITY.md §3.10 item 101: the database stops. Writes and attestation fail
/// `Unavailable`, the token is not consumed, an agent keeps serving what it has, and
/// everything recovers by itself when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_database_gives_unavailable_consumes_nothing_and_recovers() {
    let Some(cluster) = PrivateCluster::start("stopped_database_gives_unavailable") else {
        return;
    };
    let db = create_database(&cluster.admin_url());
    let h = Harness::start_with(&datastore_config(&db)).await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let agent_id = agent.agent_id().to_string();
    h.create_entry(
        &agent_id,
        "spiffe://example.org/db/kept",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    let socket = h.agent_socket("a");
    let (kept, _) = wait_for_svid(
        &socket,
        "spiffe://example.org/db/kept",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    let token = h.join_token(None).await;

    cluster.stop();

    let status = h
        .create_entry(
            &agent_id,
            "spiffe://example.org/db/during",
            &[&format!("unix:uid:{}", my_uid())],
            0,
        )
        .await
        .expect_err("no write without a database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = attest_at(
        &h.node_address(),
        ca_der(&h),
        token.as_bytes(),
        new_key_and_csr().1,
    )
    .await
    .expect_err("no attestation without a database");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The agent keeps serving the SVID it has.
    let (still, _) = svid_of(&socket, "spiffe://example.org/db/kept")
        .await
        .expect("served during the outage");
    assert_eq!(still[0], kept[0]);

    cluster.resume();
    let back = Instant::now();

    // Recovery without a restart: the same token (never consumed) attests, writes
    // succeed, and the agent gets the new entry.
    let deadline = Instant::now() + Duration::from_secs(20);
    let svid = loop {
        match attest_at(
            &h.node_address(),
            ca_der(&h),
            token.as_bytes(),
            new_key_and_csr().1,
        )
        .await
        {
            Ok(svid) => break svid,
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("the token must still be usable: {status:?}"),
        }
    };
    eprintln!(
        "attestation works again {:?} after the database",
        back.elapsed()
    );
    assert!(svid.spiffe_id.contains("/tessera/agent/join_token/"));
    h.create_entry(
        &agent_id,
        "spiffe://example.org/db/after",
        &[&format!("unix:uid:{}", my_uid())],
        0,
    )
    .await
    .unwrap();
    wait_for_svid(
        &socket,
        "spiffe://example.org/db/after",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    agent.stop().await.unwrap();
}
