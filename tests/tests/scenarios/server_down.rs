//! The server goes away (SECURITY.md §3.10 items 98 and 99): the agent keeps serving
//! the SVIDs it holds while they are valid, on new connections and open streams alike;
//! it never hands out an expired certificate (once the SVID's NotAfter has passed with
//! the server still down, callers get `Unavailable`); when the server comes back on the
//! same address and data directory, workloads get fresh SVIDs by themselves, without an
//! agent restart; and a server restart under an open stream loses neither the entries
//! nor the bundle the agent holds. Every SVID seen is parsed and checked: its URI SAN,
//! its chain against the bundle served with it, and its NotAfter against the clock at
//! the moment it was received.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tessera_agent::cli::{split_der_certificates, with_header};
use tessera_proto::workload::{JwtsvidRequest, X509svidRequest, X509svidResponse};
use tessera_tests::{Harness, my_uid};
use tokio::sync::mpsc;
use tonic::{Code, Streaming};

use crate::support::{chain_verifies, fetch_x509_raw, raw_workload_client};

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// What one served X.509-SVID is, read from its certificate.
#[derive(Debug, Clone)]
struct Served {
    spiffe_id: String,
    serial: String,
    not_after: SystemTime,
}

/// Parses and checks every SVID of `response`, received at `at`: the leaf's URI SAN is
/// the `spiffe_id` sent with it, the chain verifies against the bundle sent with it, and
/// the certificate was not expired when it was received (never an expired SVID).
fn check(response: &X509svidResponse, at: SystemTime) -> Vec<Served> {
    assert!(!response.svids.is_empty(), "an answer is never empty");
    response
        .svids
        .iter()
        .map(|svid| {
            let chain = split_der_certificates(&svid.x509_svid).unwrap();
            let bundle = split_der_certificates(&svid.bundle).unwrap();
            let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
            let not_before = time(leaf.validity().not_before.timestamp());
            let not_after = time(leaf.validity().not_after.timestamp());
            assert!(
                not_after > at,
                "{} served expired: NotAfter {not_after:?}, received at {at:?}",
                svid.spiffe_id
            );
            assert!(not_before <= at, "{} not yet valid", svid.spiffe_id);
            let uris: Vec<String> = leaf
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect();
            assert_eq!(uris, std::slice::from_ref(&svid.spiffe_id));
            verify(&chain, &bundle, at);
            Served {
                spiffe_id: svid.spiffe_id.clone(),
                serial: leaf.raw_serial_as_string(),
                not_after,
            }
        })
        .collect()
}

fn time(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
}

/// The chain (leaf first) verifies against `bundle` at `at`, for client authentication.
fn verify(chain: &[Vec<u8>], bundle: &[Vec<u8>], at: SystemTime) {
    chain_verifies(chain, bundle, at, webpki::KeyUsage::client_auth())
        .expect("the SVID chains to the bundle served with it");
}

/// Opens a `FetchX509SVID` stream once it answers with `want` SVIDs (polling until
/// `limit`); returns it with its first answer, checked.
async fn open_stream(
    socket: &Path,
    want: usize,
    limit: Duration,
) -> (Streaming<X509svidResponse>, Vec<Served>) {
    let deadline = Instant::now() + limit;
    loop {
        let mut client = raw_workload_client(socket).await;
        if let Ok(response) = client.fetch_x509svid(with_header(X509svidRequest {})).await {
            let mut stream = response.into_inner();
            if let Ok(Some(first)) = stream.message().await
                && first.svids.len() == want
            {
                let served = check(&first, SystemTime::now());
                return (stream, served);
            }
        }
        assert!(Instant::now() < deadline, "no stream with {want} SVIDs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What happened on a stream followed in the background: each answer (checked when it
/// arrived) or the error that ended it, with when it arrived.
#[derive(Debug)]
enum Event {
    Answer(Vec<Served>),
    Ended(Code, Instant),
}

/// Follows `stream` in a task: every answer is checked as it arrives (never expired).
fn follow(mut stream: Streaming<X509svidResponse>) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    let served = check(&message, SystemTime::now());
                    if tx.send(Event::Answer(served)).is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    let _ = tx.send(Event::Ended(Code::Ok, Instant::now()));
                    return;
                }
                Err(status) => {
                    let _ = tx.send(Event::Ended(status.code(), Instant::now()));
                    return;
                }
            }
        }
    });
    rx
}

