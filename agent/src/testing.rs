//! Test support for the agent's unit tests: a local [`Signer`] that renders templated
//! IDs as the server does and signs with throwaway keys, and cache snapshots.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test support"
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tessera_plugin_sdk::jwt::{JwtBundle, JwtSigner};
use tessera_plugin_sdk::template::instance_value;
use tessera_plugin_sdk::{
    Placeholder, RegistrationEntry, Selector, SpiffeId, SpiffeIdTemplate, TemplateValues,
    TrustDomain,
};
use tessera_proto::node::NewJwtsvidResponse;
use tonic::Status;

use crate::cache::{CacheSnapshot, RevokedSet, TrustBundle};
use crate::signer::Signer;

/// Tests that count this process's open descriptors take it exclusively; tests that
/// open many descriptors for a while (runtimes, child processes, pidfds) share it, so
/// that they never run during a count.
pub(crate) static DESCRIPTORS: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(|| tokio::sync::RwLock::new(()));

/// Signs like the server: renders the entry's ID from the values it gets, refuses
/// entries it does not know. Counts its calls.
#[derive(Debug)]
pub(crate) struct LocalSigner {
    entries: Mutex<HashMap<String, Arc<RegistrationEntry>>>,
    jwt_key: JwtSigner,
    x509_lifetime: Mutex<Duration>,
    x509: AtomicUsize,
    jwt: AtomicUsize,
}

impl LocalSigner {
    pub(crate) fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            jwt_key: JwtSigner::generate("k1".into()).unwrap(),
            x509_lifetime: Mutex::new(Duration::from_secs(3600)),
            x509: AtomicUsize::new(0),
            jwt: AtomicUsize::new(0),
        }
    }

    /// Registers and returns an entry.
    pub(crate) fn entry(
        &self,
        id: &str,
        spiffe_id: &str,
        selectors: &[&str],
    ) -> Arc<RegistrationEntry> {
        let entry = Arc::new(entry(id, spiffe_id, selectors));
        self.entries
            .lock()
            .unwrap()
            .insert(id.to_owned(), Arc::clone(&entry));
        entry
    }

    /// The ID of `entry` for a made-up instance named by `tag`, and its values.
    pub(crate) fn render(
        &self,
        entry: &RegistrationEntry,
        tag: &str,
    ) -> (SpiffeId, TemplateValues) {
        let mut values = TemplateValues::new();
        values
            .set(Placeholder::Instance, instance_value(tag, 1, 1, None))
            .unwrap();
        let values = values.restricted_to(&entry.spiffe_id);
        (entry.spiffe_id.render(&values).unwrap(), values)
    }

    /// Lifetime of the X.509-SVIDs signed from now on (default 1 h).
    pub(crate) fn set_x509_lifetime(&self, lifetime: Duration) {
        *self.x509_lifetime.lock().unwrap() = lifetime;
    }

    pub(crate) fn x509_calls(&self) -> usize {
        self.x509.load(Ordering::SeqCst)
    }

    pub(crate) fn jwt_calls(&self) -> usize {
        self.jwt.load(Ordering::SeqCst)
    }

    pub(crate) fn jwt_bundle(&self, td: &TrustDomain) -> JwtBundle {
        JwtBundle::new(td.clone(), vec![self.jwt_key.public_key()])
    }

    fn id_for(&self, entry_id: &str, values: &TemplateValues) -> Result<SpiffeId, Status> {
        let entry = self
            .entries
            .lock()
            .unwrap()
            .get(entry_id)
            .cloned()
            .ok_or_else(|| Status::not_found("no such entry"))?;
        entry
            .spiffe_id
            .render(values)
            .map_err(|err| Status::invalid_argument(err.to_string()))
    }
}

/// A self-signed certificate for `id` (the key is not the agent's: the tests only read
/// the ID, serial and validity).
pub(crate) fn certificate(id: &SpiffeId, lifetime: Duration) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id.as_str()).unwrap(),
    )];
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).unwrap();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::try_from(lifetime).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

impl Signer for LocalSigner {
    fn new_x509<'a>(
        &'a self,
        entry_id: &'a str,
        _spki: Vec<u8>,
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<Vec<Vec<u8>>, Status>> {
        Box::pin(async move {
            self.x509.fetch_add(1, Ordering::SeqCst);
            let id = self.id_for(entry_id, values)?;
            let lifetime = *self.x509_lifetime.lock().unwrap();
            Ok(vec![certificate(&id, lifetime)])
        })
    }

