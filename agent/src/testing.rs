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
