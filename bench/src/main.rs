//! `tessera-bench`: measures tessera's hot paths and, in the same run, the floor each
//! one stands on, and prints one JSON document. The ratio to the floor is the number to
//! compare across machines (PERF.md): the machines are shared and noisy, so absolute
//! figures are context, not targets.
//!
//! Measured: SHA-256 (raw) vs the unix attestor's first-sight binary hash; the unix
//! attestor's warm call (hash cache hit); P-256 signing (raw) vs X.509-SVID and JWT-SVID
//! signing; P-256 verification (raw) vs JWT-SVID validation; a raw Unix-socket
//! ping-pong vs `FetchX509SVID` on an open connection and on a new one, through a real
//! server and agent (also with the agent on its own thread and runtime, current-thread
//! and 2-worker multi-thread, and the client on another, as in two processes); entry
//! create/delete propagation to an open stream vs an admin round trip; the first SVID of
//! a per-instance identity vs a cached fetch.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Value, json};
use tessera_plugin_sdk::{SpiffeId, TrustDomain, Workload, WorkloadAttestor};

/// Benchmarks of tessera's hot paths, each with its floor measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "tessera-bench", version, about)]
struct Args {
    /// Fewer iterations (a smoke run, e.g. in CI); the numbers are then rough.
    #[arg(long)]
    quick: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    output: Option<std::path::PathBuf>,
}

/// Latency summary in microseconds from an hdrhistogram.
fn latency(samples: &[Duration]) -> Result<Value> {
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3)?;
    for sample in samples {
        histogram.record(u64::try_from(sample.as_nanos()).unwrap_or(u64::MAX))?;
    }
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "unit": "us",
        "p50": us(0.50),
        "p99": us(0.99),
        "p999": us(0.999),
        "samples": samples.len(),
    }))
}

