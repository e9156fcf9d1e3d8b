//! Push propagation, measured: entry create reaches a waiting workload's open stream,
//! entry delete removes the identity from every stream, changes made while an agent was
//! cut off arrive after it reconnects (from its last revision), and several agents
//! receive each change. The bound asserted is generous (10 s); the measured figures are
//! printed here and reported by `tessera-bench` (docs/benchmarks.md).

use std::path::Path;
use std::time::{Duration, Instant};

use tessera_agent::cli::with_header;
use tessera_proto::admin::DeleteEntryRequest;
use tessera_proto::workload::{X509svidRequest, X509svidResponse};
use tessera_tests::{Harness, my_uid};
use tonic::Streaming;

use crate::support::raw_workload_client;

const BOUND: Duration = Duration::from_secs(10);

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

/// Opens a `FetchX509SVID` stream for this process once it has `want` SVIDs.
async fn open_stream(socket: &Path, want: usize) -> Streaming<X509svidResponse> {
    let deadline = Instant::now() + BOUND;
    loop {
        let mut client = raw_workload_client(socket).await;
        if let Ok(response) = client.fetch_x509svid(with_header(X509svidRequest {})).await {
            let mut stream = response.into_inner();
            if let Ok(Some(first)) = stream.message().await
                && first.svids.len() == want
            {
                return stream;
            }
        }
        assert!(Instant::now() < deadline, "no stream with {want} SVIDs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The IDs of the next message on `stream` that satisfies `done`, and how long it took.
async fn until(
    stream: &mut Streaming<X509svidResponse>,
    done: impl Fn(&[String]) -> bool,
) -> (Vec<String>, Duration) {
    let start = Instant::now();
    tokio::time::timeout(BOUND, async {
        loop {
            let message = stream
                .message()
                .await
                .expect("stream healthy")
                .expect("stream open");
            let ids: Vec<String> = message.svids.iter().map(|s| s.spiffe_id.clone()).collect();
            if done(&ids) {
                return (ids, start.elapsed());
            }
        }
    })
    .await
    .expect("the change reached the stream within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_create_and_delete_reach_open_streams_within_the_bound() {
    let h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let parent = agent.agent_id().to_string();
    h.create_entry(&parent, "spiffe://example.org/base", &[&uid_selector()], 0)
        .await
        .unwrap();
    let mut stream = open_stream(agent.socket_path(), 1).await;

    let started = Instant::now();
    let entry = h
        .create_entry(&parent, "spiffe://example.org/added", &[&uid_selector()], 0)
        .await
        .unwrap();
    let (ids, _) = until(&mut stream, |ids| ids.len() == 2).await;
    let create_took = started.elapsed();
    assert!(
        ids.contains(&"spiffe://example.org/added".to_owned()),
        "{ids:?}"
    );

    let started = Instant::now();
    h.admin()
        .await
        .delete_entry(DeleteEntryRequest { id: entry.id })
        .await
        .unwrap();
    let (ids, _) = until(&mut stream, |ids| ids.len() == 1).await;
    let delete_took = started.elapsed();
    assert_eq!(ids, ["spiffe://example.org/base"]);
    eprintln!(
        "propagation: entry create -> stream {create_took:?}, entry delete -> stream {delete_took:?}"
    );
    assert!(create_took < BOUND && delete_took < BOUND);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_an_agent_was_cut_off_arrive_after_it_reconnects() {
    let mut h = Harness::start().await;
    let agent = h.start_agent("a", Some(h.join_token(None).await)).await;
    let parent = agent.agent_id().to_string();
    let kept = h
        .create_entry(&parent, "spiffe://example.org/kept", &[&uid_selector()], 0)
        .await
        .unwrap();
    let doomed = h
        .create_entry(
            &parent,
            "spiffe://example.org/doomed",
            &[&uid_selector()],
            0,
        )
        .await
        .unwrap();
    let mut stream = open_stream(agent.socket_path(), 2).await;

    // Cut the agent off: the server restarts, and changes land before the agent's
    // reconnect (its backoff starts at half a second).
    h.stop_server().await;
    h.start_server().await;
    h.admin()
        .await
        .delete_entry(DeleteEntryRequest { id: doomed.id })
        .await
        .unwrap();
    h.create_entry(
        &parent,
        "spiffe://example.org/newcomer",
        &[&uid_selector()],
        0,
    )
    .await
    .unwrap();

    let (ids, took) = until(&mut stream, |ids| {
        ids.len() == 2 && ids.contains(&"spiffe://example.org/newcomer".to_owned())
    })
    .await;
    assert!(
        ids.contains(&"spiffe://example.org/kept".to_owned()),
        "{ids:?}"
    );
    assert!(
        !ids.contains(&"spiffe://example.org/doomed".to_owned()),
        "{ids:?}"
    );
    eprintln!("resync after reconnect: {took:?}");
    // The kept entry was never re-created: same id on the server.
    let entries = h
        .admin()
        .await
        .list_entries(tessera_proto::admin::ListEntriesRequest {})
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(entries.iter().any(|e| e.id == kept.id));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_agents_receive_each_change() {
    let h = Harness::start().await;
    let alias = "spiffe://example.org/node-group/web";
    let a = h
        .start_agent("a", Some(h.join_token(Some(alias)).await))
        .await;
    let b = h
        .start_agent("b", Some(h.join_token(Some(alias)).await))
        .await;
    h.create_entry(
        alias,
        "spiffe://example.org/web/base",
        &[&uid_selector()],
        0,
    )
    .await
    .unwrap();
    let mut stream_a = open_stream(a.socket_path(), 1).await;
    let mut stream_b = open_stream(b.socket_path(), 1).await;

    let entry = h
        .create_entry(
            alias,
            "spiffe://example.org/web/added",
            &[&uid_selector()],
            0,
        )
        .await
        .unwrap();
    let ((ids_a, took_a), (ids_b, took_b)) = tokio::join!(
        until(&mut stream_a, |ids| ids.len() == 2),
        until(&mut stream_b, |ids| ids.len() == 2)
    );
    assert_eq!(ids_a.len(), 2);
    assert_eq!(ids_b.len(), 2);
    eprintln!("two agents: create reached a in {took_a:?}, b in {took_b:?}");

    h.admin()
        .await
        .delete_entry(DeleteEntryRequest { id: entry.id })
        .await
        .unwrap();
    let ((ids_a, _), (ids_b, _)) = tokio::join!(
        until(&mut stream_a, |ids| ids.len() == 1),
        until(&mut stream_b, |ids| ids.len() == 1)
    );
    assert_eq!(ids_a, ["spiffe://example.org/web/base"]);
    assert_eq!(ids_b, ["spiffe://example.org/web/base"]);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
