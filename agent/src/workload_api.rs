//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! Every call must carry exactly one `workload.spiffe.io: true` metadata value
//! (`InvalidArgument` otherwise, before any attestation). The caller was pinned at
//! accept ([`crate::peer`]); each call attests it, checks it is still alive, and
//! answers from the cache. Streams push again when an SVID rotates, the bundle or the
//! caller's entries change; before every push the caller's liveness is checked again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_plugin_sdk::{Selector, SpiffeId, TrustDomain, Workload};
use tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid,
    X509svidRequest, X509svidResponse,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::attest::Attestors;
use crate::cache::{CacheSnapshot, Entitlement, WorkloadSvid};
use crate::jwt_cache::JwtCache;
use crate::node::ServerConnection;

/// The metadata key every Workload API call must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long a stream waits for its first SVIDs to be minted before `Unavailable`.
pub const FIRST_RESPONSE_DEADLINE: Duration = Duration::from_secs(30);

/// What a handler knows about its caller.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Workload>);

/// A Workload API connection whose peer was identified at accept.
pub type WorkloadConnection = tessera_proto::connection::PeerConnection<UnixStream, Caller>;

/// Accepts connections, identifies each peer (SO_PEERCRED, pidfd, `/proc` dirfd) and
/// hands identified connections to tonic. A peer that cannot be identified (no
/// credentials, pid 0, already exited) is dropped at once.
pub async fn accept_loop(
    listener: UnixListener,
    proc_root: PathBuf,
    out: mpsc::Sender<std::io::Result<WorkloadConnection>>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "Workload API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match crate::peer::identify_peer(&stream, &proc_root) {
            Ok(workload) => {
                let connection = WorkloadConnection::new(stream, Caller(Arc::new(workload)));
                if out.send(Ok(connection)).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                tracing::info!(error = %err, "Workload API connection refused: caller not identified")
            }
        }
    }
}

/// Checks the security header: exactly one value, exactly `true`.
pub fn check_security_header(metadata: &MetadataMap) -> Result<(), Status> {
    let mut values = metadata.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: watch::Receiver<Arc<CacheSnapshot>>,
    attestors: Attestors,
    connection: Arc<ServerConnection>,
    jwts: Arc<JwtCache>,
    shutdown: CancellationToken,
}

/// What a stream does with one cache snapshot: send a message (with the key that
/// tells whether it differs from the last one), keep waiting, or refuse the caller.
enum Push<T, K> {
    Send(T, K),
    Wait,
    Deny,
}