/// Operations per second of `op` run `n` times.
fn rate(n: u32, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        op()?;
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

fn ratio(value: f64, floor: f64) -> f64 {
    if floor > 0.0 {
        (value / floor * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// A running copy of `sleep` padded to `size` bytes (trailing bytes after an ELF image
/// are ignored by the loader), pinned like an agent caller.
struct PaddedProcess {
    child: std::process::Child,
    workload: Workload,
    _dir: tempfile::TempDir,
}

impl PaddedProcess {
    fn start(size: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let sleep = ["/usr/bin/sleep", "/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("no sleep binary")?;
        let mut image = std::fs::read(sleep)?;
        image.resize(size.max(image.len()), 0);
        let path = dir.path().join("padded-sleep");
        std::fs::write(&path, &image)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let child = std::process::Command::new(&path).arg("60").spawn()?;
        // Wait until the exec has happened (exe points at the padded file).
        let pid = i32::try_from(child.id())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            != Some(path.as_path())
        {
            anyhow::ensure!(Instant::now() < deadline, "child did not exec");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pidfd = tessera_plugin_sdk::workload::pidfd_open(pid)?;
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let workload = Workload::pin(pid, uid, gid, pidfd, false, Path::new("/proc"))?;
        Ok(Self {
            child,
            workload,
            _dir: dir,
        })
    }
}

impl Drop for PaddedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hashing(quick: bool) -> Result<Vec<Value>> {
    let size = if quick { 32 << 20 } else { 256 << 20 };
    let data = vec![0x5au8; size];
    let start = Instant::now();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &data);
    let raw_mb_s = size as f64 / 1e6 / start.elapsed().as_secs_f64();
    std::hint::black_box(digest);

    let process = PaddedProcess::start(size)?;
    let config = tessera_plugin_unix::UnixAttestorConfig {
        max_binary_size: (size as u64) * 2,
        ..Default::default()
    };
    let attestor = tessera_plugin_unix::UnixAttestor::new(config);
    let start = Instant::now();
    let selectors = attestor.attest(&process.workload)?;
    let first_sight = start.elapsed();
    anyhow::ensure!(
        selectors.iter().any(|s| s.value().starts_with("sha256:")),
        "no hash selector"
    );
    let first_mb_s = size as f64 / 1e6 / first_sight.as_secs_f64();

    let n = if quick { 200 } else { 5000 };
    let mut warm = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        attestor.attest(&process.workload)?;
        warm.push(start.elapsed());
    }
    Ok(vec![
        json!({ "name": "sha256_raw", "unit": "MB/s", "value": raw_mb_s, "bytes": size }),
        json!({
            "name": "unix_attestor_first_sight",
            "unit": "MB/s",
            "value": first_mb_s,
            "floor": "sha256_raw",
            "ratio_to_floor": ratio(first_mb_s, raw_mb_s),
            "note": "whole unix attestation (status, names, exe) of a process running a padded binary; dominated by hashing it"
        }),
        json!({
            "name": "unix_attestor_warm_call",
            "latency": latency(&warm)?,
            "note": "hash served from the (dev, ino, size, mtime, ctime) cache; status and exe still read"
        }),
    ])
}

fn signing(quick: bool) -> Result<Vec<Value>> {
    use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair};
    let n = if quick { 500 } else { 20_000 };
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("key parse"))?;
    let message = [7u8; 300];
    let raw_sign = rate(n, || {
        key.sign(&rng, &message)
            .map(drop)
            .map_err(|_| anyhow::anyhow!("sign"))
    })?;
    let signature = key
        .sign(&rng, &message)
        .map_err(|_| anyhow::anyhow!("sign"))?;
    let public = signature::UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_FIXED,
        key.public_key().as_ref().to_vec(),
    );
    let raw_verify = rate(n, || {
        public
            .verify(&message, signature.as_ref())
            .map_err(|_| anyhow::anyhow!("verify"))
    })?;

    let td = TrustDomain::new("bench.example")?;
    // The CA key lives in a memory key manager, as the server's lives in its key manager.
    let ca_key = tokio::runtime::Builder::new_current_thread()
        .build()?
        .block_on(async {
            use tessera_plugin_sdk::keymanager::{KeyManager, KeyType};
            tessera_plugin_keymanager::MemoryKeyManager::new()
                .generate_key("x509-ca-bench", KeyType::EcP256)
                .await
        })?;
    let ca = tessera_server::ca::CertificateAuthority::self_signed(
        ca_key,
        &td,
        Duration::from_secs(86400 * 30),
        SystemTime::now(),
    )?;
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&leaf_key);
    let id = SpiffeId::parse("spiffe://bench.example/workload")?;
    let x509 = rate(n, || {
        ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(3600))
            .map(drop)
            .map_err(Into::into)
    })?;

    let signer = tessera_plugin_sdk::jwt::JwtSigner::generate("bench".into())?;
    let audiences = vec!["service".to_owned()];
    let jwt_sign = rate(n, || {
        signer
            .sign(&id, &audiences, Duration::from_secs(300), SystemTime::now())
            .map(drop)
            .map_err(Into::into)
    })?;
    let token = signer
        .sign(&id, &audiences, Duration::from_secs(300), SystemTime::now())?
        .token;
    let bundle = tessera_plugin_sdk::jwt::JwtBundle::new(td, vec![signer.public_key()]);
    let jwt_validate = rate(n, || {
        tessera_plugin_sdk::jwt::validate(&token, "service", &bundle, SystemTime::now())
            .map(drop)
            .map_err(Into::into)
    })?;
    Ok(vec![
        json!({ "name": "p256_sign_raw", "unit": "ops/s", "value": raw_sign }),
        json!({ "name": "x509_svid_sign", "unit": "ops/s", "value": x509, "floor": "p256_sign_raw", "ratio_to_floor": ratio(x509, raw_sign),
                "note": "server signs an X.509-SVID for a public key (no CSR), one core" }),
        json!({ "name": "jwt_svid_sign", "unit": "ops/s", "value": jwt_sign, "floor": "p256_sign_raw", "ratio_to_floor": ratio(jwt_sign, raw_sign) }),
        json!({ "name": "p256_verify_raw", "unit": "ops/s", "value": raw_verify }),
        json!({ "name": "jwt_svid_validate", "unit": "ops/s", "value": jwt_validate, "floor": "p256_verify_raw", "ratio_to_floor": ratio(jwt_validate, raw_verify) }),
    ])
}