    fn new_jwt<'a>(
        &'a self,
        entry_id: &'a str,
        audiences: &'a [String],
        values: &'a TemplateValues,
    ) -> BoxFuture<'a, Result<NewJwtsvidResponse, Status>> {
        Box::pin(async move {
            self.jwt.fetch_add(1, Ordering::SeqCst);
            // Values for another entry: sign a neighbour's ID (a misbehaving server).
            let id = match self.id_for(entry_id, values) {
                Ok(id) => id,
                Err(_) => SpiffeId::parse_leaf("spiffe://example.org/someone-else").unwrap(),
            };
            let signed = self
                .jwt_key
                .sign(&id, audiences, Duration::from_secs(300), SystemTime::now())
                .unwrap();
            let secs = |t: SystemTime| {
                i64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()).unwrap()
            };
            Ok(NewJwtsvidResponse {
                spiffe_id: id.to_string(),
                token: signed.token,
                issued_at: secs(signed.issued_at),
                expires_at: secs(signed.expires_at),
            })
        })
    }
}

/// An entry (revision 1) for the tests.
pub(crate) fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> RegistrationEntry {
    RegistrationEntry {
        id: id.to_owned(),
        spiffe_id: SpiffeIdTemplate::parse(spiffe_id).unwrap(),
        parent_id: SpiffeId::parse_leaf("spiffe://example.org/tessera/agent/join_token/t").unwrap(),
        selectors: selectors
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect(),
        x509_svid_ttl: None,
        jwt_svid_ttl: None,
        jwt_audiences: Vec::new(),
        jwt_multi_audience: false,
        dns_names: Vec::new(),
        hint: String::new(),
        federates_with: Vec::new(),
        created_revision: 1,
        revision: 1,
    }
}

/// A synced snapshot of `example.org` holding `entries` and nothing else.
pub(crate) fn snapshot_with(entries: &[Arc<RegistrationEntry>]) -> CacheSnapshot {
    let td = TrustDomain::new("example.org").unwrap();
    CacheSnapshot {
        synced: true,
        revision: 1,
        bundle: Arc::new(TrustBundle {
            trust_domain: td.clone(),
            authorities: Vec::new(),
            jwt: JwtBundle::new(td, Vec::new()),
            sequence_number: 1,
        }),
        entries: Arc::new(
            entries
                .iter()
                .map(|e| (e.id.clone(), Arc::clone(e)))
                .collect::<BTreeMap<_, _>>(),
        ),
        svids: Arc::new(HashMap::new()),
        revoked: Arc::new(RevokedSet::default()),
        crls: Arc::new(Vec::new()),
        federated: Arc::default(),
        failing: Arc::default(),
    }
}

/// How a [`FakeNode`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeMode {
    /// Answers every call.
    Serve,
    /// `Unavailable` to every call (overloaded, its datastore is down).
    Unavailable,
    /// `PermissionDenied` "agent is banned" to every call.
    Banned,
    /// Accepts every call and never answers (its datastore connection is half-open):
    /// the handler awaits forever.
    Hang,
}

/// A node API server on loopback TLS presenting `spiffe://example.org/tessera/server`
/// (or another ID) from a test CA: counts its calls, answers with its own name (the
/// `spiffe_id` of the SVIDs it sends), and can be told to fail or be stopped.
#[derive(Debug, Clone)]
pub(crate) struct FakeNode {
    pub(crate) name: String,
    pub(crate) address: String,
    mode: Arc<Mutex<NodeMode>>,
    /// How `Sync` is answered, when not as every other call.
    sync_mode: Arc<Mutex<Option<NodeMode>>>,
    calls: Arc<AtomicUsize>,
    sync_calls: Arc<AtomicUsize>,
    /// `since_revision` of every `Sync` call received.
    syncs: Arc<Mutex<Vec<u64>>>,
    stop: tokio_util::sync::CancellationToken,
    /// The accept and serve tasks.
    served: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

/// A test CA and the client TLS configuration that trusts it (no client certificate).
pub(crate) struct FakeCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert_der: Vec<u8>,
}