impl WorkloadApi {
    /// A service answering from `cache`.
    pub fn new(
        cache: watch::Receiver<Arc<CacheSnapshot>>,
        attestors: Attestors,
        connection: Arc<ServerConnection>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            cache,
            attestors,
            connection,
            jwts: Arc::new(JwtCache::default()),
            shutdown,
        }
    }

    /// Header check, sync check, attestation, liveness: what every call goes through.
    async fn admit<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Arc<Workload>, Vec<Selector>), Status> {
        check_security_header(request.metadata())?;
        if !self.cache.borrow().synced {
            return Err(Status::unavailable(
                "agent has not synchronised with the server yet; retry",
            ));
        }
        let caller = request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| Status::unauthenticated("caller could not be identified"))?
            .0
            .clone();
        let selectors = self.attestors.attest(Arc::clone(&caller)).await.map_err(|err| {
            tracing::info!(pid = caller.pid(), uid = caller.uid(), error = %err, "workload attestation failed");
            Status::permission_denied("workload attestation failed")
        })?;
        ensure_alive(&caller)?;
        tracing::debug!(
            pid = caller.pid(),
            uid = caller.uid(),
            selectors = selectors.len(),
            "workload attested"
        );
        Ok((caller, selectors))
    }

    /// Runs a push stream: `build` turns each cache snapshot into a message (or says
    /// to wait, or that the caller is entitled to nothing); a message equal to the last
    /// one sent is not sent again.
    fn stream<T, K>(
        &self,
        caller: Arc<Workload>,
        build: impl Fn(&CacheSnapshot) -> Push<T, K> + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>>
    where
        T: Send + 'static,
        K: PartialEq + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        let mut cache = self.cache.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut last: Option<K> = None;
            let deadline = tokio::time::Instant::now() + FIRST_RESPONSE_DEADLINE;
            loop {
                let snapshot = Arc::clone(&cache.borrow_and_update());
                match build(&snapshot) {
                    Push::Deny => {
                        let _ = tx
                            .send(Err(Status::permission_denied("no identity issued")))
                            .await;
                        return;
                    }
                    Push::Wait => {}
                    Push::Send(message, key) => {
                        if last.as_ref() != Some(&key) {
                            if let Err(status) = ensure_alive(&caller) {
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                            if tx.send(Ok(message)).await.is_err() {
                                return;
                            }
                            last = Some(key);
                        }
                    }
                }
                let waiting_for_first = last.is_none();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    changed = cache.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep_until(deadline), if waiting_for_first => {
                        let _ = tx.send(Err(Status::unavailable("identity not yet available; retry"))).await;
                        return;
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

fn ensure_alive(caller: &Workload) -> Result<(), Status> {
    match caller.is_alive() {
        Ok(true) => Ok(()),
        _ => Err(Status::permission_denied("caller is no longer running")),
    }
}

/// The identity of an X.509-SVID response: which SVID objects (by address and serial)
/// and which bundle it carried.
#[derive(PartialEq)]
struct SentX509 {
    svids: Vec<usize>,
    serials: Vec<String>,
    bundle_sequence: u64,
}

/// The identity of a bundles response.
type SentBundles = (u64, Vec<Vec<u8>>);

fn svid_key(
    svids: &[(
        Arc<tessera_plugin_sdk::RegistrationEntry>,
        Arc<WorkloadSvid>,
    )],
) -> Vec<usize> {
    // Addresses of Arcs the stream holds no reference to could be reused; so the key
    // also includes each serial (see `x509_push`), and a reused address with the same
    // serial is the same SVID.
    svids
        .iter()
        .map(|(_, svid)| Arc::as_ptr(svid) as usize)
        .collect()
}

fn x509_push(snapshot: &CacheSnapshot, selectors: &[Selector]) -> Push<X509svidResponse, SentX509> {
    if !snapshot.synced {
        return Push::Wait;
    }
    match snapshot.entitlement(selectors, SystemTime::now()) {
        Entitlement::None => Push::Deny,
        Entitlement::Pending => Push::Wait,
        Entitlement::Ready(svids) => {
            let bundle = snapshot.bundle.concatenated_der();
            let response = X509svidResponse {
                svids: svids
                    .iter()
                    .map(|(entry, svid)| X509svid {
                        spiffe_id: svid.spiffe_id.to_string(),
                        x509_svid: svid.cert_chain.concat(),
                        x509_svid_key: svid.private_key.clone(),
                        bundle: bundle.clone(),
                        hint: entry.hint.clone(),
                    })
                    .collect(),
                crl: Vec::new(),
                federated_bundles: Default::default(),
            };
            let serials = svids
                .iter()
                .map(|(_, svid)| svid.serial_hex.clone())
                .collect();
            let key = SentX509 {
                svids: svid_key(&svids),
                serials,
                bundle_sequence: snapshot.bundle.sequence_number,
            };
            Push::Send(response, key)
        }
    }
}

fn bundles_push(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Push<X509BundlesResponse, SentBundles> {
    if !snapshot.synced {
        return Push::Wait;
    }
    if !snapshot
        .entries
        .values()
        .any(|entry| entry.matches(selectors))
    {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.concatenated_der());
    Push::Send(
        X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        },
        (bundle.sequence_number, bundle.authorities.clone()),
    )
}

fn jwt_bundles_push(
    snapshot: &CacheSnapshot,
    selectors: &[Selector],
) -> Push<JwtBundlesResponse, u64> {
    if !snapshot.synced {
        return Push::Wait;
    }
    if !snapshot
        .entries
        .values()
        .any(|entry| entry.matches(selectors))
    {
        return Push::Deny;
    }
    let bundle = &snapshot.bundle;
    let mut bundles = std::collections::HashMap::new();
    bundles.insert(bundle.trust_domain.id_string(), bundle.jwks());
    Push::Send(JwtBundlesResponse { bundles }, bundle.sequence_number)
}

/// The entry's JWT audience policy as the server applies it: one audience per token
/// unless multi-audience tokens are allowed, and only allowed audiences.
fn audience_policy_allows(
    entry: &tessera_plugin_sdk::RegistrationEntry,
    audiences: &[String],
) -> bool {
    (audiences.len() == 1 || entry.jwt_multi_audience)
        && (entry.jwt_audiences.is_empty()
            || audiences.iter().all(|a| entry.jwt_audiences.contains(a)))
}

/// JSON claims as a protobuf `Struct`.
fn json_object_to_struct(
    object: serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .into_iter()
            .map(|(key, value)| (key, json_to_value(value)))
            .collect(),
    }
}

fn json_to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(object) => Kind::StructValue(json_object_to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<WitsvidResponse>;
    type FetchWITBundlesStream = Stream<WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (caller, selectors) = self.admit(&request).await?;
        Ok(Response::new(self.stream(caller, move |snapshot| {
            x509_push(snapshot, &selectors)
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (caller, selectors) = self.admit(&request).await?;
        Ok(Response::new(self.stream(caller, move |snapshot| {
            bundles_push(snapshot, &selectors)
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_security_header(request.metadata())?;
        let mut audiences = request.get_ref().audience.clone();
        if audiences.is_empty() || audiences.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        audiences.sort();
        audiences.dedup();
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => None,
            text => Some(SpiffeId::parse_leaf(text).map_err(|err| {
                Status::invalid_argument(format!("spiffe_id is not a valid SPIFFE ID: {err}"))
            })?),
        };
        let (caller, selectors) = self.admit(&request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let entries: Vec<_> = snapshot
            .matching_entries(&selectors)
            .into_iter()
            .filter(|entry| wanted.as_ref().is_none_or(|id| entry.spiffe_id == *id))
            .collect();
        if entries.is_empty() {
            return Err(Status::permission_denied("no identity issued"));
        }
        // Without a requested ID, identities whose audience policy forbids this request
        // are skipped (a restricted second identity must not break the first); the
        // server still decides for the ones asked for.
        let entries: Vec<_> = if wanted.is_some() {
            entries
        } else {
            entries
                .into_iter()
                .filter(|entry| audience_policy_allows(entry, &audiences))
                .collect()
        };
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "audience is not allowed for this identity",
            ));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for entry in entries {
            let jwt = self
                .jwts
                .get(&self.connection, &entry, &audiences)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => status,
                    _ => Status::unavailable(format!(
                        "cannot obtain a JWT-SVID: {}",
                        status.message()
                    )),
                })?;
            svids.push(Jwtsvid {
                spiffe_id: entry.spiffe_id.to_string(),
                svid: jwt.token,
                hint: entry.hint.clone(),
            });
        }
        ensure_alive(&caller)?;
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (caller, selectors) = self.admit(&request).await?;
        Ok(Response::new(self.stream(caller, move |snapshot| {
            jwt_bundles_push(snapshot, &selectors)
        })))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_security_header(request.metadata())?;
        if request.get_ref().audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if request.get_ref().svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // The caller must be an identified, live process; it needs no identity of its
        // own to validate a token.
        let (caller, _selectors) = self.admit(&request).await?;
        let snapshot = Arc::clone(&self.cache.borrow());
        let bundle = &snapshot.bundle;
        let validated = tessera_plugin_sdk::jwt::validate(
            &request.get_ref().svid,
            &request.get_ref().audience,
            &|td: &TrustDomain| (td == &bundle.trust_domain).then(|| bundle.jwt.clone()),
            SystemTime::now(),
        )
        .map_err(|err| Status::invalid_argument(format!("invalid JWT-SVID: {err}")))?;
        ensure_alive(&caller)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(validated.claims)),
        }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "WIT-SVIDs are not served by this agent",
        ))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented(
            "WIT bundles are not served by this agent",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn security_header_must_be_exactly_one_true() {
        let mut ok = MetadataMap::new();
        ok.insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        assert!(check_security_header(&ok).is_ok());
        assert!(check_security_header(&MetadataMap::new()).is_err());
        for bad in ["True", "1", "", "true "] {
            let mut map = MetadataMap::new();
            map.insert(SECURITY_HEADER, MetadataValue::try_from(bad).unwrap());
            assert_eq!(
                check_security_header(&map).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        let mut twice = MetadataMap::new();
        twice.append(SECURITY_HEADER, MetadataValue::from_static("true"));
        twice.append(SECURITY_HEADER, MetadataValue::from_static("true"));
        assert_eq!(
            check_security_header(&twice).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