/// Round trips of one byte over a Unix socket pair between two threads: the floor of
/// any Workload API call (same wakeups across cores, no gRPC, no attestation).
fn uds_ping_pong(n: usize) -> Result<Vec<Duration>> {
    let (mut client, mut server) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while server.read_exact(&mut byte).is_ok() {
            if server.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(n);
    let mut byte = [1u8; 1];
    for _ in 0..n {
        let start = Instant::now();
        client.write_all(&byte)?;
        client.read_exact(&mut byte)?;
        samples.push(start.elapsed());
    }
    drop(client);
    let _ = echo.join();
    Ok(samples)
}

async fn workload_api(quick: bool) -> Result<Vec<Value>> {
    use tessera_agent::cli::with_header;
    use tessera_proto::workload::X509svidRequest;
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let n = if quick { 200 } else { 5000 };
    let floor = uds_ping_pong(n)?;
    let h = tessera_tests::Harness::start().await;
    // The per-uid request rate limit would refuse a benchmark's thousands of calls.
    let mut config = h.agent_config("bench");
    config.max_requests_per_second_per_uid = 0;
    let agent = tessera_agent::start(config, Some(h.join_token(None).await)).await?;
    tessera_tests::wait_until("agent synced", Duration::from_secs(10), || {
        agent.is_synced()
    })
    .await;
    let selector = format!("unix:uid:{}", tessera_tests::my_uid());
    h.create_entry(
        agent.agent_id().as_str(),
        "spiffe://example.org/bench",
        &[&selector],
        0,
    )
    .await
    .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
    let socket = agent.socket_path().to_owned();

    let open = open_connection_samples(&socket, n).await?;
    let fresh_n = n / 5;
    let mut fresh = Vec::with_capacity(fresh_n);
    for _ in 0..fresh_n {
        let start = Instant::now();
        let channel = tessera_proto::uds::connect(&socket).await?;
        let mut client = SpiffeWorkloadApiClient::new(channel);
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await?.context("no SVID")?;
        fresh.push(start.elapsed());
    }
    agent.stop().await?;

    // The same open-connection calls with the agent and the client each on their own
    // thread and runtime, as two processes would be: the agent on a current-thread
    // runtime, then on a 2-worker multi-thread one (PERF.md: measure both).
    let mut separate = Vec::new();
    for (name, multi_thread) in [("bench-ct", false), ("bench-mt", true)] {
        let agent = AgentThread::start(&h, name, multi_thread).await?;
        h.create_entry(
            &agent.agent_id,
            &format!("spiffe://example.org/{name}"),
            &[&selector],
            0,
        )
        .await
        .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
        let samples = client_thread_samples(agent.socket_path.clone(), n).await;
        agent.stop().await?;
        separate.push(samples?);
    }

    let floor_p50 = latency(&floor)?["p50"].as_f64().unwrap_or(0.0);
    let fresh_latency = latency(&fresh)?;
    let fresh_p50 = fresh_latency["p50"].as_f64().unwrap_or(0.0);
    Ok(vec![
        json!({ "name": "uds_ping_pong", "latency": latency(&floor)?, "note": "two threads, one byte each way" }),
        open_connection_result(
            "fetch_x509svid_open_connection",
            &open,
            floor_p50,
            "client and agent in one process on a 2-worker tokio runtime (they may share or cross cores); attestation is cached per process, every call re-validates it (liveness, exe inode, status ids, cgroup)",
        )?,
        json!({
            "name": "fetch_x509svid_new_connection",
            "latency": fresh_latency,
            "floor": "uds_ping_pong",
            "ratio_to_floor_p50": ratio(fresh_p50, floor_p50),
        }),
        open_connection_result(
            "fetch_x509svid_open_connection_agent_current_thread",
            &separate[0],
            floor_p50,
            "agent on its own thread with a current-thread tokio runtime, client on another thread with its own current-thread runtime (as two processes; threads not pinned, they may share or cross cores); server on the main runtime, off the measured path",
        )?,
        open_connection_result(
            "fetch_x509svid_open_connection_agent_multi_thread",
            &separate[1],
            floor_p50,
            "agent on its own 2-worker multi-thread tokio runtime (started from its own thread), client on another thread with its own current-thread runtime (as two processes; threads not pinned, they may share or cross cores); server on the main runtime, off the measured path",
        )?,
    ])
}

/// `n` `FetchX509SVID` calls on one open connection to `socket`, after 50 unmeasured
/// ones: each call is a new stream whose first message is awaited (what a client does
/// on every refresh).
async fn open_connection_samples(socket: &Path, n: usize) -> Result<Vec<Duration>> {
    use tessera_agent::cli::with_header;
    use tessera_proto::workload::X509svidRequest;
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let channel = tessera_proto::uds::connect(socket).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut open = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let start = Instant::now();
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        stream.message().await?.context("no SVID")?;
        if i >= 50 {
            open.push(start.elapsed());
        }
    }
    Ok(open)
}

/// The JSON result of an open-connection measurement against the `uds_ping_pong` floor.
fn open_connection_result(
    name: &str,
    samples: &[Duration],
    floor_p50: f64,
    note: &str,
) -> Result<Value> {
    let open_latency = latency(samples)?;
    let open_p50 = open_latency["p50"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "name": name,
        "latency": open_latency,
        "floor": "uds_ping_pong",
        "ratio_to_floor_p50": ratio(open_p50, floor_p50),
        "note": note,
    }))
}