/// `FetchX509SVID` on a new connection until it answers (polling until `limit`).
async fn fetch_until_served(socket: &Path, limit: Duration) -> Vec<Served> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(response) = fetch_x509_raw(socket).await {
            return check(&response, SystemTime::now());
        }
        assert!(Instant::now() < deadline, "no SVID within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An `Instant` for a `SystemTime` (now if it is past).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_outlive_an_outage_until_expiry_never_after_and_come_back_by_themselves() {
    let mut h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let agent_id = agent.agent_id().to_string();
    let socket = agent.socket_path().to_owned();
    // 5 s SVIDs: renewed at about half-life while the server is up.
    h.create_entry(
        &agent_id,
        "spiffe://example.org/outage",
        &[&uid_selector()],
        5,
    )
    .await
    .unwrap();
    let (before, first) = open_stream(&socket, 1, Duration::from_secs(10)).await;
    assert_eq!(first[0].spiffe_id, "spiffe://example.org/outage");
    let mut before = follow(before);

    h.stop_server().await;
    // The agent can renew nothing now: what it serves is the SVID it holds.
    let held = fetch_until_served(&socket, Duration::from_secs(1)).await;
    let expiry = held[0].not_after;
    assert!(
        expiry > SystemTime::now() + Duration::from_millis(500),
        "the test needs a still-valid SVID at the outage (NotAfter {expiry:?})"
    );
    // A stream opened during the outage answers with it too.
    let (during, opened) = open_stream(&socket, 1, Duration::from_secs(1)).await;
    assert_eq!(opened[0].serial, held[0].serial);
    let mut during = follow(during);

    // Until NotAfter, new connections keep getting it (checked valid on receipt); then
    // `Unavailable`, never the expired certificate.
    let deadline = instant_of(expiry) + Duration::from_secs(3);
    let refused = loop {
        match fetch_x509_raw(&socket).await {
            Ok(response) => {
                let served = check(&response, SystemTime::now());
                assert_eq!(
                    served[0].serial, held[0].serial,
                    "nothing new without a server"
                );
            }
            Err(status) => break status,
        }
        assert!(
            Instant::now() < deadline,
            "still answering long after NotAfter"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let refused_at = SystemTime::now();
    assert!(
        refused_at + Duration::from_millis(500) >= expiry,
        "refused well before NotAfter ({refused:?})"
    );
    // Both open streams: every answer was valid on receipt (checked in `follow`), and
    // each ends with a retryable `Unavailable` once the SVID expired.
    for (name, events) in [
        ("opened before", &mut before),
        ("opened during", &mut during),
    ] {
        let ended = tokio::time::timeout_at(deadline.into(), async {
            loop {
                match events.recv().await.expect("stream followed") {
                    Event::Answer(served) => {
                        assert!(
                            served[0].not_after <= expiry || served[0].serial == held[0].serial
                        );
                    }
                    Event::Ended(code, at) => return (code, at),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("stream {name} still open after NotAfter"));
        assert_eq!(ended.0, Code::Unavailable, "stream {name}");
        assert!(
            ended.1 + Duration::from_millis(500) >= instant_of(expiry),
            "stream {name} ended before NotAfter"
        );
    }
    // Still down, still refused.
    let status = fetch_x509_raw(&socket).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // The server comes back on the same address and data directory: the same agent,
    // never restarted, serves a fresh SVID by itself.
    h.start_server().await;
    let back = Instant::now();
    let fresh = fetch_until_served(&socket, Duration::from_secs(15)).await;
    let took = back.elapsed();
    eprintln!("server_down: fresh SVID {took:?} after the server came back");
    // Within the agent's backoff at most (it doubles from 0.5 s; the outage lasted
    // about 5 s), usually at once: any call that reaches the server wakes the others.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(fresh[0].spiffe_id, "spiffe://example.org/outage");
    assert_ne!(fresh[0].serial, held[0].serial);
    assert!(fresh[0].not_after > expiry);
    assert_eq!(agent.agent_id().to_string(), agent_id, "the same agent");
    // And a stream gets it, and the next rotation, as before the outage.
    let (stream, opened) = open_stream(&socket, 1, Duration::from_secs(5)).await;
    let mut after = follow(stream);
    let rotated = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match after.recv().await.expect("stream followed") {
                Event::Answer(served) if served[0].serial != opened[0].serial => return served,
                Event::Answer(_) => {}
                Event::Ended(code, _) => panic!("stream ended after recovery: {code:?}"),
            }
        }
    })
    .await
    .expect("a rotation on the stream after recovery");
    assert!(rotated[0].not_after > opened[0].not_after);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_under_an_open_stream_keeps_entries_and_bundle() {
    let mut h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let agent_id = agent.agent_id().to_string();
    let socket = agent.socket_path().to_owned();
    for name in ["one", "two"] {
        h.create_entry(
            &agent_id,
            &format!("spiffe://example.org/kept/{name}"),
            &[&uid_selector()],
            0,
        )
        .await
        .unwrap();
    }
    let (mut stream, first) = open_stream(&socket, 2, Duration::from_secs(10)).await;
    let ca = h.server.as_ref().unwrap().ca_certificate_der();
    let bundle_of =
        |response: &X509svidResponse| split_der_certificates(&response.svids[0].bundle).unwrap();
    let serials = |served: &[Served]| {
        let mut pairs: Vec<(String, String)> = served
            .iter()
            .map(|s| (s.spiffe_id.clone(), s.serial.clone()))
            .collect();
        pairs.sort();
        pairs
    };
    let mut jwt_client = raw_workload_client(&socket).await;
    let jwt_request = || {
        with_header(JwtsvidRequest {
            audience: vec!["outage-test".into()],
            spiffe_id: "spiffe://example.org/kept/one".into(),
        })
    };
    let token = jwt_client
        .fetch_jwtsvid(jwt_request())
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();

    h.stop_server().await;
    // During the outage: the same SVIDs and bundle on a new connection, and the cached
    // JWT-SVID without waiting for the unreachable server (§3.10 item 99, SPIRE #6454).
    let during = fetch_x509_raw(&socket).await.unwrap();
    assert_eq!(serials(&check(&during, SystemTime::now())), serials(&first));
    assert_eq!(bundle_of(&during), std::slice::from_ref(&ca));
    let asked = Instant::now();
    let cached = jwt_client
        .fetch_jwtsvid(jwt_request())
        .await
        .unwrap()
        .into_inner();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(cached.svids[0].svid, token);

    h.start_server().await;
    assert_eq!(h.server.as_ref().unwrap().ca_certificate_der(), ca);
    // The stream opened before the restart is still open; the agent resumed its Sync
    // stream: an entry created after the restart reaches it, next to the two it held
    // (the same certificates: nothing was lost, nothing needed re-minting).
    h.create_entry(
        &agent_id,
        "spiffe://example.org/kept/three",
        &[&uid_selector()],
        0,
    )
    .await
    .unwrap();
    let third = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let message = stream
                .message()
                .await
                .expect("the stream survives the server restart")
                .expect("stream open");
            let served = check(&message, SystemTime::now());
            if served.len() == 3 {
                return message;
            }
        }
    })
    .await
    .expect("the new entry reached the open stream after the restart");
    let served = check(&third, SystemTime::now());
    let kept: Vec<(String, String)> = serials(&served)
        .into_iter()
        .filter(|(id, _)| !id.ends_with("/three"))
        .collect();
    assert_eq!(kept, serials(&first), "the SVIDs held before the restart");
    assert_eq!(
        bundle_of(&third),
        std::slice::from_ref(&ca),
        "the bundle held before the restart"
    );
    let snapshot = agent.snapshot();
    assert_eq!(snapshot.entries.len(), 3);
    assert_eq!(snapshot.bundle.authorities, [ca]);
    agent.stop().await.unwrap();
}