impl FakeCa {
    pub(crate) fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake CA");
        let cert_der = params.self_signed(&key).unwrap().der().to_vec();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            cert_der,
        }
    }

    /// Client TLS config of an agent of `example.org` holding this CA as its bundle.
    pub(crate) fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        let trust = Arc::new(crate::tls::ServerTrust::default());
        trust.set(std::slice::from_ref(&self.cert_der));
        let td = TrustDomain::new("example.org").unwrap();
        let verifier = Arc::new(crate::tls::ServerVerifier::new(
            trust,
            SpiffeId::from_segments(&td, &["tessera", "server"]).unwrap(),
            crate::tls::provider(),
        ));
        Arc::new(crate::tls::client_config(verifier, None, crate::tls::provider()).unwrap())
    }

    /// A server certificate for `id` and its key.
    fn server_cert(&self, id: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(id).unwrap(),
        )];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.der().to_vec(), key.serialize_der())
    }

    /// Starts a fake node server `name` presenting `server_id`.
    pub(crate) async fn serve(&self, name: &str, server_id: &str) -> FakeNode {
        let (cert, key) = self.server_cert(server_id);
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(cert)],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let node = FakeNode {
            name: name.to_owned(),
            address: listener.local_addr().unwrap().to_string(),
            mode: Arc::new(Mutex::new(NodeMode::Serve)),
            sync_mode: Arc::default(),
            calls: Arc::new(AtomicUsize::new(0)),
            sync_calls: Arc::new(AtomicUsize::new(0)),
            syncs: Arc::new(Mutex::new(Vec::new())),
            stop: tokio_util::sync::CancellationToken::new(),
            served: Arc::default(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let stop = node.stop.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx
                            .send(Ok::<_, std::io::Error>(
                                tessera_proto::connection::PeerConnection::new(tls, ()),
                            ))
                            .await;
                    }
                });
            }
        });
        let service = tessera_proto::node::node_server::NodeServer::new(node.clone());
        let stop = node.stop.clone();
        let serving = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    stop.cancelled_owned(),
                )
                .await;
        });
        node.served.lock().unwrap().extend([accepting, serving]);
        node
    }
}

impl FakeNode {
    pub(crate) fn set_mode(&self, mode: NodeMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// How `Sync` alone is answered from now on (`None`: as every other call).
    pub(crate) fn set_sync_mode(&self, mode: Option<NodeMode>) {
        *self.sync_mode.lock().unwrap() = mode;
    }

    /// Calls received (all methods).
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// `Sync` calls received.
    pub(crate) fn sync_calls(&self) -> usize {
        self.sync_calls.load(Ordering::SeqCst)
    }

    pub(crate) fn syncs(&self) -> Vec<u64> {
        self.syncs.lock().unwrap().clone()
    }

    /// Stops accepting, ends its streams and closes its connections: the port refuses
    /// connections once this returns.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.served.lock().unwrap());
        for task in tasks {
            task.await.unwrap();
        }
    }

    /// Counts a call and answers per the mode.
    async fn enter(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = *self.mode.lock().unwrap();
        Self::answer(mode).await
    }

    /// Counts a `Sync` call and answers per the mode for `Sync`.
    async fn enter_sync(&self) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.sync_calls.fetch_add(1, Ordering::SeqCst);
        let mode = self
            .sync_mode
            .lock()
            .unwrap()
            .unwrap_or_else(|| *self.mode.lock().unwrap());
        Self::answer(mode).await
    }

    async fn answer(mode: NodeMode) -> Result<(), Status> {
        match mode {
            NodeMode::Serve => Ok(()),
            NodeMode::Unavailable => Err(Status::unavailable("datastore unavailable")),
            NodeMode::Banned => Err(Status::permission_denied("agent is banned")),
            NodeMode::Hang => std::future::pending().await,
        }
    }

    fn svid(&self) -> tessera_proto::node::AgentSvid {
        tessera_proto::node::AgentSvid {
            spiffe_id: self.name.clone(),
            ..Default::default()
        }
    }
}

type FakeStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl tessera_proto::node::node_server::Node for FakeNode {
    type AttestAgentStream = FakeStream<tessera_proto::node::AttestAgentResponse>;
    type SyncStream = FakeStream<tessera_proto::node::SyncResponse>;

    async fn attest_agent(
        &self,
        _request: tonic::Request<tonic::Streaming<tessera_proto::node::AttestAgentRequest>>,
    ) -> Result<tonic::Response<Self::AttestAgentStream>, Status> {
        self.enter().await?;
        let response = tessera_proto::node::AttestAgentResponse {
            step: Some(tessera_proto::node::attest_agent_response::Step::Result(
                self.svid(),
            )),
        };
        Ok(tonic::Response::new(Box::pin(futures::stream::iter([Ok(
            response,
        )]))))
    }

    async fn renew_agent(
        &self,
        _request: tonic::Request<tessera_proto::node::RenewAgentRequest>,
    ) -> Result<tonic::Response<tessera_proto::node::RenewAgentResponse>, Status> {
        self.enter().await?;
        Ok(tonic::Response::new(
            tessera_proto::node::RenewAgentResponse {
                svid: Some(self.svid()),
            },
        ))
    }

    /// One message at `since + 1`, then the stream stays open until the server stops.
    async fn sync(
        &self,
        request: tonic::Request<tessera_proto::node::SyncRequest>,
    ) -> Result<tonic::Response<Self::SyncStream>, Status> {
        self.enter_sync().await?;
        let since = request.get_ref().since_revision;
        self.syncs.lock().unwrap().push(since);
        let first = tessera_proto::node::SyncResponse {
            revision: since + 1,
            snapshot: since == 0,
            ..Default::default()
        };
        let stop = self.stop.clone();
        let end = futures::stream::once(async move {
            stop.cancelled().await;
            Err(Status::unavailable("server stopping"))
        });
        Ok(tonic::Response::new(Box::pin(futures::StreamExt::chain(
            futures::stream::iter([Ok(first)]),
            end,
        ))))
    }

    async fn batch_new_x509svid(
        &self,
        _request: tonic::Request<tessera_proto::node::BatchNewX509svidRequest>,
    ) -> Result<tonic::Response<tessera_proto::node::BatchNewX509svidResponse>, Status> {
        self.enter().await?;
        Ok(tonic::Response::new(
            tessera_proto::node::BatchNewX509svidResponse::default(),
        ))
    }

    async fn new_jwtsvid(
        &self,
        _request: tonic::Request<tessera_proto::node::NewJwtsvidRequest>,
    ) -> Result<tonic::Response<NewJwtsvidResponse>, Status> {
        self.enter().await?;
        Ok(tonic::Response::new(NewJwtsvidResponse {
            spiffe_id: self.name.clone(),
            ..Default::default()
        }))
    }
}

/// A TCP relay to a [`FakeNode`] that can be frozen: it then forwards nothing more, in
/// either direction, on its connections and on new ones, but keeps them open (a host
/// that vanished without closing anything, a black-holed route).
#[derive(Debug)]
pub(crate) struct Relay {
    pub(crate) address: String,
    frozen: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub(crate) async fn to(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let frozen = tokio_util::sync::CancellationToken::new();
        let target = target.to_owned();
        let freeze = frozen.clone();
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                held.spawn(Self::forward(in_read, out_write, freeze.clone()));
                held.spawn(Self::forward(out_read, in_write, freeze.clone()));
            }
        });
        Self {
            address,
            frozen,
            task,
        }
    }

    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: tokio_util::sync::CancellationToken,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::select! {
                () = frozen.cancelled() => break,
                read = from.read(&mut buf) => read,
            };
            let n = match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.is_cancelled() || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // Frozen: hold both ends open, forward nothing.
        std::future::pending::<()>().await;
        drop((from, to));
    }

    /// Stops forwarding, keeping every connection open.
    pub(crate) fn freeze(&self) {
        self.frozen.cancel();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Node API time limits short enough for tests: connect 500 ms, call 400 ms, workload
/// signing 250 ms, keepalive PING every 200 ms answered within 300 ms.
pub(crate) fn short_timeouts() -> crate::node::Timeouts {
    crate::node::Timeouts {
        connect: Duration::from_millis(500),
        call: Duration::from_millis(400),
        workload_signing: Duration::from_millis(250),
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(300),
    }
}

/// An address nothing listens on (connections are refused).
pub(crate) async fn closed_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}