/// [`open_connection_samples`] run by a client on its own thread with its own
/// current-thread runtime, as a workload process would.
async fn client_thread_samples(socket: PathBuf, n: usize) -> Result<Vec<Duration>> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            let samples = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(open_connection_samples(&socket, n)));
            let _ = done.send(samples);
        })?;
    result.await.context("client thread ended")?
}

/// An agent on its own OS thread with its own tokio runtime (current-thread or 2-worker
/// multi-thread), as the agent process would run it. The runtime blocks on a stop
/// signal; [`AgentThread::stop`] (or dropping it) stops the agent, then the runtime
/// shuts down with the thread.
struct AgentThread {
    agent_id: String,
    socket_path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl AgentThread {
    /// Starts the agent `name` of `h` and waits until it has synced.
    async fn start(h: &tessera_tests::Harness, name: &str, multi_thread: bool) -> Result<Self> {
        // The per-uid request rate limit would refuse a benchmark's thousands of calls.
        let mut config = h.agent_config(name);
        config.max_requests_per_second_per_uid = 0;
        let token = h.join_token(None).await;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(String, PathBuf)>>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-agent"))
            .spawn(move || -> Result<()> {
                let runtime = if multi_thread {
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?
                } else {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                };
                let result = runtime.block_on(async move {
                    let agent = match tessera_agent::start(config, Some(token)).await {
                        Ok(agent) => agent,
                        Err(err) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!("agent start: {err}")));
                            return Ok(());
                        }
                    };
                    tessera_tests::wait_until("agent synced", Duration::from_secs(10), || {
                        agent.is_synced()
                    })
                    .await;
                    let ready = (
                        agent.agent_id().as_str().to_owned(),
                        agent.socket_path().to_owned(),
                    );
                    if ready_tx.send(Ok(ready)).is_ok() {
                        // Serve until told to stop (or until the sender is dropped).
                        let _ = stop_rx.await;
                    }
                    agent.stop().await
                });
                runtime.shutdown_timeout(Duration::from_secs(5));
                result.map_err(Into::into)
            })?;
        let mut this = Self {
            agent_id: String::new(),
            socket_path: PathBuf::new(),
            stop: Some(stop),
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok((agent_id, socket_path))) => {
                this.agent_id = agent_id;
                this.socket_path = socket_path;
                Ok(this)
            }
            Ok(Err(err)) => {
                this.stop().await?;
                Err(err)
            }
            Err(_) => {
                this.stop().await?;
                anyhow::bail!("agent thread ended before it was ready")
            }
        }
    }

    /// Stops the agent and waits for its thread (and runtime) to end.
    async fn stop(mut self) -> Result<()> {
        self.stop.take();
        let thread = self.thread.take().context("agent thread already joined")?;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("agent thread panicked"))?
    }
}

impl Drop for AgentThread {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Latencies of one propagation run: entry create -> SVID on the stream, entry delete
/// -> gone from it, and the admin round trip (the floor), in that order.
type PropagationSamples = (Vec<Duration>, Vec<Duration>, Vec<Duration>);

/// Entry create -> SVID on an open `FetchX509SVID` stream of an agent attached to
/// `agent_side`, and entry delete -> the identity gone from it, the entries written
/// through `writer`'s admin API (the same server, or another one sharing its
/// datastore). The floor: `writer`'s admin `GetEntry` round trip (a datastore read).
async fn propagation_samples(
    agent_side: &tessera_tests::Harness,
    writer: &tessera_tests::Harness,
    n: usize,
) -> Result<PropagationSamples> {
    use tessera_agent::cli::with_header;
    use tessera_proto::admin::{DeleteEntryRequest, GetEntryRequest};
    use tessera_proto::workload::X509svidRequest;
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let agent = tessera_agent::start(
        agent_side.agent_config("propagation"),
        Some(agent_side.join_token(None).await),
    )
    .await?;
    tessera_tests::wait_until("agent synced", Duration::from_secs(10), || {
        agent.is_synced()
    })
    .await;
    let parent = agent.agent_id().as_str().to_owned();
    let selector = format!("unix:uid:{}", tessera_tests::my_uid());
    writer
        .create_entry(&parent, "spiffe://example.org/bench/base", &[&selector], 0)
        .await
        .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
    let channel = tessera_proto::uds::connect(agent.socket_path()).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    // The stream opens once the base SVID exists.
    let mut stream = loop {
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner();
        if let Ok(Some(message)) = stream.message().await
            && message.svids.len() == 1
        {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut admin = writer.admin().await;
    let mut create = Vec::with_capacity(n);
    let mut delete = Vec::with_capacity(n);
    let mut admin_floor = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let entry = writer
            .create_entry(
                &parent,
                &format!("spiffe://example.org/bench/p{i}"),
                &[&selector],
                0,
            )
            .await
            .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
        loop {
            let message = stream.message().await?.context("stream ended")?;
            if message.svids.len() == 2 {
                break;
            }
        }
        create.push(start.elapsed());
        let start = Instant::now();
        admin
            .delete_entry(DeleteEntryRequest { id: entry.id })
            .await?;
        loop {
            let message = stream.message().await?.context("stream ended")?;
            if message.svids.len() == 1 {
                break;
            }
        }
        delete.push(start.elapsed());
        // The floor: one admin round trip that reads the datastore.
        let start = Instant::now();
        let _ = admin
            .get_entry(GetEntryRequest { id: "0".repeat(32) })
            .await;
        admin_floor.push(start.elapsed());
    }
    agent.stop().await?;
    Ok((create, delete, admin_floor))
}

/// The JSON results of one propagation run, named `<prefix>_entry_create` and
/// `<prefix>_entry_delete` against the floor `floor_name`.
fn propagation_results(
    samples: &PropagationSamples,
    prefix: &str,
    floor_name: &str,
    floor_note: &str,
    setting: &str,
) -> Result<Vec<Value>> {
    let (create, delete, admin_floor) = samples;
    let floor = latency(admin_floor)?;
    let floor_p50 = floor["p50"].as_f64().unwrap_or(0.0);
    let create_latency = latency(create)?;
    let delete_latency = latency(delete)?;
    let create_p50 = create_latency["p50"].as_f64().unwrap_or(0.0);
    let delete_p50 = delete_latency["p50"].as_f64().unwrap_or(0.0);
    Ok(vec![
        json!({ "name": floor_name, "latency": floor, "note": floor_note }),
        json!({
            "name": format!("{prefix}_entry_create"),
            "latency": create_latency,
            "floor": floor_name,
            "ratio_to_floor_p50": ratio(create_p50, floor_p50),
            "note": format!("entry create -> the new SVID on an open FetchX509SVID stream (Sync push, signing, Workload API push); {setting}")
        }),
        json!({
            "name": format!("{prefix}_entry_delete"),
            "latency": delete_latency,
            "floor": floor_name,
            "ratio_to_floor_p50": ratio(delete_p50, floor_p50),
            "note": format!("entry delete -> the identity gone from the open stream; {setting}")
        }),
    ])
}

/// Entry create -> SVID on an open `FetchX509SVID` stream, and entry delete -> the
/// identity gone from it, through a real server (SQLite) and agent. Floor: an admin
/// `GetEntry` round trip (a datastore read); every propagation includes one admin call.
async fn propagation(quick: bool) -> Result<Vec<Value>> {
    let n = if quick { 10 } else { 100 };
    let h = tessera_tests::Harness::start().await;
    let samples = propagation_samples(&h, &h, n).await?;
    propagation_results(
        &samples,
        "propagation",
        "admin_round_trip",
        "admin GetEntry over the admin Unix socket (datastore read)",
        "one server, SQLite",
    )
}

/// The same across two servers sharing one PostgreSQL database: the entry is written
/// through server B, the agent syncs with server A, which learns of it through
/// PostgreSQL `LISTEN/NOTIFY`. Needs `TESSERA_TEST_POSTGRES` (`scripts/postgres.sh
/// start` prints it); without it the result says it was skipped.
async fn propagation_across_servers(quick: bool) -> Result<Vec<Value>> {
    use tessera_tests::postgres::{create_database, datastore_config};
    let Ok(url) = std::env::var("TESSERA_TEST_POSTGRES") else {
        return Ok(vec![json!({
            "name": "propagation_across_servers_entry_create",
            "skipped": "no PostgreSQL: set TESSERA_TEST_POSTGRES=$(scripts/postgres.sh start)"
        })]);
    };
    let n = if quick { 10 } else { 100 };
    let db = create_database(&url);
    let a = tessera_tests::Harness::start_with(&datastore_config(&db)).await;
    let b = tessera_tests::Harness::start_with(&datastore_config(&db)).await;
    let samples = propagation_samples(&a, &b, n).await?;
    propagation_results(
        &samples,
        "propagation_across_servers",
        "admin_round_trip_postgres",
        "admin GetEntry over server B's admin Unix socket (PostgreSQL read on loopback)",
        "entry written through server B, agent synced with server A, both on one PostgreSQL database (LISTEN/NOTIFY)",
    )
}

/// The first X.509-SVID of a per-instance (`{instance}`) identity: the agent holds the
/// entry, no SVID exists for this process yet, and `FetchX509SVID` mints one with one
/// server round trip. Floor: `FetchX509SVID` of an already-cached identity on the same
/// open connection, in the same run.
async fn instance_first_svid(quick: bool) -> Result<Vec<Value>> {
    use tessera_agent::cli::with_header;
    use tessera_proto::admin::DeleteEntryRequest;
    use tessera_proto::workload::X509svidRequest;
    use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let n = if quick { 10 } else { 100 };
    let h = tessera_tests::Harness::start().await;
    let mut config = h.agent_config("instances");
    config.max_requests_per_second_per_uid = 0;
    let agent = tessera_agent::start(config, Some(h.join_token(None).await)).await?;
    tessera_tests::wait_until("agent synced", Duration::from_secs(10), || {
        agent.is_synced()
    })
    .await;
    let parent = agent.agent_id().as_str().to_owned();
    let selector = format!("unix:uid:{}", tessera_tests::my_uid());
    h.create_entry(
        &parent,
        "spiffe://example.org/bench/cached",
        &[&selector],
        0,
    )
    .await
    .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
    let channel = tessera_proto::uds::connect(agent.socket_path()).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel);
    let mut fetch = async |want: usize| -> Result<()> {
        loop {
            let mut stream = client
                .fetch_x509svid(with_header(X509svidRequest {}))
                .await?
                .into_inner();
            let message = stream.message().await?.context("no SVID")?;
            if message.svids.len() == want {
                return Ok(());
            }
        }
    };
    fetch(1).await?;
    let mut first = Vec::with_capacity(n);
    let mut cached = Vec::with_capacity(n);
    let mut admin = h.admin().await;
    for i in 0..n {
        let entry = h
            .create_entry(
                &parent,
                &format!("spiffe://example.org/bench/i{i}/{{instance}}"),
                &[&selector],
                0,
            )
            .await
            .map_err(|status| anyhow::anyhow!("entry: {status}"))?;
        tessera_tests::wait_until("entry at the agent", Duration::from_secs(10), || {
            agent.snapshot().entries.contains_key(&entry.id)
        })
        .await;
        let start = Instant::now();
        fetch(2).await?;
        first.push(start.elapsed());
        let start = Instant::now();
        fetch(2).await?;
        cached.push(start.elapsed());
        admin
            .delete_entry(DeleteEntryRequest { id: entry.id })
            .await?;
        fetch(1).await?;
    }
    agent.stop().await?;
    let floor = latency(&cached)?;
    let floor_p50 = floor["p50"].as_f64().unwrap_or(0.0);
    let first_latency = latency(&first)?;
    let first_p50 = first_latency["p50"].as_f64().unwrap_or(0.0);
    Ok(vec![
        json!({ "name": "fetch_x509svid_cached_two_identities", "latency": floor, "note": "FetchX509SVID on an open connection, both SVIDs (fixed + instance) cached" }),
        json!({
            "name": "instance_first_svid",
            "latency": first_latency,
            "floor": "fetch_x509svid_cached_two_identities",
            "ratio_to_floor_p50": ratio(first_p50, floor_p50),
            "note": "first FetchX509SVID of a process for a new {instance} entry: key generation, one BatchNewX509SVID round trip to the server on loopback (mutual TLS), signing; PERF target p50 <= 5 ms"
        }),
    ])
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    results.extend(hashing(args.quick)?);
    results.extend(signing(args.quick)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    results.extend(runtime.block_on(workload_api(args.quick))?);
    results.extend(runtime.block_on(propagation(args.quick))?);
    results.extend(runtime.block_on(propagation_across_servers(args.quick))?);
    results.extend(runtime.block_on(instance_first_svid(args.quick))?);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let document = json!({
        "tool": "tessera-bench",
        "quick": args.quick,
        "machine": {
            "cores": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
            "kernel": kernel,
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "results": results,
    });
    let text = serde_json::to_string_pretty(&document)?;
    if let Some(path) = &args.output {
        std::fs::write(path, &text)?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    Ok(())
}
